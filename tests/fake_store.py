"""An in-memory stand-in for storage.WeightStore (same read API), with an optional slow reader."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Info:
    name: str
    dtype: torch.dtype
    shape: tuple
    nbytes: int


class FakeStore:
    def __init__(self, tensors: dict[str, torch.Tensor], read_delay_s: float = 0.0):
        self.tensors = {k: v.contiguous() for k, v in tensors.items()}
        self.read_delay_s = read_delay_s
        self.reads: list[str] = []
        self._lock = threading.Lock()

    def info(self, name):
        t = self.tensors[name]
        return Info(name, t.dtype, tuple(t.shape), t.numel() * t.element_size())

    def read_into(self, name, out, *, verify=False, drop_cache=True):
        t = self.tensors[name]
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        out.view(torch.uint8).view(-1).copy_(t.view(-1).view(torch.uint8))
        with self._lock:
            self.reads.append(name)

    def load(self, name, *, verify=True):
        return self.tensors[name].clone()

    def read_rows(self, name, rows):
        return self.tensors[name][torch.tensor(rows, dtype=torch.long)].clone()

    def read_many(self, items, *, executor=None, verify=False, drop_cache=True, direct=True):
        if executor is None:
            for name, out in items:
                self.read_into(name, out)
        else:
            for f in [executor.submit(self.read_into, name, out) for name, out in items]:
                f.result()
        return sum(self.info(n).nbytes for n, _ in items)
