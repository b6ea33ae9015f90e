"""A2: MagicPIG decode attention vs the exact Numba kernel, one layer, same run.

    python -m tools.bench_magicpig a2 --lengths 8k,16k,64k,128k --json a2.json

Shapes as A1: 32 query heads, 8 KV heads, head dim 128, bf16 KV in chunks of 256 tokens
(pool slots shuffled, as a cache that spills and reuses slots leaves them). One decode query
at the last position. MagicPIG's step is what the cache runs: the 4 sink tokens and the last
64 exactly, the rest sampled (``attend_sampled``; the old path: the exact part by
``kernels_cpu.attention.attend``, merged by log-sum-exp); the exact step attends all keys with the same kernel. ``--gather`` picks MagicPIG's
kernels: ``per-head`` (each query head gathers its own sampled rows: the old path) and ``shared``
(one gather per KV head over the union of its query heads' rows, each head its own estimator);
``--no-huge-pages`` leaves the pools on 4 KiB pages (the old path; kernels_cpu.hugepages). Timings
interleave them, ``--repeats`` times; these machines are shared and noisy, so the table shows the best time of
each and the speed-up as the median of the back-to-back ratios (medians of the times: JSON).

Keys (``--keys``):

* ``random``: i.i.d. Gaussian keys and queries. Attention is flat, the exact output is an
  average of ~n random values (norm ~ 1/sqrt(n)), and any sampling estimate's *relative*
  error is large: the worst case for MagicPIG's accuracy, and its typical speed.
* ``clustered``: what real keys look like to a hash: a large shared offset (centering removes
  it), 64 topic clusters laid out in runs of 32 tokens, noise; each query head leans towards
  one cluster (``--beta``) and a few "needle" tokens align with it strongly, so attention is
  peaked but spread over many keys (the table's "effective keys": exp of the attention
  weights' entropy, median over heads; about n/64 at the default beta).

Reported per (keys, length): µs per layer-step for each, the speed ratio, the output's relative
error vs exact (mean over heads of |o - o_exact| / |o_exact|, averaged over ``--queries`` query
draws), the share of indexed keys a head attends, the rows the shared gather reads against the per-head
gathers, the tables' build time per token and bytes per token.

``--kv-dtype q8|q4``: the same keys and values (needles included) quantized into kernels_cpu.kv_quant
records, every chunk closed (the cache's open chunk of floats is not modelled: its rows are the window's
last ones). MagicPIG then hashes the dequantized keys and gathers record rows (shared gather only), the
exact step is the quantized kernel (kernels_cpu.attention_q) over the same records, and the bf16 exact
kernel and MagicPIG over the bf16 pools (its own tables) are timed beside them: the table gives the ratios
to each. The error is against exact attention over the
bf16 keys (the quantization's error included); the quantized exact kernel's own is printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

from kernels_cpu import hugepages
from kernels_cpu import magicpig as mp
from kernels_cpu import matvec
from kernels_cpu.kv_quant import KVQuant
from tools.bench_moe import cpu_model

NH, NKV, D, C = 32, 8, 128, 256
SINKS, WINDOW = 4, 64


def parse_tokens(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def make_kv(n: int, keys: str, g: torch.Generator, huge: bool = True):
    """(kpool, vpool [P, NKV, C, D] bf16, slots [P] int32 shuffled, cluster centres or empty); ``huge``:
    the pools advised to huge pages before they are filled, as the cache's are with MagicPIG."""
    P = -(-n // C)
    slots = torch.randperm(P, generator=g).to(torch.int32)
    kpool, vpool = (torch.empty(P, NKV, C, D, dtype=torch.bfloat16) for _ in range(2))
    for pool in (kpool, vpool) if huge else ():
        hugepages.advise(pool)
    vpool.copy_(torch.randn(P, NKV, C, D, generator=g))
    if keys == "random":
        kpool.copy_(torch.randn(P, NKV, C, D, generator=g))
        return kpool, vpool, slots, torch.empty(0)
    centres = torch.randn(NKV, 64, D, generator=g)
    offset = 3.0 * torch.randn(NKV, 1, D, generator=g)
    runs = torch.randint(0, 64, (NKV, -(-P * C // 32)), generator=g).repeat_interleave(32, dim=1)[:, :P * C]
    k = (offset + torch.gather(centres, 1, runs[..., None].expand(-1, -1, D))
         + 0.5 * torch.randn(NKV, P * C, D, generator=g))
    # token t lives at pool slot slots[t // C], row t % C
    kpool[slots.long()] = k.view(NKV, P, C, D).transpose(0, 1).to(torch.bfloat16)
    return kpool, vpool, slots, centres


def make_queries(n: int, centres: torch.Tensor, kpool, slots, g: torch.Generator, beta: float) -> torch.Tensor:
    if centres.numel() == 0:
        return torch.randn(NH, D, generator=g)
    G = NH // NKV
    pick = torch.randint(0, 64, (NH,), generator=g)
    q = beta * centres.repeat_interleave(G, 0)[torch.arange(NH), pick] + 0.3 * torch.randn(NH, D, generator=g)
    # a few needles: keys (outside the exact window) rewritten to align with their head's query
    for h in range(0, NH, G):
        for t in torch.randint(SINKS, n - WINDOW, (4,), generator=g).tolist():
            kpool[int(slots[t // C]), h // G, t % C] = (2.5 * q[h] + kpool[int(slots[t // C]), h // G, t % C].float()
                                                         ).to(torch.bfloat16)
    return q


def exact_step(attn, q, kpool, vpool, slots, n):
    return attn.attend(q[None], kpool, vpool, slots, n, q_index=torch.tensor([n - 1]))


def magicpig_step(attn, q, kpool, vpool, slots, n, index, nsampled=None, shared=True):
    if shared:  # the sinks and the window in the kernel's own softmax, as the cache runs it
        return mp.attend_sampled(q, kpool, vpool, slots, index, nsampled=nsampled,
                                 exact=[(0, SINKS), (n - WINDOW, n)])
    o1, l1 = attn.attend(q[None], kpool, vpool, slots[:1], SINKS, q_index=torch.tensor([n - 1]))
    first = (n - WINDOW) // C  # the window's region starts at a chunk boundary; the kernel reads the window only
    o2, l2 = attn.attend(q[None], kpool, vpool, slots[first:], n - first * C, q_index=torch.tensor([n - 1]),
                         k_base=first * C, window=WINDOW)
    o3, l3 = mp.attend_sampled(q, kpool, vpool, slots, index, nsampled=nsampled, shared=shared)
    o, lse = attn.merge(o1[0], l1[0], o2[0], l2[0])
    return attn.merge(o, lse, o3, l3)


def make_records(kpool, vpool, fmt: KVQuant, huge: bool):
    """The bf16 pools as quantized records (K, V [P, NKV, C, w] uint8), slot for slot."""
    kr, vr = (torch.empty(kpool.shape[0], *fmt.record_shape(NKV), dtype=torch.uint8) for _ in range(2))
    for pool in (kr, vr) if huge else ():
        hugepages.advise(pool)
    for p in range(kpool.shape[0]):
        fmt.quantize(kpool[p], vpool[p], kr[p], vr[p])
    return kr, vr


def rel_err(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((o - ref).norm(dim=-1) / ref.norm(dim=-1)).mean())


def effective_keys(q: torch.Tensor, kpool, slots, n: int) -> float:
    """Median over heads of exp(entropy) of the exact attention weights: how many keys attention
    is spread over (flat: ~n)."""
    G = NH // NKV
    k = kpool[slots.long()].transpose(0, 1).reshape(NKV, -1, D)[:, :n]
    lg = torch.einsum("gjd,gnd->gjn", q.view(NKV, G, D), k.float()) / math.sqrt(D)
    p = torch.softmax(lg, -1)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).median())


def union_share(index, q) -> float:
    """Rows one gather per KV head reads (the union of its query heads' sampled sets) over the rows
    per-head gathers read (the sum of the sets)."""
    sets = index.retrieve(q)
    G = NH // NKV
    union = sum(len(np.unique(np.concatenate(sets[a * G:a * G + G]))) for a in range(NKV))
    return union / max(1, sum(len(s) for s in sets))


def run_case(attn, n: int, keys: str, K: int, L: int, repeats: int, queries: int, seed: int, beta: float,
             gathers: list[str], huge: bool, fmt: KVQuant | None = None) -> dict:
    g = torch.Generator().manual_seed(seed + n)
    kpool, vpool, slots, centres = make_kv(n, keys, g, huge)
    qs = [make_queries(n, centres, kpool, slots, g, beta) for _ in range(queries)]
    eff = statistics.mean(effective_keys(q, kpool, slots, n) for q in qs)
    kq, vq = (kpool, vpool) if fmt is None else make_records(kpool, vpool, fmt, huge)  # what MagicPIG reads
    index = mp.LSHIndex(NKV, D, K=K, L=L, seed=seed, quant=fmt)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    index.build(kq, slots, SINKS, n - WINDOW)
    build_s = time.perf_counter() - t0
    index_f = None
    if fmt is not None:  # MagicPIG over the bf16 pools beside it: the same step's rows at two widths
        index_f = mp.LSHIndex(NKV, D, K=K, L=L, seed=seed)
        index_f.build(kpool, slots, SINKS, n - WINDOW)
    if fmt is None:
        def exact(q):
            return exact_step(attn, q, kpool, vpool, slots, n)
    else:
        from kernels_cpu import attention_q

        snp = slots.numpy()

        def exact(q):  # the quantized kernel over the same records, every chunk closed
            return attention_q.attend(q[None], kq, vq, snp, n // C, fmt)
    errs, frac, exact_q_err = {w: [] for w in gathers}, [], []
    ns = np.zeros(NH, dtype=np.int64)
    with matvec.decode_scope():
        for q in qs:
            ref, _ = exact_step(attn, q, kpool, vpool, slots, n)
            if fmt is not None:
                exact_q_err.append(rel_err(exact(q)[0][0], ref[0]))
            for w in gathers:
                o, _ = magicpig_step(attn, q, kq, vq, slots, n, index, ns, shared=w == "shared")
                errs[w].append(rel_err(o, ref[0]))
            frac.append(float(ns.mean()) / index.n_tokens)
        te, tb, tf, tm = [], [], [], {w: [] for w in gathers}
        for _ in range(repeats):  # interleaved: all see the same machine
            t0 = time.perf_counter()
            exact(qs[0])
            te.append(time.perf_counter() - t0)
            if fmt is not None:  # the bf16 exact kernel beside the quantized one
                t0 = time.perf_counter()
                exact_step(attn, qs[0], kpool, vpool, slots, n)
                tb.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                magicpig_step(attn, qs[0], kpool, vpool, slots, n, index_f)
                tf.append(time.perf_counter() - t0)
            for w in gathers:
                t0 = time.perf_counter()
                magicpig_step(attn, qs[0], kq, vq, slots, n, index, shared=w == "shared")
                tm[w].append(time.perf_counter() - t0)
    # shared machines: the best of each and the median of back-to-back ratios are what survive
    # other processes; medians of the times are kept in the JSON
    per = {w: dict(magicpig_us=min(tm[w]) * 1e6, magicpig_median_us=statistics.median(tm[w]) * 1e6,
                   speedup=statistics.median(e / m for e, m in zip(te, tm[w])), rel_err=statistics.mean(errs[w]),
                   speedup_vs_bf16=statistics.median(b / m for b, m in zip(tb, tm[w])) if tb else None,
                   speedup_vs_bf16_magicpig=statistics.median(f / m for f, m in zip(tf, tm[w])) if tf else None)
           for w in gathers}
    return dict(keys=keys, tokens=n, K=K, L=L, huge_pages=huge, kv_dtype=fmt.name if fmt else "bf16",
                exact_us=min(te) * 1e6, exact_median_us=statistics.median(te) * 1e6,
                exact_bf16_us=min(tb) * 1e6 if tb else None, magicpig_bf16_us=min(tf) * 1e6 if tf else None,
                exact_rel_err=statistics.mean(exact_q_err) if exact_q_err else 0.0, gathers=per,
                union_share=union_share(index, qs[0]), effective_keys=eff, sampled_frac=statistics.mean(frac),
                build_us_per_token=build_s / index.n_tokens * 1e6, table_bytes_per_token=index.nbytes / index.n_tokens,
                kv_bytes_per_token=2 * NKV * (D * 2 if fmt is None else fmt.row_bytes()))


def a2(argv) -> int:
    ap = argparse.ArgumentParser(prog="bench_magicpig a2", description="MagicPIG vs exact decode attention (A2)")
    ap.add_argument("--lengths", default="8k,16k,64k,128k", help="context lengths (tokens; 'k' = 1024)")
    ap.add_argument("--keys", default="clustered,random")
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--L", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--queries", type=int, default=4, help="query draws averaged for the error")
    ap.add_argument("--beta", type=float, default=0.8, help="clustered: how strongly a query leans to its cluster")
    ap.add_argument("--gather", default="per-head,shared",
                    help="MagicPIG kernels timed side by side: per-head (a gather per query head, the old path), "
                         "shared (one per KV head's query group)")
    ap.add_argument("--no-huge-pages", action="store_true", help="leave the pools on 4 KiB pages (the old path)")
    ap.add_argument("--kv-dtype", default="bf16", choices=("bf16", "q8", "q4"),
                    help="q8/q4: MagicPIG and the exact kernel over quantized records (shared gather only), "
                         "the bf16 exact kernel timed beside them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", help="also write the rows here")
    a = ap.parse_args(argv)
    gathers = a.gather.split(",")
    if not gathers or any(w not in ("per-head", "shared") for w in gathers):
        print(f"bench_magicpig: --gather takes per-head and/or shared, not {a.gather!r}", file=sys.stderr)
        return 2
    fmt = None if a.kv_dtype == "bf16" else KVQuant(a.kv_dtype, D, C)
    lengths = [parse_tokens(s) for s in a.lengths.split(",")]
    if fmt is not None and ("per-head" in gathers or any(n % C for n in lengths)):
        print(f"bench_magicpig: --kv-dtype {a.kv_dtype} runs the shared gather (--gather shared) over whole "
              f"chunks (lengths multiples of {C})", file=sys.stderr)
        return 2
    from kernels_cpu import attention as attn
    matvec.set_threads(a.threads)
    attn.warm_up()
    mp.warm_up(records=fmt is not None)
    if fmt is not None:
        from kernels_cpu import attention_q

        attention_q.warm_up()
    rows = []
    print(f"A2: one layer's decode step, {NH} query / {NKV} KV heads, d {D}, {a.kv_dtype} KV, C {C}, K {a.K}, L {a.L}, "
          f"{a.threads} threads; exact part {SINKS} sinks + {WINDOW} window; best of {a.repeats}, speed-up: median "
          f"of back-to-back ratios; pools on {'4 KiB' if a.no_huge_pages else 'huge'} pages; "
          f"CPU {cpu_model()}, load {os.getloadavg()[0]:.2f}\n")
    cols = "".join(f" {w} µs (best) | {w} speed-up | {w} rel. error |" for w in gathers)
    qcols = ("", "") if fmt is None else (f" exact bf16 µs | exact {fmt.name} rel. error |",
                                           " shared speed-up vs exact bf16 | MagicPIG bf16 µs | shared speed-up "
                                           "vs MagicPIG bf16 |")
    print(f"| keys | tokens | exact{'' if fmt is None else ' ' + fmt.name} µs (best) |{qcols[0]}{cols}{qcols[1]} "
          "effective keys | keys attended | rows read shared | build µs/token | table B/token (KV B/token) |")
    quant_cells = 5 if fmt is not None else 0
    print("|---|---|---|" + "---|" * quant_cells + "---|---|---|" * len(gathers) + "---|---|---|---|---|")
    for keys in a.keys.split(","):
        for n in lengths:
            r = run_case(attn, n, keys, a.K, a.L, a.repeats, a.queries, a.seed, a.beta, gathers, not a.no_huge_pages,
                         fmt)
            rows.append(r)
            cells = "".join(f" {p['magicpig_us']:.0f} | {p['speedup']:.2f}x | {p['rel_err']:.3f} |"
                            for p in r["gathers"].values())
            if fmt is not None:
                cells = (f" {r['exact_bf16_us']:.0f} | {r['exact_rel_err']:.4f} |{cells}"
                         f" {r['gathers']['shared']['speedup_vs_bf16']:.2f}x | {r['magicpig_bf16_us']:.0f} |"
                         f" {r['gathers']['shared']['speedup_vs_bf16_magicpig']:.2f}x |")
            print(f"| {keys} | {n} | {r['exact_us']:.0f} |{cells} {r['effective_keys']:.0f} "
                  f"| {100 * r['sampled_frac']:.2f}% | {100 * r['union_share']:.0f}% "
                  f"| {r['build_us_per_token']:.1f} | {r['table_bytes_per_token']:.0f} ({r['kv_bytes_per_token']}) |",
                  flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(dict(command=" ".join(["python -m tools.bench_magicpig a2", *argv]), rows=rows), f, indent=1)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "a2":
        print("usage: python -m tools.bench_magicpig a2 [--lengths 8k,16k,64k,128k] [--keys clustered,random] "
              "[--K 10] [--L 150] [--json PATH]", file=sys.stderr)
        return 2
    return a2(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
