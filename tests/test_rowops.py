"""Decode's fused single-row kernels against the torch expressions they replace.

kernels_cpu.rowops (RMSNorm, residual add + RMSNorm, RoPE of q and k, silu*mul) and
kernels_cpu.attention.attend_decode (write the token's k/v, then exact attention), each against the
torch code that ran before: the expressions of models/llama.py written out here, and attend() after a
torch write. Error metrics:

- float32: max |ours - torch| / max |torch| <= TOL32 (float32 rounding; seen <= 4e-7);
- bfloat16: the kernels round every intermediate torch stores in bfloat16 the way torch does, so
  results are bit-identical except where a float32 sum's order or exp's last bit tips a rounding:
  at most 1 bfloat16 ulp apart (compared on the bits), and identical for element-wise ops whose
  float32 intermediates are exact (add, RoPE);
- the layer: models.llama.layer_forward with the fused paths against the same code with them off
  (rowops.usable -> False, TieredKV's general attend), max error over the output scale across decode
  steps (seen: float32 <= 2e-6, bfloat16 identical; one bfloat16 ulp is 4e-3 relative).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels_cpu import attention as att
from kernels_cpu import rowops
from offload_rt.kv.tiered import TieredKV
from offload_rt.models import llama

TOL32 = 2e-6
DTYPES = [torch.float32, torch.bfloat16]


def ref_rms_norm(x, w, eps):  # models/llama.py's torch expression (Hugging Face's LlamaRMSNorm)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def ref_rope(x, cos, sin):  # models/llama.py apply_rope with _rotate_half
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def close(got: torch.Tensor, ref: torch.Tensor, exact: bool = False) -> None:
    """The metric of the module docstring for got's dtype."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if got.dtype == torch.float32:
        err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        assert (err == 0.0) if exact else err <= TOL32, err
        return
    a, b = got.view(torch.int16).int(), ref.view(torch.int16).int()
    ulps = torch.where(got.float() == ref.float(), 0, (a - b).abs()).max().item()  # +0 and -0 are equal
    assert ulps <= (0 if exact else 1), ulps


