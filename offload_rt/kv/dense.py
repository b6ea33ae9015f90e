"""DenseKV: every layer's K/V in one buffer on one device, attention with torch there.

The implementation for a KV cache that lives on the compute device (a GPU with room for
it), and the reference the chunked, tiered cache is tested against. The buffers hold the
whole context window from the first write: the plan budgets exactly that, and growing by
copy would hold two caches at once. On the CPU the memory is only touched as tokens
arrive. When the buffers live elsewhere than compute (``compute_device``), a layer's
keys and values are copied to the compute device per call (correct, not fast: tests only;
runs put a host KV in :class:`~offload_rt.kv.tiered.TieredKV`).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from offload_rt.kv import bytes_per_token, check_keep, check_load


def attention_mask(start: int, q_len: int, kv_len: int, window: int | None, tree_mask: torch.Tensor | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Boolean mask [q_len, kv_len] (True = attend) for queries at indices start..start+q_len.

    Causal among the new tokens, or ``tree_mask`` [q_len, S] (S >= q_len) over the last S keys when
    given (the keys before them are visible to all); ``window``
    (sliding-window layers) hides keys ``window`` or more indices behind the query.
    """
    if q_len == 1 and tree_mask is None and (window is None or kv_len <= window):
        return None
    qpos = torch.arange(start, start + q_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = kpos <= qpos
    if tree_mask is not None:
        mask[:, kv_len - tree_mask.shape[1]:] = tree_mask.to(device=device, dtype=torch.bool)
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None) -> torch.Tensor:
    """One query position. q [heads, d]; keys/values [kv_heads, L, d] -> [1, heads*d].

    GQA without expanding K/V: the query heads sharing a KV head are batched together
    (two bmm calls), softmax in float32 as in Hugging Face's eager attention.

    bfloat16/float16 K/V are widened to float32 on the CPU: torch's half-precision CPU bmm
    goes through oneDNN, which JIT-compiles a kernel for every new shape and never frees it
    (RSS grew by ~1 MB per generated token).
    """
    nh, d = q.shape
    nkv = keys.shape[0]
    if window is not None and keys.shape[1] > window:
        keys, values = keys[:, -window:], values[:, -window:]
    out_dtype = q.dtype
    if q.dtype != torch.float32 and q.device.type == "cpu":
        q, keys, values = q.float(), keys.float(), values.float()
    qg = q.reshape(nkv, nh // nkv, d)
    scores = torch.bmm(qg, keys.transpose(1, 2)) * (d ** -0.5)
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.bmm(p, values).reshape(1, nh * d).to(out_dtype)


class DenseKV:
    """Per-layer K/V buffers ``[kv_heads, max_tokens, head_dim]`` on ``device``; attention on ``compute_device``."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_tokens: int, device: str | torch.device = "cpu", compute_device: str | torch.device | None = None):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype, self.device, self.max_tokens = dtype, torch.device(device), max_tokens
        self.compute_device = torch.device(compute_device) if compute_device is not None else self.device
        self.offset = 0  # tokens committed
        self.attention_s = 0.0
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []

    def _allocate(self) -> None:
        shape = (self.kv_heads, self.max_tokens, self.head_dim)
        self._k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self._v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([T, kv_heads, d]) at ``offset``; return keys/values [kv_heads, offset+T, d] on compute."""
        end = self.offset + k.shape[0]
        if end > self.max_tokens:
            raise ValueError(f"KV cache of {self.max_tokens} tokens cannot hold {end}")
        if not self._k:
            self._allocate()
        kb, vb = self._k[layer], self._v[layer]
        kb[:, self.offset:end] = k.transpose(0, 1)
        vb[:, self.offset:end] = v.transpose(0, 1)
        if self.device != self.compute_device:
            return kb[:, :end].to(self.compute_device), vb[:, :end].to(self.compute_device)
        return kb[:, :end], vb[:, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        T, nh, d = q.shape
        keys, values = self.store(layer, k, v)
        if T == 1 and tree_mask is None:
            o = decode_attention(q[0], keys, values, window)
        else:
            mask = attention_mask(self.offset, T, keys.shape[1], window, tree_mask, q.device)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask,
                                               enable_gqa=nh != keys.shape[0])
            o = o.transpose(0, 1).reshape(T, nh * d)
        self.attention_s += time.perf_counter() - t0
        return o

    def commit(self, n: int) -> None:
        """Advance ``offset`` after every layer has stored n new tokens."""
        self.offset += n

    def trim(self, n: int) -> int:
        """Drop the last n committed tokens. Returns how many."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def keep(self, start: int, rows: Sequence[int]) -> None:
        rows = check_keep(self.offset, start, rows)
        if self._k and rows:
            idx = torch.tensor(rows, device=self.device) + start
            for buf in self._k + self._v:
                buf[:, start:start + len(rows)] = buf[:, idx]
        self.offset = start + len(rows)

    def rows(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Committed tokens [lo, hi) of a layer as (k, v) copies [hi - lo, kv_heads, d] (tests compare caches)."""
        if not 0 <= lo <= hi <= self.offset:
            raise ValueError(f"rows({lo}, {hi}) outside the {self.offset} committed tokens")
        if not self._k:
            return (torch.empty(0, self.kv_heads, self.head_dim, dtype=self.dtype),) * 2
        return (self._k[layer][:, lo:hi].transpose(0, 1).clone(), self._v[layer][:, lo:hi].transpose(0, 1).clone())

    def load(self, k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]) -> None:
        """Append T tokens' K/V of every layer ([T, kv_heads, d] each) at ``offset`` and commit them."""
        T = check_load(self, k_layers, v_layers)
        for layer, (k, v) in enumerate(zip(k_layers, v_layers)):
            self.store(layer, k.to(self.device), v.to(self.device))
        self.commit(T)

    def reset(self) -> None:
        self.offset = 0

    def tier_bytes(self) -> dict[str, int]:
        tier = "device" if self.device.type != "cpu" else "host"
        return {tier: self.nbytes}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    @staticmethod
    def bytes_per_token(n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return bytes_per_token(n_layers, kv_heads, head_dim, dtype)
