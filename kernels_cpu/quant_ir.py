"""LLVM IR for ggml's quantized blocks: block decoders and the Numba intrinsics built from them.

kernels_cpu/quant.py's mat-vec, small-batch and dequantization kernels call the intrinsics at the
end of this file, one per format and job: ``_dot_<fmt>(w, i, x, xs)`` (row i of quantized w times x,
float32, fast-math), ``_tile_<fmt>(w, i, nr, x, t0, tt, out)`` (rows i.. of w times rows t0.. of x,
each block decoded once for all of them: :func:`_make_tile`) and ``_deq_<fmt>(w, i, out, j)`` (row i
into float32 row j of out, bit-exact with gguf-py). They are module globals here, imported by name
into quant.py, so that its kernels (``cache=True``) can be cached. Numba checks a cached kernel
against the contents of its own file only: after editing this file, delete the caches of quant.py
and quant_encode.py (kernels_cpu/__pycache__/quant.*.nb[ic], quant_encode.*.nb[ic]), or their
kernels keep the old IR.

Why the block decoders are written in LLVM IR (:class:`_Emit`): written as plain Numba loops,
LLVM vectorises across blocks (gathers at a 20-byte stride) instead of within one, and
the narrow integer arithmetic is promoted to int64: 1.5-4.5 GB/s. The IR here spells out the
16-lane vectors (LLVM lowers them for whatever the CPU has: one zmm register with AVX-512, two ymm
with AVX2), keeps four independent accumulators per row (a single chain of dependent FMAs caps a
core at one block per FMA latency), and converts float16 scales with ``fpext half`` (F16C).

Format notes (values per block, gguf-py's formulas): q4_0 d*(q-8); q4_1 d*q + m; q8_0 d*q;
q4_k/q5_k eight sub-blocks of 32: (d*sc)*q - dmin*mn with 6-bit sc, mn; q6_k sixteen
sub-blocks of 16: (d*sc)*(q-32) with int8 sc. Nibble order: see storage/formats.py.
"""

from __future__ import annotations

from typing import NamedTuple

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_F32 = ir.FloatType()
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_LANES = 16
_VF = ir.VectorType(_F32, _LANES)
_VI = ir.VectorType(_I32, _LANES)
_FAST = ("fast",)
_NACC = 4  # independent vector accumulators per row
# The mat-vec reads weights this far ahead in software. The hardware prefetcher alone left long rows
# at half the bandwidth (3072 x 8192 q4_1, 2 threads: 18-23 GB/s without, 42 with; +5-10 % on the
# default model's shapes; 4 KiB ahead was not enough for the long rows, 16 KiB no better).
PREFETCH_BYTES = 8192


class _Group(NamedTuple):
    """Consecutive values of one block sharing one affine map: value = a * q + c.

    ``q``: int32 vectors of 16 codes each (offsets like q4_0's -8 already applied); ``c`` is None
    for the symmetric formats; ``off``: the group's first element within the block."""

    a: ir.Value
    c: ir.Value | None
    q: list
    off: int


class _Block(NamedTuple):
    """A decoded block: its groups, and for the affine formats its offsets as one vector.

    ``cvec`` holds the c of each 32-element span of the block in lanes ``lane0``.. (q4_1: [d, m],
    lane 1; K-quants: 8 lanes from 0), so that the mat-vec adds sum(c * sum of x over the span) with
    one vector FMA per block instead of a scalar chain per span."""

    groups: list
    cvec: ir.Value | None = None
    lane0: int = 0


