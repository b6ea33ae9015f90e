"""The default model end to end: parity with transformers, and it knows where Paris is."""

import json
import os

import pytest
import torch

from offload_rt.config import RunConfig
from offload_rt.loader import load_model
from tests.cli_helpers import assert_user_error, run_cli


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="module")
def ours(store_dir):
    """The default model dequantized to float32 as transformers does (the native Q4_1 run is compared with
    this one in test_quant_model.py)."""
    torch.set_num_threads(2)
    return load_model(RunConfig(offload_dir=store_dir, progress=False, weights="f32"))


@pytest.fixture(scope="module")
def hf(default_gguf):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                              dtype=torch.float32)
    return tok, model.eval()


def test_logits_and_32_token_greedy_match_transformers(ours, hf):
    tok, model = hf
    text = "The history of the printing press begins"
    ids = tok(text).input_ids
    assert ours.tokenizer.encode(text, add_bos=False) == [i for i in ids if i != tok.bos_token_id] or \
        ours.tokenizer.encode(text) == ids
    with torch.inference_mode():
        ref_logits = model(torch.tensor([ids])).logits[0, -1]
        our_logits = ours.engine.prefill(ids)
        assert (our_logits - ref_logits).abs().max() < 2e-3
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        ref = out[0, len(ids):].tolist()
        got, logits = [], our_logits
        for _ in range(32):
            t = int(torch.argmax(logits))
            got.append(t)
            logits = ours.engine.forward([t])
    assert got == ref


def test_chat_template_matches_transformers(ours, hf):
    tok, _ = hf
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ref = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.tokenizer.render_chat(msgs) == ref


def test_cli_answers_paris(store_dir):
    proc = run_cli("--prompt", "What is the capital of France?", "--max-new-tokens", "48",
                   "--offload-dir", store_dir, "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    import json

    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    for key in ("model", "device", "prompt_tokens", "new_tokens", "prefill_s", "decode_s", "prefill_tok_s",
                "decode_tok_s", "peak_rss_bytes", "peak_gpu_bytes", "disk_read_bytes", "h2d_bytes", "placement",
                "spec"):
        assert key in stats
    assert stats["new_tokens"] > 0 and "{" not in proc.stdout


def test_piped_stdin_is_the_prompt(store_dir):
    proc = run_cli("--max-new-tokens", "24", "--offload-dir", store_dir, input="What is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_seeded_sampling_is_reproducible(store_dir):
    args = ("--prompt", "Tell me a word.", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "40", "--seed", "5",
            "--max-new-tokens", "12", "--offload-dir", store_dir)
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_prompt_over_context_is_a_user_error(store_dir, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("word " * 9000)  # > 8192 tokens of context
    proc = run_cli("--prompt-file", f, "--raw", "--offload-dir", store_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "context" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ctx_size_bounds_the_conversation(store_dir):
    """--ctx-size is the context window: generation stops at it, a longer prompt is a user error,
    and more than the model's own context is refused."""
    proc = run_cli("--raw", "--prompt", "The sky is", "--ctx-size", "24", "--max-new-tokens", "100", "--ignore-eos",
                   "--stats", "--offload-dir", store_dir)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stderr.strip().splitlines()[-1])
    assert rec["prompt_tokens"] + rec["new_tokens"] == 24
    assert_user_error(run_cli("--raw", "--prompt", "word " * 40, "--ctx-size", "32", "--offload-dir", store_dir),
                      "context is 32 tokens", "--ctx-size")
    assert_user_error(run_cli("--prompt", "hi", "--ctx-size", "100000", "--offload-dir", store_dir),
                      "exceeds the model's context of 8192")
