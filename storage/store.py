"""Reading the weight store: raw chunk bytes into preallocated buffers.

zarr describes the layout (one array per tensor, uncompressed chunks, chunk keys); this module
reads each chunk's file with ``os.preadv`` straight into the caller's buffer (pinned or not), checks
its crc32 when asked, and drops the file's pages from the page cache afterwards so streamed weights
do not pile up there (the runtime's host tier is the cache; the plan decides what stays).
Every method is safe to call from several reader threads at once: no shared mutable state.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.errors import CorruptStoreError, ModelSourceError
from storage.experts import ExpertLayout
from storage.formats import Format, QTensor, get_format
from storage.manifest import REBUILD_HINT, crc_tag, load_manifest, n_chunks, tensor_format
READ_BLOCK = 64 << 20  # bytes per preadv call (large sequential reads; the kernel reads ahead within them)
PIECE_BYTES = 8 << 20  # read_many splits chunks into pieces of this size, read in parallel
DIRECT_ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to the block size


def aligned_buffer(nbytes: int, alloc=None) -> torch.Tensor:
    """``nbytes`` of uint8 starting on a DIRECT_ALIGN boundary (what O_DIRECT reads need);
    ``alloc(n)`` makes the underlying tensor (default: pageable ``torch.empty``)."""
    raw = alloc(nbytes + DIRECT_ALIGN) if alloc else torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % DIRECT_ALIGN
    return raw[skip:skip + nbytes]
_FADV = hasattr(os, "posix_fadvise")
_O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    fmt: Format
    shape: tuple  # logical shape
    nbytes: int  # bytes stored (fmt.nbytes(shape))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the stored elements: the float type, or uint8 for a quantized format's blocks."""
        return self.fmt.dtype or torch.uint8

    @property
    def quantized(self) -> bool:
        return self.fmt.quantized

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def held_bytes(self, dtype: torch.dtype) -> int:
        """Bytes once loaded for compute at ``dtype``: a float tensor is cast to it, a quantized or raw one
        (packed experts) stays as stored."""
        return self.nbytes if self.quantized or self.fmt.raw else self.numel * dtype.itemsize

    def view(self, buf: torch.Tensor, dtype: torch.dtype | None = None):
        """The tensor over ``buf`` (uint8, exactly its bytes): a float tensor of ``dtype`` (default: as stored)
        and the logical shape, or a :class:`QTensor` over the blocks."""
        if self.quantized:
            return QTensor(buf.view(self.fmt.byte_shape(self.shape)), self.fmt, self.shape)
        if self.fmt.raw:  # opaque bytes (packed experts): never cast
            return buf.view(self.shape)
        return buf.view(dtype or self.dtype).view(self.shape)


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    chunk_rows: int
    chunk_bytes: int  # bytes of a full chunk (the last one may be shorter)
    files: tuple  # absolute chunk file paths
    checksums: tuple


def _torch_buffer(out: torch.Tensor) -> memoryview:
    """A writable byte view of ``out``'s storage (contiguous CPU tensor)."""
    if out.device.type != "cpu":
        raise ValueError(f"read_into needs a CPU tensor, got one on {out.device}")
    if not out.is_contiguous():
        raise ValueError("read_into needs a contiguous tensor")
    flat = out.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy()).cast("B")