class _Emit:
    """llvmlite helpers over one builder: loads of a block's fields, 16-lane vector arithmetic."""

    def __init__(self, builder: ir.IRBuilder):
        self.b = builder
        self._vecs: dict = {}

    def reset(self) -> None:
        """Forget the vectors loaded for the previous block (see :meth:`codes`)."""
        self._vecs = {}

    def at(self, p, off: int):
        return self.b.gep(p, [_I64(off)]) if off else p

    def load(self, p, off: int, ty, align: int = 1):
        return self.b.load(self.b.bitcast(self.at(p, off), ty.as_pointer()), align=align)

    def half(self, p, off: int):
        """The float16 at byte ``off`` as float32 (exact)."""
        return self.b.fpext(self.b.bitcast(self.load(p, off, _I16), ir.HalfType()), _F32)

    def half2(self, p, off: int):
        """The two float16 at byte ``off`` as <2 x float> (one 4-byte load, one conversion)."""
        h = self.b.bitcast(self.load(p, off, _I32), ir.VectorType(ir.HalfType(), 2))
        return self.b.fpext(h, ir.VectorType(_F32, 2))

    def codes(self, p, off: int, signed: bool = False):
        """16 bytes from ``off`` widened to int32 lanes (memoised per block: each serves several groups)."""
        key = (off, signed)
        if key not in self._vecs:
            v = self.load(p, off, ir.VectorType(_I8, _LANES))
            self._vecs[key] = (self.b.sext if signed else self.b.zext)(v, _VI)
        return self._vecs[key]

    def lo(self, v):
        return self.b.and_(v, _ivec(15))

    def hi(self, v):
        return self.b.lshr(v, _ivec(4))

    def splat(self, s, vt=_VF):
        undef = ir.Constant(vt, ir.Undefined)
        v = self.b.insert_element(undef, s, _I32(0))
        return self.b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))

    def pick(self, v, lanes: list[int]):
        """A vector of v's lanes ``lanes`` (a constant shuffle)."""
        mask = ir.Constant(ir.VectorType(_I32, len(lanes)), lanes)
        return self.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), mask)

    def lane(self, v, i: int):
        return self.b.extract_element(v, _I32(i))


def _ivec(c: int, n: int = _LANES):
    return ir.Constant(ir.VectorType(_I32, n), [c] * n)


# ---- block decoders: (emitter, pointer to the block) -> _Block, in gguf-py's formulas ----

def _dec_q4_0(e: _Emit, p) -> _Block:
    q = e.codes(p, 2)
    eight = _ivec(8)
    return _Block([_Group(e.half(p, 0), None, [e.b.sub(e.lo(q), eight), e.b.sub(e.hi(q), eight)], 0)])


def _dec_q4_1(e: _Emit, p) -> _Block:
    q = e.codes(p, 4)
    dm = e.half2(p, 0)  # d and m side by side: one conversion, and m * sum(x) rides along in lane 1
    return _Block([_Group(e.lane(dm, 0), e.lane(dm, 1), [e.lo(q), e.hi(q)], 0)], dm, 1)


def _dec_q8_0(e: _Emit, p) -> _Block:
    return _Block([_Group(e.half(p, 0), None, [e.codes(p, 2, True), e.codes(p, 18, True)], 0)])


def _scales_k4(e: _Emit, p):
    """The eight 6-bit scales and mins of a q4_k/q5_k block (12 bytes at p + 4, ggml's
    get_scale_min_k4) as two <8 x i32>: sub-block j < 4: s[j] & 63, s[j+4] & 63; j >= 4:
    (s[j+4] & 15) | (s[j-4] >> 6) << 4 and (s[j+4] >> 4) | (s[j] >> 6) << 4."""
    b = e.b
    s = e.codes(p, 4)  # bytes 4..19: the 12 scale bytes (and 4 of qs, unused)
    a, bq = e.pick(s, [0, 1, 2, 3, 8, 9, 10, 11]), e.pick(s, [0, 1, 2, 3, 0, 1, 2, 3])
    c, d = e.pick(s, [4, 5, 6, 7, 8, 9, 10, 11]), e.pick(s, [4, 5, 6, 7, 4, 5, 6, 7])
    c63, c15, c4, c6 = _ivec(63, 8), _ivec(15, 8), _ivec(4, 8), _ivec(6, 8)
    sc_lo, mn_lo = b.and_(a, c63), b.and_(c, c63)
    sc_hi = b.or_(b.and_(a, c15), b.shl(b.lshr(bq, c6), c4))
    mn_hi = b.or_(b.lshr(c, c4), b.shl(b.lshr(d, c6), c4))
    first4_last4 = ir.Constant(ir.VectorType(_I32, 8), [0, 1, 2, 3, 12, 13, 14, 15])
    return b.shuffle_vector(sc_lo, sc_hi, first4_last4), b.shuffle_vector(mn_lo, mn_hi, first4_last4)


