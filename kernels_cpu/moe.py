"""Routed experts of a Mixture-of-Experts layer (placeholder reference; the Numba kernels replace it)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from kernels_cpu.matvec import linear


def moe_ffn(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            expert: Callable[[int], Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """sum_j weights[t, j] * down(silu(gate(h_t)) * up(h_t)), accumulated as transformers does."""
    out = torch.zeros_like(h)
    for e in torch.unique(ids).tolist():
        pos, tok = torch.where((ids == e).T)
        w = expert(int(e))
        x = h[tok]
        y = linear(F.silu(linear(x, w["gate_proj"])) * linear(x, w["up_proj"]), w["down_proj"])
        out.index_add_(0, tok, (y * weights[tok, pos, None]).to(out.dtype))
    return out
