"""Routed-expert compute of a Mixture-of-Experts block: :func:`moe_ffn`.

For each token t and each of its k routed experts e = ids[t, j] (weight weights[t, j]), an expert is
a SwiGLU MLP: ``down(silu(gate(h_t)) * up(h_t))``. The result is accumulated exactly as transformers'
MoE blocks do (qwen2_moe, qwen3_moe, mixtral): experts in ascending id, each expert's float output
times its routing weight, rounded to h's dtype, added into the output with ``index_add_`` in h's
dtype (so a bfloat16 h rounds once per product and once per addition, in that order).

Three paths, one result (tested against each other and against a float64 reference):

* the reference path (any T, any device, any weight format): transformers' loop, the experts hit, each
  once, over the tokens routed to it, through ``kernels_cpu.matvec.linear`` (a quantized weight: the
  fused multi-row kernel of kernels_cpu.quant for a prefill chunk, its mat-vec for one token; a float
  weight: torch in the weight's dtype). Each expert's matrices are read once per call.
* the grouped path (T > 1, CPU, the decode path's dtypes and formats): the same grouping in one Numba
  call instead of ~10 torch ops and 3 parallel regions per expert hit. The routed rows sorted by expert
  are taken GROUP_BYTES of scratch at a time; per batch, gate and up for all its experts (parallel over
  experts x row blocks; each block of weight rows decoded once per tile of up to 8 of the expert's
  tokens: kernels_cpu/quant_ir.py's tiles, the fused kernel's own), silu * up, down likewise, and the
  weighted rows added into the output in order. An expert split between two batches is read twice.
* the decode path (T == 1, CPU, h float32/bfloat16, parts quantized (ggml blocks) or
  float32/bfloat16): one Numba call over the k chosen experts, reading each weight where it lies (by
  address: no copy of an expert into a float buffer). Phase 1: gate and up mat-vecs of all k experts,
  parallel over experts x blocks of ROWS_PER_TASK rows, silu(gate) * up in the same task; phase 2:
  down mat-vecs of all k, parallel over experts x row blocks; then the weighted sum in ascending
  expert order, rounded as the reference path rounds. The row dot products are the quant kernels'
  own (kernels_cpu/quant_ir.py's ``_dot_<fmt>``: blocks widened in registers, float32 accumulation),
  so one token's expert outputs are the mat-vec's bit for bit; a float32/bfloat16 part takes a plain
  vectorised loop (bfloat16 widened in registers as kernels_cpu/matvec.py does). Threads: Numba's,
  as the caller set them (kernels_cpu.matvec.decode_scope).

Numba caches the kernels here against this file only: after editing quant_ir.py (or the helpers imported
from quant.py and matvec.py), delete
kernels_cpu/__pycache__/moe.*.nb[ic] as well (see quant_ir's docstring).
"""

from __future__ import annotations

from typing import Callable

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F

from kernels_cpu import matvec as fmv
from kernels_cpu.attention import _f32_bits, _ptr
from kernels_cpu.matvec import ROWS_PER_TASK, _bits_to_f32
from kernels_cpu.quant import _tokens_tile
from kernels_cpu.quant_ir import (  # module globals, so that the kernels here can be cached (see quant_ir)
    _dot_q4_0, _dot_q4_1, _dot_q4_k, _dot_q5_k, _dot_q6_k, _dot_q8_0,
    _tile_q4_0, _tile_q4_1, _tile_q4_k, _tile_q5_k, _tile_q6_k, _tile_q8_0, MM_ROWS)
from storage.formats import QTensor

PARTS = ("gate_proj", "up_proj", "down_proj")
# format id of a part in the decode kernel: ggml block formats (the ids of kernels_cpu.quant's _mv_addr),
# then the float formats it reads directly
FORMAT_IDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q4_k": 3, "q5_k": 4, "q6_k": 5, "float32": 6, "bfloat16": 7}
_FLOAT_IDS = {torch.float32: 6, torch.bfloat16: 7}
# per format id: elements and bytes of one block along a row (a float format: one element)
_BLOCK = np.array([32, 32, 32, 256, 256, 256, 1, 1], dtype=np.int64)
_BLOCK_BYTES = np.array([18, 20, 34, 144, 176, 210, 4, 2], dtype=np.int64)

