"""Fused single-row kernels for decode: the element-wise work of a decoder layer around its mat-vecs.

At decode (one token) every activation is one row of a few hundred to a few thousand floats, and
each torch operator on it costs ~1.5-3 µs of dispatch for well under 1 µs of arithmetic. A layer of
the default model ran ~25 such operators (RMSNorm is five, RoPE eight per tensor), over 1 ms a token
on 30 layers. Each kernel here does one fused step in one Numba call on the calling thread (a
prange would cost more to launch than these rows take), in 0.4-1 µs:

- :func:`rms_norm`: Hugging Face's LlamaRMSNorm of each row (also per head, Qwen3's q/k norm);
- :func:`add_rms_norm`: the residual add and the next RMSNorm in one pass (both results);
- :func:`rope_qk`: RoPE (rotate-half convention) of q and k at once;
- :func:`silu_mul`: ``silu(gate) * up``.

Tensors are passed by address (``attention._ptr``): ``Tensor.numpy()`` alone costs about what a kernel
does; the Python side checks device, dtype, contiguity and sizes first (:func:`usable`). The kernels
use ``error_model="numpy"``: Python's zero-division check on silu's division kept its loop scalar (4x).

Semantics are the torch expressions they replace, rounding included where it is observable: in
bfloat16 every intermediate torch would store as a bfloat16 tensor is rounded here too (float32
arithmetic, then round-to-nearest-even, as torch's CPU kernels do), so bfloat16 results are the same
bits as torch's except where a float32 reduction order or ``exp`` differs in the last bit (the RMS sum,
silu); float32 results differ from torch by float32 rounding only.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import types
from numba.extending import overload

from kernels_cpu.attention import _bf16_bits, _exp_le0, _ptr, _to_f32

_KINDS = (torch.float32, torch.bfloat16)  # activation dtypes with a kernel; the rest stays with torch


def _round(a, x):  # pragma: no cover - compiled only, through the overload below
    """x rounded to the element type of array ``a`` (as float32)."""
    raise NotImplementedError


@overload(_round)
def _round_overload(a, x):
    if a.dtype == types.uint16:
        return lambda a, x: _to_f32(_bf16_bits(x))
    if a.dtype == types.float32:
        return lambda a, x: np.float32(x)
    return None


def _put(a, i, x):  # pragma: no cover - compiled only, through the overload below
    """a[i] = x stored in a's element type (bfloat16 bits rounded to nearest even)."""
    raise NotImplementedError


@overload(_put)
def _put_overload(a, i, x):
    if a.dtype == types.uint16:
        def put16(a, i, x):
            a[i] = _bf16_bits(x)
        return put16
    if a.dtype == types.float32:
        def put32(a, i, x):
            a[i] = x
        return put32
    return None


# -------------------------------------------------------------------- generic bodies (one per dtype)

@nb.njit(fastmath=True, cache=True, nogil=True, inline="always", error_model="numpy")
def _rms_row(x, w, o, eps):  # pragma: no cover - compiled
    """o = w * round(x * rsqrt(mean(x^2) + eps)) for one row (x, w, o 1-D of the activation type)."""
    n = x.shape[0]
    ss = np.float32(0.0)
    for i in range(n):
        xi = _to_f32(x[i])
        ss += xi * xi
    r = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
    for i in range(n):
        _put(o, i, _to_f32(w[i]) * _round(o, _to_f32(x[i]) * r))


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always", error_model="numpy")
def _rms_rows(x, w, o, eps):  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        _rms_row(x[r], w, o[r], eps)


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always", error_model="numpy")
def _add_rms(x, y, w, s, o, eps):  # pragma: no cover - compiled
    """s = round(x + y); o = RMSNorm(s) (one row)."""
    for i in range(x.shape[0]):
        _put(s, i, _to_f32(x[i]) + _to_f32(y[i]))
    _rms_row(s, w, o, eps)


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always", error_model="numpy")
def _rope_heads(x, cos, sin, o):  # pragma: no cover - compiled
    """o[h] = round(round(x[h] * cos) + round(rotate_half(x[h]) * sin)) for each head h of x [heads, d]."""
    half = x.shape[1] // 2
    for h in range(x.shape[0]):
        xh, oh = x[h], o[h]  # row views once per head: one per element kept the loop from vectorising
        for i in range(half):
            a = _to_f32(xh[i])
            b = _to_f32(xh[i + half])
            _put(oh, i, _round(oh, a * _to_f32(cos[i])) + _round(oh, -b * _to_f32(sin[i])))
            _put(oh, i + half, _round(oh, b * _to_f32(cos[i + half])) + _round(oh, a * _to_f32(sin[i + half])))


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always", error_model="numpy")
def _silu_mul_row(g, u, o):  # pragma: no cover - compiled
    """o = round(round(silu(g)) * u); silu(x) = x * sigmoid(x), the exponential taken of -|x| <= 0."""
    for i in range(g.shape[0]):
        x = _to_f32(g[i])
        e = _exp_le0(-abs(x))
        t = np.float32(1.0) if x >= np.float32(0.0) else e  # sigmoid(x) = t / (1 + exp(-|x|))
        _put(o, i, _round(o, x * t / (np.float32(1.0) + e)) * _to_f32(u[i]))


# -------------------------------------------------------------------- kernels (addresses in, bf16 flag)

@nb.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rms_norm_kernel(xa, wa, oa, rows, n, eps, bf16):  # pragma: no cover - compiled
    if bf16:
        _rms_rows(nb.carray(_ptr(xa, np.uint16), (rows, n)), nb.carray(_ptr(wa, np.uint16), n),
                  nb.carray(_ptr(oa, np.uint16), (rows, n)), eps)
    else:
        _rms_rows(nb.carray(_ptr(xa, np.float32), (rows, n)), nb.carray(_ptr(wa, np.float32), n),
                  nb.carray(_ptr(oa, np.float32), (rows, n)), eps)


