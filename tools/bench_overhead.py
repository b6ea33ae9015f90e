"""Per-token decode overhead outside the mat-vecs: torch ops vs the fused decode paths, same run.

    python -m tools.bench_overhead --threads 2 [--weights f32] [--model M] [--steps 100] [--rounds 5]
                                   [--parts] [--offload-dir D] [--cli]

A decode step is the mat-vecs over the weights plus everything else: RMSNorm, RoPE, the KV write
and attention, residual adds, silu*mul, dtype casts, and the Python between them. To see the
"everything else" alone, the default model's decode runs with its linears replaced by zero rows
(``models.ops.linear`` returns a cached zero tensor for one-row inputs, as /tmp/prof2.py
did), and the step time is measured in two modes, alternating, in one process:

- ``torch``: the fused paths off (``kernels_cpu.rowops.usable`` answers False, so the model runs its
  torch expressions; ``TieredKV`` takes its general attend path) — the code before the fast paths;
- ``fused``: as shipped (``kernels_cpu.rowops``, ``kernels_cpu.attention.attend_decode``);
- with ``--parts`` also ``rowops`` and ``attention``: one of the two fast paths alone.

Each round resets the cache, prefills the prompt and times ``--steps`` decode steps per mode; the
figure is the best round's ms per token (the machine is shared: the minimum is the least disturbed).
Before timing, the real model (linears back) decodes a few greedy tokens in both modes: the logits'
max difference is printed (float rounding only) and the tokens must agree.

``--cli`` also runs the end-to-end decode, ``python -m offload_rt --raw --prompt ... -n 64
--ignore-eos --stats --weights <w> --threads <t>``, and prints decode tok/s from its ``--stats`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

import torch

PROMPT = "Hello, my name is"


@contextlib.contextmanager
def linears_zeroed():
    """One-row linears return zeros (cached per output width): only the work around them remains."""
    from offload_rt.models import ops

    real, zeros = ops.linear, {}

    def fake(x, w, b=None):
        if x.shape[0] != 1:
            return real(x, w, b)
        n = w.shape[0]
        if (n, x.dtype) not in zeros:
            zeros[n, x.dtype] = torch.zeros(1, n, dtype=x.dtype)
        return zeros[n, x.dtype]

    ops.linear = fake
    try:
        yield
    finally:
        ops.linear = real


MODES = {"torch": (False, False), "rowops": (True, False), "attention": (False, True), "fused": (True, True)}


@contextlib.contextmanager
def mode(name: str):
    """Which fast paths are on (MODES: rowops kernels, TieredKV's decode attention); ``torch`` is neither."""
    from kernels_cpu import rowops
    from offload_rt.kv.tiered import TieredKV

    use_rowops, use_attention = MODES[name]
    usable, decode = rowops.usable, TieredKV._attend_decode
    if not use_rowops:
        rowops.usable = lambda *a: False
    if not use_attention:
        TieredKV._attend_decode = lambda self, *a: None
    try:
        yield
    finally:
        rowops.usable, TieredKV._attend_decode = usable, decode


def decode(engine, ids: list[int], steps: int, token: int | None = None) -> tuple[float, list, list[int]]:
    """Prefill ``ids``, then ``steps`` decode steps (greedy, or always ``token``): (seconds per step,
    logits of each step, tokens fed)."""
    engine.reset()
    logits = engine.prefill(ids)
    out, fed = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = token if token is not None else int(logits.argmax())
        fed.append(nxt)
        logits = engine.forward([nxt])
        out.append(logits)
    return (time.perf_counter() - t0) / steps, out, fed


def check_same(engine, ids: list[int], steps: int = 8) -> tuple[float, bool]:
    """(max |logits fused - logits torch| over greedy steps, same tokens)."""
    with mode("torch"):
        _, ref, ref_ids = decode(engine, ids, steps)
    with mode("fused"):
        _, got, got_ids = decode(engine, ids, steps)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    return diff, ref_ids == got_ids


def cli_decode(model: str | None, weights: str, threads: int, n: int, offload_dir: str | None) -> float:
    """decode tok/s of the CLI (its --stats line on stderr)."""
    cmd = [sys.executable, "-m", "offload_rt", *([model] if model else []), "--raw", "--prompt", PROMPT, "-n", str(n), "--ignore-eos",
           "--stats", "--weights", weights, "--threads", str(threads)]
    if offload_dir:
        cmd += ["--offload-dir", offload_dir]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rec = next(json.loads(line) for line in reversed(res.stderr.splitlines()) if line.startswith("{"))
    return float(rec["decode_tok_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="f32", help="stored weight format of the default model (--weights)")
    ap.add_argument("--steps", type=int, default=100, help="decode steps per round and mode")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parts", action="store_true", help="also each fast path alone (rowops, attention)")
    ap.add_argument("--offload-dir", default=None, help="where the weight stores live (the CLI's --offload-dir)")
    ap.add_argument("--cli", action="store_true", help="also the CLI's end-to-end decode tok/s (-n 64)")
    a = ap.parse_args(argv)

    from kernels_cpu import attention, matvec, rowops
    from offload_rt.config import RunConfig
    from offload_rt.loader import load_model

    matvec.set_threads(a.threads)  # first: Numba's pool start resets torch's thread count
    torch.set_num_threads(a.threads)
    with torch.inference_mode():
        model = load_model(RunConfig(model=a.model, weights=a.weights, threads=a.threads, progress=False,
                                         offload_dir=a.offload_dir))
        matvec.warm_up()
        attention.warm_up()
        rowops.warm_up()
        engine = model.engine
        ids = model.tokenizer.encode(PROMPT)
        diff, same = check_same(engine, ids)
        print(f"{a.model or 'default model'}, --weights {a.weights} (compute {model.dtype}), {a.threads} threads; "
              f"greedy check: max |logits fused - torch| = {diff:.2e}, same tokens: {same}")
        best = {name: float("inf") for name in (MODES if a.parts else ("torch", "fused"))}
        with linears_zeroed():
            for name in best:  # warm both paths once
                with mode(name):
                    decode(engine, ids, 5, token=42)
            for _ in range(a.rounds):
                for name in best:
                    with mode(name):
                        best[name] = min(best[name], decode(engine, ids, a.steps, token=42)[0])
    print(f"overhead outside the mat-vecs (linears zeroed), ms per token, best of {a.rounds} x {a.steps} steps "
          f"after a {len(ids)}-token prompt:")
    print("| " + " | ".join(best) + " | torch / fused |\n" + "|---" * (len(best) + 1) + "|")
    print("| " + " | ".join(f"{t * 1e3:.2f}" for t in best.values()) + f" | {best['torch'] / best['fused']:.2f}x |")
    if a.cli:
        print(f"CLI decode, 64 tokens: {cli_decode(a.model, a.weights, a.threads, 64, a.offload_dir):.1f} tok/s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
