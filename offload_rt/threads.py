"""CPU threads on a machine that is never quiet: how many, and how idle workers wait.

Decode on the CPU is a few hundred short parallel regions per token (Numba mat-vecs, torch
element-wise ops), each a fork and a join across the compute threads. Three choices decide
what a competing busy program costs:

* **How long idle workers spin.** torch and Numba run their regions on GNU OpenMP pools whose
  idle workers spin ~300k polls (~3 ms) before sleeping (``OMP_WAIT_POLICY`` unset). When
  another program holds a core, a spinning worker burns the time slice the descheduled one
  needs, and every join waits a scheduler slice: measured on 2 cores with one competing busy
  loop, the default model fell from ~59 to 18 tok/s. Sleeping at once (``PASSIVE``) fixes that
  but costs ~25 % when the machine is quiet (a futex wake per region). :func:`configure_process`
  sets ``GOMP_SPINCOUNT=10000`` (spin ~0.1 ms, enough to bridge the gap between two regions of
  one step, then sleep) before torch or Numba load libgomp, unless the user exported
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (theirs wins).
* **How many, given the load.** With a busy program on one of two cores, one compute thread
  gets a whole core and no join ever waits: it beats two. :class:`ThreadTuner` picks the decode
  thread count from the step times it measures, trying the other counts now and then.
* **How many at most.** :func:`available_cores` is what this process may really run on: its
  CPU affinity mask and the cgroup CPU quota (containers), not ``os.cpu_count()``.

``--threads``/``-t`` fixes the count (no tuning). Figures: docs/BENCHMARKS.md, "Contention".
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from offload_rt import cgroups

SPIN_ENV = ("GOMP_SPINCOUNT", "10000")  # idle OpenMP workers poll this many times, then sleep


def configure_process() -> bool:
    """Set how idle OpenMP workers wait, for this process; True if it can still take effect.

    Must run before the first ``import torch`` (or numba's OpenMP layer): libgomp reads its
    environment once, when it is loaded.
    """
    if "OMP_WAIT_POLICY" not in os.environ and SPIN_ENV[0] not in os.environ:
        os.environ[SPIN_ENV[0]] = SPIN_ENV[1]
    return "torch" not in sys.modules and "numba" not in sys.modules


def wait_policy() -> str:
    """How idle workers wait in this process, as the environment says (for --stats)."""
    parts = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", SPIN_ENV[0]) if k in os.environ]
    return ",".join(parts) or "default"


def _cgroup_cpu_limit(root: Path = cgroups.ROOT, proc_cgroup: Path = cgroups.PROC_CGROUP) -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if unlimited."""
    best = None
    for d, v2 in cgroups.directories("cpu", proc_cgroup, root):
        try:
            if v2:
                quota, period = (d / "cpu.max").read_text().split()[:2]
                if quota == "max":
                    continue
                quota, period = int(quota), int(period)
            else:
                quota = int((d / "cpu.cfs_quota_us").read_text())
                period = int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            best = min(best if best is not None else math.inf, quota / period)
    return best


def available_cores() -> int:
    """Cores this process may use: affinity mask, capped by a cgroup CPU quota and the physical cores."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        if physical:
            n = min(n, physical)  # decode is memory-bound: SMT siblings add contention, not bandwidth
    except Exception:
        pass
    return max(1, n)


class ThreadTuner:
    """Picks the decode thread count from the step times it measures (pure policy, no torch).

    The right count depends on what else runs: quiet, every core helps; with a busy program
    on one of two cores, a two-thread join waits for the descheduled thread every region, and
    one thread is faster. Each decode step runs with :meth:`next`'s count and reports its time
    to :meth:`record`. Every ``explore_every`` steps one step tries another candidate (the
    least recently measured one); the count used is the candidate with the lowest estimate,
    an exponential average of its step times (a tried candidate keeps its last time until it
    is tried again). So a change in load is followed within about ``explore_every`` steps,
    and exploring costs one step in ``explore_every``.
    """

    def __init__(self, max_threads: int, *, explore_every: int = 12, alpha: float = 0.3):
        n, cands = max(1, max_threads), []
        while n >= 1 and n not in cands:
            cands.append(n)
            n //= 2
        self.candidates = cands  # max, max/2, ..., 1
        self.explore_every = max(2, explore_every)
        self.alpha = alpha
        self.current = cands[0]
        self.estimate: dict[int, float] = {}
        self._last_tried: dict[int, int] = {}
        self.steps = 0

    def next(self) -> int:
        if len(self.candidates) > 1 and self.steps % self.explore_every == self.explore_every - 1:
            others = [c for c in self.candidates if c != self.current]
            return min(others, key=lambda c: self._last_tried.get(c, -1))
        return self.current

    def record(self, n: int, seconds: float) -> None:
        self.steps += 1
        self._last_tried[n] = self.steps
        old = self.estimate.get(n)
        self.estimate[n] = seconds if old is None or n != self.current else old + self.alpha * (seconds - old)
        self.current = min(self.estimate, key=self.estimate.__getitem__)
