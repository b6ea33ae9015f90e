"""Routed-expert decode micro-benchmark: kernels_cpu.moe.moe_ffn for one token against per-expert loops.

    python -m tools.bench_moe_kernels --threads 2

One MoE layer of the Qwen3-30B-A3B shape (hidden 2048, expert width 768, 128 experts, 8 routed per
token), its experts held as the expert cache holds them: one uint8 unit per expert with gate, up and
down back to back (64-byte aligned parts, viewed as QTensor or bfloat16). Each call routes one token to
8 distinct experts drawn uniformly (a layer is 340 MB in q4_0, far past the caches: every call streams
its experts from RAM). Reported: µs per layer (best of --repeats sweeps of --calls routings), GB/s of
the expert bytes a call reads, next to the memory read bandwidth measured in the same run, for

* ours: ``moe_ffn`` (T = 1: the Numba kernel over the 8 experts, by address);
* loop: the per-expert loop of ``kernels_cpu.matvec.linear`` calls (quantized: kernels_cpu.quant.linear's
  mat-vec; bfloat16: the Numba bf16 mat-vec), silu * up and the weighted sum in torch;
* transformers: ``moe_ffn_reference`` (that loop as transformers writes it: unique, where, index_add_);
* torch (bfloat16 only): the loop with ``F.linear`` at torch's threads (the alternative for float experts).

Formats: q4_0 (llama.cpp's Q4_0 file), q4_k/q4_k/q6_k (a Q4_K_M file's experts), bfloat16.

Then prefill (``--prefill``, T tokens of one chunk routed uniformly): ``moe_ffn`` on [T, H] (the grouped
kernel: tokens grouped by expert, each expert's blocks decoded once per tile of its tokens, one call)
against ``moe_ffn_reference`` (transformers' loop over the experts hit, each through the fused multi-row
kernel of kernels_cpu.quant.linear) and T one-token calls of the decode kernel; ms per layer, G multiply-adds/s.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from offload_rt.threads import configure_process

configure_process()  # idle OpenMP workers wait as in a run (set before torch / numba load libgomp)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_cpu import matvec as fmv  # noqa: E402
from kernels_cpu import moe  # noqa: E402
from storage.formats import QTensor, get_format  # noqa: E402
from tools.bench_decode import mem_bandwidth  # noqa: E402
from tools.bench_quant_kernels import random_weights  # noqa: E402

MIXES = {"q4_0": ("q4_0",) * 3, "q4_k/q6_k": ("q4_k", "q4_k", "q6_k"), "bf16": ("bfloat16",) * 3}


def make_layer(fmts, E: int, H: int, I: int, rng) -> list[dict]:
    """E experts, each one uint8 unit holding gate [I, H], up [I, H], down [H, I] back to back."""
    shapes = ((I, H), (I, H), (H, I))
    sizes = [get_format(f).nbytes(s) for f, s in zip(fmts, shapes)]
    offs = [0, -(-sizes[0] // 64) * 64]
    offs.append(offs[1] + -(-sizes[1] // 64) * 64)
    unit = -(-(offs[2] + sizes[2]) // 4096) * 4096
    layer = []
    for _ in range(E):
        u = torch.empty(unit, dtype=torch.uint8)
        parts = {}
        for name, f, (n, k), off, size in zip(moe.PARTS, fmts, shapes, offs, sizes):
            view = u[off:off + size]
            if f == "bfloat16":
                view.view(torch.bfloat16).copy_((torch.randn(n * k) * k ** -0.5).to(torch.bfloat16))
                parts[name] = view.view(torch.bfloat16).view(n, k)
            else:
                view.copy_(torch.from_numpy(random_weights(f, n, k, rng).reshape(-1)))
                parts[name] = QTensor(view.view(n, -1), get_format(f), (n, k))
        layer.append(parts)
    return layer


def loop(h, ids, weights, expert, linear=fmv.linear):
    """The per-expert loop: three linear calls per routed expert (ascending id), the weighted sum in h's dtype."""
    out = torch.zeros_like(h)
    for j in sorted(range(ids.shape[1]), key=lambda j: int(ids[0, j])):
        p = expert(int(ids[0, j]))
        g, u = linear(h, p["gate_proj"]), linear(h, p["up_proj"])
        y = linear((F.silu(g) * u).to(h.dtype), p["down_proj"])
        out += (y.float() * weights[0, j].float()).to(h.dtype)
    return out


def torch_linear(x, w):
    return F.linear(x.to(w.dtype), w)


