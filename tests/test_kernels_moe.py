"""Routed-expert compute (kernels_cpu/moe.py) against a float64 reference, and its three paths (the decode
kernel, the grouped kernel, transformers' loop) against each other.

Experts are random SwiGLU MLPs in every weight format the kernel reads (ggml blocks: gguf-py's
quantization or random blocks with sane scales, as tests/test_kernels_quant.py builds them; float32 and
bfloat16), uniform and mixed between parts (a Q4_K_M file: q4_k gate/up, q6_k down). The float64
reference dequantizes with gguf-py and sums ``w * down(silu(gate x) * up x)`` per token.

Metric: NMSE = sum((y - ref)^2) / sum(ref^2) over the output. float32 h: float32 accumulation measures
2e-15..6e-13 here, NMSE_F32 = 1e-9; bfloat16 h (or a bfloat16 part in transformers' loop, which computes
in bfloat16): rounding to bfloat16 (a relative 2^-9 at most each time) measures 6e-6..3e-5, NMSE_BF16 = 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from kernels_cpu import moe
from storage.formats import QTensor, get_format
from tests.test_kernels_quant import GGML, random_blocks

NMSE_F32 = 1e-9
NMSE_BF16 = 1e-4
QUANT = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k")
UNIFORM = [(f, f, f) for f in (*QUANT, "float32", "bfloat16")]
MIXED = [("q4_k", "q4_k", "q6_k"), ("q4_0", "q8_0", "q5_k"), ("bfloat16", "q4_1", "float32"),
         ("q6_k", "float32", "q4_k")]


def make_part(fmt: str, n: int, k: int, seed: int):
    """(a weight [n, k] in ``fmt``, its values as float64)."""
    if fmt in QUANT:
        b = random_blocks(fmt, n, k, seed)
        return QTensor(torch.from_numpy(b), get_format(fmt), (n, k)), gguf_dequantize(b, GGML[fmt]).astype(np.float64)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(getattr(torch, fmt))
    return w, w.double().numpy()


class Experts:
    """E random experts of hidden size H and width I, parts in ``fmts`` (gate, up, down); a callable as moe_ffn
    takes it, remembering which experts it was asked for."""

    def __init__(self, E: int, H: int, I: int, fmts, seed: int = 0):
        self.parts, self.dense, self.asked = [], [], []
        for e in range(E):
            shapes = ((I, H), (I, H), (H, I))
            made = [make_part(f, *s, seed=1000 * seed + 3 * e + p) for p, (f, s) in enumerate(zip(fmts, shapes))]
            self.parts.append({name: m[0] for name, m in zip(moe.PARTS, made)})
            self.dense.append([m[1] for m in made])

    def __call__(self, e: int) -> dict:
        self.asked.append(e)
        return self.parts[e]


def routing(T: int, E: int, k: int, seed: int, dtype=torch.float32):
    """ids [T, k] (distinct per token, drawn from few experts so that tokens share them) and softmax weights."""
    g = torch.Generator().manual_seed(seed)
    pool = min(E, k + 2)
    ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(T)]) * (E // pool)
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1).to(dtype)
    return ids.to(torch.int64), w


def reference64(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, experts: Experts) -> np.ndarray:
    out = np.zeros(h.shape, dtype=np.float64)
    for t in range(h.shape[0]):
        x = h[t].double().numpy()
        for j in range(ids.shape[1]):
            g, u, d = experts.dense[int(ids[t, j])]
            a = g @ x
            a = a / (1.0 + np.exp(-np.clip(a, -700, 700))) * (u @ x)
            out[t] += float(w[t, j]) * (d @ a)
    return out


def nmse(y: torch.Tensor, ref: np.ndarray) -> float:
    y = y.double().numpy()
    return float(((y - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-300))


def hidden(T: int, H: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def shape_for(fmts) -> tuple[int, int]:
    """(H, I): multiples of 256 for a K-quant, else rows that are not a multiple of the 32-row task for floats."""
    if any(f.endswith("_k") for f in fmts):
        return 512, 768
    if all(f.startswith("float") or f == "bfloat16" for f in fmts):
        return 72, 200
    return 96, 160


@pytest.fixture
def no_reference(monkeypatch):
    """CPU tokens must take the kernels: the reference path fails the test if called."""
    def fail(*a, **k):
        raise AssertionError("the reference path ran for CPU tokens")
    monkeypatch.setattr(moe, "moe_ffn_reference", fail)


@pytest.mark.parametrize("fmts", UNIFORM + MIXED, ids="-".join)
@pytest.mark.parametrize("k", (1, 2, 8))
def test_decode_matches_float64(fmts, k, no_reference):
    H, I = shape_for(fmts)
    experts = Experts(10, H, I, fmts, seed=k)
    ids, w = routing(1, 10, k, seed=k)
    h = hidden(1, H, seed=k)
    y = moe.moe_ffn(h, ids, w, experts)
    assert y.dtype == torch.float32 and y.shape == (1, H)
    assert nmse(y, reference64(h, ids, w, experts)) <= NMSE_F32
    assert sorted(experts.asked) == sorted(ids[0].tolist())  # only the routed experts are touched


@pytest.mark.parametrize("fmts", UNIFORM + MIXED, ids="-".join)
@pytest.mark.parametrize("T,k", [(3, 1), (5, 2), (13, 8)])
def test_prefill_matches_float64(fmts, T, k, no_reference):
    H, I = shape_for(fmts)
    experts = Experts(10, H, I, fmts, seed=T)
    ids, w = routing(T, 10, k, seed=T)
    h = hidden(T, H, seed=T)
    y = moe.moe_ffn(h, ids, w, experts)
    assert y.dtype == torch.float32 and y.shape == (T, H)
    assert nmse(y, reference64(h, ids, w, experts)) <= NMSE_F32
    assert sorted(experts.asked) == sorted(set(ids.reshape(-1).tolist()))  # each expert hit, once


@pytest.mark.parametrize("fmts", [("q4_1",) * 3, ("q4_k", "q4_k", "q6_k"), ("bfloat16", "q8_0", "float32")],
                         ids="-".join)
@pytest.mark.parametrize("T,k", [(1, 2), (13, 8)])
def test_reference_path_matches_float64(fmts, T, k):
    """transformers' loop itself (what the kernels are held to, and the path of other devices and dtypes)."""
    H, I = shape_for(fmts)
    experts = Experts(10, H, I, fmts, seed=T)
    ids, w = routing(T, 10, k, seed=T)
    h = hidden(T, H, seed=T)
    bound = NMSE_F32 if "bfloat16" not in fmts else NMSE_BF16  # a bfloat16 part computes in bfloat16 here
    assert nmse(moe.moe_ffn_reference(h, ids, w, experts), reference64(h, ids, w, experts)) <= bound


