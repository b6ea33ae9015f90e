"""MagicPIG (kernels_cpu.magicpig): collision formula vs Monte Carlo, retrieval vs brute force, the
estimator vs exact attention (float64 torch reference), and the index's bookkeeping. Fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels_cpu import magicpig as mp
from kernels_cpu.attention import merge


# ---------------------------------------------------------------------------------------------
# helpers: token-major KV [nkv, n, d] <-> chunk pools [P, nkv, C, d] with shuffled slots

def to_pool(x: torch.Tensor, C: int, slots: torch.Tensor) -> torch.Tensor:
    nkv, n, d = x.shape
    P = slots.numel()
    pad = torch.zeros(nkv, P * C, d, dtype=x.dtype)
    pad[:, :n] = x
    pool = torch.zeros(int(slots.max()) + 1, nkv, C, d, dtype=x.dtype)
    pool[slots.long()] = pad.view(nkv, P, C, d).transpose(0, 1)
    return pool


def make_pools(k: torch.Tensor, v: torch.Tensor, C: int, g: torch.Generator, dtype=torch.float32):
    P = -(-k.shape[1] // C) + 1  # one spare slot: slots need not be 0..P-1 in order
    slots = torch.randperm(P, generator=g)[:P - 1].to(torch.int32)
    return to_pool(k.to(dtype), C, slots), to_pool(v.to(dtype), C, slots), slots


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens=None, scale=None):
    """float64 softmax attention of q [nh, d] over k/v [nkv, n, d] (GQA), restricted to ``tokens``;
    (out [nh, d], natural lse [nh])."""
    nh, d = q.shape
    G = nh // k.shape[0]
    if tokens is not None:
        k, v = k[:, tokens], v[:, tokens]
    kk, vv = k.double().repeat_interleave(G, 0), v.double().repeat_interleave(G, 0)
    lg = torch.einsum("hd,hnd->hn", q.double(), kk) * (d ** -0.5 if scale is None else scale)
    return torch.einsum("hn,hnd->hd", torch.softmax(lg, -1), vv), torch.logsumexp(lg, -1)


def with_exact_part(q, k, v, kpool, vpool, slots, index, sinks: int, window: int, **kw):
    """What the cache returns: exact over the sinks and the window, sampled over the index, merged."""
    n = k.shape[1]
    o1, l1 = exact(q, k, v, torch.cat([torch.arange(sinks), torch.arange(n - window, n)]))
    o2, l2 = mp.attend_sampled(q, kpool, vpool, slots, index, **kw)
    return merge(o1.float(), l1.float(), o2, l2)


def clustered_keys(nkv: int, n: int, d: int, g: torch.Generator, offset: float = 3.0) -> torch.Tensor:
    """Keys like a model's: a shared offset, topic clusters in runs of 16 tokens, noise."""
    centres = torch.randn(nkv, 16, d, generator=g)
    runs = torch.randint(0, 16, (nkv, -(-n // 16)), generator=g).repeat_interleave(16, 1)[:, :n]
    return (offset * torch.randn(nkv, 1, d, generator=g) + torch.gather(centres, 1, runs[..., None].expand(-1, -1, d))
            + 0.5 * torch.randn(nkv, n, d, generator=g)), centres


def brute_force_sets(q, k, index: mp.LSHIndex, tokens: np.ndarray, mean: np.ndarray):
    """{i : #tables where the centered key's code equals the query's >= 2} per query head, from
    float64 codes; also the tokens whose hash has a projection too close to 0 to call (excluded)."""
    R = index.R.double().numpy()  # [d, K*L]
    K, L = index.K, index.L
    nh = q.shape[0]
    G = nh // index.nkv
    kc = k[:, tokens].double().numpy() - mean[:, None, :].astype(np.float64)
    pk = kc @ R  # [nkv, n, K*L]
    pq = q.double().numpy() @ R  # [nh, K*L]
    assert np.abs(pq).min() > 1e-4 * np.linalg.norm(q.numpy(), axis=1).min(), "query projection too close to 0"
    w = 1 << np.arange(K)
    ck = ((pk > 0).reshape(*pk.shape[:2], L, K) * w).sum(-1)  # [nkv, n, L]
    cq = ((pq > 0).reshape(nh, L, K) * w).sum(-1)  # [nh, L]
    unsure = (np.abs(pk) < 1e-5 * np.linalg.norm(kc, axis=-1, keepdims=True)).any(-1)  # [nkv, n]
    sets = []
    for h in range(nh):
        hits = (ck[h // G] == cq[h][None, :]).sum(-1)
        sets.append((set(tokens[hits >= 2].tolist()), set(tokens[unsure[h // G]].tolist())))
    return sets


# ---------------------------------------------------------------------------------------------

def test_collision_probability_matches_monte_carlo():
    """Fresh Gaussian hyperplanes per trial: the single-table collision rate is (1 - theta/pi)^K and
    the >= 2-of-L rate is u, within 4.5 standard errors."""
    rng = np.random.default_rng(0)
    K, L, N, d = 3, 10, 20000, 6
    R = rng.standard_normal((N, d, K * L))
    for theta in (0.3, 0.8, math.pi / 2, 2.2, 2.9):
        q = np.zeros(d)
        q[0] = 1.0
        k = np.zeros(d)
        k[0], k[1] = math.cos(theta), math.sin(theta)
        same = ((q @ R > 0) == (k @ R > 0)).reshape(N, L, K).all(-1)  # [N, L]: collided in table l
        P = (1 - theta / math.pi) ** K
        se = math.sqrt(P * (1 - P) / (N * L))
        assert abs(same.mean() - P) < 4.5 * se + 1e-4
        u = mp.collision_probability(math.cos(theta), K, L)
        assert abs(u - (1 - (1 - P) ** L - L * P * (1 - P) ** (L - 1))) < 1e-12
        se = math.sqrt(u * (1 - u) / N)
        assert abs((same.sum(-1) >= 2).mean() - u) < 4.5 * se + 1e-4
    # arrays and tensors in, the same shape out; the corner cases of the formula
    c = np.array([[-1.0, 0.0], [0.5, 1.0]])
    assert mp.collision_probability(c, K, L).shape == (2, 2)
    assert np.allclose(mp.collision_probability(torch.tensor(c), K, L), mp.collision_probability(c, K, L))
    assert mp.collision_probability(1.0, K, L) == pytest.approx(1.0)
    assert mp.collision_probability(-1.0, K, L) == 0.0
    assert mp.collision_probability(0.3, 0, 4) == pytest.approx(1.0)  # K = 0: one bucket, always sampled
    assert mp.collision_probability(0.3, K, 1) == pytest.approx(0.0)  # one table can never collide twice


def test_log_u_table_interpolates_the_formula():
    """The kernel's -log(u + eps) comes from a table in cos (the kernel's own lookup, called here):
    within 2e-5 (log space) of the formula, also at and beyond the ends of [-1, 1]."""
    tab = mp._log_u_table(10, 150, mp.U_EPS)
    c = np.r_[np.random.default_rng(1).uniform(-1, 1, 2000), -1.0, 1.0].astype(np.float32)
    got = np.array([mp._neg_log_u(x, tab) for x in c])
    want = -np.log(mp.collision_probability(c.astype(np.float64), 10, 150) + mp.U_EPS)
    assert np.abs(got - want).max() < 2e-5
    assert mp._neg_log_u(np.float32(1.5), tab) == pytest.approx(want[-1], abs=1e-6)  # clamped


def test_retrieval_equals_brute_force():
    """Built, then extended in pieces (several segments, merges): the sampled set per query head is
    exactly {i : #tables colliding >= 2} over codes computed from scratch in float64."""
    g = torch.Generator().manual_seed(2)
    nkv, nh, d, C, n = 2, 8, 32, 64, 1500
    k, _ = clustered_keys(nkv, n, d, g)
    v = torch.randn(nkv, n, d, generator=g)
    kpool, vpool, slots = make_pools(k, v, C, g)
    index = mp.LSHIndex(nkv, d, K=6, L=20, seed=5, max_segment=500)
    index.build(kpool, slots, 4, 900)
    for a, b in ((900, 1000), (1000, 1003), (1003, 1200), (1260, 1436)):  # 1200..1260: a gap never indexed
        index.extend(kpool, slots, a, b)
    assert len(index.segments) > 1
    tokens = np.r_[4:1200, 1260:1436]
    assert index.n_tokens == len(tokens)
    mean = k[:, 4:900].double().mean(1).numpy()  # fixed at build
    assert np.allclose(index.mean, mean, atol=1e-5)
    q = torch.randn(nh, d, generator=g) + 0.3 * k[torch.arange(nh) // 4, 100]  # leaning towards some keys
    got = index.retrieve(q)
    sizes = []
    for h, (want, unsure) in enumerate(brute_force_sets(q, k, index, tokens, mean)):
        assert len(unsure) < 10
        assert set(got[h].tolist()) - unsure == want - unsure
        sizes.append(len(want))
    assert 0 < min(sizes) and max(sizes) < len(tokens) // 2  # neither nothing nor everything
    # the kernel attends exactly that set: its count per head matches
    ns = np.zeros(nh, dtype=np.int64)
    mp.attend_sampled(q, kpool, vpool, slots, index, nsampled=ns)
    assert ns.tolist() == [len(s) for s in got]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nh,nkv", [(4, 4), (12, 3), (8, 1)])
def test_every_key_with_u_one_is_exact_attention(dtype, nh, nkv):
    """K = 0 puts every key in one bucket of every table (all retrieved, u = 1); with eps 0 the
    sampled part merged with the exact sinks + window is exact attention over all keys, for each
    KV dtype (16-bit keys widened in registers) and GQA ratio, across several segments."""
    g = torch.Generator().manual_seed(3)
    d, C, n = 64, 32, 700
    k, _ = clustered_keys(nkv, n, d, g)
    v = torch.randn(nkv, n, d, generator=g)
    kpool, vpool, slots = make_pools(k, v, C, g, dtype)
    k, v = k.to(dtype), v.to(dtype)  # the reference sees the same rounded values
    index = mp.LSHIndex(nkv, d, K=0, L=2, max_segment=256)
    index.build(kpool, slots, 4, 500)
    index.extend(kpool, slots, 500, n - 64)
    q = torch.randn(nh, d, generator=g) * 2
    o, lse = with_exact_part(q, k, v, kpool, vpool, slots, index, 4, 64, eps=0.0)
    ref, ref_lse = exact(q, k, v)
    assert (o.double() - ref).abs().max() < 2e-5 * ref.abs().max()
    assert (lse.double() - ref_lse).abs().max() < 1e-4
    # the exact part in the kernel's own softmax: the same
    o3, l3 = mp.attend_sampled(q, kpool, vpool, slots, index, eps=0.0, exact=[(0, 4), (n - 64, n)])
    assert (o3.double() - ref).abs().max() < 2e-5 * ref.abs().max() and (l3.double() - ref_lse).abs().max() < 1e-4
    # alone, the sampled part is exact attention over the indexed tokens
    o2, l2 = mp.attend_sampled(q, kpool, vpool, slots, index, eps=0.0, scale=0.1)
    r2, rl2 = exact(q, k, v, torch.arange(4, n - 64), scale=0.1)
    assert (o2.double() - r2).abs().max() < 2e-5 * r2.abs().max() and (l2.double() - rl2).abs().max() < 1e-4


def sampled_reference(q, k, v, index: mp.LSHIndex, eps: float = mp.U_EPS):
    """float64 MagicPIG estimator per query head over its own sampled set (index.retrieve): logits
    scale * q.k - log(u + eps), u from the exact angle between q and the centred key; (out, lse)."""
    nh, d = q.shape
    G = nh // k.shape[0]
    out, lse = torch.zeros(nh, d, dtype=torch.float64), torch.full((nh,), -math.inf, dtype=torch.float64)
    for h, picked in enumerate(index.retrieve(q)):
        if len(picked) == 0:
            continue
        kk, vv = k[h // G, picked].double(), v[h // G, picked].double()
        qh = q[h].double()
        kc = kk - torch.from_numpy(index.mean[h // G]).double()
        cos = (kc @ qh) / (kc.norm(dim=-1) * qh.norm())
        u = torch.from_numpy(mp.collision_probability(cos.numpy(), index.K, index.L))
        lg = kk @ qh / math.sqrt(d) - torch.log(u + eps)
        out[h], lse[h] = torch.softmax(lg, 0) @ vv, torch.logsumexp(lg, 0)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv", [(8, 2), (6, 6), (36, 2)])
def test_shared_gather_equals_each_heads_own_sampled_estimate(dtype, nh, nkv):
    """One gather per KV head (the union of its query heads' sampled rows, each read once; 18 heads a
    group: sub-groups of 16 and 2) gives each query head its own estimator over its own sampled set:
    the same counts as the per-head kernel, the same output and lse up to float32 summation order
    (relative error of the output below 1e-5 of its norm, lse within 1e-5), and both equal the float64
    estimator over index.retrieve's sets (within the -log u table's interpolation, 2e-5 in log)."""
    g = torch.Generator().manual_seed(11)
    d, C, n = 32, 64, 1500
    k, centres = clustered_keys(nkv, n, d, g)
    v = torch.randn(nkv, n, d, generator=g)
    kpool, vpool, slots = make_pools(k, v, C, g, dtype)
    k, v = k.to(dtype), v.to(dtype)
    index = mp.LSHIndex(nkv, d, K=5, L=24, seed=2, max_segment=600)
    index.build(kpool, slots, 4, 1000)
    index.extend(kpool, slots, 1000, n - 64)  # two segments
    G = nh // nkv
    q = 0.8 * centres[torch.arange(nh) // G, torch.arange(nh) % 16] + 0.3 * torch.randn(nh, d, generator=g)
    counts = {}
    res = {}
    for shared in (False, True):
        counts[shared] = np.zeros(nh, dtype=np.int64)
        res[shared] = mp.attend_sampled(q, kpool, vpool, slots, index, nsampled=counts[shared], shared=shared)
    sets = index.retrieve(q)
    assert counts[True].tolist() == counts[False].tolist() == [len(s) for s in sets]
    union = sum(len(set().union(*(set(sets[h].tolist()) for h in range(a * G, a * G + G)))) for a in range(nkv))
    assert 0 < union < sum(len(s) for s in sets) or G == 1  # the groups' sets overlap: fewer rows read
    (o0, l0), (o1, l1) = res[False], res[True]
    assert float(((o1 - o0).norm(dim=-1) / o0.norm(dim=-1)).max()) < 1e-5
    assert float((l1 - l0).abs().max()) < 1e-5
    ref, ref_lse = sampled_reference(q, k, v, index)
    assert float(((o1.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 1e-4
    assert float((l1.double() - ref_lse).abs().max()) < 1e-4
    # with the sinks and the window in the kernel's softmax: what merging them apart gives
    o2, l2 = mp.attend_sampled(q, kpool, vpool, slots, index, exact=[(0, 4), (n - 64, n)])
    o3, l3 = with_exact_part(q, k, v, kpool, vpool, slots, index, 4, 64)
    assert float(((o2 - o3).norm(dim=-1) / o3.norm(dim=-1)).max()) < 1e-5 and float((l2 - l3).abs().max()) < 1e-5


def test_shifting_every_key_changes_neither_sampling_nor_output():
    """Centering: adding one vector c to every key leaves the centered keys, hence the sampled set
    and u, unchanged (integer-valued data keeps the arithmetic exact); the logits use the raw keys,
    so out is unchanged and lse moves by scale * q.c, as exact attention's does."""
    g = torch.Generator().manual_seed(4)
    nkv, nh, d, C, n = 2, 4, 16, 32, 512
    k = torch.randint(-4, 5, (nkv, n, d), generator=g).float()
    c = torch.randint(-20, 21, (nkv, 1, d), generator=g).float()
    v = torch.randn(nkv, n, d, generator=g)
    q = torch.randn(nh, d, generator=g) * 0.5
    results = []
    for keys in (k, k + c):
        kpool, vpool, slots = make_pools(keys, v, C, torch.Generator().manual_seed(0))
        index = mp.LSHIndex(nkv, d, K=4, L=12, seed=1)
        index.build(kpool, slots, 0, 256)  # 256 tokens: an exact mean
        index.extend(kpool, slots, 256, n)
        results.append((index.retrieve(q), *mp.attend_sampled(q, kpool, vpool, slots, index)))
    (s0, o0, l0), (s1, o1, l1) = results
    assert all(np.array_equal(a, b) for a, b in zip(s0, s1)) and min(len(a) for a in s0) > 0
    assert torch.allclose(o0, o1, atol=1e-5)
    shift = (q * c[:, 0].repeat_interleave(nh // nkv, 0)).sum(-1) / math.sqrt(d)
    assert torch.allclose(l1 - l0, shift, atol=1e-3)


def _estimator_error(L: int, seed: int) -> float:
    g = torch.Generator().manual_seed(10)
    nkv, nh, d, C, n = 2, 8, 64, 64, 2048
    k, centres = clustered_keys(nkv, n, d, g)
    v = torch.randn(nkv, n, d, generator=g)
    kpool, vpool, slots = make_pools(k, v, C, g)
    q = 0.8 * centres[torch.arange(nh) // 4, torch.arange(nh) % 16] + 0.3 * torch.randn(nh, d, generator=g)
    index = mp.LSHIndex(nkv, d, K=7, L=L, seed=seed)
    index.build(kpool, slots, 4, n - 64)
    o, _ = with_exact_part(q, k, v, kpool, vpool, slots, index, 4, 64)
    ref, _ = exact(q, k, v)
    return float(((o.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).mean())


def test_estimator_error_shrinks_as_L_grows():
    """More tables sample more keys: the merged output's relative error vs exact attention falls
    with L (mean over three hash seeds; peaked, clustered attention)."""
    Ls = (8, 32, 128, 512)
    errs = [np.mean([_estimator_error(L, s) for s in range(3)]) for L in Ls]
    assert all(b < 0.9 * a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.25 * errs[0] and errs[-1] < 0.05, errs


def test_extend_equals_build_over_the_union():
    """Extending segment by segment (merging LSM-style, across the segment cap) retrieves the same
    set, and attends to the same result, as one build over the union. Keys come in +-x pairs
    around one centre, so every prefix that the mean is taken over has the same exact mean."""
    g = torch.Generator().manual_seed(6)
    nkv, nh, d, C, n = 2, 8, 32, 64, 1200
    mu = torch.randint(-3, 4, (nkv, 1, d), generator=g).float()
    x = torch.randint(-6, 7, (nkv, n // 2, d), generator=g).float()
    k = torch.stack([mu + x, mu - x], dim=2).reshape(nkv, n, d)
    v = torch.randn(nkv, n, d, generator=g)
    kpool, vpool, slots = make_pools(k, v, C, g)
    q = torch.randn(nh, d, generator=g)
    whole = mp.LSHIndex(nkv, d, K=5, L=16, seed=3, max_segment=600)
    whole.build(kpool, slots, 0, n)
    parts = mp.LSHIndex(nkv, d, K=5, L=16, seed=3, max_segment=600)
    parts.build(kpool, slots, 0, 200)
    for a in range(200, n, 100):
        parts.extend(kpool, slots, a, a + 100)
    assert np.array_equal(parts.mean, whole.mean) and parts.n_tokens == whole.n_tokens == n
    assert len(parts.segments) >= 2
    for a, b in zip(parts.retrieve(q), whole.retrieve(q)):
        assert np.array_equal(a, b)
    o1, l1 = mp.attend_sampled(q, kpool, vpool, slots, parts)
    o2, l2 = mp.attend_sampled(q, kpool, vpool, slots, whole)
    assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(l1, l2, atol=1e-4)
    with pytest.raises(ValueError):
        parts.extend(kpool, slots, n - 10, n)  # already indexed


def test_table_bytes_match_what_the_planner_charges():
    """nbytes counts uint16 ids, uint16 bucket offsets and float32 norms; bytes_per_token * n +
    overhead_bytes bounds it even when tokens arrive one chunk at a time (many small segments)."""
    g = torch.Generator().manual_seed(7)
    nkv, d, C, n, K, L = 2, 16, 16, 3000, 6, 8
    k = torch.randn(nkv, n, d, generator=g)
    kpool, vpool, slots = make_pools(k, k, C, g)
    index = mp.LSHIndex(nkv, d, K=K, L=L)
    assert index.nbytes == 0 and index.n_tokens == 0
    index.build(kpool, slots, 4, 1000)
    assert index.nbytes == nkv * L * 996 * 2 + nkv * L * ((1 << K) + 1) * 2 + nkv * 996 * 4 + nkv * d * 4
    for a in range(1000, n, C):
        index.extend(kpool, slots, a, min(n, a + C))
        bound = mp.LSHIndex.bytes_per_token(nkv, K, L) * index.n_tokens + mp.LSHIndex.overhead_bytes(nkv, K, L)
        assert index.nbytes <= bound
    assert len(index.segments) <= 4  # merged: a step walks few segments


def test_empty_index_and_input_checks():
    g = torch.Generator().manual_seed(8)
    k = torch.randn(1, 64, 8, generator=g)
    kpool, vpool, slots = make_pools(k, k, 16, g)
    index = mp.LSHIndex(1, 8, K=3, L=4)
    index.build(kpool, slots, 10, 10)  # nothing yet: the mean waits for the first keys
    o, lse = mp.attend_sampled(torch.randn(2, 8), kpool, vpool, slots, index)
    assert torch.all(o == 0) and torch.all(lse == -math.inf)
    index.extend(kpool, slots, 10, 64)
    assert np.allclose(index.mean, k[:, 10:64].mean(1).numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        mp.attend_sampled(torch.randn(2, 6), kpool, vpool, slots, index)  # head dim 6 vs 8
    with pytest.raises(ValueError):
        mp.LSHIndex(1, 8, K=16)
    with pytest.raises(TypeError):
        mp.attend_sampled(torch.randn(1, 8), kpool.double(), vpool.double(), slots, index)


# ---------------------------------------------------------------------------------------------
# real attention: the default model's q/k/v over a ~2k-token prompt

class _RecordingKV:
    """The KV cache protocol (``attend`` + bookkeeping) with plain torch SDPA; keeps every layer's
    keys and values [n, nkv, d] (after RoPE) and the last query [nh, d]."""

    def __init__(self):
        self.offset, self.max_tokens, self.attention_s = 0, 1 << 20, 0.0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.q: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, *, window=None, tree_mask=None):
        assert window is None and tree_mask is None  # the default model: full causal attention
        T, nh, d = q.shape
        keys = torch.cat([self.k[layer][:self.offset], k]) if self.offset else k
        values = torch.cat([self.v[layer][:self.offset], v]) if self.offset else v
        self.k[layer], self.v[layer], self.q[layer] = keys, values, q[-1].float().clone()
        mask = torch.arange(keys.shape[0])[None, :] <= torch.arange(self.offset, self.offset + T)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1),
                                                             values.transpose(0, 1), attn_mask=mask, enable_gqa=True)
        return o.transpose(0, 1).reshape(T, nh * d)

    def commit(self, n):
        self.offset += n

    def trim(self, n):
        n = min(n, self.offset)
        self.offset -= n
        return n

    def reset(self):
        self.offset = 0


_STORY = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had "
          "taught him. From the top he could see the fishing boats returning to the harbour, their lanterns swaying "
          "with the waves, and the town beyond, where the bakery lights were the last to go out. Some nights a storm "
          "rolled in from the west and he stayed awake until dawn, trimming the wick and listening to the wind. ")


@pytest.fixture(scope="module")
def real_qkv(tmp_path_factory):
    from offload_rt.config import RunConfig
    from offload_rt.loader import load_model

    torch.set_num_threads(2)
    model = load_model(RunConfig(offload_dir=tmp_path_factory.mktemp("stores"), progress=False))
    ids = model.tokenizer.encode(_STORY)
    i = 1
    while len(ids) < 2048:
        ids += model.tokenizer.encode(f"Chapter {i}. {_STORY}", add_bos=False)
        i += 1
    rec = _RecordingKV()
    model.engine.cache = rec
    with torch.inference_mode():
        model.engine.prefill(ids[:2048])
    a = model.args
    model.engine.close()
    return [(rec.q[i], rec.k[i].transpose(0, 1).float().contiguous(), rec.v[i].transpose(0, 1).float().contiguous())
            for i in range(a.num_hidden_layers)]


def test_real_attention_error_at_default_K_L(real_qkv):
    """The default model's last query over 2048 tokens, every layer: 4 sinks + 64 recent tokens
    exact, the rest sampled at K = 10, L = 150. Bound stated here: the relative error of the output
    (|o - o_exact| / |o_exact|, mean over layers and heads) stays below 0.25 (measured: 0.15), and
    below half the error of dropping the sampled part altogether (measured: 0.50)."""
    errs, dropped = [], []
    g = torch.Generator().manual_seed(9)
    for q, k, v in real_qkv:
        n = k.shape[1]
        kpool, vpool, slots = make_pools(k, v, 256, g)
        index = mp.LSHIndex(k.shape[0], k.shape[2])  # the defaults: K = 10, L = 150
        index.build(kpool, slots, 4, n - 64)
        o, _ = with_exact_part(q, k, v, kpool, vpool, slots, index, 4, 64)
        ref, _ = exact(q, k, v)
        part, _ = exact(q, k, v, torch.cat([torch.arange(4), torch.arange(n - 64, n)]))
        errs.append((o.double() - ref).norm(dim=-1) / ref.norm(dim=-1))
        dropped.append((part - ref).norm(dim=-1) / ref.norm(dim=-1))
    err, drop = float(torch.cat(errs).mean()), float(torch.cat(dropped).mean())
    print(f"real attention, relative error: MagicPIG {err:.3f}, sinks + window only {drop:.3f}")
    assert err < 0.25 and err < 0.5 * drop, (err, drop)
