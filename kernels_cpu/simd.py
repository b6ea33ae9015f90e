"""Explicit-vector micro-kernels for the decode attention kernel, written as LLVM IR (Numba intrinsics).

Scores are dot products over the head dim: written as scalar Numba loops, LLVM vectorises each of
them as a reduction and ends every one with its own horizontal sum (extract, add, shuffle: ~8
instructions per score at 16 lanes, on the shuffle ports). For a 4 query rows x 4 keys block of
head dim 128 that is 128 reduction instructions beside the 128 FMAs, and on a core whose 512-bit
FMAs are issued as two 256-bit halves (AMD Zen 4) those shuffles and the bf16 widening compete with
the FMAs for the same pipes: the kernel reached ~55 % of the FMA rate there (A1, 54-57 % of memory
bandwidth at 2 threads). :func:`qk4x4` keeps the 16 accumulators as vectors and reduces them all at
once by a transposing tree (16 vectors -> 1: 15 adds and 30 shuffles instead of 64 + 64), then stores
the 16 scores as four 4-wide rows.

Vectors are ``LANES`` float32 wide; the head dim must be a multiple of LANES (the caller falls back to
the scalar loops otherwise). Pool elements are read as they are stored and widened in registers:
bfloat16 bits (uint16) shifted into the top half of a float32, float16 bits (int16) through
``fpext half``, float32 as is, int8 codes (q8 KV, kernels_cpu/attention_q.py) converted as integers,
q4 KV's packed nibbles (uint8: byte i of 32 channels holds channels i and i + 16) as one 16-byte load
split by mask and shift into two vectors. :func:`pv4` is the value side for the quantized kernel:
4 rows' weighted sums of q8 / q4 value rows, the accumulators kept in registers across the rows.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # float32 lanes per vector (one 512-bit register; two 256-bit ones where that is the width)

_I32 = ir.IntType(32)
PF_ROWS = 16  # pv4 prefetches the row this far ahead, at the channels it is reading
_F32 = ir.FloatType()


def _tree_masks(n: int) -> tuple[list[tuple[list[int], list[int], int, int]], list[int]]:
    """The shuffle plan of the transposing reduction of n vectors of n lanes (n a power of two).

    Returns (steps, owners): each step (lo_mask, hi_mask, x, y) makes a new vector, appended to the
    list of live vectors, as shuffle(x, y, lo) + shuffle(x, y, hi) of live vectors x, y; owners[l] is
    the input vector whose total lane l of the last vector holds. Every input's lanes stay in
    contiguous groups, halved at each level, so one add per pair of vectors sums half of each one's
    remaining lanes."""
    live = list(range(n))  # indices into `labels` of the vectors not yet combined
    labels: list[list[int]] = [[p] * n for p in range(n)]
    steps = []
    while len(live) > 1:
        nxt = []
        for a in range(0, len(live), 2):
            x, y = live[a], live[a + 1]
            lx, ly = labels[x], labels[y]
            g = lx.count(lx[0])  # lanes per owner (the same for every owner at this level)
            lo, hi, lab = [], [], []
            for k in range(0, n, g):
                h = g // 2
                lo += list(range(k, k + h)) + [n + i for i in range(k, k + h)]
                hi += list(range(k + h, k + g)) + [n + i for i in range(k + h, k + g)]
                lab += [lx[k]] * h + [ly[k]] * h
            steps.append((lo, hi, x, y))
            labels.append(lab)
            nxt.append(len(labels) - 1)
        live = nxt
    return steps, labels[live[0]]


_STEPS, _OWNERS = _tree_masks(LANES)


def _widen(builder, ptr, kind: str):
    """LANES pool elements at element pointer ``ptr`` as a float32 vector."""
    if kind == "f32":
        vp = builder.bitcast(ptr, ir.VectorType(_F32, LANES).as_pointer())
        return builder.load(vp, align=4)
    if kind == "i8":
        vp = builder.bitcast(ptr, ir.VectorType(ir.IntType(8), LANES).as_pointer())
        return builder.sitofp(builder.load(vp, align=1), ir.VectorType(_F32, LANES))
    vp = builder.bitcast(ptr, ir.VectorType(ir.IntType(16), LANES).as_pointer())
    raw = builder.load(vp, align=2)
    if kind == "f16":
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), LANES)), ir.VectorType(_F32, LANES))
    wide = builder.zext(raw, ir.VectorType(_I32, LANES))
    wide = builder.shl(wide, ir.Constant(ir.VectorType(_I32, LANES), [16] * LANES))
    return builder.bitcast(wide, ir.VectorType(_F32, LANES))


def _nibbles(builder, ptr):
    """The 2 * LANES channels packed in the LANES bytes at byte pointer ``ptr`` (q4 KV: byte i holds
    channel i in its low nibble, channel i + LANES in its high one) as two float32 vectors: one
    16-byte load, zero-extended to int32 lanes, masked / shifted, converted."""
    vi = ir.VectorType(_I32, LANES)
    vp = builder.bitcast(ptr, ir.VectorType(ir.IntType(8), LANES).as_pointer())
    wide = builder.zext(builder.load(vp, align=1), vi)
    lo = builder.and_(wide, ir.Constant(vi, [15] * LANES))
    hi = builder.lshr(wide, ir.Constant(vi, [4] * LANES))
    vf = ir.VectorType(_F32, LANES)
    return builder.uitofp(lo, vf), builder.uitofp(hi, vf)


def _row_vectors(builder, row, x, kind: str):
    """[(channel offset from x, float32 vector)] of one stored row (element pointer ``row``) at channel x:
    one vector, or for q4 (``row`` a byte pointer, x a multiple of 2 * LANES) the two of a byte run."""
    if kind == "q4":
        half = builder.lshr(x, ir.Constant(x.type, 1))
        lo, hi = _nibbles(builder, builder.gep(row, [half]))
        return [(0, lo), (LANES, hi)]
    return [(0, _widen(builder, builder.gep(row, [x]), kind))]


def _prefetch(builder, ptr) -> None:
    """llvm.prefetch of the line at ``ptr`` into L1 (a hint: never faults, even past an array's end)."""
    i8p = ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), _I32(0), _I32(3), _I32(1)])


