"""Which spilled KV chunks a decode step reads (no torch): per-chunk key bounds and the selection policy.

Exact attention over a KV cache spilled to disk re-reads every spilled chunk at every decode step
(the disk is then the step's cost: issue 22, docs/BENCHMARKS.md "Long context end to end"). Most of
those chunks carry almost none of the softmax's weight. Following Quest (Tang et al., ICML 2024),
each chunk written to disk leaves a small *abstract* in RAM that bounds what any query can score
against it, and a decode step reads only the chunks whose bound says they may matter.

The abstract: for each KV head and channel, the min and the max of the chunk's keys (``[kv_heads, d]``
twice, float32: 1/128 of a float32 chunk of 256 tokens, 1/64 of a bfloat16 one). For a query q the
score of any key k of the chunk is bounded by ``sum_c max(q_c * min_c, q_c * max_c)`` (each term
bounds ``q_c * k_c``). It is an *upper* bound, which is what skipping needs: a chunk whose bound lies
far below the scores already seen can only carry little weight, however its keys fall. The mean key
(a cheaper abstract, one vector instead of two) estimates a typical score but bounds nothing: one key
far from the mean, the passkey's, is exactly what it hides. Quest bounds pages of 16 tokens; bounds
per page of 32 tokens inside our 256-token chunks (the chunk's bound: its pages' largest) took 8x
the RAM and ranked no better on the default model's keys (the needle's chunk among the chosen quarter
in 73 % of layer-steps against 83 %; 3 passkey prompts at ~6k tokens, 30 layers, 7 steps each), and
a chunk is read whole anyway.

The policy (:func:`choose`). The step first scores its query against the first tokens (the
attention sinks, always in RAM) and its own key: their log-sum-exp ``ref`` per query head
(:func:`reference`) is a lower bound of the whole softmax's, known before anything is read, so the
chosen chunks are read while the RAM chunks compute. If every key of the skipped chunks scores below
``ref - log(N) - margin`` (N: the layer's disk keys), their weights ``exp(s)`` sum to less than
``N * exp(ref - log(N) - margin) = exp(ref - margin)``: at most ``exp(-margin)`` of the softmax's
total (~4.5e-5 at 10 nats). So a chunk is needed when, for some query head, its bound is above that
line; the needed ones are read highest ``bound - ref`` first (over the query heads, GQA groups
included), up to a budget of chunks per layer and step (:func:`budget`: a share of the layer's disk
chunks, ``--kv-select-share``). Within the budget the step is exact to that margin; past it,
approximate, which the share trades for disk bytes. On the default model at ~6k tokens the bounds of
256-token chunks are loose (no chunk fell below the line), so the budget decides, as in Quest;
ranking against the log-sum-exp of all the RAM chunks instead of the sinks' chose no better
(the same 3 prompts).
"""

from __future__ import annotations

import math

import numpy as np

from offload_rt.config import KV_SELECT_SHARE as DEFAULT_SHARE  # at most this share of a layer's disk chunks a step

MARGIN_NATS = 10.0  # what the skipped chunks may carry at most, in total: exp(-10) of the softmax's weight
GAP_BYTES = 256 << 10  # a gap of disk chunks up to this many bytes between two chosen ones is read through


def abstract_bytes(kv_heads: int, head_dim: int) -> int:
    """RAM one chunk's abstract takes: min and max per KV head and channel, float32."""
    return 2 * kv_heads * head_dim * 4


def key_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) [kv_heads, d] float32 of a chunk's keys [kv_heads, C, d]."""
    return keys.min(axis=1).astype(np.float32), keys.max(axis=1).astype(np.float32)


def score_bounds(q: np.ndarray, kmin: np.ndarray, kmax: np.ndarray) -> np.ndarray:
    """Upper bounds [n, nh] of ``q[h] . k`` over the keys of each of n chunks, given q [nh, d] (scaled as
    the scores are) and the chunks' abstracts kmin, kmax [n, kv_heads, d]; query head h reads KV head
    ``h // (nh // kv_heads)``. float64: every product of two float32 is exact there, so the bound holds
    against the scores however the kernel rounds them (to ~1e-7 of their size)."""
    n, nkv, d = kmin.shape
    nh = q.shape[0]
    qg = q.astype(np.float64).reshape(nkv, nh // nkv, d)
    pos, neg = np.maximum(qg, 0.0), np.minimum(qg, 0.0)
    # sum_c q_c * (max_c if q_c > 0 else min_c)
    return (np.einsum("kgd,nkd->nkg", pos, kmax) + np.einsum("kgd,nkd->nkg", neg, kmin)).reshape(n, nh)


def reference(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """log-sum-exp [nh] of the scores of q [nh, d] (scaled) with some keys [kv_heads, m, d] (query head h with
    KV head ``h // (nh // kv_heads)``): a lower bound of the whole softmax's, whatever other keys there are."""
    nkv, _m, d = keys.shape
    nh = q.shape[0]
    s = np.einsum("kgd,kmd->kgm", q.astype(np.float64).reshape(nkv, nh // nkv, d), keys.astype(np.float64))
    top = s.max(axis=2, keepdims=True)
    return (top[..., 0] + np.log(np.exp(s - top).sum(axis=2))).reshape(nh)


def budget(disk_chunks: int, share: float) -> int:
    """Disk chunks a layer may read per step: ``share`` of them, at least one (all of them at share 1)."""
    if disk_chunks <= 0:
        return 0
    return min(disk_chunks, max(1, int(share * disk_chunks + 1e-9)))


def choose(bounds: np.ndarray, ref: np.ndarray, disk_keys: int, limit: int,
           margin: float = MARGIN_NATS) -> np.ndarray:
    """Indices (sorted) of the chunks to read, given their score bounds [n, nh], the log-sum-exp ``ref``
    [nh] of the scores already computed (-inf: none), the disk keys in all (N) and the most to read.

    A chunk is needed when, for some query head, its bound exceeds ``ref - log(N) - margin``; of the
    needed ones the ``limit`` with the largest ``bound - ref`` are read (ties: the older chunk)."""
    n = bounds.shape[0]
    if n == 0 or limit <= 0:
        return np.zeros(0, dtype=np.int64)
    excess = (bounds - np.asarray(ref, dtype=np.float64)[None, :]).max(axis=1)  # ref -inf: +inf, all may matter
    need = np.flatnonzero(excess > -(math.log(max(disk_keys, 1)) + margin))
    if need.size > limit:
        need = need[np.argsort(-excess[need], kind="stable")[:limit]]
    return np.sort(need)


def coalesce(chosen: list[int], on_disk: set[int], gap: int) -> list[int]:
    """The chunks to read for the ``chosen`` ones (sorted): each gap of at most ``gap`` chunks, all on disk,
    between two chosen chunks is read too, so that the two are one request (a layer's chunks lie one after the
    other in its file, storage.kv_store). A request costs the disk's latency whatever its size: small chunks
    (q4 records of a small model: 54 KiB, ~40 us of transfer each here) are cheaper read through than asked
    for apart; the chunks read through are not attended (``gap`` from :data:`GAP_BYTES`: 4 q4 chunks of the
    default model, none of its float32 ones)."""
    out: list[int] = []
    for c in chosen:
        if out and 0 < c - out[-1] - 1 <= gap and all(g in on_disk for g in range(out[-1] + 1, c)):
            out.extend(range(out[-1] + 1, c))
        out.append(c)
    return out
