"""MoE expert cache hit rate against cache size, on synthetic routing traces (pure policy, no model).

    python -m tools.bench_expert_cache [--experts 128] [--active 8] [--layers 4] [--tokens 2000] [--seed 0]

Qwen3-30B-A3B's shape by default (8 of 128 experts per token). Traces come from
offload_rt.memory.expert_cache.synthetic_trace: each expert of the previous token's set is kept
with probability ``locality``, the other picks are fresh (uniform, or from a fixed hot set).
Prints markdown tables for docs/BENCHMARKS.md:

1. LRU and LFU hit rate against slots per layer (1x..8x the active experts) at several localities,
   beside the planner's expected_hit_rate (its LRU model).
2. A stable hot set plus noise (what frequency-aware eviction is for).
3. Prefetch of the next layer's experts with a predictor of a given accuracy (ExpertFlow's
   pre-gating stands in as a noisy copy of the true routing), at 2x the active experts; "reads" are
   expert reads per token and layer (misses + prefetches), the disk bytes in units of one expert.

The first ``--warmup`` tokens fill the cache and are not counted.
"""

from __future__ import annotations

import argparse
import time

from offload_rt.memory.expert_cache import expected_hit_rate, noisy_predictions, simulate, synthetic_trace

LOCALITIES = (0.0, 0.3, 0.5, 0.7)
MULTIPLES = (1, 1.5, 2, 3, 4, 8)  # slots per layer, in units of the active experts
HOT = ((16, 0.5), (16, 0.8), (32, 0.8))  # (hot experts, share of fresh picks from them)
ACCURACIES = (0.6, 0.8, 0.9)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def sizes(experts: int, active: int) -> list[int]:
    return sorted({min(experts, max(1, round(m * active))) for m in MULTIPLES})


def size_table(a) -> list[str]:
    traces = {p: synthetic_trace(a.layers, a.experts, a.active, a.tokens, p, a.seed) for p in LOCALITIES}
    head = "| slots/layer | × active | " + " | ".join(f"locality {p}: LRU / LFU (model)" for p in LOCALITIES) + " |"
    lines = [head, "|" + "---|" * (2 + len(LOCALITIES))]
    for c in sizes(a.experts, a.active):
        cells = []
        for p, tr in traces.items():
            lru = simulate(tr, c, "lru", experts=a.experts, warmup=a.warmup).hit_rate
            lfu = simulate(tr, c, "lfu", experts=a.experts, warmup=a.warmup).hit_rate
            cells.append(f"{pct(lru)} / {pct(lfu)} ({pct(expected_hit_rate(a.experts, a.active, c, p))})")
        lines.append(f"| {c} | {c / a.active:g} | " + " | ".join(cells) + " |")
    return lines


def hot_table(a) -> list[str]:
    cs = sizes(a.experts, a.active)
    lines = ["| trace (locality 0.3) | " + " | ".join(f"{c} slots: LRU / LFU" for c in cs) + " |",
             "|" + "---|" * (1 + len(cs))]
    for hot, share in HOT:
        tr = synthetic_trace(a.layers, a.experts, a.active, a.tokens, 0.3, a.seed, hot_experts=hot, hot_share=share)
        cells = [f"{pct(simulate(tr, c, 'lru', experts=a.experts, warmup=a.warmup).hit_rate)} / "
                 f"{pct(simulate(tr, c, 'lfu', experts=a.experts, warmup=a.warmup).hit_rate)}" for c in cs]
        lines.append(f"| {share:.0%} of fresh picks from {hot} hot experts | " + " | ".join(cells) + " |")
    return lines


def prefetch_table(a) -> list[str]:
    c = min(a.experts, 2 * a.active)
    lines = [f"| locality | LRU {c} slots, no prefetch: hit (reads) | " + " | ".join(
        f"predictor {acc:.0%}: hit / prefetch accuracy / reads" for acc in ACCURACIES) + " |",
        "|" + "---|" * (2 + len(ACCURACIES))]
    n = (a.tokens - a.warmup) * a.layers
    for p in (0.0, 0.5):
        tr = synthetic_trace(a.layers, a.experts, a.active, a.tokens, p, a.seed)
        plain = simulate(tr, c, experts=a.experts, warmup=a.warmup)
        cells = []
        for acc in ACCURACIES:
            run = simulate(tr, c, experts=a.experts, warmup=a.warmup,
                           predictions=noisy_predictions(tr, a.experts, acc, a.seed))
            reads = (run.misses + run.prefetches) / n
            cells.append(f"{pct(run.hit_rate)} / {pct(run.prefetch_accuracy)} / {reads:.2f}")
        lines.append(f"| {p} | {pct(plain.hit_rate)} ({plain.misses / n:.2f} reads) | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--active", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"E={a.experts} experts, k={a.active} active, {a.layers} layers, {a.tokens} tokens "
          f"({a.warmup} warm-up), seed {a.seed}; hit rates in %\n")
    for title, table in (("Hit rate against slots per layer", size_table),
                         ("Stable hot set plus noise", hot_table),
                         ("Prefetch with a predictor of the next layer's routing", prefetch_table)):
        print(f"{title}:\n")
        print("\n".join(table(a)) + "\n")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
