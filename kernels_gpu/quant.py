"""Block-quantized weights on the compute device: dequantize with torch ops, then matmul.

The quantized bytes are what cross PCIe (4-8x fewer than bf16); each linear dequantizes its
matrix on the device into the compute dtype and runs ``F.linear``. Plain torch ops, so the
same code runs (and is tested bit for bit against gguf-py) on the CPU. Formats and layouts:
storage.formats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from storage.formats import QTensor

_F32 = torch.float32
BLOCK_ELEMENTS = 1 << 24  # weights dequantized at a time by linear (64 MiB in float32)
# device scratch of one linear at most: the block in float32, its nibbles/intermediates and the cast
SCRATCH_BYTES = 4 * 4 * BLOCK_ELEMENTS


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 (little-endian f16 bits) -> [...] float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(_F32)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """[nb, m] bytes -> [nb, 2m] nibbles: per run of ``run`` bytes, its low nibbles then its high ones."""
    nb, m = qs.shape
    q = qs.view(nb, m // run, 1, run)
    return torch.cat((q & 0x0F, q >> 4), dim=2).reshape(nb, 2 * m)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> ([nb, 8], [nb, 8]) as float32."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc.to(_F32), mn.to(_F32)


def _q4_0(b):
    d = _f16(b[:, 0:2].reshape(-1, 1, 2))
    return d * (_nibbles(b[:, 2:], 16).to(torch.int8) - 8).to(_F32)


def _q4_1(b):
    d, m = _f16(b[:, 0:2].reshape(-1, 1, 2)), _f16(b[:, 2:4].reshape(-1, 1, 2))
    return d * _nibbles(b[:, 4:], 16).to(_F32) + m


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).to(_F32) * _f16(b[:, 0:2].reshape(-1, 1, 2))


def _q4_k(b):
    nb = b.shape[0]
    d, dmin = _f16(b[:, 0:2].reshape(-1, 1, 2)), _f16(b[:, 2:4].reshape(-1, 1, 2))
    sc, mn = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 16:144], 32).to(_F32).view(nb, 8, 32)
    return ((d * sc).view(nb, 8, 1) * q - (dmin * mn).view(nb, 8, 1)).view(nb, 256)


def _q5_k(b):
    nb = b.shape[0]
    d, dmin = _f16(b[:, 0:2].reshape(-1, 1, 2)), _f16(b[:, 2:4].reshape(-1, 1, 2))
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48].reshape(nb, 1, 32)
    hi = torch.cat([(qh >> i) & 1 for i in range(8)], dim=1)  # [nb, 8, 32]: bit i of each byte -> sub-block i
    q = (_nibbles(b[:, 48:176], 32).view(nb, 8, 32) | (hi << 4)).to(_F32)
    return ((d * sc).view(nb, 8, 1) * q - (dmin * mn).view(nb, 8, 1)).view(nb, 256)


def _q6_k(b):
    nb = b.shape[0]
    ql = _nibbles(b[:, 0:128], 64).view(nb, 8, 32)  # per 64 bytes: 64 low nibbles, then 64 high ones
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)
    hi = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).view(nb, 8, 32)
    q = ((ql | (hi << 4)).to(torch.int8) - 32).to(_F32).view(nb, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).to(_F32)
    d = (_f16(b[:, 208:210].reshape(-1, 1, 2)) * scales).view(nb, 16, 1)
    return (d * q).view(nb, 256)


_DEQUANT = {"q4_0": _q4_0, "q4_1": _q4_1, "q8_0": _q8_0, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}


def dequantize(w: QTensor, dtype: torch.dtype = _F32) -> torch.Tensor:
    """The values of ``w`` as a ``dtype`` tensor of its logical shape, on its device (float32 math,
    bit-identical to gguf-py's dequantize before the final cast)."""
    f = w.fmt
    blocks = w.data.reshape(-1, f.block_bytes)
    out = _DEQUANT[f.name](blocks).reshape(w.shape)
    return out if dtype == _F32 else out.to(dtype)


def linear(x: torch.Tensor, w: QTensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a quantized weight, dequantized on its device into ``x``'s dtype a block of rows
    at a time (scratch bounded by :data:`SCRATCH_BYTES`, whatever the matrix)."""
    n, k = w.shape
    rows = max(1, BLOCK_ELEMENTS // k)
    if rows >= n:
        return F.linear(x, dequantize(w, x.dtype), b)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    for r in range(0, n, rows):
        part = QTensor(w.data[r:r + rows], w.fmt, (min(rows, n - r), k))
        out[..., r:r + rows] = F.linear(x, dequantize(part, x.dtype), None if b is None else b[r:r + rows])
    return out


def embedding(ids: torch.Tensor, w: QTensor, dtype: torch.dtype = _F32) -> torch.Tensor:
    """Rows ``ids`` of a quantized table: only those rows are dequantized."""
    rows = w.data.index_select(0, ids.to(w.data.device))
    return dequantize(QTensor(rows, w.fmt, (rows.shape[0], *w.shape[1:])), dtype)
