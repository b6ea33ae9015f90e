"""Mixture-of-Experts models through offload-run, as a user runs them: a Hugging Face directory (qwen3_moe)
and a GGUF with stacked Q8_0 experts (mixtral) answer greedily with transformers' text; the REPL answers a
turn; an unsupported MoE architecture (config.json or GGUF), a truncated expert chunk in the store and a
config whose expert count disagrees with the checkpoint are one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

import storage
from storage.experts import packed_name
from storage.sources import GGUFSource
from tests.cli_helpers import assert_user_error, run_cli
from tests.gguf_models import ASCII_VOCAB, add_ascii_tokenizer, write_moe_gguf
from tests.hf_models import SMOLLM_VOCAB
from tests.moe_models import greedy_reference, model_from_tensors, tiny_moe_model, write_moe_checkpoint

PROMPT = "The three primary colours are"
NEW_TOKENS = 8
GGUF_PROMPT = "hello world"
QUESTION = "What is a mixture of experts?"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe-cli")


@pytest.fixture(scope="module")
def qwen3_moe(root):
    """(transformers model, checkpoint directory): a tiny qwen3_moe with SmolLM2's tokenizer and vocabulary."""
    hf = tiny_moe_model("qwen3_moe", seed=2, vocab_size=SMOLLM_VOCAB)
    return hf, write_moe_checkpoint(root / "qwen3-moe", hf)


