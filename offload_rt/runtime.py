"""Wires the planner, the tiers and the scheduler into a weight source for the engine.

``prepare(cfg, store, args, dtype, groups, device)`` resolves the budgets, measures
(or reads the cached) bandwidths, asks the planner for a placement, and returns a
factory that builds the :class:`~offload_rt.scheduler.StreamingWeights` source the
engine sweeps. Policy lives in ``offload_rt.memory.plan``; bytes move in the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_rt.config import RunConfig
from offload_rt.engine import Group
from offload_rt.errors import UsageError
from offload_rt.kv_cache import KVCache
from offload_rt.memory import budgets as budgets_mod
from offload_rt.memory import calibrate
from offload_rt.memory.plan import MAX_PREFETCH_DEPTH, Bandwidths, Budgets, GroupSpec, Placement, plan
from offload_rt.memory.tiers import Tiers
from offload_rt.models import llama
from offload_rt.models.llama import LlamaArgs

MIN_STREAM_DEPTH = 2  # slots in flight when anything streams (see prepare)
DEFAULT_CTX = 4096  # context window (and KV budget) when --ctx-size is not given: min(model's, this)


def _nbytes(store, name: str, dtype: torch.dtype) -> int:
    """Bytes of one stored tensor once loaded at ``dtype`` (what residency holds)."""
    info = store.info(name)
    return int(torch.Size(info.shape).numel()) * dtype.itemsize


def group_specs(store, groups: list[Group], dtype: torch.dtype, args: LlamaArgs) -> list[GroupSpec]:
    """Per group: bytes held at the compute dtype, bytes stored, and one staging slot.

    Every tensor of the group's sweep step counts, a tied embedding in the head included
    (the head's output matrix). The slot is the scheduler's own layout of the stored
    tensors (aligned offsets for O_DIRECT), so the plan reserves what the run will.
    """
    from offload_rt.scheduler import _Layout

    specs = []
    for g in groups:
        names = list(dict.fromkeys(n for _k, n in g.tensors))
        specs.append(GroupSpec(g.name, g.kind, sum(_nbytes(store, n, dtype) for n in names),
                               stored_bytes=sum(int(store.info(n).nbytes) for n in names),
                               slot_bytes=_Layout(store, g).nbytes))
    return specs


def untied_embed_bytes(store, args: LlamaArgs, dtype: torch.dtype) -> int:
    """The embedding table as a separate resident tensor (0 when tied: it is the head's matrix)."""
    return 0 if args.tie_word_embeddings else _nbytes(store, llama.EMBED, dtype)


def context_tokens(args: LlamaArgs, ctx_size: int | None) -> int:
    """The context window a run serves; its KV cache is budgeted for exactly this many tokens."""
    limit = args.max_position_embeddings
    if ctx_size is None:
        return min(limit, DEFAULT_CTX)
    if ctx_size > limit:
        raise UsageError(f"--ctx-size {ctx_size} exceeds the model's context of {limit} tokens; pass at most {limit}")
    return ctx_size


def kv_reserve_bytes(args: LlamaArgs, dtype: torch.dtype, tokens: int) -> int:
    return tokens * KVCache.bytes_per_token(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype)


def activation_bytes(args: LlamaArgs, prefill_chunk: int) -> int:
    """Scratch of one prefill chunk (fp32 upper bound) plus the logits row."""
    per_token = 4 * args.hidden_size + 3 * args.intermediate_size + 2 * args.num_attention_heads * args.head_dim
    return 4 * (prefill_chunk * per_token + args.vocab_size)


def embed_tier(placement: Placement, args: LlamaArgs, cuda: bool) -> str:
    """Where the run keeps the embedding table: as the plan placed it, or (tied) beside the head's copy.

    A tied table is the head's output matrix: shared while the head is resident where
    compute runs, otherwise read by rows (with CUDA a head kept in host RAM is a copy
    that is streamed up, not one the embedding lookup on the device can use).
    """
    if not args.tie_word_embeddings:
        return placement.embed_tier or "disk"
    head = placement.tiers["head"]
    return head if head == ("device" if cuda else "host") else "disk"


@dataclass
class Prepared:
    placement: Placement
    bandwidths: Bandwidths
    specs: list[GroupSpec]
    budgets: Budgets
    device: str

    def factory(self, cfg: RunConfig, tracer=None):
        placement, device = self.placement, self.device
        cuda = device == "cuda"

        def build(store, args: LlamaArgs, dtype: torch.dtype, groups: list[Group]):
            from offload_rt.scheduler import StreamingWeights

            tiers = Tiers(host_budget=self.budgets.host, device_budget=self.budgets.device, cuda=cuda)
            tiers.get(placement.kv_tier).reserve("kv", placement.kv_bytes)
            tiers.host.reserve("activations", placement.activation_bytes)
            return StreamingWeights(store, groups, placement.tiers, dtype, embed_name=llama.EMBED,
                                    embed_tier=embed_tier(placement, args, cuda), tiers=tiers, device=device,
                                    depth=placement.prefetch_depth, tracer=tracer)

        return build


def prepare(cfg: RunConfig, store, args: LlamaArgs, dtype: torch.dtype, groups: list[Group], device: str) -> Prepared:
    cuda = device == "cuda"
    host = budgets_mod.resolve_budget(cfg.cpu_mem, kind="cpu")
    dev = budgets_mod.resolve_budget(cfg.gpu_mem, kind="gpu") if cuda else None
    bud = Budgets(device=dev, host=host)
    hints = cfg.bandwidth_hints or {}
    if {"disk_read", "matvec"} <= set(hints) and (hints.get("h2d") or not cuda):
        bw = Bandwidths(disk_read=hints["disk_read"], mem_read=hints.get("mem_read", hints["matvec"]),
                        matvec=hints["matvec"], h2d=hints.get("h2d"))
    else:
        bw = calibrate.load_or_measure(cfg.store_dir, progress=cfg.progress, cuda=cuda)
    bw = bw.for_dtype(str(dtype).replace("torch.", ""))
    specs = group_specs(store, groups, dtype, args)
    # At least two slots in flight: with one, the reader idles while each streamed layer computes
    # (measured: ~85% disk utilisation on D1 with one slot); one more buffer costs less than that.
    kv_bytes = kv_reserve_bytes(args, dtype, context_tokens(args, cfg.ctx_size))
    placement = plan(specs, bud, bw, kv_bytes=kv_bytes, prefetch_depth=cfg.prefetch_depth,
                     activation_bytes=activation_bytes(args, cfg.prefill_chunk),
                     embed_bytes=untied_embed_bytes(store, args, dtype),
                     depth_bounds=(MIN_STREAM_DEPTH, MAX_PREFETCH_DEPTH))
    return Prepared(placement, bw, specs, bud, device)
