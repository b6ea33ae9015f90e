"""Write a random-weight Hugging Face Llama checkpoint of any shape (for benchmarks).

Speed does not depend on weight values, so benchmarks of large models use these:

    python -m tools.make_checkpoint OUT_DIR --preset 1.2b --dtype bfloat16
    python -m tools.make_checkpoint OUT_DIR --hidden 2048 --layers 22 --intermediate 5632 --heads 32 --kv-heads 4

The tokenizer (tokenizer.json, tokenizer_config.json with the chat template) is the
default model's (SmolLM2), taken from its converted weight store, so prompts work.
Weights are written shard by shard (safetensors, <= 2 GiB each) without ever holding
the whole model in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS = {
    # name: (hidden, layers, intermediate, heads, kv_heads, tie)
    "tiny": (64, 2, 160, 4, 2, True),
    "135m": (576, 30, 1536, 9, 3, True),
    "1.2b": (2048, 22, 5632, 32, 4, False),
    "8b": (4096, 32, 14336, 32, 8, False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_tokenizer_files() -> tuple[Path, dict]:
    """tokenizer.json path and tokenizer metadata of the default model's store (converting it once)."""
    from offload_rt.config import RunConfig
    from offload_rt.loader import open_store

    _, store = open_store(RunConfig(progress=False))
    return store.tokenizer_file, store.tokenizer_meta


def layer_shapes(h: int, inter: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * head_dim, h),
        "self_attn.k_proj.weight": (kv_heads * head_dim, h),
        "self_attn.v_proj.weight": (kv_heads * head_dim, h),
        "self_attn.o_proj.weight": (h, heads * head_dim),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }


def make_checkpoint(out: Path, *, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                    tie: bool, dtype: str = "bfloat16", vocab: int | None = None, seed: int = 0,
                    context: int = 8192, shard_bytes: int = 2 << 30) -> Path:
    out = Path(out)
    tok_file, meta = default_tokenizer_files()
    vocab = vocab or 49152
    head_dim = hidden // heads
    tdtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def rand(shape, norm=False):
        if norm:
            return (1.0 + 0.02 * torch.randn(shape, generator=gen)).to(tdtype)
        fan_in = shape[-1]
        return (torch.randn(shape, generator=gen) * (fan_in ** -0.5)).to(tdtype)

    tensors: list[tuple[str, tuple, bool]] = [("model.embed_tokens.weight", (vocab, hidden), False)]
    for i in range(layers):
        for suffix, shape in layer_shapes(hidden, intermediate, heads, kv_heads, head_dim).items():
            tensors.append((f"model.layers.{i}.{suffix}", shape, "norm" in suffix))
    tensors.append(("model.norm.weight", (hidden,), True))
    if not tie:
        tensors.append(("lm_head.weight", (vocab, hidden), False))

    weight_map, shard, shard_size, n_shard, total = {}, {}, 0, 0, 0
    names: list[list[str]] = []

    def flush():
        nonlocal shard, shard_size, n_shard
        if shard:
            fname = f"part-{n_shard:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            names.append(list(shard))
            for k in shard:
                weight_map[k] = fname
            n_shard += 1
            shard, shard_size = {}, 0

    for name, shape, norm in tensors:
        t = rand(shape, norm)
        nb = t.numel() * t.element_size()
        if shard_size and shard_size + nb > shard_bytes:
            flush()
        shard[name] = t
        shard_size += nb
        total += nb
    flush()
    # Final names: model-0000k-of-0000n.safetensors, as transformers writes them.
    final = {}
    for k in range(n_shard):
        src = tmp / f"part-{k:05d}.safetensors"
        dst_name = f"model-{k + 1:05d}-of-{n_shard:05d}.safetensors"
        src.rename(tmp / dst_name)
        final[f"part-{k:05d}.safetensors"] = dst_name
    weight_map = {k: final[v] for k, v in weight_map.items()}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": context, "tie_word_embeddings": tie,
        "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": meta.get("bos_token_id"),
        "eos_token_id": (meta.get("eos_token_ids") or [None])[0], "attention_bias": False, "mlp_bias": False,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(tok_file, tmp / "tokenizer.json")
    tok_cfg = {"bos_token": meta.get("bos_token"), "eos_token": meta.get("eos_token"),
               "chat_template": meta.get("chat_template"), "add_bos_token": bool(meta.get("add_bos_token")),
               "model_max_length": context, "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--tie", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.preset:
        h, n, inter, heads, kv, tie = PRESETS[a.preset]
    else:
        missing = [k for k in ("hidden", "layers", "intermediate", "heads") if getattr(a, k) is None]
        if missing:
            print(f"make_checkpoint: give --preset or all of --hidden --layers --intermediate --heads (missing {', '.join(missing)})",
                  file=sys.stderr)
            return 2
        h, n, inter, heads, kv, tie = a.hidden, a.layers, a.intermediate, a.heads, a.kv_heads or a.heads, a.tie
    path = make_checkpoint(a.out, hidden=h, layers=n, intermediate=inter, heads=heads, kv_heads=kv, tie=tie,
                           dtype=a.dtype, seed=a.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
