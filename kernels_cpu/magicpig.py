"""MagicPIG: decode attention over the long tail of the KV by LSH sampling (CPU, Numba).

Exact attention reads every key and value; far into a long context most of them carry
almost no weight. MagicPIG (Infini-AI-Lab/MagicPIG) *samples* keys with a probability
it knows and reweights them (Horvitz-Thompson), which stays unbiased when attention is
not sparse (top-k would not). Per KV head and layer:

* **Centering.** Keys share a large common component; subtracting the mean of the indexed
  keys (fixed when the index is built) makes the angle to the query informative. Logits
  still use the raw keys, so the partial state merges with an exact part over raw keys.
* **SimHash.** A Gaussian matrix R (d x K*L, fixed seed). Table l's code of a vector x is
  the K bits ``[x . R[:, l*K + j] > 0]``; keys are hashed once (centered), the query every step.
* **Tables.** CSR per (KV head, table): token ids sorted by code plus bucket offsets, so a
  query touches its bucket only (~L*n/2^K entries), never every code.
* **Sampling and estimator.** A key is sampled iff it shares the query's bucket in >= 2 of
  the L tables: probability u = 1 - (1-P)^L - L*P*(1-P)^(L-1), P = (1 - theta/pi)^K with
  theta the angle between q and the centered key (computed exactly per key; -log(u + 1e-4) is
  then read from a fine table in cos, see _log_u_table). Its logit is ``scale*q.k - log(u + 1e-4)``,
  and the sampled set returns (out, natural-log lse) for merging with the exact part (sinks
  and the recent window) by log-sum-exp.

Memory (what the planner charges): ids and bucket offsets are uint16, which caps a *segment*
at 65535 tokens; a long prefix is several segments, and tokens that age out of the exact
window later arrive as small segments. Collisions are counted per segment (a token lives in
exactly one), so segments are queried one after another with one running softmax. Small
segments are merged LSM-style (a segment is merged into its predecessor while that one is at
most MERGE_RATIO times larger and the span fits), so a step queries O(log n) segments and
each token is copied O(log n) times in all, with no rehashing (a merge concatenates buckets).
Rebuilding everything per extension would cost O(n) hashing per step instead. Per token and
KV head: 2*L bytes of ids and a float32 norm of the centered key; the keys stay in the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.typed import List as NbList

from kernels_cpu import hugepages
from kernels_cpu import magicpig_q
from kernels_cpu.kv_quant import GROUP, KVQuant
from kernels_cpu.matvec import _bits_to_f32

SEG_MAX = 65535  # tokens a segment may span: ids and bucket offsets fit uint16
MERGE_RATIO = 8  # merge the last segment into its predecessor while that is at most this many times larger
U_EPS = 1e-4  # MagicPIG's stabiliser in log(u + eps): bounds the weight of a rarely sampled key
HASH_ROWS = 1024  # tokens hashed per matmul at build (bounds the projection buffer)
PREFETCH = 16  # picked rows the gathers prefetch ahead
PREFETCH_TABLES = 8  # tables whose query bucket the walk prefetches ahead
TABLE_SIZE = 8193  # points of the -log(u + eps) table over cos in [-1, 1]
_KIND_F32, _KIND_BF16, _KIND_F16 = 0, 1, 2
_F16_RESCALE = np.float32(2.0 ** 112)  # float32 exponent bias (127) minus float16's (15)


def collision_probability(cos_theta, K: int, L: int):
    """Probability that a key at cosine ``cos_theta`` to the query is sampled (collides in >= 2 of
    L tables of K bits): u = 1 - (1-P)^L - L*P*(1-P)^(L-1), P = (1 - theta/pi)^K. float64, the shape
    of ``cos_theta`` (numbers, arrays and tensors)."""
    c = cos_theta.double().numpy() if isinstance(cos_theta, torch.Tensor) else cos_theta
    theta = np.arccos(np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0))
    P = (1.0 - theta / np.pi) ** K
    u = 1.0 - (1.0 - P) ** L - L * P * (1.0 - P) ** (L - 1)
    return float(u) if np.ndim(u) == 0 else u


@lru_cache(maxsize=16)
def _hash_matrix(d: int, K: int, L: int, seed: int) -> torch.Tensor:
    """R, [d, K*L] float32 (column l*K + j: table l, bit j); shared by the indexes that agree."""
    rt = np.random.default_rng(seed).standard_normal((K * L, d), dtype=np.float32)
    return torch.from_numpy(rt).T.contiguous()


# ----------------------------------------------------------------------------------------------
# Numba kernels

@intrinsic
def _prefetch_row(typingctx, row):
    """Ask for every cache line of a contiguous 1-D array (a pool row) ahead of its use
    (llvm.prefetch: read, keep in all cache levels)."""
    sig = types.void(row)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(ary.data, i8p)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]),
            "llvm.prefetch.p0")
        i32 = ir.IntType(32)
        nbytes = builder.mul(ary.nitems, ary.itemsize)
        # rows are at most a few hundred bytes: unroll over a fixed line count, guarded by the size
        for line in range(8):
            off = ir.Constant(ir.IntType(64), 64 * line)
            with builder.if_then(builder.icmp_unsigned("<", off, nbytes)):
                builder.call(fn, [builder.gep(ptr, [off]), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@nb.njit(inline="always")
def _h2f(h):  # pragma: no cover - compiled
    """float16 bits (low 16 of a uint32) -> float32: shift the exponent and mantissa into place
    and rescale the bias (subnormals come out right; the KV never holds inf/nan)."""
    f = _bits_to_f32((h & np.uint32(0x7FFF)) << np.uint32(13)) * _F16_RESCALE
    return -f if h & np.uint32(0x8000) else f


@nb.njit(fastmath=True, inline="always")
def _dot_row(w, qh, kind):  # pragma: no cover - compiled
    """q . key over one pool row given as uint32 words (float32 bits, or two 16-bit values)."""
    acc = np.float32(0.0)
    if kind == _KIND_F32:
        for i in range(w.shape[0]):
            acc += _bits_to_f32(w[i]) * qh[i]
    elif kind == _KIND_BF16:
        for j in range(w.shape[0]):
            x = w[j]
            acc += (_bits_to_f32(x << np.uint32(16)) * qh[2 * j]
                    + _bits_to_f32(x & np.uint32(0xFFFF0000)) * qh[2 * j + 1])
    else:
        for j in range(w.shape[0]):
            x = w[j]
            acc += _h2f(x & np.uint32(0xFFFF)) * qh[2 * j] + _h2f(x >> np.uint32(16)) * qh[2 * j + 1]
    return acc


@nb.njit(fastmath=True, inline="always")
def _axpy_row(w, a, acc, kind):  # pragma: no cover - compiled
    """acc += a * value row (uint32 words as in _dot_row)."""
    if kind == _KIND_F32:
        for i in range(w.shape[0]):
            acc[i] += a * _bits_to_f32(w[i])
    elif kind == _KIND_BF16:
        for j in range(w.shape[0]):
            x = w[j]
            acc[2 * j] += a * _bits_to_f32(x << np.uint32(16))
            acc[2 * j + 1] += a * _bits_to_f32(x & np.uint32(0xFFFF0000))
    else:
        for j in range(w.shape[0]):
            x = w[j]
            acc[2 * j] += a * _h2f(x & np.uint32(0xFFFF))
            acc[2 * j + 1] += a * _h2f(x >> np.uint32(16))


def _key_dot(kw, slot, g, r, qh, kind):
    """q . key of row r of chunk slot ``slot``, KV head g: a float pool's row as uint32 words (``kind``: its
    float type), or a quantized record pool's (uint8, ``kind``: the bits; kernels_cpu.magicpig_q). Chosen
    by the pool's element type when the kernel is compiled (the overload below)."""


