"""Every mistake a user can make: one line on stderr, exit 2, no traceback, nothing half-written."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from tests import plan_report as pr
from tests.cli_helpers import assert_user_error, default_sigint, run_cli
from tests.tiny_checkpoint import write_tiny_checkpoint


def test_missing_path(tmp_path):
    assert_user_error(run_cli(tmp_path / "nope", "--prompt", "hi"), "does not exist")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    assert_user_error(run_cli(tmp_path, "--prompt", "hi", "--offload-dir", tmp_path / "stores"),
                      "not a model checkpoint")
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    err = assert_user_error(run_cli(tmp_path, "--prompt", "hi", "--offload-dir", tmp_path / "stores"),
                            "unsupported model_type 'gpt2'")
    assert "llama" in err
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())


def test_corrupt_safetensors_header(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
                                                      "intermediate_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{not json")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert_user_error(run_cli(tmp_path, "--prompt", "hi", "--offload-dir", tmp_path / "stores"), "model.safetensors")
    stores = tmp_path / "stores"
    assert not stores.exists() or not any(stores.iterdir())


def test_truncated_gguf(tmp_path, default_gguf):
    bad = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    assert_user_error(run_cli(bad, "--prompt", "hi", "--offload-dir", tmp_path / "stores"), "cut.gguf")
    stores = tmp_path / "stores"
    assert not stores.exists() or not [p for p in stores.iterdir()]


@pytest.mark.parametrize("opt", ["--cpu-mem", "--gpu-mem"])
def test_bad_size(opt):
    err = assert_user_error(run_cli("--prompt", "hi", opt, "12Q"), "bad size '12Q'")
    assert opt in err


def test_prompt_and_prompt_file_together(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("hi")
    assert_user_error(run_cli("--prompt", "hi", "--prompt-file", f), "either --prompt or --prompt-file")


def test_missing_prompt_file(tmp_path):
    assert_user_error(run_cli("--prompt-file", tmp_path / "none.txt"), "none.txt")


def test_unknown_option_is_one_line():
    assert_user_error(run_cli("--bogus"), "--bogus")


def test_empty_piped_prompt():
    assert_user_error(run_cli(input=""), "no prompt")


def test_debug_shows_traceback(tmp_path):
    proc = run_cli(tmp_path / "nope", "--prompt", "hi", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ---------------------------------------------------------------------------- during a run (tiny checkpoint)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    """(checkpoint dir, store dir) of a tiny random checkpoint; the store is converted here, in-process."""
    import storage

    d = tmp_path_factory.mktemp("tiny")
    ckpt = write_tiny_checkpoint(d / "tiny", default_gguf)
    storage.open_or_convert(ckpt, d / "stores", progress=False)
    return ckpt, d / "stores"


def test_corrupt_chunk_hit_mid_stream(tiny, tmp_path):
    """A streamed layer's chunk fails its checksum when the reader first fetches it: one line naming the tensor."""
    ckpt, stores = tiny
    (path,) = stores.glob("tiny-*.zarr")
    mine = tmp_path / "stores"
    shutil.copytree(path, mine / path.name)  # a private copy to damage
    plan = run_cli(ckpt, "--offload-dir", mine, "--cpu-mem", "36M", "--plan")
    assert plan.returncode == 0, plan.stderr
    streamed = [g for g, t in pr.placement(plan.stdout).items() if t == "disk" and g.startswith("layer.")]
    assert streamed, plan.stdout
    tensor = f"model.layers.{streamed[-1].split('.')[1]}.mlp.down_proj.weight"
    chunk = next(p for p in (mine / path.name / tensor).rglob("*") if p.is_file() and p.name != "zarr.json")
    data = chunk.read_bytes()
    chunk.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    proc = run_cli(ckpt, "--offload-dir", mine, "--cpu-mem", "36M", "--prompt", "hi", "-n", "4")
    assert_user_error(proc, tensor, "--rebuild-store")
    assert proc.stdout == ""


def test_budget_below_the_minimum_in_a_real_run(tiny):
    ckpt, stores = tiny
    proc = run_cli(ckpt, "--offload-dir", stores, "--cpu-mem", "20M", "--prompt", "hi")
    err = assert_user_error(proc, "--cpu-mem 20M", "minimum working set")
    assert "raise it to at least" in err and proc.stdout == ""


def _answering(tiny):
    """offload-run answering at length (stdout a pipe), once its first bytes have arrived."""
    ckpt, stores = tiny
    env = dict(os.environ, OFFLOAD_RT_BANDWIDTHS="disk=1.3e9,mem=2.4e10,matvec=1.5e10")
    proc = subprocess.Popen([sys.executable, "-m", "offload_rt", str(ckpt), "--offload-dir", str(stores),
                             "--prompt", "Tell me a long story.", "-n", "1000", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    assert proc.stdout.read(1), proc.stderr.read().decode()  # the answer is streaming
    return proc


def test_ctrl_c_in_one_shot_mode(tiny):
    proc = _answering(tiny)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.decode().splitlines() == ["offload-run: interrupted"]


def test_closed_pipe_ends_quietly(tiny):
    """`offload-run ... | head -c 1`: the reader leaves; the run stops with status 0 and says nothing."""
    proc = _answering(tiny)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""


# ---------------------------------------------------------------------------- free space for a conversion


def _no_room(free: int):
    return lambda path: shutil._ntuple_diskusage(total=10 * free + 1, used=9 * free + 1, free=free)


def test_too_little_free_space_stops_a_conversion_before_it_writes(tiny, tmp_path, monkeypatch):
    import storage
    from storage.errors import NoSpaceError

    monkeypatch.setattr(shutil, "disk_usage", _no_room(1000))
    stores = tmp_path / "offload" / "stores"
    with pytest.raises(NoSpaceError) as e:
        storage.open_or_convert(tiny[0], stores, progress=False)
    tensor_bytes = sum(f.stat().st_size for f in tiny[0].glob("*.safetensors"))
    assert e.value.needed > tensor_bytes and e.value.free == 1000
    msg = str(e.value)
    assert f"{e.value.needed} bytes" in msg and "(1000 bytes) free" in msg and "--offload-dir" in msg
    assert str(stores) in msg and "\n" not in msg
    assert not (tmp_path / "offload").exists()  # nothing written, not even the directory


def test_too_little_free_space_through_the_cli(tiny, tmp_path, monkeypatch, capsys):
    """The storage layer's error becomes the CLI's contract: one line, exit 2 (in-process, to fake the disk)."""
    from offload_rt import cli

    monkeypatch.setattr(shutil, "disk_usage", _no_room(1000))
    monkeypatch.setenv("OFFLOAD_RT_BANDWIDTHS", "disk=1.3e9,mem=2.4e10,matvec=1.5e10")
    with pytest.raises(SystemExit) as e:
        cli.main([str(tiny[0]), "--offload-dir", str(tmp_path / "stores"), "--prompt", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("offload-run: error: not enough free space")
    assert "--offload-dir" in err[0] and "(1000 bytes) free" in err[0]


def test_free_space_estimate_covers_the_store(tiny, tmp_path, monkeypatch):
    """Exactly the estimated free space is enough, and the store really fits in it."""
    import storage
    from storage.convert import store_bytes
    from storage.sources import open_source

    needed = store_bytes(open_source(tiny[0]).tensors())
    monkeypatch.setattr(shutil, "disk_usage", _no_room(needed))
    store = storage.open_or_convert(tiny[0], tmp_path / "stores", progress=False)
    on_disk = sum(p.lstat().st_blocks * 512 for p in store.path.rglob("*")) + store.path.lstat().st_blocks * 512
    assert on_disk <= needed
