"""Quantized decode mat-vec micro-benchmark: kernels_cpu.quant.matvec per format and shape, against
the float32 Numba mat-vec (kernels_cpu.matvec) and torch ``F.linear`` on the dequantized matrix.

    python -m tools.bench_quant_kernels --threads 2

Decode reads every weight once per token, so what counts is the weight bytes a mat-vec streams
per second from RAM. Each case cycles through enough copies of its matrix (>= --stream-bytes) that
no call finds its weights in the caches, and reports the best of --repeats sweeps: µs per call and
GB/s of weight bytes (the quantized bytes for ours, float32 for the baselines), next to the memory
read bandwidth measured in the same run (tools.bench_decode.mem_bandwidth). "hot" repeats one
matrix (in cache when it fits): the kernel's compute rate, which bounds the streamed one.
Shapes: the default model's MLP (576x1536, 1536x576) and tied head (49152x576, q8_0 in its GGUF),
a 3B model's MLP (3072x8192, 8192x3072). K-quants need k % 256 == 0 (not the default model's 576).
Then small batches (linear() on T = 2..512 rows, the speculation draft's batches of tree leaves: the fused
kernel against the dequantize + torch.mm path it replaces, from cache, with the crossing the
SMALL_BATCH_TOKENS threshold comes from), prefill (linear() on 512 rows: dequantized row blocks through
torch.mm) against F.linear on float32 weights, and quantize() against gguf-py's numpy on the same float32 rows.
``--tables decode,small,prefill,quantize`` and ``--shapes 3B`` run parts (short runs fit the quiet gaps of
a shared machine: another busy process makes a 2-thread Numba kernel wait a scheduler slice per call).
"""

from __future__ import annotations

import argparse
import sys
import time

from offload_rt.threads import configure_process

configure_process()  # idle OpenMP workers wait as in a run (set before torch / numba load libgomp)

import numba as nb  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_cpu import matvec as fmv  # noqa: E402
from kernels_cpu import quant  # noqa: E402
from storage.formats import QTensor, get_format  # noqa: E402
from tools.bench_decode import mem_bandwidth  # noqa: E402

SHAPES = [("default MLP down", 576, 1536, ("q4_0", "q4_1", "q8_0")),
          ("default MLP up", 1536, 576, ("q4_0", "q4_1", "q8_0")),
          ("default head", 49152, 576, ("q8_0", "q4_1")),
          ("3B MLP down", 3072, 8192, quant.FORMATS),
          ("3B MLP up", 8192, 3072, quant.FORMATS)]
