"""Model families behind one interface, dispatched on config.json's ``model_type``.

A family is one module here; every other part of offload_rt reaches a model only through
:func:`family` (or :func:`args_from_config`), never by importing a family by name. A family module
provides:

- ``MODEL_TYPES`` — the config.json ``model_type`` values it runs;
- ``args_from_config(cfg) -> args`` — its frozen config; ``args`` carries ``model_type``, the shapes the
  runtime plans with (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim``, ``vocab_size``, ``max_position_embeddings``,
  ``tie_word_embeddings``, ``torch_dtype``, ``window(layer)``) and the tensors of the model:
  ``layer_tensors(i)`` (suffix -> shape), ``head_tensors()``, ``tensor_shapes()``, and for a
  Mixture-of-Experts layer ``expert_tensor(i)`` (the store name of its packed routed experts; None for a
  dense layer) with ``expert_parts(i)`` (one expert's part shapes);
- ``EMBED`` — the embedding table's name; ``Rope(args, dtype, device)`` — cos/sin tables;
- ``layer_forward(args, w, x, cache, layer, rope, start, tree_mask=None)`` and
  ``head_forward(args, w, x)`` — pure forward functions over the tensors the weight source hands over
  (a MoE layer's ``w["experts"]`` is an :class:`~offload_rt.models.ops.ExpertSet`);
- ``activation_bytes(args, tokens)`` — the scratch of a forward pass over ``tokens`` rows.

Models call :mod:`offload_rt.models.ops`, never a kernel module.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from offload_rt.errors import ModelSourceError

# model_type -> the module implementing it (imported on first use)
_MODULES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "qwen3_moe": "moe", "mixtral": "moe", "qwen2_moe": "moe",
}
# Mixture-of-Experts architectures users bring that no family here runs yet (named in the error).
KNOWN_UNSUPPORTED_MOE = ("deepseek_v2", "deepseek_v3", "gpt_oss", "glm4_moe", "dbrx", "olmoe", "jamba",
                         "granitemoe", "phimoe", "llama4", "minimax", "hunyuan_moe", "ernie4_5_moe")
SUPPORTED = tuple(sorted(_MODULES))

LAYER_PREFIX = "model.layers.{}."  # Hugging Face naming of decoder layer i's tensors, every family here


def unsupported(model_type) -> ModelSourceError:
    """The one-line error for a model_type no family runs."""
    moe = model_type in KNOWN_UNSUPPORTED_MOE
    what = "Mixture-of-Experts architecture" if moe else "model_type"
    return ModelSourceError(f"unsupported {what} {model_type!r}; offload_rt runs {', '.join(SUPPORTED)}")


def family(model_type: str):
    """The module implementing ``model_type`` (a one-line user error listing what is supported)."""
    name = _MODULES.get(model_type)
    if name is None:
        raise unsupported(model_type)
    return importlib.import_module(f"offload_rt.models.{name}")


def args_from_config(cfg: Mapping[str, Any]):
    """The family config of a config.json dict (its ``model_type`` picks the family)."""
    return family(cfg.get("model_type")).args_from_config(cfg)


def of(args):
    """The family module of a built config."""
    return family(args.model_type)


def dense_layer_args(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, layers: int,
                     vocab: int = 1, context: int = 4096):
    """A dense decoder of these shapes (calibration times layers of the model's size with it)."""
    return family("llama").LlamaArgs(
        model_type="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        max_position_embeddings=context)
