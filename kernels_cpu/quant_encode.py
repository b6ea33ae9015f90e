"""Quantization to ggml's q4_0, q4_1 and q8_0 blocks: float32 rows to block bytes, byte for byte
what ``gguf.quants.quantize`` gives (its rounding, float16 round-to-nearest-even of the scales).

:func:`quantize` runs one Numba kernel per format, parallel over rows. Each 32-block is reduced
(max, min, max |v|) and quantized as one 32-lane vector by an intrinsic (:func:`_stats32`,
:func:`_codes32`: written as plain loops, LLVM left them scalar), with gguf-py's float32
operations in its order and no fast-math. Blocks whose bytes numpy's own behaviour decides rather
than arithmetic are flagged by the kernel and quantized by gguf-py itself (see :func:`quantize`).
The LLVM helpers come from kernels_cpu/quant_ir.py; kernels_cpu/quant.py re-exports
:func:`quantize` and :data:`QUANTIZE_FORMATS`.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.quant_ir import _F32, _I8, _I32, _I64, _Emit, _is_array, _ivec
from storage.formats import get_format

QUANTIZE_FORMATS = ("q4_0", "q4_1", "q8_0")


# ---- float32 -> float16 bits, numpy's rounding ----

@intrinsic
def _f32_bits(typingctx, x):
    """A float32's bits as a uint32 (an LLVM bitcast, free)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _I32)

    return sig, codegen


@nb.njit(cache=True, nogil=True)
def _f16_bits(f):  # pragma: no cover - compiled
    """float32 -> float16 bits, rounded to nearest even as ``numpy.astype(np.float16)`` does, with
    subnormal results and overflow to inf (integer arithmetic: no F16C needed). NaN -> a quiet NaN
    (the quantizers hand blocks with non-finite values to gguf-py anyway)."""
    u = np.int64(_f32_bits(f))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:
        return sign | (0x7C00 if a == 0x7F800000 else 0x7E00 | ((a >> 13) & 0x3FF))
    if a >= 0x47800000:  # >= 65536: inf (65520 up to here rounds up to inf below)
        return sign | 0x7C00
    if a < 0x38800000:  # below the smallest normal float16, 2^-14
        if a < 0x33000000:  # below 2^-25: rounds to zero
            return sign
        e = a >> 23
        m = (a & 0x7FFFFF) | 0x800000
        shift = 126 - e  # value = m * 2^(e - 150) = h * 2^-24
        h = m >> shift
        rem = m & ((1 << shift) - 1)
        halfway = 1 << (shift - 1)
    else:
        h = (a - 0x38000000) >> 13  # rebias the exponent (127 -> 15), keep 10 mantissa bits
        rem = a & 0x1FFF
        halfway = 0x1000
    if rem > halfway or (rem == halfway and (h & 1)):
        h += 1  # a carry into the exponent is right (up to inf)
    return sign | h


@nb.njit(cache=True, nogil=True)
def f16_bits(a):  # pragma: no cover - compiled
    """:func:`_f16_bits` over an array (float32 [n] -> uint16 [n]); for tests."""
    out = np.empty(a.shape[0], dtype=np.uint16)
    for i in range(a.shape[0]):
        out[i] = _f16_bits(a[i])
    return out


@nb.njit(cache=True, nogil=True, inline="always")
def _put_f16(ob, o, f):  # pragma: no cover - compiled
    h = _f16_bits(f)
    ob[o] = np.uint8(h & 0xFF)
    ob[o + 1] = np.uint8(h >> 8)


# ---- one 32-block as one 32-lane vector ----

_NONFINITE, _POS0, _NEG0 = 1, 2, 4  # _stats32 flag bits


