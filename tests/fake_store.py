"""An in-memory stand-in for storage.WeightStore (same read API), with an optional slow reader.

Tensors are float tensors or ``QTensor`` (quantized blocks), as a store holds them.
"""

from __future__ import annotations

import threading
import time

import torch

from offload_rt.scheduler import _bytes
from storage.formats import QTensor, format_of
from storage.store import TensorInfo


class FakeStore:
    def __init__(self, tensors: dict, read_delay_s: float = 0.0):
        self.tensors = {k: (v if isinstance(v, QTensor) else v.contiguous()) for k, v in tensors.items()}
        self.read_delay_s = read_delay_s
        self.reads: list[str] = []
        self._lock = threading.Lock()

    def info(self, name):
        t = self.tensors[name]
        fmt = t.fmt if isinstance(t, QTensor) else format_of(t.dtype)
        return TensorInfo(name, fmt, tuple(t.shape), _bytes(t).numel())

    def read_into(self, name, out, *, verify=False, drop_cache=True):
        t = self.tensors[name]
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        out.view(torch.uint8).view(-1).copy_(_bytes(t))
        with self._lock:
            self.reads.append(name)

    def load(self, name, *, verify=True):
        t = self.tensors[name]
        return QTensor(t.data.clone(), t.fmt, tuple(t.shape)) if isinstance(t, QTensor) else t.clone()

    def read_rows(self, name, rows):
        t = self.tensors[name]
        idx = torch.tensor(rows, dtype=torch.long)
        if isinstance(t, QTensor):
            return QTensor(t.data[idx].clone(), t.fmt, (len(rows), *t.shape[1:]))
        return t[idx].clone()

    def read_many(self, items, *, executor=None, verify=False, drop_cache=True, direct=True):
        if executor is None:
            for name, out in items:
                self.read_into(name, out)
        else:
            for f in [executor.submit(self.read_into, name, out) for name, out in items]:
                f.result()
        return sum(self.info(n).nbytes for n, _ in items)