def _dec_k4(e: _Emit, p, qh_off: int | None, qs_off: int) -> _Block:
    """q4_k (no high bits) and q5_k: eight sub-blocks of 32, value = (d*sc)*q - dmin*mn."""
    b = e.b
    v8 = ir.VectorType(_F32, 8)
    sc, mn = _scales_k4(e, p)
    a = b.fmul(e.splat(e.half(p, 0), v8), b.sitofp(sc, v8))
    c = b.fneg(b.fmul(e.splat(e.half(p, 2), v8), b.sitofp(mn, v8)))  # x - y is x + (-y), bit for bit
    groups = []
    for j in range(8):
        q = []
        for h in range(2):  # the two 16-lane halves of the sub-block
            v = e.codes(p, qs_off + 32 * (j // 2) + 16 * h)
            v = e.hi(v) if j % 2 else e.lo(v)
            if qh_off is not None:  # bit j of qh[l] is bit 4 of element l
                bits = e.codes(p, qh_off + 16 * h)
                hb = b.shl(bits, _ivec(4 - j)) if j < 4 else b.lshr(bits, _ivec(j - 4))
                v = b.or_(v, b.and_(hb, _ivec(16)))
            q.append(v)
        groups.append(_Group(e.lane(a, j), e.lane(c, j), q, 32 * j))
    return _Block(groups, c, 0)


def _dec_q4_k(e: _Emit, p) -> _Block:
    return _dec_k4(e, p, None, 16)


def _dec_q5_k(e: _Emit, p) -> _Block:
    return _dec_k4(e, p, 16, 48)


def _dec_q6_k(e: _Emit, p) -> _Block:
    """Two halves of 128 values; value 128h + 32c + l: low 4 bits from ql (c < 2: low nibble of
    ql[64h + 32c + l], else the high one of ql[64h + 32(c-2) + l]), 2 high bits ((qh[32h + l] >> 2c) & 3),
    minus 32; scale sc[(128h + 32c + l) // 16] (int8 at 192), d (float16 at 208)."""
    b = e.b
    a = b.fmul(e.splat(e.half(p, 208)), b.sitofp(e.codes(p, 192, True), _VF))  # d * sc, 16 lanes
    groups = []
    for h in range(2):
        for c in range(4):
            for l16 in range(2):
                v = e.codes(p, 64 * h + 32 * (c % 2) + 16 * l16)
                v = e.hi(v) if c >= 2 else e.lo(v)
                bits = e.codes(p, 128 + 32 * h + 16 * l16)
                hb = b.shl(bits, _ivec(4 - 2 * c)) if c < 2 else b.lshr(bits, _ivec(2 * c - 4))
                v = b.sub(b.or_(v, b.and_(hb, _ivec(48))), _ivec(32))
                s = 8 * h + 2 * c + l16
                groups.append(_Group(e.lane(a, s), None, [v], 16 * s))
    return _Block(groups)


# format -> (decoder, elements per block, bytes per block, lanes of the block's offset vector or 0)
_DECODERS = {
    "q4_0": (_dec_q4_0, 32, 18, 0),
    "q4_1": (_dec_q4_1, 32, 20, 2),
    "q8_0": (_dec_q8_0, 32, 34, 0),
    "q4_k": (_dec_q4_k, 256, 144, 8),
    "q5_k": (_dec_q5_k, 256, 176, 8),
    "q6_k": (_dec_q6_k, 256, 210, 0),
}


def _is_array(t, dtype, ndim: int) -> bool:
    """The intrinsics read rows and vectors as contiguous memory: any other layout fails to type
    (a TypingError when compiling) instead of reading the wrong bytes."""
    return isinstance(t, types.Array) and t.dtype == dtype and t.ndim == ndim and t.layout == "C"


def _row_ptr(context, builder, aryty, ary_val, i):
    """(i8* to row i of a 2-d array, the array's struct)."""
    ary = context.make_array(aryty)(context, builder, ary_val)
    stride = cgutils.unpack_tuple(builder, ary.strides)[0]
    base = builder.bitcast(ary.data, _I8.as_pointer())
    return builder.gep(base, [builder.mul(i, stride)]), ary


def _loop_units(builder, n_units, unroll: int, body) -> None:
    """body(unit index, slot) for every unit, ``unroll`` units per iteration (slot: 0..unroll-1)."""
    n_main = builder.sdiv(n_units, _I64(unroll))
    with cgutils.for_range(builder, n_main) as loop:
        for u in range(unroll):
            body(builder.add(builder.mul(loop.index, _I64(unroll)), _I64(u)), u)
    if unroll > 1:
        start = builder.mul(n_main, _I64(unroll))
        with cgutils.for_range(builder, builder.sub(n_units, start)) as loop:
            body(builder.add(start, loop.index), 0)


def _hsum(builder, v):
    """Sum of a float vector's lanes (halves added until one lane is left)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi, flags=_FAST)
    return builder.extract_element(v, _I32(0))


def _hsums(builder, vs: list):
    """A vector whose lane j is the sum of ``vs[j]``'s lanes (len(vs) a power of two <= the lanes):
    vectors are folded in pairs, each step adding the low and high halves of every segment of lanes,
    so that 16 sums cost 15 adds instead of 16 separate reductions (64)."""

    def fold(a, b, seg: int):  # [a, b] (a alone if b is None), each segment of ``seg`` lanes summed to seg / 2
        n = a.type.count * (1 if b is None else 2)
        lo = [j for j in range(n) if j % seg < seg // 2]
        hi = [j + seg // 2 for j in lo]
        b = a if b is None else b
        return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lo)), lo)),
                            builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(hi)), hi)), flags=_FAST)

    seg = vs[0].type.count
    while len(vs) > 1:
        vs, seg = [fold(vs[j], vs[j + 1], seg) for j in range(0, len(vs), 2)], seg // 2
    v = vs[0]
    while seg > 1:  # one vector left, its segments longer than one lane
        v, seg = fold(v, None, seg), seg // 2
    return v


def _emit_prefetch(builder, ptr) -> None:
    """llvm.prefetch (read, keep in all levels): a hint, never a fault, past the end of the matrix too."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [ptr, _I32(0), _I32(3), _I32(1)])


def _make_dot(fmt: str, prefetch: int = PREFETCH_BYTES):
    """Intrinsic dot(w, i, x, xs) -> float32: row i of quantized ``w`` times ``x``; ``xs`` holds the
    sums of x over each 32 elements (read only by the formats with an offset term)."""
    decode, elems, nbytes, clanes = _DECODERS[fmt]

    @intrinsic
    def dot(typingctx, w, i, x, xs):
        if not (_is_array(w, types.uint8, 2) and _is_array(x, types.float32, 1) and _is_array(xs, types.float32, 1)):
            return None
        sig = types.float32(w, types.intp, x, xs)

        def codegen(context, builder, signature, args):
            row, _ = _row_ptr(context, builder, signature.args[0], args[0], args[1])
            xa = context.make_array(signature.args[2])(context, builder, args[2])
            sa = context.make_array(signature.args[3])(context, builder, args[3])
            n_units = builder.sdiv(cgutils.unpack_tuple(builder, xa.shape)[0], _I64(elems))
            e = _Emit(builder)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(_VF, None)) for _ in range(_NACC)]
            vc = ir.VectorType(_F32, max(clanes, 1))
            accc = [cgutils.alloca_once_value(builder, ir.Constant(vc, None)) for _ in range(_NACC if clanes else 0)]
            lane0 = [0]
            unroll = _NACC if elems == 32 else 1  # a K-quant block has 8 or 16 groups of its own
            spans = elems // 32

            def unit(u, slot):
                e.reset()
                p = builder.gep(row, [builder.mul(u, _I64(nbytes))])
                if prefetch and slot == 0:  # the cache lines ``prefetch`` bytes ahead of this iteration's blocks
                    for off in range(0, unroll * nbytes, 64):
                        _emit_prefetch(builder, builder.gep(p, [_I64(prefetch + off)]))
                blk = decode(e, p)
                x0 = builder.mul(u, _I64(elems))
                for gi, g in enumerate(blk.groups):
                    t = None
                    for s, q in enumerate(g.q):
                        xp = builder.gep(xa.data, [builder.add(x0, _I64(g.off + _LANES * s))])
                        xv = builder.load(builder.bitcast(xp, _VF.as_pointer()), align=4)
                        prod = builder.fmul(builder.sitofp(q, _VF), xv, flags=_FAST)
                        t = prod if t is None else builder.fadd(t, prod, flags=_FAST)
                    k = (slot + gi) % _NACC
                    builder.store(builder.fadd(builder.load(acc[k]), builder.fmul(e.splat(g.a), t, flags=_FAST),
                                               flags=_FAST), acc[k])
                if blk.cvec is not None:
                    xs0 = builder.gep(sa.data, [builder.mul(u, _I64(spans))])
                    if spans == 1:
                        xsv = e.splat(builder.load(xs0), blk.cvec.type)
                    else:
                        xsv = builder.load(builder.bitcast(xs0, blk.cvec.type.as_pointer()), align=4)
                    lane0[0] = blk.lane0
                    builder.store(builder.fadd(builder.load(accc[slot]), builder.fmul(blk.cvec, xsv, flags=_FAST),
                                               flags=_FAST), accc[slot])

            _loop_units(builder, n_units, unroll, unit)
            v = builder.load(acc[0])
            for k in range(1, _NACC):
                v = builder.fadd(v, builder.load(acc[k]), flags=_FAST)
            total = _hsum(builder, v)
            if accc:
                c = builder.load(accc[0])
                for k in range(1, _NACC):
                    c = builder.fadd(c, builder.load(accc[k]), flags=_FAST)
                c = builder.extract_element(c, _I32(lane0[0])) if spans == 1 else _hsum(builder, c)
                total = builder.fadd(total, c, flags=_FAST)
            return total

        return sig, codegen

    return dot


