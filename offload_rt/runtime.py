"""Wires the planner, the tiers and the scheduler into a weight source for the engine.

``prepare(cfg, store, args, dtype, groups, device)`` resolves the budgets, measures
(or reads the cached) bandwidths, asks the planner for a placement, and returns a
factory that builds the :class:`~offload_rt.scheduler.StreamingWeights` source the
engine sweeps. Policy lives in ``offload_rt.memory.plan``; bytes move in the scheduler.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from offload_rt.accel import HostAccel, make_accel
from offload_rt.config import KV_SPILL_DIR, RunConfig, format_size
from offload_rt.engine import Group
from offload_rt.errors import BudgetError, UsageError
from offload_rt import kv as kv_mod
from offload_rt.memory import budgets as budgets_mod
from offload_rt.memory import gpu as gpu_mod
from offload_rt.memory import calibrate
from offload_rt.memory.expert_plan import ExpertPlan, ExpertSpec, plan_experts
from offload_rt.memory.kv_plan import CHUNK_TOKENS, KVShape, KVSplit, split_kv
from offload_rt.memory.plan import MAX_PREFETCH_DEPTH, Bandwidths, Budgets, GroupSpec, Placement, cli_size, plan
from offload_rt.memory.tiers import Tiers
from offload_rt import models

MIN_STREAM_DEPTH = 2  # slots in flight when anything streams (see prepare)
PARALLEL_CHOICES = (8, 4, 2, 1)  # serve's --parallel when not given: the first that plans with its KV within ...
PARALLEL_KV_SHARE = 0.25  # ... this share of the host budget
DEFAULT_CTX = 4096  # context window (and KV budget) when --ctx-size is not given: min(model's, this)
AUTO_MAGICPIG_TOKENS = 32768  # --attention auto: MagicPIG from this context length on (A2: 2-3x from 32k)
# --plan before this machine is calibrated: configs/cpu-nvme.toml's hints (the CI machine, BENCHMARKS.md),
# a pinned PCIe 4 x16 copy for h2d
PLAN_DEFAULT_BANDWIDTHS = Bandwidths(disk_read=1.3e9, mem_read=2.4e10, matvec=1.35e10, h2d=2.5e10)


def _nbytes(store, name: str, dtype: torch.dtype) -> int:
    """Bytes of one stored tensor once loaded at ``dtype`` (what residency holds)."""
    return store.info(name).held_bytes(dtype)


def group_specs(store, groups: list[Group], dtype: torch.dtype, args) -> list[GroupSpec]:
    """Per group: bytes held at the compute dtype, bytes stored, its two slot layouts, its cast buffer.

    Every tensor of the group's sweep step counts, a tied embedding in the head included
    (the head's output matrix). The layouts are the scheduler's own (aligned offsets for
    O_DIRECT): as stored (disk reads) and at the compute dtype (device slots, pinned host
    copies, the CPU cast buffer), so the plan reserves exactly what the run will.
    """
    from offload_rt.scheduler import _Layout

    specs = []
    for g in groups:
        names = list(dict.fromkeys(n for _k, n in g.tensors))
        raw, held = _Layout(store, g), _Layout(store, g, dtype)
        specs.append(GroupSpec(g.name, g.kind, sum(_nbytes(store, n, dtype) for n in names),
                               stored_bytes=sum(int(store.info(n).nbytes) for n in names),
                               slot_bytes=raw.nbytes, held_slot_bytes=held.nbytes, cast_bytes=held.cast_bytes))
    return specs


def untied_embed_bytes(store, args, dtype: torch.dtype) -> int:
    """The embedding table as a separate resident tensor (0 when tied: it is the head's matrix)."""
    return 0 if args.tie_word_embeddings else _nbytes(store, models.of(args).EMBED, dtype)


def context_tokens(args, ctx_size: int | None) -> int:
    """The context window a run serves; its KV cache is budgeted for exactly this many tokens."""
    limit = args.max_position_embeddings
    if ctx_size is None:
        return min(limit, DEFAULT_CTX)
    if ctx_size > limit:
        raise UsageError(f"--ctx-size {ctx_size} exceeds the model's context of {limit} tokens; pass at most {limit}")
    return ctx_size


def kv_reserve_bytes(args, dtype: torch.dtype, tokens: int) -> int:
    return tokens * kv_mod.bytes_per_token(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype)


def kv_dtypes(cfg: RunConfig, args, dtype: torch.dtype):
    """--kv-dtype: (the float dtype of the KV's floats, the quantization or None) for a compute ``dtype``
    (kernels_cpu.kv_quant.parse). UsageError where the model's head dim cannot be quantized."""
    from kernels_cpu.kv_quant import parse

    try:
        return parse(cfg.kv_dtype, dtype, args.head_dim, CHUNK_TOKENS)
    except ValueError as e:
        raise UsageError(str(e)) from None


def kv_shape(args, dtype: torch.dtype, cfg: RunConfig | None = None) -> KVShape:
    """The KV's shape for the planner: ``dtype`` the compute dtype, ``cfg``'s --kv-dtype applied."""
    if cfg is None or cfg.kv_dtype is None:
        return KVShape(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype.itemsize)
    kv_dtype, quant = kv_dtypes(cfg, args, dtype)
    return KVShape(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, kv_dtype.itemsize,
                   quant_row=quant.row_bytes() if quant else 0, name=cfg.kv_dtype, float_chunks=2 if cfg.draft else 1)


def kv_dir(cfg: RunConfig) -> Path:
    """Where KV chunks spill: beside the weight stores (``--offload-dir``)."""
    return cfg.store_dir / KV_SPILL_DIR


def _disk_free(path: Path) -> int:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing ancestor)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def may_use_magicpig(cfg: RunConfig, args) -> bool:
    """Whether this run's options can turn MagicPIG on (its kernels are then compiled up front)."""
    return cfg.attention == "magicpig" or (
        cfg.attention == "auto" and context_tokens(args, cfg.ctx_size) >= AUTO_MAGICPIG_TOKENS)


def plan_kv(cfg: RunConfig, args, dtype: torch.dtype, extra_tokens: int = 0,
            sequences: int = 1) -> tuple[KVSplit, str]:
    """One sequence's KV cache split across RAM and disk for the run's context (plus ``extra_tokens`` rows:
    a speculation tree's), and the attention it runs; ``sequences`` caches share ``--kv-cpu-mem``.

    ``--attention auto`` turns MagicPIG on past :data:`AUTO_MAGICPIG_TOKENS` of context when
    the KV (and its hash tables) fit in RAM, whatever ``--kv-dtype`` (over q8/q4 records it samples rows of
    the records and keeps its gain over the quantized exact kernel: A2 in docs/BENCHMARKS.md); otherwise,
    when the KV spills to disk, selection (decode steps read only the disk chunks whose key bounds say they
    may matter, ``--attention select`` too); otherwise decode attention is exact (``--attention exact`` reads every disk chunk).
    """
    tokens = context_tokens(args, cfg.ctx_size) + extra_tokens
    shape = kv_shape(args, dtype, cfg)
    free = _disk_free(kv_dir(cfg)) if cfg.kv_cpu_mem is not None else None
    kv_cpu_mem = None if cfg.kv_cpu_mem is None else cfg.kv_cpu_mem // sequences
    free = None if free is None else free // sequences
    kw = dict(kv_cpu_mem=kv_cpu_mem, disk_free=free, model_tokens=args.max_position_embeddings)
    if cfg.attention == "magicpig" or (cfg.attention == "auto" and tokens >= AUTO_MAGICPIG_TOKENS):
        from kernels_cpu.magicpig import LSHIndex

        nkv, k, l = args.num_key_value_heads, cfg.lsh_k, cfg.lsh_l
        # per token, plus (spread over the window) each layer's segments not yet merged
        tables = args.num_hidden_layers * (LSHIndex.bytes_per_token(nkv, k, l)
                                           + -(-LSHIndex.overhead_bytes(nkv, k, l) // tokens))
        try:
            return split_kv(shape, tokens, table_bytes_per_token=tables, **kw), "magicpig"
        except BudgetError:
            if cfg.attention == "magicpig":
                raise
            # auto: the tables do not fit in RAM beside the KV: exact attention, or selection over the disk
    split = split_kv(shape, tokens, **kw)
    return split, "select" if split.spills and cfg.attention in ("auto", "select") else "exact"


def activation_bytes(args, prefill_chunk: int, dequant: int = 0) -> int:
    """Scratch of one prefill chunk (fp32 upper bound) plus the logits row, plus ``dequant`` bytes for
    quantized weights' dequantization (:func:`dequant_scratch_bytes`)."""
    return models.of(args).activation_bytes(args, prefill_chunk) + dequant


def has_quantized(store) -> bool:
    """Whether the store holds any block-quantized tensor or expert part (its kernels and scratch are then
    needed)."""
    for n in store.tensor_names:
        layout = store.expert_layout(n)
        if store.info(n).quantized or (layout is not None and any(p.fmt.quantized for p in layout.parts.values())):
            return True
    return False


def expert_spec(store, args, dtype: torch.dtype) -> ExpertSpec | None:
    """The routed experts' planner inputs (None for a dense model): one expert's stored and held bytes,
    the routers the predictor keeps resident."""
    layers = [i for i in range(args.num_hidden_layers) if args.expert_tensor(i) is not None]
    if not layers:
        return None
    layouts = [store.expert_layout(args.expert_tensor(i)) for i in layers]
    held = max(sum(p.nbytes if p.fmt.quantized else p.nbytes // p.fmt.block_bytes * dtype.itemsize
                   for p in lay.parts.values()) for lay in layouts)
    routers = sum(_nbytes(store, args.router_tensor(i), dtype) for i in layers)
    return ExpertSpec(layers=len(layers), experts=layouts[0].count, active=args.num_experts_per_tok,
                      unit_bytes=max(lay.unit_bytes for lay in layouts), held_bytes=held, router_bytes=routers)


def has_experts(args) -> bool:
    """Whether the model has Mixture-of-Experts layers (routed experts: their kernels and scratch)."""
    return any(args.expert_tensor(i) is not None for i in range(args.num_hidden_layers))


def moe_scratch_bytes(args) -> int:
    """The routed experts' kernel scratch (a prefill chunk's gate/up/down rows, kernels_cpu.moe)."""
    if not has_experts(args):
        return 0
    from kernels_cpu.moe import GROUP_BYTES

    return GROUP_BYTES


def dequant_scratch_bytes(store, cuda: bool) -> int:
    """What quantized matrices need beside them at compute time: on the CPU the prefill's reusable block
    of dequantized rows; on a GPU one linear's block of dequantized rows and its intermediates."""
    if not has_quantized(store):
        return 0
    if cuda:
        from kernels_gpu.quant import SCRATCH_BYTES

        return SCRATCH_BYTES
    from kernels_cpu.quant import PREFILL_BLOCK_BYTES

    return PREFILL_BLOCK_BYTES


def embed_tier(placement: Placement, args) -> str:
    """Where the run keeps the embedding table: as the plan placed it, or (tied) the head's own copy.

    A tied table is the head's output matrix: wherever the head is held (device, or a host
    copy that is also streamed up), lookups gather their rows from it; a head on disk means
    rows are read from the store.
    """
    if not args.tie_word_embeddings:
        return placement.embed_tier or "disk"
    return placement.tiers["head"]


@dataclass
class Prepared:
    placement: Placement
    bandwidths: Bandwidths
    specs: list[GroupSpec]
    budgets: Budgets
    device: str
    gpu_context_bytes: int = 0  # the CUDA context as measured (outside the device budget), 0 without CUDA
    kv: KVSplit | None = None  # the KV cache's tiers
    attention: str = "exact"  # exact | magicpig | select
    experts: ExpertPlan | None = None  # a MoE model's routed experts: resident, or a RAM cache over the disk
    draft: object | None = None  # spec.setup.DraftPlan: the draft's residency and the speculation budget
    notice: str | None = None  # one line for stderr: a --draft the plan runs without (predicted slower)
    spec_off: str | None = None  # --plan's line for that: speculation off, with both predictions
    bandwidths_note: str | None = None  # --plan: where the bandwidths came from (nothing measured)
    sequences: int = 1  # KV caches the plan holds (a server's --parallel): ``kv`` is one sequence's split
    prefix_bytes: int = 0  # RAM for the server's prefix cache (planned beside the sequences' KV)

    @property
    def predicted_tok_s(self) -> float:
        """The plan's decode speed, a MoE model's routed experts (compute and expected misses) included."""
        s = self.placement.predicted_s_per_token
        if self.experts is not None:
            s += self.experts.compute_s_per_token + self.experts.disk_s_per_token
        return 1.0 / s if s > 0 else float("inf")

    def kv_cache(self, cfg: RunConfig, args, dtype: torch.dtype, tracer=None):
        """The run's KV cache where the plan put it: dense on the GPU, or chunked in RAM and on disk."""
        from offload_rt.kv.dense import DenseKV
        from offload_rt.kv.tiered import TieredKV

        split = self.kv
        kv_dtype, quant = kv_dtypes(cfg, args, dtype)
        if self.placement.kv_tier == "device":  # float KV only: the plan keeps quantized KV off the GPU
            return DenseKV(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, kv_dtype, split.tokens,
                           device=self.device)
        return TieredKV(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, kv_dtype, split.tokens,
                        host_chunks=split.host_chunks, staging_chunks=split.staging_chunks,
                        disk_root=kv_dir(cfg) if split.spills else None, chunk_tokens=split.shape.chunk_tokens,
                        attention=self.attention, lsh_k=cfg.lsh_k, lsh_l=cfg.lsh_l,
                        magicpig_from=AUTO_MAGICPIG_TOKENS if cfg.attention == "auto" else 0,
                        select_share=cfg.kv_select_share, tracer=tracer, quant=quant,
                        float_chunks=split.shape.float_chunks)

    def factory(self, cfg: RunConfig, tracer=None, accel=None):
        """A builder of the run's weight source; ``accel`` (default: from the device) carries out the copies."""
        placement = self.placement
        accel = accel or make_accel(self.device)
        split = accel.split and placement.cuda

        def build(store, args, dtype: torch.dtype, groups: list[Group]):
            from offload_rt.scheduler import StreamingWeights

            tiers = Tiers(host_budget=self.budgets.host, device_budget=self.budgets.device, cuda=split)
            tiers.get(placement.kv_tier).reserve("kv", placement.kv_bytes)
            tiers.get("device" if split else "host").reserve("activations", placement.activation_bytes)
            return StreamingWeights(store, groups, placement.tiers, dtype, embed_name=models.of(args).EMBED,
                                    embed_tier=embed_tier(placement, args), tiers=tiers,
                                    accel=accel if split else HostAccel(), kv_tier=placement.kv_tier,
                                    depth=placement.prefetch_depth, tracer=tracer,
                                    experts=self.expert_sets(cfg, store, args, dtype))

        return build


    def expert_sets(self, cfg: RunConfig, store, args, dtype: torch.dtype):
        """The factory of the MoE layers' expert sets (StreamingWeights' ``experts``), per the expert plan:
        every expert resident, or an expert cache (offload_rt.expert_stream) over the store."""
        ep = self.experts
        if ep is None:
            return None

        def build(source, groups) -> dict:
            from offload_rt.experts import ResidentExperts

            if ep.resident:
                source.tiers.host.reserve("experts", ep.host_bytes)
                return {g.name: ResidentExperts.load(store, g.experts, dtype) for g in groups}
            from offload_rt.expert_stream import ExpertStream

            source.tiers.host.reserve("experts.routers", ep.spec.router_bytes)
            routers = [store.load(args.router_tensor(g.index)).to(dtype) for g in groups]
            stream = ExpertStream(store, [g.experts for g in groups], ep.slots_per_layer, dtype,
                                  executor=source._pool, tiers=source.tiers, counters=source.counters,
                                  tracer=source.tracer, routers=routers, active=ep.spec.active)
            source.expert_stream = stream
            return {g.name: stream.layer(i) for i, g in enumerate(groups)}

        return build


def gpu_budget(cfg: RunConfig, dtype: torch.dtype, used_before: int | None) -> tuple[int, int]:
    """(device budget for the plan, measured CUDA context bytes): ``--gpu-mem`` is the footprint
    ``nvidia-smi`` shows, so the context (and the kernels a run loads into it) comes off first."""
    name = str(dtype).replace("torch.", "")
    ctx = gpu_mod.measure_gpu_context("cuda", used_before=used_before,
                                          warm=lambda d: calibrate.warm_gpu_kernels(name, d))
    free, total = gpu_mod.gpu_free_total()
    return gpu_mod.device_budget(cfg.gpu_mem, context_bytes=ctx, free=free, total=total), ctx


def plan_bandwidths(cfg: RunConfig, cuda: bool) -> tuple[Bandwidths, str]:
    """``--plan``'s figures without measuring anything: the override, the preset's hints, this machine's
    cached calibration, or :data:`PLAN_DEFAULT_BANDWIDTHS`; and a line saying which."""
    hints = cfg.bandwidth_hints or {}
    if {"disk_read", "matvec"} <= set(hints) and (hints.get("h2d") or not cuda):
        return bandwidths_from_hints(hints), "bandwidth source: the preset's hints"
    env = calibrate.bandwidths_from_env()
    if env is not None:
        return env, f"bandwidth source: {calibrate.ENV_OVERRIDE}"
    bw = calibrate.cached(cfg.store_dir, cuda=cuda)
    if bw is not None and (bw.h2d or not cuda):
        return bw, "bandwidth source: measured on this machine (cached)"
    bw = PLAN_DEFAULT_BANDWIDTHS if cuda else replace(PLAN_DEFAULT_BANDWIDTHS, h2d=None)
    return bw, ("bandwidth source: defaults (a CPU streaming from NVMe), not measured on this machine yet; "
                "the first run measures them")


def bandwidths_from_hints(hints: dict) -> Bandwidths:
    return Bandwidths(disk_read=hints["disk_read"], mem_read=hints.get("mem_read", hints["matvec"]),
                      matvec=hints["matvec"], h2d=hints.get("h2d"))


def prepare(cfg: RunConfig, store, args, dtype: torch.dtype, groups: list[Group], device: str, *,
            gpu_used_before: int | None = None, draft=None, plan_only: bool = False,
            sequences: int | None = 1, prefix_cache: bool = False) -> Prepared:
    """Budgets, bandwidths, plan. ``gpu_used_before``: the GPU's used bytes read before this process
    created its CUDA context (how the context is measured); CUDA runs only. ``draft``: the speculation
    draft (spec.setup.open_draft), placed resident before the target gets what is left; dropped (with
    ``Prepared.notice`` saying so) when speculation is predicted slower than without it, unless
    ``--spec-budget`` asks for it. ``plan_only``: nothing is measured or written (:func:`plan_bandwidths`);
    ``store`` may be a WeightStore or a storage.convert.SourceView. ``sequences``: KV caches to hold (a
    server's ``--parallel``; None: the most of :data:`PARALLEL_CHOICES` whose KV takes at most
    :data:`PARALLEL_KV_SHARE` of the host budget and that plans). ``prefix_cache``: the server's cache of
    prompt prefixes gets RAM for one more sequence's KV (``Prepared.prefix_bytes``), planned with the rest."""
    cuda = device == "cuda"
    host = budgets_mod.resolve_budget(cfg.cpu_mem, kind="cpu")
    hints = cfg.bandwidth_hints or {}
    bw_note = None
    given = ({"disk_read", "matvec"} <= set(hints) and (hints.get("h2d") or not cuda)) or \
        calibrate.bandwidths_from_env() is not None
    quant_rates = "off" if given else "cached" if plan_only else "measure"  # spec.pass_cost
    if plan_only:
        bw, bw_note = plan_bandwidths(cfg, cuda)
    elif {"disk_read", "matvec"} <= set(hints) and (hints.get("h2d") or not cuda):
        bw = bandwidths_from_hints(hints)
    else:
        bw = calibrate.load_or_measure(cfg.store_dir, progress=cfg.progress, cuda=cuda)
    bw = bw.for_dtype(str(dtype).replace("torch.", ""))
    dev, ctx = gpu_budget(cfg, dtype, gpu_used_before) if cuda else (None, 0)  # after calibration: its kernels count
    specs = group_specs(store, groups, dtype, args)
    espec = expert_spec(store, args, dtype)
    emin = espec.min_bytes if espec is not None else 0  # the experts' share of --cpu-mem, at least

    def place(tree: int, with_draft: bool = True):
        """The target's plan beside a draft for a tree of ``tree`` nodes (0 or not ``with_draft``: alone)."""
        from offload_rt.spec import setup as spec

        drafted = draft is not None and with_draft
        extra = spec.tree_headroom(tree) if drafted else 0
        bud, held, short = Budgets(device=dev, host=host), None, False
        if drafted:
            held = spec.draft_bytes(draft, cfg, context_tokens(args, cfg.ctx_size), tree, device)
            left = (dev if cuda else host) - sum(held)
            # Not even the draft fits: plan the target in nothing (1 byte keeps a device tier a device tier),
            # so that its refusal carries the target's minimum, and the message the smallest value that runs.
            short = left <= 0
            left = max(left, 1 if cuda else 0)
            bud = Budgets(device=left, host=host) if cuda else Budgets(device=dev, host=left)
        if emin:  # the routed experts' minimum (one slot per MoE layer, the routers) comes off the host first
            bud = Budgets(device=bud.device, host=bud.host - emin)
        # At least two slots in flight: with one, the reader idles while each streamed layer computes
        # (measured: ~85% disk utilisation on D1 with one slot); one more buffer costs less than that.
        kv, attention = plan_kv(cfg, args, dtype, extra_tokens=extra, sequences=n_seq)
        scratch = activation_bytes(args, max(cfg.prefill_chunk, extra, n_seq),
                                   dequant_scratch_bytes(store, cuda) + moe_scratch_bytes(args))
        try:
            placement = plan(specs, bud, bw, kv_bytes=(n_seq + prefix_cache) * kv.host_bytes,
                             prefetch_depth=cfg.prefetch_depth,
                             # quantized KV (--kv-dtype q8/q4) lives in RAM/disk, where its kernels run
                             kv_device_ok=cfg.kv_cpu_mem is None and attention == "exact" and not kv.shape.quant_row,
                             activation_bytes=scratch,
                             embed_bytes=untied_embed_bytes(store, args, dtype),
                             depth_bounds=(MIN_STREAM_DEPTH, MAX_PREFETCH_DEPTH))
        except BudgetError as e:
            if short and not cuda:
                need = e.need + emin + sum(held)
                e = BudgetError(f"the draft ({draft.name}) needs {format_size(sum(held))} resident, more than "
                                f"--cpu-mem allows ({format_size(host)}); raise it to at least "
                                f"{cli_size(need, round_up=True)} (the draft for a tree of {tree} beside the "
                                "target's minimum working set), or use a smaller draft or --spec-budget")
                e.tier, e.need = "host", need
                raise e from None
            if emin and getattr(e, "tier", None) == "host":
                need = e.need + emin + (sum(held) if held is not None and not cuda else 0)
                e = BudgetError(f"--cpu-mem {cli_size(host)} is below the minimum working set of {format_size(need)} "
                                f"(the always-needed weights, buffers and KV cache, plus {format_size(emin)} for one "
                                f"expert slot per MoE layer and the routers{' and the draft' if held else ''}); "
                                f"raise it to at least {cli_size(need, round_up=True)}")
                e.tier, e.need = "host", need
                raise e from None
            if held is None or getattr(e, "tier", None) != ("device" if cuda else "host"):
                raise
            e.need += sum(held)  # the budget the user types holds the draft too
            if not cuda:
                need = e.need
                e = BudgetError(f"--cpu-mem {cli_size(host)} is below the minimum working set of "
                                f"{format_size(need)} with the draft ({draft.name}, {format_size(sum(held))} "
                                f"for a tree of {tree}); raise it to at least {cli_size(need, round_up=True)}, "
                                "or use a smaller --spec-budget")
                e.tier, e.need = "host", need
            raise e
        if emin:
            bud = Budgets(device=bud.device, host=bud.host + emin)
        return bud, kv, attention, placement, held

    notice = spec_off = None
    n_seq = sequences or 1
    try:
        draft_plan = None
        if draft is None and sequences is None:  # the server's default: as many sequences as fit comfortably
            for n_seq in PARALLEL_CHOICES:
                try:
                    bud, kv, attention, placement, _ = place(0)
                except BudgetError:
                    if n_seq == 1:
                        raise
                    continue
                if n_seq == 1 or (n_seq + prefix_cache) * kv.host_bytes <= PARALLEL_KV_SHARE * bud.host:
                    break
        elif draft is None:
            bud, kv, attention, placement, _ = place(0)
        else:
            from offload_rt.spec import budget as budget_mod
            from offload_rt.spec import setup as spec

            agreement = spec.agreement(cfg)
            tree = cfg.spec_budget
            if tree is None:  # the planner's choice, costed on a plan with room for the largest tree that fits
                sizes, widest = budget_mod.budgets(), None
                while widest is None:
                    try:
                        widest = place(sizes[-1])[3]
                    except BudgetError:
                        if len(sizes) == 1:
                            raise
                        sizes.pop()
                tree = budget_mod.choose_budget(spec.pass_cost(store, dtype, widest, bw, draft, device,
                                                                quant_rates=quant_rates), agreement,
                                                sizes)
            bud, kv, attention, placement, held = place(tree)
            cost = spec.pass_cost(store, dtype, placement, bw, draft, device, quant_rates=quant_rates)
            per_pass, tok_s = budget_mod.predict(tree, cost, agreement)
            depth = budget_mod.expected_tokens(tree, agreement)[1]
            draft_plan = spec.DraftPlan(draft.name, "device" if cuda else "host", *held, budget=tree,
                                        min_budget=placement.min_working_set + (0 if cuda else sum(held)),
                                        chosen=cfg.spec_budget is None, agreement=agreement,
                                        tokens_per_pass=per_pass, predicted_tok_s=tok_s,
                                        target_pass_s=cost.target_pass_s(tree + 1), draft_s=cost.draft_s(tree, depth),
                                        overlap=cfg.spec_overlap)
            if cfg.spec_budget is None:  # the planner's choice includes not speculating at all
                alone = place(0, with_draft=False)
                without = 1.0 / alone[3].predicted_s_per_token if alone[3].predicted_s_per_token > 0 else float("inf")
                if tok_s < without:  # at equal memory: the draft's bytes go to the target's resident layers
                    notice = (f"--draft {cfg.draft}: speculation is predicted slower here ({tok_s:.3g} tok/s with "
                              f"the draft, {without:.3g} without it); running without it (--spec-budget N forces it)")
                    spec_off = (f"speculation: off (--draft {cfg.draft} predicted {tok_s:.3g} tok/s at budget {tree}, "
                                f"{without:.3g} tok/s without it in the same --cpu-mem: its RAM holds more of the "
                                "target instead)")
                    (bud, kv, attention, placement, _), draft_plan = alone, None
    except BudgetError as e:
        if cuda and getattr(e, "tier", None) == "device":  # say it in what the user types: the footprint
            raise BudgetError(
                f"--gpu-mem leaves {format_size(dev)} for weights beside the CUDA context ({format_size(ctx)}), "
                f"below the minimum working set of {format_size(e.need)}; pass at least "
                f"--gpu-mem {cli_size(gpu_mod.gpu_mem_for(e.need, ctx), round_up=True)} or use --device cpu"
            ) from None
        raise
    eplan = None
    if espec is not None:
        eplan = plan_experts(espec, bud.host - placement.host_used_bytes, disk_read=bw.disk_read, matvec=bw.matvec,
                             max_slots=cfg.expert_slots)
    if cuda:  # the caching allocator may not grow past what the budget implies: an overrun fails loudly
        gpu_mod.cap_allocator(device, gpu_mod.allocator_limit(cfg.gpu_mem, context_bytes=ctx, placement=dev))
    return Prepared(placement, bw, specs, bud, device, gpu_context_bytes=ctx, kv=kv, attention=attention,
                    draft=draft_plan, experts=eplan, notice=notice, spec_off=spec_off, bandwidths_note=bw_note, sequences=n_seq,
                    prefix_bytes=kv.host_bytes if prefix_cache else 0)
