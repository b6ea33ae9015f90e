"""Tiny random-weight Hugging Face models of every supported model_type (test helpers)."""

from __future__ import annotations

import torch

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, vocab_size=300)


def tiny_config(model_type: str, **over):
    import transformers

    kw = dict(TINY)
    kw.update(over)
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**kw)
    elif model_type == "mistral":
        kw.setdefault("sliding_window", None)
        cfg = transformers.MistralConfig(**kw)
    elif model_type == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
    elif model_type == "qwen3":
        kw.setdefault("head_dim", 32)
        cfg = transformers.Qwen3Config(**kw)
    else:
        raise ValueError(model_type)
    return cfg


def tiny_model(model_type: str, seed: int = 0, **over):
    """A transformers model with random weights, float32, eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **over)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # make norms and biases non-trivial so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()
