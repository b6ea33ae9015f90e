"""Turn ``--gpu-mem`` / ``--cpu-mem`` values into byte budgets for the planner.

``parse_size`` (offload_rt.config) gives an int (bytes), ``"auto"`` or None.
:func:`resolve_budget` turns that into an int, or None for "no device tier".

``auto`` means *measured free memory minus a margin*:

* cpu: ``psutil.virtual_memory().available``, capped by the cgroup memory limit
  that applies to this process (limit − usage + reclaimable page cache, i.e.
  inactive and not mapped, walked up the cgroup hierarchy, v1 or v2), minus
  ``RUNTIME_SLACK_BYTES``, minus ``max(10 %, 512 MiB)`` of the rest (``max(10 %, 64 MiB)``
  of a cgroup's headroom: that limit is this process's own);
* gpu: free memory of the CUDA device minus ``max(10 %, 768 MiB)`` of its total
  (other processes, allocator slack); None when there is no GPU.

The GPU side (the device budget from ``--gpu-mem``, the CUDA context, NVML) is
:mod:`offload_rt.memory.gpu`.

The host budget covers what the planner places in RAM (resident weights,
staging buffers, host KV cache, activations). It does **not** cover the
process's own cost — the interpreter, torch, numba, the tokenizer — which is
measured in the running process (:mod:`offload_rt.memory.baseline`) before the
budgets are resolved: it is already resident when ``auto`` reads the free memory,
so ``auto`` leaves it out, and the run's promise is
``peak RSS ≤ baseline + cpu_mem + RUNTIME_SLACK_BYTES``. ``auto`` also keeps
``RUNTIME_SLACK_BYTES`` free for that slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from offload_rt import cgroups
from offload_rt.config import AUTO, parse_size
from offload_rt.errors import UsageError

MiB = 1 << 20

# "auto" margins, kept equal to [budgets] in configs/defaults.toml.
CPU_MARGIN_FRACTION = 0.10  # of available memory
CPU_MARGIN_MIN_BYTES = 512 * MiB
CGROUP_MARGIN_MIN_BYTES = 64 * MiB  # under a cgroup memory limit (the limit is this process's own)

_NO_LIMIT = 1 << 60  # cgroup v1 reports "unlimited" as a huge page-rounded number


def resolve_budget(value: int | str | None, *, kind: Literal["gpu", "cpu"]) -> int | None:
    """Bytes for a budget value; None only for ``kind="gpu"`` when there is no GPU.

    ``value``: int bytes (``0`` = tier unused), ``"auto"``, a size string, or None
    (not given: same as ``"auto"``).
    """
    if kind not in ("gpu", "cpu"):
        raise ValueError(f"kind must be 'gpu' or 'cpu', not {kind!r}")
    if isinstance(value, str) and value.strip().lower() != AUTO:
        value = parse_size(value, option=f"--{kind}-mem")
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        if kind == "cpu":
            return auto_cpu_budget()
        from offload_rt.memory.gpu import auto_gpu_budget

        return auto_gpu_budget()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--{kind}-mem: bad size {value!r}; use a size such as 8G, 512M, 0 or 'auto'")
    return value


def available_host_memory() -> int:
    """Bytes this process may still use: min(psutil available, cgroup headroom)."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    cg = cgroup_headroom()
    return min(avail, cg) if cg is not None else avail


def host_memory_limit() -> int:
    """The most RAM this process could ever have: the machine's, or a smaller cgroup limit (an ancestor's
    included). A ``--cpu-mem`` above it cannot be honoured (offload_rt.app clamps it to ``auto``)."""
    import psutil

    limits = [cg.limit for cg in _memory_cgroups(Path("/proc/self/cgroup"), Path("/sys/fs/cgroup"))
              if 0 < cg.limit < _NO_LIMIT]
    return min([int(psutil.virtual_memory().total), *limits])


