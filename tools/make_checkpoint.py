"""Write a random-weight Hugging Face Llama or Qwen3-MoE checkpoint of any shape (for benchmarks).

Speed does not depend on weight values, so benchmarks of large models use these:

    python -m tools.make_checkpoint OUT_DIR --preset 1.2b --dtype bfloat16
    python -m tools.make_checkpoint OUT_DIR --hidden 2048 --layers 22 --intermediate 5632 --heads 32 --kv-heads 4
    python -m tools.make_checkpoint OUT_DIR --preset 8b --vocab 128256 --synthetic-tokenizer --fast
    python -m tools.make_checkpoint OUT_DIR --preset qwen3-30b-a3b-8l --fast
    python -m tools.make_checkpoint OUT_DIR --hidden 64 --layers 2 --intermediate 128 --heads 4 --kv-heads 2 \
        --head-dim 32 --experts 8 --experts-per-tok 2 --moe-intermediate 48

``--experts N`` (or a MoE preset) writes a ``qwen3_moe`` checkpoint (Qwen3MoeForCausalLM): every
layer sparse (``decoder_sparse_step`` 1, no ``mlp_only_layers``), q_norm/k_norm, a router
``mlp.gate.weight`` [N, hidden] and per-expert ``mlp.experts.E.{gate,up,down}_proj.weight`` of
width ``--moe-intermediate``, top-``--experts-per-tok`` routing renormalised (``norm_topk_prob``).
``--head-dim`` sets the attention head width apart from hidden ÷ heads (Qwen3: 128 with hidden 2048
and 32 heads).

The tokenizer (tokenizer.json, tokenizer_config.json with the chat template) is the
default model's (SmolLM2), taken from its converted weight store, so prompts work.
``--synthetic-tokenizer`` builds one instead (byte-level, exactly ``--vocab`` entries, a
ChatML template): for machines without the default model (the GPU machine), and for
vocabularies of any size, so every id the model can emit decodes to text.
Weights are written shard by shard (safetensors, <= 2 GiB each) without ever holding
the whole model in memory. ``--fast`` fills matrices from one shared pool of normal
noise (same scale, not independent) instead of drawing every value: an 8B model in
well under a minute instead of several (``torch.randn`` draws on one core).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MoE:
    """The sparse MLP of a qwen3_moe checkpoint: ``experts`` per layer, ``per_token`` routed, each of
    intermediate width ``width`` (config ``moe_intermediate_size``)."""

    experts: int
    per_token: int
    width: int


# name: make_checkpoint keyword arguments (qwen3_moe). qwen3-30b-a3b-8l: Qwen3-30B-A3B's layer with 8 of
# its 48 layers (~5.2B parameters, ~10.4 GB bf16) and the default tokenizer's vocabulary.
MOE_PRESETS = {
    "qwen3-moe-tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=32, tie=False,
                           moe=MoE(8, 2, 48)),
    "qwen3-30b-a3b-8l": dict(hidden=2048, layers=8, intermediate=6144, heads=32, kv_heads=4, head_dim=128,
                             tie=False, moe=MoE(128, 8, 768)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SYNTHETIC_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
POOL_VALUES = 1 << 26  # --fast: normal values drawn once (256 MiB float32) and sliced for every matrix


def write_synthetic_tokenizer(dest: Path, vocab: int) -> tuple[Path, dict]:
    """Write ``dest/tokenizer.json``: a byte-level BPE tokenizer with exactly ``vocab`` ids.

    Ids: the three ChatML specials, the 256 byte symbols (text encodes one token per byte,
    no merges), then filler words (`` a``, `` b``, ... `` zz`` ...) up to ``vocab``, so any id a
    random model emits decodes to visible text. Returns (path, the tokenizer metadata that
    make_checkpoint writes into tokenizer_config.json).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    floor = len(SYNTHETIC_SPECIALS) + 256
    if vocab < floor:
        raise ValueError(f"a synthetic tokenizer needs at least {floor} ids (specials and bytes), got {vocab}")
    table: dict[str, int] = {}
    for tok in (*SYNTHETIC_SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet())):
        table[tok] = len(table)
    letters, i = "abcdefghijklmnopqrstuvwxyz", 0
    while len(table) < vocab:
        n, word = i, ""
        while n >= 0:  # bijective base 26: a..z, aa..zz, aaa...
            word, n = letters[n % 26] + word, n // 26 - 1
        table["\u0120" + word] = len(table)  # U+0120 is the byte-level symbol of a space
        i += 1
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SYNTHETIC_SPECIALS))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "tokenizer.json"
    tok.save(str(path))
    eos = SYNTHETIC_SPECIALS[2]
    meta = {"bos_token": None, "bos_token_id": None, "eos_token": eos, "eos_token_ids": [table[eos]],
            "chat_template": CHATML, "add_bos_token": False}
    return path, meta


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


