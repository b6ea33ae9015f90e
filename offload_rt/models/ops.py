"""The operations model files call: each picks its kernel by weight format and device.

Model families (``offload_rt.models.*``) are written against these names only, never against a
kernel module, so a new kernel or a new family edits one place:

- :func:`linear` — float weights: the Numba decode mat-vec for one CPU row, else ``F.linear``;
  a quantized :class:`~storage.formats.QTensor`: ``kernels_cpu.quant`` on the CPU, ``kernels_gpu.quant``
  on a GPU (``kernels_cpu.matvec.linear`` does the dispatch);
- :func:`rms_norm`, :func:`add_rms_norm`, :func:`rope_qk`, :func:`silu_mul` — the fused single-row
  kernels of ``kernels_cpu.rowops`` for one CPU token (:func:`fast_row`), torch otherwise;
- :func:`row_invariant` — a scope in which every row of an activation is computed with the same
  arithmetic whatever the number of rows (``kernels_cpu.matvec.rows_linear``, torch's row-wise ops):
  the server's batched decode rows give the bits each sequence gives alone;
- :func:`moe` — the routed experts of a Mixture-of-Experts layer: the weight source's expert set
  (resident, or a cache over the store) runs ``kernels_cpu.moe`` where the experts are.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F

from kernels_cpu import rowops
from kernels_cpu.matvec import linear as _linear
from kernels_cpu.matvec import rows_linear as _rows_linear

_ROW_INVARIANT = False  # inside row_invariant(): see there


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """(x [T, in], w [out, in] float or QTensor, bias or None) -> [T, out]."""
    return (_rows_linear if _ROW_INVARIANT else _linear)(x, w, b)


@contextmanager
def row_invariant():
    """Within this scope each row of an activation gets the same bits whatever the number of rows: linear
    layers take the row-invariant kernels, the row-wise steps torch's ops (never the fused single-row
    kernels, whose arithmetic differs from torch's). Batched decode of several sequences runs here, and a
    sequence alone too, so that its output does not depend on what it was batched with. One compute
    thread at a time (module state)."""
    global _ROW_INVARIANT
    before, _ROW_INVARIANT = _ROW_INVARIANT, True
    try:
        yield
    finally:
        _ROW_INVARIANT = before


def fast_row(*tensors: torch.Tensor) -> bool:
    """Whether these activations take the fused single-row CPU kernels (one decode token)."""
    return not _ROW_INVARIANT and rowops.usable(*tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalise in float32, scale in the input dtype. One CPU row
    (decode) goes to the fused kernel, the same arithmetic in one call."""
    if fast_row(x, weight):
        return rowops.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, fast: bool = True):
    """(x + y, rms_norm(x + y)) — fused for one CPU row (``fast``: the layer's rows take the fused kernels)."""
    if fast and fast_row(y, weight):
        return rowops.add_rms_norm(x, y, weight, eps)
    x = x + y
    return x, rms_norm(x, weight, eps)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int,
            fast: bool = True):
    """RoPE (rotate-half) of q [T, nh*d] and k [T, nkv*d] at the rows' cos/sin [T, d] -> [T, heads, d] each
    (``fast`` and one CPU row: the fused kernel)."""
    if fast and fast_row(q, k, cos, sin):
        return rowops.rope_qk(q, k, cos, sin, nh, nkv)
    T, d = q.shape[0], cos.shape[-1]
    return apply_rope(q.reshape(T, nh, d), cos, sin), apply_rope(k.reshape(T, nkv, d), cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos/sin: [T, d]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """silu(gate) * up — fused for one CPU row (``fast``: the layer's rows take the fused kernels)."""
    if fast and fast_row(gate, up):
        return rowops.silu_mul(gate, up)
    return F.silu(gate) * up


class ExpertSet(Protocol):
    """The routed experts of one MoE layer, as the weight source hands them to the model.

    Implementations (``offload_rt.experts``) know where the experts' bytes are (all resident, or a
    cache of slots over the store) and which kernel computes them; the model only routes.
    """

    def run(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[t, j] * expert_{ids[t, j]}(h[t]) for every row t: h [T, H], ids/weights [T, k]."""


def moe(experts: ExpertSet, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed experts' output for h [T, H] routed to ``ids`` [T, k] with ``weights`` [T, k]."""
    return experts.run(h, ids, weights)