@nb.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _add_rms_norm_kernel(xa, ya, wa, sa, oa, n, eps, bf16):  # pragma: no cover - compiled
    if bf16:
        t = np.uint16
        _add_rms(nb.carray(_ptr(xa, t), n), nb.carray(_ptr(ya, t), n), nb.carray(_ptr(wa, t), n),
                 nb.carray(_ptr(sa, t), n), nb.carray(_ptr(oa, t), n), eps)
    else:
        t = np.float32
        _add_rms(nb.carray(_ptr(xa, t), n), nb.carray(_ptr(ya, t), n), nb.carray(_ptr(wa, t), n),
                 nb.carray(_ptr(sa, t), n), nb.carray(_ptr(oa, t), n), eps)


@nb.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _rope_qk_kernel(qa, ka, ca, sa, qo, ko, nq, nk, d, bf16):  # pragma: no cover - compiled
    if bf16:
        t = np.uint16
        cos, sin = nb.carray(_ptr(ca, t), d), nb.carray(_ptr(sa, t), d)
        _rope_heads(nb.carray(_ptr(qa, t), (nq, d)), cos, sin, nb.carray(_ptr(qo, t), (nq, d)))
        _rope_heads(nb.carray(_ptr(ka, t), (nk, d)), cos, sin, nb.carray(_ptr(ko, t), (nk, d)))
    else:
        t = np.float32
        cos, sin = nb.carray(_ptr(ca, t), d), nb.carray(_ptr(sa, t), d)
        _rope_heads(nb.carray(_ptr(qa, t), (nq, d)), cos, sin, nb.carray(_ptr(qo, t), (nq, d)))
        _rope_heads(nb.carray(_ptr(ka, t), (nk, d)), cos, sin, nb.carray(_ptr(ko, t), (nk, d)))


@nb.njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _silu_mul_kernel(ga, ua, oa, n, bf16):  # pragma: no cover - compiled
    if bf16:
        t = np.uint16
        _silu_mul_row(nb.carray(_ptr(ga, t), n), nb.carray(_ptr(ua, t), n), nb.carray(_ptr(oa, t), n))
    else:
        t = np.float32
        _silu_mul_row(nb.carray(_ptr(ga, t), n), nb.carray(_ptr(ua, t), n), nb.carray(_ptr(oa, t), n))


# -------------------------------------------------------------------- entry points

def usable(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """x is one decode row (leading dimension 1) on the CPU in float32/bfloat16, contiguous, and every
    tensor of ``others`` is a contiguous CPU tensor of the same dtype: the kernels below apply.
    Anything else (prefill, CUDA, float16, a quantized or mixed-dtype operand) takes the torch path."""
    if not (isinstance(x, torch.Tensor) and x.is_cpu and x.dtype in _KINDS and x.dim() >= 1 and x.shape[0] == 1
            and x.is_contiguous()):
        return False
    dt = x.dtype
    for t in others:
        if not (isinstance(t, torch.Tensor) and t.dtype == dt and t.is_cpu and t.is_contiguous()):
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm over the last dimension of x ([1, n] or [1, heads, n]) with weight [n];
    the caller has checked :func:`usable` (x, weight)."""
    n = weight.numel()
    if x.shape[-1] != n:
        raise ValueError(f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty_like(x)
    _rms_norm_kernel(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps,
                     x.dtype == torch.bfloat16)
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + y, rows [1, n]; the caller has checked :func:`usable` (x, y, weight)."""
    n = weight.numel()
    if x.numel() != n or y.numel() != n:
        raise ValueError(f"add_rms_norm: {tuple(x.shape)} + {tuple(y.shape)}, weight {n}")
    s, out = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel(x.data_ptr(), y.data_ptr(), weight.data_ptr(), s.data_ptr(), out.data_ptr(), n, eps,
                         x.dtype == torch.bfloat16)
    return s, out


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int,
            k_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of one token's q (q_heads x d) and k (k_heads x d) with its cos/sin rows [1, d] (the
    rotate-half convention of ``models.ops.apply_rope``); returns q [1, q_heads, d], k [1, k_heads, d].
    The caller has checked :func:`usable` (q, k, cos, sin)."""
    d = cos.numel()
    if d % 2 or sin.numel() != d or q.numel() != q_heads * d or k.numel() != k_heads * d:
        raise ValueError(f"rope_qk: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} for "
                         f"{q_heads}/{k_heads} heads")
    qo = torch.empty(1, q_heads, d, dtype=q.dtype)
    ko = torch.empty(1, k_heads, d, dtype=q.dtype)
    _rope_qk_kernel(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), qo.data_ptr(), ko.data_ptr(),
                    q_heads, k_heads, d, q.dtype == torch.bfloat16)
    return qo, ko


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for one row; the caller has checked :func:`usable` (gate, up)."""
    n = gate.numel()
    if up.numel() != n:
        raise ValueError(f"silu_mul: {tuple(gate.shape)} * {tuple(up.shape)}")
    out = torch.empty_like(gate)
    _silu_mul_kernel(gate.data_ptr(), up.data_ptr(), out.data_ptr(), n, gate.dtype == torch.bfloat16)
    return out


def warm_up() -> None:
    """Compile (or load from Numba's cache) every kernel here now, both dtypes, so that none compiles
    mid-run (call it where the app warms the other kernels up)."""
    for dt in _KINDS:
        x, w = torch.ones(1, 4, dtype=dt), torch.ones(4, dtype=dt)
        rms_norm(x, w, 1e-6)
        add_rms_norm(x, x, w, 1e-6)
        rope_qk(x, x, w, w, 1, 1)
        silu_mul(x, x)