def time_layer(fns: dict, layer, routes, h, repeats: int, threads: int | None = None) -> dict:
    """{name: (seconds per call, CPU seconds per call)} of each function, best of ``repeats`` sweeps over
    the routings (after one warm-up sweep), the functions' sweeps interleaved so that a burst of the
    machine's other load hits them alike. Inside kernels_cpu.matvec.decode_scope(threads) unless
    ``threads`` is None. CPU seconds: the process's, in the best sweep (the work done, whatever the
    machine's other load: on a busy machine the wall time is mostly waiting for a core)."""
    best = {name: (float("inf"), 0.0) for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            with fmv.decode_scope(threads) if threads else contextlib.nullcontext():
                t0, c0 = time.perf_counter(), time.process_time()
                for ids, w in routes:
                    fn(h, ids, w, layer.__getitem__)
                t, c = (time.perf_counter() - t0) / len(routes), (time.process_time() - c0) / len(routes)
            if r and t < best[name][0]:
                best[name] = (t, c)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--calls", type=int, default=64, help="routings per sweep")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", default="16,128",
                    help="comma-separated token counts for the prefill table ('' for none)")
    ap.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated, of {', '.join(MIXES)}")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    moe.warm_up()
    bw = mem_bandwidth(a.threads)
    H, I, E, k = a.hidden, a.width, a.experts, a.k
    print(f"MoE decode expert compute, one layer: H={H}, I={I}, E={E}, k={k}, {a.threads} threads, "
          f"best of {a.repeats} sweeps of {a.calls} routings; memory read bandwidth in this run: {bw / 1e9:.1f} GB/s\n")
    print("| experts | MB read / layer | ours µs (GB/s) | linear loop µs (GB/s) | transformers loop µs | "
          "torch F.linear loop µs | ours vs linear loop | CPU µs ours / linear loop |")
    print("|---|---|---|---|---|---|---|---|")
    for mix in a.mixes.split(","):
        fmts = MIXES[mix]
        layer = make_layer(fmts, E, H, I, rng)
        routes = []
        for _ in range(a.calls):
            ids = torch.from_numpy(rng.choice(E, k, replace=False)).to(torch.int64)[None]
            routes.append((ids, torch.softmax(torch.randn(1, k), -1)))
        h = torch.randn(1, H, dtype=torch.bfloat16 if mix == "bf16" else torch.float32)
        nbytes = sum(layer[0][p].nbytes if isinstance(layer[0][p], QTensor) else layer[0][p].nbytes
                     for p in moe.PARTS) * k
        t_torch = None
        if mix == "bf16":  # torch at its own threads, before any Numba region has run in this table
            torch.set_num_threads(a.threads)
            t_torch = time_layer({"torch": lambda *v: loop(*v, linear=torch_linear)}, layer, routes, h, a.repeats)
            t_torch = t_torch["torch"][0]
        r = time_layer({"ours": moe.moe_ffn, "loop": loop, "ref": moe.moe_ffn_reference}, layer, routes, h,
                       a.repeats, a.threads)
        (t_ours, c_ours), (t_loop, c_loop), t_ref = r["ours"], r["loop"], r["ref"][0]
        print(f"| {mix} | {nbytes / 1e6:.1f} | {t_ours * 1e6:.0f} ({nbytes / t_ours / 1e9:.1f}) | "
              f"{t_loop * 1e6:.0f} ({nbytes / t_loop / 1e9:.1f}) | {t_ref * 1e6:.0f} | "
              f"{'-' if t_torch is None else f'{t_torch * 1e6:.0f}'} | {t_loop / t_ours:.2f}x | "
              f"{c_ours * 1e6:.0f} / {c_loop * 1e6:.0f} |", flush=True)
        del layer
    if a.prefill:
        prefill_table(a, [int(t) for t in a.prefill.split(",")], rng)
    return 0


def prefill_table(a, tokens: list[int], rng) -> None:
    H, I, E, k = a.hidden, a.width, a.experts, a.k
    print(f"\nprefill: moe_ffn on T tokens (grouped kernel) vs transformers' loop of quant.linear and T one-token "
          f"decode calls, {a.threads} threads, best of {a.repeats}\n")
    print("| experts | T | experts hit | grouped ms (GMAC/s) | transformers loop ms (GMAC/s) | "
          "token by token ms (GMAC/s) | grouped vs loop |")
    print("|---|---|---|---|---|---|---|")
    for mix in a.mixes.split(","):
        if mix == "bf16":
            continue
        layer = make_layer(MIXES[mix], E, H, I, rng)
        for T in tokens:
            ids = torch.from_numpy(np.stack([rng.choice(E, k, replace=False) for _ in range(T)])).to(torch.int64)
            w = torch.softmax(torch.randn(T, k), -1)
            h = torch.randn(T, H)
            macs = 3 * H * I * k * T
            rows = [(h[t:t + 1], ids[t:t + 1], w[t:t + 1]) for t in range(T)]

            def one_by_one(h, ids, w, expert):
                for r in rows:
                    moe.moe_ffn(*r, expert)

            r = time_layer({"grouped": moe.moe_ffn, "ref": moe.moe_ffn_reference, "tokens": one_by_one}, layer,
                           [(ids, w)], h, a.repeats, a.threads)
            t_grouped, t_ref, t_tokens = r["grouped"][0], r["ref"][0], r["tokens"][0]
            cells = " | ".join(f"{t * 1e3:.1f} ({macs / t / 1e9:.0f})" for t in (t_grouped, t_ref, t_tokens))
            print(f"| {mix} | {T} | {len(set(ids.reshape(-1).tolist()))} | {cells} | {t_ref / t_grouped:.2f}x |",
                  flush=True)
        del layer


if __name__ == "__main__":
    sys.exit(main())
