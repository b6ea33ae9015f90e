"""Quantized-weight kernels (kernels_cpu/quant.py) against gguf-py, the reference for ggml's blocks.

* dequantize_rows / gather_rows: bit for bit ``gguf.quants.dequantize`` (float32 bits compared).
* matvec: the float64 product of the dequantized matrix; metric: per row,
  |y - ref| / (|W| @ |x|) <= MV_TOL (1e-6). float32 accumulation measures 3e-8..1.5e-7 here;
  one wrong nibble, scale or offset term gives ~1e-3 or more.
* quantize: ``gguf.quants.quantize`` byte for byte, edge cases included.
* matmul (the fused small-batch kernel): the float64 product, same metric per element
  (|Y - ref| / (|x| @ |W|.T) <= MV_TOL); measured <= 9e-8 for T = 2..21 (every token tile).
* linear / embedding: torch's F.linear / row lookup on the dequantized matrix; linear's decode row is
  the mat-vec bit for bit, its small batches (2..SMALL_BATCH_TOKENS rows) the fused kernel, its larger
  ones the prefill path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kernels_cpu import quant, quant_encode
from storage.formats import QTensor, get_format

GGML = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q8_0": (0,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
MV_TOL = 1e-6


def random_blocks(fmt: str, n: int, k: int, seed: int) -> np.ndarray:
    """Valid rows of blocks: gguf-py's quantization of random floats for the formats it quantizes
    (scales varying per row), random bytes with finite float16 scales (a few subnormal) for the K-quants."""
    rng = np.random.default_rng(seed)
    if fmt in quant.QUANTIZE_FORMATS:
        x = rng.standard_normal((n, k), dtype=np.float32) * np.exp(rng.uniform(-4, 2, (n, 1))).astype(np.float32)
        return gguf_quantize(x, GGML[fmt])
    f = get_format(fmt)
    w = rng.integers(0, 256, (n, k // f.block, f.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        h = (rng.standard_normal(w.shape[:2]) * np.exp(rng.uniform(-9, 0, w.shape[:2]))).astype(np.float16)
        w[:, :, off:off + 2] = h.view(np.uint8).reshape(*w.shape[:2], 2)
    return w.reshape(n, -1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_dequantize_and_gather_are_bit_exact(fmt):
    f = get_format(fmt)
    n, k = 37, 4 * max(f.block, 64)
    w = random_blocks(fmt, n, k, seed=1)
    ref = gguf_dequantize(w, GGML[fmt])
    out = np.full((n, k), np.nan, dtype=np.float32)
    assert same_bits(quant.dequantize_rows(fmt, w, out), ref)
    part = np.empty((5, k), dtype=np.float32)
    assert same_bits(quant.dequantize_rows(fmt, w, part, row0=30), ref[30:35])
    ids = np.array([36, 0, 5, 5, 17], dtype=np.int64)
    assert same_bits(quant.gather_rows(fmt, w, ids, np.empty((5, k), dtype=np.float32)), ref[ids])


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_matvec_matches_float64_reference(fmt):
    block = get_format(fmt).block
    rng = np.random.default_rng(2)
    for n in (1, 3, 31, 33, 257):  # rows not divisible by ROWS_PER_TASK, and fewer than one task
        for k in (block, 2 * block, 4096):
            w = random_blocks(fmt, n, k, seed=n + k)
            wf = gguf_dequantize(w, GGML[fmt]).astype(np.float64)
            x = (rng.standard_normal(k) * rng.uniform(0.1, 10)).astype(np.float32)
            out = np.full(n, np.nan, dtype=np.float32)
            quant.matvec(fmt, w, x, out)
            ref = wf @ x
            scale = np.abs(wf) @ np.abs(x.astype(np.float64))
            err = np.abs(out - ref) / np.maximum(scale, 1e-30)
            assert err.max() <= MV_TOL, (n, k, err.max())


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_matmul_matches_float64_reference(fmt):
    block = get_format(fmt).block
    rng = np.random.default_rng(9)
    for n in (1, 3, 33, 70):  # odd rows (a pair's second row repeats the first, unstored), a short last task
        for k in (block, 3 * block, 4096):  # k = 4096: rows of x in chunks of 16 (quant.MM_CHUNK_BYTES)
            w = random_blocks(fmt, n, k, seed=n + k)
            wf = gguf_dequantize(w, GGML[fmt]).astype(np.float64)
            for T in (2, 3, 7, 8, 13, 21):  # token tiles 8, 4, 2, 1 and their sums
                x = (rng.standard_normal((T, k)) * rng.uniform(0.1, 10)).astype(np.float32)
                out = np.full((T, n), np.nan, dtype=np.float32)
                quant.matmul(fmt, w, x, out)
                ref = x.astype(np.float64) @ wf.T
                scale = np.abs(x.astype(np.float64)) @ np.abs(wf).T
                err = np.abs(out - ref) / np.maximum(scale, 1e-30)
                assert err.max() <= MV_TOL, (n, k, T, err.max())


def test_matvec_checks_shapes():
    w = random_blocks("q4_1", 4, 64, seed=3)
    with pytest.raises(ValueError):
        quant.matvec("q4_1", w, np.zeros(96, dtype=np.float32), np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError):
        quant.matvec("q4_1", w, np.zeros(64, dtype=np.float32), np.zeros(3, dtype=np.float32))
    with pytest.raises(IndexError):
        quant.gather_rows("q4_1", w, np.array([4], dtype=np.int64), np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(ValueError):
        quant.matmul("q4_1", w, np.zeros((3, 96), dtype=np.float32), np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        quant.matmul("q4_1", w, np.zeros((3, 64), dtype=np.float32), np.zeros((2, 4), dtype=np.float32))


def edge_case_rows(k: int, rng) -> np.ndarray:
    """Rows of 32-blocks that stress gguf-py's rounding and the float16 conversion of the scales."""
    blocks = [
        np.zeros(32), np.full(32, -0.0), np.full(32, 3.0), np.full(32, -2.5),  # all zero, constant
        np.where(np.arange(32) % 3 == 0, -0.0, 0.0),  # both zeros only
        np.r_[np.zeros(8), -np.zeros(8), rng.uniform(0.1, 1, 16)],  # both zeros, min 0
        np.r_[-np.zeros(5), rng.uniform(-1, -0.1, 27)],  # -0 is the max
        rng.standard_normal(32) * 1e30, rng.standard_normal(32) * 7e5,  # scale overflows float16
        rng.standard_normal(32) * 65504 * 8,  # around float16's largest scale
        rng.standard_normal(32) * 1e-30, rng.standard_normal(32) * 1e-6,  # scales vanish, subnormal
        rng.standard_normal(32) * 1e-38,  # float32 subnormal inputs
        np.r_[1.0, -1.0, rng.uniform(-1, 1, 30)],  # equal |max| of both signs
        np.r_[np.full(16, 0.5), np.full(16, -0.5)],  # ties on rounding
        np.r_[127.0, 0.49999997, -0.49999997, 2.5, -2.5, 1.4999999, 126.5, rng.uniform(-127, 127, 25)],  # q8_0: d = 1
        np.arange(32) - 15.5, (np.arange(32) - 16) / 16,
        np.r_[np.inf, rng.standard_normal(31)], np.r_[rng.standard_normal(31), np.nan],  # non-finite
        np.r_[np.finfo(np.float32).max, -np.finfo(np.float32).max, np.zeros(30)],
    ]
    rows = np.concatenate(blocks).astype(np.float32)
    rows = np.concatenate([rows, rng.standard_normal(-rows.size % k).astype(np.float32)])
    return rows.reshape(-1, k)


