"""Threads on a shared CPU (waiting policy, core count) and the self-erasing status line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from offload_rt import threads
from offload_rt.status import ERASE, StatusLine

# ---------------------------------------------------------------------------- threads


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def test_spin_limit_is_set_before_openmp_loads():
    code = ("from offload_rt import threads; ok = threads.configure_process(); "
            "import os, torch; print(ok, threads.wait_policy())")
    run = lambda env, c=code: subprocess.run([sys.executable, "-c", c], capture_output=True, text=True,
                                             env=env, timeout=120)
    out = run(_clean_env())
    assert out.stdout.split() == ["True", "GOMP_SPINCOUNT=10000"], out.stderr
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):  # a value the user exported wins
        out = run({**_clean_env(), **mine})
        assert out.stdout.split() == ["True", ",".join(f"{k}={v}" for k, v in mine.items())], out.stderr
    out = run(_clean_env(), "import torch; from offload_rt import threads; print(threads.configure_process())")
    assert out.stdout.strip() == "False", out.stderr  # too late once torch is loaded: it says so


def test_run_reports_threads_and_wait_policy(tmp_path):
    e = subprocess.run([sys.executable, "-m", "offload_rt", "--raw", "--prompt", "Hi", "-n", "2", "--stats", "-t", "1",
                        "--offload-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=600,
                       env={**_clean_env(), "OFFLOAD_RT_BANDWIDTHS": "disk=1.3e9,mem=2.4e10,matvec=1.5e10"})
    assert e.returncode == 0, e.stderr
    rec = json.loads(e.stderr.strip().splitlines()[-1])
    assert rec["threads"] == 1 and rec["omp_wait"] == "GOMP_SPINCOUNT=10000"
    assert "decode_threads" not in rec  # --threads fixes the count: no tuning


def _cpu_cgroup(tmp_path, v2: bool, quota: str):
    cg = tmp_path / "cgroup"
    if v2:
        (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
        (tmp_path / "job").mkdir()
        (tmp_path / "job" / "cpu.max").write_text(quota + "\n")
        cg.write_text("0::/job\n")
    else:
        d = tmp_path / "cpu,cpuacct" / "job"
        d.mkdir(parents=True)
        q, p = quota.split()
        (d / "cpu.cfs_quota_us").write_text(q + "\n")
        (d / "cpu.cfs_period_us").write_text(p + "\n")
        cg.write_text("3:cpu,cpuacct:/job\n0::/\n")
    return cg


@pytest.mark.parametrize("v2, quota, cpus", [(True, "150000 100000", 1.5), (True, "max 100000", None),
                                             (False, "300000 100000", 3.0), (False, "-1 100000", None)])
def test_cgroup_cpu_quota(tmp_path, v2, quota, cpus):
    cg = _cpu_cgroup(tmp_path, v2, quota)
    assert threads._cgroup_cpu_limit(tmp_path, cg) == cpus


def test_available_cores_honours_quota_and_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda *a, **k: 2.5)
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    assert threads.available_cores() == 2
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda *a, **k: None)
    assert threads.available_cores() == 4  # physical cores, not SMT siblings
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert threads.available_cores() == 1


# ---------------------------------------------------------------------------- the status line


class Tty(io.StringIO):
    """One terminal: stderr and stdout interleaved in one buffer, as the user sees them."""

    def isatty(self):
        return True


def slow_pieces(first_after: float, pieces=("Hello", ",", " world")):
    time.sleep(first_after)
    yield from pieces


def test_status_shows_while_waiting_and_is_erased_before_the_text():
    term = Tty()
    status = StatusLine(term, delay=0.05)
    out = []
    for piece in status.until_first_token(slow_pieces(0.3)):
        term.write(piece)
        out.append(piece)
    screen = term.getvalue()
    first_text = screen.index("Hello")
    before, after = screen[:first_text], screen[first_text:]
    assert "waiting for the first token" in before
    assert before.endswith(ERASE)  # erased before the answer starts
    assert after == "Hello, world"  # nothing lands inside the answer
    time.sleep(0.2)  # the ticker must be gone: nothing more is written after the answer
    assert term.getvalue() == screen


def test_prefill_progress_uses_the_same_line():
    term = Tty()
    status = StatusLine(term, delay=10)
    report = status.prefill_progress()

    def gen():
        report(512, 1024)
        report(1024, 1024)
        yield "ok"

    assert list(status.until_first_token(gen())) == ["ok"]
    screen = term.getvalue()
    assert screen.count(ERASE) == 3 and "prefill 512/1024 tokens" in screen and "\n" not in screen


def test_nothing_when_not_a_terminal():
    err = io.StringIO()  # isatty() is False: scripts and --stats readers get no status at all
    status = StatusLine(err, delay=0.01)
    assert list(status.until_first_token(slow_pieces(0.1))) == ["Hello", ",", " world"]
    status.prefill_progress()(1, 2)
    assert err.getvalue() == ""


def test_abandoned_answer_closes_the_generation():
    closed = []

    def gen():
        try:
            yield "a"
            yield "b"
        finally:
            closed.append(True)

    it = StatusLine(Tty(), delay=10).until_first_token(gen())
    assert next(it) == "a"
    it.close()  # Ctrl-C in the REPL
    assert closed == [True]


# ---------------------------------------------------------------------------- the decode thread tuner


def drive(tuner: threads.ThreadTuner, cost, steps: int) -> list[int]:
    used = []
    for i in range(steps):
        n = tuner.next()
        used.append(n)
        tuner.record(n, cost(n, i))
    return used


def test_tuner_keeps_all_cores_when_they_are_faster():
    t = threads.ThreadTuner(2, explore_every=8, max_interval=64)
    assert t.candidates == [2, 1]
    used = drive(t, lambda n, i: {2: 0.010, 1: 0.016}[n], 400)
    assert t.current == 2
    assert used[:2] == [2, 1]  # each count tried once at the start
    assert 4 <= used.count(1) <= 10  # then less and less often: 8, 16, 32, 64, 64, ... steps apart


def test_tuner_follows_a_busy_machine_and_back():
    t = threads.ThreadTuner(2, explore_every=8, max_interval=64)
    busy = range(40, 240)  # another program holds a core: a two-thread step is 4x as slow as one thread
    cost = lambda n, i: ({2: 0.080, 1: 0.020} if i in busy else {2: 0.012, 1: 0.018})[n]
    used = drive(t, cost, 400)
    assert used[20:40].count(2) >= 18
    assert used[43:240].count(1) >= 197 - 6  # within a couple of steps of the load arriving, one thread
    assert used[240 + 64 + 8:].count(2) >= 80 - 4  # after the load is gone, back within one wait
    assert t.current == 2


def test_tuner_candidates_and_noise():
    t = threads.ThreadTuner(8)
    assert t.candidates == [8, 4, 2, 1]
    import random

    rng = random.Random(0)
    best = {8: 0.010, 4: 0.011, 2: 0.015, 1: 0.025}
    used = drive(t, lambda n, i: best[n] * rng.uniform(0.9, 1.1), 400)
    assert used[:4] == [8, 4, 2, 1]
    assert used[200:].count(8) + used[200:].count(4) >= 0.9 * 200  # noise does not send it to the slow ones
    assert threads.ThreadTuner(1).candidates == [1]
