"""Decode attention over quantized KV chunks (``--kv-dtype q8|q4``).

The records are :mod:`kernels_cpu.kv_quant`'s: per chunk and KV head, the codes then the float16
scales (and q4's minimums); keys per channel over groups of 32 tokens, values per token over the head
dim. Both formats run straight over the codes, widened in registers (:mod:`kernels_cpu.simd`: int8
converted as integers, q4's byte holding channels i and i + 16 split by mask and shift), never
through a dequantized float copy:

* keys, per group of 32 tokens: ``q . k_t = (q * s) . c_t + q . m`` (KIVI's trick): the group's
  per-channel scales s fold into the query once, the scores are simd.qk4x4's (4 query rows x 4 keys
  in registers, one transposing reduction) over the codes c_t, and q4's minimums m add one number
  per row and group;
* values: ``sum_t p_t (m_t + s_t c_t) = sum_t (p_t s_t) c_t + (sum_t p_t m_t) * 1``: a token's scale
  folds into its softmax weight, q4's minimums into one number per row added to every channel.
* q8 runs kernels_cpu.attention's online softmax and value product per group of 32 keys, as bf16
  does (the same instructions per element, half the bytes). q4 runs one softmax step per chunk
  (_softmax_all: vectorised, no mask) and simd.pv4 over the value nibbles, the 4 rows' accumulators
  for 32 channels in registers across a group. (q8 through the q4 scheme measured 7-25 % slower out
  of cache at 16k-64k tokens, while equal in cache: kept as it was.)

So q4 costs the same FMAs as bf16 (per token and KV head 2 * d per query row) plus a few integer
instructions per 16 codes: on a core that computes slower than memory delivers (AMD EPYC, Zen 4:
512-bit FMAs double-pumped) its gain over bf16 is bounded by the FMA rate, not by its 3.2x fewer
bytes (A1q in docs/BENCHMARKS.md).

Parallel over (KV head x split of chunks), the splits merged by log-sum-exp. Only closed (whole) chunks
are quantized and every key of a closed chunk is visible to a decode query, so there is no mask here:
the open chunk, in floats, goes through the float kernel and is merged by the caller.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from kernels_cpu.attention import (_NEG, PF_KEYS, _exp_le0, _half_bits_to_f32, _ptr, _scores, _softmax, _splits, _to_f32,
                                   _values)
from kernels_cpu.kv_quant import GROUP, KVQuant
from kernels_cpu.simd import pv4, qk4x4


@intrinsic
def _prefetch_at(typingctx, addr):
    """Hint the cache line at integer address ``addr`` into the caches (llvm.prefetch)."""
    sig = types.void(types.intp)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(cache=True, nogil=True, inline="always")
def _prefetch_span(addr, n):  # pragma: no cover - compiled
    for off in range(0, n, 64):
        _prefetch_at(addr + off)


@overload(_to_f32, inline="always")
def _code_to_f32(x):
    """kernels_cpu.attention's element widening, extended to q8 codes (int8): its register-blocked
    products then run over a record's codes as they run over bf16 keys."""
    if x == types.int8:
        return lambda x: np.float32(x)
    return None


