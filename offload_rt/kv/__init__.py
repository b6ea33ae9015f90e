"""The KV cache: one protocol, several implementations, attention computed where the KV lives.

A model never receives the keys and values of the whole context. Each decoder layer hands
the cache this step's ``q, k, v`` and gets the attention output back::

    o = cache.attend(layer, q, k, v, window=args.window(layer), tree_mask=None)
        # q [T, heads, d], k/v [T, kv_heads, d] (after RoPE) -> o [T, heads * d]

The cache stores k/v at ``offset .. offset+T`` for that layer and decides where and how
attention runs: :class:`~offload_rt.kv.dense.DenseKV` keeps one buffer per layer on the
compute device (torch SDPA; the KV beside a GPU, and the reference the others are tested
against); :class:`~offload_rt.kv.tiered.TieredKV` keeps fixed-size chunks in host RAM and
spills them to a zarr store on disk, and runs the Numba kernels (exact, or MagicPIG
sampling for the long tail) on the CPU where the chunks are.

Bookkeeping shared by every implementation:

* ``commit(n)`` after every layer stored n new tokens (advances ``offset``);
* ``trim(n)`` drops the last n committed tokens (REPL edits, speculation rollback);
* ``keep(start, rows)`` keeps, of the tokens from ``start`` on, only those at offsets ``rows``
  (sorted), packed from ``start`` (speculation keeps the accepted path of a tree);
* ``tree_mask`` [T, S] (bool, True = attend, T <= S <= offset + T) replaces the causal mask over the
  last S keys: the S - T cached tokens before the new ones and the T new ones (every key before those
  is visible to all): tree verification (S = T), and a draft expanding a tree it has partly cached;
* ``expect(end)`` (optional; :func:`expect_prompt` calls it when a cache has it: ``Engine.prefill`` and the
  server's batch loop, for each sequence before its prompt passes): a prompt is about to run in passes up
  to ``end`` tokens (TieredKV builds MagicPIG's tables in the pass that reaches it);
* ``tier_bytes()``: KV bytes held per tier; ``attention_s``: seconds spent in attention;
* ``rows(layer, lo, hi)`` -> ``(k, v)``, copies [hi - lo, kv_heads, d] of committed tokens [lo, hi)
  wherever they live (tests compare a cache with an autoregressive run's, value by value; the prefix
  cache, :mod:`offload_rt.kv.prefix`, saves a prompt's chunks with it);
* ``load(k_layers, v_layers)`` appends T tokens' K/V of every layer (``k_layers[i]`` [T, kv_heads, d] in
  the cache's dtype) at ``offset`` and commits them: the prefix cache restores a saved prefix with it,
  through the same write path as attention's, so the rows land exactly as if computed here. A quantized
  TieredKV (``--kv-dtype q8|q4``) also has ``records(layer, chunk)`` and ``load_records(k, v)``: closed
  chunks' records out and in, what the prefix cache saves and restores for it (the KV's own bytes).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class KVCache(Protocol):
    offset: int  # tokens committed
    max_tokens: int
    attention_s: float

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               tree_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def commit(self, n: int) -> None: ...

    def trim(self, n: int) -> int: ...

    def keep(self, start: int, rows: Sequence[int]) -> None: ...

    def reset(self) -> None: ...

    def tier_bytes(self) -> dict[str, int]: ...

    def rows(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def load(self, k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]) -> None: ...


def expect_prompt(cache, end: int) -> None:
    """Tell ``cache`` that a prompt is about to run in passes up to ``end`` tokens (after what it holds or
    restores: a prefix the prefix cache loaded counts), when the cache takes the hint (``expect``): without
    it TieredKV's MagicPIG tables are built by the first pass long enough and extended by every later one,
    centred on that first pass's keys rather than the whole prompt's."""
    expect = getattr(cache, "expect", None)
    if expect is not None:
        expect(end)


def bytes_per_token(n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token across every layer."""
    return 2 * n_layers * kv_heads * head_dim * dtype.itemsize


def check_keep(offset: int, start: int, rows: Sequence[int]) -> list[int]:
    """Validate ``keep``'s arguments (sorted, unique, within the committed tokens); returns the rows."""
    rows = [int(r) for r in rows]
    if not 0 <= start <= offset or any(b <= a for a, b in zip(rows, rows[1:])) or \
            (rows and (rows[0] < 0 or start + rows[-1] >= offset)):
        raise ValueError(f"keep({start}, {rows[:8]}...) is not a sorted subset of the {offset - start} tokens "
                         f"after {start}")
    return rows


def check_load(cache, k_layers: Sequence[torch.Tensor], v_layers: Sequence[torch.Tensor]) -> int:
    """Validate ``load``'s arguments against ``cache`` (one [T, kv_heads, d] tensor per layer, K and V alike, in
    the cache's dtype, room left in the window); returns T."""
    if len(k_layers) != cache.n_layers or len(v_layers) != cache.n_layers:
        raise ValueError(f"load: {cache.n_layers} layers expected, got {len(k_layers)} K and {len(v_layers)} V")
    T = k_layers[0].shape[0] if cache.n_layers else 0
    want = (T, cache.kv_heads, cache.head_dim)
    for t in (*k_layers, *v_layers):
        if tuple(t.shape) != want or t.dtype != cache.dtype:
            raise ValueError(f"load: rows {tuple(t.shape)} {t.dtype}, expected {want} {cache.dtype}")
    if cache.offset + T > cache.max_tokens:
        raise ValueError(f"KV cache of {cache.max_tokens} tokens cannot hold {cache.offset + T}")
    return T
