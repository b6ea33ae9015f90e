"""Start-up: from the command to the first token of the default model with a warm store, and where it goes.

    python -m tools.bench_startup [--runs 3] [--prompt Hi] [--llama-python /tmp/llvenv/bin/python] [--json]

Every figure comes from fresh processes, ``--runs`` times (median and fastest reported), after one
untimed run of each (the store converted, the calibration cached, the files in the page cache):

* ours: ``offload-run -p PROMPT -n 1`` as a user types it, timed by this process from the spawn to
  the first byte on its stdout (the first token), with the child's CPU seconds beside it (on a
  shared machine the wall time also counts the wait for a CPU);
* the breakdown: the same run (``offload_rt.cli.main``) in a child that first imports torch, numba
  and offload_rt one after the other and then times, with ``perf_counter``, each step ``app.main`` (through ``offload_rt.build``)
  takes before the first token: the tokenizer and the store's opening, the kernels' warm-up (the
  Numba cache loading), the baseline, the calibration cache, the plan, the engine, the prefill and
  first token; "other" is the rest;
* imports: ``python -X importtime -c "import offload_rt.app"``, the costliest packages;
* llama.cpp: llama-cpp-python (``--llama-python``, default /tmp/llvenv/bin/python) on the same GGUF,
  spawn to the first streamed token, as many threads as ours. Skipped, and said, when not importable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_PYTHON = "/tmp/llvenv/bin/python"
STEP_NAMES = ("python start", "imports: cli", "imports: torch", "imports: numba", "imports: offload_rt",
              "GGUF header (config)", "store + config", "tokenizer", "kernels (Numba cache)", "baseline",
              "calibration cache", "plan", "weights (resident load)", "engine", "prefill + first token", "other")

LLAMA_SCRIPT = r"""
import sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=int(sys.argv[3]), verbose=False)
for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": sys.argv[2]}], max_tokens=1,
                                        temperature=0.0, stream=True):
    text = chunk["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
"""


# ---------------------------------------------------------------------------- the child: one timed run


def child(argv: list[str], out: Path, t_spawn: float) -> None:
    """Run ``offload-run argv`` in this process with every step before the first token timed; write
    {step: [wall seconds, CPU seconds of the process]} (STEP_NAMES) as JSON to ``out``."""
    t_start = time.time()

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    spent: dict[str, list[float]] = {"python start": [t_start - t_spawn, time.process_time()]}

    def add(name: str, since: tuple[float, float], less: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
        now = clock()
        got = spent.setdefault(name, [0.0, 0.0])
        got[0] += now[0] - since[0] - less[0]
        got[1] += now[1] - since[1] - less[1]
        return now

    t0 = t = clock()
    import offload_rt.cli as cli  # what the console script imports (click, config)
    from offload_rt.threads import configure_process

    configure_process()  # as cli.main does, before torch loads OpenMP
    t = add("imports: cli", t)
    import torch  # noqa: F401

    t = add("imports: torch", t)
    import numba  # noqa: F401

    t = add("imports: numba", t)
    import kernels_cpu.attention
    import kernels_cpu.matvec
    import kernels_cpu.quant  # the default model's Q4_1 blocks run through it
    import kernels_cpu.rowops
    import offload_rt.loader as loader
    import offload_rt.memory.baseline as baseline
    import offload_rt.memory.calibrate as calibrate
    import offload_rt.memory.plan  # noqa: F401
    import offload_rt.runtime as runtime
    import offload_rt.scheduler as scheduler
    import offload_rt.session  # noqa: F401
    import offload_rt.tokenizer as tokenizer
    import storage

    t = add("imports: offload_rt", t)

    def timed(owner, attr: str, name: str, minus: tuple[str, ...] = ()):
        """Wrap ``owner.attr`` so its calls add to step ``name`` (less the steps ``minus`` inside it)."""
        real = getattr(owner, attr)

        def wrapper(*a, **k):
            before = {m: list(spent.get(m, (0.0, 0.0))) for m in minus}
            s = clock()
            try:
                return real(*a, **k)
            finally:
                inner = [sum(spent.get(m, (0.0, 0.0))[i] - before[m][i] for m in minus) for i in (0, 1)]
                add(name, s, tuple(inner))

        setattr(owner, attr, wrapper)

    timed(storage, "read_source_config", "GGUF header (config)")
    timed(tokenizer.Tokenizer, "__init__", "tokenizer")
    timed(loader, "open_model", "store + config", minus=("tokenizer", "GGUF header (config)"))
    for mod in (kernels_cpu.matvec, kernels_cpu.attention, kernels_cpu.rowops, kernels_cpu.quant):
        timed(mod, "warm_up", "kernels (Numba cache)")
    timed(baseline, "measure", "baseline")
    timed(calibrate, "load_or_measure", "calibration cache")
    timed(runtime, "prepare", "plan", minus=("calibration cache",))
    timed(scheduler.StreamingWeights, "__init__", "weights (resident load)")
    timed(loader, "attach_engine", "engine")
    marks = {}
    real_attach, real_write = loader.attach_engine, sys.stdout.write

    def attach(*a, **k):
        try:
            return real_attach(*a, **k)
        finally:
            marks["engine"] = clock()

    def write(s):
        if s and "first" not in marks:
            marks["first"] = clock()
        return real_write(s)

    loader.attach_engine, sys.stdout.write = attach, write
    try:
        cli.main(argv)
    except SystemExit:
        pass
    finally:
        sys.stdout.write = real_write
    end = marks.get("first", clock())
    # the session: chat template, prompt tokens, prefill, the first token
    spent["prefill + first token"] = [end[i] - marks.get("engine", end)[i] for i in (0, 1)]
    spent["total"] = [spent["python start"][0] + end[0] - t0[0], end[1]]
    spent["other"] = [spent["total"][i] - sum(v[i] for k, v in spent.items() if k not in ("total", "other"))
                      for i in (0, 1)]
    out.write_text(json.dumps(spent))


# ---------------------------------------------------------------------------- the parent


def _first_byte(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(seconds from spawn to the first byte on stdout, the child's CPU seconds, its stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    if p.returncode != 0 or not first:
        raise SystemExit(f"bench_startup: {' '.join(cmd[:4])}... exited {p.returncode}: {err.strip()[-400:]}")
    return t_first, usage.ru_utime + usage.ru_stime, (first + rest).decode(errors="replace")


def ours(prompt: str, extra: list[str]) -> tuple[float, float]:
    t, cpu, _ = _first_byte([sys.executable, "-m", "offload_rt.cli", "-p", prompt, "-n", "1", *extra])
    return t, cpu


def breakdown(prompt: str, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "steps.json"
        t_spawn = time.time()
        _first_byte([sys.executable, "-m", "tools.bench_startup", "--child", str(out), str(t_spawn), "--",
                     "-p", prompt, "-n", "1", *extra])
        return json.loads(out.read_text())


def llama(python: str, gguf: Path, prompt: str, threads: int) -> tuple[float, float] | str:
    """(first token seconds, CPU seconds), or why llama.cpp could not be run."""
    if not Path(python).exists():
        return f"{python} not found"
    probe = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"llama_cpp not importable by {python}"
    t, cpu, _ = _first_byte([python, "-c", LLAMA_SCRIPT, str(gguf), prompt, str(threads)])
    return t, cpu


def import_costs(top: int = 12) -> list[tuple[str, float]]:
    """(package, cumulative seconds) of the costliest top-level packages ``import offload_rt.app`` loads."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import offload_rt.app, offload_rt.runtime"],
                       capture_output=True, text=True)
    by_pkg: dict[str, float] = {}
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, self_us, _cum, name = (x.strip() for x in (line.split(":", 1)[0], *line.split(":", 1)[1].split("|")))
        pkg = name.split(".")[0]
        by_pkg[pkg] = by_pkg.get(pkg, 0.0) + int(self_us) / 1e6
    return sorted(by_pkg.items(), key=lambda kv: -kv[1])[:top]


