"""``--draft`` and ``--spec-budget``: open the draft, size it, pick the budget, build the speculator.

The draft is placed first: its weights (all resident, at its compute dtype or as int4 blocks),
its KV cache (the context plus the rows of one step's tree) and its activations come off the
compute device's budget (host RAM on a CPU) before the target is planned with what is left.
The budget is then the planner's choice (:mod:`offload_rt.spec.budget`) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from offload_rt.config import RunConfig, format_size
from offload_rt.errors import UsageError, UserError
from offload_rt.spec import budget as budget_mod

SELF_INT4 = "self-int4"


def tree_headroom(budget: int) -> int:
    """Target KV rows a step needs past the context: the root and the tree."""
    return budget + 1


def draft_rows(budget: int, overlap: bool = False) -> int:
    """Draft KV rows one step's tree may use (tree.grow's ``max_evaluated``, the root included; with
    overlapped drafting, the growth past the tree during the pass: speculate.AHEAD_ROWS budgets)."""
    from offload_rt.spec.speculate import AHEAD_ROWS

    return (AHEAD_ROWS if overlap else 2) * budget + 1


def open_draft(cfg: RunConfig, target, device: str, *, plan_only: bool = False):
    """The draft as a :class:`~offload_rt.loader.LoadedModel` (no engine yet): ``self-int4`` is the
    target's checkpoint stored as int4 blocks (its own store, converted once); a path is any supported
    model with the target's tokenizer. ``plan_only``: nothing converted (loader.open_model)."""
    from offload_rt.loader import open_model
    from storage.errors import StorageError

    if cfg.draft == SELF_INT4:
        dcfg = replace(cfg, weights="int4", dtype=None)
    else:
        dcfg = replace(cfg, model=str(cfg.draft), weights="auto", dtype=None)
    try:
        draft = open_model(dcfg, plan_only=plan_only)
    except (UserError, StorageError) as e:  # storage raises its own (storage.errors)
        raise type(e)(f"--draft {cfg.draft}: {e}") from None
    diff = target.tokenizer.vocabulary_difference(draft.tokenizer)
    if diff is not None:
        raise UsageError(f"--draft {cfg.draft} has a different tokenizer than {target.name} ({diff}); a draft "
                         f"must share the target's vocabulary (use --draft {SELF_INT4} or a model of the same family)")
    # CPU: the draft's own compute dtype (a bf16 checkpoint stays bf16 in RAM, half of float32); a GPU
    # computes at the target's
    if device != "cpu":
        draft.dtype = target.dtype
    if cfg.draft == SELF_INT4:
        draft.name = f"{target.name} ({SELF_INT4})"
    return draft


def matrix_params(store) -> int:
    """Weights of the store's 2-D tensors (what a batched pass multiplies by)."""
    return sum(store.info(n).numel for n in store.tensor_names if len(store.info(n).shape) == 2)


@dataclass
class DraftPlan:
    """The draft's residency and the speculation budget (``--plan``, ``--stats``)."""

    name: str
    tier: str  # "device" (GPU) or "host"
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    budget: int
    chosen: bool  # the planner picked the budget (not --spec-budget)
    min_budget: int  # the smallest --cpu-mem (CPU) that holds the draft and the target's working set
    agreement: float  # the acceptance model's parameter (spec.budget)
    tokens_per_pass: float = 0.0  # predicted
    predicted_tok_s: float = 0.0
    target_pass_s: float = 0.0  # predicted, for the budget's tree
    draft_s: float = 0.0  # predicted tree building per step
    overlap: bool = False  # --spec-overlap

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

    def describe(self) -> str:
        how = "chosen by the planner" if self.chosen else "--spec-budget"
        return (f"draft: {self.name}, resident in {self.tier} RAM" if self.tier == "host" else
                f"draft: {self.name}, resident on the GPU") + (
            f", {format_size(self.bytes)} (weights {format_size(self.weight_bytes)}, KV {format_size(self.kv_bytes)}, "
            f"activations {format_size(self.activation_bytes)}); minimum working set with the draft "
            f"{format_size(self.min_budget)}\n"
            f"speculation: budget {self.budget} tree nodes ({how}); predicted {self.tokens_per_pass:.2f} tokens per "
            f"target pass (draft agreement {self.agreement:.2f} assumed), target pass "
            f"{self.target_pass_s * 1e3:.0f} ms + tree {self.draft_s * 1e3:.0f} ms -> {self.predicted_tok_s:.3g} tok/s")