@pytest.mark.parametrize("fmt", quant.QUANTIZE_FORMATS)
def test_quantize_matches_gguf_byte_for_byte(fmt):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((67, 256), dtype=np.float32) * np.exp(rng.uniform(-8, 8, (67, 1))).astype(np.float32)
    with np.errstate(all="ignore"):  # gguf-py casts NaN to integers in the non-finite blocks
        assert np.array_equal(quant.quantize(fmt, x), gguf_quantize(x, GGML[fmt]))
        edges = edge_case_rows(128, rng)
        assert np.array_equal(quant.quantize(fmt, edges), gguf_quantize(edges, GGML[fmt]))
    x3 = x[:6].reshape(2, 3, 256)  # leading dimensions are kept
    assert np.array_equal(quant.quantize(fmt, x3), gguf_quantize(x3, GGML[fmt]))


def test_float16_conversion_matches_numpy():
    rng = np.random.default_rng(5)
    bits = np.concatenate([
        rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32),
        rng.integers(0x33000000 - 4, 0x38800000 + 8192, 50_000).astype(np.uint32),  # float16 subnormal range
        rng.integers(0x477FE000, 0x47800008, 20_000).astype(np.uint32),  # rounding up to inf
        np.array([0, 0x80000000, 0x33000000, 0x33000001, 0x387FE000, 0x387FF000, 0x477FEFFF, 0x477FF000,
                  0x7F800000, 0xFF800000], dtype=np.uint32),
    ])
    f = bits.view(np.float32)
    f = f[np.isfinite(f) | np.isinf(f)]  # NaN payloads are numpy's business (gguf-py handles those blocks)
    with np.errstate(over="ignore"):
        assert np.array_equal(quant_encode.f16_bits(f), f.astype(np.float16).view(np.uint16))


