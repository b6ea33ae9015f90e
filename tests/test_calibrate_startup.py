"""Issue 21, item 11: where the time to the first token goes (tools/bench_startup.py).

The breakdown's child runs ``offload-run`` for real with each step before the first token timed; the
steps must cover the run (their sum is its total) and name every step the issue asks about. No timed
assertions: only that each figure is there and that they add up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import bench_startup

ROOT = Path(__file__).resolve().parents[1]


def test_the_breakdown_covers_the_run_to_its_first_token(tmp_path):
    env = {**__import__("os").environ, "OFFLOAD_RT_CACHE": str(tmp_path / "cache"),
           "OFFLOAD_RT_BANDWIDTHS": "disk=1e9,mem=2e10,matvec=1e10"}
    out = tmp_path / "steps.json"
    r = subprocess.run([sys.executable, "-m", "tools.bench_startup", "--child", str(out), str(time.time()), "--",
                        "-p", "Hi", "-n", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()  # the first token reached stdout
    steps = json.loads(out.read_text())
    assert set(bench_startup.STEP_NAMES) | {"total"} == set(steps)
    for name in ("imports: torch", "imports: numba", "tokenizer", "kernels (Numba cache)", "plan",
                 "weights (resident load)", "prefill + first token"):
        assert steps[name][0] > 0, name  # each step ran (and was timed) before the first token
    for i in (0, 1):  # wall and CPU: the steps add up to the total
        assert sum(v[i] for k, v in steps.items() if k != "total") == pytest.approx(steps["total"][i])


def test_llama_cpp_absent_is_said_not_raised(tmp_path):
    why = bench_startup.llama(str(tmp_path / "no-python"), tmp_path / "m.gguf", "Hi", 1)
    assert isinstance(why, str) and "not found" in why
    why = bench_startup.llama(sys.executable, tmp_path / "m.gguf", "Hi", 1)  # this venv has no llama_cpp
    assert isinstance(why, str) and "not importable" in why


def test_import_costs_are_read_from_importtime():
    costs = dict(bench_startup.import_costs())
    assert "torch" in costs and all(s >= 0 for s in costs.values())
