"""``--plan`` runs nothing (issue 21, item 4): a checkpoint not converted yet is planned from its headers.

The plan view of a source (storage.convert.SourceView: the formats ``--weights`` would store, each MoE
layer's experts packed into units) must give the planner exactly what the converted store gives it:
the same tensors, bytes and expert layouts, hence the same placement, expert plan and refusals. Through
the CLI, ``--plan`` on a fresh checkpoint (a Hugging Face directory, a GGUF, a MoE model) leaves the
offload dir without a store and prints what ``--plan`` prints once the store exists; with no
calibration cached it plans with its defaults, says so, and measures nothing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from offload_rt import models, runtime
from offload_rt.config import RunConfig
from offload_rt.engine import model_groups
from offload_rt.errors import BudgetError
from storage.convert import SourceView, open_or_convert
from tests.cli_helpers import run_cli

HINTS = {"disk_read": 1.3e9, "matvec": 1.5e10}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """Tiny checkpoints: a Hugging Face llama, a GGUF llama with q8_0/q4_1 matrices, a qwen3_moe directory
    and a Mixtral GGUF whose experts mix q8_0 and q4_0."""
    from tests.gguf_models import write_hf_gguf, write_moe_gguf
    from tests.hf_models import tiny_model, write_checkpoint
    from tests.moe_models import tiny_moe_model, write_moe_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    out = {"hf": write_checkpoint(root / "hf", tiny_model("llama", seed=1, num_hidden_layers=3))}
    out["gguf"] = root / "tiny.gguf"
    write_hf_gguf(out["gguf"], tiny_model("llama", seed=2, num_hidden_layers=3), "llama",
                  lambda name, a: (Q.Q8_0 if "ffn" in name else Q.Q4_1) if a.ndim == 2 else Q.F32)
    out["moe"] = write_moe_checkpoint(root / "moe", tiny_moe_model("qwen3_moe", seed=3))
    mixtral = write_moe_checkpoint(root / "mixtral", tiny_moe_model("mixtral", seed=4))
    out["moe-gguf"] = root / "mixtral.gguf"
    write_moe_gguf(out["moe-gguf"], mixtral,
                   lambda name, a: (Q.Q4_0 if "down" in name else Q.Q8_0) if "exps" in name else Q.F32)
    return out


def outcome(store, budget: int, tmp, weights: str):
    """What runtime.prepare makes of ``store`` under ``budget``: the placement and expert plan, or the refusal."""
    args = models.args_from_config(store.model_config)
    cfg = RunConfig(cpu_mem=budget, device="cpu", bandwidth_hints=HINTS, ctx_size=64, prefill_chunk=4,
                    progress=False, offload_dir=tmp, weights=weights)
    try:
        p = runtime.prepare(cfg, store, args, torch.float32, model_groups(args), "cpu")
    except BudgetError as e:
        return "refused", str(e)
    return p.placement, p.experts, p.specs, p.kv


@pytest.mark.parametrize("weights", ["auto", "int4"])
@pytest.mark.parametrize("name", ["hf", "gguf", "moe", "moe-gguf"])
def test_the_source_view_plans_as_the_converted_store(ckpts, tmp_path, name, weights):
    view = SourceView(ckpts[name], weights)
    store = open_or_convert(ckpts[name], tmp_path / "stores", weights=weights, progress=False)
    assert view.tensor_names == store.tensor_names
    for n in store.tensor_names:
        assert view.info(n) == store.info(n), n
        assert view.expert_layout(n) == store.expert_layout(n), n
    assert view.model_config == store.model_config
    assert view.manifest["weights"] == store.manifest["weights"]
    assert view.manifest["source"]["kind"] == store.manifest["source"]["kind"]
    assert view.total_bytes == store.total_bytes
    assert view.tokenizer_file.read_bytes() == store.tokenizer_file.read_bytes()
    moe = name.startswith("moe")
    assert any(store.expert_layout(n) for n in store.tensor_names) == moe
    # everything resident, then budgets down to below the minimum: streamed layers, an expert cache
    roomy = outcome(store, 1 << 40, tmp_path, weights)
    assert outcome(view, 1 << 40, tmp_path, weights) == roomy
    least = roomy[0].min_working_set + (roomy[1].spec.min_bytes if moe else 0)
    for budget in (least + (64 << 10), least, least - 1):
        assert outcome(view, budget, tmp_path, weights) == outcome(store, budget, tmp_path, weights), budget
    assert outcome(store, least, tmp_path, weights)[0] != "refused"
    assert outcome(view, least - 1, tmp_path, weights)[0] == "refused"


def plan_lines(proc) -> list[str]:
    """``--plan``'s report without the process's measured baseline (RSS differs from launch to launch)."""
    assert proc.returncode == 0, proc.stderr
    return [ln for ln in proc.stdout.splitlines() if not ln.startswith("process baseline")]


@pytest.mark.parametrize("name,args", [("gguf", ()), ("moe", ("--weights", "int4", "--cpu-mem", "40M"))])
def test_plan_on_a_fresh_checkpoint_writes_no_store_and_plans_as_after_conversion(ckpts, tmp_path, name, args):
    off, cache = tmp_path / "off", tmp_path / "cache"
    # no calibration cached, no override: the defaults, said in the output, nothing measured or written
    env = {"OFFLOAD_RT_BANDWIDTHS": "", "OFFLOAD_RT_CACHE": str(cache)}
    fresh = run_cli(ckpts[name], "--plan", "--offload-dir", off, *args, env=env)
    lines = plan_lines(fresh)
    assert not off.exists() or not any(off.iterdir()), list(off.iterdir())
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))
    assert any(ln.startswith("bandwidth source: defaults") and "not measured on this machine yet" in ln
               for ln in lines), fresh.stdout
    assert any(ln.startswith("placement: ") for ln in lines)
    if name == "moe":
        assert any(ln.startswith("experts: ") for ln in lines), fresh.stdout
    open_or_convert(ckpts[name], off, weights=dict(zip(args[::2], args[1::2])).get("--weights", "auto"),
                    progress=False)
    assert plan_lines(run_cli(ckpts[name], "--plan", "--offload-dir", off, *args, env=env)) == lines


def test_plan_bandwidths_come_from_the_cache_or_the_defaults(tmp_path, monkeypatch):
    from offload_rt.memory import calibrate

    monkeypatch.delenv(calibrate.ENV_OVERRIDE, raising=False)
    monkeypatch.setenv("OFFLOAD_RT_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(offload_dir=tmp_path / "off")
    bw, note = runtime.plan_bandwidths(cfg, cuda=False)
    assert bw == dataclasses.replace(runtime.PLAN_DEFAULT_BANDWIDTHS, h2d=None) and "defaults" in note
    assert runtime.plan_bandwidths(cfg, cuda=True)[0].h2d == runtime.PLAN_DEFAULT_BANDWIDTHS.h2d
    assert not (tmp_path / "cache").exists() and not (tmp_path / "off").exists()
    measured = dataclasses.replace(bw, disk_read=2e9, matvec=3e10)
    calibrate.load_or_measure(cfg.store_dir, cache_dir=tmp_path / "cache", measure=lambda *a, **k: measured)
    assert runtime.plan_bandwidths(cfg, cuda=False) == (measured, "bandwidth source: measured on this machine (cached)")
