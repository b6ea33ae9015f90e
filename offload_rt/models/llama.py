"""Llama-family decoders: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Plain functions of a config (:class:`LlamaArgs`) and the tensors the runtime hands
over. Nothing here knows where a weight lives or moves memory: the runtime fetches
a layer's tensors (resident, or streamed by the scheduler) and calls
:func:`layer_forward` with a mapping ``suffix -> tensor`` using Hugging Face names
(``self_attn.q_proj.weight``...). Batch size is 1: activations are ``[T, hidden]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from offload_rt.errors import ModelSourceError
from offload_rt.models import ops

# model_type values this file implements, with the per-family switches they imply.
# sliding: how config.json's sliding_window applies, as transformers reads it: "all" layers (Mistral),
# "gated" (Qwen: only with use_sliding_window, on the layers config.layer_types marks sliding), or
# absent (Llama has no sliding-window attention; the key is ignored).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding": "all"},
    "qwen2": {"qkv_bias": True, "sliding": "gated"},
    "qwen3": {"qk_norm": True, "sliding": "gated"},
}
SLIDING, FULL = "sliding_attention", "full_attention"  # config.layer_types values
ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")
QWEN_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config/Qwen3Config default for max_window_layers

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER_PREFIX = "model.layers.{}."
MODEL_TYPES = tuple(FAMILIES)  # what offload_rt.models dispatches to this file


@dataclass(frozen=True)
class LlamaArgs:
    model_type: str  # one of FAMILIES
    hidden_size: int  # model width
    intermediate_size: int  # MLP width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # KV heads (GQA when fewer than query heads)
    head_dim: int  # per-head width
    vocab_size: int  # rows of the embedding
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear"|"default", ...}
    max_position_embeddings: int = 4096  # context length
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2, Llama attention_bias)
    o_bias: bool = False  # o_proj carries a bias (Llama attention_bias)
    mlp_bias: bool = False  # MLP projections carry biases
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # local attention window of the sliding layers, None = full attention
    sliding_layers: tuple[bool, ...] | None = None  # per layer: uses sliding_window; None = every layer does
    torch_dtype: str | None = None  # the checkpoint's dtype name
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unknown keys, kept

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LlamaArgs":
        """Build from a config.json dict; unknown keys are ignored."""
        mt = cfg.get("model_type")
        fam = cls.switches(mt)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or {})
            rope_theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
            scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ModelSourceError(f"unsupported rope scaling {kind!r} in config.json; offload_rt supports "
                                       f"{', '.join(ROPE_TYPES)}")
            window, sliding_layers = _sliding_window(fam.get("sliding"), cfg, int(cfg["num_hidden_layers"]))
            attn_bias = bool(cfg.get("attention_bias", False))
            return cls(
                model_type=mt,
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=dict(scaling) if scaling else None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=fam.get("qkv_bias", False) or attn_bias,
                o_bias=attn_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=fam.get("qk_norm", False),
                sliding_window=window,
                sliding_layers=sliding_layers,
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelSourceError(f"config.json is missing or has a bad value for {e}; is this a complete checkpoint?") from None

    @classmethod
    def switches(cls, model_type) -> dict[str, Any]:
        """The per-family switches of ``model_type`` (a one-line error for one this class does not build)."""
        if model_type not in FAMILIES:
            from offload_rt.models import unsupported

            raise unsupported(model_type)
        return FAMILIES[model_type]

    def window(self, layer: int) -> int | None:
        """The attention window of decoder layer ``layer`` (None: it attends to the whole context)."""
        if self.sliding_window is None or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def layer_suffixes(self) -> list[str]:
        """Tensor names of one decoder layer, relative to ``model.layers.{i}.``."""
        names = [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ]
        if self.qkv_bias:
            names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if self.o_bias:
            names += ["self_attn.o_proj.bias"]
        if self.mlp_bias:
            names += ["mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"]
        if self.qk_norm:
            names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        return names

    def head_names(self) -> list[str]:
        """Tensors used after the last layer (final norm and output projection)."""
        return [FINAL_NORM, EMBED if self.tie_word_embeddings else LM_HEAD]

    def shape_table(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor a decoder layer of this config may have, by suffix."""
        h, d, inter = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,), "self_attn.q_norm.weight": (d,),
            "self_attn.k_norm.weight": (d,), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter), "mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,),
            "mlp.down_proj.bias": (h,),
        }

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        """The tensors decoder layer ``layer`` reads: suffix (relative to ``model.layers.{i}.``) -> shape."""
        table = self.shape_table()
        return {s: table[s] for s in self.layer_suffixes()}

    def expert_tensor(self, layer: int) -> str | None:
        """The store name of layer ``layer``'s packed routed experts (None: a dense layer, as every one here)."""
        return None

    def router_tensor(self, layer: int) -> str | None:
        """The store name of layer ``layer``'s router [experts, hidden] (None: a dense layer)."""
        return None

    def expert_parts(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Shapes of one routed expert's parts in layer ``layer`` (empty for a dense layer)."""
        return {}

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensors used after the last layer (final norm and output projection) -> shape."""
        h = self.hidden_size
        table = {EMBED: (self.vocab_size, h), FINAL_NORM: (h,), LM_HEAD: (self.vocab_size, h)}
        return {n: table[n] for n in self.head_names()}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward pass reads, with the shape this config implies (Hugging Face names);
        a MoE layer's routed experts are the packed tensor :meth:`expert_tensor` (checked apart)."""
        out = {EMBED: (self.vocab_size, self.hidden_size), **self.head_tensors()}
        for i in range(self.num_hidden_layers):
            out.update({LAYER_PREFIX.format(i) + s: shape for s, shape in self.layer_tensors(i).items()})
        return out


def _sliding_window(rule: str | None, cfg: Mapping[str, Any], n_layers: int) -> tuple[int | None, tuple | None]:
    """(window, per-layer sliding flags or None for all layers) as transformers applies config.json."""
    window = cfg.get("sliding_window")
    if rule is None or not window:
        return None, None
    if rule == "all":
        return int(window), None
    if not cfg.get("use_sliding_window", False):  # Qwen2.5/Qwen3 configs carry a window they switch off
        return None, None
    types = cfg.get("layer_types")
    if not types:
        first = int(cfg.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS))
        types = [SLIDING if i >= first else FULL for i in range(n_layers)]
    if len(types) != n_layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError("layer_types")
    flags = tuple(t == SLIDING for t in types)
    if not any(flags):
        return None, None
    return int(window), (None if all(flags) else flags)