def _value_axpy(vw, slot, g, r, a, acc, kind):
    """acc += a * value row r of chunk slot ``slot``, KV head g (pools as in _key_dot)."""


def _prefetch_key(kw, slot, g, r, d, kind):
    """Ask for key row r ahead of its _key_dot."""


def _prefetch_value(vw, slot, g, r, d, kind):
    """Ask for value row r ahead of its _value_axpy."""


@overload(_key_dot, inline="always")
def _key_dot_impl(kw, slot, g, r, qh, kind):
    if kw.dtype == types.uint8:
        return lambda kw, slot, g, r, qh, kind: magicpig_q.key_dot(kw, slot, g, r, qh, kind)
    return lambda kw, slot, g, r, qh, kind: _dot_row(kw[slot, g, r], qh, kind)


@overload(_value_axpy, inline="always")
def _value_axpy_impl(vw, slot, g, r, a, acc, kind):
    if vw.dtype == types.uint8:
        return lambda vw, slot, g, r, a, acc, kind: magicpig_q.value_axpy(vw, slot, g, r, a, acc, kind)
    return lambda vw, slot, g, r, a, acc, kind: _axpy_row(vw[slot, g, r], a, acc, kind)


@overload(_prefetch_key, inline="always")
def _prefetch_key_impl(kw, slot, g, r, d, kind):
    if kw.dtype == types.uint8:
        return lambda kw, slot, g, r, d, kind: magicpig_q.prefetch_key(kw, slot, g, r, d, kind)
    return lambda kw, slot, g, r, d, kind: _prefetch_row(kw[slot, g, r])


@overload(_prefetch_value, inline="always")
def _prefetch_value_impl(vw, slot, g, r, d, kind):
    if vw.dtype == types.uint8:
        return lambda vw, slot, g, r, d, kind: magicpig_q.prefetch_value(vw, slot, g, r, d, kind)
    return lambda vw, slot, g, r, d, kind: _prefetch_row(vw[slot, g, r])


@lru_cache(maxsize=16)
def _log_u_table(K: int, L: int, eps: float) -> np.ndarray:
    """-log(u + eps) on TABLE_SIZE evenly spaced cosines in [-1, 1] (float32). The kernel interpolates
    it linearly: one lookup instead of acos, two powers and a log per sampled key (those dominated
    the sampled part's time); the interpolation error is below 1e-5 in log space (tested)."""
    cos = np.linspace(-1.0, 1.0, TABLE_SIZE)
    t = -np.log(collision_probability(cos, K, L) + eps + 1e-30).astype(np.float32)
    t.flags.writeable = False
    return t


@nb.njit(inline="always")
def _neg_log_u(cos, table):  # pragma: no cover - compiled
    """-log(u + eps) at ``cos`` by linear interpolation in ``table``."""
    x = (min(np.float32(1.0), max(np.float32(-1.0), cos)) + np.float32(1.0)) * np.float32(0.5 * (TABLE_SIZE - 1))
    i = min(np.int64(x), TABLE_SIZE - 2)
    f = x - np.float32(i)
    return table[i] + f * (table[i + 1] - table[i])


