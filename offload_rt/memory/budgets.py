"""Turn ``--gpu-mem`` / ``--cpu-mem`` values into byte budgets for the planner.

``parse_size`` (offload_rt.config) gives an int (bytes), ``"auto"`` or None.
:func:`resolve_budget` turns that into an int, or None for "no device tier".

``auto`` means *measured free memory minus a margin*:

* cpu: ``psutil.virtual_memory().available``, capped by the cgroup memory limit
  that applies to this process (limit − usage + reclaimable page cache, walked
  up the cgroup hierarchy, v1 or v2), minus ``max(10 %, 512 MiB)``;
* gpu: free memory of the CUDA device (nvidia-ml-py) minus ``max(10 %, 768 MiB)``
  of its total (CUDA context, allocator slack); None when there is no GPU.

The host budget covers what the planner places in RAM (resident weights,
staging buffers, host KV cache, activations). It does **not** cover the
process's fixed cost — the interpreter, torch, numba, zarr, the tokenizer —
which is :data:`RUNTIME_OVERHEAD_BYTES`. Peak RSS should stay within
``cpu_mem + RUNTIME_OVERHEAD_BYTES``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from offload_rt.config import AUTO, parse_size
from offload_rt.errors import UsageError

MiB = 1 << 20

# Fixed RSS not counted in --cpu-mem. Measured on the 2-core CI machine (torch 2.x CPU, Python 3.11):
#   python -c "import torch, offload_rt"                                   ≈ 224 MiB peak RSS
#   + offload_rt.app, numba, zarr, tokenizers and one numba JIT compile    ≈ 353 MiB
# The rest is headroom for a large tokenizer (a 128k vocabulary ≈ 50–100 MiB), torch's
# thread pools and malloc arenas. Kept equal to [budgets] runtime_overhead in configs/defaults.toml.
RUNTIME_OVERHEAD_BYTES = 512 * MiB

# "auto" margins, kept equal to [budgets] in configs/defaults.toml.
CPU_MARGIN_FRACTION = 0.10  # of available memory
CPU_MARGIN_MIN_BYTES = 512 * MiB
GPU_MARGIN_FRACTION = 0.10  # of the device's total memory
GPU_MARGIN_MIN_BYTES = 768 * MiB  # CUDA context + caching-allocator slack

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
        return auto_cpu_budget() if kind == "cpu" else auto_gpu_budget()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--{kind}-mem: bad size {value!r}; use a size such as 8G, 512M, 0 or 'auto'")
    return value


def available_host_memory() -> int:
    """Bytes this process may still use: min(psutil available, cgroup headroom)."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    cg = cgroup_headroom()
    return min(avail, cg) if cg is not None else avail


def auto_cpu_budget() -> int:
    avail = available_host_memory()
    margin = max(int(avail * CPU_MARGIN_FRACTION), CPU_MARGIN_MIN_BYTES)
    return max(0, avail - margin)


def auto_gpu_budget(index: int | None = None) -> int | None:
    """Free bytes on the CUDA device minus the margin; None when no GPU (or no driver)."""
    free_total = gpu_free_total(index)
    if free_total is None:
        return None
    free, total = free_total
    margin = max(int(total * GPU_MARGIN_FRACTION), GPU_MARGIN_MIN_BYTES)
    return max(0, free - margin)


def gpu_free_total(index: int | None = None) -> tuple[int, int] | None:
    """(free, total) bytes of the GPU torch would use, via NVML; None without one."""
    if index is None:
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if first in ("-1",) or (first == "" and "CUDA_VISIBLE_DEVICES" in os.environ):
            return None  # GPUs hidden on purpose
        index = int(first) if first.isdigit() else 0
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no GPU
        return None
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return None
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return int(info.free), int(info.total)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


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


def _reclaimable(stat: Path, keys: tuple[str, ...]) -> int:
    try:
        for line in stat.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k in keys:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Smallest (limit − usage + inactive file cache) over this process's memory cgroup and its ancestors.

    None when no limit applies. Handles cgroup v2 (``memory.max``, ``memory.current``)
    and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``). A path from
    /proc/self/cgroup that does not exist under ``root`` (a cgroup namespace) is
    also tried from ``root`` itself.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    dirs: list[tuple[Path, tuple]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            files = ("memory.max", "memory.current", ("inactive_file",))
        elif "memory" in controllers.split(","):
            base = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file"))
        else:
            continue
        leaf = base / rel if (base / rel).is_dir() else base
        d = leaf
        while True:
            dirs.append((d, files))
            if d == base or base not in d.parents:
                break
            d = d.parent
    best: int | None = None
    for d, (limit_f, usage_f, inactive_keys) in dirs:
        limit = _read_int(d / limit_f)
        if limit is None:
            continue
        usage = _read_int(d / usage_f) or 0
        room = max(0, limit - usage + _reclaimable(d / "memory.stat", inactive_keys))
        room = min(room, limit)
        best = room if best is None else min(best, room)
    return best