@intrinsic
def _stats32(typingctx, xr, e0):
    """Statistics of the 32 float32 at xr[e0:e0 + 32], as 32-lane vector reductions (written as
    plain loops without fast-math, LLVM keeps float max/min scalar: ~3x slower overall):
    (max, min, max |v|, index of the first max |v|, flags: _NONFINITE, _POS0 (a +0.0), _NEG0 (a -0.0)).
    The max and min of a block holding NaN are meaningless: such a block is flagged."""
    if not _is_array(xr, types.float32, 1):
        return None
    sig = types.Tuple((types.float32, types.float32, types.float32, types.intp, types.intp))(xr, types.intp)

    def codegen(context, builder, signature, args):
        xa = context.make_array(signature.args[0])(context, builder, args[0])
        v32f, v32i = ir.VectorType(_F32, 32), ir.VectorType(_I32, 32)
        v = builder.load(builder.bitcast(builder.gep(xa.data, [args[1]]), v32f.as_pointer()), align=4)
        mod = builder.module

        def call(name, ret, val):
            return builder.call(cgutils.get_or_insert_function(mod, ir.FunctionType(ret, [val.type]), name), [val])

        mx = call("llvm.vector.reduce.fmax.v32f32", _F32, v)
        mn = call("llvm.vector.reduce.fmin.v32f32", _F32, v)
        av = call("llvm.fabs.v32f32", v32f, v)
        amax = call("llvm.vector.reduce.fmax.v32f32", _F32, av)
        hits = builder.bitcast(builder.fcmp_ordered("==", av, _Emit(builder).splat(amax, v32f)), _I32)
        cttz = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32, [_I32, ir.IntType(1)]), "llvm.cttz.i32")
        first = builder.and_(builder.call(cttz, [hits, ir.IntType(1)(0)]), _I32(31))
        bits = builder.bitcast(v, v32i)

        def any_(cond, flag):
            r = call("llvm.vector.reduce.or.v32i1", ir.IntType(1), cond)
            return builder.select(r, _I64(flag), _I64(0))

        expo = ir.Constant(v32i, [0x7F800000] * 32)
        nonfinite = any_(builder.icmp_unsigned("==", builder.and_(bits, expo), expo), _NONFINITE)
        pos0 = any_(builder.icmp_unsigned("==", bits, ir.Constant(v32i, [0] * 32)), _POS0)
        neg0 = any_(builder.icmp_unsigned("==", bits, ir.Constant(v32i, [0x80000000] * 32)), _NEG0)
        flags = builder.or_(builder.or_(nonfinite, pos0), neg0)
        return context.make_tuple(builder, signature.return_type, [mx, mn, amax, builder.zext(first, _I64), flags])

    return sig, codegen


def _vcall(builder, name: str, ret, *vals):
    """Call the LLVM intrinsic ``name`` (e.g. llvm.trunc.v32f32)."""
    fnty = ir.FunctionType(ret, [v.type for v in vals])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(vals))


