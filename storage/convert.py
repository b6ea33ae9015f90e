"""Checkpoint -> weight store conversion, once, atomically, cached by the source's identity.

``open_or_convert(source, cache_dir, weights=...)`` returns the store
``cache_dir/<source-name>-<key16>[-<weights>].zarr`` where key = sha256 of the source's identity
(resolved path, and each file's name, size and mtime_ns), the store format version and the
``--weights`` choice (storage.transcode): the stores of one checkpoint in several formats sit
side by side. Reusing a store costs a few ``stat`` calls and reading its manifest: no tensor data.

Conversion writes a zarr v3 group into ``<name>.zarr.tmp-<pid>`` next to the final directory:
array metadata through zarr (so ``zarr.open(store)[name][:]`` reads the values back), chunk bytes
straight to the chunk files in large sequential writes (zarr's array writes are ~2x slower), with
a crc32 per chunk into the manifest. Everything is fsync'ed, then the directory is renamed into
place. Any exception (KeyboardInterrupt included) removes the temporary directory; temporaries
of dead processes are removed by the next conversion. Before anything is written, the free space
of the store directory's filesystem is checked against the store's size (:func:`check_free_space`).

Opening a store for a run touches its ``last_used`` file (:func:`mark_used`), so that ``offload-run
list`` can say when each store last served a run; a read-only store directory just keeps the old time.
"""

from __future__ import annotations

import hashlib
import json
import errno
import os
import re
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from storage.errors import ModelSourceError, NoSpaceError, StorageError
from storage.experts import ExpertLayout, expert_count, pack_experts
from storage.formats import get_format
from storage.manifest import (CHUNK_LIMIT, EXPERTS_FORMAT_VERSION, FORMAT_VERSION, chunk_rows_for, crc_tag, n_chunks,
                              write_manifest)
from storage.sources import TensorSource, open_source
from storage.store import TensorInfo, WeightStore
from storage.transcode import check_choice, target_format, transcoded

IO_BLOCK = 16 << 20  # bytes per read/write when copying a raw byte range
STORE_METADATA_BYTES = 8 << 20  # beside the tensors: tokenizer.json, manifest.json, the group's zarr.json
TENSOR_METADATA_BYTES = 32 << 10  # per tensor: its zarr.json and chunk directories (filesystem blocks)
LAST_USED = "last_used"  # in a store: its mtime is when a run last opened the store
_LEFTOVER_RE = re.compile(r"\.zarr\.(?:tmp|old)-(\d+)$")  # a conversion's temporary, a replaced store


def store_key(identity: dict, weights: str = "auto") -> str:
    keyed = dict(identity, store_format=FORMAT_VERSION, weights=weights)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def _store_name(src, identity: dict, weights: str) -> str:
    tail = "" if weights == "auto" else f"-{weights}"
    return f"{_safe(src.display_name)}-{store_key(identity, weights)}{tail}.zarr"


def store_path(source: str | os.PathLike, cache_dir: str | os.PathLike, weights: str = "auto") -> Path:
    """Where the store of ``source`` in ``weights`` lives (whether or not it exists yet); stats the source only."""
    src = open_source(source)
    return Path(cache_dir).expanduser() / _store_name(src, src.identity(), check_choice(weights))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_leftovers(cache_dir: Path) -> list[Path]:
    """The ``*.zarr.tmp-<pid>`` (a conversion's temporary) and ``*.zarr.old-<pid>`` (a store being replaced by
    ``--rebuild-store``) directories under ``cache_dir`` whose process is gone: what a killed conversion left."""
    try:
        entries = list(Path(cache_dir).iterdir())
    except OSError:
        return []
    return [p for p in entries if (m := _LEFTOVER_RE.search(p.name)) and not _pid_alive(int(m.group(1)))]


def clean_stale_tmp(cache_dir: Path) -> list[Path]:
    """Remove the :func:`dead_leftovers` of ``cache_dir``; returns what was removed."""
    removed = dead_leftovers(cache_dir)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def mark_used(store: Path) -> None:
    """Touch the store's ``last_used`` file: one small write, never an error (a read-only store serves runs too)."""
    try:
        (store / LAST_USED).touch()
    except OSError:
        pass


def _opened(final: Path) -> WeightStore:
    """The store at ``final``, marked as used by this run."""
    store = WeightStore.open(final)
    mark_used(final)
    return store


def open_converted(source: str | os.PathLike, cache_dir: str | os.PathLike, *,
                   weights: str = "auto") -> WeightStore | None:
    """The existing store of ``source`` in ``weights``, or None when it is not converted yet. Reads the
    source's identity only (file names, sizes, times), no tensor header: a warm start skips parsing a GGUF."""
    check_choice(weights)
    src = open_source(source)
    final = Path(cache_dir).expanduser() / _store_name(src, src.identity(), weights)
    return _opened(final) if final.is_dir() else None