def qtensor(fmt: str, n: int, k: int, seed: int) -> tuple[QTensor, torch.Tensor]:
    w = random_blocks(fmt, n, k, seed)
    return QTensor(torch.from_numpy(w), get_format(fmt), (n, k)), torch.from_numpy(gguf_dequantize(w, GGML[fmt]))


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "q6_k"])
def test_linear_decode_and_prefill(fmt, monkeypatch):
    n, k = 300, 512
    w, wf = qtensor(fmt, n, k, seed=6)
    g = torch.Generator().manual_seed(7)
    b = torch.randn(n, generator=g)
    x1 = torch.randn(1, k, generator=g)
    ref = F.linear(x1.double(), wf.double(), b.double())
    scale = F.linear(x1.double().abs(), wf.double().abs(), b.double().abs())
    assert ((quant.linear(x1, w, b) - ref).abs() / scale).max() <= MV_TOL
    assert torch.equal(quant.linear(x1, w), quant.matvec_t(w.data, fmt, x1[0])[None])  # decode: the mat-vec
    # prefill: a buffer bound below the matrix, so several blocks and a short last one are used
    monkeypatch.setattr(quant, "SMALL_BATCH_TOKENS", 4)
    monkeypatch.setattr(quant, "PREFILL_BLOCK_BYTES", 64 * k * 4)
    monkeypatch.setattr(quant, "_prefill_buf", np.empty(0, dtype=np.float32))
    x5 = torch.randn(5, k, generator=g)
    torch.testing.assert_close(quant.linear(x5, w, b), F.linear(x5, wf, b))
    torch.testing.assert_close(quant.linear(x5, w), F.linear(x5, wf))
    assert quant._prefill_buf.nbytes <= 64 * k * 4
    x3d = x5.reshape(1, 5, k).to(torch.bfloat16)  # leading dimensions and the activation dtype are kept
    y = quant.linear(x3d, w, b)
    assert y.shape == (1, 5, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x3d.float(), wf, b).to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_k"])
def test_linear_small_batch_is_fused(fmt, monkeypatch):
    n, k = 70, 512
    w, wf = qtensor(fmt, n, k, seed=10)
    g = torch.Generator().manual_seed(11)
    b = torch.randn(n, generator=g)
    monkeypatch.setattr(quant, "_prefill_buf", np.empty(0, dtype=np.float32))
    for T in (2, 5, 16, quant.SMALL_BATCH_TOKENS):
        x = torch.randn(T, k, generator=g) * 3
        ref = F.linear(x.double(), wf.double(), b.double())
        scale = F.linear(x.double().abs(), wf.double().abs(), b.double().abs())
        assert ((quant.linear(x, w, b) - ref).abs() / scale).max() <= MV_TOL, T
        assert torch.equal(quant.linear(x, w, b), quant.linear(x, w) + b)  # bias added after the product
    assert quant._prefill_buf.size == 0  # no dequantized rows: the fused kernel ran
    x = torch.randn(quant.SMALL_BATCH_TOKENS + 1, k, generator=g)  # one past the threshold: the prefill path
    torch.testing.assert_close(quant.linear(x, w, b), F.linear(x, wf, b))
    assert quant._prefill_buf.size > 0
    x3d = torch.randn(2, 3, k, generator=g).to(torch.bfloat16)  # leading dimensions and dtype are kept
    y = quant.linear(x3d, w, b)
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x3d.float(), wf, b).to(torch.bfloat16))


def test_embedding_and_matvec_t():
    w, wf = qtensor("q8_0", 50, 96, seed=8)
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    e = quant.embedding(ids, w)
    assert e.shape == (2, 3, 96) and e.dtype == torch.float32
    assert torch.equal(e, wf[ids])
    x = torch.randn(96)
    y = quant.matvec_t(w.data, "q8_0", x)
    torch.testing.assert_close(y, wf @ x)


def test_warm_up_compiles_every_kernel():
    quant.warm_up()
    for kernels in (quant._MATVEC, quant._MM, quant._DEQUANT, quant_encode._QUANTIZE):
        assert all(k.signatures for k in kernels.values())
