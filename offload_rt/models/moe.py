"""Sparse Mixture-of-Experts decoders: Qwen3-MoE, Mixtral, Qwen2-MoE.

The attention half of each layer is the Llama family's (:func:`llama.attention_block`); the MLP half
of a sparse layer routes every token to ``num_experts_per_tok`` of ``num_experts`` experts:

- ``qwen3_moe``: softmax over all experts (float32), top-k, renormalised when ``norm_topk_prob``;
  q/k RMSNorm (Qwen3-30B-A3B, Qwen3-235B-A22B);
- ``mixtral``: softmax, top-k, always renormalised (= softmax over the chosen experts' logits);
- ``qwen2_moe``: softmax, top-k (renormalised only when ``norm_topk_prob``), plus a shared expert
  scaled by ``sigmoid(shared_expert_gate(h))``; q/k/v biases.

Layers listed in ``mlp_only_layers`` (or off the ``decoder_sparse_step`` grid) are dense, as in
transformers. The routed experts are the weight source's :class:`~offload_rt.models.ops.ExpertSet`
(``w["experts"]``): the model routes and hands it the rows, the ids and the weights; where the
experts' bytes are (all resident, a cache of slots, the disk) is not this file's business.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch

from offload_rt.errors import ModelSourceError
from offload_rt.models import LAYER_PREFIX, ops
from offload_rt.models.llama import (EMBED, FINAL_NORM, LM_HEAD, LlamaArgs, Rope, attention_block,  # noqa: F401
                                     embed, head_forward, mlp)

# model_type -> (the Llama-family switches of its attention, the MoE block's own)
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "qwen3_moe": ({"qk_norm": True, "sliding": "gated"}, {"prefix": "mlp", "renorm": "config"}),
    "mixtral": ({"sliding": "all"}, {"prefix": "block_sparse_moe", "renorm": "always"}),
    "qwen2_moe": ({"qkv_bias": True, "sliding": "gated"}, {"prefix": "mlp", "renorm": "config", "shared": True}),
}
MODEL_TYPES = tuple(FAMILIES)
PARTS = ("gate_proj", "up_proj", "down_proj")  # one routed expert's matrices, in its packed unit


@dataclass(frozen=True)
class MoeArgs(LlamaArgs):
    num_experts: int = 0  # routed experts per sparse layer
    num_experts_per_tok: int = 0  # experts each token is routed to (k)
    moe_intermediate_size: int = 0  # width of one routed expert
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # qwen2_moe's shared expert width (0: none)
    sparse_layers: tuple[bool, ...] = ()  # per layer: a MoE block (else the dense MLP of intermediate_size)
    moe_prefix: str = "mlp"  # "mlp" (Qwen) | "block_sparse_moe" (Mixtral): where the block's tensors live

    @classmethod
    def switches(cls, model_type) -> dict[str, Any]:
        if model_type not in FAMILIES:
            from offload_rt.models import unsupported

            raise unsupported(model_type)
        return FAMILIES[model_type][0]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "MoeArgs":
        base = super().from_config(cfg)
        block = FAMILIES[base.model_type][1]
        n = base.num_hidden_layers
        try:
            # transformers writes num_local_experts for every family; Hub Qwen configs say num_experts
            experts = int(cfg.get("num_experts") or cfg["num_local_experts"])
            width = int(cfg["intermediate_size"] if base.model_type == "mixtral" else cfg["moe_intermediate_size"])
            k = int(cfg["num_experts_per_tok"])
            step = int(cfg.get("decoder_sparse_step") or 1)
            dense = {int(i) for i in (cfg.get("mlp_only_layers") or [])}
            shared = int(cfg.get("shared_expert_intermediate_size") or 0) if block.get("shared") else 0
        except (KeyError, TypeError, ValueError) as e:
            raise ModelSourceError(f"config.json is missing or has a bad value for {e}; is this a complete "
                                   "Mixture-of-Experts checkpoint?") from None
        if not 0 < k <= experts:
            raise ModelSourceError(f"config.json routes {k} of {experts} experts per token; expected 1..{experts}")
        renorm = True if block["renorm"] == "always" else bool(cfg.get("norm_topk_prob", False))
        sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
        return replace(base, num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=width,
                       norm_topk_prob=renorm, shared_expert_intermediate_size=shared, sparse_layers=sparse,
                       moe_prefix=block["prefix"])

    def layer_tensors(self, layer: int) -> dict[str, tuple[int, ...]]:
        table = self.shape_table()
        names = [s for s in self.layer_suffixes() if not (self.sparse_layers[layer] and s.startswith("mlp."))]
        out = {s: table[s] for s in names}
        if self.sparse_layers[layer]:
            h, p = self.hidden_size, self.moe_prefix
            out[f"{p}.gate.weight"] = (self.num_experts, h)
            if self.shared_expert_intermediate_size:
                si = self.shared_expert_intermediate_size
                out.update({f"{p}.shared_expert.gate_proj.weight": (si, h), f"{p}.shared_expert.up_proj.weight": (si, h),
                            f"{p}.shared_expert.down_proj.weight": (h, si), f"{p}.shared_expert_gate.weight": (1, h)})
        return out

    def expert_tensor(self, layer: int) -> str | None:
        if not self.sparse_layers[layer]:
            return None
        return LAYER_PREFIX.format(layer) + f"{self.moe_prefix}.experts"

    def router_tensor(self, layer: int) -> str | None:
        return LAYER_PREFIX.format(layer) + f"{self.moe_prefix}.gate.weight" if self.sparse_layers[layer] else None

    def expert_parts(self, layer: int) -> dict[str, tuple[int, ...]]:
        if not self.sparse_layers[layer]:
            return {}
        h, i = self.hidden_size, self.moe_intermediate_size
        return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def args_from_config(cfg: Mapping[str, Any]) -> MoeArgs:
    return MoeArgs.from_config(cfg)


def route(args: MoeArgs, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k], routing weights [T, k] in the logits' dtype) as transformers routes: softmax in
    float32 over all experts, top-k, renormalised when the family does."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, ids = torch.topk(probs, args.num_experts_per_tok, dim=-1)
    if args.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return ids, top.to(logits.dtype)


def moe_block(args: MoeArgs, w: Mapping[str, Any], h: torch.Tensor, fast: bool) -> torch.Tensor:
    """The sparse MLP of one layer for the normalised rows h [T, hidden]."""
    p = args.moe_prefix
    ids, weights = route(args, ops.linear(h, w[f"{p}.gate.weight"]))
    out = ops.moe(w["experts"], h, ids, weights)
    if args.shared_expert_intermediate_size:
        shared = mlp(w, h, f"{p}.shared_expert", fast)
        out = out + torch.sigmoid(ops.linear(h, w[f"{p}.shared_expert_gate.weight"])) * shared
    return out


def layer_forward(args: MoeArgs, w: Mapping[str, Any], x: torch.Tensor, cache, layer: int,
                  rope: tuple[torch.Tensor, torch.Tensor], start: int,
                  tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer (see llama.layer_forward); a sparse layer's MLP is its routed experts."""
    x, h, fast = attention_block(args, w, x, cache, layer, rope, tree_mask)
    if args.sparse_layers[layer]:
        return x + moe_block(args, w, h, fast)
    return x + mlp(w, h, "mlp", fast)


def activation_bytes(args: MoeArgs, tokens: int) -> int:
    """Scratch of a pass over ``tokens`` rows (fp32 upper bound): attention, the widest MLP (dense, shared,
    or the k routed experts' intermediates of a row), routing, plus the logits row."""
    k, i = args.num_experts_per_tok, args.moe_intermediate_size
    mlp_w = max(args.intermediate_size, args.shared_expert_intermediate_size, k * i)
    per_token = (6 * args.hidden_size + 3 * mlp_w + 2 * args.num_attention_heads * args.head_dim
                 + 2 * args.num_experts)
    return 4 * (tokens * per_token + args.vocab_size)
