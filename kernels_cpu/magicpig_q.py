"""MagicPIG's sampled rows read from quantized KV records (``--kv-dtype q8|q4``), dequantized in registers.

MagicPIG (:mod:`kernels_cpu.magicpig`) reads single key and value rows at random, one token at a time, so
there is no group of keys to fold a scale into once (as :mod:`kernels_cpu.attention_q` does over 32 keys):
each row is dequantized as it is dotted or added. The records are :mod:`kernels_cpu.kv_quant`'s: per chunk
slot and KV head ``C * w`` bytes, the codes ``[C, d * bits / 8]`` then the float16 scales (q4: then the
minimums); keys per channel over the token's group of ``GROUP`` tokens (``key = km[grp] + ks[grp] * code``),
values per token (``value = vm[t] + vs[t] * code``). q8 is symmetric (no minimum); q4 packs, per 32
channels, channel i in byte i's low nibble and channel i + 16 in its high nibble.

A sampled key row costs its codes and its group's scale row (q4: and minimum row): with d = 128, 128 + 256
bytes for q8 against 256 for bf16 -- the rows of a token's neighbours share the scale row, and the KV's
footprint is what shrinks (1.9x / 3.2x). A value row costs its codes and two to four bytes.

Functions called (inlined) from magicpig's kernels with the record pool as uint8 [P, nkv, C, w] and
``bits`` 8 or 4; addresses are computed from the pool's base, the Python side checks the pool's shape.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from kernels_cpu.attention import _half_bits_to_f32, _ptr
from kernels_cpu.attention_q import _prefetch_at
from kernels_cpu.kv_quant import GROUP

_H = GROUP // 2  # q4: channels per nibble run


@nb.njit(inline="always")
def _record(pool, slot, g):  # pragma: no cover - compiled
    """Address of the record of KV head g in chunk slot ``slot``, and its chunk length C."""
    _P, nkv, C, w = pool.shape
    return pool.ctypes.data + (slot * nkv + g) * (C * w), C


@nb.njit(fastmath=True, inline="always")
def key_dot(pool, slot, g, r, qh, bits):  # pragma: no cover - compiled
    """q . key of row r (of its chunk) in slot/KV head g: the token's codes times its group's per-channel
    scales (+ minimums, q4), widened in registers."""
    rec, C = _record(pool, slot, g)
    d = qh.shape[0]
    cb = d * bits // 8
    grp = r // GROUP
    sc = nb.carray(_ptr(rec + C * cb + grp * d * 2, np.int16), d)
    acc = np.float32(0.0)
    if bits == 8:
        codes = nb.carray(_ptr(rec + r * cb, np.int8), d)
        for x in range(d):
            acc += qh[x] * _half_bits_to_f32(sc[x]) * np.float32(codes[x])
        return acc
    mn = nb.carray(_ptr(rec + C * cb + (C // GROUP) * d * 2 + grp * d * 2, np.int16), d)
    codes = nb.carray(_ptr(rec + r * cb, np.uint8), cb)
    for xg in range(d // GROUP):
        for i in range(_H):
            b = codes[xg * _H + i]
            x = xg * GROUP + i
            lo = _half_bits_to_f32(mn[x]) + _half_bits_to_f32(sc[x]) * np.float32(b & np.uint8(15))
            hi = _half_bits_to_f32(mn[x + _H]) + _half_bits_to_f32(sc[x + _H]) * np.float32(b >> np.uint8(4))
            acc += qh[x] * lo + qh[x + _H] * hi
    return acc


@nb.njit(fastmath=True, inline="always")
def value_axpy(pool, slot, g, r, a, acc, bits):  # pragma: no cover - compiled
    """acc += a * value row r: its codes times its own scale (+ its minimum, q4); the weight ``a`` is folded
    into the scale once per row."""
    rec, C = _record(pool, slot, g)
    d = acc.shape[0]
    cb = d * bits // 8
    s = a * _half_bits_to_f32(nb.carray(_ptr(rec + C * cb + 2 * r, np.int16), 1)[0])
    if bits == 8:
        codes = nb.carray(_ptr(rec + r * cb, np.int8), d)
        for x in range(d):
            acc[x] += s * np.float32(codes[x])
        return
    m = a * _half_bits_to_f32(nb.carray(_ptr(rec + C * cb + 2 * C + 2 * r, np.int16), 1)[0])
    codes = nb.carray(_ptr(rec + r * cb, np.uint8), cb)
    for xg in range(d // GROUP):
        for i in range(_H):
            b = codes[xg * _H + i]
            x = xg * GROUP + i
            acc[x] += m + s * np.float32(b & np.uint8(15))
            acc[x + _H] += m + s * np.float32(b >> np.uint8(4))


@nb.njit(inline="always")
def _lines(addr, n):  # pragma: no cover - compiled
    """Prefetch every cache line of the n bytes at ``addr``."""
    for a in range(addr - addr % 64, addr + n, 64):
        _prefetch_at(a)


@nb.njit(inline="always")
def prefetch_key(pool, slot, g, r, d, bits):  # pragma: no cover - compiled
    """Ask for a key row's codes and its group's scale (and minimum) rows ahead of :func:`key_dot`."""
    rec, C = _record(pool, slot, g)
    cb = d * bits // 8
    grp = r // GROUP
    _lines(rec + r * cb, cb)
    _lines(rec + C * cb + grp * d * 2, 2 * d)
    if bits == 4:
        _lines(rec + C * cb + (C // GROUP) * d * 2 + grp * d * 2, 2 * d)


@nb.njit(inline="always")
def prefetch_value(pool, slot, g, r, d, bits):  # pragma: no cover - compiled
    """Ask for a value row's codes and its scale (and minimum) ahead of :func:`value_axpy`."""
    rec, C = _record(pool, slot, g)
    cb = d * bits // 8
    _lines(rec + r * cb, cb)
    _lines(rec + C * cb + 2 * r, 2)
    if bits == 4:
        _lines(rec + C * cb + 2 * C + 2 * r, 2)
