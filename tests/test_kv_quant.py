"""Quantized KV (``--kv-dtype q8|q4``): the chunk format, the kernel, and TieredKV over quantized chunks.

The reference is exact attention (float64) over what the cache holds: each closed chunk's K/V
quantized and dequantized (kernels_cpu.kv_quant), the open chunk's floats. Against it: the quantized
kernel for head dims 64/96/128, GQA ratios 1/3/4 and 1 or 3 queries (several 4-row register blocks),
and the cache through prefill, decode steps across chunk boundaries (partial, exactly full, several
chunks), in RAM and spilled to disk (the same bits), and after a speculation's rollback (keep) as if
the rejected rows had never been written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels_cpu import attention_q
from kernels_cpu.kv_quant import KVQuant
from offload_rt.kv.tiered import TieredKV
from offload_rt.memory.kv_plan import STAGING_BATCH

FORMATS = ("q8", "q4")


def _records(fmt: KVQuant, k: torch.Tensor, v: torch.Tensor):
    kr = torch.empty(*fmt.record_shape(k.shape[0]), dtype=torch.uint8)
    vr = torch.empty_like(kr)
    fmt.quantize(k, v, kr, vr)
    return kr, vr


def _reference(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor):
    """Exact attention in float64: q [T, nh, d] over K, V [nkv, n, d] (every key visible)."""
    T, nh, d = q.shape
    G = nh // K.shape[0]
    s = torch.einsum("thd,hnd->thn", q.double(), K.repeat_interleave(G, 0).double()) * d ** -0.5
    return torch.einsum("thn,hnd->thd", torch.softmax(s, -1), V.repeat_interleave(G, 0).double()), s.logsumexp(-1)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("d", [64, 128])
def test_round_trip_within_half_a_step_and_requantizing_gives_the_same_bytes(name, d):
    fmt = KVQuant(name, d, 256)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3, 256, d, generator=gen) * 2
    k[:, :, 5] += 30  # an outlier channel, as keys have
    v = torch.randn(3, 256, d, generator=gen)
    kr, vr = _records(fmt, k, v)
    kd, vd = fmt.dequantize_keys(kr), fmt.dequantize_values(vr)
    for x, xd, bound in ((k, kd, fmt.step_bound(kr, True)), (v, vd, fmt.step_bound(vr, False))):
        assert ((x - xd).abs() <= bound * (1 + 1e-4) + 1e-6).all()
        assert bound.max() > 0
    # the error is what the bits allow: q8 ~ 1/254 of a group's range, q4 ~ 1/30
    rel = ((v - vd).norm() / v.norm()).item()
    assert rel < (0.01 if name == "q8" else 0.12), rel
    assert torch.equal(_records(fmt, kd, vd)[0], kr) and torch.equal(_records(fmt, kd, vd)[1], vr)
    assert kr.shape == (3, 256, fmt.row_bytes()) and fmt.row_bytes() < d * 2 * (0.6 if name == "q8" else 0.35)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("d, T", [(64, 1), (128, 1), (96, 3)])  # T = 3: several 4-row register blocks
@pytest.mark.parametrize("nkv, group", [(2, 1), (2, 3), (1, 4)])
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_kernel_equals_exact_attention_over_the_dequantized_chunks(name, d, T, nkv, group, n_chunks):
    C = 64
    fmt = KVQuant(name, d, C)
    gen = torch.Generator().manual_seed(d + nkv + group + n_chunks)
    pool_k = torch.zeros(n_chunks + 2, *fmt.record_shape(nkv), dtype=torch.uint8)
    pool_v = torch.zeros_like(pool_k)
    slots = np.random.default_rng(0).permutation(n_chunks + 2)[:n_chunks].astype(np.int32)  # shuffled slots
    Ks, Vs = [], []
    for slot in slots:
        k, v = (torch.randn(nkv, C, d, generator=gen) for _ in range(2))
        pool_k[slot], pool_v[slot] = _records(fmt, k, v)
        Ks.append(fmt.dequantize_keys(pool_k[slot]))
        Vs.append(fmt.dequantize_values(pool_v[slot]))
    q = torch.randn(T, nkv * group, d, generator=gen) * 2
    out, lse = attention_q.attend(q, pool_k, pool_v, slots, n_chunks, fmt)
    ref, ref_lse = _reference(q, torch.cat(Ks, 1), torch.cat(Vs, 1))
    assert (out.double() - ref).abs().max() < 2e-5 and (lse.double() - ref_lse).abs().max() < 2e-5


# ---------------------------------------------------------------- TieredKV over quantized chunks

L, NKV, D, NH, C = 2, 2, 64, 6, 32


class _Reference:
    """What a quantized cache holds, kept apart: every token's float K/V; attention over closed chunks
    as quantized and dequantized, the open chunk as floats."""

    def __init__(self, fmt: KVQuant):
        self.fmt, self.k, self.v = fmt, [[] for _ in range(L)], [[] for _ in range(L)]

    def attend(self, layer, q, k, v):
        self.k[layer].append(k.float())
        self.v[layer].append(v.float())
        K, V = torch.cat(self.k[layer]).transpose(0, 1), torch.cat(self.v[layer]).transpose(0, 1)
        n = K.shape[1]
        for c in range(n // C):
            kr, vr = _records(self.fmt, K[:, c * C:(c + 1) * C], V[:, c * C:(c + 1) * C])
            K[:, c * C:(c + 1) * C], V[:, c * C:(c + 1) * C] = self.fmt.dequantize_keys(kr), self.fmt.dequantize_values(vr)
        T = q.shape[0]
        outs = [_reference(q[t:t + 1], K[:, :n - T + t + 1], V[:, :n - T + t + 1])[0] for t in range(T)]
        return torch.cat(outs).reshape(T, -1)

    def commit(self, n):
        pass

    def keep(self, start, rows):
        for layer in range(L):
            ks, vs = torch.cat(self.k[layer]), torch.cat(self.v[layer])
            idx = torch.tensor(rows) + start
            self.k[layer] = [ks[:start], ks[idx]]
            self.v[layer] = [vs[:start], vs[idx]]


def _cache(name, spill, tmp_path, attention="exact"):
    fmt = KVQuant(name, D, C)
    return TieredKV(L, NKV, D, torch.bfloat16, 20 * C, host_chunks=5 * L if spill else 20 * L,
                    staging_chunks=2 * STAGING_BATCH if spill else 0, disk_root=tmp_path if spill else None,
                    chunk_tokens=C, quant=fmt, attention=attention)


def _run(caches, steps, gen):
    outs = []
    for T in steps:
        for layer in range(L):
            q, k, v = (torch.randn(T, n, D, generator=gen).to(torch.bfloat16) for n in (NH, NKV, NKV))
            res = [c.attend(layer, q, k, v) for c in caches]
            outs.append([r.float() for r in res])
        for c in caches:
            c.commit(T)
    return outs


# prefill partial; decode into and across a boundary; a prefill block ending exactly on one; several chunks
STEPS = (37, 1, 26, 1, 1, 64, 1, 50, 1)


@pytest.mark.parametrize("name", FORMATS)
def test_cache_equals_the_reference_in_ram_and_on_disk(name, tmp_path):
    ref = _Reference(KVQuant(name, D, C))
    ram, disk = _cache(name, False, None), _cache(name, True, tmp_path)
    gen = torch.Generator().manual_seed(4)
    errs = []
    for outs in _run([ref, ram, disk], STEPS, gen):
        a, b, c = outs
        # the same records read from RAM and from disk (in other kernel calls: float32 sums in another order,
        # then the output's bf16 rounding)
        assert (b - c).abs().max() <= 8e-3 * b.abs().max()
        errs.append(((a - b).abs().max() / a.abs().max()).item())
    assert disk.tier_bytes()["disk"] > 0 and disk.disk_read_bytes > 0
    assert max(errs) < 1e-2, errs  # bf16 output rounding; the quantization itself is in the reference
    w = KVQuant(name, D, C).row_bytes()
    assert ram.tier_bytes()["host"] >= ram._table.count("host") * 2 * NKV * C * w
    disk.close()


@pytest.mark.parametrize("name", FORMATS)
def test_select_with_every_chunk_read_equals_exact(name, tmp_path):
    exact, select = _cache(name, True, tmp_path / "a"), _cache(name, True, tmp_path / "b", attention="select")
    select.select_share = 1.0
    gen = torch.Generator().manual_seed(5)
    for a, b in _run([exact, select], (300, 1, 1, 1), gen):
        assert (a - b).abs().max() <= 1e-2 * a.abs().max()
    assert select.disk_chunks_seen > 0


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("spill", [False, True])
def test_rollback_across_a_closed_chunk_is_as_if_the_rejected_rows_never_came(name, spill, tmp_path):
    """A tree of 6 rows written across a chunk boundary closes the chunk with rejected rows in it; keep()
    re-closes it from the accepted rows' floats: afterwards the cache matches one that only saw them."""
    gen = torch.Generator().manual_seed(6)
    spec, plain = _cache(name, spill, tmp_path / "a"), _cache(name, spill, tmp_path / "b")
    _run([spec, plain], (3 * C - 3, 1), gen)  # 3 tokens before a boundary
    tree = []
    for layer in range(L):
        q, k, v = (torch.randn(6, n, D, generator=gen).to(torch.bfloat16) for n in (NH, NKV, NKV))
        spec.attend(layer, q, k, v)
        tree.append((q, k, v))
    start = spec.offset
    spec.commit(6)
    keep = [0, 2, 3, 5]  # crosses the boundary: two rows before, two after
    spec.keep(start, keep)
    for layer, (q, k, v) in enumerate(tree):
        plain.attend(layer, q[keep], k[keep], v[keep])
    plain.commit(len(keep))
    assert spec.offset == plain.offset
    for layer in range(L):
        for x, y in zip(spec.rows(layer, 0, spec.offset), plain.rows(layer, 0, plain.offset)):
            assert torch.equal(x, y)
    for a, b in _run([spec, plain], (1, 1, C), gen):
        assert torch.equal(a, b)
    # a deep trim re-opens an old chunk from its record: rows as stored, and attention goes on
    spec.trim(spec.offset - C - 5)
    _run([spec], (1, 40), gen)
