"""Numba decode mat-vec kernels against torch, with a relative error metric (NMSE)."""

import pytest
import torch

from kernels_cpu import matvec as mv


def nmse(a, b):
    a, b = a.double(), b.double()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (1000, 2048), (33, 4096),
                                   (49152, 64)])
def test_matvec_matches_float64_reference(dtype, shape):
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    w = torch.randn(shape, generator=g).to(dtype)
    x = torch.randn(shape[1], generator=g).to(dtype)
    ref = w.double() @ x.double()
    out = mv.matvec(w, x)
    assert out.shape == (shape[0],) and out.dtype == torch.float32
    assert nmse(out, ref) < 1e-10  # float32 accumulation of exact inputs
    # and no worse than torch on the same values in float32 (bf16 is widened, as the kernel does):
    # both are ~1e-14, far below the bound above, so this fails on its own for a sloppier kernel
    torch_err = nmse(torch.nn.functional.linear(x[None].float(), w.float())[0], ref)
    assert nmse(out, ref) <= 4 * torch_err


def test_linear_dispatch_and_bias():
    w = torch.randn(256, 512)
    b = torch.randn(256)
    x = torch.randn(1, 512)
    assert mv.usable(x, w)
    assert torch.allclose(mv.linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4)
    x3 = torch.randn(3, 512)  # prefill rows go to torch
    assert not mv.usable(x3, w)
    assert torch.equal(mv.linear(x3, w, b), torch.nn.functional.linear(x3, w, b))
    assert not mv.usable(x.half(), w.half())  # float16 falls back to torch


def test_decode_scope_restores_threads():
    n = torch.get_num_threads()
    with mv.decode_scope():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
