"""Quantized weights against llama.cpp (issue 11: R1q, prefill, D1q), ours and theirs in the same run.

    python -m tools.bench_quant r1q [--work DIR] [--tokens 64] [--prefill-tokens 6000] [--repeats 2]
        The default model (SmolLM2-135M-Instruct Q4_1 GGUF), resident, 2 threads, greedy:
        offload_rt ``--weights auto`` (native Q4_1) and ``--weights f32`` (dequantized, the old
        behaviour) vs llama.cpp on the same file. Decode tok/s over ``--tokens`` new tokens, and
        prefill tok/s of a ~6k-token passkey prompt (tests/passkey_prompts.py; the same text for all).
    python -m tools.bench_quant d1q [--work DIR] [--caps 1800M,1500M] [--tokens 16] [--repeats 2]
        Under ``memcap CAP --cold``: a synthetic ~3B Llama (hidden 3072, 28 layers, MLP 8192, bf16
        safetensors) run by offload_rt ``--weights int4 --cpu-mem auto``, offload_rt on a llama.cpp
        Q4_0 GGUF of the same weights (``--weights auto``), and llama.cpp on that GGUF (mmap, its
        default). Plus the synthetic 1.2B model of D1 in int4 and bf16 under ``--d1-cap``. For each
        offload_rt run, the disk-bound limit: the disk's best read rate in O_DIRECT sweeps right after
        the run over exactly the tensors it streamed (its ``--profile`` trace names them), ÷ the
        bytes it read per decode step; offload_rt's tok/s is reported as a share of it.

Each run is its own process (``python -m offload_rt ... --stats`` with its JSON line on stderr;
llama.cpp through ``--llama-python``, an interpreter with llama_cpp, running LLAMA_SCRIPT); the
configurations alternate within each repeat and the best of ``--repeats`` is kept, every run listed.
A run that fails is a result, not an error: llama.cpp killed by the cap's OOM killer is reported
as "killed (OOM)". Inputs are made on first use under ``--work`` (the 3B checkpoint with
tools/make_checkpoint.py, its Q4_0 GGUF with tools/make_gguf.py), and every offload_rt store is
converted and its kernels compiled by an untimed warm-up run before anything is timed.
Prints a markdown table; ``--out FILE`` appends it (docs/BENCHMARKS.md).

This process never imports torch: a parent that maps the same libraries shares their pages with
a capped child, and the child's charged memory would look smaller than a user's run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tools.bench_decode import MEMCAP, PROMPT, last_json, publish, streamed_groups, synthetic
from tools.make_gguf import DEFAULT_LLAMA_PYTHON, make_gguf
from tools.machine import cpu_model

SHAPE_3B = {"hidden": 3072, "layers": 28, "intermediate": 8192, "heads": 24, "kv_heads": 8}

# Run by --llama-python with one JSON argument; prints one JSON line. Decode tok/s leaves out the
# first token (it comes from the prompt pass), as offload_rt's --stats does.
LLAMA_SCRIPT = r"""
import json, sys, time
t_start = time.perf_counter()
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["model"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=a["n_ctx"],
            n_batch=a["n_batch"], n_ubatch=a["n_batch"], verbose=False)
text = open(a["prompt_file"]).read() if a.get("prompt_file") else a["prompt"]
ids = llm.tokenize(text.encode())
rec = {"prompt_tokens": len(ids), "load_s": round(time.perf_counter() - t_start, 3)}
if a["mode"] == "prefill":
    t0 = time.perf_counter()
    llm.eval(ids)
    dt = time.perf_counter() - t0
    rec.update(prefill_s=round(dt, 4), prefill_tok_s=round(len(ids) / dt, 3))
else:
    out, t_first, t0 = [], None, time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if t_first is None:
            t_first = time.perf_counter()
        if len(out) >= a["new_tokens"]:
            break
    dt = time.perf_counter() - t_first
    rec.update(new_tokens=len(out), prefill_s=round(t_first - t0, 4), decode_s=round(dt, 4),
               decode_tok_s=round((len(out) - 1) / dt, 4) if dt > 0 else 0.0,
               text=llm.detokenize(out).decode(errors="replace"))
