"""Settings a newcomer gets wrong (issue 21, items 6-8), through the CLI with the default model.

* ``--draft self-int4`` on a resident model: the plan predicts speculation slower than plain decoding,
  so the run goes without it and says so in one line; ``--spec-budget`` still forces it (item 6).
* A budget refusal with a draft names the smallest ``--cpu-mem`` that runs, and that value runs (item 7).
* Settings this machine cannot honour are clamped with one notice line each: ``--cpu-mem`` above its
  RAM becomes ``auto``, ``--threads`` above its usable CPUs that count, ``--gpu-mem`` without a GPU is
  ignored; an empty or blank prompt is refused (item 8).

``--plan`` runs cost no conversion (a fresh checkpoint is planned from its headers), so most checks
use it; the speculation runs answer a few tokens.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.cli_helpers import assert_user_error, run_cli

NOTE = "offload-run: note: "


def notes(proc) -> list[str]:
    return [ln[len(NOTE):] for ln in proc.stderr.splitlines() if ln.startswith(NOTE)]


def stats_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def off(tmp_path_factory):
    return tmp_path_factory.mktemp("off")


def test_a_draft_predicted_slower_is_dropped_with_one_line_unless_the_budget_is_given(off):
    auto = run_cli("-p", "Hi", "-n", "4", "--draft", "self-int4", "--stats", "--offload-dir", off)
    lines = notes(auto)
    assert len(lines) == 1 and lines[0].startswith("--draft self-int4: speculation is predicted slower here ("), \
        auto.stderr
    m = re.search(r"\(([0-9.]+) tok/s with the draft, ([0-9.]+) without it\); running without it", lines[0])
    assert m and float(m.group(1)) < float(m.group(2)), lines[0]
    assert stats_of(auto)["spec"] is None and auto.stdout.strip()
    forced = run_cli("-p", "Hi", "-n", "4", "--draft", "self-int4", "--spec-budget", "8", "--stats",
                     "--offload-dir", off)
    assert notes(forced) == [] and stats_of(forced)["spec"]["budget"] == 8
    assert forced.stdout == auto.stdout  # greedy: the same answer either way


def test_plan_says_speculation_is_off_where_the_draft_cannot_win(off):
    """Equal memory: the target alone in the same --cpu-mem (the draft's bytes holding more of it) is
    predicted faster, and --plan says so in one line in place of the draft's."""
    proc = run_cli("--plan", "--draft", "self-int4", "--offload-dir", off)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("speculation")]
    assert len(lines) == 1 and not any(ln.startswith("draft: ") for ln in proc.stdout.splitlines()), proc.stdout
    m = re.fullmatch(r"speculation: off \(--draft self-int4 predicted ([0-9.]+) tok/s at budget (\d+), ([0-9.]+) "
                     r"tok/s without it in the same --cpu-mem: .*\)", lines[0])
    assert m and float(m.group(1)) < float(m.group(3)), lines[0]


def test_a_refusal_with_a_draft_names_the_smallest_cpu_mem_that_runs(off):
    plan = ("--plan", "--draft", "self-int4", "--spec-budget", "8", "--offload-dir", off)
    err = assert_user_error(run_cli(*plan, "--cpu-mem", "1M"), "the draft", "more than --cpu-mem allows",
                            "raise it to at least")
    least = int(re.search(r"at least (\d+)M", err).group(1))
    assert run_cli(*plan, "--cpu-mem", f"{least}M").returncode == 0
    assert_user_error(run_cli(*plan, "--cpu-mem", f"{least - 1}M"), f"raise it to at least {least}M")


def test_impossible_settings_are_clamped_with_one_notice_each(off):
    from offload_rt.memory.budgets import host_memory_limit
    from offload_rt.threads import usable_cpus

    cpus = usable_cpus()
    proc = run_cli("--plan", "--stats", "--cpu-mem", "10T", "-t", 8 * cpus, "--gpu-mem", "8G", "--offload-dir", off)
    rec = stats_of(proc)
    lines = notes(proc)
    assert any(ln.startswith("--cpu-mem 10.00 TiB is more than this machine has") and "--cpu-mem auto" in ln
               for ln in lines), proc.stderr
    assert 0 < rec["host_budget_bytes"] < host_memory_limit() and "TiB" not in proc.stdout
    assert f"--threads {8 * cpus} is more than the {cpus} CPUs this process may use; using {cpus}" in lines
    assert rec["threads"] == cpus
    if not torch.cuda.is_available():
        assert "--gpu-mem 8G is ignored: no CUDA device is available here; running on the CPU" in lines
        assert rec["device"] == "cpu"
    assert len(lines) == (3 if not torch.cuda.is_available() else 2), proc.stderr


@pytest.mark.parametrize("prompt", ["", "  \n\t "])
def test_an_empty_or_blank_prompt_is_refused(off, prompt):
    assert_user_error(run_cli("--prompt", prompt, "--offload-dir", off), "the prompt is empty")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    from tests.test_plan_runs import write_checkpoint

    tmp = tmp_path_factory.mktemp("tiny")
    return write_checkpoint(tmp / "ckpt", default_gguf, tied=False, dtype=torch.float32, vocab=1000, layers=4), tmp


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_draft_larger_than_the_budget_names_the_budget_that_runs(tiny, monkeypatch, device):
    """In-process, on the plan of an unconverted tiny checkpoint; CUDA with the GPU's figures stubbed as in
    tests/test_gpu_prepare.py: the refusal's figure is accepted, the one below it refused again."""
    from offload_rt import runtime
    from offload_rt.config import RunConfig
    from offload_rt.errors import BudgetError
    from offload_rt.loader import open_model
    from offload_rt.memory import calibrate, gpu
    from offload_rt.spec.setup import open_draft
    from tests.test_gpu_prepare import CONTEXT, HINTS, TOTAL

    monkeypatch.setattr(gpu, "measure_gpu_context", lambda *a, **k: CONTEXT)
    monkeypatch.setattr(gpu, "gpu_free_total", lambda *a, **k: (TOTAL - CONTEXT, TOTAL))
    monkeypatch.setattr(gpu, "cap_allocator", lambda *a: None)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a, **k: 1e11)
    ckpt, tmp = tiny
    option = "--gpu-mem" if device == "cuda" else "--cpu-mem"

    def prepare(mem: int):
        cfg = RunConfig(model=str(ckpt), device=device, cpu_mem=1 << 30 if device == "cuda" else mem,
                        gpu_mem=mem if device == "cuda" else None, bandwidth_hints=HINTS, ctx_size=64,
                        prefill_chunk=4, progress=False, offload_dir=tmp / "off", draft="self-int4", spec_budget=8)
        model = open_model(cfg, plan_only=True)
        draft = open_draft(cfg, model, device, plan_only=True)
        return runtime.prepare(cfg, model.store, model.args, model.dtype, model.groups, device, draft=draft,
                               plan_only=True)

    def least(mem: int) -> int:
        with pytest.raises(BudgetError) as e:
            prepare(mem)
        m = re.search(rf"at least (?:{option} )?(\d+)M", str(e.value))
        assert m, str(e.value)
        return int(m.group(1)) << 20

    # below the draft alone (on a GPU: beside the context and the allocator's margin)
    need = least(CONTEXT + (66 << 20) if device == "cuda" else 1)
    assert prepare(need).draft is not None
    assert least(need - (1 << 20)) == need
    assert not (tmp / "off").exists()  # planned, never converted