# ---------------------------------------------------------------- RoPE


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies (float32, [head_dim/2]) including llama3/linear scaling."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in ("default", None):
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "freq_factors":  # GGUF's rope_freqs tensor (llama.cpp divides each frequency by its factor)
        factors = torch.tensor([float(x) for x in sc["freq_factors"]], dtype=torch.float32)
        if factors.shape != inv.shape:
            raise ModelSourceError(f"rope freq_factors has {factors.numel()} entries, expected {inv.numel()}")
        return inv / factors
    if kind == "llama3":
        factor = float(sc["factor"])
        lo, hi = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old = float(sc.get("original_max_position_embeddings", 8192))
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return torch.where(medium, smoothed, scaled)
    raise ModelSourceError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3, freq_factors")


class Rope:
    """cos/sin tables for positions [0, n), grown on demand, in the compute dtype."""

    def __init__(self, args: LlamaArgs, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.inv_freq = rope_inv_freq(args)
        self.dtype, self.device = dtype, device
        self.cos = self.sin = torch.empty(0)

    def tables(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if self.cos.shape[0] < end:
            n = max(end, 2 * self.cos.shape[0], 256)
            t = torch.arange(n, dtype=torch.int64).float()
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos = emb.cos().to(device=self.device, dtype=self.dtype)
            self.sin = emb.sin().to(device=self.device, dtype=self.dtype)
        return self.cos[start:end], self.sin[start:end]


apply_rope = ops.apply_rope  # x [T, heads, d], cos/sin [T, d]


# ---------------------------------------------------------------- blocks


rms_norm = ops.rms_norm  # Hugging Face's LlamaRMSNorm (fused for one CPU row)


def _linear(x: torch.Tensor, w: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return ops.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def embed(args: LlamaArgs, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ids: [T] int64 -> [T, hidden]."""
    return F.embedding(ids, table)


def attention_block(args: LlamaArgs, w: Mapping[str, torch.Tensor], x: torch.Tensor, cache, layer: int,
                    rope: tuple[torch.Tensor, torch.Tensor], tree_mask: torch.Tensor | None = None):
    """The attention half of a decoder layer: returns (x + attention, the post-attention RMSNorm of it,
    whether the rows take the fused single-row kernels). Shared by every family built on this one."""
    T = x.shape[0]
    nh, nkv, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    eps = args.rms_norm_eps
    h = rms_norm(x, w["input_layernorm.weight"], eps)
    q = _linear(h, w, "self_attn.q_proj")
    k = _linear(h, w, "self_attn.k_proj")
    v = _linear(h, w, "self_attn.v_proj").view(T, nkv, d)
    if args.qk_norm:
        q = rms_norm(q.view(T, nh, d), w["self_attn.q_norm.weight"], eps)
        k = rms_norm(k.view(T, nkv, d), w["self_attn.k_norm.weight"], eps)
    cos, sin = rope
    # One CPU token (decode): fused single-row kernels instead of ~20 small torch ops.
    fast = ops.fast_row(x, q, k, cos, sin)
    q, k = ops.rope_qk(q, k, cos, sin, nh, nkv, fast)
    o = cache.attend(layer, q, k, v, window=args.window(layer), tree_mask=tree_mask)
    if o.dtype != x.dtype:
        o = o.to(x.dtype)
    attn = _linear(o, w, "self_attn.o_proj")
    x, h = ops.add_rms_norm(x, attn, w["post_attention_layernorm.weight"], eps, fast)
    return x, h, fast


def mlp(w: Mapping[str, torch.Tensor], h: torch.Tensor, prefix: str = "mlp", fast: bool = True) -> torch.Tensor:
    """down(silu(gate(h)) * up(h)) with the projections under ``prefix`` (also a MoE's shared expert)."""
    gate, up = _linear(h, w, prefix + ".gate_proj"), _linear(h, w, prefix + ".up_proj")
    return _linear(ops.silu_mul(gate, up, fast), w, prefix + ".down_proj")


def layer_forward(args: LlamaArgs, w: Mapping[str, torch.Tensor], x: torch.Tensor, cache, layer: int,
                  rope: tuple[torch.Tensor, torch.Tensor], start: int,
                  tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer. x: [T, hidden] at positions start..start+T; returns the new x.

    ``cache.attend(layer, q, k, v, window=...)`` stores this step's k/v ([T, kv_heads, d])
    and returns the attention output [T, heads*d], computed wherever the cache keeps the
    keys and values (offload_rt.kv); ``tree_mask`` (speculation) replaces the causal mask
    among the new tokens.
    """
    x, h, fast = attention_block(args, w, x, cache, layer, rope, tree_mask)
    return x + mlp(w, h, "mlp", fast)


def head_forward(args: LlamaArgs, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Final norm and output projection for the rows of x: [T, hidden] -> [T, vocab] float32."""
    h = rms_norm(x, w[FINAL_NORM], args.rms_norm_eps)
    out = w[EMBED] if args.tie_word_embeddings else w[LM_HEAD]
    return ops.linear(h, out).float()


def args_from_config(cfg: Mapping[str, Any]) -> LlamaArgs:
    """This family's config from a config.json dict (the family interface's constructor)."""
    return LlamaArgs.from_config(cfg)


def activation_bytes(args: LlamaArgs, tokens: int) -> int:
    """Scratch of a forward pass over ``tokens`` rows (fp32 upper bound) plus the logits row."""
    per_token = 4 * args.hidden_size + 3 * args.intermediate_size + 2 * args.num_attention_heads * args.head_dim
    return 4 * (tokens * per_token + args.vocab_size)
