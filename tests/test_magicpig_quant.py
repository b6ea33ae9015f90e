"""MagicPIG over quantized KV (``--kv-dtype q8|q4``): the sampling kernel reading kernels_cpu.kv_quant
records against the float kernel over the same records dequantized, and TieredKV's MagicPIG decode over
a quantized cache against the same cache's exact attention; --attention auto's rule for quantized KV.

The reference of the kernel is the kernel itself over a float32 pool of the dequantized keys and values:
the index hashes dequantized keys in both cases, so the tables are the same bit for bit, the same rows
are sampled, and the outputs differ only by float32 summation (the order of the dequantizing products).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kernels_cpu import magicpig as mp
from kernels_cpu.kv_quant import KVQuant
from offload_rt.config import RunConfig
from offload_rt.kv.tiered import TieredKV
from offload_rt.runtime import AUTO_MAGICPIG_TOKENS, plan_kv
from tests.test_kv_tiered import side_by_side
from tests.test_magicpig import clustered_keys, exact, make_pools


def _records(fmt: KVQuant, kpool: torch.Tensor, vpool: torch.Tensor):
    """Float pools [P, nkv, C, d] -> (K, V records [P, nkv, C, w], their dequantized float32 pools)."""
    kr = torch.empty(kpool.shape[0], *fmt.record_shape(kpool.shape[1]), dtype=torch.uint8)
    vr = torch.empty_like(kr)
    for p in range(kpool.shape[0]):
        fmt.quantize(kpool[p], vpool[p], kr[p], vr[p])
    kd = torch.stack([fmt.dequantize_keys(r) for r in kr])
    vd = torch.stack([fmt.dequantize_values(r) for r in vr])
    return kr, vr, kd, vd


@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize("d,nh,nkv", [(64, 8, 2), (32, 6, 6), (128, 36, 2)])
def test_kernel_over_records_equals_the_float_kernel_over_the_dequantized_records(name, d, nh, nkv):
    """Same tables (the index hashes the dequantized keys), same sampled counts per head, output within
    float32 summation error (relative 1e-5 of each head's norm; lse within 1e-5), for the shared gather
    with the sinks and window in its softmax and for the per-head gathers; 36 heads a group: two
    sub-groups."""
    g = torch.Generator().manual_seed(7)
    C, n = 64, 1200
    fmt = KVQuant(name, d, C)
    k, centres = clustered_keys(nkv, n, d, g)
    k[:, :, 3] += 20  # an outlier channel, as keys have
    v = torch.randn(nkv, n, d, generator=g)
    kpool, vpool, slots = make_pools(k, v, C, g)
    kr, vr, kd, vd = _records(fmt, kpool, vpool)
    iq = mp.LSHIndex(nkv, d, K=5, L=24, seed=3, max_segment=700, quant=fmt)
    iff = mp.LSHIndex(nkv, d, K=5, L=24, seed=3, max_segment=700)
    for index, pool in ((iq, kr), (iff, kd)):
        index.build(pool, slots, 4, 800)
        index.extend(pool, slots, 800, n - 64)  # two segments
    assert np.array_equal(iq.mean, iff.mean) and len(iq.segments) == len(iff.segments) == 2
    for a, b in zip(iq.segments, iff.segments):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offs, b.offs) and np.array_equal(a.norms, b.norms)
    G = nh // nkv
    q = 0.8 * centres[torch.arange(nh) // G, torch.arange(nh) % 16] + 0.3 * torch.randn(nh, d, generator=g)
    for kw in (dict(exact=[(0, 4), (n - 64, n)]), dict(shared=False)):
        cq, cf = np.zeros(nh, np.int64), np.zeros(nh, np.int64)
        oq, lq = mp.attend_sampled(q, kr, vr, slots, iq, nsampled=cq, **kw)
        of, lf = mp.attend_sampled(q, kd, vd, slots, iff, nsampled=cf, **kw)
        assert cq.tolist() == cf.tolist() and 0 < cq.min() and cq.max() < n // 2  # sampled, not everything
        assert float(((oq - of).norm(dim=-1) / of.norm(dim=-1)).max()) < 1e-5, kw
        assert float((lq - lf).abs().max()) < 1e-5, kw
    # against exact attention over the float keys: the quantized estimate is about as good as the float one's
    # (another sampled set: hashing other keys), the records' own error added
    ifl = mp.LSHIndex(nkv, d, K=5, L=24, seed=3, max_segment=700)
    ifl.build(kpool, slots, 4, n - 64)
    ref, _ = exact(q, k, v)
    err = {}
    for key, (kp, vp, index) in dict(f=(kpool, vpool, ifl), q=(kr, vr, iq)).items():
        o, _ = mp.attend_sampled(q, kp, vp, slots, index, exact=[(0, 4), (n - 64, n)])
        err[key] = float(((o.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).mean())
    print(name, d, nh, nkv, err)
    assert err["q"] < 1.5 * err["f"] + (0.01 if name == "q8" else 0.1), err


def test_record_pools_are_checked():
    fmt = KVQuant("q8", 32, 32)
    rec = torch.zeros(2, *fmt.record_shape(1), dtype=torch.uint8)
    index = mp.LSHIndex(1, 32, K=2, L=4, quant=fmt)
    with pytest.raises(ValueError, match="records"):
        index.build(torch.zeros(2, 1, 32, 32), np.arange(2), 0, 64)  # a float pool given to a records index
    with pytest.raises(ValueError, match="float"):
        mp.LSHIndex(1, 32, K=2, L=4).build(rec, np.arange(2), 0, 64)
    with pytest.raises(ValueError, match="head dim"):
        mp.LSHIndex(1, 64, quant=fmt)


NKV, NH, D, CHUNK = 2, 6, 64, 64


def _cache(attention: str, name: str, root=None, **kw) -> TieredKV:
    return TieredKV(2, NKV, D, torch.float32, 1400, host_chunks=2 * 22 if root is None else 8,
                    staging_chunks=0 if root is None else 16, disk_root=root, chunk_tokens=CHUNK,
                    attention=attention, quant=KVQuant(name, D, CHUNK), **kw)


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_cache_magicpig_with_every_key_sampled_equals_its_exact_attention(name):
    """K = 1 bit over 64 tables: every key is sampled with u ~ 1, so MagicPIG over the quantized cache
    (records sampled and read in registers, sinks + window exact, the open chunk's floats merged) must
    equal the same cache's exact attention over the same records, through a prompt, decode steps that
    close a chunk (no open rows), open the next and extend the tables, and a second prompt pass."""
    ref, pig = _cache("exact", name), _cache("magicpig", name, lsh_k=1, lsh_l=64)
    # decode steps at 701..705, then 768 (12 closed chunks, no open rows) and 769
    errs = side_by_side(ref, pig, (700, *[1] * 5, 62, 1, 1), torch.Generator().manual_seed(2), nh=NH)
    assert pig._index[0] is not None and pig._index[0].quant is not None and pig._index[0].n_tokens > 500
    assert max(errs) < 1e-3, errs
    assert max(errs[10:]) > 0  # the decode steps did go through MagicPIG: not the exact path's bits


@pytest.mark.parametrize("kv_dtype", [None, "q8", "q4"])
def test_auto_turns_magicpig_on_past_its_threshold_whatever_the_kv_dtype(kv_dtype):
    """--attention auto: MagicPIG from AUTO_MAGICPIG_TOKENS of context with the KV in RAM, for float and
    quantized KV alike (its tables budgeted), exact below."""
    args = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1 << 17)
    for tokens, want in ((AUTO_MAGICPIG_TOKENS // 2, "exact"), (AUTO_MAGICPIG_TOKENS, "magicpig")):
        split, attention = plan_kv(RunConfig(ctx_size=tokens, kv_dtype=kv_dtype), args, torch.float32)
        assert attention == want and (split.table_bytes > 0) == (want == "magicpig")
        assert bool(split.shape.quant_row) == (kv_dtype is not None)