@nb.njit(fastmath=True, cache=True, nogil=True)
def _softmax_all(s, qm, grp, vs, vm, m, lsum, acc, pw):  # pragma: no cover - compiled
    """q4's online softmax step over one chunk (kernels_cpu.attention._softmax without its mask: every
    key is visible), the values' folds in the same pass.

    Scores s [R, n] (each run of ``grp`` keys offset by qm[run, r], the keys' ``q . min`` term) become
    weights p = exp(s + qm - m) under each row's new running max m (acc and lsum rescaled when it
    grows); pw = p * vs (the values' per-token scales folded into the weights) and acc[r] += sum_j p_j
    vm_j on every channel (the per-token minimums' rank-1 term). Not inlined on purpose: inlined, the
    run length is the constant GROUP, LLVM unrolls these loops whole and leaves every max, exponential
    and sum scalar (measured: a third of the q4 kernel's time); here each row's loops are vectorised."""
    R, n = s.shape
    d = acc.shape[1]
    for r in range(R):
        m0 = m[r]
        bm = m0
        for t0 in range(0, n, grp):
            a = qm[t0 // grp, r]
            for j in range(t0, t0 + grp):
                v = s[r, j] + a
                s[r, j] = v
                bm = v if v > bm else bm
        alpha = np.float32(1.0)
        if bm > m0:
            alpha = _exp_le0(m0 - bm)
            lsum[r] *= alpha
            m[r] = bm
        tot = np.float32(0.0)
        b = np.float32(0.0)
        for j in range(n):
            p = _exp_le0(s[r, j] - bm)
            tot += p
            pw[r, j] = p * vs[j]
            b += p * vm[j]
        lsum[r] += tot
        for x in range(d):
            acc[r, x] = acc[r, x] * alpha + b


@nb.njit(fastmath=True, cache=True, nogil=True)
def _fold_keys(qg, g, ksc, kmn, ks, km, qs, qm):  # pragma: no cover - compiled
    """A q4 key group's per-channel scales ksc and minimums kmn (float16 bits) into its queries:
    qs[0, r] = qg[g, r] * ks and qm[r] = qg[g, r] . km, so that ``q . k = qs . code + qm``."""
    R, d = qg.shape[1], qg.shape[2]
    for x in range(d):
        ks[x] = _half_bits_to_f32(ksc[x])
        km[x] = _half_bits_to_f32(kmn[x])
    for r in range(R):
        a = np.float32(0.0)
        for x in range(d):
            qs[0, r, x] = qg[g, r, x] * ks[x]
            a += qg[g, r, x] * km[x]
        qm[r] = a


@nb.njit(fastmath=True, cache=True, nogil=True)
def _attend_chunks(qg, g, kbuf, vbuf, slots, c0, c1, bits, acc, m, lsum):  # pragma: no cover - compiled
    """One task: KV head g over the closed chunks slots[c0:c1] (every key visible), a chunk at a time;
    state acc [R, d], m, lsum [R] (qg pre-scaled, R a multiple of 4, d of GROUP).

    Per key group the scales fold into the query and simd.qk4x4 scores the codes. q8 then runs
    kernels_cpu.attention's softmax and value product per group (over the int8 codes, the value scales
    folded into the weights); q4 one softmax step per chunk (_softmax_all) and simd.pv4 over the value
    nibbles (the module docstring has the algebra and why the two differ)."""
    nkv, R, d = qg.shape
    _P, _nkv, C, w = kbuf.shape
    cb = d * bits // 8
    s = np.empty((R, C), dtype=np.float32)  # q4's scores and weights over a chunk
    sw = np.empty((R, C), dtype=np.float32)
    s8 = np.empty((R, GROUP), dtype=np.float32)  # q8's over a group
    sw8 = np.empty((R, GROUP), dtype=np.float32)
    qs = np.empty((1, R, d), dtype=np.float32)
    ks = np.empty(d, dtype=np.float32)
    km = np.zeros(d, dtype=np.float32)
    qm = np.zeros((C // GROUP, R), dtype=np.float32)
    vs = np.empty(C, dtype=np.float32)
    vm = np.zeros(C, dtype=np.float32)
    for r in range(R):
        m[r] = _NEG
        lsum[r] = 0.0
        for x in range(d):
            acc[r, x] = 0.0
    kbase, vbase = kbuf.ctypes.data, vbuf.ctypes.data
    rec = C * w
    nparam = C * d // GROUP  # key scales per record (= minimums)
    for c in range(c0, c1):
        off = (slots[c] * _nkv + g) * rec
        ka, va = kbase + off, vbase + off
        if c + 1 < c1:  # the next chunk's first keys and values
            noff = (slots[c + 1] * _nkv + g) * rec
            _prefetch_span(kbase + noff, 16 * cb)
            _prefetch_span(vbase + noff, 16 * cb)
        ksc = nb.carray(_ptr(ka + C * cb, np.int16), (C // GROUP, d))
        kmn = nb.carray(_ptr(ka + C * cb + 2 * nparam, np.int16), (C // GROUP, d))
        vsc = nb.carray(_ptr(va + C * cb, np.int16), C)
        vmn = nb.carray(_ptr(va + C * cb + 2 * C, np.int16), C)
        for t in range(C):
            vs[t] = _half_bits_to_f32(vsc[t])
        if bits == 8:
            kc8 = nb.carray(_ptr(ka, np.int8), (1, 1, C, cb))
            vc8 = nb.carray(_ptr(va, np.int8), (1, 1, C, cb))
            for gr in range(C // GROUP):
                t0 = gr * GROUP
                for x in range(d):
                    ks[x] = _half_bits_to_f32(ksc[gr, x])
                for r in range(R):
                    for x in range(d):
                        qs[0, r, x] = qg[g, r, x] * ks[x]
                _scores(qs, 0, kc8, 0, t0, GROUP, s8)
                _softmax(s8, GROUP, m, lsum, acc)
                for r in range(R):
                    for j in range(GROUP):
                        sw8[r, j] = s8[r, j] * vs[t0 + j]
                _values(vc8, 0, 0, t0, GROUP, sw8, acc)
            continue
        kc4 = nb.carray(_ptr(ka, np.uint8), (1, 1, C, cb))
        vc4 = nb.carray(_ptr(va, np.uint8), (C, cb))
        for t in range(C):
            vm[t] = _half_bits_to_f32(vmn[t])
        for t0 in range(0, C, GROUP):
            _fold_keys(qg, g, ksc[t0 // GROUP], kmn[t0 // GROUP], ks, km, qs, qm[t0 // GROUP])
            for r in range(0, R, 4):
                for j in range(0, GROUP, 4):
                    if r == 0 and t0 + j + PF_KEYS + 4 <= C:  # kernels_cpu.attention's software prefetch
                        _prefetch_span(ka + (t0 + j + PF_KEYS) * cb, 4 * cb)
                    qk4x4(qs, 0, r, kc4, 0, t0 + j, s, t0 + j)
        _softmax_all(s, qm, GROUP, vs, vm, m, lsum, acc, sw)
        for t0 in range(0, C, GROUP):  # a group's value rows stay in L1 across pv4's channel blocks
            for r in range(0, R, 4):
                pv4(vc4, t0, GROUP, sw, r, acc)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend_kernel(qg, kbuf, vbuf, slots, n_chunks, nsplit, split_chunks, bits, acc, mpart, lpart
                   ):  # pragma: no cover - compiled
    """Tasks (KV head g, split sp) over chunks [sp * split_chunks, ...) of slots[:n_chunks]; per task its
    unnormalised output acc, running max mpart and sum lpart (merged by the caller)."""
    nkv, R, d = qg.shape
    for task in nb.prange(nkv * nsplit):
        g = task // nsplit
        sp = task - g * nsplit
        c0 = sp * split_chunks
        c1 = min(n_chunks, c0 + split_chunks)
        a = np.empty((R, d), dtype=np.float32)
        m = np.empty(R, dtype=np.float32)
        ls = np.empty(R, dtype=np.float32)
        _attend_chunks(qg, g, kbuf, vbuf, slots, c0, c1, bits, a, m, ls)
        for r in range(R):
            mpart[task, r] = m[r]
            lpart[task, r] = ls[r]
            for x in range(d):
                acc[task, r, x] = a[r, x]


def attend(q: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, slots, n_chunks: int, fmt: KVQuant, *,
           scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of decode queries q [T, nh, d] over the closed quantized chunks in pool slots
    ``slots[:n_chunks]`` (records kbuf, vbuf [P, nkv, C, w] uint8, :mod:`kernels_cpu.kv_quant`), every key
    visible to every query. Returns (out [T, nh, d], lse [T, nh]) in float32 as
    :func:`kernels_cpu.attention.attend` does (the open chunk's result merges with it by
    :func:`kernels_cpu.attention.merge`)."""
    T, nh, d = q.shape
    _P, nkv, C, w = kbuf.shape
    if (kbuf.dtype != torch.uint8 or vbuf.shape != kbuf.shape or vbuf.dtype != torch.uint8 or d != fmt.head_dim
            or C != fmt.chunk_tokens or w != fmt.row_bytes() or nh % nkv or not kbuf.is_contiguous()
            or not vbuf.is_contiguous()):
        raise ValueError(f"quantized attention: q {tuple(q.shape)}, records {tuple(kbuf.shape)} {kbuf.dtype} / "
                         f"{tuple(vbuf.shape)} for {fmt}")
    slots = np.ascontiguousarray(np.asarray(slots, dtype=np.int32))
    if n_chunks <= 0 or T == 0:
        return torch.zeros(T, nh, d), torch.full((T, nh), float("-inf"))
    if n_chunks > slots.shape[0] or slots[:n_chunks].min() < 0 or slots[:n_chunks].max() >= kbuf.shape[0]:
        raise ValueError(f"{n_chunks} chunks in slots {slots.tolist()} of a pool of {kbuf.shape[0]}")
    G = nh // nkv
    scale = d ** -0.5 if scale is None else scale
    rows = T * G
    R = -(-rows // 4) * 4  # register blocks of 4 rows: padding rows are zero queries, dropped
    qg = torch.zeros(nkv, R, d)
    qg[:, :rows] = (q.to(torch.float32) * scale).view(T, nkv, G, d).transpose(0, 1).reshape(nkv, rows, d)
    ns, _keys = _splits(n_chunks * C, nkv, nb.get_num_threads())
    per = -(-n_chunks // ns)
    ns = -(-n_chunks // per)
    acc = torch.empty(nkv * ns, R, d)
    mpart = torch.empty(nkv * ns, R)
    lpart = torch.empty(nkv * ns, R)
    _attend_kernel(qg.numpy(), kbuf.numpy(), vbuf.numpy(), slots, n_chunks, ns, per, fmt.bits, acc.numpy(),
                   mpart.numpy(), lpart.numpy())
    # log-sum-exp merge of each head's splits (every split holds keys: every sum > 0)
    mpart, lpart, acc = mpart.view(nkv, ns, R), lpart.view(nkv, ns, R), acc.view(nkv, ns, R, d)
    mx = mpart.amax(1, keepdim=True)
    wgt = torch.exp(mpart - mx)
    tot = (wgt * lpart).sum(1)
    out = (wgt.unsqueeze(-1) * acc).sum(1) / tot.unsqueeze(-1)
    lse = mx.squeeze(1) + tot.log()
    out = out[:, :rows].reshape(nkv, T, G, d).transpose(0, 1).reshape(T, nh, d)
    return out, lse[:, :rows].reshape(nkv, T, G).transpose(0, 1).reshape(T, nh)


def warm_up() -> None:
    """Compile (or load from Numba's cache) both formats' kernels now, so no compilation happens mid-run."""
    for name in ("q8", "q4"):
        fmt = KVQuant(name, GROUP, GROUP)
        rec = torch.zeros(1, 1, GROUP, fmt.row_bytes(), dtype=torch.uint8)
        attend(torch.zeros(1, 1, GROUP), rec, rec, np.zeros(1, np.int32), 1, fmt)