def moe_layer_shapes(h: int, heads: int, kv_heads: int, head_dim: int, moe: MoE) -> dict[str, tuple[int, ...]]:
    """A qwen3_moe decoder layer's tensors (Hugging Face names after ``model.layers.L.``) and shapes."""
    shapes = {k: v for k, v in layer_shapes(h, 0, heads, kv_heads, head_dim).items() if not k.startswith("mlp.")}
    shapes["self_attn.q_norm.weight"] = (head_dim,)
    shapes["self_attn.k_norm.weight"] = (head_dim,)
    shapes["mlp.gate.weight"] = (moe.experts, h)
    for e in range(moe.experts):
        shapes[f"mlp.experts.{e}.gate_proj.weight"] = (moe.width, h)
        shapes[f"mlp.experts.{e}.up_proj.weight"] = (moe.width, h)
        shapes[f"mlp.experts.{e}.down_proj.weight"] = (h, moe.width)
    return shapes


def model_config(*, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                 tie: bool, vocab: int, dtype: str, context: int, meta: dict, moe: MoE | None) -> dict:
    """config.json of a Llama checkpoint, or of a qwen3_moe one when ``moe`` is given."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": context, "tie_word_embeddings": tie,
        "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": meta.get("bos_token_id"),
        "eos_token_id": (meta.get("eos_token_ids") or [None])[0], "attention_bias": False, "mlp_bias": False,
    }
    if moe is None:
        return config
    del config["mlp_bias"]
    config.update({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "num_experts": moe.experts, "num_experts_per_tok": moe.per_token,
        "moe_intermediate_size": moe.width, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None,
        "router_aux_loss_coef": 0.001, "output_router_logits": False,
    })
    return config


def _pool_fill(shape: tuple[int, ...], scale: float, pool: torch.Tensor, gen: torch.Generator,
               dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape``: pieces of ``pool`` (unit normal) at random offsets, times ``scale``.

    Each piece is at most half the pool, so a random offset always fits; the multiply runs on
    every core (torch.randn would draw on one).
    """
    out = torch.empty(shape, dtype=dtype)
    flat, n, cap = out.view(-1), out.numel(), pool.numel()
    i = 0
    while i < n:
        k = min(cap // 2, n - i)
        off = int(torch.randint(0, cap - k + 1, (1,), generator=gen))
        torch.mul(pool[off:off + k], scale, out=flat[i:i + k])
        i += k
    return out


def make_checkpoint(out: Path, *, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                    tie: bool, dtype: str = "bfloat16", vocab: int | None = None, seed: int = 0,
                    context: int = 8192, shard_bytes: int = 2 << 30, synthetic_tokenizer: bool = False,
                    fast: bool = False, head_dim: int | None = None, moe: MoE | None = None) -> Path:
    """Write the checkpoint directory ``out`` (atomically: built beside it, then renamed).

    ``moe``: a qwen3_moe checkpoint with these experts instead of a Llama one (``intermediate`` is
    then only the config's ``intermediate_size``, unused: every layer is sparse). ``head_dim``:
    attention head width (default ``hidden // heads``). ``synthetic_tokenizer``: build a byte-level tokenizer of exactly ``vocab`` ids instead of
    taking the default model's (which needs the default model installed). ``fast``: matrices
    are slices of one pool of normal noise (see :func:`_pool_fill`).
    """
    out = Path(out)
    vocab = vocab or 49152
    tokenizer = None if synthetic_tokenizer else default_tokenizer_files()
    head_dim = head_dim or hidden // heads
    tdtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok_file, meta = tokenizer or write_synthetic_tokenizer(tmp, vocab)
    pool = torch.randn(POOL_VALUES, generator=gen).to(tdtype) if fast else None

    def rand(shape, norm=False):
        if norm:
            return (1.0 + 0.02 * torch.randn(shape, generator=gen)).to(tdtype)
        fan_in = shape[-1]
        if pool is not None:
            return _pool_fill(shape, fan_in ** -0.5, pool, gen, tdtype)
        return (torch.randn(shape, generator=gen) * (fan_in ** -0.5)).to(tdtype)

    tensors: list[tuple[str, tuple, bool]] = [("model.embed_tokens.weight", (vocab, hidden), False)]
    shapes = (moe_layer_shapes(hidden, heads, kv_heads, head_dim, moe) if moe
              else layer_shapes(hidden, intermediate, heads, kv_heads, head_dim))
    for i in range(layers):
        for suffix, shape in shapes.items():
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
    config = model_config(hidden=hidden, layers=layers, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim, tie=tie, vocab=vocab, dtype=dtype, context=context, meta=meta, moe=moe)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if tok_file != tmp / "tokenizer.json":
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
    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(MOE_PRESETS))
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--tie", action="store_true")
    p.add_argument("--head-dim", type=int, default=None, help="attention head width (default hidden / heads)")
    p.add_argument("--experts", type=int, default=0, help="routed experts per layer: a qwen3_moe checkpoint")
    p.add_argument("--experts-per-tok", type=int, default=None, help="experts routed per token (with --experts)")
    p.add_argument("--moe-intermediate", type=int, default=None, help="width of one expert (with --experts)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--vocab", type=int, default=None, help="embedding rows (default 49152, the default model's)")
    p.add_argument("--synthetic-tokenizer", action="store_true",
                   help="build a byte-level tokenizer of exactly --vocab ids (no default model needed)")
    p.add_argument("--fast", action="store_true", help="matrices from one shared pool of normal noise (seconds, not minutes)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.preset in MOE_PRESETS:
        shape = dict(MOE_PRESETS[a.preset])
    elif a.preset:
        shape = dict(zip(("hidden", "layers", "intermediate", "heads", "kv_heads", "tie"), PRESETS[a.preset]))
    else:
        missing = [k for k in ("hidden", "layers", "intermediate", "heads") if getattr(a, k) is None]
        if a.experts:
            missing += [k for k in ("experts_per_tok", "moe_intermediate") if getattr(a, k) is None]
        if missing:
            names = " ".join("--" + k.replace("_", "-") for k in missing)
            print(f"make_checkpoint: give --preset or all of --hidden --layers --intermediate --heads "
                  f"(and with --experts: --experts-per-tok --moe-intermediate); missing {names}", file=sys.stderr)
            return 2
        if a.experts and not 0 < a.experts_per_tok <= a.experts:
            print(f"make_checkpoint: --experts-per-tok must be 1..{a.experts}", file=sys.stderr)
            return 2
        shape = dict(hidden=a.hidden, layers=a.layers, intermediate=a.intermediate, heads=a.heads,
                     kv_heads=a.kv_heads or a.heads, tie=a.tie, head_dim=a.head_dim,
                     moe=MoE(a.experts, a.experts_per_tok, a.moe_intermediate) if a.experts else None)
    floor = len(SYNTHETIC_SPECIALS) + 256
    if a.synthetic_tokenizer and a.vocab is not None and a.vocab < floor:
        print(f"make_checkpoint: --synthetic-tokenizer needs --vocab >= {floor} (specials and bytes)", file=sys.stderr)
        return 2
    path = make_checkpoint(a.out, dtype=a.dtype, seed=a.seed, vocab=a.vocab, synthetic_tokenizer=a.synthetic_tokenizer,
                           fast=a.fast, **shape)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
