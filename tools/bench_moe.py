"""Mixture-of-Experts decode against llama.cpp (issue 19, "Speed": M0 and M1), both in the same run.

    python -m tools.bench_moe [--work /work/bench] [--tokens 64] [--repeats 3] [--cap 1500M] [--timeout 300]
                              [--modes m0,m1] [--sides ours,llama] [--out docs/BENCHMARKS.md]

The model: a synthetic Qwen3-30B-A3B-shaped checkpoint with 8 layers (tools/make_checkpoint.py
``--preset qwen3-30b-a3b-8l``: hidden 2048, 32 query / 4 KV heads of 128, 128 experts of width
768, 8 routed per token; ~10 GB bf16) and its Q4_0 GGUF (tools/make_gguf.py: llama.cpp's own
converter and ``llama_model_quantize``, ~2.95 GB); both are made under ``--work`` on first use.

- M0, resident, ``--threads`` threads, greedy, ``--tokens`` new tokens, best of ``--repeats``:
  offload_rt ``--weights int4`` on the HF checkpoint, offload_rt on the Q4_0 GGUF read natively
  (``--weights auto``), both with ``--cpu-mem`` ``--m0-cpu-mem``; llama.cpp (llama-cpp-python in
  ``--llama-python``, mmap) on the same GGUF (and with ``--llama-passive`` again with
  ``OMP_WAIT_POLICY=PASSIVE``: OpenMP's spinning barriers make 2-thread llama.cpp ~10x slower when
  other processes share the cores; ratios are against the best llama.cpp row). Decode tok/s, ratios against llama.cpp, and the
  memory-bandwidth limit: RAM read rate (torch sums over 1 GiB, 2 threads, in a child) ÷ the bytes
  one token reads from the GGUF (every tensor but the embedding, the expert tensors × k/E; counted
  with llama.cpp's gguf-py).
- M1, the model ~2x the memory: the same three under ``memcap CAP --cold`` (offload_rt with
  ``--cpu-mem auto``), each bounded by ``--timeout`` seconds (llama.cpp's thrashing or its OOM kill
  is the result, and it is not repeated after it failed once). The disk-bound limit: disk read
  rate ÷ the expert bytes a token must read from disk. The read rate is measured right after the M1
  runs on the GGUF file with O_DIRECT, page cache dropped first: sequential 8 MiB pieces on 8
  threads, and expert-sized reads (one Q4_0 expert's gate+up+down) at random offsets, k at a time
  as one layer's misses. The bytes per token: offload_rt's ``moe.expert_disk_read_bytes`` (or its
  decode disk reads) ÷ decode steps; beside it the no-cache bound (all k × layers experts read
  every token) and, from the cache's slots per layer S, the miss bytes that uniform routing implies
  (hit rate S/E: the routers of random weights have no locality, so LRU/prediction gain nothing
  beyond that here).

offload_rt runs as ``python -m offload_rt MODEL --raw -n N --ignore-eos --stats --threads T
--cpu-mem M --offload-dir WORK/stores --prompt P --ctx-size C --weights W`` (its ``--stats`` JSON
on stderr: ``decode_tok_s`` and, once the MoE runtime exists, the ``moe`` dict, read with
``.get``). A run that fails is a result ("failed: <its last stderr line>"), not an error. Each
offload_rt store is converted and its kernels compiled by an untimed, uncapped warm-up run first.

This process never imports torch (a parent sharing its pages with a capped child would make the
child's charged memory look smaller than a user's run).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools import bench_quant as bq
from tools.bench_decode import MEMCAP, PROMPT, publish
from tools.machine import cpu_model
from tools.make_gguf import DEFAULT_LLAMA_PYTHON, find_llama_src, make_gguf

PRESET = "qwen3-30b-a3b-8l"
ALIGN = 4096

# Run with argv[1] = the GGUF, argv[2] = llama.cpp's gguf-py directory: the expert
# counts from the metadata and every tensor's (name, bytes, ggml type, shape), as one JSON line.
GGUF_TENSORS_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
def field(suffix):
    for k, f in r.fields.items():
        if k.endswith(suffix):
            return int(f.parts[f.data[0]][0])
print(json.dumps({"experts": field(".expert_count"), "used": field(".expert_used_count"),
                  "layers": field(".block_count"),
                  "tensors": [[t.name, int(t.n_bytes), t.tensor_type.name, [int(x) for x in t.shape]]
                              for t in r.tensors]}))
"""