def open_or_convert(source: str | os.PathLike, cache_dir: str | os.PathLike, *, weights: str = "auto",
                    rebuild: bool = False, progress: bool = True) -> WeightStore:
    """The weight store of ``source`` (HF checkpoint dir or .gguf) in ``weights``, converting it first if needed."""
    check_choice(weights)
    src = open_source(source)
    cache_dir = Path(cache_dir).expanduser()
    identity = src.identity()
    final = cache_dir / _store_name(src, identity, weights)
    if final.is_dir() and not rebuild:
        return _opened(final)
    with _lock_for(final):  # threads of one process converting the same source: one converts, the rest reuse
        if final.is_dir() and not rebuild:
            return _opened(final)
        return _convert_locked(src, identity, cache_dir, final, rebuild, progress, weights)


_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(final: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(final, threading.Lock())


def _convert_locked(src, identity: dict, cache_dir: Path, final: Path, rebuild: bool, progress: bool,
                    weights: str) -> WeightStore:
    clean_stale_tmp(cache_dir)  # (dead converters' leftovers count against the free space)
    check_free_space(src, cache_dir, weights)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the store directory {cache_dir}: {e.strerror}; "
                        "choose a writable directory for the weight store") from None
    tmp = cache_dir / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(src, tmp, identity=identity, progress=progress, weights=weights)
        _install(tmp, final, replace=rebuild)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StorageError(f"the offload dir {cache_dir} is not writable ({e.strerror}): cannot write the weight "
                            "store there; choose a writable --offload-dir") from None
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError,)):
            raise StorageError(f"could not write the weight store {final}: {e.strerror or e}; "
                            "free disk space or choose another store directory") from None
        raise
    return _opened(final)


def store_bytes(tensors: list[TensorSource]) -> int:
    """Disk bytes a store of ``tensors`` takes: their raw bytes (chunks are uncompressed) and its metadata."""
    return sum(t.nbytes for t in tensors) + len(tensors) * TENSOR_METADATA_BYTES + STORE_METADATA_BYTES


def stored_tensors(src, weights: str = "auto") -> list[TensorSource]:
    """The source's tensors in the formats the store keeps them in under ``weights``, each MoE layer's
    experts packed into one tensor (storage.experts) after transcoding."""
    tensors = [transcoded(t, target_format(t, weights)) for t in src.tensors()]
    return pack_experts(tensors, expert_count(src.config()))


class SourceView:
    """A checkpoint as its store would be under ``weights``, from the source's headers only: what the
    planner reads of a :class:`WeightStore` (``tensor_names``, ``info``, ``expert_layout``, ``model_config``,
    ``manifest``, the tokenizer), with nothing converted or written to the store directory (``--plan``).
    Formats are the transcoded ones (storage.transcode); each MoE layer's experts are packed, so
    ``expert_layout`` gives the units the store would hold (storage.experts.ExpertLayout)."""

    def __init__(self, source: str | os.PathLike, weights: str = "auto"):
        src = open_source(source)
        self._src = src
        self._tensors = {t.name: t for t in stored_tensors(src, check_choice(weights))}
        self._manifest = {"source": {"path": str(Path(src.path).resolve()), "kind": src.kind},
                          "model_config": src.config(), "weights": weights}
        self._tmp = None  # the tokenizer, written on first use into a temporary directory (not the store's)

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def model_config(self) -> dict:
        return self._manifest["model_config"]

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, get_format(t.fmt), tuple(int(s) for s in t.shape), int(t.nbytes))

    def expert_layout(self, name: str) -> ExpertLayout | None:
        t = self._tensors[name]
        return None if t.experts is None else ExpertLayout.from_manifest(t.experts)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def _tokenizer(self) -> tuple[Path, dict]:
        if self._tmp is None:
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="offload_rt-plan-")
            self._meta = self._src.tokenizer(Path(self._tmp.name) / "tokenizer.json")
        return Path(self._tmp.name) / "tokenizer.json", self._meta

    @property
    def tokenizer_file(self) -> Path:
        return self._tokenizer()[0]

    @property
    def tokenizer_meta(self) -> dict:
        return self._tokenizer()[1]


def store_or_view(source: str | os.PathLike, cache_dir: str | os.PathLike, *,
                  weights: str = "auto") -> "WeightStore | SourceView":
    """The store of ``source`` in ``weights`` when it exists, else a :class:`SourceView` of it: what a plan
    reads, without converting or writing anything."""
    final = store_path(source, cache_dir, weights)
    return WeightStore.open(final) if final.is_dir() else SourceView(source, weights)


