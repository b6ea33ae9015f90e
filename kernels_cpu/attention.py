"""Exact attention over a chunked host KV pool: a Numba kernel for decode and small query blocks,
a torch block path for prefill, and the log-sum-exp merge of partial results.

The host KV cache keeps keys and values in two pools of fixed-size chunks, ``[P, nkv, C, d]``
(float32, bfloat16 or float16); a region of keys is a list of pool slots (``slots[i]`` holds the
region's logical chunk i). Decode attention is a stream over that region: every key and value is
read once per step, so its speed is the memory bandwidth the kernel reaches. The kernel therefore

- reads each KV head's keys once for all the query heads that share it (GQA) and for all T
  queries of the block, chunk by chunk (each chunk's ``[C, d]`` rows of one head are contiguous);
- reads bf16/f16 as 16-bit and widens in registers (bf16 is the top half of a float32; f16 goes
  through LLVM's ``fpext half``, the F16C conversion), and accumulates in float32;
- register-blocks both products 4 query rows x 4 keys (see _scores): a plain row-by-row dot and
  axpy per key spends more on loop overhead, horizontal sums and accumulator loads/stores than on
  FMAs, and ran at ~8 GB/s per core; the 16 scores of a block are reduced together by one
  transposing tree (kernels_cpu/simd.py) where the head dim is a multiple of 16;
- prefetches PF_KEYS keys ahead in software: the 4 rows read side by side defeat the hardware
  stream prefetcher (measured: 10 -> 22 GB/s on one core from DRAM, the in-cache compute rate);
  and, at each block's start, the whole block PF_BLOCKS ahead (K and V) into L2 only: on a core
  whose compute rate is close to its share of the memory bandwidth (AMD EPYC, Zen 4: 512-bit FMAs
  issued as two halves, ~21 GB/s of compute per core against ~20 GB/s of read) 16 keys ahead left
  compute and memory stalls adding up (one thread 8.8 GB/s, = 1 / (1/compute + 1/read)); a block
  ahead in L2 gave 10.5 GB/s (issue 22, docs/BENCHMARKS.md A1);
- runs an online softmax per block of keys (one running max / rescale per block, not per key),
  with a vectorisable exp (Cody-Waite range reduction + polynomial: libm's ``expf`` is a scalar
  call per score, and there is one score per key and query head);
- runs in parallel over (KV head x KV split) tasks and merges the splits by log-sum-exp, so that
  a model with few KV heads (the default model has 3) still keeps every core streaming.

A1 (32 query / 8 KV heads, d 128, bf16, 2 threads, tools/bench_attention.py): 36-44 GB/s at
16k-128k tokens, 74-90 % of the measured read bandwidth and ~3x torch SDPA; about 22 GB/s per
core, i.e. per core it is compute-bound near the memory limit, so two cores are needed to reach it.

A decode step over chunks that are all in RAM (the common case) goes through :func:`attend_decode`:
the token's key/value write and the attention in one call, on the calling thread until the region
is large enough (SERIAL_DECODE_BYTES) for the parallel kernel's launch to pay, with none of
:func:`attend`'s per-call tensor glue (tens of µs, more than the kernel at a few hundred keys).

No value in a fastmath kernel is ever inf: "no key yet" is the finite ``_NEG``, and the
``-inf`` of an empty row's log-sum-exp is set outside, in torch.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from kernels_cpu.matvec import _bits_to_f32
from kernels_cpu.simd import LANES, qk4x4

BLOCK = 64  # keys per softmax block inside a task: the score scratch is [rows, BLOCK]
MIN_SPLIT_KEYS = 256  # a KV split shorter than this costs more in merging and scheduling than it gains
MAX_SPLITS = 64  # bounds the per-call partial results (never proportional to the context)
BLOCK_KEYS = 1024  # attend_blocks: keys gathered into one float32 block
# torch's fused CPU attention returning the log-sum-exp too (a private op: used when this torch has it)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_BLOCK_KEYS = 4096  # keys per block through it (fewer, larger calls: its own tiling is inside)
PF_KEYS = 16  # software prefetch distance, in keys (see _scores)
PF_BLOCKS = 1  # blocks of keys prefetched ahead into L2 (see _attend_range)
_NEG = np.float32(-1e30)  # running max before any visible key (finite: see the module docstring)

_VIEWS = {torch.float32: None, torch.bfloat16: np.uint16, torch.float16: np.int16}  # pool element -> numpy view


@intrinsic
def _half_bits_to_f32(typingctx, x):
    """Widen a float16 given as its int16 bits to float32 (LLVM ``fpext half``: exact, vectorises
    to the hardware conversion, F16C / AVX-512, where there is one)."""
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def _prefetch_codegen(locality: int):
    """codegen of a prefetch hint (llvm.prefetch, read, ``locality`` 3: all cache levels, 2: from L2 on)
    of the cache line ``off`` bytes past arr[i0, i1, i2, 0]."""

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2], args[3], zero])
        i32 = ir.IntType(32)
        ptr = builder.gep(builder.bitcast(ptr, ir.IntType(8).as_pointer()), [args[4]])
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(locality), i32(1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def _prefetch(typingctx, arr, i0, i1, i2, off):
    """Hint the cache line ``off`` bytes past arr[i0, i1, i2, 0] into the caches (llvm.prefetch)."""
    return types.void(arr, types.intp, types.intp, types.intp, types.intp), _prefetch_codegen(3)


@intrinsic
def _prefetch_l2(typingctx, arr, i0, i1, i2, off):
    """:func:`_prefetch` into the outer caches only (locality 2: prefetcht1, L2 and beyond): for data
    needed a whole block later, which would only evict the current block's rows from L1."""
    return types.void(arr, types.intp, types.intp, types.intp, types.intp), _prefetch_codegen(2)


