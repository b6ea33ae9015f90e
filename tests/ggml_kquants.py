"""A K-quant encoder (Q4_K, Q5_K, Q6_K) written from ggml's block layout, for tests.

gguf-py (0.19) can dequantize K-quants but not quantize them, so tests build the blocks here, from
the structs in ggml's ``ggml-common.h`` (super-blocks of QK_K = 256 values):

* ``block_q4_K``: f16 d, f16 dmin, u8 scales[12], u8 qs[128]            (144 bytes)
* ``block_q5_K``: f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128] (176 bytes)
* ``block_q6_K``: u8 ql[128], u8 qh[64], i8 scales[16], f16 d           (210 bytes)

Q4_K/Q5_K: eight sub-blocks of 32, value = d*sc[j]*q - dmin*m[j], with 6-bit sc/m packed in 12 bytes
(``get_scale_min_k4``). Q6_K: sixteen sub-blocks of 16, value = d*sc[j]*(q - 32), int8 sc.

``quantize_k`` returns the packed bytes and the value each element decodes to, computed in float64
from the integer codes (the dequantization formula, independent of any unpacking code).
The scale choice is the plain min/max one (not llama.cpp's search); the layout is what matters here.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

QK_K = 256
BLOCK_BYTES = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}


def _half(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f16 value as float64, its two little-endian bytes) of each element of x ([n])."""
    h = x.astype("<f2")
    return h.astype(np.float64), h.view(np.uint8).reshape(-1, 2)


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 1.0)


def pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of eight 6-bit scales and mins per block ([n, 8] each -> [n, 12])."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _affine(x: np.ndarray, levels: int):
    """Q4_K/Q5_K codes for x ([n, 8, 32] float64): (d, dmin bytes, sc, m, q, decoded values)."""
    lo = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - lo) / levels
    mn = -lo
    d, d_bytes = _half(scale.max(-1) / 63)
    dmin, dmin_bytes = _half(mn.max(-1) / 63)
    sc = np.clip(np.rint(scale / _safe(d)[:, None]), 1, 63)
    m = np.clip(np.rint(mn / _safe(dmin)[:, None]), 0, 63)
    step = (d[:, None] * sc)[..., None]
    off = (dmin[:, None] * m)[..., None]
    q = np.clip(np.rint((x + off) / step), 0, levels)
    return d_bytes, dmin_bytes, sc, m, q.astype(np.uint8), step * q - off


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """qs of Q4_K/Q5_K: per 64 values, byte l holds value l (low nibble) and value 32 + l (high)."""
    q = q.reshape(q.shape[0], 4, 64) & 15
    return (q[..., :32] | (q[..., 32:] << 4)).reshape(q.shape[0], 128)


def _q4_k(x):
    d, dmin, sc, m, q, ref = _affine(x.reshape(-1, 8, 32), 15)
    return np.concatenate([d, dmin, pack_scales_k4(sc, m), _pack_nibbles(q)], axis=1), ref


def _q5_k(x):
    d, dmin, sc, m, q, ref = _affine(x.reshape(-1, 8, 32), 31)
    high = (q >> 4).astype(np.uint8)  # [n, 8 sub-blocks, 32]: bit j of qh[l] is the 5th bit of value 32*j + l
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    return np.concatenate([d, dmin, pack_scales_k4(sc, m), qh, _pack_nibbles(q)], axis=1), ref


def _q6_k(x):
    x = x.reshape(-1, 16, 16)
    n = x.shape[0]
    amax_at = np.abs(x).argmax(-1)[..., None]
    scale = -np.take_along_axis(x, amax_at, -1)[..., 0] / 32  # signed, so int8 scales of both signs occur
    d, d_bytes = _half(np.abs(scale).max(-1) / 127)
    sc = np.clip(np.rint(scale / _safe(d)[:, None]), -127, 127)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint(x / np.where(step == 0, 1.0, step)), -32, 31)
    ref = step * q
    u = (q + 32).astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 values
    a, b, c, e = u[..., 0:32], u[..., 32:64], u[..., 64:96], u[..., 96:128]
    ql = np.concatenate([(a & 15) | ((c & 15) << 4), (b & 15) | ((e & 15) << 4)], axis=-1).reshape(n, 128)
    qh = ((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)).reshape(n, 64)
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, d_bytes], axis=1), ref


_ENCODERS = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def quantize_k(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks as uint8 [rows..., bytes per row], decoded values as float64 in w's shape).

    The last dimension of w must be a multiple of 256.
    """
    if w.shape[-1] % QK_K:
        raise ValueError(f"rows of {w.shape[-1]} values are not whole {QK_K}-value super-blocks")
    blocks, ref = _ENCODERS[qtype](np.asarray(w, np.float64).reshape(-1, QK_K))
    assert blocks.shape[1] == BLOCK_BYTES[qtype]
    raw = np.ascontiguousarray(blocks).reshape(*w.shape[:-1], w.shape[-1] // QK_K * BLOCK_BYTES[qtype])
    return raw, ref.reshape(w.shape)
