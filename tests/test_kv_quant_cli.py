"""--kv-dtype from the command line: the same text with the quantized KV in RAM and spilled, the quantized
bytes in --stats and --plan, MagicPIG over quantized KV (its plan and stats; refused, as over float KV, once
the KV would spill to disk)."""

from __future__ import annotations

import re

import pytest

from kernels_cpu.kv_quant import KVQuant
from tests.cli_helpers import assert_user_error, run_cli
from tests.test_kv_cli import ARGS, STORY, _stats, store_dir  # noqa: F401 (store_dir: a fixture, used by name)


def test_q4_kv_in_ram_and_spilled_same_text_and_quantized_bytes(store_dir):
    ram = run_cli(*ARGS, "--offload-dir", store_dir, "--kv-dtype", "q4", input=STORY)
    rec = _stats(ram)
    assert rec["kv_dtype"] == "q4" and rec["kv_bytes_by_tier"]["disk"] == 0 and ram.stdout.strip()
    layers, kv_heads, d = 30, 3, 64  # the default model
    assert rec["kv_bytes_per_token"] == 2 * layers * kv_heads * KVQuant("q4", d, 256).row_bytes()
    spilled = run_cli(*ARGS, "--offload-dir", store_dir, "--kv-dtype", "q4", "--kv-cpu-mem", "18M", "--attention",
                      "exact", input=STORY)
    rec = _stats(spilled)
    assert rec["kv_bytes_by_tier"]["disk"] > 0 and rec["kv_disk_read_bytes_per_token"] > 0
    assert spilled.stdout == ram.stdout


def test_plan_counts_quantized_bytes_and_fits_a_longer_context(store_dir):
    def plan(*opts):
        proc = run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "8192", "--kv-cpu-mem", "64M", *opts)
        assert proc.returncode == 0, proc.stderr
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("kv cache: "))
        return line, int(re.search(r"longest context that fits: (\d+)", line).group(1))

    line_f, _ = plan("--kv-dtype", "f16")
    line_q, _ = plan("--kv-dtype", "q4")
    assert "as q4" in line_q and "as f16" in line_f
    host = [int(re.search(r"host [^(]+\((\d+) chunks\)", ln).group(1)) for ln in (line_f, line_q)]
    assert host[1] > 2 * host[0]  # the same RAM holds more than twice the chunks


@pytest.mark.parametrize("args, needle", [
    (("--kv-dtype", "q8", "--attention", "magicpig", "--kv-cpu-mem", "64M"), "MagicPIG"),
    (("--kv-dtype", "q3"), "--kv-dtype"),
])
def test_kv_dtype_errors_are_one_line(store_dir, args, needle):
    assert_user_error(run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "4096", *args), needle)


def test_magicpig_over_q8_kv_plans_and_reports_the_quantized_bytes_and_its_tables(store_dir):
    """--kv-dtype q8 --attention magicpig: the plan's KV line names q8, the newest chunks' floats and the
    tables; a run over ~1000 tokens samples (attention magicpig in --stats) with the q8 bytes per token, and
    the RAM it reports (chunks, tables, floats) within what the plan reserved for the window."""
    opts = ("--kv-dtype", "q8", "--attention", "magicpig")
    proc = run_cli("--plan", "--offload-dir", store_dir, "--ctx-size", "2048", *opts)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("kv cache: "))
    assert "as q8" in line and "newest chunks in floats" in line and "MagicPIG tables" in line, line
    assert "attention magicpig" in line
    rec = _stats(run_cli(*ARGS, "--offload-dir", store_dir, *opts, input=STORY))
    assert rec["attention"] == "magicpig" and rec["kv_dtype"] == "q8" and rec["kv_bytes_by_tier"]["disk"] == 0
    layers, kv_heads, d = 30, 3, 64  # the default model
    assert rec["kv_bytes_per_token"] == 2 * layers * kv_heads * KVQuant("q8", d, 256).row_bytes()
    plan_host = _plan_kv_host_bytes(line)
    assert 0 < rec["kv_bytes_by_tier"]["host"] <= plan_host, (rec["kv_bytes_by_tier"], plan_host)


def _plan_kv_host_bytes(line: str) -> int:
    """The host bytes a --plan KV line adds up: chunks, the floats, the tables (as printed: rounded)."""
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}
    total = 0
    for pat in (r"host ([\d.]+) ?(\w+) \(", r"floats ([\d.]+) ?(\w+)", r"MagicPIG tables ([\d.]+) ?(\w+)"):
        m = re.search(pat, line)
        total += float(m.group(1)) * units[m.group(2)]
    return int(total * 1.01)  # the printed figures are rounded


def test_speculation_over_quantized_kv_gives_the_autoregressive_text(store_dir):
    """Verified trees written across a chunk boundary (the prompt ends 30 tokens before it) close chunks with
    rejected rows in them; the rollback re-closes them from the accepted rows: greedy text as without a draft."""
    prompt = ("The lighthouse keeper wrote in his log every night. He noted the wind, the ships that passed, "
              "the colour of the sea at dusk and the number of gulls on the rocks. ") * 6 + "Then he"
    args = ("--raw", "-n", "60", "--ignore-eos", "--kv-dtype", "q4", "--ctx-size", "1024", "--stats",
            "--offload-dir", store_dir)
    plain = run_cli(*args, input=prompt)
    spec = run_cli(*args, "--draft", "self-int4", "--spec-budget", "16", input=prompt)
    rec = _stats(spec)
    assert _stats(plain)["prompt_tokens"] + 60 > 256 > _stats(plain)["prompt_tokens"]
    assert rec["spec"]["passes"] > 1 and rec["spec"]["accepted_tokens"] > rec["spec"]["passes"]
    assert spec.stdout == plain.stdout