@intrinsic
def _ptr(typingctx, addr, like):
    """The integer ``addr`` (a tensor's ``data_ptr()``) as a pointer to ``like``'s element type (a numpy
    scalar type such as ``np.float32``, or an array whose dtype it takes), for ``numba.carray``.

    Decode's per-row kernels take torch tensors by address: ``Tensor.numpy()`` costs ~1 µs a tensor
    (~2 µs for a bfloat16 view), more than their arithmetic. The Python side checks device, dtype,
    contiguity and sizes before passing an address."""
    ty = like.instance_type if isinstance(like, types.NumberClass) else like.dtype
    sig = types.CPointer(ty)(types.intp, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@intrinsic
def _f32_bits(typingctx, x):
    """A float32's bits as a uint32 (an LLVM bitcast, free)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@nb.njit(cache=True, nogil=True, inline="always")
def _bf16_bits(x):  # pragma: no cover - compiled
    """float32 -> bfloat16 bits, round to nearest even, NaN kept quiet: torch's conversion. Integer
    arithmetic on the bits, so no fast-math rewrite can move the rounding."""
    u = _f32_bits(np.float32(x))
    r = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return np.uint16(0x7FC0) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r  # a select: vectorises


def _to_f32(x):  # pragma: no cover - compiled only, through the overload below
    """One stored KV element as float32."""
    raise NotImplementedError


@overload(_to_f32, inline="always")
def _to_f32_overload(x):
    """Chosen when compiled, from the pool view's element type: uint16 holds bfloat16 bits (the top
    half of a float32), int16 float16 bits, float32 is itself. One kernel source, three specializations,
    no per-element branch."""
    if x == types.uint16:
        return lambda x: _bits_to_f32(np.uint32(x) << np.uint32(16))
    if x == types.int16:
        return lambda x: _half_bits_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _exp_le0(x):  # pragma: no cover - compiled
    """exp(x) for x <= 0 in float32 (relative error ~1e-7), 0 below -87 (past float32's normals).

    Branch-free (Cody-Waite reduction, degree-7 Taylor polynomial, 2^n from its bits) so that the
    loops calling it vectorise: libm's expf is one scalar call per score."""
    xc = max(x, np.float32(-87.0))
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693145751953125) - n * np.float32(1.428606765330187e-06)  # ln2 = hi + lo
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    two_n = _bits_to_f32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))
    return p * two_n if x > np.float32(-87.0) else np.float32(0.0)


# The two products below are register-blocked 4 query rows x 4 keys: each widened key (value) element
# serves 4 rows and each query (accumulator) element 4 keys, 16 independent FMA chains per vector, and
# the accumulators are read and written once per 4 keys instead of once per key. Rows left over
# (R % 4) run 1 x 4, keys left over (at chunk and split edges) 4 x 1 / 1 x 1.