@pytest.mark.parametrize("fmts", [("q4_0",) * 3, ("q4_k", "q4_k", "q6_k"), ("float32", "bfloat16", "q5_k")],
                         ids="-".join)
@pytest.mark.parametrize("group_bytes", (1, 40_000, moe.GROUP_BYTES))
def test_grouped_batches_of_rows(fmts, group_bytes, monkeypatch):
    """Rows taken a few at a time (one row; a batch that splits experts; all at once) give the same output
    (to float32 rounding: a token tile of another size sums in another order)."""
    H, I = shape_for(fmts)
    experts = Experts(6, H, I, fmts)
    ids, w = routing(21, 6, 3, seed=4)
    h = hidden(21, H, seed=4)
    ref = moe.moe_ffn(h, ids, w, experts)
    monkeypatch.setattr(moe, "GROUP_BYTES", group_bytes)
    assert nmse(moe.moe_ffn(h, ids, w, experts), ref.double().numpy()) <= 1e-12
    assert nmse(ref, reference64(h, ids, w, experts)) <= NMSE_F32


@pytest.mark.parametrize("fmts", [("q4_0",) * 3, ("q4_k", "q4_k", "q6_k"), ("float32",) * 3,
                                  ("bfloat16", "q4_1", "float32")], ids="-".join)
