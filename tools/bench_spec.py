"""Speculative decoding (SpecExec, issue 12): D2 and the target's pass-cost curve, baselines in the same run.

    python -m tools.bench_spec d2 [--budgets 8,16,32,64,128,256] [--tokens 64] [--overlap] [--margin 8M] [--cap-extra 450M]
                                  [--plot docs/d2_acceptance.png] [--out docs/BENCHMARKS.md]
        The default model stored in float32 is the target, most of its layers streaming from disk
        (``--cpu-mem`` = the minimum working set ``--plan`` prints + ``--margin``, ``-c 1024``), the draft
        ``--draft self-int4`` (the same model as q4_1 blocks, resident), every run under
        ``memcap (cpu-mem + cap-extra) --cold``. Equal memory: every run, autoregressive included, gets the
        same ``--cpu-mem`` (what the largest budget needs with the draft + margin), so autoregressive
        decoding spends the draft's bytes on resident layers. Per budget (with ``--overlap`` also with
        ``--spec-overlap``) and the planner's own choice: tokens per target pass, decode tok/s, target pass
        and tree-building time per pass, disk bytes per pass and the D2 limit (the pass's bytes at the
        calibrated disk rate × tokens per pass). Greedy, several chat prompts, ``--ignore-eos``; the texts
        must equal the autoregressive ones (checked, reported). Plots tokens per pass against the budget.
    python -m tools.bench_spec cost [--work DIR] [--budgets 8,32,128,512] [--cap 1800M] [--tokens 4]
        The synthetic 1.2B bf16 model of D1 streamed under the D1 cap, with a synthetic 135M-shaped bf16
        draft (random weights: it is accepted rarely; the point is the cost side): the target's pass time
        against the tree size, next to its autoregressive pass time.

Each run is its own ``python -m offload_rt ... --stats`` process (tools/bench_quant.run_process); this
process never imports torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tools.bench_decode import publish, synthetic
from tools.bench_quant import Run, run_process

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a refrigerator keeps food cold.",
    "Describe the water cycle step by step for a school class.",
]
_SIZE = re.compile(r"([0-9.]+) (B|KiB|MiB|GiB)")
_UNIT = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def size_bytes(text: str) -> int:
    n, unit = _SIZE.fullmatch(text.strip()).groups()
    return int(float(n) * _UNIT[unit])


def parse_size_arg(text: str) -> int:
    m = re.fullmatch(r"([0-9.]+)([KMG]?)", text.strip().upper())
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def base_cmd(model: str | None, store_dir: Path, *, weights: str, ctx: int, tokens: int, threads: int = 2) -> list:
    cmd = [sys.executable, "-m", "offload_rt"] + ([model] if model else [])
    return cmd + ["--weights", weights, "-c", ctx, "-n", tokens, "--ignore-eos", "--threads", threads,
                  "--offload-dir", store_dir]


def plan_min(cmd: list, draft: bool) -> tuple[int, str]:
    """The minimum working set ``--plan`` prints for ``cmd`` (with the draft's bytes when ``draft``)."""
    import subprocess

    mem = [] if "--cpu-mem" in cmd else ["--cpu-mem", "64G"]
    p = subprocess.run([str(c) for c in cmd + ["--plan"] + mem], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    pat = r"minimum working set with the draft ([0-9.]+ \w+)" if draft else r"minimum working set ([0-9.]+ \w+)"
    m = re.search(pat, p.stdout)
    if not m:
        raise RuntimeError(f"no minimum working set in --plan output:\n{p.stdout}")
    return size_bytes(m.group(1)), p.stdout


def timed_run(cmd: list, mem: int, cap_extra: int, prompt: str) -> Run:
    return run_process(cmd + ["--cpu-mem", mem, "--stats", "-p", prompt], cap=f"{(mem + cap_extra) >> 20}M")


def summarize(runs: list[Run]) -> dict:
    ok = [r for r in runs if r.ok]
    if len(ok) < len(runs):
        return {"status": next(r.status for r in runs if not r.ok)}
    dec = sum(r.rec["decode_s"] for r in ok)
    toks = sum(max(r.rec["new_tokens"] - 1, 0) for r in ok)
    out = {"tok_s": toks / dec if dec else 0.0, "disk_decode": sum(r.rec.get("disk_read_bytes_decode", 0) for r in ok)}
    specs = [r.rec.get("spec") for r in ok if r.rec.get("spec")]
    if specs:
        passes = sum(s["passes"] for s in specs)
        out.update(passes=passes, tokens_per_pass=sum(s["tokens_per_pass"] * s["passes"] for s in specs) / passes,
                   verify_ms=1e3 * sum(s["verify_s"] for s in specs) / passes,
                   draft_ms=1e3 * sum(s["draft_s"] for s in specs) / passes,
                   budget=specs[0]["budget"], nodes=sum(s["mean_tree_nodes"] * s["passes"] for s in specs) / passes)
    else:
        out.update(passes=toks, tokens_per_pass=1.0, verify_ms=1e3 * dec / max(toks, 1), draft_ms=0.0)
    out["disk_per_pass"] = out["disk_decode"] / max(out["passes"], 1)
    return out


def plot(points: list[tuple[int, float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b, _t, _s in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(budgets, [t for _b, t, _s in points], "o-", label="tokens per target pass")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree budget (nodes per target pass)")
    ax.set_ylabel("tokens per target pass")
    ax2 = ax.twinx()
    ax2.plot(budgets, [s for _b, _t, s in points], "s--", color="tab:orange", label="speed-up vs autoregressive")
    ax2.set_ylabel("decode tok/s ÷ autoregressive")
    ax.set_title(title)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.86))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def disk_rate(plan_text: str) -> float:
    """The disk read rate (bytes/s) ``--plan`` says the plan was made with."""
    return float(re.search(r"bandwidths: disk ([0-9.]+) GB/s", plan_text).group(1)) * 1e9


def d2(a) -> str:
    store = Path(a.work) / "stores"
    cmd = base_cmd(None, store, weights="f32", ctx=1024, tokens=a.tokens)
    margin, extra = parse_size_arg(a.margin), parse_size_arg(a.cap_extra)
    draft = ["--draft", "self-int4"]
    # untimed: converts the f32 and int4 stores, compiles the kernels, calibrates
    run_process(cmd + draft + ["--spec-budget", "8", "-p", "hi", "-n", "4", "--stats"])
    # one --cpu-mem for every run (equal memory): what the largest tree needs with the draft, + margin
    widest = max(a.budgets)
    mem = plan_min(cmd + draft + ["--spec-budget", str(widest)] + (["--spec-overlap"] if a.overlap else []),
                   True)[0] + margin
    auto_plan = plan_min(cmd + draft + ["--cpu-mem", str(mem)], False)[1]  # (with or without speculation)
    m = re.search(r"budget (\d+) tree nodes", auto_plan)
    off = re.search(r"speculation: off \((.*)\)", auto_plan)
    chosen = f"budget {m.group(1)}" if m else "no speculation" + (f" ({off.group(1)})" if off else "")
    rate = disk_rate(plan_min(cmd + ["--cpu-mem", str(mem)], False)[1])
    configs: list[tuple[str, list]] = [("autoregressive", [])]
    for b in a.budgets:
        configs.append((f"budget {b}", draft + ["--spec-budget", b]))
        if a.overlap:
            configs.append((f"budget {b}, overlap", draft + ["--spec-budget", b, "--spec-overlap"]))
    configs.append(("planner's choice", draft))
    results: dict[str, list[Run]] = {name: [] for name, _x in configs}
    for prompt in PROMPTS[:a.prompts]:
        for name, flags in configs:  # alternate configurations within each prompt
            results[name].append(timed_run(cmd + flags, mem, extra, prompt))
    ar = summarize(results["autoregressive"])
    rows = ["| run | budget | tokens/pass | decode tok/s | × autoregressive | target pass ms | tree ms/pass | "
            "disk MB/pass | D2 limit tok/s | % of limit |", "|---|---|---|---|---|---|---|---|---|---|"]
    points = []
    for name, _flags in configs:
        s = summarize(results[name])
        if "status" in s:
            rows.append(f"| {name} | — | {s['status']} | | | | | | | |")
            continue
        ratio = s["tok_s"] / ar["tok_s"] if ar.get("tok_s") else float("nan")
        # D2 limit: the disk-bound pass (its bytes at the calibrated rate, D1's limit) × tokens per pass
        limit = s["tokens_per_pass"] * rate / s["disk_per_pass"] if s["disk_per_pass"] else float("nan")
        rows.append(f"| {name} | {s.get('budget', '—')} | {s['tokens_per_pass']:.2f} | "
                    f"{s['tok_s']:.2f} | {ratio:.2f}× | {s['verify_ms']:.0f} | {s['draft_ms']:.0f} | "
                    f"{s['disk_per_pass'] / 1e6:.0f} | {limit:.2f} | {100 * s['tok_s'] / limit:.0f}% |")
        if name.startswith("budget") and "overlap" not in name:
            points.append((s["budget"], s["tokens_per_pass"], ratio))
    same = all(r.ok and a_.ok and r.stdout == a_.stdout
               for name, runs in results.items() for r, a_ in zip(runs, results["autoregressive"]))
    if a.plot and points:
        plot(points, Path(a.plot), "D2: default model f32 streamed, draft self-int4, equal --cpu-mem")
    cmdline = "python -m tools.bench_spec d2 " + " ".join(sys.argv[2:])
    return "\n".join([
        f"### D2 — speculative decoding at equal memory, streamed target (`{cmdline}`)", "",
        f"Default model stored f32 (513 MiB), `-c 1024`, {a.prompts} chat prompt(s) × {a.tokens} tokens "
        f"(`--ignore-eos`, greedy), every run (autoregressive included) at `--cpu-mem {mem >> 20}M` (the minimum "
        f"working set with the draft for budget {widest} + {a.margin}), each under `memcap (cpu-mem + {a.cap_extra}) "
        f"--cold`; tok/s over all prompts; disk {rate / 1e9:.2f} GB/s as calibrated. Planner's choice at this "
        f"--cpu-mem: {chosen}.", "", *rows, "",
        f"Every run's text equals the autoregressive run's for the same prompt: {'yes' if same else 'NO'}. "
        + (f"Acceptance curve: `{a.plot}`." if a.plot and points else ""), ""])


def cost(a) -> str:
    work = Path(a.work)
    target = synthetic(work, "1.2b")
    draft = synthetic(work, "135m")
    store = work / "stores"
    cmd = base_cmd(str(target), store, weights="auto", ctx=2048, tokens=a.tokens)
    run_process(cmd + ["--draft", draft, "--spec-budget", "8", "-p", "hi", "-n", "2", "--stats", "--cpu-mem", "4G"])
    rows = ["| tree nodes | target pass ms | tree ms/pass | disk MB/pass | decode tok/s |", "|---|---|---|---|---|"]
    runs = [("autoregressive", [])] + [(str(b), ["--draft", draft, "--spec-budget", b]) for b in a.budgets]
    for name, flags in runs:
        r = run_process(cmd + flags + ["--cpu-mem", "auto", "--stats", "-p", PROMPTS[0]], cap=a.cap)
        if not r.ok:
            rows.append(f"| {name} | {r.status} | | | |")
            continue
        s = summarize([r])
        nodes = 1 if name == "autoregressive" else round(s["nodes"]) + 1
        rows.append(f"| {nodes} ({name}) | {s['verify_ms']:.0f} | {s['draft_ms']:.0f} | "
                    f"{s['disk_per_pass'] / 1e6:.0f} | {s['tok_s']:.2f} |")
    cmdline = "python -m tools.bench_spec cost " + " ".join(sys.argv[2:])
    return "\n".join([f"### Pass cost — synthetic 1.2B bf16 streamed, synthetic 135M-shaped draft (`{cmdline}`)", "",
                      f"Under `memcap {a.cap} --cold`, `--cpu-mem auto`, {a.tokens} tokens; random weights accept "
                      "almost nothing, so every pass verifies a full tree: the target's pass time against its size.",
                      "", *rows, ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_spec", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("d2")
    p.add_argument("--work", default="/tmp/offload_rt_bench")
    p.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--margin", default="8M")
    p.add_argument("--cap-extra", default="450M")
    p.add_argument("--plot", default="docs/d2_acceptance.png")
    p.add_argument("--overlap", action="store_true", help="also each budget with --spec-overlap")
    p.add_argument("--out", type=Path)
    c = sub.add_parser("cost")
    c.add_argument("--work", default="/tmp/offload_rt_bench")
    c.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128, 512])
    c.add_argument("--cap", default="1800M")
    c.add_argument("--tokens", type=int, default=4)
    c.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    publish(d2(a) if a.what == "d2" else cost(a), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
