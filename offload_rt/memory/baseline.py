"""What this process costs before it places a single weight: measured, not assumed.

The host budget (``--cpu-mem``) covers what the planner places in RAM. Beside it the process
needs the interpreter, torch and its libraries as they are mapped, Numba and its compiled
kernels, the tokenizer, thread stacks and allocator slack. That cost differs by a factor of
two between torch builds (CPU build ≈ 0.45 GB, CUDA build ≈ 0.75-0.9 GB resident after the
same imports on the 2-core machine), so :func:`measure` reads it from the running process
once imports, the tokenizer and the first kernel compilation are done:

* ``rss_bytes``: VmRSS (anonymous + mapped file pages) after the cold library pages were paged
  out (:func:`page_out_mapped_files`) — what must stay resident;
* ``cgroup_bytes``: where a cgroup memory limit applies, what the cgroup charges beyond its
  reclaimable page cache (usage − (inactive file − mapped file)); None without a limit.

``baseline_bytes`` (the larger of the two) is what ``auto`` budgets leave to the process, and
the promise is: from the measurement on (VmHWM is reset then), ``peak RSS ≤ baseline_bytes +
--cpu-mem + RUNTIME_SLACK_BYTES``.

:func:`drop_library_page_cache` runs first. Loading a library faults its pages in with
read-ahead: ``import torch`` of the CUDA build on a cold cache leaves ~1.2 GB of page cache
charged to the process's cgroup of which only ~0.3 GB is ever mapped. That cache is
reclaimable, but under a cgroup limit it keeps the cgroup at its cap, so every later
allocation first reclaims, and the pages the process does need (library code) compete with
it. ``posix_fadvise(DONTNEED)`` on every mapped file drops the unmapped pages only; the
mapped ones stay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20

# Growth beyond baseline + placed bytes that a run may show: allocator arenas of the reader and
# kernel threads, torch temporaries of a decode step not in the activation estimate, the page
# cache of one buffered read block (storage.store.READ_BLOCK is dropped block by block).
# Measured peaks (tests/test_memory_budget.py, tools/bench_decode.py d1) stay within it on both builds.
RUNTIME_SLACK_BYTES = 96 * MiB


@dataclass(frozen=True)
class Baseline:
    rss_bytes: int  # VmRSS once imports, tokenizer and kernel compilation are done
    cgroup_bytes: int | None  # non-reclaimable cgroup charge then; None when no cgroup limit applies
    dropped_cache_bytes: int  # library page cache given back by drop_library_page_cache

    @property
    def baseline_bytes(self) -> int:
        return max(self.rss_bytes, self.cgroup_bytes or 0)


def _status_kib(field: str, status: Path = Path("/proc/self/status")) -> int | None:
    try:
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size (VmRSS); psutil's figure where /proc is missing."""
    v = _status_kib("VmRSS")
    if v is not None:
        return v
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (``clear_refs`` 5, Linux ≥ 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mapped_files(maps: Path = Path("/proc/self/maps")) -> list[str]:
    """Regular files this process maps (shared libraries, numba caches, mmapped data)."""
    out: list[str] = []
    seen: set[str] = set()
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].strip()
        if not path.startswith("/") or path.endswith("(deleted)") or path in seen:
            continue
        seen.add(path)
        out.append(path)
    return out


def drop_library_page_cache(paths: list[str] | None = None) -> int:
    """Drop the unmapped page cache of every mapped file; returns the cgroup/system bytes it gave back
    (as far as the before/after figures show it; 0 where they cannot)."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    before = _cache_bytes()
    for path in paths if paths is not None else mapped_files():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    after = _cache_bytes()
    return max(0, before - after) if before is not None and after is not None else 0


MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim these pages now (clean file pages are simply dropped)


def page_out_mapped_files(maps: Path = Path("/proc/self/maps")) -> int:
    """Ask the kernel to drop the resident pages of every read-only file mapping (library code and
    constants); returns how many mappings it accepted (0 where the kernel or libc cannot).

    Most of what ``import torch`` faults in is never touched again (the CUDA build: ~300 MB of
    mapped library pages of which ~25 MB are used by a CPU decode). Paged out now, the pages a run
    does use come back on first touch, a few MB read once; left in, they hold RSS (and a cgroup's
    charge) that the planner could give to weights. Writable mappings are left alone: their dirty
    pages are anonymous memory and would go to swap.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lines = maps.read_text().splitlines()
    except (OSError, AttributeError):
        return 0
    accepted = 0
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].strip().startswith("/") or "w" in parts[1]:
            continue
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            accepted += 1
        elif ctypes.get_errno() == 22 and accepted == 0:  # EINVAL on the first one: kernel without it
            return 0
    return accepted


def _cache_bytes() -> int | None:
    from offload_rt.memory.budgets import cgroup_memory

    cg = cgroup_memory()
    if cg is not None:
        return cg.cache
    return None


def measure(*, drop_cache: bool = True) -> Baseline:
    """Measure the process's own cost now (call it after imports, tokenizer and kernel warm-up)."""
    from offload_rt.memory.budgets import cgroup_memory

    dropped = 0
    if drop_cache:
        dropped = drop_library_page_cache()
        page_out_mapped_files()
    cg = cgroup_memory()
    return Baseline(rss_bytes=rss_bytes(), cgroup_bytes=cg.unreclaimable if cg is not None else None,
                    dropped_cache_bytes=dropped)


def stats_fields(b: Baseline) -> dict:
    """The ``--stats`` keys for the measured baseline."""
    return {"baseline_rss_bytes": b.rss_bytes, "baseline_cgroup_bytes": b.cgroup_bytes,
            "baseline_bytes": b.baseline_bytes, "runtime_slack_bytes": RUNTIME_SLACK_BYTES}


def describe(b: Baseline, host_budget: int | None) -> str:
    """The ``--plan`` line: the process's own cost and the peak RSS the run promises."""
    from offload_rt.config import format_size

    cg = f", cgroup charge {format_size(b.cgroup_bytes)}" if b.cgroup_bytes is not None else ""
    line = f"process baseline (measured): RSS {format_size(b.rss_bytes)}{cg}"
    if host_budget is not None:
        line += (f"; expected peak RSS ≤ {format_size(b.baseline_bytes + host_budget + RUNTIME_SLACK_BYTES)} "
                 f"(baseline + host budget {format_size(host_budget)} + slack {format_size(RUNTIME_SLACK_BYTES)})")
    return line
