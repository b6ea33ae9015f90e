"""Tiny random-weight Mixture-of-Experts models (qwen3_moe, qwen2_moe, mixtral) and their checkpoint directories.

``tiny_moe_model`` builds the transformers model (float32, eval mode: the reference); ``write_moe_checkpoint``
saves it as a Hub checkpoint (transformers' ``save_pretrained`` writes the per-expert names:
``mlp.experts.{e}.{gate,up,down}_proj`` / Mixtral's ``block_sparse_moe.experts.{e}.w{1,2,3}``) with
tests.hf_models' tokenizer files. ``checkpoint_tensors`` reads a checkpoint's tensors back.
``model_from_tensors`` builds the transformers model of a checkpoint with other weights (a GGUF's, a
quantized round trip's), and ``greedy_reference`` is transformers' greedy continuation with its logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

MOE_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")
# 2 layers of 4 experts, 2 routed per token; expert width 32 (Mixtral: intermediate_size), rows and columns
# split into whole 32-value blocks (q4_0/q4_1/q8_0); K-quant tests pass hidden_size/width of 256
TINY_MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, rms_norm_eps=1e-5, vocab_size=300, num_experts_per_tok=2)
EXPERTS = 4
WIDTH = 32
MIN_GAP = 5e-4  # smallest top-1 / top-2 logit gap of a greedy reference (float32 runs differ by ~1e-6)


def tiny_moe_config(model_type: str, *, experts: int = EXPERTS, width: int = WIDTH, **over):
    """A transformers config of ``model_type`` with ``experts`` routed experts of ``width`` (+ ``over``)."""
    import transformers

    kw = dict(TINY_MOE)
    if model_type == "qwen3_moe":
        kw.update(num_experts=experts, moe_intermediate_size=width, intermediate_size=2 * width, head_dim=32,
                  norm_topk_prob=True)
        cls = transformers.Qwen3MoeConfig
    elif model_type == "qwen2_moe":
        kw.update(num_experts=experts, moe_intermediate_size=width, intermediate_size=2 * width,
                  shared_expert_intermediate_size=2 * width, norm_topk_prob=False)
        cls = transformers.Qwen2MoeConfig
    elif model_type == "mixtral":
        kw.update(num_local_experts=experts, intermediate_size=width)
        cls = transformers.MixtralConfig
    else:
        raise ValueError(model_type)
    kw.update(copy.deepcopy(over))
    return cls(**kw)


def tiny_moe_model(model_type: str, seed: int = 0, *, router_scale: float = 1.0, **over):
    """A transformers MoE model with random weights, float32, eval mode. Norms and biases are perturbed so
    they are really tested; the routers' weights are N(0, (4 router_scale)²/H), router logits of std ~4, so
    routing is decisive (top-k margins well above float rounding) and varies between tokens."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_moe_config(model_type, **over)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.copy_(torch.randn_like(p) * router_scale * 4 / cfg.hidden_size ** 0.5)
    return model.float().eval()


def write_moe_checkpoint(dest: Path, model, **kw) -> Path:
    """``model`` saved as a Hub-style checkpoint directory (tests.hf_models.write_checkpoint's options)."""
    from tests.hf_models import write_checkpoint

    return write_checkpoint(Path(dest), model, **kw)


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint directory ``ckpt`` (its .safetensors files) under its saved name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def checkpoint_config(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "config.json").read_text())


def model_from_tensors(ckpt: Path, tensors: dict, dest: Path):
    """The transformers model of checkpoint ``ckpt``'s config with ``tensors`` (checkpoint names -> float32
    arrays, e.g. what a GGUF holds as tests.gguf_models.write_moe_gguf returns it) as its weights, loaded
    through ``from_pretrained`` so transformers maps the per-expert names onto its fused expert parameters
    itself. Every parameter must be given (a missing or unused name fails)."""
    import numpy as np
    import transformers
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text((Path(ckpt) / "config.json").read_text())
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in tensors.items()},
              str(dest / "model.safetensors"), metadata={"format": "pt"})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        dest, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.float().eval()


def greedy_reference(hf, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation (generate, do_sample=False) and each step's logits [n, vocab]."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack([step[0] for step in out.logits]).float()
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > MIN_GAP, f"the reference is {gap:.1e} from a tie: pick another seed"
    assert len(set(tokens)) >= 3, f"a degenerate reference {tokens}: pick another seed"
    return tokens, logits
