"""KV cache policy: how many chunks go to each tier, and which chunk lives where (no tensors).

The KV cache is kept in fixed-size *chunks*: ``chunk_tokens`` tokens of one layer, K and V
(``2 × kv_heads × chunk_tokens × head_dim`` elements). :func:`split_kv` sizes the tiers for
a context window: every chunk in host RAM when ``--kv-cpu-mem`` allows (or is not given),
otherwise as many as it holds, the rest in a zarr store on disk plus a few host staging
chunks that disk chunks are read into. :class:`ChunkTable` is the run-time bookkeeping
(chunk → tier and slot, free host slots, which chunk to spill), pure policy that
:class:`~offload_rt.kv.tiered.TieredKV` asks before moving bytes.

Spilling keeps a layer's first chunk (the attention sinks) and its most recent chunks in
RAM and sends the oldest others to disk: exact attention reads every chunk anyway, and the
recent ones are where new tokens are written and where MagicPIG's exact window lives. Every
chunk on disk keeps a small abstract in RAM, its keys' bounds (:mod:`offload_rt.memory.kv_select`:
which disk chunks a decode step reads); the split budgets them for the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload_rt.config import format_size
from offload_rt.errors import BudgetError
from offload_rt.memory.kv_select import abstract_bytes
from offload_rt.memory.plan import cli_size

CHUNK_TOKENS = 256  # tokens per chunk (per layer)
STAGING_BATCH = 8  # disk chunks read per batch at least; two batches in flight (one read while the other computes)
STAGING_BYTES = 2 << 20  # ... or as many as fill this (small chunks: a read of a layer's chunks is one request)
DEQUANT_CHUNKS = 2  # quantized KV: closed chunks dequantized at a time for prefill / tree attention (kv/tiered.py)
SINK_CHUNKS = 1  # a layer's first chunks that never leave RAM


@dataclass(frozen=True)
class KVShape:
    n_layers: int
    kv_heads: int
    head_dim: int
    itemsize: int  # bytes per element at the KV dtype
    chunk_tokens: int = CHUNK_TOKENS
    quant_row: int = 0  # --kv-dtype q8/q4: bytes per token and KV head of K (= of V), scales included; 0: floats
    name: str = ""  # the KV dtype as --kv-dtype names it, for --plan ("": the compute dtype)
    float_chunks: int = 1  # quantized KV: chunks per layer kept in floats (the open one; 2 with a draft's rollbacks)

    @property
    def row_bytes(self) -> int:
        """Bytes per token and KV head of K (and of V), as chunks hold them."""
        return self.quant_row or self.head_dim * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        """K and V of one chunk of one layer."""
        return 2 * self.kv_heads * self.chunk_tokens * self.row_bytes

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.kv_heads * self.row_bytes

    @property
    def float_bytes(self) -> int:
        """Quantized KV: the float32 chunks beside the records (each layer's newest ``float_chunks``, and the
        chunks dequantized at a time for prefill; kv/tiered.py); 0 for float KV."""
        if not self.quant_row:
            return 0
        chunks = self.float_chunks * self.n_layers + DEQUANT_CHUNKS
        return chunks * 2 * self.kv_heads * self.chunk_tokens * self.head_dim * 4

    @property
    def abstract_bytes(self) -> int:
        """RAM of one disk chunk's key bounds (kv_select)."""
        return abstract_bytes(self.kv_heads, self.head_dim)

    def chunks_per_layer(self, tokens: int) -> int:
        return -(-tokens // self.chunk_tokens)


@dataclass(frozen=True)
class KVSplit:
    """How a context window's KV is held: chunk counts per tier and the host bytes they take."""

    shape: KVShape
    tokens: int  # the context window served
    host_chunks: int  # chunk slots in RAM (all layers)
    disk_chunks: int  # chunks the disk may hold (all layers)
    staging_chunks: int  # host slots disk chunks are read into (0 without spilling)
    table_bytes: int  # MagicPIG hash tables for the whole window (0: exact attention only)
    longest_context: int  # tokens the budgets could serve (RAM + disk), capped by the model
    bound_bytes: int = 0  # the disk chunks' key bounds (kv_select), every chunk of the window's (0: no disk)

    @property
    def host_bytes(self) -> int:
        """Everything the KV takes from the host budget: chunks, staging, hash tables, key bounds."""
        chunks = (self.host_chunks + self.staging_chunks) * self.shape.chunk_bytes
        return chunks + self.table_bytes + self.bound_bytes + self.shape.float_bytes

    @property
    def disk_bytes(self) -> int:
        return self.disk_chunks * self.shape.chunk_bytes

    @property
    def spills(self) -> bool:
        return self.disk_chunks > 0

    def describe(self) -> str:
        s = self.shape
        kind = f" as {s.name} ({format_size(s.bytes_per_token)} per token)" if s.name else ""
        line = (f"kv cache: {self.tokens} tokens, {format_size(self.tokens * s.bytes_per_token)}{kind} in chunks of "
                f"{s.chunk_tokens} tokens: host {format_size(self.host_chunks * s.chunk_bytes)} "
                f"({self.host_chunks} chunks)")
        if self.spills:
            staging = format_size(self.staging_chunks * s.chunk_bytes)
            line += (f", disk {format_size(self.disk_bytes)} ({self.disk_chunks} chunks; "
                     f"{self.staging_chunks} staging chunks in RAM, {staging}; key bounds "
                     f"{format_size(self.bound_bytes)})")
        if s.float_bytes:
            line += f"; newest chunks in floats {format_size(s.float_bytes)}"
        if self.table_bytes:
            line += f"; MagicPIG tables {format_size(self.table_bytes)}"
        return line + f"; longest context that fits: {self.longest_context} tokens"


def staging_batch(chunk_bytes: int, kv_cpu_mem: int) -> int:
    """Disk chunks read per batch (a half of the staging slots): STAGING_BATCH, or more where they are small,
    up to STAGING_BYTES and to a sixteenth of ``kv_cpu_mem`` (the staging slots, both halves, then take at most
    an eighth of the budget from the chunks kept in RAM). A batch of a layer's consecutive chunks is one read
    (storage.kv_store), and the disk is fastest at large requests: q4 chunks of the default model (54 KiB)
    read 20 at a time went at 1.2-1.6 GB/s, 8 at a time at 1.0-1.3 (O_DIRECT, this project's machine)."""
    return max(STAGING_BATCH, min(STAGING_BYTES, kv_cpu_mem // 16) // max(1, chunk_bytes))


def min_host_chunks(shape: KVShape, tokens: int) -> int:
    """The fewest RAM chunks a spilling cache runs with: per layer its sink chunk and the open one."""
    return shape.n_layers * min(shape.chunks_per_layer(tokens), SINK_CHUNKS + 1)


def split_kv(shape: KVShape, tokens: int, *, kv_cpu_mem: int | None, disk_free: int | None,
             model_tokens: int, table_bytes_per_token: int = 0) -> KVSplit:
    """Size the tiers for ``tokens`` of context.

    ``kv_cpu_mem`` None: every chunk in RAM. Otherwise RAM holds what it allows (staging
    included, and the key bounds of every chunk the window may spill) and the rest goes to disk, which
    must have ``disk_free`` bytes for it.
    Raises BudgetError (one line: what to pass) when neither works.
    """
    per_layer = shape.chunks_per_layer(tokens)
    total = shape.n_layers * per_layer
    cb = shape.chunk_bytes
    tables = tokens * table_bytes_per_token
    disk_room = max(0, disk_free or 0)

    def longest(host_chunks: int) -> int:
        room = host_chunks + (disk_room // cb)
        return max(0, min(model_tokens, (room // shape.n_layers) * shape.chunk_tokens))

    if kv_cpu_mem is None or total * cb + tables + shape.float_bytes <= kv_cpu_mem:
        return KVSplit(shape, tokens, total, 0, 0, tables, longest(total))
    if table_bytes_per_token:
        raise BudgetError(f"MagicPIG needs the KV cache and its hash tables in RAM "
                          f"({format_size(total * cb + tables)} for {tokens} tokens): raise --kv-cpu-mem to "
                          f"{cli_size(total * cb + tables, round_up=True)} or use --attention exact")
    bounds = total * shape.abstract_bytes
    room = max(0, kv_cpu_mem - bounds - shape.float_bytes) // cb
    need = min_host_chunks(shape, tokens)
    # larger read batches where the budget has room for them beyond the working set, never below two of 8
    staging = 2 * max(STAGING_BATCH, min(staging_batch(cb, kv_cpu_mem), (room - need) // 2))
    host = room - staging
    if host < need:
        least = (need + staging) * cb + bounds + shape.float_bytes
        raise BudgetError(f"--kv-cpu-mem {format_size(kv_cpu_mem)} is below the KV cache's working set "
                          f"({format_size(least)}: each layer's first and newest chunk, read buffers and the "
                          f"disk chunks' key bounds); raise it to at least {cli_size(least, round_up=True)}")
    disk = total - host
    if disk_free is not None and disk * cb > disk_free:
        raise BudgetError(f"the KV cache needs {format_size(disk * cb)} on disk for {tokens} tokens but the offload "
                          f"directory has {format_size(disk_free)} free; free space, point --offload-dir elsewhere, "
                          f"or lower --ctx-size to at most {longest(host)}")
    return KVSplit(shape, tokens, host, disk, staging, 0, longest(host), bounds)


class ChunkTable:
    """Where each layer's chunks live: ``("host", slot)`` or ``("disk", -1)``; free host slots.

    Chunks are logical: chunk i of a layer holds its tokens ``i*C .. i*C+C-1``. A chunk
    being written is always in RAM. When no slot is free, :meth:`place` spills the layer's
    oldest chunk that is neither a sink chunk nor the one asked for.
    """

    def __init__(self, n_layers: int, host_slots: int, disk: bool):
        self.chunks: list[list[tuple[str, int]]] = [[] for _ in range(n_layers)]
        self.free = list(range(host_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.disk = disk

    def place(self, layer: int, chunk: int) -> tuple[int, list[tuple[int, int, int]], bool]:
        """Make logical chunk ``chunk`` of ``layer`` writable in RAM.

        Returns (slot, spills, load): ``spills`` lists (layer, chunk, slot) of chunks to write to disk
        first (their slot is then reused), ``load`` says the chunk was on disk and must be read
        back into ``slot`` (a trim went back into it).
        """
        row = self.chunks[layer]
        if chunk > len(row):
            raise ValueError(f"chunk {chunk} of layer {layer} placed before chunk {len(row)}")
        if chunk < len(row) and row[chunk][0] == "host":
            return row[chunk][1], [], False
        spills = []
        if not self.free:
            if not self.disk:
                raise RuntimeError(f"no RAM chunk left for layer {layer} (the plan sizes the KV tiers so this "
                                   f"cannot happen)")
            vl, victim = self._victim(layer, chunk)
            slot = self.chunks[vl][victim][1]
            self.chunks[vl][victim] = ("disk", -1)
            spills.append((vl, victim, slot))
            self.free.append(slot)
        slot = self.free.pop()
        load = chunk < len(row)  # it exists, on disk
        if load:
            row[chunk] = ("host", slot)
        else:
            row.append(("host", slot))
        return slot, spills, load

    def _victim(self, layer: int, chunk: int) -> tuple[int, int]:
        """The chunk to spill: the layer's own oldest non-sink chunk; during a long prefill a layer may
        not have one yet (the layers before it took the free slots), then the oldest non-sink, non-last
        chunk of the layer holding the most RAM chunks."""
        def oldest(lay: int, skip: int) -> int | None:
            return next((i for i, (t, _s) in enumerate(self.chunks[lay])
                         if t == "host" and i >= SINK_CHUNKS and i != skip), None)

        own = oldest(layer, chunk)
        if own is not None:
            return layer, own
        by_count = sorted(range(len(self.chunks)), key=lambda i: -sum(t == "host" for t, _s in self.chunks[i]))
        for lay in by_count:
            i = oldest(lay, len(self.chunks[lay]) - 1)
            if i is not None:
                return lay, i
        raise RuntimeError("no KV chunk can be spilled (the plan sizes the KV tiers so this cannot happen)")

    def truncate(self, tokens: int, chunk_tokens: int) -> list[tuple[int, int, str]]:
        """Forget chunks past ``tokens``; returns (layer, chunk, tier) of those dropped (host slots freed)."""
        keep = -(-tokens // chunk_tokens)
        dropped = []
        for layer, row in enumerate(self.chunks):
            for i in range(len(row) - 1, keep - 1, -1):
                tier, slot = row.pop()
                if tier == "host":
                    self.free.append(slot)
                dropped.append((layer, i, tier))
        return dropped

    def runs(self, layer: int, n_chunks: int) -> list[tuple[str, int, list[int]]]:
        """The first ``n_chunks`` chunks of ``layer`` as runs of one tier: (tier, first chunk, host slots)."""
        out: list[tuple[str, int, list[int]]] = []
        for i, (tier, slot) in enumerate(self.chunks[layer][:n_chunks]):
            if out and out[-1][0] == tier:
                out[-1][2].append(slot)
            else:
                out.append((tier, i, [slot]))
        return out

    def count(self, tier: str) -> int:
        return sum(t == tier for row in self.chunks for t, _s in row)
