"""The prefix cache: the K/V of prompts' leading chunks, kept for later requests that start the same way.

A server sees the same prompt prefixes again and again (a system prompt, a conversation growing turn
by turn). After a request's prefill, :meth:`PrefixCache.save` keeps the K/V of its prompt's whole
chunks; a later request asks :meth:`PrefixCache.lookup` how many of its leading tokens are kept,
:meth:`PrefixCache.restore` loads them into its empty KV cache (``cache.load``), and the engine
prefills only the rest.

Keys. A chunk is ``chunk_tokens`` token ids. Chunk i's key is ``sha256(key_{i-1} || ids of chunk i)``,
a chain from a seed that hashes the *identity* (the weight store, its source and weights format,
the tokenizer, the KV dtype and shape, ``chunk_tokens``: :func:`model_identity`): a key names a
chunk's tokens *and everything before them*, and a prefix of another model or tokenizer cannot match,
by construction. Lookups are granular: a count of tokens that is a multiple of ``granule`` (the
engine's ``prefill_chunk``: a restored prefix then ends where a prefill pass starts, and the logits
are the bits a full prefill gives; see ``Engine.prefill``), never the whole prompt (its last token's
logits must be computed).

Entries. One per chunk: K and V of every layer as the KV holds them. Float KV: the rows,
``[layers, chunk_tokens, kv_heads, d]`` in the KV dtype. Quantized KV (``--kv-dtype q8|q4``, the identity's
``kv_quant``): the chunk's records, ``[layers, *KVQuant.record_shape(kv_heads)]`` uint8 (q4: ~1/6.4 of
the float32 rows), the bytes the KV holds for the chunk. The entry chunk *is* the KV chunk (the server
passes its ``chunk_tokens``) and entries are whole chunks below the cache's offset, so closed chunks:
save copies their records (``TieredKV.records``), restore copies them into the new cache's slots
(``TieredKV.load_records``); the bits are the KV's, with no quantizing at either end.

Tiers. Entries live in RAM, least recently used evicted past ``ram_bytes``. With a ``root`` every entry is also written
to ``<root>/<key>.kv`` by a background thread at save time (the batch loop never waits for a disk;
:meth:`flush` does), so a server killed at any moment finds its prefixes after a restart; disk usage
stays within ``disk_bytes``, least recently used files removed. A file is written to a temporary name
and renamed, its header carries the identity's seed, the key, the entry's shape and encoding (``dtype``:
the float dtype's name, or ``q8``/``q4`` for records) and a CRC-32 of the payload, and it is validated
when read: a corrupt or foreign file, or one of another encoding (a quantized KV's file written before
entries held records: float32 rows), is removed and counts as a miss.
A new cache indexes the files under ``root`` by name and size only (cheap); ``root/identity.json``
says whose they are, and a root holding another identity's entries is emptied (they could never match).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import tempfile
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kernels_cpu.kv_quant import KVQuant
from storage.formats import FLOAT_FORMATS, format_of
from storage.kv_store import _write_back

MAGIC = b"OFRTPFX1"  # an entry file's first bytes; then the header's length (u32 LE), the header (JSON), K, V
# (the header's fields have fixed widths: every entry file of a cache has the same size)
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
IDENTITY_FILE = "identity.json"
SHAPE_KEYS = ("layers", "kv_heads", "head_dim", "kv_dtype")  # what an identity must say about the K/V
_FADV = hasattr(os, "posix_fadvise")


def model_identity(store, args, kv_dtype: torch.dtype, quant: str | None = None) -> dict:
    """The identity of a loaded model's K/V (``store``: its storage.WeightStore, ``args``: its family config):
    the store's directory name, its source's identity and weights format, the tokenizer file's hash,
    the KV dtype (the rows' floats) and shape, and ``quant`` (``--kv-dtype`` q8/q4: entries hold the KV's
    quantized records). Two runs share prefix entries exactly when these are equal."""
    manifest = store.manifest
    identity = {"store": store.path.name, "source": manifest["source"]["identity"], "weights": manifest.get("weights"),
                "tokenizer": hashlib.sha256(store.tokenizer_file.read_bytes()).hexdigest(),
                "kv_dtype": format_of(kv_dtype).name, "layers": args.num_hidden_layers,
                "kv_heads": args.num_key_value_heads, "head_dim": args.head_dim}
    return identity if quant is None else {**identity, "kv_quant": quant}


@dataclass
class _Entry:
    """One chunk's K and V of every layer on the CPU: rows [layers, chunk_tokens, kv_heads, d] each, or
    quantized records [layers, kv_heads, chunk_tokens, row bytes] (uint8)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    """Chunks of prompt K/V keyed by their token-id prefix: RAM (LRU in ``ram_bytes``), written through to
    ``root`` (LRU in ``disk_bytes``, None: unbounded); ``root`` None keeps them in RAM only."""

    def __init__(self, root: Path | None, identity: dict, chunk_tokens: int, ram_bytes: int,
                 disk_bytes: int | None = None, *, granule: int | None = None):
        missing = [k for k in SHAPE_KEYS if k not in identity]
        if missing:
            raise ValueError(f"prefix cache identity lacks {', '.join(missing)}")
        granule = chunk_tokens if granule is None else granule
        if chunk_tokens < 1 or granule < 1 or granule % chunk_tokens:
            raise ValueError(f"prefix cache granule {granule} is not a multiple of its chunk of {chunk_tokens} tokens")
        self.C, self.granule = chunk_tokens, granule
        self.identity = dict(identity, chunk_tokens=chunk_tokens)
        self.seed = hashlib.sha256(json.dumps(self.identity, sort_keys=True, default=str).encode()).digest()
        layers, kv_heads, head_dim = int(identity["layers"]), int(identity["kv_heads"]), int(identity["head_dim"])
        # an entry's K (and V): the float rows, or a quantized KV's records; the file header's dtype names which
        self.quant = KVQuant(identity["kv_quant"], head_dim, chunk_tokens) if identity.get("kv_quant") else None
        if self.quant is None:
            self._shape = (layers, chunk_tokens, kv_heads, head_dim)
            self._dtype, self._encoding = FLOAT_FORMATS[identity["kv_dtype"]].dtype, identity["kv_dtype"]
        else:
            self._shape = (layers, *self.quant.record_shape(kv_heads))
            self._dtype, self._encoding = torch.uint8, self.quant.name
        self.ram_budget, self.disk_budget = ram_bytes, disk_bytes
        self.root = Path(root) if root is not None else None
        self._lock = threading.Lock()  # the indexes below, shared with the writer thread
        self._ram: OrderedDict[str, _Entry] = OrderedDict()  # key -> entry, least recently used first
        self._ram_used = 0
        self._disk: OrderedDict[str, int] = OrderedDict()  # key -> file size, least recently used first
        self._disk_used = 0
        self._pending: dict[str, _Entry] = {}  # queued for the writer (readable meanwhile)
        self._queue: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self.lookups = self.hits = self.hit_tokens = self.dropped = self.write_errors = 0
        if self.root is not None:
            self._open_root()

    # ------------------------------------------------------------------ keys
    def keys(self, ids: Sequence[int], n_chunks: int) -> list[str]:
        """The keys of the first ``n_chunks`` whole chunks of ``ids`` (hex), each hashing all tokens before it."""
        out, prev = [], self.seed
        for i in range(n_chunks):
            chunk = np.asarray(ids[i * self.C:(i + 1) * self.C], dtype="<i8")
            if len(chunk) < self.C:
                break
            prev = hashlib.sha256(prev + chunk.tobytes()).digest()
            out.append(prev.hex())
        return out

    def _cap(self, ids: Sequence[int]) -> int:
        """The most tokens of ``ids`` a lookup may cover: granule multiples, the last token left to compute."""
        return max(0, (len(ids) - 1) // self.granule * self.granule)

    def _has(self, key: str) -> bool:
        with self._lock:
            return key in self._ram or key in self._pending or key in self._disk

    # ------------------------------------------------------------------ the batch loop's calls
    def lookup(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` are kept (RAM or disk): a multiple of ``granule``, below len(ids)."""
        self.lookups += 1
        n = 0
        for key in self.keys(ids, self._cap(ids) // self.C):
            if not self._has(key):
                break
            n += self.C
        return n // self.granule * self.granule

    def restore(self, ids: Sequence[int], n: int, cache) -> int:
        """Load the K/V of the first ``n`` tokens of ``ids`` (rounded down to the granule, below len(ids)) into
        the empty ``cache``; returns how many tokens it loaded, a granule multiple: fewer when an entry is
        gone or a file fails validation (then dropped). The caller prefills from there."""
        if cache.offset:
            raise ValueError(f"restore into a cache holding {cache.offset} tokens (an empty one expected)")
        n = min(n, self._cap(ids)) // self.granule * self.granule
        keys = self.keys(ids, n // self.C)
        per = self.granule // self.C
        loaded = 0
        for g in range(0, len(keys), per):  # a granule per load: chunks placed as one prefill pass places them
            entries = [self._get(key) for key in keys[g:g + per]]
            if any(e is None for e in entries):
                break
            layers = range(self._shape[0])
            if self.quant is None:
                cache.load([torch.cat([e.k[i] for e in entries]) for i in layers],
                           [torch.cat([e.v[i] for e in entries]) for i in layers])
            else:  # the records themselves into their slots
                cache.load_records([torch.stack([e.k[i] for e in entries]) for i in layers],
                                   [torch.stack([e.v[i] for e in entries]) for i in layers])
            loaded += self.granule
        if loaded:
            self.hits += 1
            self.hit_tokens += loaded
        return loaded

    def save(self, ids: Sequence[int], cache) -> int:
        """Keep the K/V of the whole granules of ``ids`` that ``cache`` holds (its first tokens, after the
        request's prefill) and that are not kept yet; returns how many tokens were added."""
        n = min(len(ids), cache.offset) // self.granule * self.granule
        keys = self.keys(ids, n // self.C)
        new = [i for i, key in enumerate(keys) if not self._has(key)]
        runs: list[list[int]] = []
        added = 0
        for i in new:  # contiguous runs of new chunks: one rows() call per layer and run
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            entries = [_Entry(torch.empty(self._shape, dtype=self._dtype), torch.empty(self._shape, dtype=self._dtype))
                       for _ in run]
            for layer in range(self._shape[0]):
                if self.quant is not None:  # the closed chunks' records, as the cache holds them
                    for i, e in zip(run, entries):
                        k, v = cache.records(layer, i)
                        e.k[layer].copy_(k)
                        e.v[layer].copy_(v)
                    continue
                k, v = cache.rows(layer, run[0] * self.C, (run[-1] + 1) * self.C)
                for j, e in enumerate(entries):
                    e.k[layer].copy_(k[j * self.C:(j + 1) * self.C])
                    e.v[layer].copy_(v[j * self.C:(j + 1) * self.C])
            for i, e in zip(run, entries):
                if self.root is not None:
                    self._enqueue(keys[i], e)
                kept = self._keep_in_ram(keys[i], e)
                added += self.C if kept or self.root is not None else 0
        return added

    def flush(self) -> None:
        """Wait until every entry saved so far is on disk (or failed to be written: ``write_errors``)."""
        self._queue.join()

    def close(self) -> None:
        """Flush, then stop the writer thread (a later save starts it again)."""
        self.flush()
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def stats(self) -> dict:
        """Counters for /metrics and ``--stats``: lookups, restores that hit and the tokens they loaded, bytes
        and entries held (distinct chunks; per tier), files dropped on read (missing or invalid), failed writes."""
        with self._lock:
            return {"lookups": self.lookups, "hits": self.hits, "hit_tokens": self.hit_tokens,
                    "ram_bytes": self._ram_used, "disk_bytes": self._disk_used,
                    "entries": len(self._ram.keys() | self._pending.keys() | self._disk.keys()),
                    "ram_entries": len(self._ram), "disk_entries": len(self._disk),
                    "dropped": self.dropped, "write_errors": self.write_errors}

    # ------------------------------------------------------------------ RAM
    def _keep_in_ram(self, key: str, entry: _Entry) -> bool:
        """Insert (most recently used), then evict the least recently used past the budget; an evicted
        entry not on disk (nor queued) is queued for the disk. False if the entry alone exceeds the budget."""
        if entry.nbytes > self.ram_budget:
            return False
        with self._lock:
            self._ram[key] = entry
            self._ram_used += entry.nbytes
            evicted = []
            while self._ram_used > self.ram_budget:
                old, e = self._ram.popitem(last=False)
                self._ram_used -= e.nbytes
                if self.root is not None and old not in self._disk and old not in self._pending:
                    evicted.append((old, e))
        for old, e in evicted:
            self._enqueue(old, e)
        return True

    def _get(self, key: str) -> _Entry | None:
        """The entry from RAM, the writer's queue, or its file (validated; brought into RAM); None if none."""
        with self._lock:
            on_disk = key in self._disk
            if on_disk:
                self._disk.move_to_end(key)
            entry = self._ram.get(key) or self._pending.get(key)
            if key in self._ram:
                self._ram.move_to_end(key)
        if on_disk:
            try:
                os.utime(self._path(key))  # the file's time is its use: LRU order after a restart
            except OSError:
                pass
        if entry is not None or not on_disk:
            return entry
        entry = self._read(key)
        if entry is None:
            self.dropped += 1
            self._forget(key)
            return None
        self._keep_in_ram(key, entry)
        return entry

    # ------------------------------------------------------------------ disk
    def _path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def _open_root(self) -> None:
        """Claim ``root`` for this identity (emptying another's entries), remove temporary files of dead
        writers, and index the entry files by name and size, oldest use first; then keep within the budget."""
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = {"seed": self.seed.hex(), "identity": self.identity}
        ident = self.root / IDENTITY_FILE
        try:
            same = json.loads(ident.read_text())["seed"] == stamp["seed"]
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        found = []
        for d in os.scandir(self.root):
            if d.name.endswith(TMP_SUFFIX) and not _writer_alive(d.name):
                _unlink(d.path)
            elif d.name.endswith(SUFFIX):
                if not same:
                    _unlink(d.path)
                    continue
                try:
                    st = d.stat()
                except OSError:
                    continue
                found.append((st.st_mtime_ns, d.name[:-len(SUFFIX)], st.st_size))
        if not same:
            _atomic_write(self.root, ident.name, json.dumps(stamp, indent=1, sort_keys=True, default=str).encode())
        for _t, key, size in sorted(found):
            self._disk[key] = size
            self._disk_used += size
        self._trim_disk(keep=None)

    def _forget(self, key: str) -> None:
        """Drop a key's file (corrupt, or evicted by the disk budget)."""
        with self._lock:
            size = self._disk.pop(key, None)
            if size is not None:
                self._disk_used -= size
        _unlink(self._path(key))

    def _trim_disk(self, keep: str | None) -> None:
        if self.disk_budget is None:
            return
        while True:
            with self._lock:
                if self._disk_used <= self.disk_budget or not self._disk:
                    return
                old = next(iter(self._disk))
                if old == keep:  # the newest file alone is over the budget (not written then, see _write)
                    return
            self._forget(old)

    def _enqueue(self, key: str, entry: _Entry) -> None:
        with self._lock:
            if key in self._pending:
                return
            self._pending[key] = entry
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-writer", daemon=True)
                self._writer.start()
        self._queue.put(key)

    def _write_loop(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                self._write(key, self._pending[key])
            except Exception:  # a full disk, a removed root: the entry stays in RAM only; the loop goes on
                self.write_errors += 1
            finally:
                if key is not None:
                    with self._lock:
                        self._pending.pop(key, None)
                self._queue.task_done()

    def _write(self, key: str, entry: _Entry) -> None:
        """Write an entry's file (temporary name, then renamed), index it, keep the disk within its budget."""
        k = entry.k.contiguous().view(torch.uint8).numpy()
        v = entry.v.contiguous().view(torch.uint8).numpy()
        crc = zlib.crc32(v, zlib.crc32(k))
        header = json.dumps({"seed": self.seed.hex(), "key": key, "shape": list(self._shape),
                             "dtype": self._encoding, "crc32": f"{crc:08x}"}).encode()
        head = MAGIC + struct.pack("<I", len(header)) + header
        size = len(head) + k.nbytes + v.nbytes
        if self.disk_budget is not None and size > self.disk_budget:
            return
        _atomic_write(self.root, f"{key}{SUFFIX}", head, k, v)
        with self._lock:
            self._disk_used += size - self._disk.pop(key, 0)
            self._disk[key] = size
        self._trim_disk(keep=key)

    def _read(self, key: str) -> _Entry | None:
        """An entry's file read and validated (magic, header, seed, key, shape, encoding, size, CRC); None if
        missing or invalid."""
        try:
            with open(self._path(key), "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                got = f.readinto(data)
                if _FADV:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            return None
        n = int(np.prod(self._shape)) * self._dtype.itemsize
        try:
            if got != len(data) or data[:len(MAGIC)] != MAGIC:
                return None
            (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
            start = len(MAGIC) + 4 + hlen
            header = json.loads(bytes(data[len(MAGIC) + 4:start]))
            if (header.get("seed") != self.seed.hex() or header.get("key") != key
                    or header.get("shape") != list(self._shape) or header.get("dtype") != self._encoding
                    or len(data) != start + 2 * n):
                return None
            payload = memoryview(data)[start:]
            if f"{zlib.crc32(payload):08x}" != header.get("crc32"):
                return None
        except (ValueError, struct.error, AttributeError):  # a header that is not the JSON object written
            return None
        k = torch.frombuffer(data, dtype=torch.uint8, offset=start, count=n)
        v = torch.frombuffer(data, dtype=torch.uint8, offset=start + n, count=n)
        return _Entry(k.view(self._dtype).view(self._shape), v.view(self._dtype).view(self._shape))


def _atomic_write(root: Path, name: str, *parts) -> None:
    """``root/name`` with ``parts`` (bytes-like), written under a temporary name, then renamed: a reader never
    sees half a file. Written back and dropped from the page cache (a cache, not memory to hold)."""
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.{os.getpid()}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            _write_back(f.fileno())
            if _FADV:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, root / name)
    except BaseException:
        _unlink(tmp)
        raise


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that is writing temporary file ``.<name>.<pid>.<random>.tmp`` still runs."""
    try:
        pid = int(tmp_name.rsplit(".", 3)[-3])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
