"""TieredKV: the KV cache in chunks in host RAM and on disk, attention on the CPU where they are.

Keys and values live in two *pools* of chunk slots, ``[slots, kv_heads, C, d]`` (K and V),
in the layout the CPU kernels read (``kernels_cpu.attention``): a layer's chunk i holds
its tokens ``i*C .. i*C+C-1``. Where each chunk is (RAM slot or disk) is decided by the
pure policy :class:`~offload_rt.memory.kv_plan.ChunkTable`; bytes move here:

* a new token is written into its chunk's RAM slot (the chunk being written is always in
  RAM); when the plan's RAM chunks run out, the layer's oldest non-sink chunk is written
  to the zarr store (``storage.kv_store``) and its slot reused;
* attention for a layer runs the exact kernel over each run of RAM chunks, and over the
  disk chunks read in batches into staging slots by the runtime's slot ring
  (:mod:`offload_rt.prefetch`, the weights' reader: the next batch is read while the
  current one computes), merging the partial results by log-sum-exp;
* a decode step (one token, no tree, no window shorter than the context) over a layer whose chunks
  are all in RAM, the common case, writes the token and attends in one kernel call
  (``kernels_cpu.attention.attend_decode``);
* a decode step over a layer with chunks on disk queues the disk chunks it reads, computes the RAM
  chunks (one kernel call) while they are read, then each batch as it arrives; exact attention reads
  them all, so it also queues the next layer's disk chunks behind its own, read while this layer and
  the next one's projections compute; a batch's chunk files are read in parallel (small files: one
  after the other each would wait out the disk's latency). With selection (``attention="select"``) only those that may matter: each chunk written
  to disk leaves its keys' per-channel min/max in RAM (:mod:`offload_rt.memory.kv_select`, Quest's
  bound on ``q . k``), and the step reads the chunks whose bound comes near the log-sum-exp of its
  scores with the sink tokens and its own key, the highest first, at most ``select_share`` of them,
  packed into the staging slots (every disk key is visible to a decode query: a batch needs no
  contiguous key range);
* with MagicPIG (``attention="magicpig"``, decode steps past ``magicpig_from`` tokens) the
  sink tokens and a recent window are exact and the rest is sampled through LSH tables
  (``kernels_cpu.magicpig``), built by the prompt's last pass as each layer's keys are written (see
  ``expect``; else by the first decode step that needs them) and extended by
  whole chunks as tokens age out of the window. MagicPIG needs the chunks in RAM (the plan refuses
  otherwise).

With ``quant`` (``--kv-dtype q8|q4``, :mod:`kernels_cpu.kv_quant`) the pools hold quantized records: a
chunk is written into float32 rows beside the pools (per layer the open chunk, and with a draft the one
before, so that a rollback into it re-closes it from the same floats) and quantized into its slot when it
fills; closed chunks are what attention reads wherever they are (RAM, disk, re-closed after a rollback),
through :mod:`kernels_cpu.attention_q` for decode (merged with the open chunk's float result) and
dequantized a few at a time for prefill and trees; the selection's bounds come from the stored keys.
MagicPIG's tables hash the closed chunks' keys as stored (dequantized), and its kernel reads the sampled
rows, the sinks and the window's closed chunks from the records (dequantized in registers); the open
chunk's floats go through the float kernel and are merged.

Beside a GPU only q and the new k/v come down and only the output goes up.
Pool memory is reserved once at its planned size and touched as tokens arrive; nothing
proportional to the context is allocated per step but the selection's bounds of the disk chunks
(a few floats per chunk and query head).
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kernels_cpu import attention as kern
from kernels_cpu import hugepages
from kernels_cpu.kv_quant import KVQuant
from offload_rt.kv import bytes_per_token, check_keep, check_load
from offload_rt.memory import kv_select
from offload_rt.memory.kv_plan import CHUNK_TOKENS, DEQUANT_CHUNKS, ChunkTable
from offload_rt.prefetch import Prefetcher
from offload_rt.trace import NullTracer
from storage.store import aligned_buffer

BLOCK_QUERIES = 16  # up to this many queries per call: the Numba kernel; more (prefill): torch matmuls in blocks
SINKS = 4  # MagicPIG: first tokens always attended exactly
WINDOW = 64  # MagicPIG: at least this many recent tokens attended exactly


class TieredKV:
    """Chunked KV in RAM (``host_chunks`` slots) spilling to a zarr store under ``disk_root``."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int, *,
                 host_chunks: int, staging_chunks: int = 0, disk_root: Path | None = None,
                 chunk_tokens: int = CHUNK_TOKENS, attention: str = "exact", lsh_k: int = 10, lsh_l: int = 150,
                 magicpig_from: int = 0, select_share: float = kv_select.DEFAULT_SHARE, tracer=None,
                 quant: KVQuant | None = None, float_chunks: int = 2):
        if attention not in ("exact", "magicpig", "select"):
            raise ValueError(f"attention {attention!r}")
        if quant is not None and (quant.head_dim != head_dim or quant.chunk_tokens != chunk_tokens):
            raise ValueError(f"{quant} for head dim {head_dim}, chunks of {chunk_tokens}")
        self.quant = quant  # closed chunks as quantized records (kernels_cpu.kv_quant); None: floats
        if quant is not None:
            dtype = torch.float32  # the open chunks' floats, what rows() gives and load() takes
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype, self.max_tokens, self.C = dtype, max_tokens, chunk_tokens
        self.offset = 0
        self.attention_s = 0.0
        self.disk_read_bytes = self.disk_write_bytes = 0
        self.disk_chunks_seen = self.disk_chunks_read = 0  # disk chunks attention covered / read back
        self.tracer = tracer or NullTracer()
        self.host_chunks, self.staging_chunks = host_chunks, staging_chunks
        self._table = ChunkTable(n_layers, host_chunks, disk=disk_root is not None)
        slots = host_chunks + staging_chunks
        shape = (slots, kv_heads, chunk_tokens, head_dim)
        pool_dtype = dtype
        if quant is not None:
            shape, pool_dtype = (slots, *quant.record_shape(kv_heads)), torch.uint8
            # per layer its newest chunks in floats: the open one, and with float_chunks=2 the one before (a
            # speculation's rollback going back into it re-closes it from the same floats); and a few chunks'
            # dequantized floats for the general path
            self._nf = float_chunks
            self._fk = torch.zeros(float_chunks * n_layers, kv_heads, chunk_tokens, head_dim, dtype=dtype)
            self._fv = torch.zeros_like(self._fk)
            self._fchunk = [[-1] * float_chunks for _ in range(n_layers)]  # the chunk each of a layer's holds
            self._dk = torch.zeros(DEQUANT_CHUNKS, kv_heads, chunk_tokens, head_dim)
            self._dv = torch.zeros_like(self._dk)
        nbytes = int(np.prod(shape)) * pool_dtype.itemsize
        # 4 KiB aligned (chunk reads from disk land here with O_DIRECT); pages are touched as tokens arrive
        self.kpool = aligned_buffer(nbytes).view(pool_dtype).view(shape)
        self.vpool = aligned_buffer(nbytes).view(pool_dtype).view(shape)
        if attention == "magicpig":  # its gathers read rows at random: huge pages (advised before first touch)
            hugepages.advise(self.kpool)
            hugepages.advise(self.vpool)
        self._disk_root = disk_root
        self._disk = None  # storage.kv_store.KVChunkStore, created at the first spill
        # per chunk on disk: its keys' min and max per KV head and channel (the selection's bounds)
        bounds = (n_layers, -(-max_tokens // chunk_tokens), kv_heads, head_dim) if disk_root else (0,) * 4
        self._kmin, self._kmax = np.zeros(bounds, np.float32), np.zeros(bounds, np.float32)  # touched as chunks spill
        self.select_share = select_share
        # disk chunks are read by the runtime's one slot ring (offload_rt.prefetch), two halves of the staging
        # slots (kv_plan.staging_batch chunks each): the next batch is read while the current one computes
        self._batch = max(1, staging_chunks // 2)
        self._halves = [list(range(host_chunks + h * self._batch, host_chunks + (h + 1) * self._batch))
                        for h in range(2)]
        self._ring = Prefetcher(2, self._fill_staging, name="kv-read") if disk_root else None
        # a batch's runs of consecutive chunks are one read each (storage.kv_store: a file per layer); a selection's
        # scattered chunks are many small reads, each waiting out the disk's latency: in flight together
        self._io = ThreadPoolExecutor(8, thread_name_prefix="kv-io") if disk_root else None
        self._seq = 0  # the next batch the compute side takes from the ring
        self._ahead = None  # (layer, batches, first seq): the next layer's disk batches, queued by read_ahead
        # select: per layer, the disk chunks its last decode step chose and those it judged (chose among)
        self._picked: list[tuple[list[int], set]] = [([], set()) for _ in range(n_layers)]
        self.attention = attention
        self.lsh_k, self.lsh_l, self.magicpig_from = lsh_k, lsh_l, magicpig_from
        self._index: list = [None] * n_layers  # MagicPIG tables per layer (kernels_cpu.magicpig.LSHIndex)
        self._index_stop = [0] * n_layers  # the index covers tokens [SINKS, stop); exact from stop on
        self._prompt_end = 0  # prompt passes ending before this build no tables (see expect)
        # the decode kernel's views, made once
        self._pools = kern.DecodePools(self.kpool, self.vpool) if quant is None else None
        # per layer: (the table's entries for its first chunks, their RAM slots as the kernel's int32 array),
        # reused while the entries are unchanged (decode steps within a chunk)
        self._decode_slots: list = [None] * n_layers
        # select over quantized KV: each layer's sink keys as floats once its first chunk is closed (its record
        # dequantized once, not at every step); dropped when anything writes into that chunk
        self._sinks: list = [None] * n_layers

    # ------------------------------------------------------------------ writing
    def _store(self):
        if self._disk is None:
            from storage.kv_store import KVChunkStore

            max_chunks = -(-self.max_tokens // self.C)
            self._disk = KVChunkStore(self._disk_root, self.n_layers, max_chunks, self.kv_heads, self.C,
                                      self.kpool.shape[3], self.kpool.dtype)
        return self._disk

    def _place(self, layer: int, chunk: int) -> int:
        if chunk == 0:
            self._sinks[layer] = None
        slot, spills, load = self._table.place(layer, chunk)
        for vl, victim, s in spills:
            with self.tracer.span("kv_disk", f"kv write layer.{vl}", layer=vl, chunk=victim):
                self._store().write(vl, victim, self.kpool[s], self.vpool[s])
            self.disk_write_bytes += self._store().chunk_bytes
            keys = self.kpool[s].float() if self.quant is None else self.quant.dequantize_keys(self.kpool[s])
            self._kmin[vl, victim], self._kmax[vl, victim] = kv_select.key_bounds(keys.numpy())  # what is stored
        if load:
            with self.tracer.span("kv_disk", f"kv read layer.{layer}", layer=layer, chunk=chunk):
                self.disk_read_bytes += self._store().read_into(layer, chunk, self.kpool[slot], self.vpool[slot])
        return slot

    def _write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [T, kv_heads, d] at token indices start.. (chunk by chunk). Quantized: into the chunk's floats,
        quantized into its slot when the chunk fills (closes)."""
        i, T, C = 0, k.shape[0], self.C
        while i < T:
            pos = start + i
            c, r = divmod(pos, C)
            n = min(C - r, T - i)
            slot = self._place(layer, c)
            if self.quant is None:
                self.kpool[slot, :, r:r + n] = k[i:i + n].transpose(0, 1)
                self.vpool[slot, :, r:r + n] = v[i:i + n].transpose(0, 1)
            else:
                f = self._open_floats(layer, c, r, slot)
                self._fk[f, :, r:r + n] = k[i:i + n].transpose(0, 1)
                self._fv[f, :, r:r + n] = v[i:i + n].transpose(0, 1)
                if r + n == C:
                    self.quant.quantize(self._fk[f], self._fv[f], self.kpool[slot], self.vpool[slot])
            i += n

    def _open_floats(self, layer: int, chunk: int, rows: int, slot: int) -> int:
        """Quantized: the index in the float chunks of ``chunk`` of ``layer``, written from row ``rows`` on.
        A layer's newest ``float_chunks`` chunks keep their floats; an older one written again (a rollback went
        back that far) gets its first rows back from its record, dequantized: the rows' groups that are whole
        quantize again to the same bytes (kernels_cpu.kv_quant), the group the writing resumes in is
        quantized anew with the new rows."""
        f = self._nf * layer + chunk % self._nf
        if self._fchunk[layer][chunk % self._nf] != chunk:
            if rows:
                self._fk[f, :, :rows] = self.quant.dequantize_keys(self.kpool[slot])[:, :rows]
                self._fv[f, :, :rows] = self.quant.dequantize_values(self.vpool[slot])[:, :rows]
            self._fchunk[layer][chunk % self._nf] = chunk
        return f

    def _floats(self, layer: int, chunk: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized: a chunk's K and V as floats [kv_heads, C, d]: its own floats while the layer keeps them,
        else its record (in RAM slot ``slot``) dequantized."""
        if self._fchunk[layer][chunk % self._nf] == chunk:
            f = self._nf * layer + chunk % self._nf
            return self._fk[f], self._fv[f]
        return self.quant.dequantize_keys(self.kpool[slot]), self.quant.dequantize_values(self.vpool[slot])

    # ------------------------------------------------------------------ attention
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        # a window longer than the context hides no key: the decode path applies as without one
        if k.dtype != self.dtype and self.quant is None:  # --kv-dtype f16/bf16 under another compute dtype
            k, v = k.to(self.dtype), v.to(self.dtype)
        if (q.shape[0] == 1 and tree_mask is None and (not window or self.offset < window) and q.is_cpu
                and self.quant is None):
            out = self._attend_decode(layer, q, k, v)
            if out is not None:
                return out
        t0 = time.perf_counter()
        T, nh, d = q.shape
        start, end = self.offset, self.offset + T
        if end > self.max_tokens:
            raise ValueError(f"KV cache of {self.max_tokens} tokens cannot hold {end}")
        out_device, out_dtype = q.device, q.dtype
        self._write(layer, start, k.to("cpu", self.dtype), v.to("cpu", self.dtype))
        qf = q.to("cpu", torch.float32).contiguous()
        call = dict(q_index=torch.arange(start, end, dtype=torch.int64), window=window or 0,
                    n_prefix=end - tree_mask.shape[1] if tree_mask is not None else None,
                    tail_mask=tree_mask.to("cpu", torch.bool).contiguous() if tree_mask is not None else None)
        # one query seeing every key (no tree, no window hiding any): a decode step
        decode = T == 1 and tree_mask is None and (not window or end <= window)
        with self.tracer.span("cpu_attn", f"attention layer.{layer}", layer=layer, tokens=end):
            sampled = self._magicpig(layer, end) if (T == 1 and tree_mask is None and not window) else None
            if sampled is None and decode:
                o, lse = (self._decode_spilled if self.quant is None else self._decode_quant)(layer, qf, end, call)
            elif sampled is None:
                o, lse = (self._exact if self.quant is None else self._exact_quant)(layer, qf, 0, end, call)
            else:
                o, lse = self._sampled(layer, qf, end, sampled, call)
            if T > 1 and tree_mask is None and not window and end >= self._prompt_end:
                self._magicpig(layer, end + 1)  # a prompt's (last) pass: the tables the next decode step needs
        out = o.reshape(T, nh * d).to(device=out_device, dtype=out_dtype)
        self.attention_s += time.perf_counter() - t0
        return out

    def _sampled(self, layer: int, q: torch.Tensor, end: int, index, call: dict):
        """MagicPIG's decode step (q [1, nh, d]): the sinks and the window exact, in the sampling kernel's own
        softmax, the rest sampled through ``index``. Quantized: the kernel reads the closed chunks' records (the
        sampled rows, the sinks, the window's closed part), the open chunk's floats go through the float kernel,
        merged."""
        from kernels_cpu import magicpig

        hi = end if self.quant is None else end // self.C * self.C
        o, lse = magicpig.attend_sampled(q[0], self.kpool, self.vpool, self._slots(layer, hi), index,
                                         exact=[(0, SINKS), (self._index_stop[layer], hi)])
        acc = (o[None], lse[None])
        if hi < end:
            acc = _merged(acc, self._open_chunk(layer, q, end, kern.attend, call))
        return acc

    def _open_chunk(self, layer: int, q: torch.Tensor, end: int, fn, call: dict):
        """Quantized: attention (``fn``: a float kernel) over the open chunk's floats, the rows of [0, end) past
        the last closed chunk (there must be some)."""
        closed = end // self.C
        f = torch.tensor([self._nf * layer + closed % self._nf], dtype=torch.int32)
        return fn(q, self._fk, self._fv, f, end - closed * self.C, k_base=closed * self.C, **call)

    def _attend_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """The common decode step in one kernel call (kernels_cpu.attention.attend_decode): one CPU token,
        every key visible (no tree, no window cutting the context), k/v in the pools' dtype, exact
        attention, and every chunk of the layer up to this token in RAM once this token's chunk is placed.
        None otherwise, the token's k/v not written: the general path then runs (placing the chunk again
        is a no-op)."""
        t0 = time.perf_counter()
        end = self.offset + 1
        if (end > self.max_tokens or k.dtype != self.dtype or v.dtype != self.dtype
                or q.dtype not in kern.DECODE_Q_DTYPES
                or not (k.is_cpu and v.is_cpu and q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
                or (self.attention == "magicpig" and end >= max(self.magicpig_from, SINKS + WINDOW + self.C))):
            return None
        n_chunks = -(-end // self.C)
        self._place(layer, n_chunks - 1)
        slots = self._ram_slots(layer, n_chunks)
        if slots is None:
            return None
        out_dtype = q.dtype if q.dtype == torch.bfloat16 else torch.float32  # what the kernel can write
        if isinstance(self.tracer, NullTracer):  # a span costs ~2 µs even when it records nothing
            o = kern.attend_decode(q, k, v, self._pools, slots, end, out_dtype=out_dtype)
        else:
            with self.tracer.span("cpu_attn", f"attention layer.{layer}", layer=layer, tokens=end):
                o = kern.attend_decode(q, k, v, self._pools, slots, end, out_dtype=out_dtype)
        if o.dtype != q.dtype:
            o = o.to(q.dtype)
        self.attention_s += time.perf_counter() - t0
        return o

    def _ram_slots(self, layer: int, n_chunks: int):
        """The RAM slots of the layer's first n_chunks chunks (int32 numpy array), None if one is on disk."""
        head = self._table.chunks[layer][:n_chunks]
        cached = self._decode_slots[layer]
        if cached is not None and cached[0] == head:
            return cached[1]
        if any(tier != "host" for tier, _slot in head):
            return None
        slots = np.array([slot for _tier, slot in head], dtype=np.int32)
        self._decode_slots[layer] = (head, slots)
        return slots

    def _slots(self, layer: int, tokens: int) -> torch.Tensor:
        runs = self._table.runs(layer, -(-tokens // self.C))
        if len(runs) != 1 or runs[0][0] != "host":
            raise RuntimeError("MagicPIG runs over chunks in RAM only")
        return torch.tensor(runs[0][2], dtype=torch.int32)

    def _exact(self, layer: int, q: torch.Tensor, lo: int, hi: int, call: dict):
        """Exact attention over keys [lo, hi) (lo on a chunk boundary): RAM runs, then disk batches, merged."""
        C = self.C
        fn = kern.attend if q.shape[0] <= BLOCK_QUERIES else kern.attend_blocks
        acc = None

        def add(res):
            nonlocal acc
            acc = _merged(acc, res)

        if hi <= lo:
            return _no_keys(q)
        first, n_chunks = lo // C, -(-hi // C)
        disk: list[int] = []
        for tier, c0, slots in self._table.runs(layer, n_chunks):
            c1 = c0 + len(slots)
            if c1 <= first:
                continue
            if c0 < first:
                slots, c0 = slots[first - c0:], first
            if tier == "host":
                base = c0 * C
                add(fn(q, self.kpool, self.vpool, torch.tensor(slots, dtype=torch.int32), min(hi, c1 * C) - base,
                       k_base=base, **call))
            else:
                disk += range(c0, c1)
        if disk:
            self.disk_chunks_seen += len(disk)
            self.disk_chunks_read += len(disk)
            for slots, chunks in self._disk_passes(layer, _batches(disk, self._batch, packed=False)):
                base = chunks[0] * C
                add(fn(q, self.kpool, self.vpool, slots, min(hi, (chunks[-1] + 1) * C) - base, k_base=base, **call))
        return acc

    def _decode_spilled(self, layer: int, q: torch.Tensor, end: int, call: dict):
        """A decode step's attention (q [1, nh, d], every key [0, end) visible) over a layer with chunks on disk
        (or one the fast path left): the disk chunks to read (all of them, or with ``attention="select"``
        :meth:`_select`'s) are queued first, the RAM chunks computed in one kernel call while they are read,
        then the disk batches as they arrive, merged in that order.

        The RAM chunks and each disk batch are passed to the kernel packed, as one region of keys whatever
        chunks lie between: region key j gets index ``k_base + j``, at or below its own, and every key at or
        below the query's is visible to it (no window, no tree), so the packing changes no mask; only the
        chunk being written (the last in RAM) is partial."""
        C = self.C
        ram, ram_chunks, disk = [], [], []
        for c, (tier, slot) in enumerate(self._table.chunks[layer][:-(-end // C)]):
            if tier == "host":
                ram.append(slot)
                ram_chunks.append(c)
            else:
                disk.append(c)
        passes = self._decode_reads(layer, q, end, disk, -(-end // C))
        try:
            n_keys = (len(ram) - 1) * C + end - ram_chunks[-1] * C
            acc = kern.attend(q, self.kpool, self.vpool, torch.tensor(ram, dtype=torch.int32), n_keys,
                              k_base=ram_chunks[0] * C, **call)
            for slots, chunks in passes:
                acc = kern.merge(*acc, *kern.attend(q, self.kpool, self.vpool, slots, len(chunks) * C,
                                                    k_base=chunks[0] * C, **call))
        finally:
            passes.close()  # abandoned half-way (an exception): the ring gets back what was queued
        return acc

    def _decode_quant(self, layer: int, q: torch.Tensor, end: int, call: dict):
        """A decode step's attention over a quantized cache: the closed chunks through the quantized kernel
        (``kernels_cpu.attention_q``: the RAM ones in one call while the disk ones chosen as in
        :meth:`_decode_spilled` are read, then each disk batch), the open chunk's floats through the float
        kernel, merged. A chunk is read as its record once closed, wherever it is: RAM, disk and a rollback's
        re-closed chunk give the same result."""
        from kernels_cpu import attention_q

        C, closed = self.C, end // self.C
        ram, disk = [], []
        for c, (tier, slot) in enumerate(self._table.chunks[layer][:closed]):
            (ram if tier == "host" else disk).append(slot if tier == "host" else c)
        passes = self._decode_reads(layer, q, end, disk, closed)
        acc = None
        try:
            if end > closed * C:
                acc = self._open_chunk(layer, q, end, kern.attend, call)
            batches = ((slots.numpy(), len(chunks)) for slots, chunks in passes)
            for slots, n in itertools.chain([(ram, len(ram))] if ram else [], batches):  # the RAM chunks while the first disk batch is read, then each batch
                acc = _merged(acc, attention_q.attend(q, self.kpool, self.vpool, slots, n, self.quant))
        finally:
            passes.close()
        return acc

    def _exact_quant(self, layer: int, q: torch.Tensor, lo: int, hi: int, call: dict):
        """:meth:`_exact` over a quantized cache (prefill, trees, windows): closed chunks dequantized a few
        at a time (disk ones read through the staging slots first) into float chunks the float kernels read,
        the open chunk from its floats."""
        C = self.C
        fn = kern.attend if q.shape[0] <= BLOCK_QUERIES else kern.attend_blocks
        acc = None

        def add(res):
            nonlocal acc
            acc = _merged(acc, res)

        first, closed = lo // C, hi // C
        row = self._table.chunks[layer]
        disk = [c for c in range(first, closed) if row[c][0] != "host"]
        ram = [c for c in range(first, closed) if row[c][0] == "host"]
        self.disk_chunks_seen += len(disk)
        self.disk_chunks_read += len(disk)

        def dequantized(chunks: list[int], slots: list[int]):
            for i in range(0, len(chunks), DEQUANT_CHUNKS):
                group = chunks[i:i + DEQUANT_CHUNKS]
                for j, slot in enumerate(slots[i:i + DEQUANT_CHUNKS]):
                    self._dk[j], self._dv[j] = self._stored(slot)
                # packed: region key j is row j % C of float chunk j // C, absolute index c * C + j % C; every
                # chunk gets its own call unless the chunks are consecutive (one key range)
                for run in _batches(group, DEQUANT_CHUNKS, packed=False):
                    j0 = group.index(run[0])
                    add(fn(q, self._dk, self._dv, torch.arange(j0, j0 + len(run), dtype=torch.int32), len(run) * C,
                           k_base=run[0] * C, **call))

        dequantized(ram, [row[c][1] for c in ram])
        if disk:
            for slots, chunks in self._disk_passes(layer, _batches(disk, self._batch, packed=False)):
                dequantized(list(chunks), slots.tolist())
        if hi > closed * C and hi > lo:
            add(self._open_chunk(layer, q, hi, fn, call))
        return _no_keys(q) if acc is None else acc

    def _stored(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized: the record in ``slot`` dequantized, K and V [kv_heads, C, d] float32: what attention reads
        of a closed chunk."""
        return self.quant.dequantize_keys(self.kpool[slot]), self.quant.dequantize_values(self.vpool[slot])

    def _key_rows(self, layer: int, chunk: int, lo: int, hi: int, end: int) -> torch.Tensor:
        """Keys of rows [lo, hi) of a RAM chunk as floats [kv_heads, hi - lo, d], as attention at ``end``
        tokens reads them (a closed chunk: its record)."""
        slot = self._table.chunks[layer][chunk][1]
        if self.quant is None:
            return self.kpool[slot, :, lo:hi].float()
        if (chunk + 1) * self.C <= end:
            return self.quant.dequantize_keys(self.kpool[slot])[:, lo:hi]
        return self._fk[self._nf * layer + chunk % self._nf, :, lo:hi].float()

    def _sink_keys(self, layer: int, end: int) -> torch.Tensor:
        """The first tokens' keys (in RAM) as :meth:`_key_rows` gives them; a closed quantized chunk's kept."""
        if self.quant is None or end <= self.C:
            return self._key_rows(layer, 0, 0, min(SINKS, end - 1), end)
        if self._sinks[layer] is None:
            self._sinks[layer] = self._key_rows(layer, 0, 0, SINKS, end).clone()
        return self._sinks[layer]

    def _select(self, layer: int, q: torch.Tensor, end: int, disk: list[int]) -> list[int]:
        """The disk chunks of ``layer`` a decode query q [1, nh, d] at token ``end - 1`` reads:
        :func:`offload_rt.memory.kv_select.choose` on the chunks' key bounds, against the log-sum-exp of the
        query's scores with the first tokens (the sinks, in RAM) and its own key (just written), a lower bound
        of the whole softmax's known before any chunk is read."""
        d = q.shape[2]
        qs = q[0].numpy() * d ** -0.5
        row, C = self._table.chunks[layer], self.C
        seen = [self._key_rows(layer, (end - 1) // C, (end - 1) % C, (end - 1) % C + 1, end)]
        if row[0][0] == "host":
            seen.append(self._sink_keys(layer, end))
        ref = kv_select.reference(qs, torch.cat(seen, dim=1).numpy())
        idx = np.asarray(disk)
        bounds = kv_select.score_bounds(qs, self._kmin[layer, idx], self._kmax[layer, idx])
        pick = kv_select.choose(bounds, ref, len(disk) * C, kv_select.budget(len(disk), self.select_share))
        return idx[pick].tolist()

    def _fill_staging(self, item: tuple[int, tuple[int, ...]], half: int) -> int:
        """On the ring's thread: chunks of a layer from disk into a half of the staging slots."""
        layer, chunks = item
        items = [(layer, c, self.kpool[s], self.vpool[s]) for c, s in zip(chunks, self._halves[half])]
        with self.tracer.span("kv_disk", f"kv read layer.{layer}", layer=layer, chunks=len(chunks)):
            return self._store().read_many(items, executor=self._io)

    def _disk_passes(self, layer: int, batches: list[tuple[int, ...]]):
        """An iterator of (staging slots, chunks) per batch of disk chunks (chunk i of the batch in slot i), each
        read by the ring while the caller computes on the one before. The batches are queued now: the caller
        may compute something else while the first ones are read. Closing the iterator before its end (or
        dropping it) takes and releases what is left, so that the ring is ready for the next caller."""
        passes = self._passes(layer, batches)
        next(passes)  # queued
        return passes

    def _passes(self, layer: int, batches: list[tuple[int, ...]], wanted: set | None = None):
        """:meth:`_disk_passes`' generator: queues the batches (or takes those :meth:`_read_ahead` queued, when
        they are the same), then :meth:`_take` s them (only the chunks in ``wanted``; None: all)."""
        if self._ahead is not None and self._ahead[:2] == (layer, batches):
            first = self._ahead[2]
            self._ahead = None
        else:
            self._drop_ahead()
            first = self._queue(layer, batches)
        return self._take(layer, [(first + i, chunks, wanted) for i, chunks in enumerate(batches)])

    def _take(self, layer: int, items: list):
        """A generator over queued batches ``items``, (ring sequence number, chunks, wanted), in sequence
        order: yields None once (primed), then (staging slots, chunks) per batch as the ring has read it, only
        its chunks in ``wanted`` (a set; None: all; a batch with none of them is skipped), and gives each batch
        back to the ring after its turn; closed early, it takes and gives back the rest (the ring is then
        ready for the next caller)."""
        done = 0
        try:
            yield None
            for seq, chunks, wanted in items:
                half, nb = self._ring.take(seq, waiting=lambda: self.tracer.span(
                    "cpu_attn", f"wait kv layer.{layer}", layer=layer))
                done += 1
                self.disk_read_bytes += nb
                slots = self._halves[half][:len(chunks)]
                if wanted is not None:
                    slots, chunks = [s for s, c in zip(slots, chunks) if c in wanted], \
                        tuple(c for c in chunks if c in wanted)
                try:
                    if chunks:
                        yield torch.tensor(slots, dtype=torch.int32), chunks
                finally:
                    self._ring.release(half)
        finally:  # abandoned half-way (an exception in compute): let the ring finish what was queued
            for seq, _chunks, _wanted in items[done:]:
                self._ring.release(self._ring.take(seq)[0])

    def _decode_reads(self, layer: int, q: torch.Tensor, end: int, disk: list[int], n_chunks: int):
        """A decode step's disk chunks of ``layer`` (``disk``: those among its first ``n_chunks``), queued now,
        as :meth:`_disk_passes` gives them: all of them (exact), or :meth:`_select`'s. Then queues the next
        layer's likely reads behind them (:meth:`_read_ahead`).

        Selection: the chunks chosen by the layer's previous step were queued ahead (a step chooses mostly
        what the one before chose: ~70 % on the default model at 6k tokens); those the query chooses again
        are used from there, the others were read for nothing (counted: they are disk traffic), and only the
        rest is read after the query is known."""
        read = self._select(layer, q, end, disk) if self.attention == "select" and disk else disk
        self.disk_chunks_seen += len(disk)
        wanted = None
        if self.attention == "select":
            self._picked[layer] = (read, set(disk))
            fetch = self._coalesced(read, disk)
            wanted = set(read) if len(fetch) > len(read) else None
        else:
            fetch = read
        batches = _batches(fetch, self._batch, packed=True)
        ahead = self._ahead
        if ahead is None or ahead[0] != layer or ahead[1] == batches:
            self.disk_chunks_read += len(fetch)
            passes = self._passes(layer, batches, wanted)
            next(passes)  # primed
        else:
            self._ahead = None
            have = {c for b in ahead[1] for c in b}
            rest = _batches([c for c in fetch if c not in have], self._batch, packed=True)
            self.disk_chunks_read += len(have) + sum(map(len, rest))
            first = self._queue(layer, rest)
            passes = self._take(layer, [(ahead[2] + i, b, set(read)) for i, b in enumerate(ahead[1])]
                                + [(first + i, b, wanted) for i, b in enumerate(rest)])
            next(passes)  # primed
        self._read_ahead(layer + 1, n_chunks)
        return passes

    def _queue(self, layer: int, batches: list[tuple[int, ...]]) -> int:
        """Hand a layer's disk batches to the ring; returns the first one's sequence number."""
        first = self._seq
        for chunks in batches:
            self._ring.submit((layer, chunks))
        self._seq += len(batches)
        return first

    def _read_ahead(self, layer: int, n_chunks: int) -> None:
        """Decode: queue the disk chunks ``layer`` will likely read among its first ``n_chunks`` now, behind the
        current layer's, so that the ring reads them while this layer and the next one's projections compute:
        exact attention reads every disk chunk (which ones does not depend on the query); selection those its
        previous step chose or did not judge (spilled since), still on disk (:meth:`_decode_reads` uses what it
        chooses again). The next
        layer's :meth:`_passes` takes them if its batches are these (its token's write may spill a chunk: then
        they are dropped and its own are queued)."""
        if self.attention not in ("exact", "select") or layer >= self.n_layers or self._ahead is not None:
            return
        row = self._table.chunks[layer][:n_chunks]
        if self.attention == "exact":
            disk = [c for c, (tier, _slot) in enumerate(row) if tier != "host"]
        else:  # what the last step chose, and what it did not judge (spilled since): not yet known not to matter
            picked, judged = self._picked[layer]
            if not judged:  # no step of this layer chose yet: nothing to go by
                return
            disk = sorted({*picked, *(c for c, (tier, _s) in enumerate(row) if tier != "host" and c not in judged)})
            disk = self._coalesced([c for c in disk if c < len(row) and row[c][0] != "host"],
                                   [c for c, (tier, _s) in enumerate(row) if tier != "host"])
        if disk:
            batches = _batches(disk, self._batch, packed=True)
            self._ahead = (layer, batches, self._queue(layer, batches))

    def _coalesced(self, chosen: list[int], disk: list[int]) -> list[int]:
        """Selection: the disk chunks to read for ``chosen`` (kv_select.coalesce: short gaps between them read
        through, for fewer requests)."""
        return kv_select.coalesce(sorted(chosen), set(disk), kv_select.GAP_BYTES // self._store().chunk_bytes)

    def _drop_ahead(self) -> None:
        """Take and release the batches queued ahead when nobody will use them: the ring's halves are then free
        and no read is under way (before the staging slots are used directly, or chunks are discarded)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            for i in range(len(ahead[1])):
                self._ring.release(self._ring.take(ahead[2] + i)[0])

    def _sampled_stop(self, end: int) -> int:
        """MagicPIG at ``end`` tokens samples [SINKS, stop) and attends [stop, end) exactly: whole chunks
        leave the exact window of at least WINDOW tokens."""
        return ((end - WINDOW) // self.C) * self.C

    def _magicpig(self, layer: int, end: int):
        """The layer's LSH index brought up to date for a decode step at ``end`` tokens, or None (exact
        attention). A prompt's last pass (:meth:`expect`) calls it for
        its last token + 1 as each layer's keys are written, so that the tables are built at prefill, not by
        the first decode step (which otherwise hashes the whole prompt: seconds at a few thousand tokens)."""
        if self.attention != "magicpig" or end < max(self.magicpig_from, SINKS + WINDOW + self.C):
            return None
        from kernels_cpu import magicpig

        stop = self._sampled_stop(end)
        index = self._index[layer]
        slots = self._slots(layer, stop)
        if index is None:
            index = self._index[layer] = magicpig.LSHIndex(self.kv_heads, self.head_dim, self.lsh_k, self.lsh_l,
                                                           seed=layer, quant=self.quant)
            index.build(self.kpool, slots, SINKS, stop)
        elif stop > self._index_stop[layer]:
            index.extend(self.kpool, slots, self._index_stop[layer], stop)
        self._index_stop[layer] = stop
        return index

    # ------------------------------------------------------------------ bookkeeping
    def expect(self, end: int) -> None:
        """A prompt is about to run in passes up to ``end`` tokens. MagicPIG's tables are built by the pass
        that reaches it, per layer as its keys are written, centred on the mean of the whole prompt's keys
        (a mean taken over a first pass of a few hundred tokens is a worse centre: 0.20 against 0.15
        relative error on the default model's real attention at 2k tokens); without this hint, every
        prompt pass builds or extends them."""
        self._prompt_end = end

    def commit(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> int:
        self._drop_ahead()
        n = min(n, self.offset)
        self.offset -= n
        for layer, chunk, tier in self._table.truncate(self.offset, self.C):
            if tier == "disk":
                self._store().discard(layer, chunk)
        for i, index in enumerate(self._index):
            if index is not None and self._index_stop[i] > self._sampled_stop(self.offset + 1):
                self._index[i] = None  # it covers tokens the next step attends exactly: rebuilt then
        return n

    def keep(self, start: int, rows: Sequence[int]) -> None:
        rows = check_keep(self.offset, start, rows)
        idx = torch.tensor(rows, dtype=torch.int64)
        kept = [self._gather(layer, start, self.offset, idx) for layer in range(self.n_layers)]
        self.trim(self.offset - start)
        for layer, (k, v) in enumerate(kept):
            self._write(layer, start, k, v)
        self.offset = start + len(rows)

    def _gather(self, layer: int, lo: int, hi: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens lo + idx of a layer as [n, kv_heads, d] copies (disk chunks read into staging)."""
        C = self.C
        ks, vs = [], []
        self._drop_ahead()  # the staging slots are used here directly: nothing may still be read into them
        staging = iter(range(self.host_chunks, self.host_chunks + self.staging_chunks))
        for c in range(lo // C, -(-hi // C)):
            tier, slot = self._table.chunks[layer][c]
            held = self.quant is not None and self._fchunk[layer][c % self._nf] == c
            if tier == "disk" and not held:
                slot = next(staging)  # keep() spans a few chunks (a speculation tree), staging holds 16
                self.disk_read_bytes += self._store().read_into(layer, c, self.kpool[slot], self.vpool[slot])
            if self.quant is None:
                ks.append(self.kpool[slot])
                vs.append(self.vpool[slot])
            else:  # the floats while held (a rollback re-closes the chunk from them), else the record's
                k, v = self._floats(layer, c, slot)
                ks.append(k)
                vs.append(v)
        base = (lo // C) * C
        pos = idx + (lo - base)
        k = torch.cat(ks, dim=1)[:, pos].transpose(0, 1).clone()
        v = torch.cat(vs, dim=1)[:, pos].transpose(0, 1).clone()
        return k, v

    def rows(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Committed tokens [lo, hi) of a layer as (k, v) copies [hi - lo, kv_heads, d], disk chunks read
        through the staging slots as :meth:`keep` reads them, one chunk at a time (tests compare caches)."""
        if not 0 <= lo <= hi <= self.offset:
            raise ValueError(f"rows({lo}, {hi}) outside the {self.offset} committed tokens")
        if hi == lo:
            return (torch.empty(0, self.kv_heads, self.head_dim, dtype=self.dtype),) * 2
        edges = [lo, *range((lo // self.C + 1) * self.C, hi, self.C), hi]
        parts = [self._gather(layer, a, b, torch.arange(b - a)) for a, b in zip(edges, edges[1:])]
        return torch.cat([k for k, _v in parts]), torch.cat([v for _k, v in parts])

    def load(self, k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]) -> None:
        """Append T tokens' K/V of every layer ([T, kv_heads, d] each) at ``offset`` and commit them.

        Through :meth:`_write`, attention's own write path: chunks are placed (and older ones spilled)
        as a prefill places them. MagicPIG's tables need nothing here: the loaded tokens are indexed from
        the pools by the next prompt pass (a restored prefix is always followed by one: the prompt's last
        token is recomputed) or decode step that lets them age out of the exact window.
        """
        T = check_load(self, k_layers, v_layers)
        for layer, (k, v) in enumerate(zip(k_layers, v_layers)):
            self._write(layer, self.offset, k.to("cpu"), v.to("cpu"))
        self.commit(T)

    def records(self, layer: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized: copies of a committed, closed chunk's K and V records [kv_heads, C, w] uint8, the bytes the
        cache holds for it (a disk chunk read through a staging slot): what the prefix cache keeps."""
        if self.quant is None or not 0 <= chunk < self.offset // self.C:
            raise ValueError(f"records of chunk {chunk}: {self.offset // self.C} closed chunks of "
                             f"{self.kv_dtype} KV")
        tier, slot = self._table.chunks[layer][chunk]
        if tier == "disk":
            self._drop_ahead()  # the staging slots are used here directly (as _gather uses them)
            slot = self.host_chunks
            self.disk_read_bytes += self._store().read_into(layer, chunk, self.kpool[slot], self.vpool[slot])
        return self.kpool[slot].clone(), self.vpool[slot].clone()

    def load_records(self, k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]) -> None:
        """Quantized: append n whole chunks given as their records (per layer [n, kv_heads, C, w] uint8, as
        :meth:`records` gives them) at ``offset``, a chunk boundary, and commit them: placed (older chunks
        spilled) as :meth:`load` places them, the records copied into their slots, no floats kept (a later
        write into one, a rollback that far, starts from its record dequantized, as for any older chunk).
        The prefix cache's restore: the bytes saved, without a dequantize and quantize."""
        if self.quant is None or self.offset % self.C:
            raise ValueError(f"load_records into {self.kv_dtype} KV at token {self.offset} (quantized KV at a "
                             f"chunk boundary expected)")
        if len(k_layers) != self.n_layers or len(v_layers) != self.n_layers:
            raise ValueError(f"load_records: {self.n_layers} layers expected, got {len(k_layers)} K and "
                             f"{len(v_layers)} V")
        n = k_layers[0].shape[0] if self.n_layers else 0
        want = (n, *self.quant.record_shape(self.kv_heads))
        for t in (*k_layers, *v_layers):
            if tuple(t.shape) != want or t.dtype != torch.uint8:
                raise ValueError(f"load_records: {tuple(t.shape)} {t.dtype}, expected {want} torch.uint8")
        if self.offset + n * self.C > self.max_tokens:
            raise ValueError(f"KV cache of {self.max_tokens} tokens cannot hold {self.offset + n * self.C}")
        first = self.offset // self.C
        for layer, (k, v) in enumerate(zip(k_layers, v_layers)):
            for j in range(n):
                c = first + j
                slot = self._place(layer, c)
                self.kpool[slot].copy_(k[j])
                self.vpool[slot].copy_(v[j])
                held = self._fchunk[layer]
                if held[c % self._nf] == c:  # floats of this chunk from an earlier use of the cache: stale
                    held[c % self._nf] = -1
        self.commit(n * self.C)

    def reset(self) -> None:
        self.trim(self.offset)
        self._prompt_end = 0

    def tier_bytes(self) -> dict[str, int]:
        cb = 2 * self.kpool[0].numel() * self.kpool.element_size()
        tables = sum(i.nbytes for i in self._index if i is not None)
        disk = self._table.count("disk")
        bounds = disk * kv_select.abstract_bytes(self.kv_heads, self.head_dim)  # the disk chunks' abstracts
        floats = 0 if self.quant is None else sum(t.nbytes for t in (self._fk, self._fv, self._dk, self._dv))
        return {"host": self._table.count("host") * cb + tables + bounds + floats, "disk": disk * cb}

    @property
    def kv_dtype(self) -> str:
        """How chunks hold K/V: q8 / q4, or the float dtype's name (--stats)."""
        return self.quant.name if self.quant is not None else str(self.dtype).replace("torch.", "")

    @property
    def stored_bytes_per_token(self) -> int:
        """K and V bytes one token takes in the chunks, every layer, scales included (--stats)."""
        return 2 * self.n_layers * self.kpool[0, :, 0].numel() * self.kpool.element_size()

    @property
    def nbytes(self) -> int:
        return sum(self.tier_bytes().values())

    @staticmethod
    def bytes_per_token(n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return bytes_per_token(n_layers, kv_heads, head_dim, dtype)

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._io.shutdown(wait=True)
        if self._disk is not None:
            self._disk.close()
            self._disk = None


def _merged(acc, res):
    """Attention over two key sets merged by log-sum-exp: (out, lse) pairs; ``acc`` None is no keys yet."""
    return res if acc is None else kern.merge(*acc, *res)


def _no_keys(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention over no keys: zeros, and -inf so that a merge ignores it."""
    T, nh, d = q.shape
    return torch.zeros(T, nh, d), torch.full((T, nh), float("-inf"))


def _batches(chunks: list[int], size: int, packed: bool) -> list[tuple[int, ...]]:
    """Sorted disk chunks in read batches of at most ``size`` (the staging slots of a half): runs of
    consecutive chunks, so that a batch is one range of keys; ``packed`` (a decode step's selection, every
    key visible to the query) fills batches whatever the gaps, for fewer reads and kernel calls."""
    out: list[list[int]] = []
    for c in chunks:
        if out and len(out[-1]) < size and (packed or c == out[-1][-1] + 1):
            out[-1].append(c)
        else:
            out.append([c])
    return [tuple(b) for b in out]