F16_FIELDS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def random_weights(fmt: str, n: int, k: int, rng) -> np.ndarray:
    """Valid blocks: quantize() of random floats, or random bytes with sane float16 scales (K-quants)."""
    if fmt in quant.QUANTIZE_FORMATS:
        return quant.quantize(fmt, rng.standard_normal((n, k), dtype=np.float32))
    f = get_format(fmt)
    w = rng.integers(0, 256, (n, k // f.block, f.block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[fmt]:
        w[:, :, off:off + 2] = (rng.standard_normal(w.shape[:2]) * 1e-3).astype(np.float16).view(np.uint8).reshape(
            *w.shape[:2], 2)
    return w.reshape(n, -1)


def copies(a, stream_bytes: int) -> list:
    return [a] + [a.clone() if isinstance(a, torch.Tensor) else a.copy()
                  for _ in range(max(1, -(-stream_bytes // a.nbytes)) - 1)]


def best_sweep(ws: list, fn, repeats: int) -> float:
    """Seconds per call, best of ``repeats`` sweeps over ``ws`` (after one warm-up sweep)."""
    best = float("inf")
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for w in ws:
            fn(w)
        if r:
            best = min(best, (time.perf_counter() - t0) / len(ws))
    return best


def small_batch_table(shapes, fmts, repeats: int, rng, tokens=(2, 4, 8, 16, 32, 64, 128, 512)) -> None:
    """linear() on T rows: the fused small-batch kernel vs dequantize_rows + torch.mm (the path used above
    quant.SMALL_BATCH_TOKENS), same matrix (hot: the draft's weights are resident); µs and GMAC/s."""
    print(f"\nsmall batches: linear() on T rows, fused kernel vs dequantize + torch.mm (ratio > 1: fused is faster; "
          f"fused for 2 <= T <= {quant.SMALL_BATCH_TOKENS} on this CPU)\n")
    print("| shape (n x k) | format | " + " | ".join(f"T={t} µs fused / mm" for t in tokens) + " |")
    print("|---|---|" + "---|" * len(tokens))
    limit = quant.SMALL_BATCH_TOKENS
    try:
        for name, n, k, shape_fmts in shapes:
            for fmt in fmts:
                if fmt not in shape_fmts or k % get_format(fmt).block:
                    continue
                qt = QTensor(torch.from_numpy(random_weights(fmt, n, k, rng)), get_format(fmt), (n, k))
                cells = []
                for t in tokens:
                    x = torch.randn(t, k)
                    calls = [qt] * max(1, int(1e8 // (n * k * t)))  # ~0.1 G multiply-adds per sweep
                    quant.SMALL_BATCH_TOKENS = 1 << 30
                    tf = best_sweep(calls, lambda v: quant.linear(x, v), repeats)
                    quant.SMALL_BATCH_TOKENS = 0
                    tm = best_sweep(calls, lambda v: quant.linear(x, v), repeats)
                    cells.append(f"{tf * 1e6:.0f} / {tm * 1e6:.0f} ({tm / tf:.2f}x)")
                print(f"| {name} {n}x{k} | {fmt} | " + " | ".join(cells) + " |", flush=True)
    finally:
        quant.SMALL_BATCH_TOKENS = limit


def prefill_table(shapes, repeats: int, rng, tokens: int = 512) -> None:
    """Prefill: linear() on ``tokens`` rows (dequantize a block of rows, torch.mm) against F.linear on
    the float32 matrix; and dequantize_rows alone (GB/s of float32 written)."""
    print(f"\nprefill: linear() on {tokens} rows vs F.linear on float32 weights; dequantize_rows alone\n")
    print("| shape (n x k) | format | ours ms | F.linear f32 ms | ratio | dequantize_rows GB/s (f32 out) |")
    print("|---|---|---|---|---|---|")
    for name, n, k, _ in shapes:
        x = torch.randn(tokens, k)
        for fmt in ("q4_1", "q8_0"):
            w = random_weights(fmt, n, k, rng)
            qt = QTensor(torch.from_numpy(w), get_format(fmt), (n, k))
            wf = torch.from_numpy(quant.dequantize_rows(fmt, w, np.empty((n, k), dtype=np.float32)))
            t_ref = best_sweep([wf], lambda v: F.linear(x, v), repeats)
            t = best_sweep([qt], lambda v: quant.linear(x, v), repeats)
            buf = np.empty((min(n, quant.prefill_rows(k)), k), dtype=np.float32)
            t_dq = best_sweep([w], lambda v: quant.dequantize_rows(fmt, v, buf), repeats)
            print(f"| {name} {n}x{k} | {fmt} | {t * 1e3:.2f} | {t_ref * 1e3:.2f} | {t_ref / t:.2f}x | "
                  f"{buf.nbytes / t_dq / 1e9:.1f} |")


def decode_table(a, fmts, shapes, stream, bw, rng) -> None:
    print(f"quantized decode mat-vec, {a.threads} threads, best of {a.repeats} sweeps over >= {stream / 1e6:.0f} MB; "
          f"memory read bandwidth in this run: {bw / 1e9:.1f} GB/s\n")
    print("| shape (n x k) | format | ours µs | ours GB/s | ours hot GB/s | f32 Numba µs (GB/s) | "
          "torch F.linear µs (GB/s) | vs f32 Numba | vs torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    xs = {k: torch.randn(k) for _, _, k, _ in shapes}
    # Every torch sweep before any Numba one: once Numba's workers have run they compete with torch's pool.
    t_torch = {}
    for name, n, k, _ in shapes:
        t_torch[name] = best_sweep(copies(torch.randn(n, k), stream), lambda w: F.linear(xs[k][None], w), a.repeats)
    for name, n, k, shape_fmts in shapes:
        x = xs[k]

        def f32(w):
            with fmv.decode_scope():
                fmv.matvec(w, x)

        t_f32 = best_sweep(copies(torch.randn(n, k), stream), f32, a.repeats)
        for fmt in fmts:
            if fmt not in shape_fmts or k % get_format(fmt).block:
                continue
            w = random_weights(fmt, n, k, rng)
            out = np.empty(n, dtype=np.float32)

            def ours(w):
                with fmv.decode_scope():
                    quant.matvec(fmt, w, x.numpy(), out)

            t = best_sweep(copies(w, stream), ours, a.repeats)
            t_hot = best_sweep([w] * 8, ours, a.repeats)
            fb, tt = n * k * 4, t_torch[name]
            print(f"| {name} {n}x{k} | {fmt} | {t * 1e6:.1f} | {w.nbytes / t / 1e9:.1f} | "
                  f"{w.nbytes / t_hot / 1e9:.1f} | "
                  f"{t_f32 * 1e6:.1f} ({fb / t_f32 / 1e9:.1f}) | {tt * 1e6:.1f} ({fb / tt / 1e9:.1f}) | "
                  f"{t_f32 / t:.2f}x | {tt / t:.2f}x |")


def quantize_table(rng) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gguf_quantize

    print("\nquantize() vs gguf-py (float32 GB/s read), 8192 x 3072 rows (gguf-py timed on 512 of them)\n")
    print("| format | ours GB/s | gguf-py GB/s | ratio |")
    print("|---|---|---|---|")
    xq = rng.standard_normal((8192, 3072), dtype=np.float32)
    for fmt, qt in (("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0)):
        t = best_sweep([xq], lambda v: quant.quantize(fmt, v), 2)
        tg = best_sweep([xq[:512]], lambda v: gguf_quantize(v, qt), 1) * 16
        print(f"| {fmt} | {xq.nbytes / t / 1e9:.2f} | {xq.nbytes / tg / 1e9:.2f} | {tg / t:.1f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stream-bytes", type=float, default=256e6, help="bytes cycled through per case")
    ap.add_argument("--formats", default=",".join(quant.FORMATS))
    ap.add_argument("--quick", action="store_true", help="default-model shapes only")
    ap.add_argument("--shapes", default="", help="only the shapes whose name contains this (e.g. '3B')")
    ap.add_argument("--tables", default="decode,small,prefill,quantize", help="which tables to print")
    a = ap.parse_args(argv)
    fmts = a.formats.split(",")
    stream = int(a.stream_bytes)
    torch.set_num_threads(a.threads)
    fmv.set_threads(a.threads)
    quant.warm_up()
    fmv.warm_up()
    tables = a.tables.split(",")
    shapes = [sh for sh in (SHAPES[:3] if a.quick else SHAPES) if a.shapes in sh[0]]
    rng = np.random.default_rng(0)
    bw = mem_bandwidth(a.threads)
    if "decode" in tables:
        decode_table(a, fmts, shapes, stream, bw, rng)
    if "small" in tables:
        small_batch_table(shapes, fmts, a.repeats, rng)
    if "prefill" in tables:
        prefill_table(shapes, a.repeats, rng)
    if "quantize" in tables:
        quantize_table(rng)
    print(f"\n(numba threads: {nb.get_num_threads()}, torch threads: {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
