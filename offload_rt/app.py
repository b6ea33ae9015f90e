"""What ``offload-run`` does once its options are parsed: load, plan, answer or chat, report."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch

from offload_rt.config import RunConfig, format_size
from offload_rt.memory.plan import cli_size
from offload_rt.errors import UsageError
from offload_rt.loader import attach_engine, open_model
from offload_rt.session import Session
from offload_rt.stats import emit, peak_rss_bytes


def notice(message: str) -> None:
    """One line on stderr about a setting the run changed or ignored (never an error: the run goes on)."""
    print(f"offload-run: note: {message}", file=sys.stderr, flush=True)


def pick_device(cfg: RunConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if cfg.device == "auto":  # --gpu-mem 0 asks for no GPU
        device = "cuda" if torch.cuda.is_available() and cfg.gpu_mem != 0 else "cpu"
    else:
        device = cfg.device
    if device == "cpu" and cfg.gpu_mem not in (None, 0):
        why = "--device cpu" if cfg.device == "cpu" else "no CUDA device is available here"
        notice(f"--gpu-mem {_size_text(cfg.gpu_mem)} is ignored: {why}; running on the CPU")
    return device


def _size_text(value) -> str:
    return value if isinstance(value, str) else cli_size(value)


def check_prompt(prompt: str | None, interactive: bool, plan_only: bool) -> None:
    """An empty or whitespace-only prompt is refused (a model asked nothing answers noise)."""
    if prompt is not None and not interactive and not plan_only and not prompt.strip():
        raise UsageError("the prompt is empty; pass some text with --prompt, --prompt-file or on stdin")


def clamp_limits(cfg: RunConfig) -> RunConfig:
    """Settings no machine here can honour, brought within what it has, each with one notice line.

    ``--cpu-mem`` above this machine's RAM (or its cgroup limit) becomes ``auto`` (the free memory less a
    margin): a budget is a ceiling, and as with llama.cpp's or ollama's offload counts, asking for more
    than exists means "as much as there is", not an error; the plan then promises a peak the machine can
    hold. ``--threads`` above the CPUs this process may run on (affinity, cgroup quota) becomes that
    count: more threads than CPUs only wait for each other (llama.cpp accepts any -t and runs slower).
    """
    from offload_rt.memory.budgets import host_memory_limit
    from offload_rt.threads import usable_cpus

    if isinstance(cfg.cpu_mem, int) and cfg.cpu_mem > (limit := host_memory_limit()):
        notice(f"--cpu-mem {format_size(cfg.cpu_mem)} is more than this machine has ({format_size(limit)} of RAM for "
               "this process); using --cpu-mem auto (the free memory less a margin)")
        cfg = replace(cfg, cpu_mem="auto")
    if cfg.threads and cfg.threads > (cpus := usable_cpus()):
        notice(f"--threads {cfg.threads} is more than the {cpus} CPUs this process may use; using {cpus}")
        cfg = replace(cfg, threads=cpus)
    return cfg


def weight_formats(store) -> str:
    """One --plan line: the stored formats, with bytes and bits per weight (quantized bytes are what move)."""
    by: dict[str, list[int]] = {}
    for name in store.tensor_names:
        info, layout = store.info(name), store.expert_layout(name)
        parts = ([(p.fmt.name, layout.count, p.nbytes * layout.count, layout.count * math.prod(p.shape))
                  for p in layout.parts.values()] if layout is not None else [(info.fmt.name, 1, info.nbytes, info.numel)])
        for fmt, count, nbytes, numel in parts:  # a MoE layer's packed experts: each part by its own format
            n = by.setdefault(fmt, [0, 0, 0])
            n[0] += count
            n[1] += nbytes
            n[2] += numel
    parts = [f"{f} {c} tensors {format_size(b)} ({8 * b / max(w, 1):.2f} bits/weight)"
             for f, (c, b, w) in sorted(by.items(), key=lambda kv: -kv[1][1])]
    return f"stored weights ({store.manifest.get('weights', 'auto')}): " + ", ".join(parts)


def moe_plan_stats(ep) -> dict:
    """The expert plan's figures for ``--stats`` ``"moe"`` (a run adds the measured ones)."""
    s = ep.spec
    return {"experts_per_layer": s.experts, "active_per_token": s.active, "moe_layers": s.layers,
            "expert_bytes": s.unit_bytes, "resident": ep.resident, "slots_per_layer": ep.slots_per_layer,
            "expert_cache_bytes": ep.host_bytes, "predicted_hit_rate": round(ep.hit_rate, 4),
            "predicted_expert_disk_bytes_per_token": ep.disk_bytes_per_token}


