"""One way to build a running model: :func:`build` does the set-up once, in order, for every front end.

open (convert once) → draft → kernels compiled → the process's baseline measured → budgets, calibration,
plan (:func:`offload_rt.runtime.prepare`) → weight source (resident or streamed) → KV cache → engine →
speculator. The one-shot CLI and the REPL (:mod:`offload_rt.app`) and the server
(:mod:`offload_rt.serve`) all call it; what they print or serve is theirs. Sampling, stop strings and
length are not part of it: they are per answer (:meth:`offload_rt.session.Session.answer`, a server
request).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from offload_rt.config import RunConfig, format_size
from offload_rt.errors import UsageError
from offload_rt.memory.plan import cli_size


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


@dataclass
class Runtime:
    """A model set up to run: what :func:`build` made, for the front ends to use and report."""

    cfg: RunConfig
    model: object  # loader.LoadedModel (its engine attached unless plan_only)
    device: str
    threads: int
    prepared: object  # runtime.Prepared: budgets, bandwidths, plan, KV split, experts, draft plan
    base: object  # memory.baseline: the process's own cost, measured before anything was placed
    startup_peak: int  # peak RSS of imports and conversion (a first run's calibration included)
    draft: object | None = None  # spec.setup's opened draft (--draft), or None
    source: object | None = None  # the weight source (scheduler.StreamingWeights); None with plan_only
    engine: object | None = None  # engine.Engine over the source and the run's KV cache
    speculator: object | None = None  # spec.speculate.Speculator when the plan keeps the draft
    tracer: object | None = None  # trace.Tracer with --profile

    def new_cache(self):
        """Another KV cache like the run's (one per sequence the server decodes together)."""
        return self.prepared.kv_cache(self.cfg, self.model.args, self.model.dtype, self.tracer)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.speculator is not None:
            self.speculator.draft.close()


def build(cfg: RunConfig, *, plan_only: bool = False, serving: bool = False) -> Runtime:
    """Set the model up to run under ``cfg``: everything up to the first forward pass.

    ``plan_only`` (``--plan``): convert nothing, measure nothing, build no source. The engine gets the
    run's KV cache (a server gives each further sequence its own: :meth:`Runtime.new_cache`). ``serving``:
    plan ``cfg.parallel`` sequences' KV (None: as many as fit, runtime.prepare) and a prefix cache.
    Call inside ``torch.inference_mode()``.
    """
    from kernels_cpu import attention as attention_kernels
    from kernels_cpu import rowops
    from kernels_cpu.matvec import set_threads, warm_up
    from offload_rt import runtime
    from offload_rt.loader import attach_engine, open_model
    from offload_rt.memory import baseline
    from offload_rt.stats import peak_rss_bytes
    from offload_rt.threads import available_cores

    cfg = clamp_limits(cfg)
    n = cfg.threads or available_cores()
    set_threads(n)  # first: starting Numba's OpenMP pool resets torch's thread count (same libgomp)
    torch.set_num_threads(n)
    device = pick_device(cfg)
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
    if cfg.kv_dtype in ("q8", "q4"):
        from kernels_cpu import attention_q

        runtime.kv_dtypes(cfg, model.args, model.dtype)  # a head dim it cannot quantize: the one-line error now
        attention_q.warm_up()
    if runtime.may_use_magicpig(cfg, model.args):
        from kernels_cpu import magicpig

        magicpig.warm_up(records=cfg.kv_dtype in ("q8", "q4"))
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
                               gpu_used_before=gpu_used_before, draft=draft, plan_only=plan_only,
                               sequences=cfg.parallel if serving else 1, prefix_cache=serving)
    if prepared.notice:
        notice(prepared.notice)
    startup_peak = max(startup_peak, peak_rss_bytes())  # a first run on this machine calibrates in prepare
    baseline.reset_peak_rss()  # from here on, VmHWM is the run's own peak
    rt = Runtime(cfg, model, device, n, prepared, base, startup_peak, draft=draft)
    if plan_only:
        return rt
    if cfg.profile is not None:
        from offload_rt.trace import Tracer, current_stream_sync

        # on CUDA spans wait for their stream's work, so they time the GPU, not the enqueue
        rt.tracer = Tracer(synchronize=current_stream_sync(device) if device == "cuda" else None)
    rt.source = prepared.factory(cfg, rt.tracer)(model.store, model.args, model.dtype, model.groups)
    # The first passes fault in library code with read-ahead (8 MiB windows on some disks): ~0.3 GB of
    # page cache charged to a cgroup. Dropped once they have run; what is mapped stays.
    rt.engine = attach_engine(model, cfg, rt.source, tracer=rt.tracer, device=device,
                              on_warm=baseline.drop_library_page_cache,
                              cache=rt.new_cache())
    if prepared.draft is not None:
        from offload_rt.runtime import context_tokens
        from offload_rt.spec.setup import build_speculator

        rt.speculator = build_speculator(draft, prepared.draft, vocab=model.args.vocab_size,
                                         ctx_tokens=context_tokens(model.args, cfg.ctx_size), device=device,
                                         tracer=rt.tracer, threads=n)
    torch.set_num_threads(1)  # while serving: prefill takes its threads (engine), decode its tuner's
    return rt
