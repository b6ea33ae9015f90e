"""Tiers own a byte budget and account for every allocation made against it.

Pure bookkeeping (no tensors): the scheduler reserves bytes here before it allocates,
so a plan that would exceed ``--gpu-mem`` or ``--cpu-mem`` fails loudly instead of
silently overcommitting. On a machine without CUDA the device tier is an alias of
the host tier (same budget, same memory).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from offload_rt.config import format_size
from offload_rt.errors import BudgetError


@dataclass
class Tier:
    name: str  # "device" | "host" | "disk"
    budget: int | None  # bytes, None = unlimited (disk)
    used: int = 0  # bytes reserved now
    peak: int = 0  # most bytes reserved at once
    items: dict = field(default_factory=dict)  # what -> bytes
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reserve(self, what: str, nbytes: int) -> None:
        with self._lock:
            if self.budget is not None and self.used + nbytes > self.budget:
                raise BudgetError(
                    f"{self.name} budget of {format_size(self.budget)} cannot hold {what} ({format_size(nbytes)}) "
                    f"on top of {format_size(self.used)} already placed; raise the budget"
                )
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self.items[what] = self.items.get(what, 0) + nbytes

    def release(self, what: str) -> None:
        with self._lock:
            self.used -= self.items.pop(what, 0)


class Tiers:
    """The three tiers of one run; ``device`` is ``host`` itself when there is no CUDA."""

    def __init__(self, *, host_budget: int | None, device_budget: int | None, cuda: bool):
        self.cuda = cuda
        self.host = Tier("host", host_budget)
        self.device = Tier("device", device_budget) if cuda else self.host
        self.disk = Tier("disk", None)

    def get(self, name: str) -> Tier:
        return {"device": self.device, "host": self.host, "disk": self.disk}[name]

    def occupancy(self) -> dict[str, int]:
        return {"device": self.device.used if self.cuda else 0, "host": self.host.used, "disk": self.disk.used}
