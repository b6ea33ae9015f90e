"""Decode attention over quantized KV chunks (``--kv-dtype q8|q4``).

The records are :mod:`kernels_cpu.kv_quant`'s: per chunk and KV head, the codes then the float16
scales (and q4's minimums); keys per channel over groups of 32 tokens, values per token over the head
dim. The products and the online softmax are :mod:`kernels_cpu.attention`'s (register-blocked 4 query
rows x 4 keys), over one group of 32 keys at a time:

* q8 runs them over the int8 codes themselves, widened in registers like bf16: a key group's
  per-channel scales fold into the query once per group (``q . k_j = (q * s) . c_j``, KIVI's trick), a
  value's per-token scale into its softmax weight (``p_j s_j``). Same instructions per element as bf16,
  half the bytes.
* q4 first widens a group's nibbles (two per byte) into a float32 block in L1 (``m + s * c``), then the
  same products over it: a few more instructions per element than bf16 (A1q in docs/BENCHMARKS.md).

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

from kernels_cpu.attention import _NEG, _half_bits_to_f32, _ptr, _scores, _softmax, _splits, _to_f32, _values
from kernels_cpu.kv_quant import GROUP, KVQuant


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


@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _widen_q4(codes, t0, ks, km, vs, vm, out, g):  # pragma: no cover - compiled
    """out[0, g, j, x] = km[x] + ks[x] * vs[t0 + j] * code + vm[t0 + j] for the GROUP tokens from t0 (packed
    nibbles: per 32 channels, byte i = channels i, i + 16). Keys: ks, km per channel, vs = 1, vm = 0;
    values: vs, vm per token, ks = 1, km = 0."""
    d = ks.shape[0]
    H = GROUP // 2
    for j in range(GROUP):
        sv = vs[t0 + j]
        mv = vm[t0 + j]
        for xg in range(d // GROUP):
            for i in range(H):
                b = np.uint8(codes[t0 + j, xg * H + i])
                x = xg * GROUP + i
                out[0, g, j, x] = km[x] + ks[x] * (mv + sv * np.float32(b & np.uint8(15)))
                out[0, g, j, x + H] = km[x + H] + ks[x + H] * (mv + sv * np.float32(b >> np.uint8(4)))


@nb.njit(fastmath=True, cache=True, nogil=True)
def _attend_chunks(qg, g, kbuf, vbuf, slots, c0, c1, bits, acc, m, lsum):  # pragma: no cover - compiled
    """One task: KV head g over the closed chunks slots[c0:c1] (every key visible), GROUP keys at a time,
    through kernels_cpu.attention's register-blocked products and online softmax; state acc [R, d], m,
    lsum [R] (qg pre-scaled).

    q8: the products run over the codes themselves, widened in registers: a key group's per-channel
    scales are folded into the query (``q . k = (q * s) . c``), a value's per-token scale into its softmax
    weight. q4: a group's nibbles are first widened to float32 in a small L1-resident block."""
    nkv, R, d = qg.shape
    _P, _nkv, C, w = kbuf.shape
    cb = d * bits // 8
    s = np.empty((R, GROUP), dtype=np.float32)
    sw = np.empty((R, GROUP), dtype=np.float32)
    qs = np.empty((1, R, d), dtype=np.float32)
    kf = np.empty((1, nkv, GROUP, d), dtype=np.float32)  # q4: only [0, g] is used (the float kernel's indexing)
    ks = np.empty(d, dtype=np.float32)
    km = np.zeros(d, dtype=np.float32)
    ones, zeros = np.ones(max(C, d), dtype=np.float32), np.zeros(max(C, d), dtype=np.float32)
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
        kc = nb.carray(_ptr(ka, np.int8), (1, 1, C, cb))
        vc = nb.carray(_ptr(va, np.int8), (1, 1, C, cb))
        for t in range(C):
            vs[t] = _half_bits_to_f32(vsc[t])
            if bits == 4:
                vm[t] = _half_bits_to_f32(vmn[t])
        for gr in range(C // GROUP):
            t0 = gr * GROUP
            for x in range(d):
                ks[x] = _half_bits_to_f32(ksc[gr, x])
                if bits == 4:
                    km[x] = _half_bits_to_f32(kmn[gr, x])
            if bits == 8:
                for r in range(R):
                    for x in range(d):
                        qs[0, r, x] = qg[g, r, x] * ks[x]
                _scores(qs, 0, kc, 0, t0, GROUP, s)
                _softmax(s, GROUP, m, lsum, acc)
                for r in range(R):
                    for j in range(GROUP):
                        sw[r, j] = s[r, j] * vs[t0 + j]
                _values(vc, 0, 0, t0, GROUP, sw, acc)
            else:
                _widen_q4(kc[0, 0], t0, ks, km, ones, zeros, kf, g)
                _scores(qg, g, kf, 0, 0, GROUP, s)
                _softmax(s, GROUP, m, lsum, acc)
                _widen_q4(vc[0, 0], t0, ones[:d], zeros[:d], vs, vm, kf, g)
                _values(kf, g, 0, 0, GROUP, s, acc)


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
