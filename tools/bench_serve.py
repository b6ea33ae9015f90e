"""Serving benchmarks (issue 20): ``offload-run serve`` against llama.cpp's ``llama-server`` in the same run.

    python -m tools.bench_serve build-llama-server [--src DIR] [--build DIR]
        configure and build llama.cpp's server (``llama-server``) from the llama.cpp vendored in the
        llama-cpp-python sdist (found or fetched as tools/make_gguf does), at nice 19, 2 jobs.
    python -m tools.bench_serve s1 [--llama-server PATH] [--tokens 128] [--repeats 3]
        S1, resident default model (the packaged SmolLM2 Q4_1 GGUF): aggregate and decode tok/s of 1, 4
        and 8 concurrent greedy streamed requests; ours with --parallel 4 and 8 against llama-server
        with --parallel 4 (-c 4*4096) and 8 (-c 8*4096), -t 2 both, same prompts, same client.
    python -m tools.bench_serve s2 [--work DIR] [--cap 1800M] [--tokens 32]
        S2, weights streamed from disk: the synthetic 1.2B bf16 Llama of D1 under ``memcap CAP --cold``,
        ``--cpu-mem auto --parallel 8``: 8 concurrent requests against 1 (no llama.cpp baseline).
    python -m tools.bench_serve s3 [--llama-server PATH] [--prefix-tokens 2000]
        S3, prefix cache: time to first token of a request whose long system prompt is uncached, cached,
        and (ours) cached before a server restart with the same --offload-dir; llama-server's own
        prompt cache (cache_prompt) in the same run.
    python -m tools.bench_serve steps
        what limits S1: the server's compute alone (``batch.step`` for 1, 4, 8 decode rows, in-process,
        no HTTP) beside ``offload-run``'s single-sequence decode in the same run.
    python -m tools.bench_serve passes [--pass-tokens 512,256] [--repeats 2]
        what S3's granule costs: the server's prefill of a ~2,000-token prompt in passes of each size.
    python -m tools.bench_serve magicpig [--prefix-tokens 2000] [--repeats 3] [--s3-tokens 8]
        ``--attention magicpig`` in the server's steps (in-process): prefill of an uncached ~2,000-token
        chat prompt and the first decode steps, the prompt's end told to the cache or not (before).
    python -m tools.bench_serve all ...   (s1, s2, s3 in turn)

Every request goes through the same client code: the openai client, ``/v1/chat/completions`` with
``stream=True`` and ``stream_options.include_usage`` (completion tokens from ``usage``, first and last
token times from the stream). A round sends all of its requests at once; its aggregate tok/s is the
completion tokens over the wall time from the first request sent to the last one finished; its decode
tok/s is the sum over requests of (tokens - 1) / (last token time - first token time). Prompts differ
between rounds (a round number leads the user message), so neither server reuses a previous round's
prompt. The servers run in their own processes (ours: ``--ours`` command prefix, default
``python -m offload_rt``), started and stopped by this tool; their logs go to ``--work``. S1 starts all
of its servers first and interleaves their rounds (a pause between rounds), so a change in the shared
machine's load falls on every side alike.
This is a benchmark, never a test: it prints markdown tables (appended to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tools.bench_decode import MEMCAP, publish, synthetic
from tools.bench_quant import default_model
from tools.make_gguf import DEFAULT_LLAMA_PYTHON, find_llama_src

DEFAULT_BUILD = Path("/tmp/llserver-build")
DEFAULT_WORK = Path("/tmp/offload_rt_bench")
THREADS = 2
CTX_PER_SLOT = 4096
PAUSE_S = 1.0  # between rounds: the previous server's threads stop spinning before the next round

TOPICS = ["a lighthouse keeper who finds a message in a bottle", "a robot learning to paint",
          "a city built on the back of a giant turtle", "two rival bakers in a small village",
          "an astronaut stranded on Mars", "a detective who can hear plants", "a dragon afraid of heights",
          "a library that rearranges itself at night"]


# ---------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_line() -> str:
    return f"CPU: {cpu_model()} (/proc/cpuinfo), {os.cpu_count()} CPUs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- servers
class Server:
    """A server process (ours or llama-server) on a free port, ready once GET /health answers 200.

    Stopped with SIGINT to its process group (ours finishes in-flight requests and flushes the prefix
    cache; memcap's shell passes the signal to its child and prints the cgroup's peak)."""

    def __init__(self, name: str, cmd: list, log: Path, *, port: int, timeout: float = 900):
        self.name, self.cmd, self.log, self.port = name, [str(c) for c in cmd], log, port
        self.url = f"http://127.0.0.1:{port}/v1"
        print("$ " + shlex.join(self.cmd), file=sys.stderr, flush=True)
        self._out = open(log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited {self.proc.returncode} before serving; log {log}:\n{self.tail()}")
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s; log {log}:\n{self.tail()}")
            time.sleep(0.25)
        self.ready_s = time.monotonic() - t0

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def tail(self, n: int = 3000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        return self.proc.returncode

    def memcap_line(self) -> str | None:
        return next((l for l in self.log.read_text(errors="replace").splitlines() if l.startswith("memcap:")), None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def ours_cmd(a, model, port: int, *extra, prefix: str | None = None) -> list:
    return [*shlex.split(prefix or a.ours), "serve", *([model] if model else []), "--port", port, "--threads", THREADS,
            *extra]


def llama_cmd(a, model, port: int, parallel: int, *extra) -> list:
    return [a.llama_server, "-m", model, "--parallel", parallel, "-c", parallel * CTX_PER_SLOT, "-t", THREADS,
            "--host", "127.0.0.1", "--port", port, *extra]


def llama_version(path) -> str:
    p = subprocess.run([str(path), "--version"], capture_output=True, text=True)
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("version")]
    return lines[0] if lines else "version unknown"


# ---------------------------------------------------------------------------------------- client
@dataclass
class Answer:
    sent: float  # perf_counter when the request was sent
    first: float | None = None  # first content token received
    last: float | None = None  # last content token received
    done: float = 0.0
    completion: int = 0  # completion tokens (usage)
    prompt: int = 0
    cached: int | None = None  # usage.prompt_tokens_details.cached_tokens (llama-server: timings.cache_n)
    pieces: int = 0  # content chunks received

    @property
    def ttft(self) -> float:
        return (self.first or self.done) - self.sent

    @property
    def decode_rate(self) -> float | None:
        if self.first is None or self.last is None or self.completion < 2 or self.last <= self.first:
            return None
        return (self.completion - 1) / (self.last - self.first)


@dataclass
class Round:
    answers: list[Answer] = field(default_factory=list)
    wall: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(x.completion for x in self.answers)

    @property
    def aggregate(self) -> float:
        return self.tokens / self.wall

    @property
    def decode(self) -> float:
        return sum(x.decode_rate or 0.0 for x in self.answers)


async def _one(client, messages: list[dict], max_tokens: int) -> Answer:
    ans = Answer(sent=time.perf_counter())
    stream = await client.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            ans.first = ans.first or now
            ans.last = now
            ans.pieces += 1
        if chunk.usage:
            u = chunk.usage
            ans.completion, ans.prompt = u.completion_tokens, u.prompt_tokens
            details = getattr(u, "prompt_tokens_details", None)
            ans.cached = getattr(details, "cached_tokens", None) if details else None
        extra = getattr(chunk, "model_extra", None) or {}
        if ans.cached is None and isinstance(extra.get("timings"), dict) and "cache_n" in extra["timings"]:
            ans.cached = extra["timings"]["cache_n"]
    ans.done = time.perf_counter()
    if not ans.completion:
        ans.completion = ans.pieces  # no usage chunk: one token per content chunk
    return ans


def run_round(url: str, conversations: list[list[dict]], max_tokens: int) -> Round:
    """All ``conversations`` sent at once; returns when every answer has ended."""
    from openai import AsyncOpenAI

    async def go() -> Round:
        async with AsyncOpenAI(base_url=url, api_key="none", timeout=3600, max_retries=0) as client:
            t0 = time.perf_counter()
            answers = await asyncio.gather(*(_one(client, m, max_tokens) for m in conversations))
            return Round(list(answers), time.perf_counter() - t0)

    return asyncio.run(go())


def story_prompts(n: int, tag: str) -> list[list[dict]]:
    return [[{"role": "user", "content": f"({tag}) Write a long, detailed story about {TOPICS[i % len(TOPICS)]}. "
              "Describe every character and place at length."}] for i in range(n)]


# ---------------------------------------------------------------------------------------- formatting
def fmt(xs, nd: int = 1) -> str:
    return ", ".join(f"{x:.{nd}f}" for x in xs)


def best(rounds: list[Round], key: str = "aggregate") -> Round:
    return max(rounds, key=lambda r: getattr(r, key))


def ratio(a: float | None, b: float | None) -> str:
    return f"**{a / b:.2f}×**" if a and b else "—"


# ---------------------------------------------------------------------------------------- S1
def s1(a) -> str:
    gguf = default_model()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    sides = [(f"offload_rt `--parallel {p}`", "ours", p) for p in a.parallel]
    if a.before:  # another checkout of ours (the code before a change), in the same run
        sides += [(f"offload_rt before `--parallel {p}`", "before", p) for p in a.parallel]
    if a.llama_server:
        sides += [(f"llama-server `--parallel {p} -c {p}*{CTX_PER_SLOT}`", "llama", p) for p in a.parallel]
    results: dict[tuple[str, int], list[Round]] = {}
    with contextlib.ExitStack() as stack:  # every server up at once (idle between its rounds): rounds interleave
        servers = []
        for label, kind, p in sides:
            port = free_port()
            cmd = (llama_cmd(a, gguf, port, p) if kind == "llama"
                   else ours_cmd(a, None, port, "--parallel", p, prefix=a.before if kind == "before" else None))
            srv = stack.enter_context(Server(label, cmd, work / f"s1-{kind}-{p}.log", port=port))
            run_round(srv.url, story_prompts(1, "warm-up"), 8)  # first-pass costs out of the figures
            servers.append((srv, p))
        for r in range(a.repeats):
            for c in a.concurrency:
                for srv, p in servers:
                    if c <= p:
                        time.sleep(PAUSE_S)
                        results.setdefault((srv.name, c), []).append(
                            run_round(srv.url, story_prompts(c, f"round {r}"), a.tokens))
    levels = sorted({c for (_, c) in results})
    head = (f"S1 (serving): default model ({gguf.name}), resident, {THREADS} threads each side, greedy, "
            f"max_tokens {a.tokens}, streamed, best of {a.repeats} rounds [all rounds]. {machine_line()}"
            + (f"; llama.cpp {llama_version(a.llama_server)}" if a.llama_server else "; no llama-server given")
            + ".\n\n| server | concurrent requests | aggregate tok/s | rounds | decode tok/s (Σ per request) | "
            "rounds | completion tokens | mean TTFT s |\n|---|---|---|---|---|---|---|---|\n")
    rows, ratios = [], []
    for label, _, p in sides:
        for c in levels:
            rs = results.get((label, c))
            if not rs:
                continue
            b = best(rs)
            ttft = sum(x.ttft for x in b.answers) / len(b.answers)
            rows.append(f"| {label} | {c} | {b.aggregate:.1f} | {fmt(r.aggregate for r in rs)} | "
                        f"{best(rs, 'decode').decode:.1f} | {fmt(r.decode for r in rs)} | {b.tokens} | {ttft:.2f} |")
    agg = {k: best(v).aggregate for k, v in results.items()}
    dec = {k: best(v, "decode").decode for k, v in results.items()}

    def both(x, y) -> str:
        return f"aggregate {ratio(agg.get(x), agg.get(y))}, decode {ratio(dec.get(x), dec.get(y))}"

    for label, kind, p in sides:
        if kind == "llama":
            continue
        ratios += [f"{label}: {c} requests / 1 request: {both((label, c), (label, 1))}"
                   for c in levels if c > 1 and (label, c) in agg]
        other = next((l for l, k, q in sides if k == "llama" and q == p), None)
        ratios += [f"{label} / llama-server `--parallel {p}` at {c} requests: {both((label, c), (other, c))}"
                   for c in levels if other and (label, c) in agg and (other, c) in agg]
        if kind == "ours" and a.before:
            ratios += [f"{label} / before at {c} requests: {both((label, c), (f'offload_rt before `--parallel {p}`', c))}"
                       for c in levels if (label, c) in agg]
    return (head + "\n".join(rows) + "\n\n" + "\n".join(f"- {r}" for r in ratios)
            + f"\n\nLoad average (1 min) at the start / end of the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n")


# ---------------------------------------------------------------------------------------- steps
def steps(a) -> str:
    """The server's compute alone: :func:`offload_rt.batch.step` seconds for B decode rows, in this process,
    beside ``offload-run``'s own decode (one sequence, the fused single-row path) measured just before."""
    from tools.bench_decode import ours as offload_run

    single = offload_run(None, tokens=64, threads=THREADS)["decode_tok_s"]
    import torch

    from offload_rt.batch import Prefill, step
    from offload_rt.build import build
    from offload_rt.config import RunConfig

    load0 = os.getloadavg()[0]
    rows = max(a.concurrency)
    with torch.inference_mode():
        rt = build(RunConfig(model=None, parallel=rows, threads=THREADS, progress=False), serving=True)
        caches = [rt.engine.cache] + [rt.new_cache() for _ in range(rows - 1)]
        for c in caches:
            step(rt.engine, [], [Prefill(c, list(range(100, 140)))])
        def timed(b: int) -> tuple[list[float], float]:
            """Sorted step times and the process's voluntary context switches per step (an OpenMP worker that
            went to sleep between two parallel regions is woken by a futex: one switch each time)."""
            times, csw = [], resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            with torch.inference_mode():
                for i in range(a.step_repeats):
                    t = time.perf_counter()
                    step(rt.engine, [(c, 200 + i) for c in caches[:b]])
                    times.append(time.perf_counter() - t)
                for c in caches[:b]:
                    c.trim(a.step_repeats)
            return sorted(times), (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - csw) / a.step_repeats

        def on_worker(b: int) -> tuple[list[float], float]:  # as the server runs it: a thread other than the main one
            box = []
            worker = threading.Thread(target=lambda: box.append(timed(b)))
            worker.start()
            worker.join()
            return box[0]

        out = []
        for b in a.concurrency:
            (main_t, csw), (worker_t, wcsw) = timed(b), on_worker(b)
            med, wmed = main_t[len(main_t) // 2], worker_t[len(worker_t) // 2]
            out.append(f"| {b} | {1e3 * med:.2f} | {b / med:.1f} | {csw:.0f} | {1e3 * wmed:.2f} | {b / wmed:.1f} | "
                       f"{wcsw:.0f} |")
        rt.close()
    return (f"Server compute alone (`batch.step`, default model resident, {THREADS} threads, 40-token prompts, "
            f"median of {a.step_repeats} steps). {machine_line()}. `offload-run` (one sequence, 64 tokens, the "
            f"fused single-row decode) in the same run: {single:.1f} tok/s.\n\n"
            "| decode rows | step ms, main thread | tok/s | voluntary context switches / step | step ms, another "
            "thread | tok/s | voluntary context switches / step |\n|---|---|---|---|---|---|---|\n" + "\n".join(out)
            + f"\n\nLoad average (1 min) at the start / end of the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n")


# ---------------------------------------------------------------------------------------- S2
def s2(a) -> str:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    stores = work / "stores"
    model = synthetic(work)
    # convert once and calibrate outside the cap (one-time costs; a one-token run does both)
    plan = subprocess.run([*shlex.split(a.ours), model, "--dtype", "bfloat16", "--offload-dir", stores,
                           "--cpu-mem", "1G", "--raw", "-p", "Hi", "-n", "1"], capture_output=True, text=True)
    if plan.returncode != 0:
        raise RuntimeError(f"converting {model} failed:\n{plan.stderr[-2000:]}")
    load0 = os.getloadavg()[0]
    port = free_port()
    cmd = [a.memcap, a.cap, "--cold", "--", *ours_cmd(a, model, port, "--dtype", "bfloat16", "--offload-dir", stores,
                                                     "--cpu-mem", "auto", "--parallel", a.s2_parallel,
                                                     "--ctx-size", a.s2_ctx)]
    rounds: dict[int, list[Round]] = {}
    with Server("offload_rt (memcap)", cmd, work / "s2-ours.log", port=port) as srv:
        ready = srv.ready_s
        run_round(srv.url, story_prompts(1, "warm-up"), 2)
        for r in range(a.repeats):
            for c in (1, a.s2_parallel):
                rounds.setdefault(c, []).append(run_round(srv.url, story_prompts(c, f"round {r}"), a.tokens))
                print(f"s2: {c} requests: {rounds[c][-1].aggregate:.3f} tok/s", file=sys.stderr, flush=True)
    peak = srv.memcap_line()
    one, many = best(rounds[1]), best(rounds[a.s2_parallel])
    rows = "\n".join(f"| {c} | {best(rs).aggregate:.3f} | {fmt((r.aggregate for r in rs), 3)} | "
                     f"{best(rs, 'decode').decode:.3f} | {fmt((r.decode for r in rs), 3)} | {best(rs).tokens} | "
                     f"{sum(x.ttft for x in best(rs).answers) / c:.1f} |" for c, rs in rounds.items())
    return (f"S2 (serving, weights streamed from disk): synthetic Llama 1.2B bf16 ({model}) under `memcap {a.cap} "
            f"--cold`, `--cpu-mem auto --parallel {a.s2_parallel} --ctx-size {a.s2_ctx}`, {THREADS} threads, greedy, "
            f"max_tokens {a.tokens}, best of {a.repeats} rounds [all rounds]; server ready {ready:.0f} s after the "
            f"spawn. {machine_line()}. No llama.cpp baseline (S2 compares our server with itself).\n\n"
            "| concurrent requests | aggregate tok/s | rounds | decode tok/s (Σ per request) | rounds | "
            "completion tokens | mean TTFT s |\n|---|---|---|---|---|---|---|\n" + rows + "\n\n"
            f"{a.s2_parallel} requests / 1 request: aggregate {ratio(many.aggregate, one.aggregate)}, decode "
            f"{ratio(best(rounds[a.s2_parallel], 'decode').decode, best(rounds[1], 'decode').decode)}. {peak}.\n\n"
            f"Load average (1 min) at the start / end of the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n")


# ---------------------------------------------------------------------------------------- S3
def system_prompt(tokens: int, nonce: str) -> str:
    """A long system prompt of about ``tokens`` tokens (SmolLM2's tokenizer: ~31 tokens a rule), unique
    to ``nonce`` from its first words, so no earlier run's cache holds it."""
    rules = [f"Rule {i}: when a customer asks about order number {1000 + 7 * i}, tell them it ships from "
             f"warehouse {chr(65 + i % 26)}{i % 9} within {2 + i % 5} days." for i in range(max(1, tokens // 31))]
    return f"Session {nonce}. You are the support assistant of a mail-order shop. " + " ".join(rules)


def chat(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


QUESTIONS = ["When does order 1070 ship?", "Which warehouse ships order 1140?", "How long does order 1210 take?"]
UNCACHED = "uncached (first request)"


def s3_once(a, gguf: Path, tokens: int) -> list[tuple[str, str, Answer]]:
    """One repeat: (server, request, answer) for each timed request, with a new system prompt."""
    work = Path(a.work)
    system = system_prompt(tokens, uuid.uuid4().hex[:12])
    steps = []

    def ask(srv, what: str, question: str) -> None:
        steps.append((srv.name, what, run_round(srv.url, [chat(system, question)], a.s3_tokens).answers[0]))

    def start(name: str, cmd_of, log: str) -> Server:
        port = free_port()
        srv = Server(name, cmd_of(port), work / log, port=port)
        run_round(srv.url, story_prompts(1, "warm-up"), 4)  # first-pass costs out of the figures
        return srv

    def ours(port: int) -> list:
        return ours_cmd(a, None, port, "--parallel", 1, "--offload-dir", work / "s3-stores")

    with start("offload_rt", ours, "s3-ours-1.log") as srv:
        ask(srv, UNCACHED, QUESTIONS[0])
        ask(srv, "cached (same server)", QUESTIONS[1])
    with start("offload_rt", ours, "s3-ours-2.log") as srv:  # SIGINT flushed the cache; same --offload-dir
        ask(srv, "cached before a restart (read from disk)", QUESTIONS[2])
    if a.llama_server:
        with start("llama-server", lambda port: llama_cmd(a, gguf, port, 1), "s3-llama.log") as srv:
            ask(srv, UNCACHED, QUESTIONS[0])
            ask(srv, "cached (same server, cache_prompt)", QUESTIONS[1])
    return steps


def s3(a) -> str:
    gguf = default_model()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    out = []
    for tokens in a.prefix_tokens:
        repeats = [s3_once(a, gguf, tokens) for _ in range(a.repeats)]
        fastest = {}
        for side, what, _ in repeats[0]:
            runs = [x for steps in repeats for s, w, x in steps if (s, w) == (side, what)]
            b = fastest[(side, what)] = min(runs, key=lambda x: x.ttft)
            base = fastest[(side, UNCACHED)].ttft
            out.append(f"| ~{tokens} | {side} | {what} | {b.ttft:.3f} | {fmt((x.ttft for x in runs), 3)} | "
                       f"{fmt(((x.cached or 0) for x in runs), 0)} | {b.prompt} | {ratio(b.ttft, base)} |")
    return (f"S3 (serving, prefix cache): default model ({gguf.name}), a system prompt of about the given tokens "
            f"(new for each repeat) and a short question, max_tokens {a.s3_tokens}, {THREADS} threads, "
            f"`--parallel 1` both sides (llama-server `-c {CTX_PER_SLOT}`), one untimed warm-up request after each "
            f"start; TTFT = request sent to first content token; best of {a.repeats} [all]. {machine_line()}"
            + (f"; llama.cpp {llama_version(a.llama_server)}" if a.llama_server else "") + ".\n\n"
            "| system prompt tokens | server | request | TTFT s | runs | cached tokens (usage) | prompt tokens | "
            "vs uncached |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(out)
            + f"\n\nLoad average (1 min) at the start / end of the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n")


def passes(a) -> str:
    """What S3's finer granule costs: the server's prefill (``batch.step`` prefill segments, as the batch loop
    runs them) of one ~2,000-token chat prompt in passes of each size of ``--pass-tokens``, interleaved
    round by round in one process (the default model resident, a new KV cache each time)."""
    import torch

    from offload_rt.batch import Prefill, prefill_chunk, step
    from offload_rt.build import build
    from offload_rt.config import RunConfig

    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        rt = build(RunConfig(model=None, parallel=1, threads=THREADS, progress=False), serving=True)
        ids = rt.model.tokenizer.encode_chat(chat(system_prompt(2000, "passes"), QUESTIONS[0]))
        cache = rt.engine.cache

        def prefill(size: int) -> float:
            cache.reset()
            t, done = time.perf_counter(), 0
            while done < len(ids):
                n = prefill_chunk(done, len(ids), size)
                step(rt.engine, [], [Prefill(cache, ids[done:done + n], want_logits=done + n == len(ids))])
                done += n
            return time.perf_counter() - t

        prefill(a.pass_tokens[0])  # first-pass costs out of the figures
        times = {size: [] for size in a.pass_tokens}
        for _ in range(a.repeats):
            for size in a.pass_tokens:
                times[size].append(prefill(size))
        rt.close()
    base = min(times[a.pass_tokens[0]])
    rows = [f"| {size} | {-(-len(ids) // size)} | {len(ids) / min(ts):.0f} | {fmt((len(ids) / t for t in ts), 0)} | "
            f"{ratio(base, min(ts))} |" for size, ts in times.items()]
    return (f"Server prefill of one {len(ids)}-token chat prompt (`batch.step` prefill segments, default model "
            f"resident, {THREADS} threads), passes of each size interleaved, best of {a.repeats} [all]. "
            f"{machine_line()}.\n\n| pass tokens | passes | prefill tok/s | rounds | vs {a.pass_tokens[0]}-token "
            "passes |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nLoad average (1 min) at the start / end of the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n")


def magicpig(a) -> str:
    """What ``--attention magicpig`` costs the server's time to first token, in-process (no HTTP): a sequence's
    prefill of an uncached ~2,000-token chat prompt in the server's passes (``batch.step``, 256 tokens: the
    prefix cache's granule), then its first decode steps, with the prompt's end told to the cache
    (``kv.expect_prompt``: the tables built once, by the last pass) and without it (the code before: built by
    the first pass past the exact window, extended by every later one), interleaved round by round."""
    import torch

    from offload_rt.batch import Prefill, prefill_chunk, step
    from offload_rt.build import build
    from offload_rt.config import RunConfig
    from offload_rt.kv import expect_prompt

    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        rt = build(RunConfig(model=None, parallel=1, threads=THREADS, progress=False, attention="magicpig",
                             ctx_size=CTX_PER_SLOT), serving=True)
        cache, size = rt.engine.cache, rt.prepared.kv.shape.chunk_tokens

        def once(tell: bool, nonce: str) -> tuple[float, float, float]:
            ids = rt.model.tokenizer.encode_chat(chat(system_prompt(a.prefix_tokens[0], nonce), QUESTIONS[0]))
            cache.reset()
            if tell:
                expect_prompt(cache, len(ids))
            t, done = time.perf_counter(), 0
            while done < len(ids):
                n = prefill_chunk(done, len(ids), size)
                res = step(rt.engine, [], [Prefill(cache, ids[done:done + n], want_logits=done + n == len(ids))])
                done += n
            prefill_s = time.perf_counter() - t
            token, times = int(res.prefill_logits[0].argmax()), []
            for _ in range(a.s3_tokens):
                res = step(rt.engine, [(cache, token)])
                times.append(res.seconds)
                token = int(res.decode_logits[0].argmax())
            return prefill_s, times[0], sum(times[1:]) / max(1, len(times) - 1)

        once(True, "warm-up")  # first-pass costs (the sampling kernels included) out of the figures
        sides = {"prompt's end told (expect)": True, "not told (before)": False}
        runs = {label: [] for label in sides}
        for r in range(a.repeats):
            for label, tell in list(sides.items())[::1 if r % 2 else -1]:  # each side first every other round
                runs[label].append(once(tell, f"round {r}"))
        rt.close()
    base = min(p + d for p, d, _ in runs["not told (before)"])
    rows = [f"| {label} | {min(p for p, _, _ in xs):.3f} | {min(d for _, d, _ in xs):.3f} | "
            f"{min(p + d for p, d, _ in xs):.3f} | {fmt((p + d for p, d, _ in xs), 3)} | "
            f"{min(m for _, _, m in xs) * 1e3:.1f} | {ratio(base, min(p + d for p, d, _ in xs))} |"
            for label, xs in runs.items()]
    return (f"`--attention magicpig` in the server's steps (in-process `batch.step`, default model resident, {THREADS} "
            f"threads, `--ctx-size {CTX_PER_SLOT}`): an uncached chat prompt (a new ~{a.prefix_tokens[0]}-token "
            f"system prompt each round) prefilled in {size}-token passes, then {a.s3_tokens} greedy decode steps; "
            f"TTFT = prefill + first decode step; best of {a.repeats} interleaved rounds (alternate order) [all]. "
            f"{machine_line()}."
            "\n\n| cache | prefill s | first decode step s | TTFT s | rounds | later decode step ms | TTFT "
            "speed-up |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nLoad average (1 min) at the start / end of the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n")


# ---------------------------------------------------------------------------------------- build
def build_llama_server(a) -> Path:
    """Configure and build ``llama-server`` from the sdist's vendored llama.cpp (nice 19: a shared machine)."""
    src = find_llama_src(a.llama_python, Path(a.work), a.src)
    steps = [["nice", "-n", "19", "cmake", "-S", src, "-B", a.build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"],
             ["nice", "-n", "19", "cmake", "--build", a.build, "--target", "llama-server", "-j", a.jobs]]
    for cmd in steps:
        print("$ " + shlex.join(map(str, cmd)), file=sys.stderr, flush=True)
        if subprocess.run(list(map(str, cmd))).returncode != 0:
            raise RuntimeError(f"{shlex.join(map(str, cmd[3:6]))} ... failed (output above)")
    binary = Path(a.build) / "bin" / "llama-server"
    print(binary)
    return binary


# ---------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_serve", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    b = sub.add_parser("build-llama-server", help="build llama.cpp's llama-server from the llama-cpp-python sdist")
    b.add_argument("--src", type=Path, default=None, help="vendor/llama.cpp of an unpacked sdist (else found/fetched)")
    b.add_argument("--build", type=Path, default=DEFAULT_BUILD)
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, help="its pip fetches the sdist when none is found")
    b.add_argument("--work", type=Path, default=DEFAULT_WORK)
    for name in ("s1", "s2", "s3", "steps", "passes", "magicpig", "all"):
        s = sub.add_parser(name)
        s.add_argument("--work", type=Path, default=DEFAULT_WORK, help="server logs, the S2 checkpoint, S3's stores")
        s.add_argument("--ours", default=f"{shlex.quote(sys.executable)} -m offload_rt",
                       help="command prefix of our CLI (its `serve` subcommand is appended)")
        s.add_argument("--before", default=None, help="S1: the command prefix of another checkout of ours (the "
                       "code before a change), served beside --ours in the same run")
        s.add_argument("--llama-server", default=None, help="llama-server binary (S1/S3 baseline; "
                       f"default {DEFAULT_BUILD}/bin/llama-server when built)")
        s.add_argument("--out", type=Path, default=None)
        s.add_argument("--repeats", type=int, default=3 if name == "s1" else 2)
        s.add_argument("--tokens", type=int, default=128 if name != "s2" else 32, help="max_tokens (S1, S2)")
        s.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 8])
        s.add_argument("--parallel", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8],
                       help="S1: --parallel of each server")
        s.add_argument("--cap", default="1800M", help="S2: memcap size")
        s.add_argument("--memcap", default=str(MEMCAP), help="S2: the memcap script (../shared/bin/memcap)")
        s.add_argument("--s2-parallel", type=int, default=8)
        s.add_argument("--s2-ctx", type=int, default=512, help="S2: --ctx-size (8 sequences' KV under the cap)")
        s.add_argument("--prefix-tokens", type=lambda t: [int(x) for x in t.split(",")], default=[2000, 2080],
                       help="S3: system prompt sizes (2000: a prompt of 2,024 tokens, 232 past the last whole "
                       "256-token granule; 2080: 2,116 tokens)")
        s.add_argument("--s3-tokens", type=int, default=8, help="S3: max_tokens")
        s.add_argument("--step-repeats", type=int, default=20, help="steps: timed steps per row count")
        s.add_argument("--pass-tokens", type=lambda t: [int(x) for x in t.split(",")], default=[512, 256],
                       help="passes: prefill pass sizes (the first is the baseline)")
    a = p.parse_args(argv)
    try:
        if a.which == "build-llama-server":
            build_llama_server(a)
            return 0
        if a.llama_server is None and (DEFAULT_BUILD / "bin" / "llama-server").is_file():
            a.llama_server = str(DEFAULT_BUILD / "bin" / "llama-server")
        for which in (("s1", "s2", "s3") if a.which == "all" else (a.which,)):
            publish({"s1": s1, "s2": s2, "s3": s3, "steps": steps, "passes": passes, "magicpig": magicpig}[which](a),
                    a.out)
    except RuntimeError as e:
        print(f"bench_serve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
