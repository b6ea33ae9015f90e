"""Tiered runs through the CLI: --plan, streamed = resident output, budgets held, traces, reports."""

import json
import math
import re

import pytest

from offload_rt.memory.baseline import RUNTIME_SLACK_BYTES
from tests import plan_report as pr
from tests.cli_helpers import assert_user_error, run_cli

PROMPT = ("--raw", "--prompt", "The three primary colours are", "--max-new-tokens", "24", "--ignore-eos")



def run_f32(*args, **kw):
    """The CLI on the default model dequantized to float32 (543 MB: budgets here are sized for it)."""
    return run_cli(*args, "--weights", "f32", **kw)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


def stats_of(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


def default_store(store_dir):
    """The default model's f32 store in ``store_dir`` (converted here if a --plan left none: it writes nothing)."""
    import storage
    from offload_rt.loader import default_model_path

    return storage.open_or_convert(default_model_path(), store_dir, weights="f32", progress=False)


def group_bytes(store) -> dict[str, int]:
    """Bytes per weight group at float32 (the GGUF's compute dtype), counted from the store's tensors.

    A tied embedding is the head's output matrix, so it belongs to the head."""
    cfg = store.model_config
    out: dict[str, int] = {}
    for name in store.manifest["tensors"]:
        nbytes = 4 * math.prod(store.info(name).shape)
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            out[f"layer.{m.group(1)}"] = out.get(f"layer.{m.group(1)}", 0) + nbytes
        elif name in ("model.norm.weight", "lm_head.weight") or (
                name == "model.embed_tokens.weight" and cfg.get("tie_word_embeddings")):
            out["head"] = out.get("head", 0) + nbytes
    return out


def kv_bytes(store) -> int:
    """The KV cache for the default context window: K and V, every layer, float32."""
    from offload_rt.runtime import DEFAULT_CTX

    cfg = store.model_config
    ctx = min(cfg["max_position_embeddings"], DEFAULT_CTX)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * ctx * cfg["num_key_value_heads"] * head_dim * 4


def check_streaming_plan(report: str, store, budget: int) -> None:
    """The --plan report of a budget too small for the whole model, against bytes counted independently."""
    groups = group_bytes(store)
    tiers = pr.placement(report)
    assert set(tiers) == set(groups) and tiers["head"] == "host"
    on_disk = [g for g, t in tiers.items() if t == "disk"]
    host_weights = sum(b for g, b in groups.items() if tiers[g] == "host")
    disk_weights = sum(groups[g] for g in on_disk)
    assert on_disk and f"({len(on_disk)} of {len(groups)} groups streamed)" in pr.line(report, "weights")
    weights = pr.sizes(pr.line(report, "weights"))
    assert pr.close(weights["host"], host_weights) and pr.close(weights["disk"], disk_weights)
    assert pr.close(pr.sizes(pr.line(report, "per token"))["disk"], disk_weights)  # all of it, every token
    staging = pr.sizes(pr.line(report, "staging buffers"))
    assert pr.close(staging["cache"], kv_bytes(store))
    assert staging["host"][1] >= pr.in_flight(report) * max(groups[g] for g in on_disk)  # a slot per group in flight
    used = pr.sizes(pr.line(report, "memory used"))["host"]
    parts = [weights["host"], staging["host"], staging["cache"], staging.get("activations", (0, 0))]
    assert sum(p[0] for p in parts) <= used[1] and used[0] <= sum(p[1] for p in parts)  # the parts add up
    assert used[0] <= budget  # within --cpu-mem
    assert used[1] + min(groups[g] for g in on_disk) > budget  # and nothing more fits: one more resident layer would not


def test_plan_prints_table_and_runs_nothing(store_dir):
    budget = 350 * 2**20
    proc = run_f32("--cpu-mem", "350M", "--plan", "--offload-dir", store_dir, input="Tell me a story.")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model: SmolLM2-135M-Instruct") and "30 layers, float32, device cpu" in lines[0]
    assert all(re.match(r"[a-z][a-z0-9 ()/]*: ", ln) for ln in lines), proc.stdout  # "label: ..." lines only: no answer
    check_streaming_plan(proc.stdout, default_store(store_dir), budget)
    # a budget that holds everything: every group resident, nothing read per token
    proc = run_f32("--cpu-mem", "4G", "--plan", "--offload-dir", store_dir)
    assert proc.returncode == 0, proc.stderr
    assert set(pr.placement(proc.stdout).values()) == {"host"}
    assert pr.close(pr.sizes(pr.line(proc.stdout, "weights"))["disk"], 0)
    assert pr.close(pr.sizes(pr.line(proc.stdout, "weights"))["host"], sum(group_bytes(default_store(store_dir)).values()))


def test_budget_below_minimum_working_set(store_dir):
    err = assert_user_error(run_f32("--cpu-mem", "20M", "--plan", "--offload-dir", store_dir),
                            "minimum working set")
    assert "--cpu-mem" in err


def test_streamed_output_identical_and_rss_within_budget(store_dir):
    resident = stats_of(run_f32(*PROMPT, "--stats", "--offload-dir", store_dir, "--cpu-mem", "4G"))
    proc = run_f32(*PROMPT, "--stats", "--offload-dir", store_dir, "--cpu-mem", "350M")
    streamed = stats_of(proc)
    ref = run_f32(*PROMPT, "--offload-dir", store_dir, "--cpu-mem", "4G").stdout
    assert proc.stdout == ref  # same greedy tokens, streamed from disk
    assert streamed["placement"]["disk"] > 0 and resident["placement"]["disk"] == 0
    # everything streamed is read again every pass
    assert streamed["disk_read_bytes"] > 10 * streamed["placement"]["disk"]
    # Budgets hold with whatever torch build is installed: the process's own cost is measured in the
    # run (baseline), and while it serves the process stays within baseline + --cpu-mem + the stated
    # slack; tighter, within baseline + the bytes the tiers actually reserved + slack (every placed
    # byte is reserved). peak_rss_bytes is the whole process's, startup included.
    for rec, cpu_mem in ((streamed, 350 * 2**20), (resident, 4 * 2**30)):
        assert rec["runtime_slack_bytes"] == RUNTIME_SLACK_BYTES
        assert 100 * 2**20 < rec["baseline_bytes"] < rec["run_peak_rss_bytes"]
        assert rec["peak_rss_bytes"] == max(rec["run_peak_rss_bytes"], rec["startup_peak_rss_bytes"])
        assert rec["host_reserved_peak_bytes"] <= rec["host_budget_bytes"] == cpu_mem
        assert rec["run_peak_rss_bytes"] <= rec["baseline_bytes"] + cpu_mem + RUNTIME_SLACK_BYTES, rec
        assert rec["run_peak_rss_bytes"] <= rec["baseline_bytes"] + rec["host_reserved_peak_bytes"] + \
            RUNTIME_SLACK_BYTES, rec
    # and well under the resident run's (the weights really are not all in RAM).
    assert streamed["run_peak_rss_bytes"] < resident["run_peak_rss_bytes"] - 100 * 2**20


def test_profile_trace_and_report(store_dir, tmp_path):
    trace = tmp_path / "trace.json"
    proc = run_f32(*PROMPT, "--offload-dir", store_dir, "--cpu-mem", "350M", "--profile", trace)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(trace.read_text())
    events = data["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"compute", "disk"} <= tracks
    reads = [e for e in events if e.get("cat") == "disk" and e.get("ph") == "X"]
    assert reads and all(e["args"]["bytes"] > 0 for e in reads)
    assert any(e.get("name") == "occupancy" for e in events)
    assert data["otherData"]["tiers"]["layer.0"] in ("host", "disk")
    # the report renders this real trace
    import subprocess
    import sys

    html = tmp_path / "report.html"
    rep = subprocess.run([sys.executable, "-m", "tools.report", str(trace), "-o", str(html)], capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    text = html.read_text()
    assert "layer.0" in text and "disk" in text
    png = html.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_preset_config(store_dir, tmp_path):
    from offload_rt.presets import load_preset

    # a shipped preset: its bandwidth hints replace the measured ones; --cpu-mem on the command line wins
    proc = run_f32("--config", "cpu-nvme", "--cpu-mem", "350M", "--plan", "--offload-dir", store_dir)
    assert proc.returncode == 0, proc.stderr
    hints = load_preset("cpu-nvme")["bandwidths"]
    assert f"matvec {hints['matvec'] / 1e9:.2f} GB/s" in pr.line(proc.stdout, "bandwidths")
    check_streaming_plan(proc.stdout, default_store(store_dir), 350 * 2**20)
    # a preset file of one's own: its budget and prefetch depth are the plan's
    mine = tmp_path / "mine.toml"
    mine.write_text('cpu_mem = "380M"\nprefetch_depth = 3\n[bandwidths]\ndisk_read = 2.0e9\nmatvec = 9.0e9\n')
    proc = run_f32("--config", mine, "--plan", "--offload-dir", store_dir)
    assert proc.returncode == 0, proc.stderr
    assert pr.in_flight(proc.stdout) == 3
    assert "disk 2.00 GB/s" in pr.line(proc.stdout, "bandwidths") and "matvec 9.00 GB/s" in proc.stdout
    check_streaming_plan(proc.stdout, default_store(store_dir), 380 * 2**20)
    assert_user_error(run_f32("--config", "no-such-preset", "--plan"), "no-such-preset")