def hf_reference(hf, ckpt: Path, ids: list[int]) -> str:
    """transformers' greedy continuation of ``ids``, decoded by transformers' tokenizer from the checkpoint."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    tokens, _ = greedy_reference(hf, ids, NEW_TOKENS)
    return tok.decode(tokens, skip_special_tokens=True)


def stats_of(proc) -> dict:
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_hf_directory_answers_as_transformers(root, qwen3_moe):
    import transformers

    hf, ckpt = qwen3_moe
    ids = transformers.AutoTokenizer.from_pretrained(ckpt)(PROMPT).input_ids
    expected = hf_reference(hf, ckpt, ids)
    proc = run_cli(ckpt, "--raw", "--ignore-eos", "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--stats",
                   "--offload-dir", root / "stores", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    stats = stats_of(proc)
    assert (stats["prompt_tokens"], stats["new_tokens"]) == (len(ids), NEW_TOKENS)


def test_gguf_with_stacked_q8_0_experts_answers_as_transformers(root):
    """A Mixtral GGUF (llama architecture with experts, Q/K permuted) whose experts are Q8_0, over an ASCII
    vocabulary (every token decodes to plain text); the reference is transformers on the file's weights."""
    hf = tiny_moe_model("mixtral", seed=3, vocab_size=ASCII_VOCAB)
    ckpt = write_moe_checkpoint(root / "mixtral", hf)
    path = root / "mixtral-experts-Q8_0.gguf"
    held = write_moe_gguf(path, ckpt, qtype_of=lambda name, a: Q.Q8_0 if name.endswith("_exps.weight") else Q.F32)
    ref_model = model_from_tensors(ckpt, held, root / "mixtral-q8_0-ref")

    from tokenizers import Tokenizer

    GGUFSource(path).tokenizer(root / "gguf-tokenizer.json")
    tok = Tokenizer.from_file(str(root / "gguf-tokenizer.json"))
    ids = tok.encode(GGUF_PROMPT, add_special_tokens=False).ids
    tokens, _ = greedy_reference(ref_model, ids, NEW_TOKENS)
    expected = tok.decode(tokens, skip_special_tokens=True)
    assert len(expected) >= NEW_TOKENS // 2  # mostly printable tokens: the text says something

    proc = run_cli(path, "--raw", "--ignore-eos", "--prompt", GGUF_PROMPT, "--max-new-tokens", NEW_TOKENS,
                   "--stats", "--offload-dir", root / "stores", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert stats_of(proc)["new_tokens"] == NEW_TOKENS


def test_repl_answers_a_turn(root, qwen3_moe):
    """The chat REPL in a terminal answers one turn on a MoE model with transformers' greedy reply to the
    chat-templated question, then exits on Ctrl-D."""
    import transformers

    from tests.test_repl import Term

    hf, ckpt = qwen3_moe
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    expected = hf_reference(hf, ckpt, list(ids))
    term = Term(ckpt, "--offload-dir", root / "stores", "--max-new-tokens", NEW_TOKENS, "--ignore-eos")
    try:
        term.expect(b">>> ")
        term.send(QUESTION.encode() + b"\r")
        screen = term.expect(b">>> ").decode(errors="replace").replace("\r\n", "\n")
        assert expected.strip() and expected in screen, (expected, screen)
        term.send(b"\x04")  # Ctrl-D
        assert term.proc.wait(60) == 0
    finally:
        term.close()


# ---------------------------------------------------------------- errors: one line, exit status 2


def variant(ckpt: Path, dest: Path, **config) -> Path:
    """A checkpoint directory sharing ``ckpt``'s files (symlinks) with config.json keys set to ``config``."""
    dest.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(config)
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    return dest


def test_unsupported_moe_config_is_a_user_error(root, qwen3_moe):
    ckpt = variant(qwen3_moe[1], root / "deepseek-v2", model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
                   n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16)
    proc = run_cli(ckpt, "--raw", "--prompt", "hi", "--offload-dir", root / "stores")
    assert_user_error(proc, "deepseek_v2", "Mixture-of-Experts", "qwen3_moe", "mixtral", "qwen2_moe")


def test_unsupported_moe_gguf_is_a_user_error(root):
    """A DeepSeek-V2-style GGUF (architecture deepseek2, experts stacked as llama.cpp writes them)."""
    path = root / "deepseek2.gguf"
    w = GGUFWriter(str(path), "deepseek2")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_expert_shared_count(1)
    w.add_expert_feed_forward_length(32)
    w.add_leading_dense_block_count(0)
    add_ascii_tokenizer(w, 128, "llama-bpe")
    w.add_tensor("token_embd.weight", np.zeros((128, 64), np.float32))
    for proj, shape in (("gate", (4, 32, 64)), ("up", (4, 32, 64)), ("down", (4, 64, 32))):
        w.add_tensor(f"blk.0.ffn_{proj}_exps.weight", np.zeros(shape, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    proc = run_cli(path, "--raw", "--prompt", "hi", "--offload-dir", root / "stores")
    assert_user_error(proc, "deepseek_v2", "Mixture-of-Experts", "qwen3_moe")


def test_truncated_expert_chunk_is_a_user_error(root, qwen3_moe):
    """The chunk file of an expert the prompt routes to (layer 0, first token's first choice) loses its last
    4 KiB in the converted store: the run names the tensor and the way out (--rebuild-store) on one line,
    whether the experts are loaded whole or read when routed."""
    import transformers

    hf, ckpt = qwen3_moe
    ids = transformers.AutoTokenizer.from_pretrained(ckpt)(PROMPT).input_ids
    with torch.no_grad():
        expert = int(hf(torch.tensor([ids]), output_router_logits=True).router_logits[0][0].argmax())
    stores = root / "damaged-stores"
    st = storage.open_or_convert(ckpt, stores, progress=False)
    name = packed_name(0)
    f = st.path / name / st.manifest["tensors"][name]["chunk_keys"][expert]
    assert f.is_relative_to(stores) and f.stat().st_size >= 4096
    os.truncate(f, f.stat().st_size - 4096)
    proc = run_cli(ckpt, "--raw", "--prompt", PROMPT, "--max-new-tokens", 2, "--offload-dir", stores)
    assert_user_error(proc, name, "--rebuild-store")


def test_expert_count_disagreeing_with_the_checkpoint_is_a_user_error(root, qwen3_moe):
    """config.json says 3 routed experts; the checkpoint has 4 per layer (routing over 3 would run, wrongly)."""
    ckpt = variant(qwen3_moe[1], root / "qwen3-moe-3-experts", num_experts=3)
    proc = run_cli(ckpt, "--raw", "--prompt", "hi", "--offload-dir", root / "stores")
    assert_user_error(proc, packed_name(0), "expert")