class WeightStore:
    """A converted checkpoint: ``<name>.zarr/`` with ``manifest.json`` and ``tokenizer.json``."""

    def __init__(self, path: Path, manifest: dict):
        self._path = Path(path)
        self._manifest = manifest
        self._entries: dict[str, _Entry] = {}
        self._layouts: dict[str, ExpertLayout] = {}
        for name, t in manifest["tensors"].items():
            fmt = get_format(tensor_format(t))
            shape = tuple(int(s) for s in t["shape"])
            rows = int(t["chunk_rows"])
            nchunks = n_chunks(shape, rows)
            keys = t.get("chunk_keys") or [
                "/".join(["c", str(i)] + ["0"] * (len(shape) - 1)) if shape else "c" for i in range(nchunks)]
            chunk_bytes = fmt.row_bytes(shape) * rows if shape else fmt.nbytes(shape)
            base = self._path / name
            self._entries[name] = _Entry(
                TensorInfo(name, fmt, shape, int(t["nbytes"])), rows, chunk_bytes,
                tuple(str(base / k) for k in keys), tuple(t["checksums"]))
            if "experts" in t:
                self._layouts[name] = ExpertLayout.from_manifest(t["experts"])

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "WeightStore":
        path = Path(path)
        if not path.is_dir():
            raise ModelSourceError(f"weight store {path} does not exist; run the model once to convert it, "
                                   "or rerun with --rebuild-store")
        return cls(path, load_manifest(path))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def model_config(self) -> dict:
        return self._manifest["model_config"]

    @property
    def tokenizer_file(self) -> Path:
        return self._path / self._manifest["tokenizer"]["file"]

    @property
    def tokenizer_meta(self) -> dict:
        return self._manifest["tokenizer"]

    @property
    def tensor_names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the weight store {self._path}") from None

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def expert_layout(self, name: str) -> ExpertLayout | None:
        """The unit layout of packed experts ``name`` (storage.experts); None for any other tensor."""
        self._entry(name)
        return self._layouts.get(name)

    @property
    def total_bytes(self) -> int:
        return sum(e.info.nbytes for e in self._entries.values())

    # ------------------------------------------------------------------ reading
    def _corrupt(self, name: str, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"weight store {self._path}: tensor {name} {what}; {REBUILD_HINT}", tensor=name)

    def read_into(self, name: str, out: torch.Tensor, *, verify: bool = False, drop_cache: bool = True) -> None:
        """Fill ``out`` (contiguous CPU tensor of exactly ``info(name).nbytes`` bytes, any dtype) with the
        tensor's bytes, read straight from its chunk files."""
        e = self._entry(name)
        buf = _torch_buffer(out)
        if len(buf) != e.info.nbytes:
            raise ValueError(f"read_into({name!r}): buffer has {len(buf)} bytes, the tensor {e.info.nbytes}")
        pos = 0
        total = e.info.nbytes
        for i, path in enumerate(e.files):
            n = min(e.chunk_bytes, total - pos)
            self._read_chunk(name, path, buf[pos:pos + n], e.chunk_bytes, drop_cache)
            if verify and crc_tag(zlib.crc32(buf[pos:pos + n])) != e.checksums[i]:
                raise self._corrupt(name, f"failed its checksum (chunk {i})")
            pos += n

    def _read_chunk(self, name: str, path: str, view: memoryview, file_size: int, drop_cache: bool) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._corrupt(name, f"is missing its chunk file {os.path.relpath(path, self._path)}") from None
        try:
            n = len(view)
            if os.fstat(fd).st_size != file_size:
                raise self._corrupt(name, f"has a chunk file of the wrong size ({os.path.relpath(path, self._path)})")
            off = 0
            while off < n:
                got = os.preadv(fd, [view[off:off + min(READ_BLOCK, n - off)]], off)
                if got <= 0:
                    raise self._corrupt(name, "has a truncated chunk file")
                if drop_cache and _FADV:  # block by block: the page cache of a read never grows past one block
                    os.posix_fadvise(fd, off, got, os.POSIX_FADV_DONTNEED)
                off += got
            if drop_cache and _FADV:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # and whatever was read ahead
        finally:
            os.close(fd)

    def read_many(self, items, *, executor=None, verify: bool = False, drop_cache: bool = True,
                  direct: bool = True) -> int:
        """Fill several preallocated buffers at once: ``items`` = [(name, out tensor)].

        The streaming hot path. Every chunk is split into pieces of PIECE_BYTES submitted to
        ``executor`` together, so the disk sees several large requests in flight. With ``direct``
        and a 4 KiB-aligned buffer, pieces are read with O_DIRECT (no page cache at all; the
        sub-block tail, if any, is read buffered and dropped). Returns the bytes read.
        """
        jobs, checks, total = [], [], 0
        for name, out in items:
            e = self._entry(name)
            buf = _torch_buffer(out)
            if len(buf) != e.info.nbytes:
                raise ValueError(f"read_many({name!r}): buffer has {len(buf)} bytes, the tensor {e.info.nbytes}")
            aligned = direct and _O_DIRECT and out.data_ptr() % DIRECT_ALIGN == 0
            pos = 0
            for i in range(len(e.files)):
                n = min(e.chunk_bytes, e.info.nbytes - pos)
                self._chunk_jobs(name, e, i, buf[pos:pos + n], aligned, drop_cache, verify, jobs, checks)
                pos += n
            total += e.info.nbytes
        self._run(jobs, checks, executor)
        return total

    def read_experts(self, name: str, ids, outs, *, executor=None, direct: bool = True, drop_cache: bool = True,
                     verify: bool = False) -> int:
        """Read experts ``ids[i]`` of packed experts ``name`` into ``outs[i]`` (contiguous CPU uint8 tensors of
        ``unit_bytes`` each; view them with ``expert_layout(name).views``). One chunk file per expert, split
        into pieces read in parallel on ``executor`` like :meth:`read_many`; O_DIRECT where ``direct`` and
        a buffer is 4 KiB-aligned; ``verify`` checks each expert's crc32. Returns the bytes read."""
        e = self._entry(name)
        layout = self._layouts.get(name)
        if layout is None:
            raise ValueError(f"read_experts({name!r}): not a packed experts tensor")
        ids, outs = list(ids), list(outs)
        if len(ids) != len(outs):
            raise ValueError(f"read_experts({name!r}): {len(ids)} ids but {len(outs)} buffers")
        jobs, checks = [], []
        for x, out in zip(ids, outs):
            x = int(x)
            if not 0 <= x < layout.count:
                raise IndexError(f"expert {x} out of range for {name} with {layout.count} experts")
            buf = _torch_buffer(out)
            if len(buf) != layout.unit_bytes:
                raise ValueError(f"read_experts({name!r}): buffer has {len(buf)} bytes, an expert {layout.unit_bytes}")
            aligned = direct and _O_DIRECT and out.data_ptr() % DIRECT_ALIGN == 0
            self._chunk_jobs(name, e, x, buf, aligned, drop_cache, verify, jobs, checks)
        self._run(jobs, checks, executor)
        return len(ids) * layout.unit_bytes

    @staticmethod
    def _chunk_jobs(name: str, e: _Entry, i: int, view: memoryview, aligned: bool, drop_cache: bool, verify: bool,
                    jobs: list, checks: list) -> None:
        """Queue the reads of chunk ``i`` into ``view`` (its bytes) in PIECE_BYTES pieces, and its checksum."""
        n = len(view)
        for off in range(0, n, PIECE_BYTES):
            m = min(PIECE_BYTES, n - off)
            jobs.append((name, e.files[i], view[off:off + m], off, e.chunk_bytes, aligned, drop_cache))
        if verify:
            checks.append((name, i, view, e.checksums[i]))

    def _run(self, jobs: list, checks: list, executor) -> None:
        if executor is None:
            for j in jobs:
                self._read_piece(*j)
        else:
            for f in [executor.submit(self._read_piece, *j) for j in jobs]:
                f.result()
        for name, i, view, want in checks:
            if crc_tag(zlib.crc32(view)) != want:
                raise self._corrupt(name, f"failed its checksum (chunk {i})")

    def _fill(self, name: str, fd: int, view: memoryview, progress: list, end: int, offset: int) -> None:
        """preadv into view[progress[0]:end] from file offset+progress[0] until done (progress updated)."""
        while progress[0] < end:
            got = os.preadv(fd, [view[progress[0]:end]], offset + progress[0])
            if got <= 0:
                raise self._corrupt(name, "has a truncated chunk file")
            progress[0] += got

    def _read_piece(self, name: str, path: str, view: memoryview, offset: int, file_size: int, direct: bool,
                    drop_cache: bool) -> None:
        """Bytes [offset, offset+len(view)) of one chunk file into view."""
        n = len(view)
        head = n - n % DIRECT_ALIGN if direct else 0
        try:
            fd = os.open(path, os.O_RDONLY | (_O_DIRECT if head else 0))
        except FileNotFoundError:
            raise self._corrupt(name, f"is missing its chunk file {os.path.relpath(path, self._path)}") from None
        except OSError:  # O_DIRECT refused by this filesystem: buffered
            head, fd = 0, os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != file_size:
                raise self._corrupt(name, f"has a chunk file of the wrong size ({os.path.relpath(path, self._path)})")
            progress = [0]
            try:
                self._fill(name, fd, view, progress, head, offset)
            except OSError as e:
                if e.errno != 22:  # EINVAL: alignment refused at read time; finish buffered
                    raise
            if progress[0] < n:
                bfd = os.open(path, os.O_RDONLY) if head else fd
                try:
                    self._fill(name, bfd, view, progress, n, offset)
                    if drop_cache and _FADV:
                        os.posix_fadvise(bfd, offset, n, os.POSIX_FADV_DONTNEED)
                finally:
                    if bfd != fd:
                        os.close(bfd)
        finally:
            os.close(fd)

    def load(self, name: str, *, verify: bool = True):
        """A new tensor of the logical shape, as stored (a QTensor for a quantized format; page cache kept:
        loads are one-off)."""
        info = self.info(name)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(name, out, verify=verify, drop_cache=False)
        return info.view(out)

    def read_rows(self, name: str, rows):
        """Rows ``rows`` (indices along axis 0) of a tensor, read individually (e.g. embedding lookups);
        a QTensor of those rows for a quantized format."""
        e = self._entry(name)
        rows = [int(r) for r in rows]
        shape = e.info.shape
        if not shape:
            raise ValueError(f"read_rows({name!r}): a 0-d tensor has no rows")
        row_bytes = e.chunk_bytes // e.chunk_rows
        out = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
        buf = _torch_buffer(out)
        fds: dict[int, int] = {}
        try:
            for j, r in enumerate(rows):
                if not 0 <= r < shape[0]:
                    raise IndexError(f"row {r} out of range for {name} with {shape[0]} rows")
                c = r // e.chunk_rows
                if c not in fds:
                    try:
                        fds[c] = os.open(e.files[c], os.O_RDONLY)
                    except FileNotFoundError:
                        raise self._corrupt(name, "is missing a chunk file") from None
                view = buf[j * row_bytes:(j + 1) * row_bytes]
                if os.preadv(fds[c], [view], (r % e.chunk_rows) * row_bytes) != row_bytes:
                    raise self._corrupt(name, "has a truncated chunk file")
        finally:
            for fd in fds.values():
                os.close(fd)
        return TensorInfo(name, e.info.fmt, (len(rows), *shape[1:]), len(rows) * row_bytes).view(out)

    def verify(self, name: str) -> None:
        """Check one tensor's checksums (CorruptStoreError naming it on failure)."""
        info = self.info(name)
        self.read_into(name, torch.empty(info.nbytes, dtype=torch.uint8), verify=True, drop_cache=True)

    def verify_all(self) -> None:
        """Check every tensor's checksums; raises CorruptStoreError naming the first bad tensor."""
        e_max = max((e.info.nbytes for e in self._entries.values()), default=0)
        scratch = torch.empty(e_max, dtype=torch.uint8)
        for name, e in self._entries.items():
            self.read_into(name, scratch[:e.info.nbytes], verify=True, drop_cache=True)

    def __repr__(self) -> str:
        return f"WeightStore({str(self._path)!r}, {len(self._entries)} tensors, {self.total_bytes / 1e9:.2f} GB)"
