"""Decode mat-vec (one activation row times a weight matrix) as Numba kernels.

Decode is a stream over the weights, so its speed is the memory bandwidth a mat-vec
reaches. Measured here with 2 threads: torch reaches ~10 GB/s in float32 and
~15-19 GB/s in bfloat16; these kernels reach ~20 GB/s (float32) and ~25-30 GB/s
(bfloat16) by splitting output rows into blocks across threads and letting LLVM
vectorise the dot products. bfloat16 weights are widened to float32 in registers
(a bf16 is the top half of a float32), two per 32-bit load; accumulation is float32,
so results differ from torch by rounding only (tested with an error metric).

``linear(x, w, b)`` is the entry point: one row on the CPU in float32/bfloat16 goes
to a kernel; everything else (prefill, float16, CUDA) to ``torch.nn.functional.linear``.
A block-quantized weight (storage.formats.QTensor) goes to kernels_cpu.quant on the CPU
and to kernels_gpu.quant (dequantize on the device, then matmul) elsewhere;
``embedding(ids, table)`` dispatches the same way.
Decode runs torch with one thread (see :func:`decode_scope`): the kernels bring their
own parallelism, and two thread pools spinning against each other on two cores
cost more than torch's small element-wise ops gain from threads.
"""

from __future__ import annotations

from contextlib import contextmanager

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from storage.formats import QTensor

ROWS_PER_TASK = 32  # output rows per parallel task: big enough to amortise scheduling
MIN_BYTES = 64 << 10  # below this the call overhead wins: use torch


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret a uint32's bits as a float32 (an LLVM bitcast, free)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _matvec_f32(w, x, out):  # pragma: no cover - compiled
    n, k = w.shape
    for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(b * ROWS_PER_TASK, min(n, (b + 1) * ROWS_PER_TASK)):
            acc = np.float32(0.0)
            for j in range(k):
                acc += w[i, j] * x[j]
            out[i] = acc


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _matvec_bf16(w2, x, out):  # pragma: no cover - compiled
    # w2: [n, k/2] uint32, each holding two bf16 (little-endian: low half = even column).
    n, k2 = w2.shape
    hi_mask = np.uint32(0xFFFF0000)
    sh = np.uint32(16)
    for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(b * ROWS_PER_TASK, min(n, (b + 1) * ROWS_PER_TASK)):
            acc = np.float32(0.0)
            for j in range(k2):
                v = w2[i, j]
                acc += _bits_to_f32(v << sh) * x[2 * j] + _bits_to_f32(v & hi_mask) * x[2 * j + 1]
            out[i] = acc


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_f32(w, x, out):  # pragma: no cover - compiled
    # x [T, k] -> out [T, n]: each row by the same loop whatever T is (row-invariant), the task's weight rows
    # read from RAM once for all T rows (they stay in L1/L2 while the rows go by)
    n, k = w.shape
    for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(b * ROWS_PER_TASK, min(n, (b + 1) * ROWS_PER_TASK)):
            for r in range(x.shape[0]):
                acc = np.float32(0.0)
                for j in range(k):
                    acc += w[i, j] * x[r, j]
                out[r, i] = acc


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_bf16(w2, x, out):  # pragma: no cover - compiled
    n, k2 = w2.shape
    hi_mask = np.uint32(0xFFFF0000)
    sh = np.uint32(16)
    for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(b * ROWS_PER_TASK, min(n, (b + 1) * ROWS_PER_TASK)):
            for r in range(x.shape[0]):
                acc = np.float32(0.0)
                for j in range(k2):
                    v = w2[i, j]
                    acc += _bits_to_f32(v << sh) * x[r, 2 * j] + _bits_to_f32(v & hi_mask) * x[r, 2 * j + 1]
                out[r, i] = acc