def draft_bytes(draft, cfg: RunConfig, ctx_tokens: int, budget: int, device: str) -> tuple[int, int, int]:
    """(weights, KV, activations) the draft holds for ``budget``."""
    from offload_rt import kv as kv_mod
    from offload_rt.memory.kv_plan import CHUNK_TOKENS
    from offload_rt.runtime import activation_bytes, dequant_scratch_bytes
    from offload_rt.spec.speculate import MAX_BATCH

    a, dt = draft.args, draft.dtype
    weights = sum(draft.store.info(n).held_bytes(dt) for n in draft.store.tensor_names)
    rows = ctx_tokens + draft_rows(budget, cfg.spec_overlap)
    rows = -(-rows // CHUNK_TOKENS) * CHUNK_TOKENS if device == "cpu" else rows  # whole RAM chunks
    kv = rows * kv_mod.bytes_per_token(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, dt)
    act = activation_bytes(a, max(cfg.prefill_chunk, MAX_BATCH), dequant_scratch_bytes(draft.store, device == "cuda"))
    return weights, kv, act


def quantized_matrices(store) -> tuple[str | None, int, list[tuple[int, int]]]:
    """(the most common block format, bytes, distinct shapes) of the store's quantized 2-D tensors: what a
    quantized draft's pass runs through the fused kernel (None, 0, [] for a float store)."""
    by_fmt: dict[str, int] = {}
    shapes: dict[str, set] = {}
    for n in store.tensor_names:
        info = store.info(n)
        if info.quantized and len(info.shape) == 2:
            by_fmt[info.fmt.name] = by_fmt.get(info.fmt.name, 0) + int(info.nbytes)
            shapes.setdefault(info.fmt.name, set()).add(tuple(int(x) for x in info.shape))
    if not by_fmt:
        return None, 0, []
    fmt = max(by_fmt, key=by_fmt.get)
    return fmt, by_fmt[fmt], sorted(shapes[fmt])


def pass_cost(target_store, target_dtype, placement, bw, draft, device: str, *,
              quant_rates: str = "measure") -> budget_mod.PassCost:
    """The cost model's inputs from the target's placement, the measured rates and the draft's size.

    A quantized draft on the CPU (``self-int4``) is costed with the fused kernel's own measured rates
    (calibrate.quant_rows_cost: one row, then each further row, over its matrices' shapes, scaled to all
    its quantized bytes) plus the rest of its layers (``layer_s``) and a token's fixed cost; a float draft
    with the mat-vec rate and the batched matmul rate of its dtype. ``quant_rates``: "measure" (once per
    machine, then cached), "cached" (``--plan``: never measured here) or "off" (given bandwidths, as
    tests and presets give them: the quantized draft is costed like a float one at ``bw.matvec``, so the
    plan depends on the given figures only)."""
    from offload_rt.memory import calibrate

    flops = calibrate.matmul_flops(str(target_dtype).replace("torch.", ""), device)
    a = draft.args
    fmt, qbytes, shapes = quantized_matrices(draft.store) if device == "cpu" else (None, 0, [])
    rates = None
    if fmt is not None and quant_rates != "off":
        rates = calibrate.quant_rows_cost(fmt, shapes, measure=quant_rates == "measure")
    if rates is not None:
        from storage.formats import FORMATS

        one_s, row_s = rates
        scale = qbytes / sum(FORMATS[fmt].nbytes(sh) for sh in shapes)  # all layers' matrices, from one of each
        draft_fixed = one_s * scale + a.num_hidden_layers * bw.layer_s + bw.token_s
        draft_token = row_s * scale
    else:
        dflops = flops if draft.dtype == target_dtype else calibrate.matmul_flops(
            str(draft.dtype).replace("torch.", ""), device)
        dweights = sum(draft.store.info(n).nbytes for n in draft.store.tensor_names)
        draft_fixed = dweights / bw.matvec + a.num_hidden_layers * bw.layer_s + bw.token_s
        draft_token = 2.0 * matrix_params(draft.store) / dflops
    return budget_mod.PassCost(
        target_fixed_s=placement.predicted_s_per_token,
        target_token_s=2.0 * matrix_params(target_store) / flops,
        draft_fixed_s=draft_fixed, draft_token_s=draft_token)


def agreement(cfg: RunConfig) -> float:
    return budget_mod.AGREEMENT_SELF_INT4 if cfg.draft == SELF_INT4 else budget_mod.AGREEMENT_DRAFT


def build_speculator(draft, plan: DraftPlan, *, vocab: int, ctx_tokens: int, device: str, tracer=None,
                     threads: int | None = None):
    """The draft's resident engine and the :class:`~offload_rt.spec.speculate.Speculator` over it."""
    from offload_rt.engine import Engine
    from offload_rt.loader import resident_kv, resident_source
    from offload_rt.spec.draft import Draft
    from offload_rt.spec.speculate import Speculator

    a, dt, store = draft.args, draft.dtype, draft.store
    rows = ctx_tokens + draft_rows(plan.budget, plan.overlap)
    cache = resident_kv(a, dt, rows, device)
    source = resident_source(store, a, draft.groups, dt, device)
    engine = Engine(a, source, dt, max_tokens=rows, device=device, cache=cache,
                    prefill_threads=threads if device == "cpu" else None)
    draft.engine = engine
    return Speculator(Draft(engine, vocab=vocab, name=draft.name), plan.budget, tracer=tracer, overlap=plan.overlap)
