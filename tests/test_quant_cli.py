"""``--weights`` from the command line: the stored format, its own store beside the others, the plan's
bytes, streamed and resident runs alike, and the user's mistakes."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import assert_user_error, run_cli
from tests.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", default_gguf)


def _answer(tiny, stores, *args):
    proc = run_cli(tiny, "--raw", "--prompt", "The three primary colours are", "-n", "12", "--ignore-eos",
                   "--stats", "--offload-dir", stores, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


def test_weights_int4_and_int8_runs_and_plans_from_their_own_stores(tiny, tmp_path):
    stores = tmp_path / "stores"
    full_text, full = _answer(tiny, stores)  # float32 checkpoint, stored as is
    for choice, fmt, ratio in (("int8", "q8_0", 34 / 128), ("int4", "q4_1", 20 / 128)):
        plan = run_cli(tiny, "--plan", "--offload-dir", stores, "--weights", choice)
        assert plan.returncode == 0, plan.stderr
        line = next(ln for ln in plan.stdout.splitlines() if ln.startswith("stored weights"))
        assert line.startswith(f"stored weights ({choice}): {fmt} ") and "float32" in line  # norms stay float32
        text, stats = _answer(tiny, stores, "--weights", choice)
        assert stats["new_tokens"] == 12 and text.strip()
        # the quantized store holds the matrices at their bits per weight: the resident bytes shrink
        assert stats["placement"]["host"] < (ratio + 0.03) * full["placement"]["host"]
    names = sorted(p.name for p in stores.iterdir() if p.suffix == ".zarr")
    assert len(names) == 3 and any(n.endswith("-int4.zarr") for n in names) and any(n.endswith("-int8.zarr")
                                                                                   for n in names)


def test_streamed_int4_gives_the_resident_int4_text(tiny, tmp_path):
    stores = tmp_path / "stores"
    resident, r = _answer(tiny, stores, "--weights", "int4", "--cpu-mem", "1G")
    streamed, s = _answer(tiny, stores, "--weights", "int4", "--cpu-mem", "18M", "-c", "256")
    assert r["placement"]["disk"] == 0 and s["placement"]["disk"] > 0 and s["disk_read_bytes_decode"] > 0
    assert streamed == resident


def test_unknown_weights_choice_is_refused(tiny):
    err = assert_user_error(run_cli(tiny, "--prompt", "hi", "--weights", "int3"), "--weights")
    assert "int4" in err


def test_preset_may_choose_the_weights(tiny, tmp_path):
    preset = tmp_path / "q.toml"
    preset.write_text('description = "int4 weights"\nweights = "int4"\n')
    plan = run_cli(tiny, "--plan", "--offload-dir", tmp_path / "stores", "--config", preset)
    assert plan.returncode == 0, plan.stderr
    assert "stored weights (int4): q4_1" in plan.stdout
    plan = run_cli(tiny, "--plan", "--offload-dir", tmp_path / "stores", "--config", preset, "--weights", "int8")
    assert "stored weights (int8): q8_0" in plan.stdout  # the command line wins