def check_free_space(src, cache_dir: Path, weights: str = "auto") -> None:
    """NoSpaceError (needed and free bytes) when ``cache_dir``'s filesystem cannot hold ``src``'s store.

    A rebuilt store is written beside the old one before replacing it, so the whole size is needed either way.
    """
    needed = store_bytes(stored_tensors(src, weights))
    where = cache_dir
    while not where.exists() and where != where.parent:  # the directory may not exist yet: its filesystem does
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:  # cannot tell (no permission to look): creating the directory will say what is wrong
        return
    if free < needed:
        raise NoSpaceError(
            f"not enough free space for the weight store of {src.display_name}: it needs {_human(needed)} "
            f"({needed} bytes) but {cache_dir} has {_human(free)} ({free} bytes) free; free some space or choose "
            "another --offload-dir", needed=needed, free=free, directory=cache_dir)


def _human(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _install(tmp: Path, final: Path, *, replace: bool) -> None:
    old = None
    if final.exists():
        if not replace:  # another process finished the same conversion first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if final.exists():  # lost a race against another converter
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """A rich progress bar (bytes written) on stderr; a no-op when disabled or when the console is no terminal
    (a pipe or a file gets no bytes from it, not even a newline).

    One line, one column short of the terminal's width so that no terminal wraps it: the label is cut
    (with an ellipsis) before the figures are.
    """

    def __init__(self, enabled: bool, total: int, label: str, console=None):
        self._p = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        from rich.table import Column

        console = console if console is not None else Console(stderr=True)
        if not console.is_terminal:
            return
        console.width = max(1, console.width - 1)
        fixed = Column(no_wrap=True)
        self._p = Progress(TextColumn("[bold]{task.description}",
                                      table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                           BarColumn(bar_width=20), DownloadColumn(table_column=fixed),
                           TransferSpeedColumn(table_column=fixed), TimeRemainingColumn(table_column=fixed),
                           console=console, transient=True, expand=True)
        self._task = self._p.add_task(label, total=total)
        self._p.start()

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def convert(src, dest: Path, *, identity: dict | None = None, progress: bool = True,
            chunk_limit: int | None = None, weights: str = "auto") -> dict:
    """Write the store of ``src`` (an opened source) into the new directory ``dest``; returns the manifest.

    Not atomic by itself: ``open_or_convert`` runs it into a temporary directory and renames.
    """
    import zarr

    t0 = time.perf_counter()
    chunk_limit = chunk_limit or CHUNK_LIMIT
    config = src.config()
    tensors = stored_tensors(src, weights)
    _warn_dequantized(src, weights)
    dest.mkdir(parents=True)
    group = zarr.open_group(str(dest), mode="w", zarr_format=3)  # (mode "w" empties dest: create it first)
    version = EXPERTS_FORMAT_VERSION if any(t.experts for t in tensors) else FORMAT_VERSION
    group.attrs["offload_rt_format"] = version
    tok_meta = src.tokenizer(dest / "tokenizer.json")
    total = sum(t.nbytes for t in tensors)
    bar = _Progress(progress and total > 0, total, f"converting {src.display_name}")
    entries: dict[str, dict] = {}
    written: list[Path] = []
    src_fds: dict[Path, int] = {}
    scratch = bytearray(IO_BLOCK)
    try:
        for t in tensors:
            entries[t.name] = _write_tensor(group, dest, t, chunk_limit, written, src_fds, scratch, bar)
    finally:
        for fd in src_fds.values():
            os.close(fd)
        bar.close()
    manifest = {
        "format_version": version,
        "source": {"path": str(Path(src.path).resolve()), "kind": src.kind, "identity": identity or src.identity()},
        "model_config": config,
        "weights": weights,
        "tokenizer": tok_meta,
        "tensors": entries,
        "converted": {"seconds": round(time.perf_counter() - t0, 3), "bytes": total},
    }
    _sync_tree(dest, written)
    write_manifest(dest, manifest)
    _fsync_dir(dest)
    return manifest


def _warn_dequantized(src, weights: str) -> None:
    """One line on stderr when GGUF tensors have a type the store cannot keep (stored as float32)."""
    types = getattr(src, "dequantized_types", lambda: {})()
    if types and weights == "auto":
        what = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
        print(f"warning: {src.display_name}: {what} tensors have no native kernel and are stored dequantized "
              "to float32 (larger and slower); a Q4_K_M/Q5_K_M/Q6_K/Q8_0/Q4_0 file runs natively", file=sys.stderr)


def _write_tensor(group, dest: Path, t: TensorSource, chunk_limit: int, written: list, src_fds: dict,
                  scratch: bytearray, bar: _Progress) -> dict:
    fmt = get_format(t.fmt)
    shape = fmt.byte_shape(t.shape)  # the zarr array: the logical shape, quantized rows as bytes
    row_bytes = fmt.row_bytes(t.shape)
    rows = t.chunk_rows or chunk_rows_for(t.shape, row_bytes, chunk_limit)
    chunks = (rows, *shape[1:]) if shape else ()
    arr = group.create_array(t.name, shape=shape, chunks=chunks, dtype=fmt.storage_dtype, compressors=None,
                             filters=None, fill_value=0, attributes={"format": t.fmt, "shape": list(t.shape)})
    nchunks = n_chunks(t.shape, rows)
    keys = [arr.metadata.encode_chunk_key((i, *([0] * (len(shape) - 1))) if shape else ())
            for i in range(nchunks)]
    chunk_bytes = row_bytes * rows if t.shape else t.nbytes
    data = None
    if t.produce is not None:
        a = t.produce()
        if a.nbytes != t.nbytes or not a.flags.c_contiguous:
            raise ModelSourceError(f"tensor {t.name} did not convert to its declared shape {t.shape}; "
                                   "report this with the model file")
        data = memoryview(a.reshape(-1).view(np.uint8))
    sums = []
    for i, key in enumerate(keys):
        start = i * chunk_bytes
        n = min(chunk_bytes, t.nbytes - start)
        path = dest / t.name / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if t.produce_chunk is not None:  # built one chunk at a time (packed experts: one expert unit)
                crc = _write_chunk(fd, t, i, n, bar)
            elif data is not None:
                view = data[start:start + n]
                crc = zlib.crc32(view)
                _write_all(fd, view)
                bar.advance(n)
            else:
                crc = _copy_range(t, start, n, fd, src_fds, scratch, bar)
            if n < chunk_bytes:  # the edge chunk: zarr expects it at full chunk size (a hole of zeros)
                os.ftruncate(fd, chunk_bytes)
        finally:
            os.close(fd)
        written.append(path)
        sums.append(crc_tag(crc))
    entry = {"format": t.fmt, "storage_dtype": fmt.storage_dtype, "shape": list(t.shape), "chunk_rows": rows,
             "nbytes": t.nbytes, "checksums": sums, "chunk_keys": keys}
    if t.experts is not None:
        entry["experts"] = t.experts
    return entry


def _write_chunk(fd: int, t: TensorSource, i: int, n: int, bar: _Progress) -> int:
    """Write chunk ``i`` of ``t`` (``n`` bytes) from its chunk producer; returns its crc32."""
    a = t.produce_chunk(i)
    if a.nbytes != n or not a.flags.c_contiguous:
        raise ModelSourceError(f"tensor {t.name} did not convert to its declared shape {t.shape} (chunk {i}); "
                               "report this with the model file")
    view = memoryview(a.reshape(-1).view(np.uint8))
    _write_all(fd, view)
    bar.advance(n)
    return zlib.crc32(view)


def _write_all(fd: int, view: memoryview) -> None:
    off, n = 0, len(view)
    while off < n:
        off += os.write(fd, view[off:off + (1 << 30)])


def _copy_range(t: TensorSource, start: int, n: int, out_fd: int, src_fds: dict, scratch: bytearray,
                bar: _Progress) -> int:
    """Copy ``n`` bytes of ``t``'s raw range from ``start`` into ``out_fd``; returns their crc32."""
    fd = src_fds.get(t.file)
    if fd is None:
        try:
            fd = src_fds[t.file] = os.open(t.file, os.O_RDONLY)
        except OSError as e:
            raise ModelSourceError(f"cannot read {t.file}: {e.strerror}; check the checkpoint files") from None
    mv = memoryview(scratch)
    crc = 0
    pos = t.offset + start
    end = pos + n
    while pos < end:
        want = min(len(mv), end - pos)
        got = os.preadv(fd, [mv[:want]], pos)
        if got <= 0:
            raise ModelSourceError(f"{t.file} is truncated (tensor {t.name} ends past the end of the file); "
                                   "re-download or re-export it")
        crc = zlib.crc32(mv[:got], crc)
        _write_all(out_fd, mv[:got])
        pos += got
        bar.advance(got)
    if hasattr(os, "posix_fadvise"):  # the source is read once: do not keep it in the page cache
        os.posix_fadvise(fd, t.offset + start, n, os.POSIX_FADV_DONTNEED)
    return crc


def _sync_tree(dest: Path, files: list[Path]) -> None:
    """fsync every written chunk file (and drop it from the page cache), then every directory."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    for root, dirs, names in os.walk(dest):
        for n in names:
            if n.endswith(".json"):
                fd = os.open(os.path.join(root, n), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(root))


def main(argv=None) -> int:  # python -m storage.convert SOURCE CACHE_DIR
    import argparse

    ap = argparse.ArgumentParser(description="Convert a checkpoint into an offload_rt weight store.")
    ap.add_argument("source")
    ap.add_argument("cache_dir")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--weights", default="auto")
    a = ap.parse_args(argv)
    try:
        store = open_or_convert(a.source, a.cache_dir, weights=a.weights, rebuild=a.rebuild)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(store.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
