"""How well the planner predicts decode speed: predicted tok/s (the plan) against measured (the run).

    python -m tools.bench_predict [--work DIR] [--tokens 32] [--repeats 2] [--stream-mem 1200M]

Cases: the default model resident (float32); the synthetic 1.2B Llama (bfloat16, made by
tools/make_checkpoint.py) resident, and streamed with a small ``--cpu-mem``. Each case runs
offload-run with ``--stats`` (models and runs as tools/bench_decode.py makes them) and reads
``predicted_tok_s`` and ``decode_tok_s`` from the same run; the ratio predicted / measured
is printed per run and for the fastest run of each case (the one least disturbed by anything
else on the machine). A ratio above 1 means the plan promised more than the run delivered.
The machine's figures are measured again by the first run (its cached entry is dropped), so
that the prediction and the runs see the same machine; ``--no-calibrate`` keeps the cached ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.bench_decode import best, ours, synthetic

THREADS = 2  # as bench_decode.ours runs offload-run


def cases(work: Path, stream_mem: str) -> list[tuple[str, Path | None, str, str]]:
    """(label, model, dtype, --cpu-mem) for every case."""
    syn = synthetic(work)
    return [
        ("SmolLM2-135M (default) resident", None, "float32", "auto"),
        ("synthetic Llama 1.2B resident", syn, "bfloat16", "auto"),
        (f"synthetic Llama 1.2B streamed, --cpu-mem {stream_mem}", syn, "bfloat16", stream_mem),
    ]


def ratio(rec: dict) -> float:
    return rec["predicted_tok_s"] / rec["decode_tok_s"]


def recalibrate(store_dir: Path) -> int:
    """Forget this machine's cached figures: the first run measures them again, in an offload-run process
    set up as every run is (threads, OpenMP waiting), under the conditions the runs will see."""
    from offload_rt.memory import calibrate

    return calibrate.forget(store_dir)


def cached_figures(store_dir: Path):
    """The figures the runs used: this machine's cached entry for ``THREADS`` compute threads."""
    import torch

    from offload_rt.memory import calibrate

    torch.set_num_threads(THREADS)
    return calibrate.cached(store_dir)


def figures(bw) -> str:
    if bw is None:
        return "calibration: none cached for this machine (OFFLOAD_RT_BANDWIDTHS set?)"
    per = ", ".join(f"{d} {bw.matvec_by_dtype[d] / 1e9:.1f} GB/s + {bw.layer_s_by_dtype.get(d, 0) * 1e3:.3f} ms"
                    for d in bw.matvec_by_dtype)
    return (f"calibration: disk {bw.disk_read / 1e9:.2f} GB/s, memory {bw.mem_read / 1e9:.1f} GB/s; "
            f"decode layer (mat-vec rate + fixed per layer): {per}; per token {bw.token_s * 1e3:.3f} ms")


def run(a) -> str:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    store_dir = work / "stores"
    rows = []
    todo = cases(work, a.stream_mem)  # make the synthetic checkpoint first (not while calibrating)
    if a.calibrate:
        recalibrate(store_dir)
    for label, model, dtype, cpu_mem in todo:
        ours(model, dtype=dtype, tokens=4, cpu_mem=cpu_mem, store_dir=store_dir)  # convert + calibrate once
        runs = [ours(model, dtype=dtype, tokens=a.tokens, cpu_mem=cpu_mem, store_dir=store_dir)
                for _ in range(a.repeats)]
        r = best(runs)
        rows.append(f"| {label} | {dtype} | {r['placement']['host'] / 1e9:.2f} GB host, "
                    f"{r['placement']['disk'] / 1e9:.2f} GB disk | {r['bound']} | {r['predicted_tok_s']:.3g} | "
                    f"{r['decode_tok_s']:.3g} | **{ratio(r):.2f}** | "
                    + ", ".join(f"{x['decode_tok_s']:.3g} ({ratio(x):.2f})" for x in runs) + " |")
    return (f"Predicted vs measured decode speed, {a.tokens} new tokens, greedy, 2 threads; the fastest of "
            f"{a.repeats} runs per case (all runs: measured tok/s (ratio))\n\n"
            "| case | dtype | placement | bound | predicted tok/s | measured tok/s | predicted / measured | runs |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
            + f"\n{figures(cached_figures(store_dir))}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/offload_rt_bench")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stream-mem", default="1200M", help="--cpu-mem of the streamed case")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="use the cached calibration instead of measuring it again first")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    text = run(a)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
