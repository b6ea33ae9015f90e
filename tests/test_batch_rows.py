"""Row invariance: a row's result does not depend on how many rows are computed with it, nor where it is.

The server batches sequences' decode rows (offload_rt.batch); its promise — a request's greedy answer is
the same alone and beside others — rests on these kernels and on ops.row_invariant().
"""

from __future__ import annotations

import torch
import pytest

from kernels_cpu.matvec import rows_linear
from offload_rt.models import ops
from storage import transcode
from storage.formats import QTensor, get_format


def _check_invariant(f, X: torch.Tensor):
    alone = [f(X[i:i + 1])[0] for i in range(X.shape[0])]
    for m in (2, 3, 5, 8, 9, X.shape[0]):
        got = f(X[:m])
        assert all(torch.equal(got[i], alone[i]) for i in range(m)), m
    flipped = f(X.flip(0))  # positions swapped
    assert all(torch.equal(flipped[X.shape[0] - 1 - i], alone[i]) for i in range(X.shape[0]))
    return torch.stack(alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_rows_are_invariant_and_close_to_linear(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 256, generator=g).to(dtype)
    X = torch.randn(17, 256, generator=g).to(dtype)
    y = _check_invariant(lambda x: rows_linear(x, w), X)
    ref = torch.nn.functional.linear(X.double(), w.double())
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_quantized_rows_are_invariant_and_close_to_the_dequantized_product(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 256, generator=g)
    data = torch.from_numpy(transcode.quantize(w.numpy(), fmt))
    qt = QTensor(data, get_format(fmt), (300, 256))
    X = torch.randn(19, 256, generator=g)
    y = _check_invariant(lambda x: rows_linear(x, qt), X)
    deq = torch.from_numpy(transcode.dequantize(data.numpy(), fmt)).reshape(300, 256)
    ref = X.double() @ deq.double().T
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_row_invariant_scope_routes_linear_and_row_ops():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 256, generator=g)
    x = torch.randn(1, 256, generator=g)
    norm = torch.randn(256, generator=g)
    assert ops.fast_row(x, norm)  # one CPU row: the fused kernels outside the scope
    with ops.row_invariant():
        assert not ops.fast_row(x, norm)
        assert torch.equal(ops.linear(x, w), rows_linear(x, w))
        X = torch.randn(6, 256, generator=g)
        # torch's row-wise RMSNorm: the same bits per row for 1 or 6 rows
        assert torch.equal(ops.rms_norm(X, norm, 1e-5)[3], ops.rms_norm(X[3:4], norm, 1e-5)[0])
    assert not ops._ROW_INVARIANT