@nb.njit(inline="always")
def _codes(proj_h, K, L, out):  # pragma: no cover - compiled
    """Bucket code per table from the query's projections [K*L]."""
    for l in range(L):
        c = 0
        for j in range(K):
            if proj_h[l * K + j] > 0:
                c |= 1 << j
        out[l] = c


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend_kernel(q, proj, qmu, kw, vw, kind, slots, bases, spans, ids_l, offs_l, norms_l,
                   K, L, scale, log_u, out, lse, nsampled):  # pragma: no cover - compiled
    """Per query head (in parallel), segment by segment: walk the query's bucket in each table
    counting collisions (saturating at 2: a token is picked once, when its count reaches 2), then
    the picked keys' reweighted logits, then their values, folded into one running softmax in
    float32. Picking first and gathering after, with prefetches a few rows ahead, keeps many
    row loads in flight: the gathers are random rows, so latency, not bandwidth, bounds them.
    In a decode step the layer's tables and pool arrive cold (the rest of the model has run
    since), so the walk also prefetches the buckets PREFETCH_TABLES tables ahead, and the
    key pass the picked keys' norms (measured ~30% off a cold 64k-token step).
    Heads that sample nothing report nsampled 0 (their lse is set outside)."""
    nh, d = q.shape
    nkv = kw.shape[1]
    group = nh // nkv
    C = kw.shape[2]
    nseg = len(ids_l)
    maxspan = 1
    for s in range(nseg):
        maxspan = max(maxspan, spans[s])
    for h in nb.prange(nh):
        g = h // group
        qh = q[h]
        qn = np.float32(0.0)
        for i in range(d):
            qn += qh[i] * qh[i]
        qn = np.float32(math.sqrt(qn))
        codes = np.empty(L, np.int64)
        _codes(proj[h], K, L, codes)
        counts = np.zeros(maxspan, np.uint8)
        acc = np.zeros(d, np.float32)
        m = np.float32(0.0)
        ssum = np.float32(0.0)
        taken = 0
        for s in range(nseg):
            ids = ids_l[s]
            offs = offs_l[s]
            norms = norms_l[s]
            base = bases[s]
            touched = 0
            for l in range(L):
                touched += np.int64(offs[g, l, codes[l] + 1]) - np.int64(offs[g, l, codes[l]])
            picked = np.empty(touched // 2 + 1, np.int64)  # a pick needs two touches (+1: the write ahead)
            npk = 0
            for l in range(min(L, PREFETCH_TABLES)):
                _prefetch_row(ids[g, l, np.int64(offs[g, l, codes[l]]):np.int64(offs[g, l, codes[l] + 1])])
            for l in range(L):
                c = codes[l]
                if l + PREFETCH_TABLES < L:
                    l2 = l + PREFETCH_TABLES
                    _prefetch_row(ids[g, l2, np.int64(offs[g, l2, codes[l2]]):np.int64(offs[g, l2, codes[l2] + 1])])
                for e in range(np.int64(offs[g, l, c]), np.int64(offs[g, l, c + 1])):
                    t = np.int64(ids[g, l, e])
                    x = counts[t]  # branch-free: whether a touch picks is unpredictable
                    counts[t] = x + (x < 2)
                    picked[npk] = base + t
                    npk += x == 1
            counts[:spans[s]] = 0
            if npk == 0:
                continue
            logits = np.empty(npk, np.float32)
            mx = np.float32(-3.0e38)
            for i in range(npk):
                if i + PREFETCH < npk:
                    b = picked[i + PREFETCH]
                    _prefetch_key(kw, slots[b // C], g, b % C, d, kind)
                    _prefetch_row(norms[g, b - base:b - base + 1])
                a = picked[i]
                dot = _key_dot(kw, slots[a // C], g, a % C, qh, kind)
                den = qn * norms[g, a - base]
                cos = (dot - qmu[h]) / den if den > 0 else np.float32(0.0)
                lg = np.float32(scale * dot) + _neg_log_u(cos, log_u)
                logits[i] = lg
                mx = max(mx, lg)
            if taken == 0:
                m = mx
            elif mx > m:
                f = np.float32(math.exp(m - mx))
                ssum *= f
                for i in range(d):
                    acc[i] *= f
                m = mx
            for i in range(npk):
                if i + PREFETCH < npk:
                    b = picked[i + PREFETCH]
                    _prefetch_value(vw, slots[b // C], g, b % C, d, kind)
                a = picked[i]
                wgt = np.float32(math.exp(logits[i] - m))
                ssum += wgt
                _value_axpy(vw, slots[a // C], g, a % C, wgt, acc, kind)
            taken += npk
        nsampled[h] = taken
        if taken > 0:
            inv = np.float32(1.0) / ssum
            for i in range(d):
                out[h, i] = acc[i] * inv
            lse[h] = m + math.log(ssum)
        else:
            out[h, :] = 0.0
            lse[h] = 0.0


SUBGROUP = 16  # query heads per shared gather at most: 2-bit collision counters of a group fit a uint32


@nb.njit(fastmath=True, inline="always")
def _walk(ids, offs, g, codes, L, counts, lo, hi, sampled, union):  # pragma: no cover - compiled
    """The query heads' walks (codes [gs, L]) over their buckets in every table of KV head g: head j's
    2-bit counter at bit 2j of counts[t] goes 0 -> 1 -> 2 and saturates (2: sampled), branch-free;
    a token enters ``union`` when its first head samples it (``sampled``: every counter's high bit).
    Returns the union's size. The buckets' bounds are cache misses (a table's offsets are spread over
    2^K entries), so all of them are asked for first, then all the buckets, and only then walked
    (lo, hi: [gs, L] scratch)."""
    gs = codes.shape[0]
    for j in range(gs):
        for l in range(L):
            _prefetch_row(offs[g, l, codes[j, l]:codes[j, l] + 2])
    for j in range(gs):
        for l in range(L):
            a = np.int64(offs[g, l, codes[j, l]])
            b = np.int64(offs[g, l, codes[j, l] + 1])
            lo[j, l] = a
            hi[j, l] = b
            _prefetch_row(ids[g, l, a:b])
    nu = 0
    for j in range(gs):
        bit = np.uint32(2 * j)
        for l in range(L):
            for e in range(lo[j, l], hi[j, l]):
                t = np.int64(ids[g, l, e])
                w = counts[t]
                x = (w >> bit) & np.uint32(3)
                counts[t] = w + (np.uint32(x < 2) << bit)
                union[nu] = t
                nu += (x == 1) & ((w & sampled) == 0)
    return nu


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend_group_kernel(q, proj, qmu, kw, vw, kind, slots, bases, spans, ids_l, offs_l, norms_l,
                         K, L, scale, log_u, exact, out, lse, nsampled):  # pragma: no cover - compiled
    """The shared gather: per KV head (in parallel; query groups over SUBGROUP heads split in
    sub-groups), segment by segment, each query head walks its own buckets into its own 2-bit
    counter of one uint32 per token, listing the union of the group's sampled tokens as it goes
    (in the order found: reading them in token order, i.e. memory order within a chunk, measured no
    faster), each with the mask of heads that sampled it. Each key row of the union is read once and dotted with the query
    heads that sampled it (their own reweighted logits, as in _attend_kernel), each value row
    once and added to those heads' running softmaxes. Per head the sampled set, the logits and
    the estimator are exactly _attend_kernel's; only the float summation order differs. The token
    ranges ``exact`` [R, 2] (the sinks and the recent window) join the same softmax first, every
    head attending each of their keys with u = 1: the exact part costs no kernel call or merge of
    its own. ``nsampled`` counts the sampled keys only."""
    nh, d = q.shape
    nkv = kw.shape[1]
    group = nh // nkv
    C = kw.shape[2]
    nseg = len(ids_l)
    nsub = (group + SUBGROUP - 1) // SUBGROUP
    maxspan = 1
    for s in range(nseg):
        maxspan = max(maxspan, spans[s])
    for task in nb.prange(nkv * nsub):
        g = task // nsub
        h0 = g * group + (task % nsub) * SUBGROUP
        gs = min(SUBGROUP, g * group + group - h0)
        codes = np.empty((gs, L), np.int64)
        qn = np.empty(gs, np.float32)
        for j in range(gs):
            _codes(proj[h0 + j], K, L, codes[j])
            acc2 = np.float32(0.0)
            for i in range(d):
                acc2 += q[h0 + j, i] * q[h0 + j, i]
            qn[j] = np.float32(math.sqrt(acc2))
        sampled = np.uint32(0)  # the high bit of every head's counter: set once it reaches 2
        for j in range(gs):
            sampled |= np.uint32(2) << np.uint32(2 * j)
        counts = np.zeros(maxspan, np.uint32)
        lo = np.empty((gs, L), np.int64)
        hi = np.empty((gs, L), np.int64)
        nex = 0
        for r in range(exact.shape[0]):
            nex += exact[r, 1] - exact[r, 0]
        union = np.empty(max(maxspan, nex) + 1, np.int64)  # +1: the walk writes one ahead
        masks = np.empty(max(maxspan, nex), np.uint32)
        acc = np.zeros((gs, d), np.float32)
        m = np.zeros(gs, np.float32)
        ssum = np.zeros(gs, np.float32)
        taken = np.zeros(gs, np.int64)
        mx = np.empty(gs, np.float32)
        npk = np.empty(gs, np.int64)
        nsamp = np.zeros(gs, np.int64)
        for s in range(-1, nseg):  # -1: the exact ranges
            ids = ids_l[max(s, 0)]
            offs = offs_l[max(s, 0)]
            norms = norms_l[max(s, 0)]
            if s < 0:
                base = 0
                nu = 0
                for r in range(exact.shape[0]):
                    for t in range(exact[r, 0], exact[r, 1]):
                        union[nu] = t
                        masks[nu] = sampled
                        nu += 1
            else:
                base = bases[s]
                nu = _walk(ids, offs, g, codes, L, counts, lo, hi, sampled, union)
                for i in range(nu):
                    masks[i] = counts[union[i]]
                counts[:spans[s]] = 0  # for the next segment
            if nu == 0:
                continue
            logits = np.empty((nu, gs), np.float32)
            for j in range(gs):
                mx[j] = np.float32(-3.0e38)
                npk[j] = 0
            for i in range(nu):
                if i + PREFETCH < nu:
                    b = base + union[i + PREFETCH]
                    _prefetch_key(kw, slots[b // C], g, b % C, d, kind)
                    if s >= 0:
                        _prefetch_row(norms[g, union[i + PREFETCH]:union[i + PREFETCH] + 1])
                t = union[i]
                a = base + t
                slot, r = slots[a // C], a % C
                nrm = norms[g, t] if s >= 0 else np.float32(0.0)
                w = masks[i]
                for j in range(gs):
                    if (w >> np.uint32(2 * j + 1)) & np.uint32(1):
                        h = h0 + j
                        dot = _key_dot(kw, slot, g, r, q[h], kind)
                        lg = np.float32(scale * dot)
                        if s >= 0:
                            den = qn[j] * nrm
                            cos = (dot - qmu[h]) / den if den > 0 else np.float32(0.0)
                            lg += _neg_log_u(cos, log_u)
                        logits[i, j] = lg
                        mx[j] = max(mx[j], lg)
                        npk[j] += 1
            for j in range(gs):
                if npk[j] == 0:
                    continue
                if taken[j] == 0:
                    m[j] = mx[j]
                elif mx[j] > m[j]:
                    f = np.float32(math.exp(m[j] - mx[j]))
                    ssum[j] *= f
                    for i in range(d):
                        acc[j, i] *= f
                    m[j] = mx[j]
                taken[j] += npk[j]
                if s >= 0:
                    nsamp[j] += npk[j]
            for i in range(nu):
                if i + PREFETCH < nu:
                    b = base + union[i + PREFETCH]
                    _prefetch_value(vw, slots[b // C], g, b % C, d, kind)
                a = base + union[i]
                slot, r = slots[a // C], a % C
                w = masks[i]
                for j in range(gs):
                    if (w >> np.uint32(2 * j + 1)) & np.uint32(1):
                        wgt = np.float32(math.exp(logits[i, j] - m[j]))
                        ssum[j] += wgt
                        _value_axpy(vw, slot, g, r, wgt, acc[j], kind)
        for j in range(gs):
            h = h0 + j
            nsampled[h] = nsamp[j]
            if taken[j] > 0:
                inv = np.float32(1.0) / ssum[j]
                for i in range(d):
                    out[h, i] = acc[j, i] * inv
                lse[h] = m[j] + math.log(ssum[j])
            else:
                out[h, :] = 0.0
                lse[h] = 0.0


@nb.njit(cache=True, nogil=True)
def _retrieve_kernel(codes, spans, ids_l, offs_l, group, picked, npicked):  # pragma: no cover - compiled
    """The sampled set per query head, as segment-relative (segment, id) pairs: the same walk as
    _attend_kernel without touching keys (for tests and statistics)."""
    nh, L = codes.shape
    nseg = len(ids_l)
    maxspan = 1
    for s in range(nseg):
        maxspan = max(maxspan, spans[s])
    counts = np.zeros(maxspan, np.uint8)
    for h in range(nh):
        g = h // group
        k = 0
        for s in range(nseg):
            ids = ids_l[s]
            offs = offs_l[s]
            for l in range(L):
                c = codes[h, l]
                for e in range(np.int64(offs[g, l, c]), np.int64(offs[g, l, c + 1])):
                    t = np.int64(ids[g, l, e])
                    if counts[t] == 0:
                        counts[t] = 1
                    elif counts[t] == 1:
                        counts[t] = 2
                        picked[h, k, 0] = s
                        picked[h, k, 1] = t
                        k += 1
            counts[:spans[s]] = 0
        npicked[h] = k


@nb.njit(parallel=True, cache=True, nogil=True)
def _pack_codes(proj, K, L, codes, t0):  # pragma: no cover - compiled
    """Keys' projections [nkv, rows, K*L] -> their bucket codes, codes[g, l, t0 + row] (K bits each).
    One pass in place of torch's compare, widen, shift and sum over [nkv, rows, L, K], which cost
    more than the projection's matmul itself."""
    nkv, rows, _ = proj.shape
    for t in nb.prange(nkv * rows):
        g = t // rows
        r = t % rows
        for l in range(L):
            c = 0
            for j in range(K):
                c |= np.int64(proj[g, r, l * K + j] > 0) << j
            codes[g, l, t0 + r] = c


@nb.njit(parallel=True, cache=True, nogil=True)
def _csr_build(codes, nbuckets, ids, offs):  # pragma: no cover - compiled
    """Counting sort of each (KV head, table)'s codes [n]: ids by code (stable), bucket offsets."""
    nkv, L, n = codes.shape
    for t in nb.prange(nkv * L):
        g = t // L
        l = t % L
        pos = np.zeros(nbuckets + 1, np.int64)
        for i in range(n):
            pos[np.int64(codes[g, l, i]) + 1] += 1
        for b in range(nbuckets):
            pos[b + 1] += pos[b]
        for b in range(nbuckets + 1):
            offs[g, l, b] = pos[b]
        for i in range(n):
            c = np.int64(codes[g, l, i])
            ids[g, l, pos[c]] = i
            pos[c] += 1


@nb.njit(parallel=True, cache=True, nogil=True)
def _csr_merge(ids_a, offs_a, ids_b, offs_b, shift, ids, offs):  # pragma: no cover - compiled
    """Bucket by bucket: a's ids, then b's shifted onto a's base (no rehashing)."""
    nkv, L, nb1 = offs_a.shape
    for t in nb.prange(nkv * L):
        g = t // L
        l = t % L
        pos = 0
        for b in range(nb1 - 1):
            offs[g, l, b] = pos
            for e in range(np.int64(offs_a[g, l, b]), np.int64(offs_a[g, l, b + 1])):
                ids[g, l, pos] = ids_a[g, l, e]
                pos += 1
            for e in range(np.int64(offs_b[g, l, b]), np.int64(offs_b[g, l, b + 1])):
                ids[g, l, pos] = np.int64(ids_b[g, l, e]) + shift
                pos += 1
        offs[g, l, nb1 - 1] = pos


# ----------------------------------------------------------------------------------------------
# The index

@dataclass
class _Segment:
    base: int  # absolute index of the token at id 0
    span: int  # ids lie in [0, span)
    count: int  # tokens held (span less gaps between extensions)
    ids: np.ndarray  # [nkv, L, count] uint16, sorted by code per table
    offs: np.ndarray  # [nkv, L, 2^K + 1] uint16 bucket starts
    norms: np.ndarray  # [nkv, span] float32, |k - mean|

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.offs.nbytes + self.norms.nbytes


def _words(t: torch.Tensor) -> np.ndarray:
    """A pool tensor as uint32 words (float32 bits, or pairs of 16-bit values) without a copy."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.view(torch.int32).numpy().view(np.uint32)


def _kind(dtype: torch.dtype) -> int:
    kinds = {torch.float32: _KIND_F32, torch.bfloat16: _KIND_BF16, torch.float16: _KIND_F16}
    if dtype not in kinds:
        raise TypeError(f"MagicPIG reads float32/bfloat16/float16 KV, not {dtype}")
    return kinds[dtype]


def _token_blocks(slots: np.ndarray, C: int, start: int, stop: int):
    """(slot, first row, last row + 1, first token) for the pool chunks covering [start, stop)."""
    a = start
    while a < stop:
        ci = a // C
        r0 = a - ci * C
        r1 = min(C, stop - ci * C)
        yield int(slots[ci]), r0, r1, a
        a += r1 - r0


class LSHIndex:
    """One layer's tables over a set of token indices, per KV head: key centering (mean of the
    indexed keys per KV head, fixed by the first non-empty range indexed), SimHash with a Gaussian
    matrix d x (K*L) (fixed seed), K bits per table (K <= 15), CSR bucket tables in segments of at
    most SEG_MAX tokens. ``build`` at prefill over [start, stop); ``extend`` adds tokens as they
    age out of the exact window (a new small segment, merged LSM-style: see the module notes).

    ``quant`` (``--kv-dtype q8|q4``): the key pool holds kernels_cpu.kv_quant records and the index hashes
    the keys *dequantized*, the very keys attention dots with: the sampling probability u and the centred
    norm of a key are then those of the vector attended (hashing the floats before quantization would
    weigh a sample by the angle of a key the estimator never sees), and an index over records equals one
    built over a float pool of the dequantized keys, table for table."""

    def __init__(self, nkv: int, d: int, K: int = 10, L: int = 150, seed: int = 0, *,
                 max_segment: int = SEG_MAX, quant: KVQuant | None = None):
        if not 0 <= K <= 15 or L < 1:
            raise ValueError(f"LSH needs 0 <= K <= 15 and L >= 1 (got K={K}, L={L})")
        if not 1 <= max_segment <= SEG_MAX:
            raise ValueError(f"max_segment must be in [1, {SEG_MAX}]")
        if quant is not None and quant.head_dim != d:
            raise ValueError(f"{quant} for head dim {d}")
        self.nkv, self.d, self.K, self.L, self.seed, self.quant = nkv, d, K, L, seed, quant
        self.max_segment = max_segment
        self.R = _hash_matrix(d, K, L, seed)  # [d, K*L]; read-only
        self.mean: np.ndarray | None = None  # [nkv, d] float32
        self.segments: list[_Segment] = []
        self.stop = 0  # tokens below this are indexed or skipped; extensions start here or later
        self._refresh()

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return sum(s.count for s in self.segments)

    @property
    def nbytes(self) -> int:
        """Bytes the tables hold (ids, bucket offsets, norms, the mean); R is shared per process."""
        return sum(s.nbytes for s in self.segments) + (0 if self.mean is None else self.mean.nbytes)

    @staticmethod
    def bytes_per_token(nkv: int, K: int, L: int) -> int:
        """Per indexed token and layer: uint16 ids in L tables and a float32 norm per KV head, plus
        the bucket offsets of half-full segments spread over their tokens (full segments cost half
        that). Add :meth:`overhead_bytes` once per layer for the small segments not yet merged."""
        offs = nkv * L * ((1 << K) + 1) * 2
        return nkv * (2 * L + 4) + -(-2 * offs // SEG_MAX)

    @staticmethod
    def overhead_bytes(nkv: int, K: int, L: int) -> int:
        """Per layer, beyond bytes_per_token: bucket offsets of the at most log_MERGE_RATIO(SEG_MAX)+1
        partly filled segments the merge rule leaves (their sizes fall by more than MERGE_RATIO),
        and the mean (head dims up to 256)."""
        chain = int(math.log(SEG_MAX, MERGE_RATIO)) + 2
        return chain * nkv * L * ((1 << K) + 1) * 2 + nkv * 256 * 4

    # -- building -------------------------------------------------------------------------------
    def build(self, kpool: torch.Tensor, slots, start: int, stop: int) -> None:
        """Forget what was indexed; index [start, stop) with the mean of those keys."""
        self.mean = None
        self.segments = []
        self.stop = start
        self.extend(kpool, slots, start, stop)

    def extend(self, kpool: torch.Tensor, slots, start: int, stop: int) -> None:
        """Add tokens [start, stop) (start >= everything indexed so far), hashed with the fixed mean."""
        if start < self.stop or stop < start:
            raise ValueError(f"extend({start}, {stop}): the index already reaches {self.stop}")
        self._check_pool(kpool)
        slots = np.asarray(slots.numpy() if isinstance(slots, torch.Tensor) else slots)
        if stop == start:
            return
        if self.mean is None:
            self.mean = self._mean(kpool, slots, start, stop)
        for a in range(start, stop, self.max_segment):
            self.segments.append(self._hash_segment(kpool, slots, a, min(stop, a + self.max_segment)))
            self._merge_tail()
        self.stop = stop
        self._refresh()

    def _check_pool(self, kpool: torch.Tensor) -> None:
        if self.quant is not None:
            want = self.quant.record_shape(self.nkv)
            if kpool.dim() != 4 or tuple(kpool.shape[1:]) != want or kpool.dtype != torch.uint8:
                raise ValueError(f"key records {tuple(kpool.shape)} {kpool.dtype} are not {self.quant.name}'s: uint8 "
                                 f"[P, {', '.join(map(str, want))}]")
        elif (kpool.dim() != 4 or kpool.shape[1] != self.nkv or kpool.shape[3] != self.d
              or not kpool.is_floating_point()):
            raise ValueError(f"key pool {tuple(kpool.shape)} {kpool.dtype} is not float [P, {self.nkv}, C, {self.d}]")

    def _keys(self, kpool: torch.Tensor, slot: int, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of chunk slot ``slot`` as float keys [nkv, r1 - r0, d] (records: dequantized)."""
        if self.quant is None:
            return kpool[slot, :, r0:r1].float()
        return self.quant.dequantize_keys(kpool[slot])[:, r0:r1]

    def _mean(self, kpool, slots, start, stop) -> np.ndarray:
        total = torch.zeros(self.nkv, self.d, dtype=torch.float64)
        for slot, r0, r1, _ in _token_blocks(slots, kpool.shape[2], start, stop):
            total += self._keys(kpool, slot, r0, r1).double().sum(1)
        return (total / (stop - start)).float().numpy()

    def _hash_segment(self, kpool, slots, start, stop) -> _Segment:
        """Hash [start, stop) (centered) into one CSR segment."""
        n, K, L = stop - start, self.K, self.L
        codes = np.zeros((self.nkv, L, n), dtype=np.uint16)
        norms = torch.empty(self.nkv, n, dtype=torch.float32)
        mean = torch.from_numpy(self.mean)[:, None, :]
        blocks = list(_token_blocks(slots, kpool.shape[2], start, stop))
        i = 0
        while i < len(blocks):  # gather chunks into batches of about HASH_ROWS tokens
            j, rows = i, 0
            while j < len(blocks) and (rows == 0 or rows + blocks[j][2] - blocks[j][1] <= HASH_ROWS):
                rows += blocks[j][2] - blocks[j][1]
                j += 1
            keys = torch.cat([self._keys(kpool, s, r0, r1) for s, r0, r1, _ in blocks[i:j]], dim=1) - mean
            t0 = blocks[i][3] - start
            norms[:, t0:t0 + rows] = torch.linalg.vector_norm(keys, dim=-1)
            if K > 0:
                _pack_codes(torch.matmul(keys, self.R).numpy(), K, L, codes, t0)
            i = j
        nbk = 1 << K
        ids = hugepages.empty((self.nkv, L, n), np.uint16)  # walked at random: see kernels_cpu.hugepages
        offs = np.empty((self.nkv, L, nbk + 1), dtype=np.uint16)
        _csr_build(codes, nbk, ids, offs)
        return _Segment(start, n, n, ids, offs, norms.numpy())

    def _merge_tail(self) -> None:
        """Merge the newest segment into its predecessor while that is at most MERGE_RATIO times
        larger and the pair spans at most max_segment tokens."""
        segs = self.segments
        while len(segs) >= 2:
            a, b = segs[-2], segs[-1]
            span = b.base + b.span - a.base
            if span > self.max_segment or a.count > MERGE_RATIO * b.count:
                return
            ids = hugepages.empty((self.nkv, self.L, a.count + b.count), np.uint16)
            offs = np.empty_like(a.offs)
            _csr_merge(a.ids, a.offs, b.ids, b.offs, b.base - a.base, ids, offs)
            norms = np.zeros((self.nkv, span), dtype=np.float32)
            norms[:, :a.span] = a.norms
            norms[:, b.base - a.base:] = b.norms
            segs[-2:] = [_Segment(a.base, span, a.count + b.count, ids, offs, norms)]

    def _refresh(self) -> None:
        """The typed lists the kernels walk (rebuilt only when the segments change)."""
        ids, offs, norms = NbList(), NbList(), NbList()
        for s in self.segments:
            ids.append(s.ids)
            offs.append(s.offs)
            norms.append(s.norms)
        if not self.segments:  # typed lists need one element to know their type
            ids.append(np.zeros((self.nkv, self.L, 0), dtype=np.uint16))
            offs.append(np.zeros((self.nkv, self.L, (1 << self.K) + 1), dtype=np.uint16))
            norms.append(np.zeros((self.nkv, 0), dtype=np.float32))
        self._lists = (ids, offs, norms)
        self._bases = np.array([s.base for s in self.segments] or [0], dtype=np.int64)
        self._spans = np.array([s.span for s in self.segments] or [0], dtype=np.int64)

    # -- queries --------------------------------------------------------------------------------
    def project(self, q: torch.Tensor) -> np.ndarray:
        """The query's hash projections [nh, K*L] float32 (q [nh, d], not centered: centering
        shifts q . k by a constant per head and leaves the angle's meaning to the keys)."""
        return torch.matmul(q.float(), self.R).numpy()

    def retrieve(self, q: torch.Tensor) -> list[np.ndarray]:
        """Absolute token indices the sampling rule picks for each query head (sorted)."""
        nh = q.shape[0]
        codes = np.zeros((nh, self.L), dtype=np.int64)
        proj = self.project(q)
        for l in range(self.L):
            for j in range(self.K):
                codes[:, l] |= (proj[:, l * self.K + j] > 0).astype(np.int64) << j
        cap = max(1, self.n_tokens)
        picked = np.empty((nh, cap, 2), dtype=np.int64)
        npicked = np.zeros(nh, dtype=np.int64)
        _retrieve_kernel(codes, self._spans, self._lists[0], self._lists[1], nh // self.nkv, picked, npicked)
        bases = self._bases
        return [np.sort(bases[picked[h, :npicked[h], 0]] + picked[h, :npicked[h], 1]) for h in range(nh)]


def attend_sampled(q: torch.Tensor, kpool: torch.Tensor, vpool: torch.Tensor, slots, index: LSHIndex, *,
                   scale: float | None = None, eps: float = U_EPS,
                   nsampled: np.ndarray | None = None, shared: bool = True,
                   exact: Sequence[tuple[int, int]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [nh, d] over the tokens in ``index``, by LSH sampling, and over the token
    ranges ``exact`` ([lo, hi) pairs outside the index: the sinks and the recent window; ``slots``
    must cover them), attended exactly in the same softmax (``shared`` only).

    Returns (out [nh, d] float32, lse [nh] float32, natural log) for merging with anything else;
    a head that attended nothing gets out 0 and lse -inf. ``eps`` is MagicPIG's 1e-4 in
    log(u + eps) (0 in tests, where u == 1 must reproduce exact attention); ``nsampled`` ([nh]
    int64), when given, receives the number of keys each head sampled. ``shared``: one gather per
    KV head over its query heads' sampled rows (False: one per query head, the old path).

    With ``index.quant`` the pools are that format's records (uint8 [P, nkv, C, w], kernels_cpu.kv_quant):
    every row read, sampled or exact, is dequantized in registers (kernels_cpu.magicpig_q); the ranges in
    ``exact`` must then lie in closed (quantized) chunks -- the open chunk's floats are the caller's to merge.
    """
    nh, d = q.shape
    if d != index.d or nh % index.nkv:
        raise ValueError(f"query [{nh}, {d}] does not fit an index over {index.nkv} KV heads of dim {d}")
    if kpool.shape != vpool.shape or kpool.dtype != vpool.dtype:
        raise ValueError("key and value pools differ in shape or dtype")
    index._check_pool(kpool)
    if index.quant is not None:
        kind = index.quant.bits  # the record kernels' "kind": the bits per code
        kw, vw = kpool.contiguous().numpy(), vpool.contiguous().numpy()
    else:
        kind = _kind(kpool.dtype)
        if kind != _KIND_F32 and d % 2:
            raise ValueError("16-bit KV needs an even head dim")
        kw, vw = _words(kpool), _words(vpool)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qf = q.detach().to(torch.float32).contiguous()
    out = torch.empty(nh, d, dtype=torch.float32)
    lse = torch.empty(nh, dtype=torch.float32)
    counts = np.empty(nh, dtype=np.int64) if nsampled is None else nsampled
    ranges = np.array([(a, b) for a, b in exact if b > a], dtype=np.int64).reshape(-1, 2)
    if ranges.size and not shared:
        raise ValueError("the exact ranges join the shared kernel's softmax only")
    if index.n_tokens == 0 and not ranges.size:
        out.zero_()
        lse.fill_(-math.inf)
        counts[:] = 0
        return out, lse
    group = nh // index.nkv
    mean = torch.from_numpy(index.mean) if index.mean is not None else torch.zeros(index.nkv, d)
    qmu = (qf * mean.repeat_interleave(group, dim=0)).sum(-1).numpy()
    slots = np.asarray(slots.numpy() if isinstance(slots, torch.Tensor) else slots, dtype=np.int32)
    ids, offs, norms = index._lists
    log_u = _log_u_table(index.K, index.L, float(eps))
    args = (qf.numpy(), index.project(qf), qmu, kw, vw, kind, slots, index._bases, index._spans,
            ids, offs, norms, index.K, index.L, scale, log_u)
    if shared:
        _attend_group_kernel(*args, ranges, out.numpy(), lse.numpy(), counts)
        empty = counts == 0 if not ranges.size else np.zeros(nh, dtype=bool)
    else:
        _attend_kernel(*args, out.numpy(), lse.numpy(), counts)
        empty = counts == 0
    lse[torch.from_numpy(empty)] = -math.inf
    return out, lse


def warm_up(records: bool = False) -> None:
    """Compile (or load from Numba's cache) every kernel and dtype path now, so no compilation
    happens mid-run; cheap once cached. ``records``: also the quantized KV's (``--kv-dtype q8|q4``: one
    specialisation serves both formats)."""
    kp = torch.randn(2, 1, 4, 2).to(torch.bfloat16)  # one specialisation serves every dtype (uint32 words)
    slots = np.arange(2, dtype=np.int32)
    idx = LSHIndex(1, 2, K=1, L=2, max_segment=8)
    idx.build(kp, slots, 0, 4)
    idx.extend(kp, slots, 4, 8)  # a merge
    attend_sampled(torch.randn(1, 2), kp, kp, slots, idx, exact=[(0, 1)])
    attend_sampled(torch.randn(1, 2), kp, kp, slots, idx, shared=False)
    idx.retrieve(torch.randn(1, 2))
    if records:
        fmt = KVQuant("q8", GROUP, GROUP)
        rec = torch.zeros(2, *fmt.record_shape(1), dtype=torch.uint8)
        idx = LSHIndex(1, GROUP, K=1, L=2, quant=fmt)
        idx.build(rec, slots, 0, 2 * GROUP)
        attend_sampled(torch.randn(1, GROUP), rec, rec, slots, idx, exact=[(0, 1)])
        attend_sampled(torch.randn(1, GROUP), rec, rec, slots, idx, shared=False)
