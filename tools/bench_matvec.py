"""Decode mat-vec micro-benchmark: torch ``F.linear`` vs ``kernels_cpu.matvec`` on a model's layer shapes.

    python -m tools.bench_matvec --preset 1.2b --threads 2

One decode step multiplies one activation row by every weight matrix once, so its speed is
the weight bytes divided by the mat-vec's read bandwidth. This sweeps the decoder layers of a
``tools.make_checkpoint`` preset (random weights, no checkpoint needed), one row at a time,
through both paths and prints GB/s and ms per sweep (best of ``--repeats``), next to the
memory read bandwidth measured in the same run. It is where the resident decode (R1) gains
over transformers are found: transformers' decode is this sweep through ``F.linear`` plus
framework overhead.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from kernels_cpu import matvec
from tools.bench_decode import mem_bandwidth
from tools.make_checkpoint import PRESETS


def layer_shapes(preset: str) -> list[tuple[int, int]]:
    h, n, inter, heads, kv, _tie = PRESETS[preset]
    hd = h // heads
    per_layer = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (inter, h), (inter, h), (h, inter)]
    return per_layer * n


def sweep_seconds(ws: list[torch.Tensor], fn, repeats: int) -> float:
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in ws}
    best = float("inf")
    for _ in range(repeats + 1):  # the first sweep compiles / warms up
        t0 = time.perf_counter()
        for w in ws:
            fn(xs[w.shape[1]], w)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.2b", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    matvec.set_threads(a.threads)
    shapes = layer_shapes(a.preset)
    bw = mem_bandwidth(a.threads)
    print(f"decode mat-vec sweep over the {a.preset} preset's decoder layers ({len(shapes)} matrices), "
          f"{a.threads} threads, best of {a.repeats}; memory read bandwidth in this run: {bw / 1e9:.1f} GB/s\n")
    print("| dtype | weight bytes | torch F.linear GB/s | kernels_cpu.matvec GB/s | ms/sweep torch | ms/sweep ours | ratio |")
    print("|---|---|---|---|---|---|---|")
    weights = {}
    for name in a.dtypes.split(","):
        g = torch.Generator().manual_seed(0)
        weights[name] = [torch.randn(n, k, generator=g).to(getattr(torch, name)) for n, k in shapes]
    # Every torch sweep before any Numba one: once Numba's worker threads have run they compete with
    # torch's pool for the 2 cores (the contention decode_scope avoids), which would slow torch here.
    t_torch = {name: sweep_seconds(ws, F.linear, a.repeats) for name, ws in weights.items()}

    def ours(x, w):
        with matvec.decode_scope():
            return matvec.linear(x, w)

    t_ours = {name: sweep_seconds(ws, ours, a.repeats) for name, ws in weights.items()}
    for name, ws in weights.items():
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        tt, to = t_torch[name], t_ours[name]
        print(f"| {name} | {nbytes / 1e9:.2f} GB | {nbytes / tt / 1e9:.1f} | {nbytes / to / 1e9:.1f} | "
              f"{1e3 * tt:.0f} | {1e3 * to:.0f} | {tt / to:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
