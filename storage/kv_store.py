"""The disk tier of the KV cache: sealed KV chunks in a zarr array under ``--offload-dir``.

Once ``--kv-cpu-mem`` is full, sealed chunks (K and V of ``chunk_tokens`` tokens of one layer)
spill here and are read back into preallocated host buffers when attention needs them, the way
the weights' hot path reads them (storage/store.py): raw ``os.preadv`` straight into the caller's
views, O_DIRECT when they are 4 KiB aligned.

One file per layer. zarr describes the layout only: the array [n_layers, max_chunks, 2, nkv, C, d] is
created through zarr's API with one zarr chunk per layer (``zarr.open_array(store.path)[layer, chunk]``
reads a chunk back for debugging and tests), uncompressed, so a layer's file is its chunk slots one
after the other, each K's then V's little-endian bytes, and chunk c of a layer starts at byte
``c * chunk_bytes``. A layer's file is made at its first spill, at its full size (sparse: blocks are
allocated as chunks are written) and kept open. Why not a file per chunk: a decode step reads a
layer's spilled chunks, which are consecutive (the oldest spill first), and small (a q4 chunk of a
small model is ~55 KiB); one file each cost an open, a read and a close per chunk, ~600 per token at
6k tokens on the default model, and the disk's per-request latency. Here consecutive chunks of a
layer are one ``preadv`` (measured on this project's machine, 30 layers x 13 chunks: q4 52 -> 23-29 ms,
q8 64-66 -> 39-40 ms). bfloat16 is stored as uint16, its logical dtype in the array's attributes, as
the weight store does.

The page cache must not keep what was spilled: the point of spilling is that host RAM is full, and
reading back must really read the disk. A write therefore goes straight to the disk with O_DIRECT
when both source views and the chunk's place in the file are aligned, and otherwise is written
buffered, written back with ``sync_file_range`` (``fdatasync`` where that is missing) and dropped
with POSIX_FADV_DONTNEED: DONTNEED alone skips pages still under writeback, and on this machine it
left every page of a freshly written 1 MiB chunk cached. Writeback also surfaces a full disk at write
time (ext4 allocates blocks lazily). Buffered reads are dropped as well (whole pages, so the range is
widened to page edges: a neighbour's clean pages dropped with it cost nothing).

Every directory is ``<root>/kv-<pid>-<random>``, held by an flock on a file inside it for the store's
life. ``close()`` removes it (so does interpreter exit, or the store being garbage collected); a store
whose process died without closing it (killed) is removed by the next store made under the same root,
which finds its lock free. Reads and writes of different chunks are safe from several threads at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from storage.errors import NoSpaceError, StorageError
from storage.formats import FLOAT_FORMATS
from storage.store import _FADV, _O_DIRECT, DIRECT_ALIGN, _torch_buffer, aligned_buffer

LOCK_FILE = ".owner.lock"  # flock'ed by the owning process for the store's whole life
DIR_PREFIX = "kv-"
DIMENSIONS = ("layer", "chunk", "kv", "kv_head", "token", "head_dim")  # zarr dimension names (kv: 0 = K, 1 = V)
METADATA_BYTES = 64 << 10  # zarr.json and the lock file, beside the chunk files
_DTYPE_NAMES = {f.dtype: name for name, f in FLOAT_FORMATS.items()}
_DTYPE_NAMES[torch.uint8] = "uint8"  # quantized KV records (kernels_cpu/kv_quant.py): the last dimension is bytes
_FULL = (errno.ENOSPC, errno.EDQUOT)
_SFR_FLAGS = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER: write the range back and wait
_MAX_RUN = 256  # chunks in one preadv at most (two views each; IOV_MAX is 1024)


class MissingChunkError(LookupError):
    """A read asked for a chunk that was never written (or was discarded since): a caller's bookkeeping bug."""


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: fdatasync does the same, and a little more
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def _write_back(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Write ``fd``'s dirty pages in [offset, offset + nbytes) (nbytes 0: to the file's end) to the disk
    and wait, so that DONTNEED can drop them.

    sync_file_range, unlike fdatasync, neither commits the journal nor flushes the disk's write cache:
    durability is not wanted (the store dies with the process), only clean pages (measured: 1.4-1.8 GB/s
    against 1.3 GB/s for fdatasync, 1 MiB chunks, this machine's disk).
    """
    if _SYNC_FILE_RANGE is not None:
        if _SYNC_FILE_RANGE(fd, offset, nbytes, _SFR_FLAGS) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err))
    os.fdatasync(fd)


def _transfer(op, fd: int, views: list, what: str, offset: int = 0) -> None:
    """``op`` (os.preadv or os.pwritev) from file ``offset`` on until every byte of ``views`` has moved;
    a short count resumes where it stopped. EOFError when a read finds the file ends early."""
    views = [v for v in views if len(v)]
    while views:
        got = op(fd, views, offset)
        if got <= 0:
            raise EOFError(what)
        offset += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views.pop(0)
        if got:
            views[0] = views[0][got:]


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % DIRECT_ALIGN == 0 and t.numel() * t.element_size() % DIRECT_ALIGN == 0


def _drop(fd: int, offset: int, nbytes: int) -> None:
    """Drop [offset, offset + nbytes) of ``fd`` from the page cache, widened to whole pages (DONTNEED keeps
    a page the range covers only in part)."""
    if _FADV:
        lo = offset - offset % mmap.PAGESIZE
        os.posix_fadvise(fd, lo, -(-(offset + nbytes - lo) // mmap.PAGESIZE) * mmap.PAGESIZE,
                         os.POSIX_FADV_DONTNEED)


def _remove_store(path: str, lock_fd: int, fds: dict, owner_pid: int) -> None:
    """The finalizer: close the layer files, remove the directory, then let go of its lock (a forked child
    owns none of them)."""
    if os.getpid() != owner_pid:
        return
    for fd in fds.values():
        if fd >= 0:
            os.close(fd)
    fds.clear()
    shutil.rmtree(path, ignore_errors=True)
    os.close(lock_fd)


def _ownerless(root: Path):
    """Yield each KV store under ``root`` whose owner is gone (its lock is free), holding that lock until the
    caller asks for the next one.

    A lock, not a pid check: a pid may be reused, or live in another pid namespace sharing the directory.
    A directory without its lock file is being created right now (or its creator died in that instant): kept.
    """
    try:
        entries = [p for p in Path(root).iterdir() if p.name.startswith(DIR_PREFIX)]
    except OSError:
        return
    for p in entries:
        try:
            fd = os.open(p / LOCK_FILE, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner is alive
            os.close(fd)
            continue
        try:
            yield p
        finally:
            os.close(fd)


def stale_stores(root: Path) -> list[Path]:
    """The KV stores under ``root`` whose owner is gone, left in place (``offload-run prune`` names them first).
    Nothing takes a dead store's lock again but a cleaner, so they stay stale until removed."""
    return list(_ownerless(root))


def remove_stale(root: Path) -> list[Path]:
    """Remove the KV stores under ``root`` whose owner is gone, each under its lock; returns them."""
    removed = []
    for p in _ownerless(root):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


class KVChunkStore:
    """A zarr v3 array [n_layers, max_chunks, 2, nkv, C, d] in a fresh directory under ``root``
    (``--offload-dir``), one zarr chunk (file) per layer: K ([.., 0]) and V ([.., 1]) of a chunk of
    tokens at ``chunk * chunk_bytes`` in its layer's file.

    ``max_chunks`` is the number of chunk slots per layer the disk tier may hold (what the plan
    spills); the whole array's bytes are checked against the free space up front, so a disk that
    cannot hold the plan fails before any work starts. ``dtype``: torch float32, bfloat16 or float16, or uint8
    for quantized records (``head_dim`` is then a record row's bytes, kernels_cpu/kv_quant.py).
    """

    def __init__(self, root: Path, n_layers: int, max_chunks: int, nkv: int, chunk_tokens: int, head_dim: int,
                 dtype: torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"KV chunk store: dtype {dtype} is not one of {sorted(_DTYPE_NAMES.values())}")
        dims = (n_layers, max_chunks, nkv, chunk_tokens, head_dim)
        if any(int(n) <= 0 for n in dims):
            raise ValueError(f"KV chunk store: every dimension must be positive, got {dims}")
        self._shape = (int(n_layers), int(max_chunks), 2, int(nkv), int(chunk_tokens), int(head_dim))
        self._dtype = dtype
        self._half = int(nkv) * int(chunk_tokens) * int(head_dim) * dtype.itemsize  # K's (and V's) bytes
        self._root = Path(root).expanduser()
        self._written = bytearray(self._shape[0] * self._shape[1])  # 1: chunk file holds a written chunk
        self._direct = bool(_O_DIRECT)  # cleared when the filesystem refuses O_DIRECT (tmpfs)
        self._fds: dict = {}  # (layer, direct) -> an open fd of the layer's file (-1: O_DIRECT refused)
        self._open_lock = threading.Lock()
        self._bounce = threading.local()  # per reading thread: an aligned buffer for O_DIRECT reads of odd ranges
        self._path = self._create_dir()
        try:
            self._encode_key = self._create_array()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ creating
    def _create_dir(self) -> Path:
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            remove_stale(self._root)  # (dead runs' KV counts against the free space)
            self._check_free_space()
            path = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=self._root))
        except OSError as e:
            raise self._dir_error(e) from None
        lock_fd = -1
        try:  # locked under another name, then renamed: a cleaner never finds the lock file free while we live
            lock_fd = os.open(path / (LOCK_FILE + ".new"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(path / (LOCK_FILE + ".new"), path / LOCK_FILE)
        except OSError as e:
            if lock_fd >= 0:
                os.close(lock_fd)
            shutil.rmtree(path, ignore_errors=True)
            raise self._dir_error(e) from None
        self._finalizer = weakref.finalize(self, _remove_store, str(path), lock_fd, self._fds, os.getpid())
        return path

    def _create_array(self):
        import zarr

        name = _DTYPE_NAMES[self._dtype]
        try:
            arr = zarr.create_array(
                store=str(self._path), shape=self._shape, chunks=(1, *self._shape[1:]),
                dtype=FLOAT_FORMATS[name].storage_dtype if name in FLOAT_FORMATS else name, compressors=None, filters=None, fill_value=0,
                serializer={"name": "bytes", "configuration": {"endian": "little"}},
                chunk_key_encoding={"name": "default", "separator": "."},  # one flat directory of layer files
                dimension_names=DIMENSIONS, attributes={"logical_dtype": name})
        except OSError as e:
            raise self._dir_error(e) from None
        return arr.metadata.encode_chunk_key

    def _check_free_space(self) -> None:
        free = shutil.disk_usage(self._root).free
        if free < self.total_bytes + METADATA_BYTES:
            raise NoSpaceError(
                f"--offload-dir {self._root} has {_size(free)} free but the KV cache spilled there needs up to "
                f"{_size(self.total_bytes)}; free some space, point --offload-dir elsewhere, or raise --kv-cpu-mem "
                "so less of the KV cache spills", needed=self.total_bytes, free=free, directory=self._root)

    def _dir_error(self, e: OSError) -> StorageError:
        if e.errno in _FULL:
            return self._full_error()
        return StorageError(f"cannot create the KV cache's directory in --offload-dir {self._root}: "
                            f"{e.strerror or e}; choose a writable --offload-dir")

    def _full_error(self) -> NoSpaceError:
        try:
            free = shutil.disk_usage(self._root).free
        except OSError:
            free = 0
        return NoSpaceError(
            f"--offload-dir {self._root} is full: {self.total_bytes} bytes ({_size(self.total_bytes)}) needed for "
            f"the KV cache, {free} free; free space or point --offload-dir elsewhere (or raise --kv-cpu-mem so less "
            "of the KV cache spills)", needed=self.total_bytes, free=free, directory=self._root)

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        """The store's own directory (the zarr array)."""
        return self._path

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk file: K then V, ``nkv * C * d`` elements each."""
        return 2 * self._half

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole array: the most the disk tier takes."""
        return self._shape[0] * self._shape[1] * self.chunk_bytes

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    # ------------------------------------------------------------------ chunks
    def _index(self, layer: int, chunk: int) -> int:
        if not (0 <= layer < self._shape[0] and 0 <= chunk < self._shape[1]):
            raise IndexError(f"KV chunk (layer {layer}, chunk {chunk}) is outside the store's "
                             f"{self._shape[0]} layers x {self._shape[1]} chunks")
        return layer * self._shape[1] + chunk

    def _layer_path(self, layer: int) -> str:
        return str(self._path / self._encode_key((layer, 0, 0, 0, 0, 0)))

    def _fd(self, layer: int, direct: bool) -> int:
        """The layer's file open for reading and writing (``direct``: with O_DIRECT; -1 where the filesystem
        refuses it), made at its full size (sparse) by the first call for that layer."""
        fd = self._fds.get((layer, direct))
        if fd is not None:
            return fd
        with self._open_lock:
            if (layer, direct) not in self._fds:
                path = self._layer_path(layer)
                if (layer, False) not in self._fds:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        os.ftruncate(fd, self._shape[1] * self.chunk_bytes)
                    except OSError:
                        os.close(fd)
                        raise
                    self._fds[layer, False] = fd
                if direct:
                    try:
                        self._fds[layer, True] = os.open(path, os.O_RDWR | _O_DIRECT)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        self._direct = False
                        self._fds[layer, True] = -1
            return self._fds[layer, direct]

    def _bytes(self, what: str, t: torch.Tensor) -> memoryview:
        """A byte view of ``t`` (contiguous CPU tensor of exactly K's bytes, any dtype: raw slots may be uint8)."""
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"KV chunk store: {what} must be a contiguous CPU tensor "
                             f"(got device {t.device}, contiguous={t.is_contiguous()})")
        n = t.numel() * t.element_size()
        if n != self._half:
            raise ValueError(f"KV chunk store: {what} has {n} bytes, a chunk's {what[0].upper()} has {self._half} "
                             f"([{self._shape[3]}, {self._shape[4]}, {self._shape[5]}] {self._dtype})")
        return _torch_buffer(t)

    def write(self, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one chunk's K and V ([nkv, C, d] CPU views, aligned or not) to its place in the layer's file,
        then make sure none of it stays in the page cache (O_DIRECT if both views and the place are aligned,
        else write back + DONTNEED). The chunk is readable once this returns; a failed write leaves it
        unreadable, never stale."""
        i = self._index(layer, chunk)
        views = [self._bytes("k", k), self._bytes("v", v)]
        offset = chunk * self.chunk_bytes
        self._written[i] = 0
        try:
            if not (self._direct_ok(offset) and _aligned(k) and _aligned(v) and self._write_direct(layer, views, offset)):
                fd = self._fd(layer, False)
                _transfer(os.pwritev, fd, views, self._layer_path(layer), offset)
                _write_back(fd, offset, self.chunk_bytes)
                _drop(fd, offset, self.chunk_bytes)
        except OSError as e:
            if e.errno in _FULL:
                raise self._full_error() from None
            raise StorageError(f"cannot write the KV cache file {self._layer_path(layer)}: {e.strerror or e}; "
                               "check --offload-dir") from None
        self._written[i] = 1

    def _direct_ok(self, offset: int) -> bool:
        return self._direct and offset % DIRECT_ALIGN == 0 and self.chunk_bytes % DIRECT_ALIGN == 0

    def _write_direct(self, layer: int, views: list, offset: int) -> bool:
        """O_DIRECT write; False (nothing to undo: the buffered write rewrites the range) where refused."""
        fd = self._fd(layer, True)
        if fd < 0:
            return False
        try:
            _transfer(os.pwritev, fd, views, self._layer_path(layer), offset)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: alignment refused at write time
                raise
            return False
        return True

    def _prepare(self, layer: int, chunk: int, k_out: torch.Tensor, v_out: torch.Tensor):
        i = self._index(layer, chunk)
        views = [self._bytes("k_out", k_out), self._bytes("v_out", v_out)]
        if not self._written[i]:
            raise MissingChunkError(f"KV chunk (layer {layer}, chunk {chunk}) is not in {self._path}: "
                                    "it was never written, or was discarded")
        return layer, chunk, views, _aligned(k_out) and _aligned(v_out)

    def read_into(self, layer: int, chunk: int, k_out: torch.Tensor, v_out: torch.Tensor) -> int:
        """Fill ``k_out``, ``v_out`` (preallocated contiguous CPU views of K's bytes each) from one chunk:
        O_DIRECT when both are 4 KiB aligned in address and size, else buffered and dropped from the page
        cache. Returns the bytes read; MissingChunkError if the chunk is not in the store."""
        layer, chunk, views, aligned = self._prepare(layer, chunk, k_out, v_out)
        self._read(layer, chunk, views, aligned)
        return self.chunk_bytes

    def read_many(self, items, executor=None) -> int:
        """``read_into`` for every (layer, chunk, k_out, v_out) of ``items``: each run of consecutive chunks of
        a layer (in the order given) is one read of their range of the layer's file, the runs in parallel
        on ``executor`` (a concurrent.futures executor; None: one after the other). Every item is checked
        before any read starts. Returns the bytes read."""
        jobs = [self._prepare(*item) for item in items]
        runs: list = []
        for layer, chunk, views, aligned in jobs:
            last = runs[-1] if runs else None
            if last and last[0] == layer and last[1] + last[2] == chunk and last[2] < _MAX_RUN:
                last[2] += 1
                last[3] += views
                last[4] = last[4] and aligned
            else:
                runs.append([layer, chunk, 1, list(views), aligned])
        if executor is None or len(runs) == 1:
            for layer, chunk, _n, views, aligned in runs:
                self._read(layer, chunk, views, aligned)
        else:
            for f in [executor.submit(self._read, layer, chunk, views, aligned)
                      for layer, chunk, _n, views, aligned in runs]:
                f.result()
        return len(jobs) * self.chunk_bytes

    def _read(self, layer: int, chunk: int, views: list, aligned: bool) -> None:
        """Read the chunks from ``chunk`` on into ``views`` (K and V of each, in order): one preadv with
        O_DIRECT, straight into the views when they and the range are 4 KiB aligned, else into this thread's
        bounce buffer over the range widened to 4 KiB edges and copied out (measured, q4 chunks of the
        default model, a layer's 20 at a time: 1.2-1.6 GB/s against 0.8-0.9 buffered, whose page cache
        work and dropping cost more than the copy); buffered where the filesystem refuses O_DIRECT."""
        offset = chunk * self.chunk_bytes
        path = self._layer_path(layer)
        try:
            if self._direct and self._read_direct(layer, offset, views, aligned, path):
                return
            fd = self._fd(layer, False)
            _transfer(os.preadv, fd, list(views), path, offset)
            _drop(fd, offset, sum(len(v) for v in views))
        except FileNotFoundError:
            raise StorageError(f"the KV cache file {path} disappeared: was --offload-dir cleaned while "
                               "offload-run was running? Run again") from None
        except EOFError:
            raise StorageError(f"the KV cache file {path} is shorter than its chunks: was it changed by "
                               "another program? Run again") from None
        except OSError as e:
            raise StorageError(f"cannot read the KV cache file {path}: {e.strerror or e}") from None

    def _read_direct(self, layer: int, offset: int, views: list, aligned: bool, path: str) -> bool:
        """:meth:`_read` with O_DIRECT; False where refused (nothing read)."""
        fd = self._fd(layer, True)
        if fd < 0:
            return False
        try:
            if aligned and self._direct_ok(offset):
                _transfer(os.preadv, fd, list(views), path, offset)
                return True
            n = sum(len(v) for v in views)
            lo = offset - offset % DIRECT_ALIGN
            hi = -(-(offset + n) // DIRECT_ALIGN) * DIRECT_ALIGN
            buf = getattr(self._bounce, "buf", None)
            if buf is None or len(buf) < hi - lo:
                buf = self._bounce.buf = _torch_buffer(aligned_buffer(hi - lo))
            got = 0
            while got < offset + n - lo:  # the widened range may run past the file's end: a short last read
                step = os.preadv(fd, [buf[got:hi - lo]], lo + got)
                if step <= 0:
                    raise EOFError(path)
                got += step
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this alignment refused: buffered
                raise
            return False
        pos = offset - lo
        for v in views:
            v[:] = buf[pos:pos + len(v)]
            pos += len(v)
        return True

    def discard(self, layer: int, chunk: int) -> None:
        """Forget one chunk (trim, or moved back to RAM): its slot is free; its file stays, to be overwritten."""
        self._written[self._index(layer, chunk)] = 0

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the store's directory (idempotent)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "KVChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"KVChunkStore({str(self._path)!r}, shape={list(self._shape)}, {self._dtype}, "
                f"{self.total_bytes / 1e9:.2f} GB)")


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