# ---------------------------------------------------------------- inputs

def ensure_inputs(work: Path, llama_python: str) -> tuple[Path, Path]:
    """(HF checkpoint, Q4_0 GGUF) under ``work``, made on first use."""
    hf, gguf = work / "qwen3moe-8l", work / "qwen3moe-8l-Q4_0.gguf"
    if not (hf / "config.json").is_file():
        p = subprocess.run([sys.executable, "-m", "tools.make_checkpoint", str(hf), "--preset", PRESET,
                            "--dtype", "bfloat16", "--fast"], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
    if not gguf.is_file():
        # the converter runs in the project's interpreter (torch, transformers, sentencepiece, pyyaml)
        make_gguf(hf, gguf, qtype="Q4_0", llama_python=llama_python, work=work, convert_python=sys.executable)
    return hf, gguf


def gguf_traffic(llama_python: str, gguf: Path, work: Path) -> dict:
    """What one decoded token reads from ``gguf``: {"token_bytes", "expert_unit_bytes", "experts", "used",
    "layers", "active_expert_bytes"}; expert tensors (``*_exps``) count k/E of their bytes, the
    embedding one row."""
    src = find_llama_src(llama_python, work)
    # the project's interpreter: gguf-py needs numpy and pyyaml, which it has (llama-cpp-python needs no yaml)
    p = subprocess.run([sys.executable, "-c", GGUF_TENSORS_SCRIPT, str(gguf), str(src / "gguf-py")],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"reading {gguf} with gguf-py failed:\n{p.stderr[-1500:]}")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    return traffic_of(info)


def traffic_of(info: dict) -> dict:
    """Bytes per token from a GGUF tensor listing (see :data:`GGUF_TENSORS_SCRIPT`); pure arithmetic."""
    e, k, layers = info["experts"], info["used"], info["layers"]
    exps = sum(n for name, n, _t, _s in info["tensors"] if "_exps" in name)
    embd = next(((n, s) for name, n, _t, s in info["tensors"] if name == "token_embd.weight"), (0, [1, 1]))
    rest = sum(n for name, n, _t, _s in info["tensors"] if "_exps" not in name and name != "token_embd.weight")
    unit = exps / (layers * e)
    return {"experts": e, "used": k, "layers": layers, "expert_unit_bytes": unit,
            "active_expert_bytes": unit * k * layers,
            "token_bytes": rest + exps * k / e + embd[0] / embd[1][-1]}


# ---------------------------------------------------------------- bandwidths

def mem_bandwidth(threads: int) -> float:
    """RAM read rate in bytes/s (tools.bench_decode.mem_bandwidth, in a child: it imports torch)."""
    p = subprocess.run([sys.executable, "-c", "import sys; from tools.bench_decode import mem_bandwidth as f; "
                        "print(f(int(sys.argv[1])))", str(threads)], capture_output=True, text=True)
    return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else 0.0


def _read_all(fd: int, jobs: list[tuple[int, int]], bufs: list[mmap.mmap], threads: int) -> int:
    """O_DIRECT reads of (offset, length) ``jobs`` on ``threads`` threads, worker i into ``bufs[i]``."""
    def worker(i: int) -> int:
        mv, got = memoryview(bufs[i]), 0
        for off, n in jobs[i::threads]:
            got += os.preadv(fd, [mv[:n]], off)
        return got

    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(worker, range(threads)))


