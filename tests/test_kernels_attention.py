"""The exact CPU attention kernels (kernels_cpu.attention) against torch's scaled_dot_product_attention.

Keys and values live in a chunked pool [P, nkv, C, d] at shuffled slots; the reference gathers them
into one contiguous float32 K/V (bf16/f16 widened exactly), builds the dense bool mask from the
visibility rule written out independently here, and runs SDPA in float32 (enable_gqa). Error metric:
max |out - ref| over the output scale (max |ref|). Both sides accumulate in float32 in different
orders over up to 8k keys, so they differ by rounding: TOL = 2e-5 (~170 float32 ulps; seen <= 3e-6,
while one dropped or misplaced key among thousands shows as >= 1e-3).
lse is compared with torch.logsumexp of the float64 scores (absolute, TOL_LSE; seen <= 1.1e-6).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels_cpu import attention as att

TOL = 2e-5
TOL_LSE = 2e-5


def make_pool(n_keys: int, nkv: int, C: int, d: int, dtype: torch.dtype, g: torch.Generator, spare: int = 3):
    """Pools with `spare` extra chunk slots and the region's chunks at shuffled slots."""
    m = max(1, -(-n_keys // C))
    P = m + spare
    kpool = torch.randn(P, nkv, C, d, generator=g).to(dtype)
    vpool = torch.randn(P, nkv, C, d, generator=g).to(dtype)
    slots = torch.randperm(P, generator=g)[:m].to(torch.int32)
    return kpool, vpool, slots


def dense_kv(pool: torch.Tensor, slots: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[nkv, n_keys, d] float32, the region in key order."""
    nkv, C, d = pool.shape[1:]
    chunks = pool[slots.long()]  # [m, nkv, C, d]
    return chunks.transpose(0, 1).reshape(nkv, -1, d)[:, :n_keys].float()


def visibility(q_index, n_keys, k_base=0, window=0, n_prefix=None, tail_mask=None) -> torch.Tensor:
    """The rule of attend(), query by query: [T, n_keys] bool."""
    a = torch.arange(k_base, k_base + n_keys)
    rows = []
    for t, qi in enumerate(q_index.tolist()):
        if tail_mask is None:
            ok = a <= qi
        else:
            c = a - n_prefix
            in_tail = (c >= 0) & (c < tail_mask.shape[1])
            ok = (c < 0) | (in_tail & tail_mask[t][c.clamp(0, tail_mask.shape[1] - 1)])
        if window > 0:
            ok &= qi - a < window
        rows.append(ok)
    return torch.stack(rows)


def reference(q, kpool, vpool, slots, n_keys, vis, scale=None):
    """SDPA in float32 on the widened K/V with the dense mask; rows with no visible key: 0 / -inf."""
    T, nh, d = q.shape
    k, v = dense_kv(kpool, slots, n_keys), dense_kv(vpool, slots, n_keys)
    scale = d ** -0.5 if scale is None else scale
    empty = ~vis.any(1)
    mask = vis.clone()
    mask[empty] = True  # SDPA's answer for an all-masked row is undefined: compute something, then zero it
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale,
                                         enable_gqa=True)[0].transpose(0, 1)
    out[empty] = 0.0
    G = nh // k.shape[0]
    s = torch.einsum("thd,hnd->thn", q.double(), k.double().repeat_interleave(G, 0)) * scale
    lse = torch.logsumexp(s.masked_fill(~vis[:, None, :], -math.inf), dim=-1)
    return out, lse


def check(out, lse, ref_out, ref_lse):
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    scale = max(float(ref_out.abs().max()), 1e-6)
    err = float((out - ref_out).abs().max()) / scale
    assert err < TOL, f"output error {err:.2e} of the output scale"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.all(lse[~finite] == -math.inf)
    if finite.any():
        lerr = float((lse[finite].double() - ref_lse[finite]).abs().max())
        assert lerr < TOL_LSE, f"lse error {lerr:.2e}"


# (d, nkv, G, n_keys, C, T, dtype, window, k_base): head dims 64/128, GQA 1/3/4/8, 1..8k keys, chunk sizes
# that do and don't divide the length (and aren't multiples of 4), decode and query blocks
CASES = [
    (64, 3, 3, 1, 256, 1, torch.bfloat16, 0, 0),
    (64, 3, 3, 777, 256, 1, torch.bfloat16, 0, 0),  # the default model's shape
    (64, 3, 3, 4096, 256, 1, torch.float16, 0, 0),
    (128, 8, 4, 8192, 256, 1, torch.bfloat16, 0, 0),  # A1's shape
    (128, 2, 8, 3001, 100, 1, torch.float16, 0, 0),
    (64, 4, 1, 37, 16, 1, torch.float32, 0, 0),
    (64, 4, 1, 301, 30, 5, torch.float32, 0, 0),
    (128, 1, 4, 515, 64, 9, torch.bfloat16, 0, 0),
    (64, 3, 3, 2000, 256, 64, torch.bfloat16, 0, 0),
    (128, 2, 3, 1500, 128, 17, torch.float32, 0, 250),
    (64, 2, 8, 1000, 64, 1, torch.bfloat16, 128, 0),  # sliding window
    (64, 3, 1, 1234, 50, 24, torch.float16, 300, 100),
    (128, 4, 4, 64, 16, 6, torch.float32, 5, 7),
    (40, 2, 4, 300, 64, 1, torch.bfloat16, 0, 0),  # head dim not a multiple of simd.LANES: the scalar loops
    (80, 2, 4, 500, 64, 2, torch.float16, 0, 0),  # 5 vectors of simd.LANES per row
]


def case_inputs(case, seed):
    d, nkv, G, n, C, T, dtype, window, k_base = case
    g = torch.Generator().manual_seed(seed)
    kpool, vpool, slots = make_pool(n, nkv, C, d, dtype, g)
    q = torch.randn(T, nkv * G, d, generator=g) * 2.0  # peakier than unit scale: softmax not flat
    q_index = torch.arange(k_base + n - T, k_base + n)  # the block's own keys are the region's last
    return q, kpool, vpool, slots, n, q_index, k_base, window


@pytest.mark.parametrize("fn", [att.attend, att.attend_blocks], ids=["kernel", "blocks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-kv{c[1]}-g{c[2]}-n{c[3]}-C{c[4]}-T{c[5]}-"
                                                     f"{str(c[6])[6:]}-w{c[7]}-b{c[8]}")
def test_matches_sdpa(fn, case):
    q, kpool, vpool, slots, n, q_index, k_base, window = case_inputs(case, seed=sum(case[:6]))
    out, lse = fn(q, kpool, vpool, slots, n, q_index=q_index, k_base=k_base, window=window)
    vis = visibility(q_index, n, k_base, window)
    check(out, lse, *reference(q, kpool, vpool, slots, n, vis))


@pytest.mark.parametrize("case", CASES[1:6:2], ids=lambda c: f"n{c[3]}-T{c[5]}-w{c[7]}")
def test_blocks_without_torchs_fused_op(monkeypatch, case):
    """attend_blocks uses torch's fused CPU attention where this torch has it; the plain matmul path
    (other torch builds, blocks with a row that sees no key) gives the same result."""
    monkeypatch.setattr(att, "_FLASH", None)
    q, kpool, vpool, slots, n, q_index, k_base, window = case_inputs(case, seed=sum(case[:6]))
    out, lse = att.attend_blocks(q, kpool, vpool, slots, n, q_index=q_index, k_base=k_base, window=window)
    check(out, lse, *reference(q, kpool, vpool, slots, n, visibility(q_index, n, k_base, window)))


def tree_mask(T: int, g: torch.Generator) -> torch.Tensor:
    """A random token tree of T nodes (node i's parent is a random earlier node, or the prefix):
    node t sees itself and its ancestors."""
    parent = [-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, T)]
    mask = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        a = t
        while a >= 0:
            mask[t, a] = True
            a = parent[a]
    return mask


@pytest.mark.parametrize("fn", [att.attend, att.attend_blocks], ids=["kernel", "blocks"])
@pytest.mark.parametrize("d,nkv,G,n_prefix,T,C,dtype,window", [
    (64, 3, 3, 700, 12, 256, torch.bfloat16, 0),
    (128, 2, 4, 130, 33, 32, torch.float16, 0),
    (64, 4, 1, 0, 7, 8, torch.float32, 0),
    (64, 2, 8, 1000, 20, 100, torch.bfloat16, 256),
])
def test_tail_mask_matches_sdpa(fn, d, nkv, G, n_prefix, T, C, dtype, window):
    """Speculative tree verification: the tree's T tokens see the prefix and their ancestors."""
    g = torch.Generator().manual_seed(n_prefix + T)
    n = n_prefix + T
    kpool, vpool, slots = make_pool(n, nkv, C, d, dtype, g)
    q = torch.randn(T, nkv * G, d, generator=g)
    tail = tree_mask(T, g)
    # tree positions: the node's depth past the prefix (what RoPE would see), not its slot
    q_index = n_prefix + tail.sum(1) - 1
    out, lse = fn(q, kpool, vpool, slots, n, q_index=q_index, window=window, n_prefix=n_prefix, tail_mask=tail)
    vis = visibility(q_index, n, 0, window, n_prefix, tail)
    check(out, lse, *reference(q, kpool, vpool, slots, n, vis))


@pytest.mark.parametrize("fn", [att.attend, att.attend_blocks], ids=["kernel", "blocks"])
def test_merge_of_two_halves_is_the_whole(fn):
    """The cache attends over a layer's keys in parts (host chunks, then chunks read from disk)."""
    g = torch.Generator().manual_seed(5)
    d, nkv, G, C, n, T = 64, 3, 3, 64, 1000, 4
    kpool, vpool, slots = make_pool(n, nkv, C, d, torch.bfloat16, g)
    q = torch.randn(T, nkv * G, d, generator=g) * 2
    q_index = torch.arange(n - T, n)
    whole = fn(q, kpool, vpool, slots, n, q_index=q_index)
    h = 7  # chunks in the first part
    first = fn(q, kpool, vpool, slots[:h], h * C, q_index=q_index)
    second = fn(q, kpool, vpool, slots[h:], n - h * C, q_index=q_index, k_base=h * C)
    out, lse = att.merge(*first, *second)
    check(out, lse, *whole)


def test_merge_with_empty_parts():
    g = torch.Generator().manual_seed(6)
    o = torch.randn(3, 4, 8, generator=g)
    lse = torch.randn(3, 4, generator=g)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, -math.inf)
    out, out_lse = att.merge(o, lse, empty_o, empty_lse)
    assert torch.allclose(out, o) and torch.equal(out_lse, lse)
    out, out_lse = att.merge(empty_o, empty_lse, o, lse)
    assert torch.allclose(out, o) and torch.equal(out_lse, lse)
    out, out_lse = att.merge(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.equal(out, empty_o) and torch.all(out_lse == -math.inf)


@pytest.mark.parametrize("fn", [att.attend, att.attend_blocks], ids=["kernel", "blocks"])
def test_rows_with_no_visible_key(fn):
    g = torch.Generator().manual_seed(7)
    kpool, vpool, slots = make_pool(40, 2, 16, 64, torch.float32, g)
    q = torch.randn(3, 4, 64, generator=g)
    # a tree token whose mask row is empty, over no prefix: nothing visible; the others see something
    tail = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    out, lse = fn(q, kpool, vpool, slots, 3, q_index=torch.tensor([0, 1, 2]), n_prefix=0, tail_mask=tail)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    assert torch.isfinite(lse[[0, 2]]).all() and out[[0, 2]].abs().sum() > 0
    # keys all in the queries' future (k_base past q_index): every row empty
    out, lse = fn(q, kpool, vpool, slots, 40, q_index=torch.tensor([3, 4, 5]), k_base=10)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    # a window that ends before the region starts
    out, lse = fn(q[:1], kpool, vpool, slots, 40, q_index=torch.tensor([100]), window=10)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_same_result_on_one_thread_and_split():
    """The split count depends on the thread count: one KV head per thread vs several splits merged."""
    g = torch.Generator().manual_seed(8)
    kpool, vpool, slots = make_pool(5000, 3, 256, 64, torch.bfloat16, g)
    q = torch.randn(1, 9, 64, generator=g)
    args = dict(q_index=torch.tensor([4999]))
    n_threads = nb.get_num_threads()
    try:
        nb.set_num_threads(1)
        one = att.attend(q, kpool, vpool, slots, 5000, **args)
    finally:
        nb.set_num_threads(n_threads)
    assert att._splits(5000, 3, 1)[0] == 1 and att._splits(5000, 3, 2)[0] == 2
    check(*att.attend(q, kpool, vpool, slots, 5000, **args), *one)


@pytest.mark.parametrize("n,nkv,threads", [(1, 3, 2), (300, 3, 2), (100_000, 3, 2), (100_000, 8, 2), (4096, 1, 4),
                                           (10**6, 2, 2)])
def test_splits_cover_the_range_and_balance(n, nkv, threads):
    ns, length = att._splits(n, nkv, threads)
    assert 1 <= ns <= att.MAX_SPLITS and ns * length >= n
    assert (ns - 1) * length < n or ns == 1  # no split wholly past the end (an idle task)...
    if n >= att.MIN_SPLIT_KEYS * threads:  # ...and, given enough keys, an equal share for every thread
        assert (nkv * ns) % threads == 0


def test_scale_argument():
    g = torch.Generator().manual_seed(9)
    kpool, vpool, slots = make_pool(100, 2, 32, 64, torch.float32, g)
    q = torch.randn(2, 4, 64, generator=g)
    q_index = torch.tensor([98, 99])
    out, lse = att.attend(q, kpool, vpool, slots, 100, q_index=q_index, scale=0.3)
    check(out, lse, *reference(q, kpool, vpool, slots, 100, visibility(q_index, 100), scale=0.3))


def test_exp_matches_numpy():
    @nb.njit
    def run(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = att._exp_le0(x[i])
        return out

    x = np.concatenate([np.linspace(-100, 0, 200_001), -np.logspace(-8, 0, 1001)]).astype(np.float32)
    got = run(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    normal = x > -87
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 3e-7
    assert np.all(got[~normal] == 0)


@pytest.mark.parametrize("dtype,view", [(torch.bfloat16, np.uint16), (torch.float16, np.int16)])
def test_16bit_widening_is_exact_for_every_value(dtype, view):
    @nb.njit
    def widen(bits):
        out = np.empty(bits.shape[0], dtype=np.float32)
        for i in range(bits.shape[0]):
            out[i] = att._to_f32(bits[i])
        return out

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    got = torch.from_numpy(widen(bits.numpy().view(view)))
    want = bits.view(dtype).float()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bit for bit, ±0 and ±inf too


def test_rejects_bad_shapes():
    pool = torch.zeros(2, 2, 8, 16)
    with pytest.raises(ValueError):
        att.attend(torch.zeros(1, 3, 16), pool, pool, torch.zeros(1, dtype=torch.int32), 8, q_index=torch.tensor([7]))
    with pytest.raises(ValueError):
        att.attend(torch.zeros(1, 4, 16), pool, pool, torch.zeros(1, dtype=torch.int32), 9, q_index=torch.tensor([7]))
    with pytest.raises(ValueError):
        att.attend(torch.zeros(1, 4, 16), pool, pool, torch.zeros(1, dtype=torch.int32), 8, q_index=torch.tensor([7]),
                   tail_mask=torch.ones(1, 1, dtype=torch.bool))