def rand(shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (1, 9, 64), (1, 2, 128)])
def test_rms_norm_matches_llama_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x, w = rand(shape, dtype, g, 3.0), rand(shape[-1:], dtype, g)
    close(rowops.rms_norm(x, w, 1e-5), ref_rms_norm(x, w, 1e-5))
    tiny = rand(shape, dtype, g, 1e-4)  # eps matters
    close(rowops.rms_norm(tiny, w, 1e-2), ref_rms_norm(tiny, w, 1e-2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_residual_add_then_the_norm(dtype):
    g = torch.Generator().manual_seed(1)
    x, y, w = rand((1, 576), dtype, g, 4.0), rand((1, 576), dtype, g), rand((576,), dtype, g)
    s, h = rowops.add_rms_norm(x, y, w, 1e-6)
    close(s, x + y, exact=True)
    close(h, ref_rms_norm(x + y, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (4, 4, 128), (2, 1, 32)])
def test_rope_qk_matches_apply_rope(dtype, heads, kv_heads, d):
    g = torch.Generator().manual_seed(2)
    args = llama.LlamaArgs("llama", heads * d, 4 * d, 1, heads, kv_heads, d, 10, rope_theta=10000.0)
    rope = llama.Rope(args, dtype)
    for pos in (0, 17, 3000):
        cos, sin = rope.tables(pos, 1)
        q, k = rand((1, heads * d), dtype, g), rand((1, kv_heads * d), dtype, g)
        qo, ko = rowops.rope_qk(q, k, cos, sin, heads, kv_heads)
        assert qo.shape == (1, heads, d) and ko.shape == (1, kv_heads, d)
        # products of two bfloat16s are exact in float32: every bfloat16 rounding is torch's
        close(qo, ref_rope(q.view(1, heads, d), cos, sin), exact=dtype == torch.bfloat16)
        close(ko, ref_rope(k.view(1, kv_heads, d), cos, sin), exact=dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    g = torch.Generator().manual_seed(3)
    gate, up = rand((1, 1536), dtype, g, 4.0), rand((1, 1536), dtype, g)
    gate[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, -90.0, 88.0]).to(dtype)  # both tails of exp
    close(rowops.silu_mul(gate, up), F.silu(gate) * up)


def test_bfloat16_rounding_is_torchs_on_every_kind_of_float():
    g = torch.Generator().manual_seed(4)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 3.4028235e38, 1e-45, -1e-40,
                            1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20]).view(torch.int32)
    x = torch.cat([bits, special]).view(torch.float32)
    ours = np.array([att._bf16_bits(v) for v in x.numpy()[:20_000]] +
                    [att._bf16_bits(v) for v in x.numpy()[-len(special):]], dtype=np.uint16)
    ref = torch.cat([x[:20_000], x[-len(special):]]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(torch.cat([x[:20_000], x[-len(special):]]).numpy())
    assert np.array_equal(ours[~nan], ref[~nan])
    assert np.all((ours[nan] & 0x7F80) == 0x7F80) and np.all(ours[nan] & 0x7F)  # NaN stays NaN


def test_usable_only_for_one_contiguous_cpu_row_of_one_float_type():
    row, w = torch.zeros(1, 8), torch.zeros(8)
    assert rowops.usable(row, w) and rowops.usable(row.bfloat16(), w.bfloat16())
    assert not rowops.usable(torch.zeros(2, 8), w)  # prefill
    assert not rowops.usable(row.half(), w.half())
    assert not rowops.usable(row, w.bfloat16())  # mixed: torch promotes, the kernel would not
    assert not rowops.usable(torch.zeros(1, 16)[:, ::2], w)  # not contiguous
    assert not rowops.usable(row, torch.zeros(16)[::2])
    with pytest.raises(ValueError):
        rowops.rms_norm(row, torch.zeros(4), 1e-6)
    with pytest.raises(ValueError):
        rowops.rope_qk(torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(1, 4), torch.zeros(1, 4), 2, 1)


# ---------------------------------------------------------------- the KV cache's decode step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_keys", [1, 40, 64, 65, 300])
@pytest.mark.parametrize("parallel", [False, True])
def test_attend_decode_writes_the_token_and_equals_attend(monkeypatch, dtype, n_keys, parallel):
    g = torch.Generator().manual_seed(n_keys)
    P, nkv, C, d, G = 8, 2, 64, 32, 3
    kpool, vpool = rand((P, nkv, C, d), dtype, g), rand((P, nkv, C, d), dtype, g)
    slots = torch.randperm(P, generator=g)[:-(-n_keys // C)].to(torch.int32)
    q, k, v = rand((1, nkv * G, d), dtype, g), rand((1, nkv, d), dtype, g), rand((1, nkv, d), dtype, g)
    ref_k, ref_v = kpool.clone(), vpool.clone()
    j = n_keys - 1
    ref_k[slots[j // C], :, j % C], ref_v[slots[j // C], :, j % C] = k[0], v[0]
    ref, _lse = att.attend(q.float(), ref_k, ref_v, slots, n_keys, q_index=torch.tensor([j]))
    if parallel:  # the long-region path: the parallel kernel after the same write
        monkeypatch.setattr(att, "SERIAL_DECODE_BYTES", 0)
        monkeypatch.setattr(nb, "get_num_threads", lambda: 2)
    pools = att.DecodePools(kpool, vpool)
    out = att.attend_decode(q, k, v, pools, slots.numpy(), n_keys)
    assert torch.equal(kpool, ref_k) and torch.equal(vpool, ref_v)  # only the token's row was written
    assert out.shape == (1, nkv * G * d) and out.dtype == torch.float32
    err = (out.view(-1) - ref.reshape(-1)).abs().max().item() / ref.abs().max().item()
    assert err <= 2e-6, err
    out16 = att.attend_decode(q, k, v, pools, slots.numpy(), n_keys, out_dtype=torch.bfloat16)  # rewrites the row
    assert torch.equal(out16, out.to(torch.bfloat16))


def test_attend_decode_refuses_bad_slots_and_operands_without_writing():
    pools = att.DecodePools(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8))
    q, kv = torch.ones(1, 2, 8), torch.ones(1, 1, 8)
    with pytest.raises(ValueError, match="outside"):
        att.attend_decode(q, kv, kv, pools, np.array([0, 5], dtype=np.int32), 6)
    assert not pools.kpool.any()
    with pytest.raises(ValueError):
        att.attend_decode(q, kv.bfloat16(), kv, pools, np.array([0], dtype=np.int32), 1)  # not the pools' dtype
    with pytest.raises(ValueError):
        att.attend_decode(q, kv, kv, pools, np.array([0], dtype=np.int32), 5)  # more keys than the slots hold


# ---------------------------------------------------------------- the decoder layer, fused vs torch


def _torch_paths(monkeypatch):
    monkeypatch.setattr(rowops, "usable", lambda *a: False)
    monkeypatch.setattr(TieredKV, "_attend_decode", lambda self, *a: None)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layer_forward_fused_equals_torch_ops(monkeypatch, dtype, tol, family):
    g = torch.Generator().manual_seed(5)
    args = llama.LlamaArgs(family, 64, 96, 2, 4, 2, 16, 10, rms_norm_eps=1e-5, qk_norm=family == "qwen3")
    shapes = args.tensor_shapes()
    w = {i: {s: (rand(shapes[llama.LAYER_PREFIX.format(i) + s], dtype, g, 0.3)
                 + (1.0 if s.endswith("norm.weight") else 0.0)).to(dtype)
             for s in args.layer_suffixes()} for i in range(2)}
    rope = llama.Rope(args, dtype)

    def run(fused: bool) -> list[torch.Tensor]:
        with monkeypatch.context() as m:
            if not fused:
                _torch_paths(m)
            cache = TieredKV(2, 2, 16, dtype, 64, host_chunks=8, chunk_tokens=16)
            gx = torch.Generator().manual_seed(6)
            outs = []
            for T in (14, 1, 1, 1, 1):  # prefill, then decode steps (the fused path) across a chunk edge
                start = cache.offset
                x = rand((T, 64), dtype, gx)
                for i in range(2):
                    x = llama.layer_forward(args, w[i], x, cache, i, rope.tables(start, T), start)
                cache.commit(T)
                outs.append(x)
            return outs

    with torch.inference_mode():
        ours, ref = run(True), run(False)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == dtype
        err = (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
        assert err <= tol, err


def test_tiered_decode_path_with_a_window_equals_dense_kv(monkeypatch):
    """A window longer than the context hides nothing: the decode path runs; once the window cuts the
    context the general path does. Both equal DenseKV (torch attention)."""
    from offload_rt.kv.dense import DenseKV

    calls = []
    real = att.attend_decode
    monkeypatch.setattr(att, "attend_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(7)
    ref, kv = DenseKV(1, 2, 16, torch.float32, 64), TieredKV(1, 2, 16, torch.float32, 64, host_chunks=4,
                                                             chunk_tokens=16)
    for T in (10, 1, 1, 1, 1, 1, 1):  # window 14: the last steps see 15, 16, 17 tokens
        q, k, v = (torch.randn(T, n, 16, generator=g) for n in (4, 2, 2))
        a, b = ref.attend(0, q, k, v, window=14), kv.attend(0, q, k, v, window=14)
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
        ref.commit(T)
        kv.commit(T)
    assert len(calls) == 4  # contexts of 11..14 tokens
