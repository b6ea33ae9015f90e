"""GGUF Qwen2 (qkv bias) and Qwen3 (q/k norm, explicit head_dim) against transformers on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFWriter

import storage
from offload_rt.engine import Engine, ResidentWeights, model_groups
from offload_rt.models import llama
from offload_rt.models.llama import LlamaArgs
from tests.cli_helpers import assert_user_error, run_cli
from tests.gguf_models import add_ascii_tokenizer, write_hf_gguf
from tests.hf_models import tiny_model

# Both sides compute in float32 from identical weights; 1e-4 is what test_model_parity allows.
LOGITS_ATOL = 1e-4

CASES = {
    # Qwen2.5-0.5B-like: q/k/v biases, tied embeddings (no output.weight), no key_length in the file.
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen3: q/k RMSNorm, head_dim 32 != hidden / heads (64 / 4), so only qwen3.attention.key_length says it.
    "qwen3": ("qwen3", dict(head_dim=32, rope_theta=1e6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_forward_matches_transformers(tmp_path, case):
    arch, over = CASES[case]
    hf = tiny_model(arch, seed=11, **over)
    path = tmp_path / f"{case}.gguf"
    held = write_hf_gguf(path, hf, arch)
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)

    cfg = st.model_config
    assert cfg["model_type"] == arch
    args = LlamaArgs.from_config(cfg)
    c = hf.config
    assert (args.head_dim, args.num_attention_heads, args.num_key_value_heads) == \
        (c.head_dim if arch == "qwen3" else c.hidden_size // c.num_attention_heads, c.num_attention_heads,
         c.num_key_value_heads)
    assert args.qkv_bias == (arch == "qwen2") and args.qk_norm == (arch == "qwen3")
    assert args.tie_word_embeddings == bool(c.tie_word_embeddings) and not args.o_bias
    assert args.rope_theta == pytest.approx(1e6) and args.rms_norm_eps == pytest.approx(c.rms_norm_eps)
    assert args.vocab_size == c.vocab_size
    # Q/K are stored as transformers has them (llama.cpp does not permute qwen2/qwen3).
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        assert np.array_equal(st.load(f"model.layers.1.{name}").numpy(), held[f"model.layers.1.{name}"]), name

    eng = Engine(args, ResidentWeights(model_groups(args), lambda n: st.load(n).float(), llama.EMBED), torch.float32,
                 prefill_chunk=16)
    ids = torch.randint(0, c.vocab_size, (40,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, -1]
        ours = eng.prefill(ids.tolist())
        assert (ours - ref).abs().max() < LOGITS_ATOL, (ours - ref).abs().max()
        for t in (7, 120):  # decode steps keep matching
            ids = torch.cat([ids, torch.tensor([t])])
            ref = hf(ids[None]).logits[0, -1]
            ours = eng.forward([t])
            assert (ours - ref).abs().max() < LOGITS_ATOL, (ours - ref).abs().max()


def test_unsupported_gguf_architecture_is_a_user_error(tmp_path):
    path = tmp_path / "gemma.gguf"
    w = GGUFWriter(str(path), "gemma2")
    for k, v in {"block_count": 1, "embedding_length": 64, "feed_forward_length": 64, "head_count": 4}.items():
        getattr(w, f"add_{k}")(v)
    add_ascii_tokenizer(w, 200, "gpt-2")
    w.add_tensor("token_embd.weight", np.zeros((200, 64), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    proc = run_cli(path, "--prompt", "hi", "--offload-dir", tmp_path / "stores")
    assert_user_error(proc, "'gemma2'", "qwen3")
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())  # nothing converted
