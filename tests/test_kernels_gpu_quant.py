"""kernels_gpu.quant (the device path: torch-op dequantization, then F.linear), run on the CPU: its linear in
row blocks equals F.linear over the whole dequantized matrix, and only looked-up embedding rows are decoded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from kernels_gpu import quant as gq
from storage.formats import FORMATS, QTensor
from tests.ggml_kquants import quantize_k


def qtensor(fmt: str, rows: int, cols: int, seed: int) -> tuple[QTensor, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    qt = Q[fmt.upper()]
    raw = quantize_k(w, qt)[0] if fmt.endswith("_k") else quantize(w, qt)
    return QTensor(torch.from_numpy(raw), FORMATS[fmt], (rows, cols)), dequantize(raw, qt).reshape(rows, cols)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k"])
def test_linear_in_row_blocks_equals_one_matmul(monkeypatch, fmt):
    w, ref = qtensor(fmt, 37, 512, seed=1)
    x = torch.randn(3, 512)
    b = torch.randn(37)
    want = F.linear(x, torch.from_numpy(ref), b)
    assert torch.equal(gq.linear(x, w, b), want)  # one block: the same call
    monkeypatch.setattr(gq, "BLOCK_ELEMENTS", 512 * 5)  # blocks of 5 rows (the last one 2)
    got = gq.linear(x, w, b)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    got16 = gq.linear(x.to(torch.bfloat16), w, b.to(torch.bfloat16))
    assert got16.dtype == torch.bfloat16 and torch.allclose(got16.float(), want, rtol=0.05, atol=0.5)


def test_embedding_decodes_only_the_rows_asked_for():
    w, ref = qtensor("q4_k", 50, 256, seed=2)
    ids = torch.tensor([7, 0, 49, 7])
    assert np.array_equal(gq.embedding(ids, w).numpy(), ref[[7, 0, 49, 7]])
