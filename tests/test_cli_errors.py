"""Every mistake a user can make: one line on stderr, exit 2, no traceback, nothing half-written."""

import json
import struct

import pytest

from tests.cli_helpers import assert_user_error, run_cli


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