def main(cfg: RunConfig, *, prompt: str | None, interactive: bool, stats: bool, plan_only: bool = False) -> int:
    from offload_rt import runtime
    from offload_rt.memory.plan import format_plan

    from kernels_cpu import attention as attention_kernels
    from kernels_cpu import rowops
    from kernels_cpu.matvec import set_threads, warm_up
    from offload_rt.memory import baseline
    from offload_rt.threads import available_cores, wait_policy

    check_prompt(prompt, interactive, plan_only)
    cfg = clamp_limits(cfg)
    n = cfg.threads or available_cores()
    set_threads(n)  # first: starting Numba's OpenMP pool resets torch's thread count (same libgomp)
    torch.set_num_threads(n)
    device = pick_device(cfg)
    with torch.inference_mode():
        model = open_model(cfg, plan_only=plan_only)  # --plan converts nothing: a new checkpoint is planned
        draft = None  # from its headers (storage.convert.SourceView)
        if cfg.draft is not None:
            from offload_rt.spec.setup import open_draft

            draft = open_draft(cfg, model, device, plan_only=plan_only)  # (converted before the baseline)
        warm_up()
        if runtime.has_quantized(model.store) or (draft is not None and runtime.has_quantized(draft.store)):
            from kernels_cpu import quant

            quant.warm_up()
        if runtime.has_experts(model.args):
            from kernels_cpu import moe

            moe.warm_up()  # the routed experts' kernels
        attention_kernels.warm_up()  # compiled (or loaded from Numba's cache) before the baseline is measured
        rowops.warm_up()  # the fused single-row kernels of decode (calibration times layers with them)
        if runtime.may_use_magicpig(cfg, model.args):
            from kernels_cpu import magicpig

            magicpig.warm_up()
        gpu_used_before = None
        if device == "cuda":
            from offload_rt.memory.gpu import gpu_used_bytes

            gpu_used_before = gpu_used_bytes("cuda")  # before our context exists: how it is measured
            torch.zeros(1, device="cuda")  # the CUDA context is part of the process's (host) cost
        # What the process costs before it places anything: measured here, once imports, the tokenizer and
        # the kernels are in, and before `auto` budgets read the free memory (so they leave it out).
        startup_peak = peak_rss_bytes()
        base = baseline.measure()
        prepared = runtime.prepare(cfg, model.store, model.args, model.dtype, model.groups, device,
                                   gpu_used_before=gpu_used_before, draft=draft, plan_only=plan_only)
        if prepared.notice:
            notice(prepared.notice)
        startup_peak = max(startup_peak, peak_rss_bytes())  # a first run on this machine calibrates in prepare
        baseline.reset_peak_rss()  # from here on, VmHWM is the run's own peak
        if plan_only:
            print(f"model: {model.name} ({model.args.model_type}, {model.args.num_hidden_layers} layers, "
                  f"{str(model.dtype).replace('torch.', '')}, device {device})")
            print(weight_formats(model.store))
            print(format_plan(prepared.placement, prepared.specs, prepared.bandwidths))
            print(prepared.bandwidths_note)
            print(prepared.kv.describe() + f"; attention {prepared.attention}")
            if prepared.experts is not None:
                print(prepared.experts.describe())
                print(f"predicted decode with the routed experts: {prepared.predicted_tok_s:.2f} tok/s")
            if prepared.draft is not None:
                print(prepared.draft.describe())
            print(baseline.describe(base, prepared.budgets.host))
            if device == "cuda":
                from offload_rt.config import format_size

                print(f"GPU: CUDA context {format_size(prepared.gpu_context_bytes)} (measured), device budget "
                      f"{format_size(prepared.budgets.device)} for weights, slots, KV and activations")
            if stats:
                emit({"model": model.name, "device": device, "threads": n, **baseline.stats_fields(base),
                      "host_budget_bytes": prepared.budgets.host, "placement": dict(prepared.placement.tier_bytes),
                      "predicted_tok_s": round(prepared.predicted_tok_s, 4),
                      "moe": None if prepared.experts is None else moe_plan_stats(prepared.experts),
                      "spec": None if prepared.draft is None else {
                          "budget": prepared.draft.budget, "draft_bytes": prepared.draft.bytes,
                          "predicted_tokens_per_pass": round(prepared.draft.tokens_per_pass, 4)}})
            return 0
        tracer = None
        if cfg.profile is not None:
            from offload_rt.trace import Tracer

            from offload_rt.trace import current_stream_sync

            # on CUDA spans wait for their stream's work, so they time the GPU, not the enqueue
            tracer = Tracer(synchronize=current_stream_sync(device) if device == "cuda" else None)
        source = prepared.factory(cfg, tracer)(model.store, model.args, model.dtype, model.groups)
        # The first passes fault in library code with read-ahead (8 MiB windows on some disks): ~0.3 GB of
        # page cache charged to a cgroup. Dropped once they have run; what is mapped stays.
        engine = attach_engine(model, cfg, source, tracer=tracer, device=device,
                               on_warm=baseline.drop_library_page_cache,
                               cache=prepared.kv_cache(cfg, model.args, model.dtype, tracer))
        speculator = None
        if prepared.draft is not None:
            from offload_rt.runtime import context_tokens
            from offload_rt.spec.setup import build_speculator

            speculator = build_speculator(draft, prepared.draft, vocab=model.args.vocab_size,
                                          ctx_tokens=context_tokens(model.args, cfg.ctx_size), device=device,
                                          tracer=tracer, threads=n)
        torch.set_num_threads(1)  # while serving: prefill takes its threads (engine), decode its tuner's
        p = prepared.placement
        session = Session(model, cfg, device=device, counters=source.counters, placement=dict(p.tier_bytes),
                          gpu_context_bytes=prepared.gpu_context_bytes, speculator=speculator)
        try:
            if interactive:
                from offload_rt.repl import ChatREPL

                code = ChatREPL(session).run()
            else:
                for piece in session.answer(prompt):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                sys.stdout.flush()
                code = 0
        finally:
            engine.close()
            if speculator is not None:
                speculator.draft.close()
        res = session.last
        if not cfg.bandwidth_hints and speculator is None and res.new_tokens > 1 and not interactive:
            from offload_rt.memory import calibrate

            # a calibration taken on a busy machine is re-measured when a run contradicts it by more than 2x
            note = calibrate.check_run_speed(cfg.store_dir, prepared.predicted_tok_s, res.decode_tok_s,
                                             cuda=device == "cuda", tokens=res.new_tokens - 1)
            if note:
                print(f"offload-run: note: {note}", file=sys.stderr)
        if tracer is not None:
            tracer.meta.update({
                "model": model.name, "device": device, "placement": dict(p.tier_bytes), "tiers": dict(p.tiers),
                "peaks": {"disk": prepared.bandwidths.disk_read, "h2d": prepared.bandwidths.h2d,
                          "mem": prepared.bandwidths.mem_read, "matvec": prepared.bandwidths.matvec},
                "budgets": {"host": prepared.budgets.host, "device": prepared.budgets.device},
                "predicted_tok_s": prepared.predicted_tok_s, "prefetch_depth": p.prefetch_depth,
            })
            tracer.write(cfg.profile)
        if stats:
            rec = session.stats()
            draft_host = prepared.draft.bytes if prepared.draft is not None and device == "cpu" else 0
            rec.update(baseline.stats_fields(base), host_budget_bytes=prepared.budgets.host + draft_host,
                       host_reserved_peak_bytes=source.tiers.host.peak, run_peak_rss_bytes=rec["peak_rss_bytes"],
                       threads=n, omp_wait=wait_policy(), pinned_host_bytes=source.pinned_host_bytes,
                       gpu_budget_bytes=prepared.budgets.device)
            tuner = engine.thread_tuner
            if tuner is not None:
                rec["decode_threads"] = tuner.current
                rec["decode_step_s_by_threads"] = {str(n): round(t, 6) for n, t in sorted(tuner.estimate.items())}
            rec["startup_peak_rss_bytes"] = startup_peak  # imports and conversion, before the baseline
            rec["peak_rss_bytes"] = max(rec["peak_rss_bytes"], startup_peak)
            rec.update(predicted_tok_s=round(prepared.predicted_tok_s, 4), bound=p.bound,
                       stream_bytes_per_token=p.stream_bytes_per_token, prefetch_depth=p.prefetch_depth)
            if prepared.experts is not None:
                stream = getattr(source, "expert_stream", None)
                rec["moe"] = {**moe_plan_stats(prepared.experts), **(stream.stats() if stream is not None else {
                    "hit_rate": 1.0, "expert_disk_read_bytes": 0,
                    "cached_experts": prepared.experts.spec.layers * prepared.experts.spec.experts})}
            emit(rec)
    return code
