"""The cold-read probe of the offload dir's disk, sized to the free space it finds.

The probe is PROBE_FILES files (a weight store is many chunk files) written to the offload dir,
fsynced, dropped from the page cache (``posix_fadvise(DONTNEED)``), read back cold the way the
scheduler reads (O_DIRECT where the filesystem allows it, buffered otherwise), then deleted.
It writes at most DISK_PROBE_FREE_FRACTION of the free space (a small disk that holds the store
must still run); below MIN_DISK_TEST_BYTES it is not run at all and DEFAULT_DISK_READ stands in,
which :func:`probe_disk` says in its note. A probe the filesystem refuses (full, over quota,
read-only, not permitted, an I/O error) is skipped the same way: a run never ends on the probe.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from offload_rt.config import format_size

MiB = 1 << 20
DISK_TEST_BYTES = 512 * MiB  # kept equal to [calibrate] in configs/defaults.toml
MIN_DISK_TEST_BYTES = 32 * MiB  # a smaller probe says more about latency than bandwidth: skipped
DISK_PROBE_FREE_FRACTION = 0.25  # the probe writes at most this share of the free space
DEFAULT_DISK_READ = 5e8  # bytes/s assumed when the probe is skipped (a SATA SSD's; NVMe reads faster)
READ_CHUNK_BYTES = 16 * MiB
PARALLEL_PIECE_BYTES = 8 * MiB  # as storage.store.PIECE_BYTES: what the streaming reader issues
PARALLEL_READERS = 8  # as the scheduler's reader pool
PROBE_FILES = 8  # the disk probe is several files, like a weight store
_ALIGN = 1 * MiB  # probe chunks are whole MiB: page (and O_DIRECT block) aligned


@dataclass(frozen=True)
class DiskProbe:
    """What the probe found: the read rate (measured, or DEFAULT_DISK_READ when skipped)."""

    bytes_per_s: float
    probe_bytes: int  # bytes written and read; 0 = skipped (the rate is DEFAULT_DISK_READ)
    note: str = ""  # one line for the user when the probe was skipped or made smaller; "" otherwise

    @property
    def skipped(self) -> bool:
        return self.probe_bytes == 0


def free_bytes(directory: Path) -> int | None:
    """Free bytes (for this user) on the filesystem of ``directory`` or its nearest existing ancestor;
    None when it cannot be read."""
    p = Path(directory).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def probe_size(free: int | None, wanted: int = DISK_TEST_BYTES) -> int:
    """Bytes the probe writes with ``free`` bytes free: ``wanted``, at most DISK_PROBE_FREE_FRACTION of
    ``free``, in PROBE_FILES whole-MiB files; 0 (skip) below MIN_DISK_TEST_BYTES. Unknown free space
    (None) is no reason to skip: the probe's own write error still is."""
    size = wanted if free is None else min(wanted, int(free * DISK_PROBE_FREE_FRACTION))
    size = size // (PROBE_FILES * _ALIGN) * PROBE_FILES * _ALIGN
    return size if size >= min(MIN_DISK_TEST_BYTES, wanted) and size > 0 else 0


def probe_disk(directory: Path, wanted: int = DISK_TEST_BYTES, *, measure=None) -> DiskProbe:
    """The disk figure for ``directory``: :func:`measure_disk_read` over a probe sized by :func:`probe_size`,
    or DEFAULT_DISK_READ with a note saying why when the disk is too full, or the probe's write fails
    (ENOSPC on a disk whose free space was misreported, EDQUOT, EROFS, EACCES, EIO...): the probe is
    optional, a run never ends on it. ``measure(directory, nbytes)`` replaces measure_disk_read (tests)."""
    measure = measure or measure_disk_read
    free = free_bytes(directory)
    size = probe_size(free, wanted)
    if size == 0:
        return DiskProbe(DEFAULT_DISK_READ, 0, f"disk speed not measured: {format_size(free or 0)} free on "
                         f"{directory}; assuming {DEFAULT_DISK_READ / 1e6:.0f} MB/s")
    try:
        rate = measure(Path(directory), size)
    except OSError as e:
        return DiskProbe(DEFAULT_DISK_READ, 0, f"disk speed not measured: {directory}: "
                         f"{e.strerror or e}; assuming {DEFAULT_DISK_READ / 1e6:.0f} MB/s")
    note = "" if size >= wanted else (f"disk speed measured with a {format_size(size)} probe "
                                      f"({format_size(free or 0)} free)")
    return DiskProbe(rate, size, note)


def measure_disk_read(directory: Path, nbytes: int = DISK_TEST_BYTES, chunk: int = READ_CHUNK_BYTES) -> float:
    """Cold read bandwidth (bytes/s) of the filesystem holding ``directory``.

    The probe is PROBE_FILES files (a weight store is many chunk files) read the way the
    scheduler reads: PARALLEL_PIECE_BYTES requests on PARALLEL_READERS threads, O_DIRECT where
    allowed, twice (decode re-reads its streamed bytes every token); also one sequential
    stream. The best of these is the disk's peak. Writes about ``nbytes`` (PROBE_FILES files of
    at least one MiB each); the files are gone afterwards, also when writing them failed.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    chunk = max(_ALIGN, min(chunk, nbytes // PROBE_FILES // _ALIGN * _ALIGN))
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
        # Decode reads the same bytes every token: the parallel pattern runs twice, the better pass counts
        # (a virtual disk serves a first pass over fresh data slower than the passes after it).
        par = max(_read_files(names, per_file, PARALLEL_PIECE_BYTES, threads=PARALLEL_READERS) for _ in range(2))
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