def _kind(dtype) -> str | None:
    """The stored element kind of a pool / record dtype: uint8 is q4's packed nibbles."""
    return {types.uint16: "bf16", types.int16: "f16", types.float32: "f32", types.int8: "i8",
            types.uint8: "q4"}.get(dtype)


@intrinsic
def qk4x4(typingctx, qg, g, r, kp, slot, row, s, j):
    """s[r + i, j + t] = qg[g, r + i, :] . widen(kp[slot, g, row + t, :]) for i, t in 0..3.

    qg [nkv, R, d] float32 (C-contiguous rows), kp [P, nkv, C, d] of float32 / bfloat16 bits (uint16) /
    float16 bits (int16) / int8 codes, or [P, nkv, C, d / 2] of q4's packed nibbles (uint8: the widened
    codes, ``widen(c) = c``); s [R, B] float32; d % LANES == 0 (q4: d % (2 * LANES)), unchecked: the
    caller's guard."""
    kind = _kind(kp.dtype)
    if kind is None or qg.dtype != types.float32 or s.dtype != types.float32:
        return None
    sig = types.void(qg, types.intp, types.intp, kp, types.intp, types.intp, s, types.intp)

    def codegen(context, builder, signature, args):
        qty, _, _, kty, _, _, sty, _ = signature.args
        q_ary = context.make_array(qty)(context, builder, args[0])
        k_ary = context.make_array(kty)(context, builder, args[3])
        s_ary = context.make_array(sty)(context, builder, args[6])
        g, r, slot, row, j = args[1], args[2], args[4], args[5], args[7]
        intp = context.get_value_type(types.intp)
        zero = ir.Constant(intp, 0)
        d = cgutils.unpack_tuple(builder, q_ary.shape, 3)[2]
        qrows = [cgutils.get_item_pointer(context, builder, qty, q_ary,
                                          [g, builder.add(r, ir.Constant(intp, i)), zero]) for i in range(4)]
        krows = [cgutils.get_item_pointer(context, builder, kty, k_ary,
                                          [slot, g, builder.add(row, ir.Constant(intp, t)), zero]) for t in range(4)]
        vec = ir.VectorType(_F32, LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                             f"llvm.fma.v{LANES}f32")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(16)]
        for a in accs:
            builder.store(ir.Constant(vec, [0.0] * LANES), a)
        step = ir.Constant(intp, 2 * LANES if kind == "q4" else LANES)
        with cgutils.for_range_slice(builder, zero, d, step, intp=intp) as (x, _):
            ks = [_row_vectors(builder, p, x, kind) for p in krows]
            for o in range(len(ks[0])):
                xo = builder.add(x, ir.Constant(intp, ks[0][o][0]))
                for i in range(4):
                    qv = builder.load(builder.bitcast(builder.gep(qrows[i], [xo]), vec.as_pointer()), align=4)
                    for t in range(4):
                        a = accs[i * 4 + t]
                        builder.store(builder.call(fma, [qv, ks[t][o][1], builder.load(a)]), a)
        live = [builder.load(a) for a in accs]
        for lo, hi, x, y in _STEPS:
            mlo = ir.Constant(ir.VectorType(_I32, LANES), lo)
            mhi = ir.Constant(ir.VectorType(_I32, LANES), hi)
            live.append(builder.fadd(builder.shuffle_vector(live[x], live[y], mlo),
                                     builder.shuffle_vector(live[x], live[y], mhi)))
        total = live[-1]
        vec4 = ir.VectorType(_F32, 4)
        for i in range(4):
            mask = ir.Constant(ir.VectorType(_I32, 4), [_OWNERS.index(i * 4 + t) for t in range(4)])
            four = builder.shuffle_vector(total, ir.Constant(vec, None), mask)
            dst = cgutils.get_item_pointer(context, builder, sty, s_ary, [builder.add(r, ir.Constant(intp, i)), j])
            builder.store(four, builder.bitcast(dst, vec4.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen



@intrinsic
def pv4(typingctx, vp, row, nbk, p, r, acc):
    """acc[r + i, :] += sum_j p[r + i, row + j] * vp[row + j, :] over j < nbk, for i in 0..3.

    The value half of q4 KV (kernels_cpu/attention_q.py): vp [C, d / 2] packed nibbles (uint8, the
    codes), p [R, C] float32 weights (the per-token scale already folded in, one column per token),
    acc [R, d] float32; d % (2 * LANES) == 0 (unchecked: the caller's guard). Per 2 * LANES channels
    the 8 accumulators (4 rows x 2 vectors) stay in registers across the nbk tokens: each token costs
    one 16-byte load split into two vectors, 4 broadcast weights and 8 FMAs, where a scalar loop LLVM
    vectorises reads and writes the accumulators once per few tokens. The rows are walked once per
    2 * LANES channels, so nbk should keep them in L1 (a group of 32 tokens); each pass prefetches
    the row PF_ROWS ahead at the channels it reads."""
    kind = _kind(vp.dtype)
    if kind != "q4" or p.dtype != types.float32 or acc.dtype != types.float32:
        return None
    sig = types.void(vp, types.intp, types.intp, p, types.intp, acc)

    def codegen(context, builder, signature, args):
        vty, _, _, pty, _, aty = signature.args
        v_ary = context.make_array(vty)(context, builder, args[0])
        p_ary = context.make_array(pty)(context, builder, args[3])
        a_ary = context.make_array(aty)(context, builder, args[5])
        row, nbk, r = args[1], args[2], args[4]
        intp = context.get_value_type(types.intp)
        zero = ir.Constant(intp, 0)
        d = cgutils.unpack_tuple(builder, a_ary.shape, 2)[1]
        vec = ir.VectorType(_F32, LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                             f"llvm.fma.v{LANES}f32")
        arows = [cgutils.get_item_pointer(context, builder, aty, a_ary, [builder.add(r, ir.Constant(intp, i)), zero])
                 for i in range(4)]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(8)]
        with cgutils.for_range_slice(builder, zero, d, ir.Constant(intp, 2 * LANES), intp=intp) as (x, _):
            offs = [0, LANES]
            ptrs = [[builder.bitcast(builder.gep(arows[i], [builder.add(x, ir.Constant(intp, o))]), vec.as_pointer())
                     for o in offs] for i in range(4)]
            for i in range(4):
                for h in range(2):
                    builder.store(builder.load(ptrs[i][h], align=4), accs[i * 2 + h])
            with cgutils.for_range(builder, nbk, intp=intp) as loop:
                j = loop.index
                vrow = cgutils.get_item_pointer(context, builder, vty, v_ary, [builder.add(row, j), zero])
                ahead = cgutils.get_item_pointer(context, builder, vty, v_ary,
                                                 [builder.add(builder.add(row, j), ir.Constant(intp, PF_ROWS)), zero])
                _prefetch(builder, builder.gep(ahead, [builder.lshr(x, ir.Constant(intp, 1))]))
                vs = [v for _o, v in _row_vectors(builder, vrow, x, kind)]
                for i in range(4):
                    pi = builder.load(cgutils.get_item_pointer(context, builder, pty, p_ary,
                                                               [builder.add(r, ir.Constant(intp, i)),
                                                                builder.add(row, j)]))
                    pv = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, None), pi, _I32(0)),
                                                ir.Constant(vec, None), ir.Constant(ir.VectorType(_I32, LANES),
                                                                                    [0] * LANES))
                    for h in range(2):
                        a = accs[i * 2 + h]
                        builder.store(builder.call(fma, [pv, vs[h], builder.load(a)]), a)
            for i in range(4):
                for h in range(2):
                    builder.store(builder.load(accs[i * 2 + h]), ptrs[i][h], align=4)
        return context.get_dummy_value()

    return sig, codegen
