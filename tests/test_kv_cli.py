"""The KV options from the command line: spilling to disk within budgets, --plan, user errors."""

from __future__ import annotations

import json

import pytest

from offload_rt.memory.baseline import RUNTIME_SLACK_BYTES
from tests.cli_helpers import assert_user_error, run_cli

# ~1000 tokens: 4 chunks of 256 per layer, the default model's KV ~45 MB at float32
STORY = ("The lighthouse keeper wrote in his log every night. He noted the wind, the ships that passed, "
         "the colour of the sea at dusk and the number of gulls on the rocks. ") * 24
ARGS = ("--raw", "--max-new-tokens", "12", "--ignore-eos", "--ctx-size", "2048", "--stats")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


def _stats(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_kv_spills_to_disk_same_text_and_rss_within_budget(store_dir, tmp_path):
    ref = run_cli(*ARGS, "--offload-dir", store_dir, input=STORY)
    rec_ref = _stats(ref)
    assert rec_ref["kv_bytes_by_tier"]["disk"] == 0 and rec_ref["attention"] == "exact"
    cpu_mem = 1024 * 2**20
    trace = tmp_path / "trace.json"
    proc = run_cli(*ARGS, "--offload-dir", store_dir, "--cpu-mem", "1G", "--kv-cpu-mem", "32M", "--profile", trace,
                   "--attention", "exact", input=STORY)
    rec = _stats(proc)
    # the trace shows KV chunk reads/writes and CPU attention on their own tracks
    events = json.loads(trace.read_text())["traceEvents"]
    spans = {(e["cat"], e["name"].split(" layer")[0]) for e in events if e.get("ph") == "X"}
    assert {("kv_disk", "kv read"), ("kv_disk", "kv write"), ("cpu_attn", "attention")} <= spans
    import subprocess
    import sys

    rep = subprocess.run([sys.executable, "-m", "tools.report", str(trace), "-o", str(tmp_path / "r.html")],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert proc.stdout == ref.stdout  # the same greedy text with most of the KV on disk
    kv = rec["kv_bytes_by_tier"]
    assert kv["disk"] > 0 and 0 < kv["host"] <= 32 * 2**20
    assert rec["kv_disk_write_bytes"] > 0 and rec["kv_disk_read_bytes"] >= rec["new_tokens"] * kv["disk"] // 2
    chunks = rec["kv_disk_chunks_decode"]  # exact: decode reads every disk chunk at every step
    assert chunks["read"] == chunks["spilled"] > 0 and rec["kv_disk_read_bytes_per_token"] > 0
    assert 0 < rec["attention_s"] <= rec["decode_s"]
    assert rec["run_peak_rss_bytes"] <= rec["baseline_bytes"] + cpu_mem + RUNTIME_SLACK_BYTES, rec
    assert rec["run_peak_rss_bytes"] <= rec["baseline_bytes"] + rec["host_reserved_peak_bytes"] + \
        RUNTIME_SLACK_BYTES, rec
    assert not any((store_dir / "kv-cache").glob("kv-*"))  # the spilled chunks were removed at exit


def test_plan_shows_the_kv_split_and_longest_context(store_dir):
    proc = run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "8192", "--kv-cpu-mem", "64M")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("kv cache: "))
    assert "8192 tokens" in line and "disk" in line and "longest context that fits" in line
    assert "attention select" in line and "key bounds" in line  # auto: selective disk reads once the KV spills
    proc = run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "8192", "--kv-cpu-mem", "64M", "--attention",
                   "exact")
    assert "attention exact" in next(ln for ln in proc.stdout.splitlines() if ln.startswith("kv cache: "))
    proc = run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "8192", "--attention", "select")
    assert "attention exact" in next(ln for ln in proc.stdout.splitlines() if ln.startswith("kv cache: "))  # no disk
    proc = run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "8192", "--attention", "magicpig")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("kv cache: "))
    assert "MagicPIG tables" in line and "attention magicpig" in line


@pytest.mark.parametrize("args, needle", [
    (("--kv-cpu-mem", "1M"), "--kv-cpu-mem"),
    (("--kv-cpu-mem", "auto"), "--kv-cpu-mem"),
    (("--kv-cpu-mem", "64M", "--attention", "magicpig"), "MagicPIG"),
    (("--lsh-k", "40"), "--lsh-k"),
    (("--kv-select-share", "0"), "--kv-select-share"),
])
def test_kv_option_errors_are_one_line(store_dir, args, needle):
    assert_user_error(run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "4096", *args), needle)


@pytest.mark.parametrize("opts, attention, spilled", [(("--kv-cpu-mem", "32M"), "select", True),
                                                     (("--attention", "magicpig"), "magicpig", False)])
def test_repl_with_kv_options_keeps_the_chat(store_dir, opts, attention, spilled):
    from tests.test_repl import Term

    term = Term("--offload-dir", store_dir, "--max-new-tokens", "48", "--ctx-size", "2048", *opts)
    try:
        term.expect(b">>> ")
        term.send(STORY[:2400].encode() + b" What did the keeper write in?\r")
        assert b"log" in term.expect(b">>> ").lower()
        term.send(b"/stats\r")
        rec = json.loads(next(ln for ln in term.expect(b">>> ").decode().splitlines() if ln.startswith("{")))
        assert (rec["kv_bytes_by_tier"]["disk"] > 0) == spilled and rec["attention"] == attention
        term.send(b"Thanks. And what colour was the sea?\r")
        term.expect(b">>> ")
        term.send(b"\x04")
        assert term.proc.wait(60) == 0
    finally:
        term.close()