@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _scores(qg, g, kp, slot, row, nbk, s):  # pragma: no cover - compiled
    """s[r, j] = qg[g, r] . k[row + j] for the block's nbk keys of pool slot ``slot``, KV head g."""
    R = qg.shape[1]
    d = qg.shape[2]
    R4 = R - R % 4
    rowbytes = d * kp.itemsize
    for r in range(0, R4, 4):
        j = 0
        while j + 4 <= nbk:
            if r == 0 and row + j + PF_KEYS + 4 <= kp.shape[2]:
                for off in range(0, 4 * rowbytes, 64):
                    _prefetch(kp, slot, g, row + j + PF_KEYS, off)
            if d % LANES == 0:  # explicit vectors, one reduction tree for the 16 scores (kernels_cpu/simd.py)
                qk4x4(qg, g, r, kp, slot, row + j, s, j)
                j += 4
                continue
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
            for x in range(d):
                k0 = _to_f32(kp[slot, g, row + j, x])
                k1 = _to_f32(kp[slot, g, row + j + 1, x])
                k2 = _to_f32(kp[slot, g, row + j + 2, x])
                k3 = _to_f32(kp[slot, g, row + j + 3, x])
                q0 = qg[g, r, x]
                q1 = qg[g, r + 1, x]
                q2 = qg[g, r + 2, x]
                q3 = qg[g, r + 3, x]
                a00 += q0 * k0
                a01 += q0 * k1
                a02 += q0 * k2
                a03 += q0 * k3
                a10 += q1 * k0
                a11 += q1 * k1
                a12 += q1 * k2
                a13 += q1 * k3
                a20 += q2 * k0
                a21 += q2 * k1
                a22 += q2 * k2
                a23 += q2 * k3
                a30 += q3 * k0
                a31 += q3 * k1
                a32 += q3 * k2
                a33 += q3 * k3
            s[r, j], s[r, j + 1], s[r, j + 2], s[r, j + 3] = a00, a01, a02, a03
            s[r + 1, j], s[r + 1, j + 1], s[r + 1, j + 2], s[r + 1, j + 3] = a10, a11, a12, a13
            s[r + 2, j], s[r + 2, j + 1], s[r + 2, j + 2], s[r + 2, j + 3] = a20, a21, a22, a23
            s[r + 3, j], s[r + 3, j + 1], s[r + 3, j + 2], s[r + 3, j + 3] = a30, a31, a32, a33
            j += 4
        while j < nbk:
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for x in range(d):
                k0 = _to_f32(kp[slot, g, row + j, x])
                a0 += qg[g, r, x] * k0
                a1 += qg[g, r + 1, x] * k0
                a2 += qg[g, r + 2, x] * k0
                a3 += qg[g, r + 3, x] * k0
            s[r, j], s[r + 1, j], s[r + 2, j], s[r + 3, j] = a0, a1, a2, a3
            j += 1
    for r in range(R4, R):
        j = 0
        while j + 4 <= nbk:
            if r == 0 and row + j + PF_KEYS + 4 <= kp.shape[2]:
                for off in range(0, 4 * rowbytes, 64):
                    _prefetch(kp, slot, g, row + j + PF_KEYS, off)
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for x in range(d):
                q0 = qg[g, r, x]
                a0 += q0 * _to_f32(kp[slot, g, row + j, x])
                a1 += q0 * _to_f32(kp[slot, g, row + j + 1, x])
                a2 += q0 * _to_f32(kp[slot, g, row + j + 2, x])
                a3 += q0 * _to_f32(kp[slot, g, row + j + 3, x])
            s[r, j], s[r, j + 1], s[r, j + 2], s[r, j + 3] = a0, a1, a2, a3
            j += 4
        while j < nbk:
            a0 = np.float32(0.0)
            for x in range(d):
                a0 += qg[g, r, x] * _to_f32(kp[slot, g, row + j, x])
            s[r, j] = a0
            j += 1


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _values(vp, g, slot, row, nbk, s, acc):  # pragma: no cover - compiled
    """acc[r] += sum_j s[r, j] * v[row + j] over the block's nbk values of pool slot ``slot``, KV head g."""
    R = acc.shape[0]
    d = acc.shape[1]
    R4 = R - R % 4
    rowbytes = d * vp.itemsize
    for r in range(0, R4, 4):
        j = 0
        while j + 4 <= nbk:
            if r == 0 and row + j + PF_KEYS + 4 <= vp.shape[2]:
                for off in range(0, 4 * rowbytes, 64):
                    _prefetch(vp, slot, g, row + j + PF_KEYS, off)
            p00, p01, p02, p03 = s[r, j], s[r, j + 1], s[r, j + 2], s[r, j + 3]
            p10, p11, p12, p13 = s[r + 1, j], s[r + 1, j + 1], s[r + 1, j + 2], s[r + 1, j + 3]
            p20, p21, p22, p23 = s[r + 2, j], s[r + 2, j + 1], s[r + 2, j + 2], s[r + 2, j + 3]
            p30, p31, p32, p33 = s[r + 3, j], s[r + 3, j + 1], s[r + 3, j + 2], s[r + 3, j + 3]
            for x in range(d):
                v0 = _to_f32(vp[slot, g, row + j, x])
                v1 = _to_f32(vp[slot, g, row + j + 1, x])
                v2 = _to_f32(vp[slot, g, row + j + 2, x])
                v3 = _to_f32(vp[slot, g, row + j + 3, x])
                acc[r, x] += p00 * v0 + p01 * v1 + p02 * v2 + p03 * v3
                acc[r + 1, x] += p10 * v0 + p11 * v1 + p12 * v2 + p13 * v3
                acc[r + 2, x] += p20 * v0 + p21 * v1 + p22 * v2 + p23 * v3
                acc[r + 3, x] += p30 * v0 + p31 * v1 + p32 * v2 + p33 * v3
            j += 4
        while j < nbk:
            p0, p1, p2, p3 = s[r, j], s[r + 1, j], s[r + 2, j], s[r + 3, j]
            for x in range(d):
                v0 = _to_f32(vp[slot, g, row + j, x])
                acc[r, x] += p0 * v0
                acc[r + 1, x] += p1 * v0
                acc[r + 2, x] += p2 * v0
                acc[r + 3, x] += p3 * v0
            j += 1
    for r in range(R4, R):
        j = 0
        while j + 4 <= nbk:
            if r == 0 and row + j + PF_KEYS + 4 <= vp.shape[2]:
                for off in range(0, 4 * rowbytes, 64):
                    _prefetch(vp, slot, g, row + j + PF_KEYS, off)
            p0, p1, p2, p3 = s[r, j], s[r, j + 1], s[r, j + 2], s[r, j + 3]
            for x in range(d):
                acc[r, x] += (p0 * _to_f32(vp[slot, g, row + j, x]) + p1 * _to_f32(vp[slot, g, row + j + 1, x])
                              + p2 * _to_f32(vp[slot, g, row + j + 2, x]) + p3 * _to_f32(vp[slot, g, row + j + 3, x]))
            j += 4
        while j < nbk:
            p0 = s[r, j]
            for x in range(d):
                acc[r, x] += p0 * _to_f32(vp[slot, g, row + j, x])
            j += 1


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _mask(s, nbk, key0, qidx, G, window, tail, n_prefix, has_tail):  # pragma: no cover - compiled
    """Scores of keys key0 + j not visible to row r's query (t = r // G) become _NEG
    (padding rows past the last query are masked as the last query: their results are dropped)."""
    R = s.shape[0]
    T = qidx.shape[0]
    for r in range(R):
        t = min(r // G, T - 1)
        qi = qidx[t]
        for j in range(nbk):
            key = key0 + j
            if has_tail:
                c = key - n_prefix
                vis = c < 0 or (c < tail.shape[1] and tail[t, c])
            else:
                vis = key <= qi
            if window > 0 and qi - key >= window:
                vis = False
            if not vis:
                s[r, j] = _NEG


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _softmax(s, nbk, m, lsum, acc):  # pragma: no cover - compiled
    """Online softmax step: scores s[:, :nbk] become weights exp(s - m) under each row's new running
    max m (acc and lsum rescaled when the max grows); masked scores become 0."""
    R = s.shape[0]
    d = acc.shape[1]
    for r in range(R):
        bm = _NEG
        for j in range(nbk):
            bm = max(bm, s[r, j])
        if bm <= np.float32(0.5) * _NEG:  # nothing visible to this row in the block
            for j in range(nbk):
                s[r, j] = 0.0
            continue
        if bm > m[r]:
            alpha = _exp_le0(m[r] - bm)
            lsum[r] *= alpha
            for x in range(d):
                acc[r, x] *= alpha
            m[r] = bm
        mr = m[r]
        tot = np.float32(0.0)
        for j in range(nbk):
            p = _exp_le0(s[r, j] - mr)  # a masked _NEG gives 0
            s[r, j] = p
            tot += p
        lsum[r] += tot


@nb.njit(fastmath=True, cache=True, nogil=True)
def _attend_range(qg, kp, vp, slots, j0, j1, g, qidx, G, k_base, window, tail, n_prefix, has_tail,
                  acc, m, lsum, s):  # pragma: no cover - compiled
    """One task: KV head g over region keys [j0, j1), block by block (a block never crosses a chunk);
    online softmax state acc [R, d], m, lsum [R]. Rows r = t * G + hh: query t, query head g * G + hh;
    qg is pre-scaled."""
    R = acc.shape[0]
    C = kp.shape[2]
    qmin = qidx.min()
    qmax = qidx.max()
    for r in range(R):
        m[r] = _NEG
        lsum[r] = 0.0
        for x in range(acc.shape[1]):
            acc[r, x] = 0.0
    b = j0
    while b < j1:
        ch = b // C
        row = b - ch * C
        nbk = min(BLOCK, C - row, j1 - b)
        slot = slots[ch]
        key0 = k_base + b
        if row + nbk == C and b + nbk < j1:  # the next chunk's first rows: _scores/_values prefetch within a chunk
            nxt = slots[ch + 1]
            for off in range(0, min(PF_KEYS, C, j1 - b - nbk) * kp.shape[3] * kp.itemsize, 64):
                _prefetch(kp, nxt, g, 0, off)
                _prefetch(vp, nxt, g, 0, off)
        if PF_BLOCKS > 0 and b + PF_BLOCKS * BLOCK < j1:  # a block PF_BLOCKS ahead into L2 (see PF_BLOCKS)
            nb0 = b + PF_BLOCKS * BLOCK
            nch = nb0 // C
            nrow = nb0 - nch * C
            nn = min(BLOCK, C - nrow, j1 - nb0)
            nslot = slots[nch]
            for off in range(0, nn * kp.shape[3] * kp.itemsize, 64):
                _prefetch_l2(kp, nslot, g, nrow, off)
                _prefetch_l2(vp, nslot, g, nrow, off)
        _scores(qg, g, kp, slot, row, nbk, s)
        last = key0 + nbk - 1
        whole = (last < n_prefix) if has_tail else (last <= qmin)
        if window > 0 and qmax - key0 >= window:
            whole = False
        if not whole:
            _mask(s, nbk, key0, qidx, G, window, tail, n_prefix, has_tail)
        _softmax(s, nbk, m, lsum, acc)
        _values(vp, g, slot, row, nbk, s, acc)
        b += nbk


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend_kernel(qg, kp, vp, slots, lo, hi, nsplit, split_len, qidx, G, k_base, window, tail, n_prefix,
                   has_tail, acc, mpart, lpart, out, mo, lo_sum):  # pragma: no cover - compiled
    """Tasks (KV head g, split sp) over keys [lo + sp * split_len, ...) ∩ [lo, hi), then the
    log-sum-exp merge of each head's splits into out [nkv, R, d] (normalised), mo, lo_sum [nkv, R]
    (running max and sum: the caller makes the log-sum-exp of them)."""
    nkv, R, d = qg.shape
    for task in nb.prange(nkv * nsplit):
        g = task // nsplit
        sp = task - g * nsplit
        j0 = lo + sp * split_len
        j1 = min(hi, j0 + split_len)
        # task-local state (threads never write to one cache line), copied out once
        s = np.empty((R, BLOCK), dtype=np.float32)
        a = np.empty((R, d), dtype=np.float32)
        m = np.empty(R, dtype=np.float32)
        ls = np.empty(R, dtype=np.float32)
        _attend_range(qg, kp, vp, slots, j0, j1, g, qidx, G, k_base, window, tail, n_prefix, has_tail, a, m, ls, s)
        for r in range(R):
            mpart[task, r] = m[r]
            lpart[task, r] = ls[r]
            for x in range(d):
                acc[task, r, x] = a[r, x]
    for gr in range(nkv * R):  # serial: a few rows of d floats per split
        g = gr // R
        r = gr - g * R
        mx = _NEG
        for sp in range(nsplit):
            mx = max(mx, mpart[g * nsplit + sp, r])
        tot = np.float32(0.0)
        for x in range(d):
            out[g, r, x] = 0.0
        for sp in range(nsplit):
            ls = lpart[g * nsplit + sp, r]
            if ls > 0.0:
                w = _exp_le0(mpart[g * nsplit + sp, r] - mx)
                tot += w * ls
                for x in range(d):
                    out[g, r, x] += w * acc[g * nsplit + sp, r, x]
        if tot > 0.0:
            inv = np.float32(1.0) / tot
            for x in range(d):
                out[g, r, x] *= inv
        mo[g, r] = mx
        lo_sum[g, r] = tot


def _key_range(q_index: torch.Tensor, n_keys: int, k_base: int, window: int, n_prefix: int | None,
               tail_mask: torch.Tensor | None) -> tuple[int, int]:
    """Region keys [lo, hi) that can be visible to some query: the rest is never read."""
    if tail_mask is None:
        hi = min(n_keys, int(q_index.max()) + 1 - k_base)
    else:
        hi = min(n_keys, n_prefix + tail_mask.shape[1] - k_base)
    lo = max(0, int(q_index.min()) - window + 1 - k_base) if window > 0 else 0
    return lo, max(lo, hi)


def _splits(n: int, nkv: int, threads: int) -> tuple[int, int]:
    """(number of splits per KV head, keys per split): enough tasks to give every thread an equal
    share (a multiple of the thread count), no split shorter than MIN_SPLIT_KEYS."""
    most = max(1, min(MAX_SPLITS, n // MIN_SPLIT_KEYS))
    ns = 1
    while ns < most and (nkv * ns < threads or (nkv * ns) % threads):
        ns += 1
    split_len = -(-max(n, 1) // ns)
    return ns, split_len


def _check(q, kpool, vpool, slots, n_keys, q_index, tail_mask, n_prefix):
    if q.dim() != 3 or kpool.dim() != 4 or kpool.shape != vpool.shape:
        raise ValueError(f"q [T, nh, d], pools [P, nkv, C, d]: got {tuple(q.shape)}, {tuple(kpool.shape)}, "
                         f"{tuple(vpool.shape)}")
    T, nh, d = q.shape
    _P, nkv, C, dk = kpool.shape
    if dk != d or nh % nkv:
        raise ValueError(f"head dim {d} vs {dk}, {nh} query heads over {nkv} KV heads")
    if kpool.dtype not in _VIEWS or vpool.dtype != kpool.dtype:
        raise ValueError(f"KV dtype {kpool.dtype}/{vpool.dtype}: float32, bfloat16 or float16")
    if not (kpool.is_contiguous() and vpool.is_contiguous()):
        raise ValueError("KV pools must be contiguous")
    if n_keys > slots.numel() * C:
        raise ValueError(f"{n_keys} keys in {slots.numel()} chunks of {C}")
    if q_index.shape != (T,):
        raise ValueError(f"q_index {tuple(q_index.shape)} for {T} queries")
    if tail_mask is not None and (n_prefix is None or tail_mask.dim() != 2 or tail_mask.shape[0] != T):
        raise ValueError("tail_mask [T, n_tail] needs n_prefix")


def _pool_view(pool: torch.Tensor) -> np.ndarray:
    """The pool as the numpy array the kernel is specialised on (16-bit floats as their bits)."""
    view = _VIEWS[pool.dtype]
    return pool.numpy() if view is None else pool.view(torch.int16).numpy().view(view)


def _empty(T: int, nh: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(T, nh, d), torch.full((T, nh), -math.inf)


def attend(q: torch.Tensor, kpool: torch.Tensor, vpool: torch.Tensor, slots: torch.Tensor, n_keys: int, *,
           q_index: torch.Tensor, k_base: int = 0, window: int = 0, n_prefix: int | None = None,
           tail_mask: torch.Tensor | None = None, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q [T, nh, d] over a region of a chunked KV pool (the Numba kernel).

    kpool, vpool [P, nkv, C, d] (float32/bfloat16/float16, contiguous); region key j is row j % C of
    pool slot slots[j // C] and has absolute index k_base + j. Query head h uses KV head
    h // (nh // nkv). q_index [T]: each query's absolute index. Key a is visible to query t when
    a <= q_index[t] (no tail_mask), or, with tail_mask [T, n_tail], when a < n_prefix or
    tail_mask[t, a - n_prefix]; and, for window > 0, when q_index[t] - a < window.

    Returns (out [T, nh, d], lse [T, nh]) in float32: softmax(scale * q.k) over the visible keys
    applied to v, and the natural log-sum-exp of the visible scores (out 0, lse -inf where none)."""
    _check(q, kpool, vpool, slots, n_keys, q_index, tail_mask, n_prefix)
    T, nh, d = q.shape
    nkv = kpool.shape[1]
    G = nh // nkv
    if T == 0 or n_keys <= 0:
        return _empty(T, nh, d)
    lo, hi = _key_range(q_index, n_keys, k_base, window, n_prefix, tail_mask)
    if hi <= lo:
        return _empty(T, nh, d)
    scale = d ** -0.5 if scale is None else scale
    # rows of one KV head, query-major: [nkv, T * G (+ padding), d], pre-scaled. Three rows cost
    # 1.5x four (the 4-row register blocks run ~2x one single-row pass): pad them with a zero row.
    R = T * G + (1 if (T * G) % 4 == 3 else 0)
    qg = torch.zeros(nkv, R, d)
    qg[:, :T * G] = (q.to(torch.float32) * scale).view(T, nkv, G, d).transpose(0, 1).reshape(nkv, T * G, d)
    nsplit, split_len = _splits(hi - lo, nkv, nb.get_num_threads())
    acc = np.empty((nkv * nsplit, R, d), dtype=np.float32)
    mpart = np.empty((nkv * nsplit, R), dtype=np.float32)
    lpart = np.empty((nkv * nsplit, R), dtype=np.float32)
    out = torch.empty(nkv, R, d)
    mo = np.empty((nkv, R), dtype=np.float32)
    lsum = np.empty((nkv, R), dtype=np.float32)
    kp, vp = _pool_view(kpool), _pool_view(vpool)
    has_tail = tail_mask is not None
    tail = tail_mask.to(torch.bool).contiguous().numpy() if has_tail else np.zeros((1, 1), dtype=np.bool_)
    _attend_kernel(qg.numpy(), kp, vp, slots.to(torch.int32).contiguous().numpy(), lo, hi, nsplit, split_len,
                   q_index.to(torch.int64).contiguous().numpy(), G, k_base, window, tail,
                   0 if n_prefix is None else n_prefix, has_tail, acc, mpart, lpart, out.numpy(), mo, lsum)
    lse = (torch.from_numpy(mo) + torch.from_numpy(lsum).log())[:, :T * G]  # log(0) = -inf: no visible key
    out = out[:, :T * G].reshape(nkv, T, G, d).transpose(0, 1).reshape(T, nh, d)
    return out, lse.reshape(nkv, T, G).transpose(0, 1).reshape(T, nh)


# ---------------------------------------------------------------- decode fast path
#
# One decode step of one layer over keys that are all in RAM is the common case: the general
# :func:`attend` spends ~50 µs of Python/torch glue around a kernel that, at a few hundred keys, needs
# a few µs. :func:`attend_decode` does the step in one Numba call: write the token's key and value into
# its chunk, then the exact attention over the region, serially (a prange costs ~5-10 µs to launch and
# more on a busy machine) until the region is big enough for the parallel kernel to pay.

_Q_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # q's element type, by kernel branch
DECODE_Q_DTYPES = tuple(_Q_KINDS)  # query dtypes attend_decode takes
SERIAL_DECODE_BYTES = 512 << 10  # K+V bytes of the region below which one thread does the step


class DecodePools:
    """A KV pool pair prepared once for :func:`attend_decode` (the kernel's views and the shape),
    so that a decode step does not rebuild them."""

    def __init__(self, kpool: torch.Tensor, vpool: torch.Tensor):
        if kpool.dim() != 4 or kpool.shape != vpool.shape or kpool.dtype not in _VIEWS or vpool.dtype != kpool.dtype:
            raise ValueError(f"pools [P, nkv, C, d] of float32/bfloat16/float16: got {tuple(kpool.shape)} "
                             f"{kpool.dtype}, {tuple(vpool.shape)} {vpool.dtype}")
        if not (kpool.is_cpu and vpool.is_cpu and kpool.is_contiguous() and vpool.is_contiguous()):
            raise ValueError("KV pools must be contiguous CPU tensors")
        self.kpool, self.vpool = kpool, vpool  # the views share their memory: keep them alive
        self.kp, self.vp = _pool_view(kpool), _pool_view(vpool)
        self.dtype = kpool.dtype
        self.slots, self.kv_heads, self.chunk_tokens, self.head_dim = kpool.shape
        self.bytes_per_key = 2 * self.kv_heads * self.head_dim * kpool.element_size()


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _load_q(q, qg, scale):  # pragma: no cover - compiled
    """qg[g, hh] = q[g, hh] * scale, widened to float32 (q [nkv, G, d] of any pool element type)."""
    nkv, G, d = q.shape
    for g in range(nkv):
        for hh in range(G):
            for x in range(d):
                qg[g, hh, x] = _to_f32(q[g, hh, x]) * scale


@nb.njit(fastmath=True, cache=True, nogil=True)
def _decode_write(k_addr, v_addr, kp, vp, slots, n_keys):  # pragma: no cover - compiled
    """Write key/value n_keys - 1 (k/v [nkv, d] at k_addr/v_addr, in the pools' element type) into its
    chunk. False, having written nothing, when a slot of the region is not a pool slot."""
    P, nkv, C, d = kp.shape
    for i in range((n_keys + C - 1) // C):
        if slots[i] < 0 or slots[i] >= P:
            return False
    j = n_keys - 1
    slot = slots[j // C]
    row = j - (j // C) * C
    kn = nb.carray(_ptr(k_addr, kp), (nkv, d))
    vn = nb.carray(_ptr(v_addr, vp), (nkv, d))
    for g in range(nkv):
        for x in range(d):
            kp[slot, g, row, x] = kn[g, x]
            vp[slot, g, row, x] = vn[g, x]
    return True


@nb.njit(fastmath=True, cache=True, nogil=True)
def _decode_queries(q_addr, q_kind, G, scale, qg):  # pragma: no cover - compiled
    """qg[:, :G] = the queries at q_addr ([nkv * G, d]; q_kind 0 float32, 1 bfloat16, 2 float16) * scale;
    padding rows past G are 0."""
    nkv, _R, d = qg.shape
    qg[:] = 0.0
    if q_kind == 0:
        _load_q(nb.carray(_ptr(q_addr, np.float32), (nkv, G, d)), qg, scale)
    elif q_kind == 1:
        _load_q(nb.carray(_ptr(q_addr, np.uint16), (nkv, G, d)), qg, scale)
    else:
        _load_q(nb.carray(_ptr(q_addr, np.int16), (nkv, G, d)), qg, scale)


@nb.njit(fastmath=True, cache=True, nogil=True)
def _decode_serial(q_addr, q_kind, k_addr, v_addr, kp, vp, slots, n_keys, G, scale, out_addr,
                   out_bf16):  # pragma: no cover - compiled
    """The whole decode step on this thread: write the token's k/v, attend over region keys
    [0, n_keys) head by head, normalised output [nkv * G, d] at out_addr, float32 or (out_bf16)
    bfloat16 rounded to nearest even. False as _decode_write."""
    _P, nkv, _C, d = kp.shape
    if not _decode_write(k_addr, v_addr, kp, vp, slots, n_keys):
        return False
    R = G + (1 if G % 4 == 3 else 0)  # see attend(): three rows run as four
    qg = np.empty((nkv, R, d), dtype=np.float32)
    _decode_queries(q_addr, q_kind, G, scale, qg)
    qidx = np.full(1, n_keys - 1, dtype=np.int64)
    tail = np.zeros((1, 1), dtype=np.bool_)
    s = np.empty((R, BLOCK), dtype=np.float32)
    acc = np.empty((R, d), dtype=np.float32)
    m = np.empty(R, dtype=np.float32)
    ls = np.empty(R, dtype=np.float32)
    out = nb.carray(_ptr(out_addr, np.float32), (nkv, G, d))
    out16 = nb.carray(_ptr(out_addr, np.uint16), (nkv, G, d))
    for g in range(nkv):
        _attend_range(qg, kp, vp, slots, 0, n_keys, g, qidx, G, 0, 0, tail, 0, False, acc, m, ls, s)
        for hh in range(G):
            inv = np.float32(1.0) / ls[hh]  # > 0: the new key is always visible
            if out_bf16:
                for x in range(d):
                    out16[g, hh, x] = _bf16_bits(acc[hh, x] * inv)
            else:
                for x in range(d):
                    out[g, hh, x] = acc[hh, x] * inv
    return True


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pools: DecodePools, slots: np.ndarray,
                  n_keys: int, *, scale: float | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One decode step over a region of chunks that are all in the pools: store the token's key and
    value as region key ``n_keys - 1`` (row (n_keys-1) % C of slot slots[(n_keys-1) // C]), then exact
    attention of its queries over region keys [0, n_keys) (all visible: no window, no tree).

    q: nh * d elements (float32/bfloat16/float16), k, v: nkv * d elements in the pools' dtype, all
    contiguous on the CPU (any shape, e.g. [1, heads, d]); slots: int32 numpy array of the region's pool
    slots. Returns the attention output [1, nh * d] in ``out_dtype`` (float32, or bfloat16 rounded as
    ``Tensor.to`` does) — :func:`attend` with T = 1 up to float32 rounding."""
    nkv, C, d = pools.kv_heads, pools.chunk_tokens, pools.head_dim
    n = q.numel()
    G = n // (nkv * d)
    q_kind = _Q_KINDS.get(q.dtype)
    if (q_kind is None or G == 0 or n != G * nkv * d or k.numel() != nkv * d or v.numel() != nkv * d
            or k.dtype != pools.dtype or v.dtype != pools.dtype or not (q.is_cpu and k.is_cpu and v.is_cpu)
            or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())):
        raise ValueError(f"attend_decode: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, "
                         f"v {tuple(v.shape)} {v.dtype} for pools of {nkv} KV heads x {d} ({pools.dtype})")
    if slots.dtype != np.int32 or slots.ndim != 1 or not 0 < n_keys <= slots.shape[0] * C:
        raise ValueError(f"{n_keys} keys in {slots.shape} {slots.dtype} slots of {C}")
    scale = d ** -0.5 if scale is None else scale
    if out_dtype != torch.float32 and out_dtype != torch.bfloat16:
        raise ValueError(f"attend_decode: out_dtype {out_dtype} (float32 or bfloat16)")
    if n_keys * pools.bytes_per_key < SERIAL_DECODE_BYTES or nb.get_num_threads() == 1:
        out = torch.empty(1, n, dtype=out_dtype)
        ok = _decode_serial(q.data_ptr(), q_kind, k.data_ptr(), v.data_ptr(), pools.kp, pools.vp, slots, n_keys,
                            G, scale, out.data_ptr(), out_dtype == torch.bfloat16)
    else:
        ok, out = _decode_parallel(q, q_kind, k, v, pools, slots, n_keys, G, scale)
    if not ok:
        raise ValueError(f"slots {slots.tolist()} outside a pool of {pools.slots} slots")
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _decode_parallel(q, q_kind, k, v, pools, slots, n_keys, G, scale) -> tuple[bool, torch.Tensor | None]:
    """attend_decode over a long region: the same write, then the parallel kernel over (KV head x split)."""
    if not _decode_write(k.data_ptr(), v.data_ptr(), pools.kp, pools.vp, slots, n_keys):
        return False, None
    nkv, d = pools.kv_heads, pools.head_dim
    R = G + (1 if G % 4 == 3 else 0)
    qg = np.empty((nkv, R, d), dtype=np.float32)
    _decode_queries(q.data_ptr(), q_kind, G, scale, qg)
    nsplit, split_len = _splits(n_keys, nkv, nb.get_num_threads())
    acc = np.empty((nkv * nsplit, R, d), dtype=np.float32)
    mpart = np.empty((nkv * nsplit, R), dtype=np.float32)
    lpart = np.empty((nkv * nsplit, R), dtype=np.float32)
    out = np.empty((nkv, R, d), dtype=np.float32)
    mo = np.empty((nkv, R), dtype=np.float32)
    lsum = np.empty((nkv, R), dtype=np.float32)
    qidx, tail = np.full(1, n_keys - 1, dtype=np.int64), np.zeros((1, 1), dtype=np.bool_)
    _attend_kernel(qg, pools.kp, pools.vp, slots, 0, n_keys, nsplit, split_len, qidx, G, 0, 0, tail, 0, False,
                   acc, mpart, lpart, out, mo, lsum)
    return True, torch.from_numpy(np.ascontiguousarray(out[:, :G])).view(1, nkv * G * d)


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
          lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combination of two partial attention results over disjoint key sets (the flash-decoding
    merge): o [..., d] normalised outputs, lse [...] their natural log-sum-exp (-inf: no keys)."""
    lse = torch.logaddexp(lse1, lse2)
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # both empty: weights exp(-inf) = 0
    w1 = torch.exp(lse1 - ref).unsqueeze(-1)
    w2 = torch.exp(lse2 - ref).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse


def _visible_block(q_index: torch.Tensor, keys: torch.Tensor, window: int, n_prefix: int | None,
                   tail_mask: torch.Tensor | None) -> torch.Tensor:
    """Dense visibility [T, n] of absolute key indices ``keys`` [n] (the rule of :func:`attend`)."""
    qi = q_index[:, None]
    if tail_mask is None:
        vis = keys[None, :] <= qi
    else:
        c = keys - n_prefix
        inside = (c >= 0) & (c < tail_mask.shape[1])
        vis = tail_mask[:, c.clamp(0, tail_mask.shape[1] - 1)] & inside[None, :]
        vis |= (keys < n_prefix)[None, :]
    if window > 0:
        vis &= (qi - keys[None, :]) < window
    return vis


def attend_blocks(q: torch.Tensor, kpool: torch.Tensor, vpool: torch.Tensor, slots: torch.Tensor, n_keys: int, *,
                  q_index: torch.Tensor, k_base: int = 0, window: int = 0, n_prefix: int | None = None,
                  tail_mask: torch.Tensor | None = None,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend`'s semantics with torch matmuls over blocks of at most BLOCK_KEYS keys, for
    prefill (T in the hundreds), where BLAS beats the scalar kernel. Each block's keys are gathered
    from their chunks into one float32 block, scored with one batched matmul per KV head, and merged
    into a running max / sum: temporary memory is O(T * nh * BLOCK_KEYS), never the region."""
    _check(q, kpool, vpool, slots, n_keys, q_index, tail_mask, n_prefix)
    T, nh, d = q.shape
    nkv, C = kpool.shape[1], kpool.shape[2]
    G = nh // nkv
    if T == 0 or n_keys <= 0:
        return _empty(T, nh, d)
    lo, hi = _key_range(q_index, n_keys, k_base, window, n_prefix, tail_mask)
    scale = d ** -0.5 if scale is None else scale
    q_index = q_index.to(torch.int64)
    if tail_mask is not None:
        tail_mask = tail_mask.to(torch.bool)
    slot_list = slots.tolist()
    qs = (q.to(torch.float32) * scale).view(T, nkv, G, d).permute(1, 2, 0, 3).reshape(nkv, G * T, d)
    acc = torch.zeros(nkv, G * T, d)
    m = torch.full((nkv, G * T), -math.inf)
    lsum = torch.zeros(nkv, G * T)
    block = FLASH_BLOCK_KEYS if _FLASH is not None else BLOCK_KEYS
    for b0 in range(lo, hi, block):
        b1 = min(hi, b0 + block)
        pieces_k, pieces_v = [], []
        j = b0
        while j < b1:  # the block's rows, chunk by chunk
            ch, row = divmod(j, C)
            n = min(C - row, b1 - j)
            pieces_k.append(kpool[slot_list[ch], :, row:row + n])
            pieces_v.append(vpool[slot_list[ch], :, row:row + n])
            j += n
        k = torch.cat(pieces_k, dim=1).to(torch.float32)  # [nkv, n, d]
        v = torch.cat(pieces_v, dim=1).to(torch.float32)
        vis = _visible_block(q_index, torch.arange(k_base + b0, k_base + b1), window, n_prefix, tail_mask)
        if _FLASH is not None and bool(vis.any(1).all()):
            # torch's fused CPU attention for the block (out and its log-sum-exp): ~2.3x the matmuls below
            # at prefill shapes; merged into the running state like any split
            bias = None if bool(vis.all()) else torch.zeros(vis.shape).masked_fill_(~vis, -math.inf)
            kf, vf = (x.repeat_interleave(G, 0)[None] for x in (k, v))
            ob, lb = _FLASH(q.to(torch.float32).transpose(0, 1)[None], kf, vf, 0.0, False, attn_mask=bias,
                            scale=scale)[:2]
            ob = ob[0].reshape(nkv, G * T, d)
            lb = lb[0].reshape(nkv, G * T)
            mn = torch.maximum(m, lb)
            ref = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))
            alpha, beta = torch.exp(m - ref), torch.exp(lb - ref)
            lsum = lsum * alpha + beta
            acc = acc * alpha.unsqueeze(-1) + ob * beta.unsqueeze(-1)
            m = mn
            continue
        s = torch.bmm(qs, k.transpose(1, 2)).view(nkv, G, T, b1 - b0)
        s = s.masked_fill(~vis, -math.inf).view(nkv, G * T, b1 - b0)
        mn = torch.maximum(m, s.amax(-1))
        ref = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))
        alpha = torch.exp(m - ref)
        p = torch.exp(s - ref.unsqueeze(-1))
        lsum = lsum * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + torch.bmm(p, v)
        m = mn
    out = acc / torch.where(lsum > 0, lsum, torch.ones_like(lsum)).unsqueeze(-1)
    lse = m + lsum.log()
    lse = torch.where(lsum > 0, lse, torch.full_like(lse, -math.inf))
    out = out.view(nkv, G, T, d).permute(2, 0, 1, 3).reshape(T, nh, d)
    return out, lse.view(nkv, G, T).permute(2, 0, 1).reshape(T, nh)


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernels' specializations now (float32, bfloat16
    and float16 pools; general and decode paths), so no compilation happens mid-run."""
    for dtype in _VIEWS:
        pool = torch.zeros(1, 1, 4, 2, dtype=dtype)
        attend(torch.zeros(1, 1, 2), pool, pool, torch.zeros(1, dtype=torch.int32), 4,
               q_index=torch.tensor([3]))
        pools, row = DecodePools(pool, pool), torch.zeros(1, 1, 2, dtype=dtype)
        slots = np.zeros(1, dtype=np.int32)
        attend_decode(torch.zeros(1, 1, 2), row, row, pools, slots, 4)
        _decode_parallel(torch.zeros(1, 1, 2), 0, row, row, pools, slots, 4, 1, 1.0)