@intrinsic
def _codes32(typingctx, xr, e0, kind, sub, inv, ob, o):
    """Quantize x = xr[e0:e0 + 32] into ob[o:...] with gguf-py's float32 arithmetic, as one
    32-lane vector (written as plain loops, LLVM left them scalar):
    kind 0 (q4_0): min(trunc(x * inv + 8.5), 15), packed as nibbles (16 bytes);
    kind 1 (q4_1): min(trunc((x - sub) * inv + 0.5), 15), packed as nibbles (16 bytes);
    kind 8 (q8_0): round half away from zero of x * inv (np_roundf), as int8 (32 bytes).
    No fast-math flags: each operation rounds as numpy's does."""
    if not (_is_array(xr, types.float32, 1) and _is_array(ob, types.uint8, 1)
            and isinstance(kind, types.IntegerLiteral)):
        return None
    k = kind.literal_value
    sig = types.void(xr, types.intp, kind, types.float32, types.float32, ob, types.intp)

    def codegen(context, builder, signature, args):
        xa = context.make_array(signature.args[0])(context, builder, args[0])
        oa = context.make_array(signature.args[5])(context, builder, args[5])
        e = _Emit(builder)
        v32f, v32i = ir.VectorType(_F32, 32), ir.VectorType(_I32, 32)
        x = builder.load(builder.bitcast(builder.gep(xa.data, [args[1]]), v32f.as_pointer()), align=4)
        optr = builder.gep(oa.data, [args[6]])
        inv = e.splat(args[4], v32f)
        if k == 8:
            v = builder.fmul(x, inv)
            a = _vcall(builder, "llvm.fabs.v32f32", v32f, v)
            fl = _vcall(builder, "llvm.floor.v32f32", v32f, a)
            twice = builder.fmul(ir.Constant(v32f, [2.0] * 32), builder.fsub(a, fl))
            r = builder.fptosi(builder.fadd(fl, _vcall(builder, "llvm.floor.v32f32", v32f, twice)), v32i)
            q = builder.select(builder.fcmp_ordered("<", v, ir.Constant(v32f, [0.0] * 32)), builder.neg(r), r)
            out = builder.trunc(q, ir.VectorType(_I8, 32))
        else:
            v = builder.fsub(x, e.splat(args[3], v32f)) if k == 1 else x
            v = builder.fadd(builder.fmul(v, inv), ir.Constant(v32f, [0.5 if k == 1 else 8.5] * 32))
            q = builder.fptosi(_vcall(builder, "llvm.trunc.v32f32", v32f, v), v32i)
            fifteen = ir.Constant(v32i, [15] * 32)
            q = builder.select(builder.icmp_signed(">", q, fifteen), fifteen, q)
            lo = e.pick(q, list(range(16)))
            hi = e.pick(q, list(range(16, 32)))
            out = builder.trunc(builder.or_(lo, builder.shl(hi, _ivec(4))), ir.VectorType(_I8, 16))
        builder.store(out, builder.bitcast(optr, out.type.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


# ---- quantization kernels, one per format ----

# Each kernel quantizes every 32-block of a row with gguf-py's float32 operations in its order (no
# fast-math: no FMA contraction, no reciprocal tricks) and flags the blocks whose bytes numpy's own
# behaviour decides instead (NaN/inf, infinite scales): quantize() hands those to gguf-py.

@nb.njit(parallel=True, cache=True, nogil=True)
def _qz_q4_0(x, out, flags):  # pragma: no cover - compiled
    n, k = x.shape
    for i in nb.prange(n):
        xr, orow = x[i], out[i]
        for blk in range(k // 32):
            _, _, _, imax, special = _stats32(xr, 32 * blk)
            d = xr[32 * blk + imax] / np.float32(-8.0)  # the signed value of the first largest |v|, as np.argmax
            inv = np.float32(0.0) if d == 0 else np.float32(1.0) / d
            if special & _NONFINITE or not (np.isfinite(d) and np.isfinite(inv)):
                flags[i, blk] = 1
                continue
            _put_f16(orow, 18 * blk, d)
            _codes32(xr, 32 * blk, 0, np.float32(0.0), inv, orow, 18 * blk + 2)


@nb.njit(parallel=True, cache=True, nogil=True)
def _qz_q4_1(x, out, flags):  # pragma: no cover - compiled
    n, k = x.shape
    for i in nb.prange(n):
        xr, orow = x[i], out[i]
        for blk in range(k // 32):
            mx, mn, _, _, special = _stats32(xr, 32 * blk)
            d = (mx - mn) / np.float32(15.0)
            inv = np.float32(0.0) if d == 0 else np.float32(1.0) / d
            # With both zeros in a block whose max or min is zero, which zero numpy's SIMD max/min
            # returns depends on where they sit: gguf-py quantizes such a block (and non-finite ones).
            both0 = special & (_POS0 | _NEG0) == _POS0 | _NEG0
            if special & _NONFINITE or not (np.isfinite(d) and np.isfinite(inv)) or (both0 and (mx == 0 or mn == 0)):
                flags[i, blk] = 1
                continue
            _put_f16(orow, 20 * blk, d)
            _put_f16(orow, 20 * blk + 2, mn)
            _codes32(xr, 32 * blk, 1, mn, inv, orow, 20 * blk + 4)


@nb.njit(parallel=True, cache=True, nogil=True)
def _qz_q8_0(x, out, flags):  # pragma: no cover - compiled
    n, k = x.shape
    for i in nb.prange(n):
        xr, orow = x[i], out[i]
        for blk in range(k // 32):
            _, _, amax, _, special = _stats32(xr, 32 * blk)
            d = amax / np.float32(127.0)
            inv = np.float32(0.0) if d == 0 else np.float32(1.0) / d
            if special & _NONFINITE or not (np.isfinite(d) and np.isfinite(inv)):
                flags[i, blk] = 1
                continue
            _put_f16(orow, 34 * blk, d)
            _codes32(xr, 32 * blk, 8, np.float32(0.0), inv, orow, 34 * blk + 2)


_QUANTIZE = {"q4_0": _qz_q4_0, "q4_1": _qz_q4_1, "q8_0": _qz_q8_0}


def quantize(fmt: str, x: np.ndarray) -> np.ndarray:
    """float32 [..., k] -> uint8 [..., k // 32 * block bytes] in q4_0, q4_1 or q8_0, byte for byte
    ``gguf.quants.quantize`` (parallel over rows).

    Blocks whose bytes depend on numpy's internals rather than on arithmetic (non-finite values;
    q4_1 blocks holding both +0.0 and -0.0 with a zero max or min) are flagged by the kernel and
    quantized by gguf-py itself; they do not occur in real weights."""
    if fmt not in _QUANTIZE:
        raise ValueError(f"no kernel for format {fmt!r}; these have one: {', '.join(_QUANTIZE)}")
    kernel = _QUANTIZE[fmt]
    f = get_format(fmt)
    x = np.ascontiguousarray(x, dtype=np.float32)
    f.check_shape(x.shape)
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // f.block * f.block_bytes), dtype=np.uint8)
    flags = np.zeros((rows.shape[0], rows.shape[1] // f.block), dtype=np.uint8)
    kernel(rows, out, flags)
    if flags.any():
        import gguf.quants

        where = np.nonzero(flags)
        traits = {"q4_0": gguf.quants.Q4_0, "q4_1": gguf.quants.Q4_1, "q8_0": gguf.quants.Q8_0}[fmt]
        with np.errstate(all="ignore"):
            fixed = traits.quantize_blocks(rows.reshape(rows.shape[0], -1, f.block)[where])
        out.reshape(rows.shape[0], -1, f.block_bytes)[where] = fixed
    return out.reshape(f.byte_shape(x.shape))


def warm_up() -> None:
    """Compile (or load from Numba's cache) the quantization kernels now, with tiny inputs."""
    for fmt in QUANTIZE_FORMATS:
        quantize(fmt, np.zeros((1, 32), dtype=np.float32))
    f16_bits(np.zeros(1, dtype=np.float32))