print(json.dumps(rec))
"""


@dataclass
class Run:
    """One process's outcome: its --stats/JSON record when it finished, else why not."""

    ok: bool
    rec: dict = field(default_factory=dict)
    status: str = "ok"  # "ok" | "killed (OOM)" | "timeout" | "failed (rc N)"
    rc: int | None = 0
    memcap: str | None = None
    wall_s: float = 0.0
    tail: str = ""
    stdout: str = ""  # what the command printed (the answer's text)
    sweep: dict = field(default_factory=dict)  # {way: [bytes/s]} read right after (offload_rt, capped)

    @property
    def disk_peak(self) -> float:
        return max((x for v in self.sweep.values() for x in v), default=0.0)

    def get(self, key: str, default=0.0):
        return self.rec.get(key, default) if self.ok else default

    @property
    def peak_mb(self) -> str:
        line = self.memcap or ""
        peak = next((w.split("=", 1)[1] for w in line.split() if w.startswith("peak=")), "")
        return f"{int(peak) / 1e6:.0f}" if peak.isdigit() else "—"


def run_process(cmd: list, *, cap: str | None = None, timeout: float = 900, json_on: str = "stderr",
                env: dict | None = None) -> Run:
    """Run ``cmd`` (under ``memcap cap --cold`` when given) in its own process group; never raises for
    the command's failure. A timeout kills the whole group (memcap and the capped command)."""
    cmd = [str(c) for c in cmd]
    cap = cap if cap and cap.lower() != "none" else None
    if cap:
        cmd = [str(MEMCAP), cap, "--cold", "--"] + cmd
    shown = ["<script>" if "\n" in c else c for c in cmd]
    print("$ " + " ".join(shown), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, **(env or {})))
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = p.communicate(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
    wall = time.perf_counter() - t0
    memcap = next((ln for ln in err.splitlines() if ln.startswith("memcap:")), None)
    rc = p.returncode
    run = Run(ok=False, rc=rc, memcap=memcap, wall_s=wall, tail=(err or "")[-1500:], stdout=out or "")
    if timed_out:
        run.status = f"timeout ({timeout:.0f} s)"
    elif rc in (137, -9) and cap:
        run.status = "killed (OOM)"  # SIGKILL under the cap with no timeout of ours: the cgroup's OOM killer
    elif rc != 0:
        run.status = f"failed (rc {rc})"
    else:
        try:
            run.rec, run.ok = last_json(out if json_on == "stdout" else err), True
        except (RuntimeError, json.JSONDecodeError) as e:
            run.status, run.tail = "failed (no JSON)", str(e)[-1500:]
    if not run.ok:
        print(f"  -> {run.status}: {run.tail[-600:]}", file=sys.stderr, flush=True)
    return run


def ours(model: Path | None, weights: str, *, store_dir: Path, tokens: int, threads: int = 2,
         cpu_mem: str = "4G", cap: str | None = None, prompt_file: Path | None = None, ctx: int | None = None,
         timeout: float = 900, extra=()) -> Run:
    cmd = [sys.executable, "-m", "offload_rt"] + ([model] if model else [])
    cmd += ["--raw", "-n", tokens, "--ignore-eos", "--stats", "--threads", threads, "--cpu-mem", cpu_mem,
            "--offload-dir", store_dir]
    cmd += ["--prompt-file", prompt_file] if prompt_file else ["--prompt", PROMPT]
    if ctx:
        cmd += ["--ctx-size", ctx]
    cmd += [*extra, "--weights", weights]
    return run_process(cmd, cap=cap, timeout=timeout)


def llama(llama_python: str, model: Path, *, mode: str = "decode", tokens: int = 64, threads: int = 2,
          n_ctx: int = 512, n_batch: int = 512, cap: str | None = None, prompt_file: Path | None = None,
          timeout: float = 900) -> Run:
    args = {"model": str(model), "mode": mode, "new_tokens": tokens, "threads": threads, "n_ctx": n_ctx,
            "n_batch": n_batch, "prompt": PROMPT, "prompt_file": str(prompt_file) if prompt_file else None}
    return run_process([llama_python, "-c", LLAMA_SCRIPT, json.dumps(args)], cap=cap, timeout=timeout,
                       json_on="stdout")


# ---------------------------------------------------------------- disk bandwidth of a run's store

def store_of(model: Path, store_dir: Path, weights: str) -> Path | None:
    """The store directory a run of ``model`` in ``weights`` used (asked of storage in a child process)."""
    code = ("import inspect, sys; from storage.convert import store_path as f; "
            "kw = {'weights': sys.argv[3]} if 'weights' in inspect.signature(f).parameters else {}; "
            "print(f(sys.argv[1], sys.argv[2], **kw))")
    p = subprocess.run([sys.executable, "-c", code, str(model), str(store_dir), weights],
                       capture_output=True, text=True)
    if p.returncode == 0:
        path = Path(p.stdout.strip().splitlines()[-1])
        if (path / "manifest.json").is_file():
            return path
    return None


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


SWEEP_PIECE = 8 << 20  # bytes per read, as the runtime's streaming reads (storage.store.PIECE_BYTES)
SWEEP_WAYS = ("one group at a time", "all groups at once", "plain O_DIRECT into one buffer")


def store_read_passes(store: Path, groups: set[str], *, rounds: int = 2, threads: int = 8) -> tuple[dict, int]:
    """({way: [bytes/s per pass]}, bytes per pass): sweeps over exactly the tensors of ``groups``, page
    cache dropped first, no compute, ``rounds`` passes in each of three ways (:data:`SWEEP_WAYS`),
    interleaved: the runtime's read path (``WeightStore.read_many``: O_DIRECT, 8 MiB pieces on
    ``threads`` threads, each tensor into its own buffer) one group at a time as D1 measures it, the
    same with every piece in flight at once, and plain ``os.preadv`` O_DIRECT reads of the tensors'
    chunk files into one contiguous buffer. The best of them is what the disk can deliver for these
    bytes: on this virtual disk the ways differ by up to 2x (plain reads into one buffer were the
    fastest in the runs seen, the same threads reading into a few reused buffers half as fast).

    Decode re-reads the same bytes every token, and this virtual disk has a host-side cache that the
    guest's drop_caches does not reach: repeated reads of the same bytes come faster than first
    reads. So the limit is measured on the same bytes, right after the run (as tools.bench_decode
    does for D1). Runs in a child process (imports torch).
    """
    from storage.store import WeightStore, aligned_buffer

    from offload_rt.engine import model_groups
    from offload_rt import models

    st = WeightStore.open(store)
    todo = [[n for _k, n in g.tensors if n in st] for g in model_groups(models.args_from_config(st.model_config))
            if g.name in groups]
    names = [n for ns in todo for n in ns]
    bufs = {n: aligned_buffer(st.info(n).nbytes) for n in names}
    files = [f for n in names for f in sorted((store / n).rglob("*")) if f.is_file() and f.name != "zarr.json"]
    jobs = [(f, off, min(SWEEP_PIECE, size - off))
            for f in files for size in (f.stat().st_size,) for off in range(0, size, SWEEP_PIECE)]
    align = 4096
    flat = aligned_buffer(sum(-(-n // align) * align for _f, _o, n in jobs))
    views, pos = [], 0
    mv = memoryview(flat.numpy())
    for _f, _o, n in jobs:
        w = -(-n // align) * align  # a file's tail: the read stops at its end
        views.append(mv[pos:pos + w])
        pos += w

    def plain(i: int) -> int:
        f, off, _n = jobs[i]
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            return os.preadv(fd, [views[i]], off)
        finally:
            os.close(fd)

    drop_caches()
    out: dict[str, list[float]] = {w: [] for w in SWEEP_WAYS}
    total = sum(st.info(n).nbytes for n in names)
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(rounds):
            for way in SWEEP_WAYS:
                t0 = time.perf_counter()
                if way == SWEEP_WAYS[2]:
                    got = sum(ex.map(plain, range(len(jobs))))
                else:
                    got = 0
                    for batch in (todo if way == SWEEP_WAYS[0] else [names]):
                        got += st.read_many([(n, bufs[n]) for n in batch], executor=ex)
                out[way].append(got / (time.perf_counter() - t0))
    return out, total


def step_bytes(r: Run) -> int:
    """Bytes a run read from disk per decode step (decode reads ÷ forward passes after the first token)."""
    steps = max(1, int(r.get("new_tokens", 0)) - 1)
    return int(r.get("disk_read_bytes_decode", 0)) // steps


def with_sweep(r: Run, model: Path, store_dir: Path, weights: str, trace: Path) -> Run:
    """Attach to a finished capped run the disk's read rate over the tensors it streamed (from its trace)."""
    try:
        if not r.ok or step_bytes(r) <= 0 or not trace.is_file():
            return r
        root = store_of(model, store_dir, weights)
        groups = streamed_groups(trace)
        if root is None or not groups:
            return r
        p = subprocess.run([sys.executable, "-m", "tools.bench_quant", "sweep", "--store", str(root),
                            "--groups", ",".join(sorted(groups))], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"  sweep failed: {p.stderr[-800:]}", file=sys.stderr)
            return r
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        r.sweep, r.rec["swept_bytes"] = rec["rates"], rec["bytes"]
    finally:
        trace.unlink(missing_ok=True)
    return r


# ---------------------------------------------------------------- formatting

def best(runs: list[Run], key: str) -> Run | None:
    ok = [r for r in runs if r.ok]
    return max(ok, key=lambda r: r.rec.get(key, 0.0)) if ok else None


def fmt_runs(runs: list[Run], key: str) -> str:
    return ", ".join(f"{r.rec[key]:.2f}" if r.ok else r.status for r in runs)


def cell(runs: list[Run], key: str) -> str:
    b = best(runs, key)
    if b is None:
        return runs[0].status if runs else "—"
    return f"{b.rec[key]:.2f}"


def ratio(a: Run | None, b: Run | None, key: str) -> str:
    if a is None or b is None or not b.rec.get(key):
        return "—"
    return f"**{a.rec[key] / b.rec[key]:.2f}×**"


# ---------------------------------------------------------------- R1q

def default_model() -> Path:
    p = subprocess.run([sys.executable, "-c", "from offload_rt.loader import default_model_path as f; print(f())"],
                       capture_output=True, text=True, check=True)
    return Path(p.stdout.strip().splitlines()[-1])


def prefill_prompt(work: Path, tokens: int) -> Path:
    """A passkey prompt of about ``tokens`` tokens (needle at half depth), the same text for both sides."""
    from tests.passkey_prompts import FILLER_TOKENS, passkey_text

    path = work / f"prefill-{tokens}.txt"
    path.write_text(passkey_text(12345, max(1, (tokens - 60) // FILLER_TOKENS), 0.5))
    return path


R_LLAMA = "llama.cpp (llama-cpp-python), same file"


def r1q(a) -> str:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    store_dir = work / "stores"
    gguf = default_model()
    pfile = prefill_prompt(work, a.prefill_tokens)
    ctx = max(8192, 1 << (a.prefill_tokens + 256).bit_length())
    configs = {
        "offload_rt `--weights auto` (native Q4_1)": ("ours", "auto"),
        "offload_rt `--weights f32` (dequantized float32)": ("ours", "f32"),
        R_LLAMA: ("llama", None),
    }
    configs = {k: v for k, v in configs.items() if v[0] in a.sides}

    def go(kind, weights, mode):
        if kind == "ours":
            if mode == "decode":
                return ours(None, weights, store_dir=store_dir, tokens=a.tokens, threads=a.threads, ctx=a.ctx)
            return ours(None, weights, store_dir=store_dir, tokens=2, threads=a.threads, prompt_file=pfile, ctx=ctx)
        if mode == "decode":
            return llama(a.llama_python, gguf, tokens=a.tokens, threads=a.threads, n_ctx=a.ctx)
        return llama(a.llama_python, gguf, mode="prefill", threads=a.threads, n_ctx=ctx, n_batch=a.llama_batch,
                     prompt_file=pfile)

    for kind, weights in configs.values():  # untimed: convert the stores, compile the kernels, warm the file
        if kind == "ours":
            ours(None, weights, store_dir=store_dir, tokens=4, threads=a.threads, ctx=a.ctx)
        else:
            llama(a.llama_python, gguf, tokens=4, threads=a.threads)
    runs: dict[tuple[str, str], list[Run]] = {}
    for _ in range(a.repeats):
        for mode in ("decode", "prefill"):
            for name, (kind, weights) in configs.items():
                r = go(kind, weights, mode)
                runs.setdefault((name, mode), []).append(r)
                key = "decode_tok_s" if mode == "decode" else "prefill_tok_s"
                print(f"  {mode} {name}: {r.rec.get(key) if r.ok else r.status}", file=sys.stderr, flush=True)
    ref_d = best(runs.get((R_LLAMA, "decode"), []), "decode_tok_s")
    ref_p = best(runs.get((R_LLAMA, "prefill"), []), "prefill_tok_s")
    rows = []
    for name in configs:
        d, p = runs[(name, "decode")], runs[(name, "prefill")]
        bp = best(p, "prefill_tok_s")
        rows.append(f"| {name} | {cell(d, 'decode_tok_s')} | {ratio(best(d, 'decode_tok_s'), ref_d, 'decode_tok_s')} | "
                    f"{fmt_runs(d, 'decode_tok_s')} | {cell(p, 'prefill_tok_s')} | "
                    f"{ratio(bp, ref_p, 'prefill_tok_s')} | {fmt_runs(p, 'prefill_tok_s')} | "
                    f"{bp.rec.get('prompt_tokens', '—') if bp else '—'} |")
    head = (f"R1q: default model ({gguf.name}), resident, {a.threads} threads, greedy, best of {a.repeats} "
            f"[all runs]; decode over {a.tokens} new tokens (context {a.ctx} both sides); prefill of a ~{a.prefill_tokens}-token passkey "
            f"prompt (tests/passkey_prompts.py, one file for both sides; offload_rt `--ctx-size {ctx}`, "
            f"llama.cpp n_ctx {ctx}, n_batch = n_ubatch = {a.llama_batch}). Ratios are against llama.cpp.\n\n"
            "| configuration | decode tok/s | vs llama.cpp | decode runs | prefill tok/s | vs llama.cpp | "
            "prefill runs | prompt tokens |\n|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


# ---------------------------------------------------------------- D1q

def ensure_3b(work: Path) -> Path:
    path = work / "synthetic-3b-bf16"
    if not (path / "config.json").exists():
        cmd = [sys.executable, "-m", "tools.make_checkpoint", path, "--dtype", "bfloat16", "--fast"]
        for k, v in SHAPE_3B.items():
            cmd += [f"--{k.replace('_', '-')}", v]
        p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
    return path


def ensure_q4_0(work: Path, hf: Path, llama_python: str) -> Path:
    path = work / "synthetic-3b.Q4_0.gguf"
    if not path.is_file():
        make_gguf(hf, path, qtype="Q4_0", llama_python=llama_python, work=work)
    return path


def limit_cells(r: Run | None) -> tuple[str, str, str, str, str]:
    """(bytes per step measured / planned / swept, achieved GB/s, disk GB/s after the run, limit tok/s,
    % of limit)."""
    if r is None:
        return ("—",) * 5
    sb, planned = step_bytes(r), r.get("stream_bytes_per_token", 0) or 0
    by = f"{sb / 1e9:.2f} / {planned / 1e9:.2f} / {r.rec.get('swept_bytes', 0) / 1e9:.2f} GB"
    if sb <= 0:
        return "0 (resident)", "—", "—", "—", "—"
    got = f"{r.rec['decode_tok_s'] * sb / 1e9:.2f}"
    if not r.disk_peak:
        return by, got, "—", "—", "—"
    lim = r.disk_peak / sb
    ways = "; ".join(f"{w.split()[0]} {', '.join(f'{x / 1e9:.2f}' for x in v)}" for w, v in r.sweep.items())
    return (by, got, f"**{r.disk_peak / 1e9:.2f}** ({ways})", f"{lim:.2f}",
            f"**{100 * r.rec['decode_tok_s'] / lim:.0f}%**")


L_INT4 = "offload_rt 3B `--weights int4`"
L_GGUF = "offload_rt 3B Q4_0 GGUF `--weights auto`"
L_LLAMA = "llama.cpp 3B Q4_0 GGUF (mmap)"
L_12I4 = "offload_rt 1.2B `--weights int4`"
L_12BF = "offload_rt 1.2B `--weights bf16`"


def d1q(a) -> str:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    store_dir = work / "stores"
    caps = [c.strip() for c in a.caps.split(",") if c.strip()]
    m3 = ensure_3b(work)
    q4 = ensure_q4_0(work, m3, a.llama_python)
    m12 = synthetic(work)
    # (label, runner kind, model, weights, caps)
    cases = [(L_INT4, "ours", m3, "int4", caps), (L_GGUF, "ours", q4, "auto", caps),
             (L_LLAMA, "llama", q4, None, caps), (L_12I4, "ours", m12, "int4", [a.d1_cap]),
             (L_12BF, "ours", m12, "bf16", [a.d1_cap])]
    cases = [c for c in cases if c[1] in a.sides]
    for label, kind, model, weights, _ in cases:  # untimed: convert, compile, outside any cap
        if kind == "ours":
            r = ours(model, weights, store_dir=store_dir, tokens=2, cpu_mem=a.warmup_cpu_mem, ctx=a.ctx, timeout=3600)
            if not r.ok:
                print(f"warm-up of {label}: {r.status}", file=sys.stderr)
    if "torch" in sys.modules:
        print("warning: torch is loaded in the benchmark's own process", file=sys.stderr)
    runs: dict[tuple[str, str], list[Run]] = {}
    for _ in range(a.repeats):
        for label, kind, model, weights, cs in cases:
            for cap in cs:
                if kind == "ours":
                    trace = work / "d1q-trace.json"
                    r = ours(model, weights, store_dir=store_dir, tokens=a.tokens, cpu_mem=a.cpu_mem, cap=cap,
                             ctx=a.ctx, timeout=a.timeout, extra=("--profile", trace))
                    r = with_sweep(r, model, store_dir, weights, trace)
                else:
                    r = llama(a.llama_python, model, tokens=a.tokens, threads=a.threads, cap=cap, n_ctx=a.ctx,
                              timeout=a.timeout)
                runs.setdefault((label, cap), []).append(r)
                print(f"  {cap} {label}: {r.rec.get('decode_tok_s') if r.ok else r.status}"
                      + (f" (disk {r.disk_peak / 1e9:.2f} GB/s)" if r.sweep else ""), file=sys.stderr, flush=True)
    rows = []
    for label, kind, model, weights, cs in cases:
        for cap in cs:
            rs = runs[(label, cap)]
            b = best(rs, "decode_tok_s")
            by, got, sw, lim, pct = limit_cells(b) if kind == "ours" else ("—",) * 5
            peaks = ", ".join(r.peak_mb for r in rs)
            rows.append(f"| {label} | {cap} | {cell(rs, 'decode_tok_s')} | {fmt_runs(rs, 'decode_tok_s')} | "
                        f"{by} | {got} | {sw} | {lim} | {pct} | {peaks} |")
    notes = []
    for cap in caps:
        theirs = runs.get((L_LLAMA, cap), [])
        ref = best(theirs, "decode_tok_s")
        for label in (L_INT4, L_GGUF):
            o = best(runs.get((label, cap), []), "decode_tok_s")
            if o is None or not theirs:
                continue
            if ref is None:
                notes.append(f"{cap}: {label} {o.rec['decode_tok_s']:.2f} tok/s where llama.cpp {theirs[0].status}")
            else:
                notes.append(f"{cap}: {label} / llama.cpp {ratio(o, ref, 'decode_tok_s')}")
    i4 = best(runs.get((L_12I4, a.d1_cap), []), "decode_tok_s")
    bf = best(runs.get((L_12BF, a.d1_cap), []), "decode_tok_s")
    if i4 and bf:
        notes.append(f"{a.d1_cap}: 1.2B int4 / bf16 {ratio(i4, bf, 'decode_tok_s')}")
    head = (f"D1q: under `memcap CAP --cold`, {a.tokens} new tokens, greedy, {a.threads} threads, best of "
            f"{a.repeats} [all runs]; offload_rt `--cpu-mem {a.cpu_mem} --ctx-size {a.ctx}`, llama.cpp n_ctx "
            f"{a.ctx}. 3B = synthetic Llama (hidden 3072, "
            f"28 layers, MLP 8192; bf16 safetensors {dir_bytes(m3) / 1e9:.2f} GB), its Q4_0 GGUF "
            f"{q4.stat().st_size / 1e9:.2f} GB (llama.cpp's converter + `llama_model_quantize`: Q4_0, output "
            f"matrix Q6_K). Disk bytes per decode step: measured (`disk_read_bytes_decode` ÷ steps) / planned "
            f"(`stream_bytes_per_token`) / swept; disk GB/s = the best of 6 O_DIRECT sweeps right after the run "
            f"over exactly the tensors it streamed (groups read again and again in its `--profile` trace; page "
            f"cache dropped first; 8 MiB pieces, 8 threads), 2 in each of three ways: the runtime's `read_many` "
            f"one group at a time (as D1 measures it), `read_many` with all groups at once, plain `preadv` into "
            f"one buffer; limit = best sweep ÷ measured bytes per step.\n\n"
            "| configuration | cap | decode tok/s | runs | disk bytes/step measured / planned / swept | "
            "decode reads GB/s | disk GB/s after best run | disk-bound limit tok/s | % of limit | "
            "cgroup peaks MB |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n" + ("\n" + "; ".join(notes) + ".\n" if notes else "")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_quant", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    for name in ("r1q", "d1q"):
        s = sub.add_parser(name)
        s.add_argument("--work", default="/tmp/offload_rt_bench")
        s.add_argument("--repeats", type=int, default=2)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, help="a Python that can import llama_cpp")
        s.add_argument("--out", type=Path, default=None, help="append the markdown table here")
        s.add_argument("--sides", type=lambda v: set(v.split(",")), default={"ours", "llama"},
                       help="which sides run: ours,llama (default both)")
        s.add_argument("--ctx", type=int, default=512,
                       help="context window of the decode runs, both sides (offload_rt --ctx-size, llama.cpp n_ctx)")
        if name == "r1q":
            s.add_argument("--tokens", type=int, default=64)
            s.add_argument("--prefill-tokens", type=int, default=6000)
            s.add_argument("--llama-batch", type=int, default=512, help="llama.cpp n_batch = n_ubatch for prefill")
        else:
            s.add_argument("--tokens", type=int, default=16)
            s.add_argument("--caps", default="1800M,1500M", help="memcap sizes; 'none' runs uncapped (resident)")
            s.add_argument("--d1-cap", default="1800M", help="the cap of the 1.2B int4 vs bf16 rows")
            s.add_argument("--cpu-mem", default="auto")
            s.add_argument("--timeout", type=float, default=900, help="seconds per capped run")
            s.add_argument("--warmup-cpu-mem", default="3G",
                           help="--cpu-mem of the untimed, uncapped warm-up runs (conversion, compilation)")
    sw = sub.add_parser("sweep", help="(internal) store_read_passes; prints JSON {rates, bytes}")
    sw.add_argument("--store", type=Path, required=True)
    sw.add_argument("--groups", required=True)
    a = p.parse_args(argv)
    if a.which == "sweep":
        rates, nbytes = store_read_passes(a.store, set(a.groups.split(",")))
        print(json.dumps({"rates": rates, "bytes": nbytes}))
        return 0
    load0 = os.getloadavg()[0]
    text = r1q(a) if a.which == "r1q" else d1q(a)
    # 2 shared cores: the load average says how much the neighbours took from this run
    text += (f"\nCPU: {cpu_model()}. Load average (1 min) at the start / end of the run: {load0:.2f} / "
             f"{os.getloadavg()[0]:.2f}.\n")
    publish(text + f"\n```\npython -m tools.bench_quant {' '.join(argv if argv is not None else sys.argv[1:])}\n```\n",
            a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