def _make_dequant_row(fmt: str):
    """Intrinsic deq(w, i, out, j): row i of quantized ``w`` into float32 row j of ``out``, in
    gguf-py's operation order (no fast-math flags: bit-exact)."""
    decode, elems, nbytes, _ = _DECODERS[fmt]

    @intrinsic
    def deq(typingctx, w, i, out, j):
        if not (_is_array(w, types.uint8, 2) and _is_array(out, types.float32, 2)):
            return None
        sig = types.void(w, types.intp, out, types.intp)

        def codegen(context, builder, signature, args):
            row, _ = _row_ptr(context, builder, signature.args[0], args[0], args[1])
            orow, oa = _row_ptr(context, builder, signature.args[2], args[2], args[3])
            orow = builder.bitcast(orow, _F32.as_pointer())
            n_units = builder.sdiv(cgutils.unpack_tuple(builder, oa.shape)[1], _I64(elems))
            e = _Emit(builder)

            def unit(u, slot):
                e.reset()
                blk = decode(e, builder.gep(row, [builder.mul(u, _I64(nbytes))]))
                o0 = builder.mul(u, _I64(elems))
                for g in blk.groups:
                    a = e.splat(g.a)
                    for s, q in enumerate(g.q):
                        v = builder.fmul(a, builder.sitofp(q, _VF))
                        if g.c is not None:
                            v = builder.fadd(v, e.splat(g.c))
                        op = builder.gep(orow, [builder.add(o0, _I64(g.off + _LANES * s))])
                        builder.store(v, builder.bitcast(op, _VF.as_pointer()), align=4)

            _loop_units(builder, n_units, 1, unit)
            return context.get_dummy_value()

        return sig, codegen

    return deq


