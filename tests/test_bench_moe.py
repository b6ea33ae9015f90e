"""tools/bench_moe.py: the bytes-per-token arithmetic, the tables with and without the runtime's ``moe``
stats, failed runs as results, and the O_DIRECT read-rate sweep (no llama.cpp, no model needed)."""

from __future__ import annotations

import argparse
import os

import pytest

from tools import bench_moe as bm
from tools.bench_quant import Run

E, K, L, H, I, V = 8, 2, 3, 64, 32, 100
UNIT = 3 * I * H // 32 * 18  # one Q4_0 expert: gate + up + down


def listing() -> dict:
    tensors = [["token_embd.weight", V * H // 32 * 18, "Q4_0", [H, V]], ["output.weight", 7000, "Q6_K", [H, V]],
               ["output_norm.weight", 4 * H, "F32", [H]]]
    for b in range(L):
        tensors += [[f"blk.{b}.attn_q.weight", 1000, "Q4_0", [H, H]], [f"blk.{b}.ffn_gate_inp.weight", 4 * H * E, "F32", [H, E]]]
        tensors += [[f"blk.{b}.ffn_{p}_exps.weight", E * UNIT // 3, "Q4_0", [H, I, E]] for p in ("gate", "up", "down")]
    return {"experts": E, "used": K, "layers": L, "tensors": tensors}


def test_traffic_counts_k_of_e_experts_and_one_embedding_row():
    t = bm.traffic_of(listing())
    assert t["expert_unit_bytes"] == UNIT and t["active_expert_bytes"] == UNIT * K * L
    rest = 7000 + 4 * H + L * (1000 + 4 * H * E)
    assert t["token_bytes"] == pytest.approx(rest + UNIT * K * L + H // 32 * 18)


def _args(**kw):
    base = dict(threads=2, tokens=64, repeats=3, m1_repeats=3, ctx=512, m0_cpu_mem="12G", m1_cpu_mem="auto",
                cap="1500M", timeout=300.0)
    return argparse.Namespace(**{**base, **kw})


def _ok(tok, **rec):
    return Run(ok=True, rec={"decode_tok_s": tok, "new_tokens": 65, **rec})


def test_failed_runs_are_one_line_reasons():
    r = Run(ok=False, status="failed (rc 2)", rc=2,
            tail="warming up\noffload-run: error: unsupported model_type 'qwen3_moe'; offload_rt runs ...\n")
    assert bm.why(r) == "failed: offload-run: error: unsupported model_type 'qwen3_moe'; offload_rt runs ..."
    assert bm.why(Run(ok=False, status="killed (OOM)", rc=137)) == "killed (OOM)"
    assert bm.why(Run(ok=False, status="failed (rc 1)", rc=1, tail="memcap: peak=1\n")) == "failed: failed (rc 1)"


def test_tables_before_and_after_the_moe_stats_exist():
    traffic = {**bm.traffic_of(listing()), "total_bytes": 10 ** 9}
    failed = Run(ok=False, status="failed (rc 2)", rc=2, tail="offload-run: error: unsupported model_type\n")
    runs = {bm.L_INT4: [failed], bm.L_LLAMA: [_ok(40.0), _ok(50.0)]}
    m0 = bm.m0_table(_args(), runs, traffic, ram_bw=20e9)
    assert "| failed: offload-run: error: unsupported model_type |" in m0 and "| 50.00 | **1.00×** |" in m0

    moe = {"hit_rate": 0.5, "slots_per_layer": 4, "prefetch_accuracy": 0.25,
           "expert_disk_read_bytes_decode": 64 * 10 ** 7, "wait_s": 1.5}
    runs = {bm.L_INT4: [_ok(8.0, moe=moe)], bm.L_GGUF: [_ok(2.0, disk_read_bytes_decode=64 * 4 * 10 ** 7)],
            bm.L_LLAMA: [Run(ok=False, status="killed (OOM)", rc=137, wall_s=120)]}
    rates = {"sequential": [1e9, 2e9], "random": [0.5e9]}
    m1 = bm.m1_table(_args(), runs, traffic, rates)
    row = next(ln for ln in m1.splitlines() if ln.startswith(f"| {bm.L_INT4}"))
    # 10 MB a token from disk at 2 GB/s: a 200 tok/s limit, 8 tok/s is 4 % of it; uniform S/E = 4/8
    assert "| 8.00 |" in row and "0.500 / 0.500" in row and "10.0 MB (moe.expert_disk_read_bytes_decode)" in row
    assert "| 200.00 | 4% |" in row and "wait_s 1.5" in row and "llama.cpp killed (OOM)" in row
    row = next(ln for ln in m1.splitlines() if ln.startswith(f"| {bm.L_GGUF}"))
    assert "40.0 MB (disk_read_bytes_decode)" in row and "| — / — |" in row
    assert "killed (OOM) after 120 s" in m1 and "| — | — | — |" in m1


def test_disk_rates_read_the_whole_file_with_o_direct(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * (1 << 20) + 12345))  # not a multiple of 4 KiB: the tail read is short
    try:
        rates = bm.disk_rates(path, unit=100_000, batch=3, batches=4, rounds=1, threads=2, piece=1 << 20,
                               drop=False)
    except OSError as e:  # a file system without O_DIRECT (tmpfs)
        pytest.skip(f"no O_DIRECT here: {e}")
    assert [len(v) for v in rates.values()] == [1, 1] and all(v[0] > 0 for v in rates.values())