@pytest.mark.parametrize("T", (1, 2, 9))
def test_kernels_equal_reference_path(fmts, T):
    """The decode and grouped kernels and transformers' loop (moe_ffn_reference) agree to float32 rounding."""
    H, I = shape_for(fmts)
    experts = Experts(16, H, I, fmts)
    ids, w = routing(T, 16, 8, seed=3)
    h = hidden(T, H, seed=3)
    y = moe.moe_ffn(h, ids, w, experts)
    ref = moe.moe_ffn_reference(h, ids, w, experts)
    bound = 1e-12 if "bfloat16" not in fmts else NMSE_BF16
    assert nmse(y, ref.double().numpy()) <= bound


@pytest.mark.parametrize("fmts", [("q4_k", "q4_k", "q6_k"), ("q8_0",) * 3, ("bfloat16",) * 3], ids="-".join)
@pytest.mark.parametrize("T", (1, 6))
def test_bfloat16_hidden(fmts, T):
    """bfloat16 h: bfloat16 out, within bfloat16 rounding of the float64 reference; the kernels round
    as index_add_ in bfloat16 does (product, then sum, rounded in ascending expert order)."""
    H, I = shape_for(fmts)
    experts = Experts(12, H, I, fmts)
    ids, w = routing(T, 12, 8, seed=T, dtype=torch.bfloat16)
    h = hidden(T, H, seed=T, dtype=torch.bfloat16)
    y = moe.moe_ffn(h, ids, w, experts)
    assert y.dtype == torch.bfloat16 and y.shape == (T, H)
    assert nmse(y, reference64(h, ids, w, experts)) <= NMSE_BF16
    if "bfloat16" not in fmts:  # (a bfloat16 part's reference computes in bfloat16)
        ref = moe.moe_ffn_reference(h, ids, w, experts)
        diff = (y.float() - ref.float()).abs()
        ulp = ref.float().abs() * 2.0 ** -7  # one bfloat16 step
        assert (diff <= ulp).all()  # the inner products differ at float32 rounding only
        assert (diff == 0).float().mean() > 0.95


def test_float16_hidden_takes_the_reference_path():
    experts = Experts(4, 96, 160, ("q4_0",) * 3)
    ids, w = routing(1, 4, 2, seed=5)
    h = hidden(1, 96, seed=5, dtype=torch.float16)
    y = moe.moe_ffn(h, ids, w, experts)
    assert y.dtype == torch.float16
    assert nmse(y, reference64(h, ids, w, experts)) <= 1e-5


def test_unsorted_ids_sum_in_ascending_expert_order():
    """The kernel sums in ascending expert id whatever the slot order: permuting a token's slots changes nothing."""
    experts = Experts(8, 96, 160, ("q4_1",) * 3)
    ids, w = routing(1, 8, 4, seed=7)
    h = hidden(1, 96, seed=7, dtype=torch.bfloat16)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(moe.moe_ffn(h, ids, w, experts), moe.moe_ffn(h, ids[:, perm], w[:, perm], experts))


def test_mismatched_shapes_are_value_errors():
    experts = Experts(4, 96, 160, ("q4_0",) * 3)
    ids, w = routing(2, 4, 2, seed=1)
    with pytest.raises(ValueError, match="do not fit hidden size 64"):
        moe.moe_ffn(hidden(2, 64, seed=1), ids, w, experts)
    with pytest.raises(ValueError, match="do not fit hidden size 64"):
        moe.moe_ffn(hidden(1, 64, seed=1), ids[:1], w[:1], experts)
    with pytest.raises(ValueError, match=r"ids \[T, k\]"):
        moe.moe_ffn(hidden(2, 96, seed=1), ids, w[:, :1], experts)
    experts.parts[ids[0, 0]] = {"gate_proj": experts.parts[0]["gate_proj"]}
    with pytest.raises(ValueError, match="has no up_proj"):
        moe.moe_ffn(hidden(1, 96, seed=1), ids[:1], w[:1], experts)


def test_warm_up_compiles():
    moe.warm_up()