# Tile of the small-batch product (:func:`_make_tile`): MM_ROWS weight rows times up to MM_TOKENS activation
# rows per call (MM_TILES: the token counts a call can take; compile-time shapes, so that the accumulators
# stay in registers). With AVX-512 a call is one pass over the rows' blocks with 2 x 8 16-lane accumulators
# (16 of the 32 zmm registers); with 16 ymm registers (AVX2) 16 accumulators spill (~3x slower), so the
# call makes passes of 1 row x 4 tokens (4 accumulators, 8 ymm), decoding each block once per pass
# (measured on Zen 4 with Numba targeting AVX2: ~1.3x faster than 2 x 8 there, and than 2 x 2).
MM_ROWS = 2
MM_TOKENS = 8
MM_TILES = (8, 4, 2, 1)
_PASS_WIDE = (2, 8)  # (rows, tokens) per pass over the blocks with 32 vector registers of 16 lanes
_PASS_NARROW = (1, 4)  # the same with 16 registers of 8 lanes


def _mm_tile(e: list, decode, elems: int, nbytes: int, rows: list, xrows: list, n_units, prefetch: int) -> list:
    """Emit the loop over a row's blocks for ``len(rows)`` weight rows times ``len(xrows)`` activation
    rows; returns the accumulators (allocas of <16 x float>, [row][token])."""
    builder = e[0].b
    nr, nt = len(rows), len(xrows)
    split = 2 if nr * nt < 4 else 1  # few products: two partial sums each, so that FMA latency does not bind
    acc = [[[cgutils.alloca_once_value(builder, ir.Constant(_VF, None)) for _ in range(split)] for _ in range(nt)]
           for _ in range(nr)]

    def unit(u, slot):
        blks = []
        for r in range(nr):
            e[r].reset()
            p = builder.gep(rows[r], [builder.mul(u, _I64(nbytes))])
            if prefetch:
                for off in range(0, nbytes, 64):
                    _emit_prefetch(builder, builder.gep(p, [_I64(prefetch + off)]))
            blks.append(decode(e[r], p))
        x0 = builder.mul(u, _I64(elems))
        n_vec = 0
        for gi, g in enumerate(blks[0].groups):
            for s in range(len(g.q)):
                # the block's weights as float32 (a*q + c, one FMA), decoded once for every token
                wv = []
                for r in range(nr):
                    gr = blks[r].groups[gi]
                    v = builder.fmul(e[r].splat(gr.a), builder.sitofp(gr.q[s], _VF), flags=_FAST)
                    if gr.c is not None:
                        v = builder.fadd(v, e[r].splat(gr.c), flags=_FAST)
                    wv.append(v)
                xi = builder.add(x0, _I64(g.off + _LANES * s))
                for t in range(nt):
                    xv = builder.load(builder.bitcast(builder.gep(xrows[t], [xi]), _VF.as_pointer()), align=4)
                    for r in range(nr):
                        a = acc[r][t][n_vec % split]
                        builder.store(builder.fadd(builder.load(a), builder.fmul(wv[r], xv, flags=_FAST),
                                                   flags=_FAST), a)
                n_vec += 1

    _loop_units(builder, n_units, 1, unit)
    return acc


