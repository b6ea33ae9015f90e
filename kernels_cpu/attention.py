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
  FMAs, and ran at ~8 GB/s per core;
- prefetches PF_KEYS keys ahead in software: the 4 rows read side by side defeat the hardware
  stream prefetcher (measured: 10 -> 22 GB/s on one core from DRAM, the in-cache compute rate);
- runs an online softmax per block of keys (one running max / rescale per block, not per key),
  with a vectorisable exp (Cody-Waite range reduction + polynomial: libm's ``expf`` is a scalar
  call per score, and there is one score per key and query head);
- runs in parallel over (KV head x KV split) tasks and merges the splits by log-sum-exp, so that
  a model with few KV heads (the default model has 3) still keeps every core streaming.

A1 (32 query / 8 KV heads, d 128, bf16, 2 threads, tools/bench_attention.py): 36-44 GB/s at
16k-128k tokens, 74-90 % of the measured read bandwidth and ~3x torch SDPA; about 22 GB/s per
core, i.e. per core it is compute-bound near the memory limit, so two cores are needed to reach it.

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

BLOCK = 64  # keys per softmax block inside a task: the score scratch is [rows, BLOCK]
MIN_SPLIT_KEYS = 256  # a KV split shorter than this costs more in merging and scheduling than it gains
MAX_SPLITS = 64  # bounds the per-call partial results (never proportional to the context)
BLOCK_KEYS = 1024  # attend_blocks: keys gathered into one float32 block
# torch's fused CPU attention returning the log-sum-exp too (a private op: used when this torch has it)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_BLOCK_KEYS = 4096  # keys per block through it (fewer, larger calls: its own tiling is inside)
PF_KEYS = 16  # software prefetch distance, in keys (see _scores)
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


@intrinsic
def _prefetch(typingctx, arr, i0, i1, i2, off):
    """Hint the cache line ``off`` bytes past arr[i0, i1, i2, 0] into the caches (llvm.prefetch)."""
    sig = types.void(arr, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2], args[3], zero])
        i32 = ir.IntType(32)
        ptr = builder.gep(builder.bitcast(ptr, ir.IntType(8).as_pointer()), [args[4]])
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


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
    """Compile (or load from Numba's cache) the kernel's specializations now (float32, bfloat16
    and float16 pools), so no compilation happens mid-run."""
    for dtype in _VIEWS:
        pool = torch.zeros(1, 1, 4, 2, dtype=dtype)
        attend(torch.zeros(1, 1, 2), pool, pool, torch.zeros(1, dtype=torch.int32), 4,
               q_index=torch.tensor([3]))
