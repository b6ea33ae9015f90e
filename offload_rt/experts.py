"""Expert sets: a MoE layer's routed experts as the model sees them (``models.ops.ExpertSet``).

The model routes and calls ``run(h, ids, weights)``; an expert set knows where the experts' bytes
are and runs the expert kernel (``kernels_cpu.moe``) over them:

- :class:`ResidentExperts` — every expert of the layer held in memory (a model that fits);
- the expert cache of a streamed model lives in :mod:`offload_rt.expert_stream`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from kernels_cpu.moe import moe_ffn


def cast_parts(parts: Mapping[str, object], dtype: torch.dtype) -> dict[str, object]:
    """An expert's parts for compute at ``dtype``: float matrices cast (a quantized QTensor stays blocks)."""
    out = {}
    for k, v in parts.items():
        out[k] = v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype else v
    return out


class ResidentExperts:
    """All experts of one layer in memory: ``experts[e]`` = {"gate_proj", "up_proj", "down_proj"}."""

    def __init__(self, experts: Sequence[Mapping[str, object]], unit_bytes: int = 0):
        self.experts = list(experts)
        self.unit_bytes = unit_bytes  # bytes of one expert as stored (0: not from a store)
        first = next(iter(self.experts[0].values())) if self.experts else None
        self.device = first.device if first is not None else torch.device("cpu")  # where they compute

    @classmethod
    def load(cls, store, name: str, dtype: torch.dtype, device: str = "cpu") -> "ResidentExperts":
        """Layer ``name``'s packed experts read whole from the store; float parts cast to ``dtype`` once."""
        from storage.store import aligned_buffer

        layout = store.expert_layout(name)
        # checksummed, and dropped from the page cache as read (the host tier is the cache: a cgroup would be
        # charged for the file's pages on top of the copy)
        data = aligned_buffer(store.info(name).nbytes)
        store.read_into(name, data, verify=True, drop_cache=True)
        data = data.view(layout.count, layout.unit_bytes).to(device)
        experts = [cast_parts(layout.views(data[e]), dtype) for e in range(layout.count)]
        return cls(experts, layout.unit_bytes)

    def run(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dev = self.device
        if h.device != dev:  # experts in RAM beside a GPU: only the rows cross the link
            return moe_ffn(h.to(dev), ids.to(dev), weights.to(dev), self.experts.__getitem__).to(h.device)
        return moe_ffn(h, ids, weights, self.experts.__getitem__)