def rows_linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` computed row by row with the same arithmetic for every row, whatever the number of rows
    (float32/bfloat16 or quantized weights on the CPU): a sequence's decode row gives the same bits alone
    and batched with others (the server's continuous batching; ``F.linear`` is not row-invariant: one row
    goes to a gemv, more to a gemm). Other weights and devices: ``F.linear`` (no such promise)."""
    if isinstance(w, QTensor):
        if w.data.is_cuda or x.is_cuda or not w.data.is_contiguous():
            return linear(x, w, b)
        y = _quant().rows_linear(x.reshape(-1, w.shape[1]), w)
    elif (x.device.type == "cpu" and w.dtype == x.dtype and w.dtype in (torch.float32, torch.bfloat16)
          and w.is_contiguous() and w.shape[1] % 2 == 0):
        xf = x.reshape(-1, w.shape[1]).to(torch.float32).contiguous()
        y = torch.empty(xf.shape[0], w.shape[0], dtype=torch.float32)
        if w.dtype == torch.bfloat16:
            _rows_bf16(w.view(torch.int32).numpy().view(np.uint32), xf.numpy(), y.numpy())
        else:
            _rows_f32(w.numpy(), xf.numpy(), y.numpy())
    else:
        return F.linear(x, w, b)
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [n, k] (float32 or bfloat16, contiguous), x [k] -> [n] float32."""
    out = torch.empty(w.shape[0], dtype=torch.float32)
    xf = x.to(torch.float32).contiguous()
    if w.dtype == torch.bfloat16:
        _matvec_bf16(w.view(torch.int32).numpy().view(np.uint32), xf.numpy(), out.numpy())
    else:
        _matvec_f32(w.numpy(), xf.numpy(), out.numpy())
    return out


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu" and w.dtype == x.dtype
            and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous() and w.shape[1] % 2 == 0
            and w.numel() * w.element_size() >= MIN_BYTES)


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the fast decode path for a single float32/bfloat16 row on the CPU."""
    if isinstance(w, QTensor):
        if not w.data.is_cuda:
            return _quant().linear(x, w, b)
        from kernels_gpu import quant as gpu_quant

        return gpu_quant.linear(x, w, b)
    if not usable(x, w):
        return F.linear(x, w, b)
    y = matvec(w, x[0])[None]
    if b is not None:
        y = y + b
    return y.to(x.dtype)


_QUANT = None


def _quant():
    """kernels_cpu.quant, imported on first use (it imports this module) and kept: decode calls it ~200
    times a token, where even an import statement's lookup shows."""
    global _QUANT
    if _QUANT is None:
        from kernels_cpu import quant

        _QUANT = quant
    return _QUANT


def embedding(ids: torch.Tensor, table) -> torch.Tensor:
    """Rows ``ids`` of an embedding table (float, or quantized: only those rows are dequantized, to float32)."""
    if isinstance(table, QTensor):
        if table.device.type == "cpu":
            from kernels_cpu import quant

            return quant.embedding(ids.to(table.device), table)
        from kernels_gpu import quant as gpu_quant

        return gpu_quant.embedding(ids, table)
    return F.embedding(ids, table)


def warm_up() -> None:
    """Compile (or load from Numba's cache) both kernels now, so their cost is part of the
    process's measured baseline and no compilation happens mid-run."""
    out = np.empty(2, dtype=np.float32)
    _matvec_f32(np.zeros((2, 2), dtype=np.float32), np.zeros(2, dtype=np.float32), out)
    _matvec_bf16(np.zeros((2, 1), dtype=np.uint32), np.zeros(2, dtype=np.float32), out)
    rows = np.empty((1, 2), dtype=np.float32)
    _rows_f32(np.zeros((2, 2), dtype=np.float32), np.zeros((1, 2), dtype=np.float32), rows)
    _rows_bf16(np.zeros((2, 1), dtype=np.uint32), np.zeros((1, 2), dtype=np.float32), rows)


def set_threads(n: int) -> None:
    """Threads for the kernels (capped at what Numba was started with)."""
    nb.set_num_threads(max(1, min(n, nb.config.NUMBA_NUM_THREADS)))


@contextmanager
def decode_scope(threads: int | None = None):
    """Run torch single-threaded while the kernels do the heavy, parallel part of a decode step
    (on ``threads`` threads when given: see offload_rt.threads.ThreadTuner)."""
    n = torch.get_num_threads()
    k = nb.get_num_threads()
    if threads is not None:
        set_threads(threads)
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads is not None:
            nb.set_num_threads(k)
        if n != 1:
            torch.set_num_threads(n)
