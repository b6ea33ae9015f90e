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
from contextlib import contextmanager
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


def usable_cpus() -> int:
    """Logical CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (the most
    ``--threads`` can use; more threads only wait for each other)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def available_cores() -> int:
    """Cores this process may use: :func:`usable_cpus`, capped by the physical cores (the default thread count)."""
    n = usable_cpus()
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
    one thread is faster (measured: a two-thread step 4x as slow as a one-thread step). Each
    decode step runs with :meth:`next`'s count and reports its time to :meth:`record`.

    * Every candidate (max, max/2, ..., 1) is tried once at the start.
    * The count used is the candidate with the lowest estimate: an exponential average of its
      step times while it is used; a candidate tried in passing keeps its last time.
    * Another candidate is tried again after ``explore_every`` steps; when it was clearly slower
      (by ``slower``), its wait doubles, up to ``max_interval`` steps, so exploring a bad count
      costs little (at most one step in ``max_interval``). A switch, or the current count's time
      changing by ``slower`` either way since it was chosen (the load changed), brings every wait
      back to ``explore_every``.
    """

    def __init__(self, max_threads: int, *, explore_every: int = 12, max_interval: int = 96,
                 alpha: float = 0.3, slower: float = 1.25):
        n, cands = max(1, max_threads), []
        while n >= 1 and n not in cands:
            cands.append(n)
            n //= 2
        self.candidates = cands  # max, max/2, ..., 1
        self.explore_every, self.max_interval = max(2, explore_every), max_interval
        self.alpha, self.slower = alpha, slower
        self.current = cands[0]
        self.estimate: dict[int, float] = {}
        self.steps = 0
        self._last_tried: dict[int, int] = {}
        self._interval = {c: self.explore_every for c in cands}
        self._chosen_at: float | None = None  # the current count's estimate when it was chosen

    def next(self) -> int:
        for c in self.candidates:
            if c not in self.estimate:
                return c
        due = [c for c in self.candidates
               if c != self.current and self.steps - self._last_tried[c] >= self._interval[c]]
        return min(due, key=lambda c: self._last_tried[c]) if due else self.current

    def record(self, n: int, seconds: float) -> None:
        self.steps += 1
        self._last_tried[n] = self.steps
        old = self.estimate.get(n)
        if old is not None and n == self.current:
            self.estimate[n] = old + self.alpha * (seconds - old)
        else:
            self.estimate[n] = seconds
            cur = self.estimate.get(self.current)
            if n != self.current and cur is not None:  # an exploring step: back off from a clearly slower count
                slow = seconds > self.slower * cur
                self._interval[n] = min(2 * self._interval[n], self.max_interval) if slow else self.explore_every
        best = min(self.estimate, key=self.estimate.__getitem__)
        if best != self.current or self._chosen_at is None:
            self.current, self._chosen_at = best, self.estimate[best]
            self._reset_waits()
        elif not self._chosen_at / self.slower <= self.estimate[best] <= self.slower * self._chosen_at:
            self._chosen_at = self.estimate[best]  # the load changed: look around again soon
            self._reset_waits()

    def _reset_waits(self) -> None:
        self._interval = {c: self.explore_every for c in self.candidates}


@contextmanager
def torch_threads(n: int):
    """torch intra-op threads = n inside (prefill's matrix products); restored after.

    While a run serves, torch stays at one thread: decode's torch ops (norms, RoPE, attention
    over a short context, sampling) are too small to gain from a pool, and an idle pool worker
    competes for the cores whenever another program is busy."""
    import torch

    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)
