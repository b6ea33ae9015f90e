"""What ``offload-run`` does once its options are parsed: load, plan, answer or chat, report."""

from __future__ import annotations

import math
import sys

import torch

from offload_rt.config import RunConfig, format_size
from offload_rt.errors import UsageError
from offload_rt.session import Session
from offload_rt.stats import emit


def check_prompt(prompt: str | None, interactive: bool, plan_only: bool) -> None:
    """An empty or whitespace-only prompt is refused (a model asked nothing answers noise)."""
    if prompt is not None and not interactive and not plan_only and not prompt.strip():
        raise UsageError("the prompt is empty; pass some text with --prompt, --prompt-file or on stdin")


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


def print_plan(rt, stats: bool) -> None:
    """``--plan``: the placement, the KV split, experts, draft, baseline (and with ``--stats`` one JSON line)."""
    from offload_rt.memory import baseline
    from offload_rt.memory.plan import format_plan

    model, prepared, device = rt.model, rt.prepared, rt.device
    print(f"model: {model.name} ({model.args.model_type}, {model.args.num_hidden_layers} layers, "
          f"{str(model.dtype).replace('torch.', '')}, device {device})")
    print(weight_formats(model.store))
    print(format_plan(prepared.placement, prepared.specs, prepared.bandwidths))
    print(prepared.bandwidths_note)
    kv = prepared.kv.describe()
    if prepared.sequences > 1:  # a server's: the split is each sequence's
        kv = kv.replace("kv cache:", f"kv cache, each of {prepared.sequences} sequences:", 1)
    print(kv + f"; attention {prepared.attention}")
    if prepared.experts is not None:
        print(prepared.experts.describe())
        print(f"predicted decode with the routed experts: {prepared.predicted_tok_s:.2f} tok/s")
    if prepared.draft is not None:
        print(prepared.draft.describe())
    elif prepared.spec_off:
        print(prepared.spec_off)
    print(baseline.describe(rt.base, prepared.budgets.host))
    if device == "cuda":
        print(f"GPU: CUDA context {format_size(prepared.gpu_context_bytes)} (measured), device budget "
              f"{format_size(prepared.budgets.device)} for weights, slots, KV and activations")
    if stats:
        emit({"model": model.name, "device": device, "threads": rt.threads, **baseline.stats_fields(rt.base),
              "host_budget_bytes": prepared.budgets.host, "placement": dict(prepared.placement.tier_bytes),
              "predicted_tok_s": round(prepared.predicted_tok_s, 4),
              "moe": None if prepared.experts is None else moe_plan_stats(prepared.experts),
              "spec": None if prepared.draft is None else {
                  "budget": prepared.draft.budget, "draft_bytes": prepared.draft.bytes,
                  "predicted_tokens_per_pass": round(prepared.draft.tokens_per_pass, 4)}})


def main(cfg: RunConfig, *, prompt: str | None, interactive: bool, stats: bool, plan_only: bool = False) -> int:
    from offload_rt.build import build
    from offload_rt.memory import baseline
    from offload_rt.threads import wait_policy

    check_prompt(prompt, interactive, plan_only)
    with torch.inference_mode():
        rt = build(cfg, plan_only=plan_only)
        cfg, model, prepared, device, n = rt.cfg, rt.model, rt.prepared, rt.device, rt.threads
        if plan_only:
            print_plan(rt, stats)
            return 0
        source, engine, speculator, tracer, base = rt.source, rt.engine, rt.speculator, rt.tracer, rt.base
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
            rt.close()
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
            rec["startup_peak_rss_bytes"] = rt.startup_peak  # imports and conversion, before the baseline
            rec["peak_rss_bytes"] = max(rec["peak_rss_bytes"], rt.startup_peak)
            rec.update(predicted_tok_s=round(prepared.predicted_tok_s, 4), bound=p.bound,
                       stream_bytes_per_token=p.stream_bytes_per_token, prefetch_depth=p.prefetch_depth)
            if prepared.experts is not None:
                stream = getattr(source, "expert_stream", None)
                rec["moe"] = {**moe_plan_stats(prepared.experts), **(stream.stats() if stream is not None else {
                    "hit_rate": 1.0, "expert_disk_read_bytes": 0,
                    "cached_experts": prepared.experts.spec.layers * prepared.experts.spec.experts})}
            emit(rec)
    return code