def auto_cpu_budget() -> int:
    """Free host memory now, less the run-time slack the budget does not cover, less a margin.

    The process's measured baseline is already resident when this runs, so it is not in the
    free figure. The margin differs by what limits us: the machine's free memory is shared with
    every other program (``max(10 %, 512 MiB)`` is left to them); a cgroup limit is this
    process's own (``max(10 %, 64 MiB)`` keeps the cgroup clear of its cap, where the kernel
    would reclaim on every allocation).
    """
    import psutil

    from offload_rt.memory.baseline import RUNTIME_SLACK_BYTES

    def after(avail: int, fraction: float, minimum: int) -> int:
        avail = max(0, avail - RUNTIME_SLACK_BYTES)
        return max(0, avail - max(int(avail * fraction), minimum))

    budget = after(int(psutil.virtual_memory().available), CPU_MARGIN_FRACTION, CPU_MARGIN_MIN_BYTES)
    cg = cgroup_memory()
    if cg is not None:
        # Pages this process maps may be charged to another cgroup today (a library another program
        # loaded first) and to ours after any reclaim: count the whole resident set as ours.
        from offload_rt.memory.baseline import rss_bytes

        room = max(0, cg.limit - max(cg.unreclaimable, rss_bytes()))  # headroom, the whole RSS counted
        budget = min(budget, after(room, CPU_MARGIN_FRACTION, CGROUP_MARGIN_MIN_BYTES))
    return budget


# ---------------------------------------------------------------------------- cgroups


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        n = int(text)
    except ValueError:
        return None
    return None if n >= _NO_LIMIT else n


@dataclass(frozen=True)
class CgroupMemory:
    """One memory cgroup with a limit, as its files say now."""

    path: Path
    limit: int  # bytes
    usage: int  # bytes charged (anonymous + page cache + kernel)
    cache: int  # page cache charged
    inactive_file: int  # page cache on the inactive list (reclaimed first)
    mapped_file: int  # page cache mapped by processes (library code, mmaps): in use, not reclaimable

    @property
    def reclaimable(self) -> int:
        """Page cache the kernel can take back without hurting anyone: inactive and not mapped."""
        return max(0, self.inactive_file - self.mapped_file)

    @property
    def unreclaimable(self) -> int:
        return max(0, self.usage - self.reclaimable)

    @property
    def headroom(self) -> int:
        return max(0, min(self.limit, self.limit - self.unreclaimable))


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            try:
                out[k] = int(v)
            except ValueError:
                pass
    except OSError:
        pass
    return out


def _first(stat: dict[str, int], *keys: str) -> int:
    for k in keys:
        if k in stat:
            return stat[k]
    return 0


def _memory_cgroups(proc_cgroup: Path, root: Path) -> list[CgroupMemory]:
    """This process's memory cgroup and its ancestors that have a limit (v1 or v2)."""
    found: list[CgroupMemory] = []
    for d, v2 in cgroups.directories("memory", proc_cgroup, root):
        limit = _read_int(d / ("memory.max" if v2 else "memory.limit_in_bytes"))
        if limit is None:
            continue
        st = _stat(d / "memory.stat")
        usage = _read_int(d / ("memory.current" if v2 else "memory.usage_in_bytes")) or 0
        if v2:
            cache, inactive, mapped = _first(st, "file"), _first(st, "inactive_file"), _first(st, "file_mapped")
        else:  # hierarchical totals where the kernel gives them
            cache = _first(st, "total_cache", "cache")
            inactive = _first(st, "total_inactive_file", "inactive_file")
            mapped = _first(st, "total_mapped_file", "mapped_file")
        found.append(CgroupMemory(d, limit, usage, cache, inactive, mapped))
    return found


def cgroup_memory(proc_cgroup: Path = Path("/proc/self/cgroup"),
                  root: Path = Path("/sys/fs/cgroup")) -> CgroupMemory | None:
    """The limited memory cgroup (this process's or an ancestor) with the least headroom; None if none."""
    cgs = _memory_cgroups(proc_cgroup, root)
    return min(cgs, key=lambda c: c.headroom) if cgs else None


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Smallest (limit − usage + reclaimable page cache) over this process's memory cgroup and its ancestors.

    None when no limit applies. Handles cgroup v2 (``memory.max``, ``memory.current``)
    and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``). A path from
    /proc/self/cgroup that does not exist under ``root`` (a cgroup namespace) is
    also tried from ``root`` itself. Reclaimable = inactive page cache minus mapped files:
    the pages of the libraries this process runs are in use even when the kernel lists them
    inactive, and counting them as free memory overcommits by their size (≈ 0.3 GB with the
    CUDA build of torch).
    """
    cg = cgroup_memory(proc_cgroup, root)
    return cg.headroom if cg is not None else None
