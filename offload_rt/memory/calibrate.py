"""Measure the bandwidths the planner needs, once per machine and disk.

* disk read: a ~512 MiB file written to the offload dir, fsynced, dropped from
  the page cache (``posix_fadvise(DONTNEED)``), read back cold with 16 MiB reads
  into one preallocated page-aligned (mmap) buffer, with ``O_DIRECT`` where the
  filesystem allows it (buffered reads otherwise), then deleted;
* memory read: torch ``sum`` over 256 MiB of float32;
* mat-vec: ``F.linear`` of a [1, 2048] activation with a few 5632×2048 weights,
  float32 and bfloat16 (effective weight bytes/s);
* host→device: pinned 256 MiB copies, only with ``cuda=True``.

:func:`load_or_measure` caches the result as JSON in ``<cache>/bandwidth.json``
(``<cache>`` = offload_rt.config.default_cache_dir(), ``OFFLOAD_RT_CACHE``
respected), keyed by hostname, the ``st_dev`` of the offload dir and the CPU
count. ``OFFLOAD_RT_BANDWIDTHS="disk=1.3e9,mem=2.4e10,matvec=1.5e10[,h2d=2.5e10]"``
overrides everything (tests use it; nothing is measured).
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from offload_rt.config import default_cache_dir
from offload_rt.errors import UsageError
from offload_rt.memory.plan import Bandwidths

ENV_OVERRIDE = "OFFLOAD_RT_BANDWIDTHS"
CACHE_FILE = "bandwidth.json"
CACHE_VERSION = 1

MiB = 1 << 20
DISK_TEST_BYTES = 512 * MiB  # kept equal to [calibrate] in configs/defaults.toml
READ_CHUNK_BYTES = 16 * MiB
PARALLEL_PIECE_BYTES = 8 * MiB  # as storage.store.PIECE_BYTES: what the streaming reader issues
PARALLEL_READERS = 8  # as the scheduler's reader pool
PROBE_FILES = 8  # the disk probe is several files, like a weight store
MEM_TEST_BYTES = 256 * MiB
H2D_TEST_BYTES = 256 * MiB
MATVEC_SHAPE = (5632, 2048)  # out × in: a Llama-1B-ish MLP projection
MATVEC_WEIGHTS = 4  # distinct weights per pass, so they do not sit in cache
DEFAULT_MATVEC_DTYPE = "bfloat16"  # Bandwidths.matvec; the others in matvec_by_dtype

_ENV_KEYS = {
    "disk": "disk_read",
    "disk_read": "disk_read",
    "mem": "mem_read",
    "mem_read": "mem_read",
    "matvec": "matvec",
    "h2d": "h2d",
}


# ---------------------------------------------------------------------------- override / cache


def bandwidths_from_env(value: str | None = None) -> Bandwidths | None:
    """Parse ``OFFLOAD_RT_BANDWIDTHS``; None when unset or empty.

    Keys: disk, mem, matvec, h2d, or ``matvec_<dtype>`` (e.g. matvec_float32).
    disk and matvec are required; mem defaults to matvec; h2d to None (no CUDA).
    """
    text = os.environ.get(ENV_OVERRIDE) if value is None else value
    if not text or not text.strip():
        return None
    vals: dict[str, float] = {}
    by_dtype: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, num = part.partition("=")
        key = key.strip().lower()
        try:
            x = float(num)
        except ValueError:
            x = -1.0
        if not sep or x <= 0:
            raise UsageError(f"{ENV_OVERRIDE}: bad entry {part.strip()!r}; use key=bytes_per_second, e.g. disk=1.3e9")
        if key.startswith("matvec_"):
            by_dtype[key[len("matvec_"):]] = x
        elif key in _ENV_KEYS:
            vals[_ENV_KEYS[key]] = x
        else:
            raise UsageError(
                f"{ENV_OVERRIDE}: unknown key {key!r}; use disk, mem, matvec, matvec_<dtype> or h2d"
            )
    if "matvec" not in vals and by_dtype:
        vals["matvec"] = by_dtype.get(DEFAULT_MATVEC_DTYPE, next(iter(by_dtype.values())))
    missing = [k for k in ("disk_read", "matvec") if k not in vals]
    if missing:
        raise UsageError(f"{ENV_OVERRIDE}: missing {' and '.join(missing)}; e.g. disk=1.3e9,mem=2.4e10,matvec=1.5e10")
    return Bandwidths(
        disk_read=vals["disk_read"],
        mem_read=vals.get("mem_read", vals["matvec"]),
        matvec=vals["matvec"],
        h2d=vals.get("h2d"),
        matvec_by_dtype=by_dtype,
    )


def cache_key(offload_dir: Path) -> str:
    """hostname / st_dev of the offload dir (its nearest existing ancestor) / CPU count."""
    p = Path(offload_dir).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return f"{socket.gethostname()}:{os.stat(p).st_dev}:{os.cpu_count()}"


def _to_json(bw: Bandwidths) -> dict:
    return {
        "disk_read": bw.disk_read,
        "mem_read": bw.mem_read,
        "matvec": bw.matvec,
        "h2d": bw.h2d,
        "matvec_by_dtype": dict(bw.matvec_by_dtype),
    }


def _from_json(d: dict) -> Bandwidths:
    return Bandwidths(
        disk_read=float(d["disk_read"]),
        mem_read=float(d["mem_read"]),
        matvec=float(d["matvec"]),
        h2d=None if d.get("h2d") is None else float(d["h2d"]),
        matvec_by_dtype={str(k): float(v) for k, v in (d.get("matvec_by_dtype") or {}).items()},
    )


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, entries: dict) -> None:
    """Atomic replace: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bandwidth.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_measure(
    offload_dir: Path,
    *,
    progress: bool = True,
    cuda: bool = False,
    cache_dir: Path | None = None,
    remeasure: bool = False,
    measure: Callable[..., Bandwidths] | None = None,
) -> Bandwidths:
    """Bandwidths for this machine and the disk under ``offload_dir``: env override, cache, or measured.

    A cached entry without ``h2d`` is measured again when ``cuda`` is asked for.
    """
    env = bandwidths_from_env()
    if env is not None:
        return env
    path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    key = cache_key(offload_dir)
    entries = _read_cache(path)
    if not remeasure and key in entries:
        try:
            bw = _from_json(entries[key])
        except (KeyError, TypeError, ValueError):
            bw = None
        if bw is not None and (bw.h2d or not cuda):
            return bw
    bw = (measure or measure_bandwidths)(Path(offload_dir), progress=progress, cuda=cuda)
    entries = _read_cache(path)  # again: another process may have added its own entry
    entries[key] = {**_to_json(bw), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        _write_cache(path, entries)
    except OSError:
        pass  # a read-only cache dir costs a re-measure next time, nothing else
    return bw


# ---------------------------------------------------------------------------- measuring


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr; ``step(description)`` advances it."""
    if not enabled:
        yield lambda _desc: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("measuring bandwidths: {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=total)
        first = [True]

        def step(desc: str) -> None:
            if first[0]:
                first[0] = False
            else:
                bar.advance(task)
            bar.update(task, description=desc)

        yield step
        bar.update(task, completed=total)


def measure_disk_read(directory: Path, nbytes: int = DISK_TEST_BYTES, chunk: int = READ_CHUNK_BYTES) -> float:
    """Cold read bandwidth (bytes/s) of the filesystem holding ``directory``.

    The probe is PROBE_FILES files (a weight store is many chunk files) read the way the
    scheduler reads: PARALLEL_PIECE_BYTES requests on PARALLEL_READERS threads, O_DIRECT where
    allowed; also one sequential stream. The better of the two is the disk's peak.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    per_file = max(chunk, nbytes // PROBE_FILES // chunk * chunk)
    block = os.urandom(chunk)  # incompressible, so a compressing filesystem cannot cheat
    names = []
    try:
        for _ in range(PROBE_FILES):
            fd, name = tempfile.mkstemp(prefix=".offload_rt-disk-probe.", dir=directory)
            names.append(name)
            try:
                written = 0
                while written < per_file:
                    written += os.write(fd, block[: min(chunk, per_file - written)])
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        seq = _read_files(names, per_file, chunk, threads=1)
        par = _read_files(names, per_file, PARALLEL_PIECE_BYTES, threads=PARALLEL_READERS)
    finally:
        for name in names:
            Path(name).unlink(missing_ok=True)
    return max(seq, par)


def _read_files(names: list[str], size: int, piece: int, *, threads: int) -> float:
    """Bytes/s reading every file whole in ``piece``-sized requests on ``threads`` threads."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    jobs = [(n, off) for n in names for off in range(0, size, piece)]

    def work(job) -> int:
        name, off = job
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, piece)  # page aligned: usable for O_DIRECT
        fd, direct = _open_direct(name)
        try:
            try:
                n = os.preadv(fd, [buf], off)
            except OSError:
                if not direct:
                    raise
                os.close(fd)  # O_DIRECT refused at read time (some filesystems): buffered
                fd, direct = os.open(name, os.O_RDONLY), False
                n = os.preadv(fd, [buf], off)
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, off, piece, os.POSIX_FADV_DONTNEED)
            return max(0, n)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as ex:
        total = sum(ex.map(work, jobs))
    return total / max(time.perf_counter() - t0, 1e-9)


def _open_direct(name: str) -> tuple[int, bool]:
    """(fd, is_direct): O_DIRECT where the filesystem allows it."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(name, os.O_RDONLY | direct), True
        except OSError:  # tmpfs and friends: buffered, the cache was dropped above
            pass
    return os.open(name, os.O_RDONLY), False


def measure_mem_read(nbytes: int = MEM_TEST_BYTES, reps: int = 5) -> float:
    """RAM read bandwidth (bytes/s): torch sum over ``nbytes`` of float32, best of ``reps``."""
    import torch

    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    x.sum()  # warm: pages touched, threads up
    best = min(_timed(lambda: x.sum()) for _ in range(reps))
    return x.numel() * 4 / best


def measure_matvec(dtype: str, *, shape: tuple[int, int] = MATVEC_SHAPE, weights: int = MATVEC_WEIGHTS, reps: int = 5) -> float:
    """Decode mat-vec throughput in weight bytes/s for ``dtype`` (median pass of ``reps``)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    with torch.inference_mode():
        ws = [torch.randn(shape, dtype=torch.float32).to(dt) for _ in range(weights)]
        x = torch.randn(1, shape[1], dtype=torch.float32).to(dt)

        def one_pass():
            for w in ws:
                F.linear(x, w)

        one_pass()
        t = statistics.median(_timed(one_pass) for _ in range(reps))
    return sum(w.numel() * w.element_size() for w in ws) / t


def measure_h2d(nbytes: int = H2D_TEST_BYTES, reps: int = 5) -> float:
    """Pinned host→device copy bandwidth (bytes/s), best of ``reps``."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def copy():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()  # the timer needs the copy finished

    copy()
    return nbytes / min(_timed(copy) for _ in range(reps))


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return max(time.perf_counter() - t0, 1e-9)


def measure_bandwidths(
    offload_dir: Path,
    *,
    progress: bool = True,
    cuda: bool = False,
    disk_bytes: int = DISK_TEST_BYTES,
    mem_bytes: int = MEM_TEST_BYTES,
) -> Bandwidths:
    """Measure everything the planner needs (a few seconds; the disk probe dominates)."""
    dtypes = ("float32", "bfloat16")
    with _progress(progress and sys.stderr is not None, 2 + len(dtypes) + int(cuda)) as step:
        step("disk read")
        disk = measure_disk_read(Path(offload_dir), disk_bytes)
        step("memory read")
        mem = measure_mem_read(mem_bytes)
        by_dtype = {}
        for d in dtypes:
            step(f"mat-vec {d}")
            by_dtype[d] = measure_matvec(d)
        h2d = None
        if cuda:
            step("host→device")
            h2d = measure_h2d()
        step("done")
    return Bandwidths(
        disk_read=disk,
        mem_read=mem,
        matvec=by_dtype[DEFAULT_MATVEC_DTYPE],
        h2d=h2d,
        matvec_by_dtype=by_dtype,
    )