# the grouped kernel's float32 scratch (a batch of routed rows: x, gate, up, down outputs), at most
GROUP_BYTES = 16 << 20

Expert = Callable[[int], dict]  # expert id -> {"gate_proj": w, "up_proj": w, "down_proj": w}


# ---- the decode kernel ----



@nb.njit(fastmath=True, cache=True, nogil=True, inline="always")
def _to_bf16(v):  # pragma: no cover - compiled
    """v rounded to the nearest bfloat16 (ties to even, as torch rounds), as a float32."""
    b = _f32_bits(v)
    b = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return _bits_to_f32(b)


@nb.njit(fastmath=True, cache=True, nogil=True)
def _sums32(x):  # pragma: no cover - compiled
    """Sums of x over each 32 elements (the affine formats' offset term), 0 past a partial group."""
    xs = np.zeros((x.shape[0] + 31) // 32, dtype=np.float32)
    for j in range(x.shape[0]):
        xs[j // 32] += x[j]
    return xs


@nb.njit(fastmath=True, cache=True, nogil=True)
def _dot_rows(fid, addr, n, k, r0, r1, x, xs, out):  # pragma: no cover - compiled
    """out[i] = row i of the [n, k] matrix of format ``fid`` at ``addr`` times x, for i in [r0, r1)."""
    if fid == 6:
        wf = nb.carray(_ptr(addr, np.float32), (n, k))
        for i in range(r0, r1):
            acc = np.float32(0.0)
            for j in range(k):
                acc += wf[i, j] * x[j]
            out[i] = acc
        return
    if fid == 7:
        wb = nb.carray(_ptr(addr, np.uint16), (n, k))
        for i in range(r0, r1):
            acc = np.float32(0.0)
            for j in range(k):
                acc += _bits_to_f32(np.uint32(wb[i, j]) << np.uint32(16)) * x[j]
            out[i] = acc
        return
    w = nb.carray(_ptr(addr, np.uint8), (n, k // _BLOCK[fid] * _BLOCK_BYTES[fid]))
    if fid == 0:
        for i in range(r0, r1):
            out[i] = _dot_q4_0(w, i, x, xs)
    elif fid == 1:
        for i in range(r0, r1):
            out[i] = _dot_q4_1(w, i, x, xs)
    elif fid == 2:
        for i in range(r0, r1):
            out[i] = _dot_q8_0(w, i, x, xs)
    elif fid == 3:
        for i in range(r0, r1):
            out[i] = _dot_q4_k(w, i, x, xs)
    elif fid == 4:
        for i in range(r0, r1):
            out[i] = _dot_q5_k(w, i, x, xs)
    else:
        for i in range(r0, r1):
            out[i] = _dot_q6_k(w, i, x, xs)


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _moe_decode(x_addr, x_bf16, H, I, fids, addrs, wts, out_addr):  # pragma: no cover - compiled
    """One token through k experts: out[H] = sum_j wts[j] * down_j(silu(gate_j(x)) * up_j(x)).

    x: H values at ``x_addr`` (bfloat16 if ``x_bf16``, else float32); fids, addrs: int64 [k, 3], the
    format id and address of gate, up and down of the j-th expert, in ascending expert id (the order
    of the sum); wts: float32 [k]. out: H values at ``out_addr`` in x's dtype, accumulated as the
    reference path (a product rounded to x's dtype, then added and rounded)."""
    k = fids.shape[0]
    x = np.empty(H, dtype=np.float32)
    if x_bf16:
        xb = nb.carray(_ptr(x_addr, np.uint16), H)
        for i in range(H):
            x[i] = _bits_to_f32(np.uint32(xb[i]) << np.uint32(16))
    else:
        xf = nb.carray(_ptr(x_addr, np.float32), H)
        for i in range(H):
            x[i] = xf[i]
    xs = _sums32(x)
    act = np.empty((k, I), dtype=np.float32)
    up = np.empty((k, I), dtype=np.float32)
    blocks_i = (I + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in nb.prange(k * blocks_i):  # phase 1: gate and up, experts x row blocks
        j, b = t // blocks_i, t % blocks_i
        r0, r1 = b * ROWS_PER_TASK, min(I, (b + 1) * ROWS_PER_TASK)
        a, u = act[j], up[j]
        _dot_rows(fids[j, 0], addrs[j, 0], I, H, r0, r1, x, xs, a)
        _dot_rows(fids[j, 1], addrs[j, 1], I, H, r0, r1, x, xs, u)
        for i in range(r0, r1):
            a[i] = a[i] / (np.float32(1.0) + np.exp(-a[i])) * u[i]
    ys = np.empty((k, (I + 31) // 32), dtype=np.float32)
    for j in range(k):
        ys[j] = _sums32(act[j])
    y = np.empty((k, H), dtype=np.float32)
    blocks_h = (H + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for t in nb.prange(k * blocks_h):  # phase 2: down, experts x row blocks
        j, b = t // blocks_h, t % blocks_h
        _dot_rows(fids[j, 2], addrs[j, 2], H, I, b * ROWS_PER_TASK, min(H, (b + 1) * ROWS_PER_TASK),
                  act[j], ys[j], y[j])
    s = np.zeros(H, dtype=np.float32)  # the weighted sum, experts in ascending id (vectorised over rows)
    if x_bf16:  # rounded as index_add_ in bfloat16 rounds: the product, then the sum
        for j in range(k):
            wj = wts[j]
            for i in range(H):
                s[i] = _to_bf16(s[i] + _to_bf16(y[j, i] * wj))
        ob = nb.carray(_ptr(out_addr, np.uint16), H)
        for i in range(H):
            ob[i] = np.uint16(_f32_bits(s[i]) >> np.uint32(16))
    else:
        for j in range(k):
            wj = wts[j]
            for i in range(H):
                s[i] += y[j, i] * wj
        of = nb.carray(_ptr(out_addr, np.float32), H)
        for i in range(H):
            of[i] = s[i]


@nb.njit(fastmath=True, cache=True, nogil=True)
def _tile_rows(fid, addr, n, k, r0, r1, x, s0, s1, out):  # pragma: no cover - compiled
    """out[s, i] = row i of the [n, k] matrix of format ``fid`` at ``addr`` times x[s], for i in [r0, r1)
    and s in [s0, s1): each block of MM_ROWS rows decoded once per tile of tokens (quant_ir's tiles)."""
    if fid >= 6 or s1 - s0 == 1:  # a float part, or one token: the mat-vec's dot (faster than a 1-token tile)
        for s in range(s0, s1):
            xs = _sums32(x[s]) if fid == 1 or fid == 3 or fid == 4 else x[s]  # the affine formats' sums
            _dot_rows(fid, addr, n, k, r0, r1, x[s], xs, out[s])
        return
    w = nb.carray(_ptr(addr, np.uint8), (n, k // _BLOCK[fid] * _BLOCK_BYTES[fid]))
    t0 = s0
    while t0 < s1:
        tt = _tokens_tile(s1 - t0)
        for i in range(r0, r1, MM_ROWS):
            nr = min(MM_ROWS, r1 - i)
            if fid == 0:
                _tile_q4_0(w, i, nr, x, t0, tt, out)
            elif fid == 1:
                _tile_q4_1(w, i, nr, x, t0, tt, out)
            elif fid == 2:
                _tile_q8_0(w, i, nr, x, t0, tt, out)
            elif fid == 3:
                _tile_q4_k(w, i, nr, x, t0, tt, out)
            elif fid == 4:
                _tile_q5_k(w, i, nr, x, t0, tt, out)
            else:
                _tile_q6_k(w, i, nr, x, t0, tt, out)
        t0 += tt


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _moe_grouped(x, tok, wts, offs, fids, addrs, I, R, bf16, out):  # pragma: no cover - compiled
    """Tokens grouped by expert: out[T, H] (float32, zeroed) += the routed experts' outputs of x [T, H].

    The N = T * k routed rows are sorted by expert id (then token): row r is token tok[r] with weight
    wts[r]; segment j, rows offs[j]..offs[j+1], goes through the expert whose parts are fids[j], addrs[j]
    (as in :func:`_moe_decode`). Rows are taken R at a time (the scratch: R x (2H + 2I) float32); per
    batch: gather x, gate and up (parallel over segments x row blocks, each expert's blocks decoded once
    per tile of its tokens), down likewise, then the rows added into out in order (parallel over column
    blocks), rounded to bfloat16 after each product and sum if ``bf16``: ascending expert id per token."""
    H = x.shape[1]
    N, m = tok.shape[0], offs.shape[0] - 1
    xb = np.empty((R, H), dtype=np.float32)
    g = np.empty((R, I), dtype=np.float32)
    u = np.empty((R, I), dtype=np.float32)
    y = np.empty((R, H), dtype=np.float32)
    blocks_i = (I + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    blocks_h = (H + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    cols = 64
    ja = 0
    for b0 in range(0, N, R):
        b1 = min(N, b0 + R)
        while offs[ja + 1] <= b0:
            ja += 1
        jb = ja
        while jb < m and offs[jb] < b1:
            jb += 1
        for r in nb.prange(b1 - b0):
            xb[r] = x[tok[b0 + r]]
        for t in nb.prange((jb - ja) * blocks_i):  # gate and up: segments x row blocks
            j = ja + t // blocks_i
            r0 = (t % blocks_i) * ROWS_PER_TASK
            r1 = min(I, r0 + ROWS_PER_TASK)
            s0, s1 = max(offs[j], b0) - b0, min(offs[j + 1], b1) - b0
            _tile_rows(fids[j, 0], addrs[j, 0], I, H, r0, r1, xb, s0, s1, g)
            _tile_rows(fids[j, 1], addrs[j, 1], I, H, r0, r1, xb, s0, s1, u)
            for s in range(s0, s1):
                for i in range(r0, r1):
                    g[s, i] = g[s, i] / (np.float32(1.0) + np.exp(-g[s, i])) * u[s, i]
        for t in nb.prange((jb - ja) * blocks_h):  # down: segments x row blocks
            j = ja + t // blocks_h
            r0 = (t % blocks_h) * ROWS_PER_TASK
            s0, s1 = max(offs[j], b0) - b0, min(offs[j + 1], b1) - b0
            _tile_rows(fids[j, 2], addrs[j, 2], H, I, r0, min(H, r0 + ROWS_PER_TASK), g, s0, s1, y)
        for c in nb.prange((H + cols - 1) // cols):  # the weighted sum, rows in order: parallel over columns
            c0, c1 = c * cols, min(H, (c + 1) * cols)
            for r in range(b1 - b0):
                o, wr = out[tok[b0 + r]], wts[b0 + r]
                if bf16:
                    for i in range(c0, c1):
                        o[i] = _to_bf16(o[i] + _to_bf16(y[r, i] * wr))
                else:
                    for i in range(c0, c1):
                        o[i] += y[r, i] * wr


@nb.njit(fastmath=True, cache=True, nogil=True)
def _add_weighted(out, tok, y, wts):  # pragma: no cover - compiled
    """out[tok[r]] += y[r] * wts[r], rows in order: the float32 weighted sum of both kernels, the same
    expression compiled the same way (a fused multiply-add where the CPU has one), so a sum built expert by
    expert is the sum one call builds."""
    for r in range(tok.shape[0]):
        o, wr = out[tok[r]], wts[r]
        for i in range(o.shape[0]):
            o[i] += y[r, i] * wr


def add_weighted(out: torch.Tensor, tok: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
    """``out[tok[r]] += y[r] * weights[r]`` (float32, in place, rows in order) exactly as :func:`moe_ffn`'s
    kernels add one expert's weighted outputs: with :func:`moe_ffn` of unit weights giving each expert's
    own output, the experts of a call can run apart (in any order) and be summed in ascending id later
    to the same bits (offload_rt.expert_stream, fewer slots than experts)."""
    _add_weighted(out.numpy(), tok.numpy().astype(np.int64), y.numpy(), weights.to(torch.float32).numpy())


# ---- Python entry points ----

def _check_parts(e: int, parts: dict, H: int, I: int | None) -> int:
    """The expert's intermediate size; ValueError when its parts do not fit h and each other."""
    try:
        g, u, d = parts["gate_proj"], parts["up_proj"], parts["down_proj"]
    except KeyError as err:
        raise ValueError(f"moe_ffn: expert {e} has no {err.args[0]} (parts: {', '.join(PARTS)})") from None
    gs, us, ds = g.shape, u.shape, d.shape
    i = gs[0]
    if len(gs) != 2 or gs[1] != H or us != gs or len(ds) != 2 or ds[0] != H or ds[1] != i or (I is not None and i != I):
        raise ValueError(f"moe_ffn: expert {e}: gate {tuple(gs)}, up {tuple(us)}, down {tuple(ds)} "
                         f"do not fit hidden size {H}" + ("" if I is None else f" and intermediate size {I}"))
    return i


def _parts_meta(expert: Expert, experts: list, H: int):
    """(format ids, addresses, I) of the experts' parts for the kernels, [len(experts), 3] int64 each;
    None when a part is not one they read where it lies (a device, a layout or a format they do not take)."""
    fids, addrs, I = [], [], None
    for e in experts:
        parts = expert(e)
        I = _check_parts(e, parts, H, I)
        for p in PARTS:
            w = parts[p]
            if type(w) is QTensor:
                w, fid = w.data, FORMAT_IDS.get(w.fmt.name)
            else:
                fid = _FLOAT_IDS.get(w.dtype)
            if fid is None or not w.is_cpu or not w.is_contiguous():
                return None
            fids.append(fid)
            addrs.append(w.data_ptr())
    m = len(experts)
    return np.array(fids, dtype=np.int64).reshape(m, 3), np.array(addrs, dtype=np.int64).reshape(m, 3), I


def _decode(h: torch.Tensor, ids: list, weights: list, expert: Expert) -> torch.Tensor | None:
    """The decode path (one token), or None (see :func:`_parts_meta`). ~20-50 µs of Python per call (k = 8)."""
    order = sorted(range(len(ids)), key=ids.__getitem__)  # the sum in ascending expert id
    meta = _parts_meta(expert, [ids[j] for j in order], h.shape[1])
    if meta is None:
        return None
    fids, addrs, I = meta
    wts = np.array([weights[j] for j in order], dtype=np.float32)
    x = h if h.is_contiguous() else h.contiguous()
    out = torch.empty(1, h.shape[1], dtype=h.dtype)
    _moe_decode(x.data_ptr(), h.dtype == torch.bfloat16, h.shape[1], I, fids, addrs, wts, out.data_ptr())
    return out


def _grouped(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: Expert) -> torch.Tensor | None:
    """The grouped path (T > 1 on the CPU): one Numba call for all the experts hit, or None
    (see :func:`_parts_meta`)."""
    (T, H), k = h.shape, ids.shape[1]
    sorted_ids, order = torch.sort(ids.reshape(-1).cpu(), stable=True)  # rows by expert id, then token
    hit, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    meta = _parts_meta(expert, hit.tolist(), H)
    if meta is None:
        return None
    fids, addrs, I = meta
    offs = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts.numpy(), out=offs[1:])
    tok = (order // k).numpy()
    wts = weights.reshape(-1).cpu()[order].to(torch.float32).numpy()
    x = h.to(torch.float32).contiguous()
    out = torch.zeros(T, H, dtype=torch.float32)
    rows = max(1, min(T * k, GROUP_BYTES // (4 * (2 * H + 2 * I))))
    _moe_grouped(x.numpy(), tok, wts, offs, fids, addrs, I, rows, h.dtype == torch.bfloat16, out.numpy())
    return out if h.dtype == torch.float32 else out.to(h.dtype)


def _project(x: torch.Tensor, w) -> torch.Tensor:
    """x (float32 [n, in]) times a part -> float32 [n, out]: a quantized part through the quant kernels
    (float32 throughout), a float part in its own dtype (as the model's own Linear would compute)."""
    if isinstance(w, QTensor):
        return fmv.linear(x, w)
    return fmv.linear(x.to(w.dtype), w).to(torch.float32)


def moe_ffn_reference(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: Expert) -> torch.Tensor:
    """:func:`moe_ffn` for any T, device and weight format, in transformers' loop: each expert hit (in
    ascending id) once over the tokens routed to it (the quantized parts through the fused multi-row
    kernel), its output times the routing weight, ``index_add_`` in h's dtype."""
    T, H = h.shape
    out = torch.zeros(T, H, dtype=h.dtype, device=h.device)
    flat = ids.reshape(-1)
    I = None
    for e in torch.unique(flat).tolist():  # host sync: which experts to run decides the work
        tok, slot = torch.where(ids == e)
        parts = expert(e)
        I = _check_parts(e, parts, H, I)
        w = weights[tok, slot, None].to(device=h.device, dtype=torch.float32)
        tok = tok.to(h.device)
        x = h[tok].to(torch.float32)
        act = F.silu(_project(x, parts["gate_proj"])) * _project(x, parts["up_proj"])
        y = _project(act, parts["down_proj"]) * w
        out.index_add_(0, tok, y.to(h.dtype))
    return out


def moe_ffn(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: Expert, *,
            grouped: bool | None = None) -> torch.Tensor:
    """The routed experts' output for hidden states ``h`` [T, H] (float32 or bfloat16; other dtypes and
    devices through the reference path): ``sum_j weights[t, j] * down(silu(gate(h_t)) * up(h_t))`` over
    the experts ``ids[t, j]`` (int64 [T, k], distinct per token), in h's dtype, accumulated like
    transformers (ascending expert id; each product rounded to h's dtype, then added).

    ``expert(e)`` gives expert e's parts ``{"gate_proj": [I, H], "up_proj": [I, H], "down_proj": [H, I]}``,
    each a float tensor or a storage.formats.QTensor (formats may differ between parts and experts).
    One CPU token goes through the Numba decode kernel (no copy of any expert), more CPU tokens through
    the grouped kernel (tokens grouped by expert, each expert's matrices read once per batch of rows),
    anything else through :func:`moe_ffn_reference`. ``grouped`` forces the grouped kernel (True) for a
    subset of a prefill's rows computed apart (a streamed expert cache with fewer slots than experts), so
    each expert's rows get the arithmetic the whole call gives them. ValueError when ids/weights/parts do
    not fit h."""
    if h.dim() != 2 or ids.dim() != 2 or ids.shape[0] != h.shape[0] or tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"moe_ffn: h [T, H], ids [T, k], weights [T, k] expected; got {tuple(h.shape)}, "
                         f"{tuple(ids.shape)}, {tuple(weights.shape)}")
    if h.shape[0] and ids.shape[1] and h.device.type == "cpu" and h.dtype in _FLOAT_IDS:
        # host sync (a CPU tensor: free): the ids pick the weights the kernel reads
        if h.shape[0] == 1 and not grouped:
            y = _decode(h, ids[0].tolist(), weights[0].tolist(), expert)
        else:
            y = _grouped(h, ids, weights, expert)
        if y is not None:
            return y
    return moe_ffn_reference(h, ids, weights, expert)


def warm_up() -> None:
    """Compile (or load from Numba's cache) the decode and grouped kernels for every part format and both
    h dtypes, so that the cost is part of the process's measured baseline and nothing compiles mid-run."""
    H = I = 256
    fids = np.array(sorted(FORMAT_IDS.values()), dtype=np.int64)  # one expert per format, zero weights
    ws = [np.zeros((H, H // _BLOCK[f] * _BLOCK_BYTES[f]), dtype=np.uint8) for f in fids]
    addrs = np.array([[w.ctypes.data] * 3 for w in ws], dtype=np.int64)
    fids, m = np.repeat(fids[:, None], 3, axis=1), len(ws)
    for dt in (torch.float32, torch.bfloat16):
        x, out = torch.zeros(H, dtype=dt), torch.empty(H, dtype=dt)
        _moe_decode(x.data_ptr(), dt == torch.bfloat16, H, I, fids, addrs, np.ones(m, dtype=np.float32), out.data_ptr())
        # two tokens, each routed to every expert
        tok = np.repeat(np.arange(2, dtype=np.int64)[None], m, axis=0).reshape(-1)
        offs = np.arange(0, 2 * m + 1, 2, dtype=np.int64)
        _moe_grouped(np.zeros((2, H), dtype=np.float32), tok, np.ones(2 * m, dtype=np.float32), offs, fids, addrs, I,
                     4, dt == torch.bfloat16, np.zeros((2, H), dtype=np.float32))
