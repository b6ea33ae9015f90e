"""Numba kernels for block-quantized weights (ggml's q4_0, q4_1, q8_0, q4_k, q5_k, q6_k).

A quantized matrix of logical shape [n, k] is its bytes, uint8 [n, k // block * block_bytes]
(storage/formats.py). Two jobs here, one kernel per format each, and the model's entry points
(:func:`linear`, :func:`embedding`); the blocks are decoded by the LLVM IR intrinsics of
kernels_cpu/quant_ir.py, and quantization (:func:`quantize`, q4_0/q4_1/q8_0, byte for byte
``gguf.quants.quantize``) lives in kernels_cpu/quant_encode.py, re-exported here:

* :func:`matvec`, the decode mat-vec, the hot path of a decode step: a stream over the weight
  bytes, parallel over blocks of output rows (``nb.prange``, as kernels_cpu/matvec.py). Each block
  is widened to float32 in registers (no temporary float matrix) and multiplied with float32
  activations; the block's scale is applied once per 16 or 32 products, not per weight, and the
  offset of the affine formats (q4_1's m, the K-quants' dmin * m) once per 32 weights against the
  sum of x over those 32 (computed once per call). Accumulation is float32, so results differ from
  the float64 product of the dequantized matrix by float32 rounding only (tested with an error
  metric). The activations are *not* rounded to int8 as llama.cpp does: a prototype of that path
  (x as int8 per 32, AVX512-VNNI vpdpbusd, two q4_1 blocks per instruction) computed only
  ~1.1-1.2x faster from cache and no faster from RAM, with a relative error of ~1% instead of
  ~1e-7, while the float path streams near the memory bandwidth (tools/bench_quant_kernels.py).
  Weights are prefetched in software (quant_ir.PREFETCH_BYTES). Tried and dropped: two rows per
  call sharing the x loads (+10 % from cache, but two interleaved streams defeat the hardware
  prefetcher: -60 % from RAM for k >= 1536), int->float conversion through the 2^23 bit trick (no gain).
* :func:`matmul`, the fused small-batch product (x [T, k] times w.T): what the speculation draft runs
  on its batches of tree leaves (T = 2..128), and prefill on AVX-512. Dequantizing rows to float32 for
  torch.mm moved 4 bytes per weight per call through memory (~540 MB per forward of the default model)
  for a few tokens' worth of arithmetic; here each block of two weight rows is decoded once into
  registers, as float32 (scale and offset applied by one FMA per 16 weights), and multiplied with 8
  activation rows at a time into 16 register accumulators (quant_ir.MM_ROWS x MM_TOKENS; a narrower
  pass on AVX2 machines), parallel over blocks of output rows like the mat-vec. Compute-bound from
  T ~ 4: ~80-95 G multiply-adds/s per Zen 4 core (q4_1; q8_0 ~65); on the default model's shapes
  (2 threads) 4-8x the dequantize + torch.mm path at T = 2..8, 2x at 128, 1.25-1.8x at 512
  (tools/bench_quant_kernels.py --tables small). Same error bound as the mat-vec (float32
  accumulation, tested against the float64 product).
* :func:`dequantize_rows` / :func:`gather_rows`: rows to float32, bit for bit what
  ``gguf.quants.dequantize`` gives (same operation order, no fast-math; every product of a scale
  and a code is exact in float32 except q6_k's, which is rounded once, as in gguf-py).
  Prefill past SMALL_BATCH_TOKENS rows (:func:`linear`) and embedding lookups (:func:`embedding`) use them.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from kernels_cpu import quant_encode
from kernels_cpu.attention import _ptr
from kernels_cpu.matvec import ROWS_PER_TASK
from kernels_cpu.quant_encode import QUANTIZE_FORMATS, quantize  # noqa: F401 - re-exported (kernels_cpu.quant.quantize)
from kernels_cpu.quant_ir import (  # globals of this module, so that its kernels can be cached (see quant_ir)
    _deq_q4_0, _deq_q4_1, _deq_q4_k, _deq_q5_k, _deq_q6_k, _deq_q8_0,
    _dot_q4_0, _dot_q4_1, _dot_q4_k, _dot_q5_k, _dot_q6_k, _dot_q8_0,
    _tile_q4_0, _tile_q4_1, _tile_q4_k, _tile_q5_k, _tile_q6_k, _tile_q8_0, MM_ROWS, MM_TOKENS, wide_vectors)
from storage.formats import QTensor, get_format

# linear() with 2..SMALL_BATCH_TOKENS rows runs the fused kernel (:func:`matmul`), more rows dequantize blocks
# of rows for torch.mm: where the fused kernel stops being faster (tools/bench_quant_kernels.py --tables
# small). AVX-512 (Zen 4, 1 and 2 threads): faster at every T measured, up to 4096 rows on the default
# model's shapes and 2048 on a 3B model's (q4_1/q4_k/q6_k 1.5-2x, q8_0 1.1-1.3x at the largest T);
# AVX2 (the same CPU, Numba and torch told to target AVX2): q4_1 up to ~32 rows, q8_0 up to ~8-16.
SMALL_BATCH_TOKENS = 4096 if wide_vectors() else 16
PREFILL_BLOCK_BYTES = 8 << 20  # the prefill path's float32 buffer of dequantized rows, at most (the planner counts it)


# ---- mat-vec kernels: out = w @ x, parallel over blocks of ROWS_PER_TASK rows ----

@nb.njit(fastmath=True, cache=True, nogil=True)
def _check_mv(w, x, out, block, nbytes):  # pragma: no cover - compiled
    if x.shape[0] % block or w.shape[1] != x.shape[0] // block * nbytes or out.shape[0] != w.shape[0]:
        raise ValueError("matvec: w, x and out shapes do not match the format")


@nb.njit(fastmath=True, cache=True, nogil=True)
def _sums32(x):  # pragma: no cover - compiled
    """Sums of x over each 32 elements (the affine formats' offset term: c * sum(x over the group))."""
    xs = np.empty(x.shape[0] // 32, dtype=np.float32)
    for g in range(xs.shape[0]):
        s = np.float32(0.0)
        for j in range(32):
            s += x[32 * g + j]
        xs[g] = s
    return xs


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mv_q4_0(w, x, out):  # pragma: no cover - compiled
    _check_mv(w, x, out, 32, 18)
    n = w.shape[0]
    for t in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            out[i] = _dot_q4_0(w, i, x, x)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mv_q4_1(w, x, out):  # pragma: no cover - compiled
    _check_mv(w, x, out, 32, 20)
    xs = _sums32(x)
    n = w.shape[0]
    for t in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            out[i] = _dot_q4_1(w, i, x, xs)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mv_q8_0(w, x, out):  # pragma: no cover - compiled
    _check_mv(w, x, out, 32, 34)
    n = w.shape[0]
    for t in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            out[i] = _dot_q8_0(w, i, x, x)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mv_q4_k(w, x, out):  # pragma: no cover - compiled
    _check_mv(w, x, out, 256, 144)
    xs = _sums32(x)
    n = w.shape[0]
    for t in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            out[i] = _dot_q4_k(w, i, x, xs)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mv_q5_k(w, x, out):  # pragma: no cover - compiled
    _check_mv(w, x, out, 256, 176)
    xs = _sums32(x)
    n = w.shape[0]
    for t in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            out[i] = _dot_q5_k(w, i, x, xs)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mv_q6_k(w, x, out):  # pragma: no cover - compiled
    _check_mv(w, x, out, 256, 210)
    n = w.shape[0]
    for t in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            out[i] = _dot_q6_k(w, i, x, x)


_FORMAT_IDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q4_k": 3, "q5_k": 4, "q6_k": 5}


@nb.njit(cache=True, nogil=True)
def _mv_addr(fid, w_addr, n, nbytes, x_addr, k, out_addr):  # pragma: no cover - compiled
    """The mat-vec of format ``fid`` over arrays given by address (decode's hot call: see :func:`linear`)."""
    w = nb.carray(_ptr(w_addr, np.uint8), (n, nbytes))
    x = nb.carray(_ptr(x_addr, np.float32), k)
    out = nb.carray(_ptr(out_addr, np.float32), n)
    if fid == 0:
        _mv_q4_0(w, x, out)
    elif fid == 1:
        _mv_q4_1(w, x, out)
    elif fid == 2:
        _mv_q8_0(w, x, out)
    elif fid == 3:
        _mv_q4_k(w, x, out)
    elif fid == 4:
        _mv_q5_k(w, x, out)
    else:
        _mv_q6_k(w, x, out)


# ---- small-batch kernels: out[T, n] = x[T, k] @ w.T, parallel over blocks of ROWS_PER_TASK rows ----
# Every task reads all of x: past MM_CHUNK_BYTES of it (more rows than a draft's batch: prefill, long
# rows), the rows of x are taken a chunk at a time, one parallel sweep over the weights each, so that
# the chunk stays in L2 instead of streaming from RAM once per task. Within a task, token tiles outside
# and row pairs inside: the task's weight rows (<= 32 KiB for k <= 1536 in q4_1) stay in L1/L2.
MM_CHUNK_BYTES = 256 << 10


@nb.njit(fastmath=True, cache=True, nogil=True)
def _check_mm(w, x, out, block, nbytes):  # pragma: no cover - compiled
    if (x.shape[1] % block or w.shape[1] != x.shape[1] // block * nbytes or out.shape[0] != x.shape[0]
            or out.shape[1] != w.shape[0]):
        raise ValueError("matmul: w, x and out shapes do not match the format")


@nb.njit(fastmath=True, cache=True, nogil=True)
def _chunk_tokens(k):  # pragma: no cover - compiled
    """Activation rows per sweep over the weights: MM_CHUNK_BYTES of x, a multiple of MM_TOKENS."""
    return max(MM_TOKENS, MM_CHUNK_BYTES // (4 * k) // MM_TOKENS * MM_TOKENS)


@nb.njit(fastmath=True, cache=True, nogil=True)
def _tokens_tile(left):  # pragma: no cover - compiled
    """The largest of quant_ir.MM_TILES (8, 4, 2, 1) that fits ``left`` tokens."""
    return MM_TOKENS if left >= MM_TOKENS else 4 if left >= 4 else 2 if left >= 2 else 1


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mm_q4_0(w, x, out):  # pragma: no cover - compiled
    _check_mm(w, x, out, 32, 18)
    n, T = w.shape[0], x.shape[0]
    chunk = _chunk_tokens(x.shape[1])
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            end = min(n, (b + 1) * ROWS_PER_TASK)
            t0 = c0
            while t0 < c1:
                tt = _tokens_tile(c1 - t0)
                for i in range(b * ROWS_PER_TASK, end, MM_ROWS):
                    _tile_q4_0(w, i, min(MM_ROWS, end - i), x, t0, tt, out)
                t0 += tt


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mm_q4_1(w, x, out):  # pragma: no cover - compiled
    _check_mm(w, x, out, 32, 20)
    n, T = w.shape[0], x.shape[0]
    chunk = _chunk_tokens(x.shape[1])
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            end = min(n, (b + 1) * ROWS_PER_TASK)
            t0 = c0
            while t0 < c1:
                tt = _tokens_tile(c1 - t0)
                for i in range(b * ROWS_PER_TASK, end, MM_ROWS):
                    _tile_q4_1(w, i, min(MM_ROWS, end - i), x, t0, tt, out)
                t0 += tt


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mm_q8_0(w, x, out):  # pragma: no cover - compiled
    _check_mm(w, x, out, 32, 34)
    n, T = w.shape[0], x.shape[0]
    chunk = _chunk_tokens(x.shape[1])
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            end = min(n, (b + 1) * ROWS_PER_TASK)
            t0 = c0
            while t0 < c1:
                tt = _tokens_tile(c1 - t0)
                for i in range(b * ROWS_PER_TASK, end, MM_ROWS):
                    _tile_q8_0(w, i, min(MM_ROWS, end - i), x, t0, tt, out)
                t0 += tt


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mm_q4_k(w, x, out):  # pragma: no cover - compiled
    _check_mm(w, x, out, 256, 144)
    n, T = w.shape[0], x.shape[0]
    chunk = _chunk_tokens(x.shape[1])
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            end = min(n, (b + 1) * ROWS_PER_TASK)
            t0 = c0
            while t0 < c1:
                tt = _tokens_tile(c1 - t0)
                for i in range(b * ROWS_PER_TASK, end, MM_ROWS):
                    _tile_q4_k(w, i, min(MM_ROWS, end - i), x, t0, tt, out)
                t0 += tt


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mm_q5_k(w, x, out):  # pragma: no cover - compiled
    _check_mm(w, x, out, 256, 176)
    n, T = w.shape[0], x.shape[0]
    chunk = _chunk_tokens(x.shape[1])
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            end = min(n, (b + 1) * ROWS_PER_TASK)
            t0 = c0
            while t0 < c1:
                tt = _tokens_tile(c1 - t0)
                for i in range(b * ROWS_PER_TASK, end, MM_ROWS):
                    _tile_q5_k(w, i, min(MM_ROWS, end - i), x, t0, tt, out)
                t0 += tt


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _mm_q6_k(w, x, out):  # pragma: no cover - compiled
    _check_mm(w, x, out, 256, 210)
    n, T = w.shape[0], x.shape[0]
    chunk = _chunk_tokens(x.shape[1])
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        for b in nb.prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            end = min(n, (b + 1) * ROWS_PER_TASK)
            t0 = c0
            while t0 < c1:
                tt = _tokens_tile(c1 - t0)
                for i in range(b * ROWS_PER_TASK, end, MM_ROWS):
                    _tile_q6_k(w, i, min(MM_ROWS, end - i), x, t0, tt, out)
                t0 += tt


@nb.njit(cache=True, nogil=True)
def _mm_addr(fid, w_addr, n, nbytes, x_addr, T, k, out_addr):  # pragma: no cover - compiled
    """The small-batch product of format ``fid`` over arrays given by address (see :func:`linear`)."""
    w = nb.carray(_ptr(w_addr, np.uint8), (n, nbytes))
    x = nb.carray(_ptr(x_addr, np.float32), (T, k))
    out = nb.carray(_ptr(out_addr, np.float32), (T, n))
    if fid == 0:
        _mm_q4_0(w, x, out)
    elif fid == 1:
        _mm_q4_1(w, x, out)
    elif fid == 2:
        _mm_q8_0(w, x, out)
    elif fid == 3:
        _mm_q4_k(w, x, out)
    elif fid == 4:
        _mm_q5_k(w, x, out)
    else:
        _mm_q6_k(w, x, out)


def rows_linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x [T, k] @ dequantized(w).T -> [T, n] float32, each row with the same bits whatever T is and wherever
    the row is among the T (the server batches sequences' decode rows; see matvec.rows_linear).

    The small-batch kernel's arithmetic per row depends on its token tile (8, 4, 2 or 1 rows, register
    blocked differently), so the rows are padded with zero rows to a multiple of MM_TOKENS: every row is
    computed in a full tile by the same code (checked bit for bit in tests/test_kernels_quant.py). One to
    eight rows cost about the same; the weights are decoded once per tile."""
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"rows_linear: x {tuple(x.shape)} does not match {w!r}")
    T = x.shape[0]
    padded = -(-T // MM_TOKENS) * MM_TOKENS
    xf = torch.zeros(padded, k, dtype=torch.float32)
    xf[:T] = x
    y = torch.empty(padded, n, dtype=torch.float32)
    data = w.data
    _mm_addr(_FORMAT_IDS[w.fmt.name], data.data_ptr(), n, data.shape[1], xf.data_ptr(), padded, k, y.data_ptr())
    return y[:T]


# ---- dequantization kernels: out[j] = w[rows[j]] as float32, parallel over rows ----

@nb.njit(cache=True, nogil=True)
def _check_dq(w, rows, out, block, nbytes):  # pragma: no cover - compiled
    if out.shape[1] % block or w.shape[1] != out.shape[1] // block * nbytes or out.shape[0] != rows.shape[0]:
        raise ValueError("dequantize: w and out shapes do not match the format")
    for j in range(rows.shape[0]):
        if rows[j] < 0 or rows[j] >= w.shape[0]:
            raise IndexError("dequantize: row index out of range")


@nb.njit(parallel=True, cache=True, nogil=True)
def _dq_q4_0(w, rows, out):  # pragma: no cover - compiled
    _check_dq(w, rows, out, 32, 18)
    for j in nb.prange(rows.shape[0]):
        _deq_q4_0(w, rows[j], out, j)


@nb.njit(parallel=True, cache=True, nogil=True)
def _dq_q4_1(w, rows, out):  # pragma: no cover - compiled
    _check_dq(w, rows, out, 32, 20)
    for j in nb.prange(rows.shape[0]):
        _deq_q4_1(w, rows[j], out, j)


@nb.njit(parallel=True, cache=True, nogil=True)
def _dq_q8_0(w, rows, out):  # pragma: no cover - compiled
    _check_dq(w, rows, out, 32, 34)
    for j in nb.prange(rows.shape[0]):
        _deq_q8_0(w, rows[j], out, j)


@nb.njit(parallel=True, cache=True, nogil=True)
def _dq_q4_k(w, rows, out):  # pragma: no cover - compiled
    _check_dq(w, rows, out, 256, 144)
    for j in nb.prange(rows.shape[0]):
        _deq_q4_k(w, rows[j], out, j)


@nb.njit(parallel=True, cache=True, nogil=True)
def _dq_q5_k(w, rows, out):  # pragma: no cover - compiled
    _check_dq(w, rows, out, 256, 176)
    for j in nb.prange(rows.shape[0]):
        _deq_q5_k(w, rows[j], out, j)


@nb.njit(parallel=True, cache=True, nogil=True)
def _dq_q6_k(w, rows, out):  # pragma: no cover - compiled
    _check_dq(w, rows, out, 256, 210)
    for j in nb.prange(rows.shape[0]):
        _deq_q6_k(w, rows[j], out, j)


_MATVEC = {"q4_0": _mv_q4_0, "q4_1": _mv_q4_1, "q8_0": _mv_q8_0, "q4_k": _mv_q4_k, "q5_k": _mv_q5_k, "q6_k": _mv_q6_k}
_DEQUANT = {"q4_0": _dq_q4_0, "q4_1": _dq_q4_1, "q8_0": _dq_q8_0, "q4_k": _dq_q4_k, "q5_k": _dq_q5_k, "q6_k": _dq_q6_k}
_MM = {"q4_0": _mm_q4_0, "q4_1": _mm_q4_1, "q8_0": _mm_q8_0, "q4_k": _mm_q4_k, "q5_k": _mm_q5_k, "q6_k": _mm_q6_k}
FORMATS = tuple(_MATVEC)


# ---- numpy entry points ----

def _kernel(table: dict, fmt: str):
    try:
        return table[fmt]
    except KeyError:
        raise ValueError(f"no kernel for format {fmt!r}; these have one: {', '.join(table)}") from None


def matvec(fmt: str, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[n] = w @ x for quantized ``w`` (uint8 [n, row bytes]), float32 x [k] and out [n], all
    C-contiguous (another layout fails to compile: a TypingError). Runs on Numba's threads (see
    kernels_cpu.matvec.decode_scope); float32 accumulation; ValueError on mismatched shapes."""
    _kernel(_MATVEC, fmt)(w, x, out)


def matmul(fmt: str, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[T, n] = x @ w.T for quantized ``w`` (uint8 [n, row bytes]), float32 x [T, k] and out [T, n],
    all C-contiguous: the fused small-batch kernel (each weight block decoded once for all T rows of x).
    Numba's threads; float32 accumulation; ValueError on mismatched shapes."""
    _kernel(_MM, fmt)(w, x, out)


def dequantize_rows(fmt: str, w: np.ndarray, out: np.ndarray, row0: int = 0) -> np.ndarray:
    """Rows [row0, row0 + out.shape[0]) of ``w`` into float32 ``out`` [m, k], bit-exact with gguf-py."""
    _kernel(_DEQUANT, fmt)(w, np.arange(row0, row0 + out.shape[0], dtype=np.int64), out)
    return out


def gather_rows(fmt: str, w: np.ndarray, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (int64 [m]) of ``w`` into float32 ``out`` [m, k] (embedding lookups), bit-exact
    with gguf-py; IndexError for an id outside [0, n)."""
    _kernel(_DEQUANT, fmt)(w, ids, out)
    return out


# ---- torch entry points ----

_prefill_buf = np.empty(0, dtype=np.float32)  # grown once, never past PREFILL_BLOCK_BYTES (or one row)


def _prefill_buffer(n: int) -> np.ndarray:
    global _prefill_buf
    if _prefill_buf.size < n:
        _prefill_buf = np.empty(n, dtype=np.float32)
    return _prefill_buf[:n]


def prefill_rows(k: int) -> int:
    """Weight rows dequantized per block in the prefill path (the buffer holds rows * k float32)."""
    return max(1, PREFILL_BLOCK_BYTES // (4 * k))


def matvec_t(w_bytes: torch.Tensor, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Torch convenience: quantized ``w_bytes`` (uint8 [n, row bytes], CPU) times x [k] -> float32 [n]."""
    out = torch.empty(w_bytes.shape[0], dtype=torch.float32)
    matvec(fmt, w_bytes.contiguous().numpy(), x.to(torch.float32).contiguous().numpy(), out.numpy())
    return out


def linear(x: torch.Tensor, w: QTensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantized w, b)`` for a quantized weight on the CPU; x [..., k] -> [..., n] in x.dtype.

    One row (decode) goes through :func:`matvec`, 2..SMALL_BATCH_TOKENS rows (a draft's tree leaves,
    prefill on AVX-512) through :func:`matmul` (both by address, Numba's threads). More rows dequantize
    ``prefill_rows(k)`` weight rows at a time into one reusable float32 buffer (at most
    PREFILL_BLOCK_BYTES) and multiply with torch (its threads), writing each block's columns of the
    output in place. The buffer is module state: calls must come from one thread at a time (the
    engine's compute thread)."""
    n, k = w.shape
    fmt = w.fmt.name
    data = w.data
    if data.is_cuda or x.is_cuda:
        raise ValueError(f"kernels_cpu.quant.linear runs on the CPU; got {w!r} and x on {x.device}")
    if x.numel() == k and data.is_contiguous():  # decode: one row, by address (~8 µs of wrappers saved)
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
        _mv_addr(_FORMAT_IDS[fmt], data.data_ptr(), n, data.shape[1], xf.data_ptr(), k, y.data_ptr())
        if b is not None:
            y += b
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    xf = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    if 2 <= xf.shape[0] <= SMALL_BATCH_TOKENS and data.is_contiguous():  # a few rows: fused, by address
        _mm_addr(_FORMAT_IDS[fmt], data.data_ptr(), n, data.shape[1], xf.data_ptr(), xf.shape[0], k, y.data_ptr())
        if b is not None:
            y += b
        return y.reshape(*x.shape[:-1], n).to(x.dtype)
    wb = data.numpy()
    if xf.shape[0] == 0:
        pass
    elif xf.shape[0] == 1:
        matvec(fmt, wb, xf[0].numpy(), y[0].numpy())
        if b is not None:
            y += b
    else:
        rows = min(n, prefill_rows(k))
        buf = _prefill_buffer(rows * k)
        for r0 in range(0, n, rows):
            m = min(rows, n - r0)
            blk = dequantize_rows(fmt, wb, buf[: m * k].reshape(m, k), r0)
            wt = torch.from_numpy(blk).t()
            if b is None:
                torch.mm(xf, wt, out=y[:, r0:r0 + m])
            else:
                torch.addmm(b[r0:r0 + m].to(torch.float32), xf, wt, out=y[:, r0:r0 + m])
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def embedding(ids: torch.Tensor, w: QTensor) -> torch.Tensor:
    """Rows ``ids`` (int64, any shape) of a quantized table -> float32 [*ids.shape, k] (bit-exact)."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape[0], w.shape[1], dtype=torch.float32)
    gather_rows(w.fmt.name, w.data.numpy(), flat.numpy(), out.numpy())
    return out.reshape(*ids.shape, w.shape[1])


def warm_up() -> None:
    """Compile (or load from Numba's cache) every kernel now, with tiny inputs, so that the cost is
    part of the process's measured baseline and nothing compiles mid-run."""
    for fmt in FORMATS:
        f = get_format(fmt)
        w = np.zeros((2, f.block_bytes), dtype=np.uint8)
        out = np.empty((2, f.block), dtype=np.float32)
        matvec(fmt, w, np.zeros(f.block, dtype=np.float32), out[:, 0].copy())
        x, y = np.zeros(f.block, dtype=np.float32), np.empty(2, dtype=np.float32)
        _mv_addr(_FORMAT_IDS[fmt], w.ctypes.data, 2, f.block_bytes, x.ctypes.data, f.block, y.ctypes.data)
        gather_rows(fmt, w, np.zeros(2, dtype=np.int64), out)
        x2, y2 = np.zeros((2, f.block), dtype=np.float32), np.empty((2, 2), dtype=np.float32)
        _mm_addr(_FORMAT_IDS[fmt], w.ctypes.data, 2, f.block_bytes, x2.ctypes.data, 2, f.block, y2.ctypes.data)
    quant_encode.warm_up()