def _stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.3f} s (fastest {min(xs):.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", default="Hi")
    p.add_argument("--llama-python", default=LLAMA_PYTHON)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--child", nargs=2, metavar=("OUT", "T_SPAWN"), help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.rest, Path(a.child[0]), float(a.child[1]))
        return 0
    from offload_rt.loader import default_model_path
    from offload_rt.threads import available_cores

    gguf, threads = default_model_path(), available_cores()
    ours(a.prompt, [])  # untimed: converts the store and calibrates on a first run, warms the page cache
    has_llama = llama(a.llama_python, gguf, a.prompt, threads)
    runs = {"ours": [], "ours_cpu": [], "llama": [], "llama_cpu": [], "steps": []}
    for _ in range(a.runs):
        t, cpu = ours(a.prompt, [])
        runs["ours"].append(t)
        runs["ours_cpu"].append(cpu)
        runs["steps"].append(breakdown(a.prompt, []))
        if not isinstance(has_llama, str):
            t, cpu = llama(a.llama_python, gguf, a.prompt, threads)
            runs["llama"].append(t)
            runs["llama_cpu"].append(cpu)
    steps = {k: [statistics.median(r.get(k, (0.0, 0.0))[i] for r in runs["steps"]) for i in (0, 1)]
             for k in (*STEP_NAMES, "total")}
    imports = import_costs()
    if a.json:
        print(json.dumps({"model": str(gguf), "threads": threads, "runs": runs, "steps_median_s": steps,
                          "imports_s": dict(imports), "llama": has_llama if isinstance(has_llama, str) else "ok"}))
        return 0
    print(f"default model {gguf.name}, warm store, {threads} threads, {a.runs} runs, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"ours      command → first token: {_stats(runs['ours'])}, CPU {_stats(runs['ours_cpu'])}")
    if isinstance(has_llama, str):
        print(f"llama.cpp not run: {has_llama}")
    else:
        print(f"llama.cpp command → first token: {_stats(runs['llama'])}, CPU {_stats(runs['llama_cpu'])}")
    print("breakdown (medians of the instrumented run; CPU: the process's, all threads):")
    print(f"  {'step':26s} {'wall s':>7s} {'CPU s':>7s}")
    for k in (*STEP_NAMES, "total"):
        print(f"  {k:26s} {steps[k][0]:7.3f} {steps[k][1]:7.3f}")
    print("imports (self time by package, python -X importtime):")
    for pkg, s in imports:
        print(f"  {pkg:26s} {s:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
