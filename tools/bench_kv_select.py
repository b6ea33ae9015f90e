"""What selective disk reads cost in quality (issue 22): the default model with the KV split as ``--kv-cpu-mem``
splits it, decode attention exact (every disk chunk) against ``select`` at several ``--kv-select-share``.

    python -m tools.bench_kv_select [--shares 0.25,0.125,0.0625] [--passkeys 5] [--kv-cpu-mem 64M]

Two measures, each from one prefill shared by every mode (only decode attention differs):

* teacher-forced next-token loss over ``--score`` tokens of natural text after ``--tokens`` of it (the
  repository's own docs by default): mean negative log-likelihood per token, and how often the top-1
  token equals exact attention's. The text is fed one token per step, so every step is a decode step
  that selects.
* passkey retrieval (tests/passkey_prompts.py, ~``--tokens`` tokens, stratified depths): found by exact,
  found by each share, and for how many greedy tokens each share's answer equals exact's.

Each prompt's KV is prefilled into a cache in RAM and loaded into the split cache (``load``, as the prefix
cache restores one: the chunks past the RAM budget are written to disk with their key bounds). The
machine's load does not matter here: nothing is timed but the whole run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from offload_rt.threads import configure_process

configure_process()  # idle OpenMP workers wait as in a run (set before torch / numba load libgomp)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from offload_rt.config import RunConfig, parse_size  # noqa: E402
from offload_rt.kv.tiered import TieredKV  # noqa: E402
from offload_rt.loader import load_model  # noqa: E402
from offload_rt.memory.kv_plan import CHUNK_TOKENS, KVShape, split_kv  # noqa: E402
from tests.passkey_prompts import answers, make_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXT = ("docs/BENCHMARKS.md", "docs/ARCHITECTURE.md", "docs/QUANT_FORMATS.md", "README.md")
CTX = 8192


def spilled(model, ids: list[int], kv_cpu_mem: int, root: Path) -> TieredKV:
    """``ids`` prefilled in RAM, then loaded into a cache split as ``--kv-cpu-mem`` splits the window; the engine
    is left on the split cache, holding ``ids``."""
    a, engine = model.args, model.engine
    shape = (a.num_hidden_layers, a.num_key_value_heads, a.head_dim, model.dtype, CTX)
    ram = TieredKV(*shape, host_chunks=a.num_hidden_layers * -(-CTX // CHUNK_TOKENS))
    engine.cache, engine.tokens = ram, []
    with torch.inference_mode():
        engine.prefill(ids)
    split = split_kv(KVShape(*shape[:3], model.dtype.itemsize), CTX, kv_cpu_mem=kv_cpu_mem, disk_free=1 << 40,
                     model_tokens=CTX)
    cache = TieredKV(*shape, host_chunks=split.host_chunks, staging_chunks=split.staging_chunks, disk_root=root)
    cache.load(*zip(*(ram.rows(layer, 0, ram.offset) for layer in range(a.num_hidden_layers))))
    ram.close()
    engine.cache = cache
    return cache


def modes(shares: list[float]) -> list[tuple[str, float]]:
    return [("exact", 1.0)] + [("select", s) for s in shares]


def next_token_loss(model, ids: list[int], n_score: int, shares: list[float], kv_cpu_mem: int, root: Path) -> dict:
    """Mean NLL of ``ids[-n_score:]`` fed one token per decode step, and top-1 agreement with exact, per mode."""
    engine, prefix = model.engine, ids[:-n_score]
    cache = spilled(model, prefix[:-1], kv_cpu_mem, root)
    with torch.inference_mode():
        first = engine.forward(prefix[-1:])
        out = {}
        for mode, share in modes(shares):
            cache.attention, cache.select_share = mode, share
            logits, nll, top = first, [], []
            for t in ids[-n_score:]:
                lp = torch.log_softmax(logits.float().view(-1), -1)
                nll.append(-float(lp[t]))
                top.append(int(torch.argmax(lp)))
                logits = engine.forward([t])
            cache.trim(n_score)
            del engine.tokens[len(prefix):]
            out[(mode, share)] = (float(np.mean(nll)), top)
    cache.close()
    ref = out[("exact", 1.0)][1]
    return {k: {"nll": nll, "top1_agreement": float(np.mean([a == b for a, b in zip(top, ref)]))}
            for k, (nll, top) in out.items()}


def passkeys(model, n: int, tokens: int, n_new: int, shares: list[float], kv_cpu_mem: int, root: Path,
             seed: int) -> list[dict]:
    rows = []
    for p in make_prompts(model.tokenizer, n, tokens, seed=seed):
        cache = spilled(model, p.ids, kv_cpu_mem, root)
        got = {}
        for mode, share in modes(shares):
            cache.select_share = share
            got[(mode, share)] = answers(model.engine, p.ids, (mode,), n_new=n_new)[mode]
        cache.close()
        ref = got[("exact", 1.0)]
        rows.append({"key": p.key, "depth": p.depth, "modes": {
            k: {"found": str(p.key) in model.tokenizer.decode(t),
                "same_tokens": next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), len(t))}
            for k, t in got.items()}})
    return rows


def _name(key: tuple[str, float]) -> str:
    return "exact" if key[0] == "exact" else f"select {key[1]:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_kv_select", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shares", default="0.25,0.125,0.0625", help="--kv-select-share values to compare")
    ap.add_argument("--kv-cpu-mem", default="64M")
    ap.add_argument("--tokens", type=int, default=6000, help="context before the scored tokens / passkey prompt")
    ap.add_argument("--score", type=int, default=200, help="tokens of text scored one decode step each")
    ap.add_argument("--text", nargs="*", default=list(TEXT), help="text files (repository paths), concatenated")
    ap.add_argument("--passkeys", type=int, default=5, help="passkey prompts (0: none)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("-n", type=int, default=24, help="greedy tokens per passkey answer")
    ap.add_argument("--offload-dir", type=Path, default=None, help="stores (default: the CLI's)")
    a = ap.parse_args(argv)
    shares = [float(s) for s in a.shares.split(",") if s]
    kv_cpu_mem = parse_size(a.kv_cpu_mem, option="--kv-cpu-mem")
    t0 = time.perf_counter()
    model = load_model(RunConfig(offload_dir=a.offload_dir, progress=False, ctx_size=CTX))
    text = "".join((REPO / f).read_text(encoding="utf-8") for f in a.text)
    ids = model.tokenizer.encode(text)[:a.tokens + a.score]
    with tempfile.TemporaryDirectory(prefix="bench_kv_select-") as tmp:
        loss = next_token_loss(model, ids, a.score, shares, kv_cpu_mem, Path(tmp))
        keys = passkeys(model, a.passkeys, a.tokens, a.n, shares, kv_cpu_mem, Path(tmp), a.seed)
    print(f"next-token loss over {a.score} tokens after {len(ids) - a.score} ({', '.join(a.text)}), "
          f"--kv-cpu-mem {a.kv_cpu_mem}:")
    print("| attention | mean NLL (nats) | top-1 = exact's |\n|---|---|---|")
    for k, r in loss.items():
        print(f"| {_name(k)} | {r['nll']:.3f} | {100 * r['top1_agreement']:.1f} % |")
    if keys:
        print(f"\npasskeys ({len(keys)} prompts of ~{a.tokens} tokens, seed {a.seed}), found / greedy tokens equal "
              f"to exact's (of {a.n}):")
        cols = list(keys[0]["modes"])
        print("| key | depth | " + " | ".join(_name(k) for k in cols) + " |\n|---|---|" + "---|" * len(cols))
        for r in keys:
            cells = [f"{'yes' if m['found'] else 'no'} / {m['same_tokens']}" for m in r["modes"].values()]
            print(f"| {r['key']} | {r['depth']:.2f} | " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
