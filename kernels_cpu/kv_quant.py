"""Quantized KV chunks (``--kv-dtype q8|q4``): the chunk layout, quantize and dequantize (torch).

A closed KV chunk (``C`` tokens of one layer) is stored as two byte records, K's and V's, each
``[nkv, C, w]`` uint8 (``w`` = :meth:`KVQuant.row_bytes`: the shape the chunk pools and the disk
store keep, one record per KV head of ``C * w`` bytes). Per KV head the record holds

* the codes ``[C, d * bits / 8]``: q8 one int8 per element; q4 two per byte, within each 32 channels
  byte i holding channel i (low nibble) and channel i + 16 (high nibble), so that a kernel widens a
  byte's two halves into two runs of 16 consecutive channels;
* then the scales, float16 bits (int16); for q4 then the minimums (float16 bits):
  keys per channel over groups of ``GROUP`` tokens (``[C / GROUP, d]``, KIVI: keys have outlier
  channels, so a channel's scale is shared along tokens); values per token over the head dim
  (``[C]``: one scale per token, so that a kernel folds it into the token's softmax weight);
* K's record and V's have the same row width ``w`` (the wider one's; V's last bytes are unused).

q8 is symmetric (``x = s * c``, c in [-127, 127]); q4 asymmetric (``x = m + s * c``, c in [0, 15]).
The scale is rounded *up* to float16 (the minimum *down*) before the codes are computed from it, so
no code clips and the error is at most half a step. Quantizing what :func:`dequantize` returns gives the
same record back (float16 scales: the largest code is always the top one), so a chunk re-opened by a
rollback is re-closed to the bytes it had (the prefix cache keeps and restores the records themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # tokens per key scale (per channel); q4 packs codes per this many channels
FLOAT_KV = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
QUANT_KV = {"q8": 8, "q4": 4}
_EPS = 2.0 ** -20  # relative slack when rounding a scale up (see _round_up)


@dataclass(frozen=True)
class KVQuant:
    """One quantized KV format for a head dimension and chunk length."""

    name: str  # "q8" | "q4"
    head_dim: int
    chunk_tokens: int

    def __post_init__(self):
        if self.name not in QUANT_KV:
            raise ValueError(f"KV quantization {self.name!r}: one of {', '.join(QUANT_KV)}")
        if self.head_dim % GROUP or self.chunk_tokens % GROUP:
            raise ValueError(f"--kv-dtype {self.name} needs a head dim and chunk length that are multiples of "
                             f"{GROUP} (head dim {self.head_dim}, chunk {self.chunk_tokens})")

    @property
    def bits(self) -> int:
        return QUANT_KV[self.name]

    @property
    def asymmetric(self) -> bool:
        return self.bits == 4

    @property
    def code_bytes(self) -> int:
        """Bytes of one token's codes of one KV head."""
        return self.head_dim * self.bits // 8

    @property
    def params(self) -> int:
        """Scales (= minimums, q4) of one KV head's K in a chunk (V has ``chunk_tokens``)."""
        return self.chunk_tokens * self.head_dim // GROUP

    def row_bytes(self) -> int:
        """Bytes per token per KV head of K and of V: the record's last dimension."""
        per = 2 * (2 if self.asymmetric else 1)  # float16 scale (and minimum)
        return self.code_bytes + -(-max(self.params, self.chunk_tokens) * per // self.chunk_tokens)

    def record_shape(self, kv_heads: int) -> tuple[int, int, int]:
        return kv_heads, self.chunk_tokens, self.row_bytes()

    # ------------------------------------------------------------------ quantize
    def quantize(self, k: torch.Tensor, v: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """K and V of a whole chunk, [nkv, C, d] (any float dtype), into records ``k_out``, ``v_out``
        ([nkv, C, w] uint8)."""
        nkv, C, d = k.shape
        kf = k.to(torch.float32).view(nkv, C // GROUP, GROUP, d)
        codes, s, m = self._codes(kf, dim=2)  # keys: per channel over a group of tokens
        self._pack(k_out, codes.view(nkv, C, d), s.view(nkv, C // GROUP * d), m)
        vf = v.to(torch.float32)
        codes, s, m = self._codes(vf, dim=2)  # values: per token over the head dim
        self._pack(v_out, codes.view(nkv, C, d), s.view(nkv, C), m)

    def _codes(self, x: torch.Tensor, dim: int):
        if self.asymmetric:
            lo = _round_down(x.amin(dim, keepdim=True))
            s = _round_up((x.amax(dim, keepdim=True) - lo) / 15)
            inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            codes = torch.round((x - lo) * inv).clamp_(0, 15).to(torch.uint8)
            return codes, s, lo
        s = _round_up(x.abs().amax(dim, keepdim=True) / 127)
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        return torch.round(x * inv).clamp_(-127, 127).to(torch.int8), s, None

    def _pack(self, out: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> None:
        nkv, C, _w = out.shape
        flat = out.view(nkv, -1)
        cb = C * self.code_bytes
        if self.bits == 8:
            flat[:, :cb] = codes.view(torch.uint8).reshape(nkv, cb)
        else:
            c = codes.view(nkv, C, -1, 2, GROUP // 2)  # per 32 channels: low 16, high 16
            flat[:, :cb] = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(nkv, cb)
        n = s.shape[1] * 2
        flat[:, cb:cb + n] = s.reshape(nkv, -1).to(torch.float16).view(torch.uint8).view(nkv, n)
        if m is not None:
            flat[:, cb + n:cb + 2 * n] = m.reshape(nkv, -1).to(torch.float16).view(torch.uint8).view(nkv, n)
        flat[:, cb + n * (2 if m is not None else 1):] = 0  # the narrower record's padding: defined bytes

    # ------------------------------------------------------------------ dequantize
    def _unpack(self, rec: torch.Tensor, n: int):
        """(codes [nkv, C, d] float32, the ``n`` scales and minimums (or None) as float32 [nkv, n])."""
        nkv, C, _w = rec.shape
        d = self.head_dim
        flat = rec.reshape(nkv, -1)
        cb = C * self.code_bytes
        raw = flat[:, :cb]
        if self.bits == 8:
            codes = raw.view(torch.int8).to(torch.float32).view(nkv, C, d)
        else:
            b = raw.view(nkv, C, d // GROUP, GROUP // 2)
            codes = torch.stack([b & 15, b >> 4], dim=3).to(torch.float32).view(nkv, C, d)
        n *= 2
        s = flat[:, cb:cb + n].contiguous().view(torch.float16).to(torch.float32)
        m = flat[:, cb + n:cb + 2 * n].contiguous().view(torch.float16).to(torch.float32) if self.asymmetric else None
        return codes, s, m

    def dequantize_keys(self, rec: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A K record [nkv, C, w] as [nkv, C, d] floats."""
        nkv, C, _w = rec.shape
        codes, s, m = self._unpack(rec, self.params)
        shape = (nkv, C // GROUP, 1, self.head_dim)
        x = codes.view(nkv, C // GROUP, GROUP, self.head_dim) * s.view(shape)
        if m is not None:
            x = x + m.view(shape)
        return x.view(nkv, C, self.head_dim).to(dtype)

    def dequantize_values(self, rec: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A V record [nkv, C, w] as [nkv, C, d] floats."""
        nkv, C, _w = rec.shape
        codes, s, m = self._unpack(rec, C)
        x = codes * s.view(nkv, C, 1)
        if m is not None:
            x = x + m.view(nkv, C, 1)
        return x.to(dtype)

    def step_bound(self, rec: torch.Tensor, keys: bool) -> torch.Tensor:
        """Half a quantization step per element of a record ([nkv, C, d] float32): the largest error
        quantizing may have left there (a test's and a reader's bound)."""
        nkv, C, _w = rec.shape
        if keys:
            s = self._unpack(rec, self.params)[1]
            return (s.view(nkv, C // GROUP, 1, self.head_dim) / 2).expand(-1, -1, GROUP, -1).reshape(nkv, C, -1)
        s = self._unpack(rec, C)[1]
        return (s.view(nkv, C, 1) / 2).expand(-1, -1, self.head_dim)


def _round_up(x: torch.Tensor) -> torch.Tensor:
    """x (>= 0) to a float16 at or above it (back as float32); values within _EPS of a float16 round to it,
    so that the scale of a dequantized group is found again (the division may land a hair above it)."""
    y = (x * (1 - _EPS)).to(torch.float16)
    return torch.where(y.to(torch.float32) < x * (1 - _EPS), torch.nextafter(y, torch.full_like(y, torch.inf)),
                       y).to(torch.float32)


def _round_down(x: torch.Tensor) -> torch.Tensor:
    """x to the float16 at or below it (back as float32)."""
    y = x.to(torch.float16)
    return torch.where(y.to(torch.float32) > x, torch.nextafter(y, torch.full_like(y, -torch.inf)),
                       y).to(torch.float32)


def parse(name: str | None, compute: torch.dtype, head_dim: int, chunk_tokens: int
          ) -> tuple[torch.dtype, KVQuant | None]:
    """``--kv-dtype``: (the float dtype the KV's open chunk and float pools hold, the quantization or None).
    None: the compute dtype, as before the option."""
    if name is None:
        return compute, None
    if name in FLOAT_KV:
        return FLOAT_KV[name], None
    return compute, KVQuant(name, head_dim, chunk_tokens)