def _wide_vectors(context) -> bool:
    """Whether the code is compiled for AVX-512 (32 registers of 16 float32 lanes): Numba's target features
    (the host's, or NUMBA_CPU_FEATURES), which are part of its cache key."""
    features = getattr(context.codegen(), "_tm_features", "") or ""
    return "+avx512f" in features.split(",")


def wide_vectors() -> bool:
    """Whether Numba compiles this process's kernels for AVX-512 (the tile shape, and the batch sizes
    where kernels_cpu.quant.linear uses the fused kernel, depend on it)."""
    from numba.core.registry import cpu_target

    return _wide_vectors(cpu_target.target_context)


def _make_tile(fmt: str, prefetch: int = PREFETCH_BYTES):
    """Intrinsic tile(w, i, nr, x, t0, tt, out): out[t0 + t, i + r] = row i + r of quantized ``w`` times
    row t0 + t of ``x``, for r < nr (1..MM_ROWS) and t < tt (one of MM_TILES), float32, fast-math.

    The small-batch product (kernels_cpu/quant.py, :func:`linear` with a few rows): each block of the
    MM_ROWS weight rows is decoded once into registers (as float32: the scale and offset applied by one
    FMA per 16 weights) and multiplied with every activation row of the tile, so weights are read and
    decoded once per tile instead of once per token, and nothing is written but the outputs. A row
    past ``nr`` is computed as the last valid one and not stored."""
    decode, elems, nbytes, _ = _DECODERS[fmt]

    @intrinsic
    def tile(typingctx, w, i, nr, x, t0, tt, out):
        if not (_is_array(w, types.uint8, 2) and _is_array(x, types.float32, 2) and _is_array(out, types.float32, 2)):
            return None
        sig = types.void(w, types.intp, types.intp, x, types.intp, types.intp, out)

        def codegen(context, builder, signature, args):
            _, i_, nr_, _, t0_, tt_, _ = args
            wa = context.make_array(signature.args[0])(context, builder, args[0])
            xa = context.make_array(signature.args[3])(context, builder, args[3])
            oa = context.make_array(signature.args[6])(context, builder, args[6])
            wstride = cgutils.unpack_tuple(builder, wa.strides)[0]
            xstride = cgutils.unpack_tuple(builder, xa.strides)[0]
            ostride = cgutils.unpack_tuple(builder, oa.strides)[0]
            n_units = builder.sdiv(cgutils.unpack_tuple(builder, xa.shape)[1], _I64(elems))
            wbase = builder.bitcast(wa.data, _I8.as_pointer())
            xbase = builder.bitcast(xa.data, _I8.as_pointer())
            obase = builder.bitcast(oa.data, _I8.as_pointer())
            idx = []
            for r in range(MM_ROWS):  # rows past nr repeat the last valid one (read, never stored)
                ok = builder.icmp_signed("<", _I64(r), nr_)
                idx.append(builder.select(ok, builder.add(i_, _I64(r)), builder.sub(builder.add(i_, nr_), _I64(1))))
            rows = [builder.gep(wbase, [builder.mul(ix, wstride)]) for ix in idx]

            def xrow(t):
                p = builder.gep(xbase, [builder.mul(builder.add(t0_, _I64(t)), xstride)])
                return builder.bitcast(p, _F32.as_pointer())

            def job(r0: int, nrj: int, tok0: int, ntj: int) -> None:
                """One pass over the blocks: rows r0.. (nrj) times tokens tok0.. (ntj) of the tile."""
                e = [_Emit(builder) for _ in range(nrj)]
                acc = _mm_tile(e, decode, elems, nbytes, rows[r0:r0 + nrj], [xrow(t) for t in range(tok0, tok0 + ntj)],
                               n_units, prefetch if tok0 == 0 else 0)
                totals = []
                for r in range(nrj):
                    for t in range(ntj):
                        v = builder.load(acc[r][t][0])
                        for a in acc[r][t][1:]:
                            v = builder.fadd(v, builder.load(a), flags=_FAST)
                        totals.append(v)
                sums = _hsums(builder, totals)
                for r in range(nrj):
                    with builder.if_then(builder.icmp_signed("<", _I64(r0 + r), nr_)):
                        for t in range(ntj):
                            op = builder.gep(obase, [builder.add(builder.mul(builder.add(t0_, _I64(tok0 + t)), ostride),
                                                                 builder.mul(idx[r0 + r], _I64(4)))])
                            builder.store(builder.extract_element(sums, _I32(r * ntj + t)),
                                          builder.bitcast(op, _F32.as_pointer()), align=4)

            pass_rows, pass_tokens = _PASS_WIDE if _wide_vectors(context) else _PASS_NARROW
            for tile in MM_TILES:
                with builder.if_then(builder.icmp_signed("==", tt_, _I64(tile))):
                    for r0 in range(0, MM_ROWS, pass_rows):
                        nrj = min(pass_rows, MM_ROWS - r0)
                        for tok0 in range(0, tile, pass_tokens):
                            if r0 == 0:
                                job(r0, nrj, tok0, min(pass_tokens, tile - tok0))
                            else:  # rows past nr are not computed
                                with builder.if_then(builder.icmp_signed("<", _I64(r0), nr_)):
                                    job(r0, nrj, tok0, min(pass_tokens, tile - tok0))
            return context.get_dummy_value()

        return sig, codegen

    return tile


# ---- intrinsics, one per format (module globals, so that the kernels using them can be cached) ----

_dot_q4_0, _dot_q4_1, _dot_q8_0 = _make_dot("q4_0"), _make_dot("q4_1"), _make_dot("q8_0")
_dot_q4_k, _dot_q5_k, _dot_q6_k = _make_dot("q4_k"), _make_dot("q5_k"), _make_dot("q6_k")
_deq_q4_0, _deq_q4_1, _deq_q8_0 = _make_dequant_row("q4_0"), _make_dequant_row("q4_1"), _make_dequant_row("q8_0")
_deq_q4_k, _deq_q5_k, _deq_q6_k = _make_dequant_row("q4_k"), _make_dequant_row("q5_k"), _make_dequant_row("q6_k")
_tile_q4_0, _tile_q4_1, _tile_q8_0 = _make_tile("q4_0"), _make_tile("q4_1"), _make_tile("q8_0")
_tile_q4_k, _tile_q5_k, _tile_q6_k = _make_tile("q4_k"), _make_tile("q5_k"), _make_tile("q6_k")