def disk_rates(path: Path, *, unit: int, batch: int, batches: int = 64, rounds: int = 2,
               threads: int = 8, piece: int = 8 << 20, drop: bool = True) -> dict[str, list[float]]:
    """{way: [bytes/s per pass]}: O_DIRECT reads of ``path``, page cache dropped before each pass (``drop``).

    "sequential": the whole file in ``piece`` pieces on ``threads`` threads. "expert-sized random":
    ``batches`` rounds of ``batch`` parallel reads of ``unit`` bytes (rounded up to 4 KiB) at random
    aligned offsets (a different draw each pass), as a layer's cache misses are read.
    """
    size = path.stat().st_size
    unit = -(-int(unit) // ALIGN) * ALIGN
    seq = [(off, piece) for off in range(0, size, piece)]
    bufs = [mmap.mmap(-1, max(piece, unit)) for _ in range(max(threads, batch))]  # page-aligned
    out: dict[str, list[float]] = {"sequential 8 MiB x 8 threads": [], f"expert-sized random ({batch} at a time)": []}
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        for r in range(rounds):
            if drop:
                bq.drop_caches()
            t0 = time.perf_counter()
            got = _read_all(fd, seq, bufs, threads)
            if got != size:
                raise RuntimeError(f"read {got} of {size} bytes of {path}")
            out["sequential 8 MiB x 8 threads"].append(got / (time.perf_counter() - t0))
            rng = random.Random(r)
            if drop:
                bq.drop_caches()
            t0, got = time.perf_counter(), 0
            for _ in range(batches):
                jobs = [(rng.randrange(0, (size - unit) // ALIGN) * ALIGN, unit) for _ in range(batch)]
                got += _read_all(fd, jobs, bufs, batch)
            out[f"expert-sized random ({batch} at a time)"].append(got / (time.perf_counter() - t0))
    finally:
        os.close(fd)
        for b in bufs:
            b.close()
    return out


# ---------------------------------------------------------------- runs

def why(r: bq.Run) -> str:
    """A failed run in one cell: "failed: <its last stderr line>", "killed (OOM)", "timeout (...)"."""
    if r.ok:
        return "ok"
    if r.status.startswith("failed"):
        lines = [ln.strip() for ln in r.tail.splitlines() if ln.strip() and not ln.startswith("memcap:")]
        return f"failed: {lines[-1][:200] if lines else r.status}"
    return r.status


def ours(a, model: Path, weights: str, *, cap: str | None = None, tokens: int | None = None,
         cpu_mem: str | None = None, timeout: float | None = None) -> bq.Run:
    return bq.ours(model, weights, store_dir=Path(a.work) / "stores", tokens=tokens or a.tokens,
                   threads=a.threads, cpu_mem=cpu_mem or (a.m1_cpu_mem if cap else a.m0_cpu_mem), cap=cap,
                   ctx=a.ctx, timeout=timeout or (a.timeout if cap else 3600))


def llama(a, gguf: Path, *, cap: str | None = None, env: dict | None = None) -> bq.Run:
    """llama.cpp decoding ``a.tokens`` tokens of ``gguf`` (tools.bench_quant.LLAMA_SCRIPT), ``env`` added."""
    args = {"model": str(gguf), "mode": "decode", "new_tokens": a.tokens, "threads": a.threads, "n_ctx": a.ctx,
            "n_batch": 512, "prompt": PROMPT, "prompt_file": None}
    return bq.run_process([a.llama_python, "-c", bq.LLAMA_SCRIPT, json.dumps(args)], cap=cap, json_on="stdout",
                          timeout=a.timeout if cap else 3600, env=env)


def moe(r: bq.Run | None) -> dict:
    return (r.rec.get("moe") or {}) if r is not None and r.ok else {}


def miss_bytes_per_token(r: bq.Run) -> tuple[float, str]:
    """(expert bytes read from disk per decode step, where the figure came from); 0 when unknown."""
    m, steps = moe(r), max(1, int(r.get("new_tokens", 0)) - 1)
    for key in ("expert_disk_read_bytes_decode", "expert_disk_read_bytes"):
        if m.get(key):
            return float(m[key]) / steps, f"moe.{key}"
    if r.get("disk_read_bytes_decode", 0):
        return float(r.rec["disk_read_bytes_decode"]) / steps, "disk_read_bytes_decode"
    return 0.0, "—"


def time_split(r: bq.Run | None) -> str:
    """The ``moe`` dict's per-token time split (any ``*_s``/``*_share`` keys), as it reports it."""
    m = moe(r)
    keys = [k for k in m if k.endswith(("_s", "_share", "_ms"))]
    return ", ".join(f"{k} {m[k]}" for k in keys) or "—"


def fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


# ---------------------------------------------------------------- M0 / M1

L_INT4 = "offload_rt `--weights int4` (HF safetensors)"
L_GGUF = "offload_rt Q4_0 GGUF `--weights auto` (native)"
L_LLAMA = "llama.cpp (llama-cpp-python, mmap), same Q4_0 GGUF"
L_LLAMA_PASSIVE = "llama.cpp, same, `OMP_WAIT_POLICY=PASSIVE`"
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def reference(runs: dict[str, list[bq.Run]]) -> bq.Run | None:
    """The best llama.cpp run of any of its rows: the ratios are against it."""
    return bq.best([r for label in (L_LLAMA, L_LLAMA_PASSIVE) for r in runs.get(label, [])], "decode_tok_s")


def cases(a, hf: Path, gguf: Path) -> list[tuple[str, str, Path, str | dict | None]]:
    """(label, side, model, offload_rt's --weights or llama.cpp's added environment) in the order the runs
    alternate. ``--llama-passive`` adds a llama.cpp row with OpenMP's passive wait: its default spinning
    barriers collapse when other processes share the cores (2 threads: ~10x slower on a loaded machine)."""
    out = [(L_INT4, "ours", hf, "int4"), (L_GGUF, "ours", gguf, "auto"), (L_LLAMA, "llama", gguf, None)]
    if a.llama_passive:
        out.append((L_LLAMA_PASSIVE, "llama", gguf, PASSIVE))
    return [c for c in out if c[1] in a.sides]


def run_all(a, hf: Path, gguf: Path, cap: str | None, repeats: int) -> dict[str, list[bq.Run]]:
    runs: dict[str, list[bq.Run]] = {}
    for i in range(repeats):
        for label, side, model, weights in cases(a, hf, gguf):
            prev = runs.get(label, [])
            if cap and prev and not any(r.ok for r in prev):
                continue  # under the cap a failure (OOM kill, thrashing past the timeout) is not repeated
            r = ours(a, model, weights, cap=cap) if side == "ours" else llama(a, gguf, cap=cap, env=weights)
            runs.setdefault(label, []).append(r)
            print(f"  {cap or 'resident'} #{i + 1} {label}: {r.rec.get('decode_tok_s') if r.ok else why(r)}"
                  f" ({r.wall_s:.0f} s)", file=sys.stderr, flush=True)
    return runs


def runs_cell(rs: list[bq.Run]) -> str:
    """Every run's tok/s, or its status (the reason is in the decode cell) and how long it ran."""
    return ", ".join(f"{r.rec['decode_tok_s']:.2f}" if r.ok else f"{r.status} after {r.wall_s:.0f} s" for r in rs)


def m0_table(a, runs: dict[str, list[bq.Run]], traffic: dict, ram_bw: float) -> str:
    ref = reference(runs)
    limit = ram_bw / traffic["token_bytes"] if ram_bw else 0.0
    rows = []
    for label, rs in runs.items():
        b = bq.best(rs, "decode_tok_s")
        tok = b.rec["decode_tok_s"] if b else None
        rows.append(f"| {label} | {fmt(tok) if b else why(rs[0])} | {bq.ratio(b, ref, 'decode_tok_s')} | "
                    f"{runs_cell(rs)} | {fmt(100 * tok / limit, '.0f') + '%' if tok and limit else '—'} | "
                    f"{fmt(moe(b).get('hit_rate'), '.3f') if moe(b).get('hit_rate') is not None else '—'} |")
    head = (f"M0, resident: {a.threads} threads, greedy, {a.tokens} new tokens, best of {a.repeats} [all runs]; "
            f"offload_rt `--cpu-mem {a.m0_cpu_mem} --ctx-size {a.ctx}`, llama.cpp n_ctx {a.ctx}. "
            f"Memory-bandwidth limit: {ram_bw / 1e9:.1f} GB/s RAM read (torch sum over 1 GiB, {a.threads} threads) "
            f"÷ {traffic['token_bytes'] / 1e9:.3f} GB a token reads from the Q4_0 GGUF (all tensors but the "
            f"embedding, the experts {traffic['used']} of {traffic['experts']}: "
            f"{traffic['active_expert_bytes'] / 1e9:.3f} GB of them) = **{fmt(limit, '.1f')} tok/s**.\n\n"
            "| configuration | decode tok/s | vs llama.cpp | runs | % of memory-bandwidth limit | expert hit rate |\n"
            "|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def m1_table(a, runs: dict[str, list[bq.Run]], traffic: dict, rates: dict[str, list[float]]) -> str:
    disk = max((x for v in rates.values() for x in v), default=0.0)
    seq = max(next(iter(rates.values()), [0.0]), default=0.0)
    rnd = max(list(rates.values())[-1] if rates else [0.0], default=0.0)
    active, e = traffic["active_expert_bytes"], traffic["experts"]
    ref = reference(runs)
    rows = []
    for label, rs in runs.items():
        b = bq.best(rs, "decode_tok_s")
        m = moe(b)
        tok = b.rec["decode_tok_s"] if b else None
        miss, src = miss_bytes_per_token(b) if b else (0.0, "—")
        lim = seq / miss if miss and seq else None
        spl = m.get("slots_per_layer")
        uniform = f"{spl / e:.3f}" if spl else "—"
        vs = bq.ratio(b, ref, "decode_tok_s") if ref else (f"llama.cpp {why(runs[L_LLAMA][0])}"
                                                          if b and runs.get(L_LLAMA) else "—")
        rows.append(f"| {label} | {fmt(tok) if b else why(rs[0])} | {runs_cell(rs)} | {vs} | "
                    f"{fmt(m.get('hit_rate'), '.3f') if m.get('hit_rate') is not None else '—'} / {uniform} | "
                    f"{fmt(m.get('prefetch_accuracy'), '.3f') if m.get('prefetch_accuracy') is not None else '—'} | "
                    f"{f'{miss / 1e6:.1f} MB ({src})' if miss else '—'} | {fmt(lim, '.2f')} | "
                    f"{fmt(100 * tok / lim, '.0f') + '%' if tok and lim else '—'} | {time_split(b)} | "
                    f"{', '.join(r.peak_mb for r in rs)} |")
    ways = "; ".join(f"{w}: {', '.join(f'{x / 1e9:.2f}' for x in v)} GB/s" for w, v in rates.items())
    head = (f"M1, under `memcap {a.cap} --cold` (the Q4_0 file is {traffic['total_bytes'] / 1e9:.2f} GB): "
            f"{a.threads} threads, greedy, {a.tokens} new tokens, best of {a.m1_repeats} [all runs; a run that "
            f"failed is not repeated], each run bounded by {a.timeout:.0f} s; offload_rt `--cpu-mem "
            f"{a.m1_cpu_mem} --ctx-size {a.ctx}`. Disk read rate, O_DIRECT on the GGUF file right after the runs, "
            f"page cache dropped first: {ways}. Disk-bound limit = sequential rate {seq / 1e9:.2f} GB/s ÷ expert "
            f"bytes read from disk per token (measured). For scale: every token reading all its "
            f"{traffic['used']} × {traffic['layers']} experts ({traffic['expert_unit_bytes'] / 1e6:.2f} MB each "
            f"in Q4_0, {active / 1e6:.0f} MB) from disk with no cache bounds decode at "
            f"{fmt(seq / active if seq else None, '.2f')} tok/s sequential, "
            f"{fmt(rnd / active if rnd else None, '.2f')} tok/s at the expert-sized random rate; a cache "
            f"of S slots per layer hits S/E under uniform routing, and the routers of random weights route with "
            f"no locality, so a policy's gain from locality (LRU, prediction) does not show here.\n\n"
            "| configuration | decode tok/s | runs | vs llama.cpp | hit rate measured / uniform S/E | "
            "prefetch accuracy | expert disk bytes/token | disk-bound limit tok/s | % of limit | "
            "time split (moe stats) | cgroup peaks MB |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/work/bench", help="where the checkpoint, the GGUF and the stores live")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="M0 runs per configuration (best kept)")
    p.add_argument("--m1-repeats", type=int, default=3, help="M1 runs per configuration (best kept)")
    p.add_argument("--ctx", type=int, default=512, help="context window, both sides")
    p.add_argument("--cap", default="1500M", help="M1's memcap")
    p.add_argument("--timeout", type=float, default=300, help="seconds per capped run")
    p.add_argument("--m0-cpu-mem", default="12G", help="offload_rt --cpu-mem in M0 (all resident)")
    p.add_argument("--m1-cpu-mem", default="auto", help="offload_rt --cpu-mem in M1")
    p.add_argument("--modes", type=lambda v: set(v.split(",")), default={"m0", "m1"})
    p.add_argument("--sides", type=lambda v: set(v.split(",")), default={"ours", "llama"},
                   help="which sides run: ours,llama (default both)")
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, help="a Python that can import llama_cpp")
    p.add_argument("--llama-passive", action="store_true",
                   help="also run llama.cpp with OMP_WAIT_POLICY=PASSIVE (a loaded machine)")
    p.add_argument("--memcap", type=Path, default=MEMCAP, help=f"the memcap tool (default {MEMCAP})")
    p.add_argument("--out", type=Path, default=None, help="append the markdown to this file")
    a = p.parse_args(argv)
    if "m1" in a.modes and not a.memcap.is_file():
        print(f"bench_moe: no memcap at {a.memcap} (give --memcap)", file=sys.stderr)
        return 2
    bq.MEMCAP = a.memcap  # run_process wraps capped commands with it
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    hf, gguf = ensure_inputs(work, a.llama_python)
    traffic = gguf_traffic(a.llama_python, gguf, work)
    traffic["total_bytes"] = gguf.stat().st_size
    for label, side, model, weights in cases(a, hf, gguf):  # untimed: convert, compile, warm the file
        r = (ours(a, model, weights, tokens=2, cpu_mem=a.m0_cpu_mem, timeout=3600) if side == "ours"
             else llama(a, gguf, env=weights))
        if not r.ok:
            print(f"warm-up of {label}: {why(r)}", file=sys.stderr)
    text = (f"Issue 19 M0/M1: synthetic Qwen3-30B-A3B-shaped MoE (`tools.make_checkpoint --preset {PRESET}`: "
            f"hidden 2048, 8 layers, 32/4 heads of 128, {traffic['experts']} experts of width 768, "
            f"{traffic['used']} routed per token; random weights), Q4_0 GGUF {gguf.stat().st_size / 1e9:.2f} GB "
            f"(llama.cpp's converter + `llama_model_quantize`). CPU: {cpu_model()}.\n\n")
    if "m0" in a.modes:
        runs = run_all(a, hf, gguf, None, a.repeats)
        text += m0_table(a, runs, traffic, mem_bandwidth(a.threads)) + "\n"
    if "m1" in a.modes:
        runs = run_all(a, hf, gguf, a.cap, a.m1_repeats)
        rates = disk_rates(gguf, unit=int(traffic["expert_unit_bytes"]), batch=traffic["used"])
        text += m1_table(a, runs, traffic, rates) + "\n"
    text += f"Load average (1 min) at the start / end of the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n"
    publish(text + f"\n```\npython -m tools.bench_moe {' '.join(argv if argv is not None else sys.argv[1:])}\n```\n",
            a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
