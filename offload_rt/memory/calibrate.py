"""Measure the bandwidths the planner needs, once per machine and disk; what the runtime calls.

Three modules do the work, this one ties them together (and keeps every name callers used):

* offload_rt.memory.bandwidth_cache: the per-machine cache (``<cache>/bandwidth.json``, keyed by host,
  disk, CPU count, threads and GPU) and the ``OFFLOAD_RT_BANDWIDTHS`` override;
* offload_rt.memory.disk_probe and offload_rt.memory.microbench: the micro-benchmarks (the disk's
  cold reads, sized to its free space; memory read; host→device copies; a GPU mat-vec; FLOP/s) and
  the check that the machine was quiet;
* offload_rt.memory.layer_timing: real decoder layers timed as decode runs them (``layer_s``,
  ``matvec``, ``token_s``; on the GPU for a CUDA run).

Robust figures: each figure is the fastest of several reps; a CPU calibration runs again (up to
CALIBRATION_ROUNDS rounds, ROUND_PAUSE_S apart) while other processes kept the machine busy, each
figure keeping its best round; the entry records whether a round was quiet. A run whose measured
decode speed contradicts the plan's prediction by more than CONTRADICTION_FACTOR
(:func:`check_run_speed`) marks the cached figures stale: the next run measures them again.

With ``cuda=True`` compute runs on the GPU, so the compute figures are the GPU's; afterwards every
tensor is freed, the caching allocator emptied and its peak statistics reset, so the run starts clean.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from offload_rt.memory.bandwidth_cache import (  # noqa: F401  (re-exported: callers use calibrate.<name>)
    CACHE_FILE,
    CACHE_VERSION,
    DEFAULT_MATVEC_DTYPE,
    ENV_OVERRIDE,
    bandwidths_from_env,
    cache_key,
    cache_path,
    cached,
    entry_bandwidths,
    forget,
    gpu_identity,
    now,
    read_entries,
    to_json,
    update_entry,
)
from offload_rt.memory.disk_probe import (  # noqa: F401
    DEFAULT_DISK_READ,
    DISK_TEST_BYTES,
    MIN_DISK_TEST_BYTES,
    PARALLEL_PIECE_BYTES,
    PARALLEL_READERS,
    PROBE_FILES,
    READ_CHUNK_BYTES,
    DiskProbe,
    free_bytes,
    measure_disk_read,
    probe_disk,
    probe_size,
)
from offload_rt.memory.layer_timing import (  # noqa: F401
    CONTEXT_TOKENS,
    GPU_FIXED_SHAPE,
    GPU_FIXED_SWEEP_BYTES,
    HEAD_DIM,
    LAYER_SHAPES,
    SWEEP_BYTES,
    TOKEN_VOCAB,
    WARM_SHAPE,
    faster_layer_cost,
    fit_layer_cost,
    layer_tensors,
    measure_decode_layer,
    measure_layer_costs,
    measure_layer_points,
    measure_token_overhead,
    release_gpu,
    warm_gpu_kernels,
)
from offload_rt.memory import layer_timing as _layers
from offload_rt.memory.microbench import (  # noqa: F401
    GPU_MATVEC_BYTES,
    GPU_MATVEC_COLS,
    GPU_MATVEC_REPS,
    H2D_TEST_BYTES,
    MEM_TEST_BYTES,
    is_quiet,
    load_sample,
    measure_gpu_matvec,
    measure_h2d,
    measure_matmul_flops,
    measure_mem_read,
    others_cpu,
)
from offload_rt.memory.microbench import timed as _timed, timed_cuda as _timed_cuda  # noqa: F401
from offload_rt.memory.plan import Bandwidths

MiB = 1 << 20
MATVEC_DTYPES = ("float32", "bfloat16", "float16")
CALIBRATION_ROUNDS = 3  # CPU compute rounds at most: another while the machine was busy
ROUND_PAUSE_S = 1.0  # between rounds: a burst of other work may end meanwhile
CONTRADICTION_FACTOR = 2.0  # a run this much faster or slower than predicted: the figures are re-measured
MIN_CHECK_TOKENS = 16  # decode tokens a run needs before its speed may contradict the figures
MAX_RECHECKS = 2  # re-measures a contradiction may cause in a row (then the cost model is what is off)


# ---------------------------------------------------------------------------- measuring


def measure_gpu_layer_costs(dtype: str, device, **kw) -> tuple[float, float]:
    """:func:`offload_rt.memory.layer_timing.measure_gpu_layer_costs`, timed with this module's
    ``_timed_cuda`` (which a test replaces to run the GPU code on the CPU)."""
    return _layers.measure_gpu_layer_costs(dtype, device, clock=_timed_cuda, **kw)


class _Bar:
    """Calibration progress: ``step(description)`` advances, ``grow(n)`` adds steps (another round)."""

    def __init__(self, bar=None, task=None):
        self._bar, self._task, self._first = bar, task, True

    def step(self, desc: str) -> None:
        if self._bar is None:
            return
        if not self._first:
            self._bar.advance(self._task)
        self._first = False
        self._bar.update(self._task, description=desc)

    def grow(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=self._bar.tasks[0].total + n)


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[_Bar]:
    """A rich progress bar on stderr (off: a bar that shows nothing)."""
    if not enabled:
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("measuring bandwidths: {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=total)
        yield _Bar(bar, task)
        bar.update(task, completed=bar.tasks[0].total)


def _notify(line: str) -> None:
    print(f"offload-run: note: {line}", file=sys.stderr)


def _compute_round(bar: _Bar, *, cuda: bool, mem_bytes: int, device) -> dict:
    """One round of the compute figures: memory read, each dtype's (mat-vec rate, fixed layer seconds),
    the per-token cost."""
    bar.step("memory read")
    mem = measure_mem_read(mem_bytes)
    layers = {}
    for d in MATVEC_DTYPES:
        bar.step(f"decode layer {d}" + (" (GPU)" if cuda else ""))
        layers[d] = measure_gpu_layer_costs(d, device) if cuda else measure_layer_costs(d)
    bar.step("per token")
    token = measure_token_overhead(DEFAULT_MATVEC_DTYPE, device=device if cuda else "cpu")
    return {"mem": mem, "layers": layers, "token": token}


def best_round(a: dict, b: dict) -> dict:
    """Figure by figure, the better of two rounds (:func:`_compute_round`): the faster memory, each dtype's
    faster layer cost (:func:`faster_layer_cost`), the smaller per-token cost."""
    return {"mem": max(a["mem"], b["mem"]),
            "layers": {d: faster_layer_cost(d, a["layers"][d], b["layers"][d]) for d in a["layers"]},
            "token": min(a["token"], b["token"])}


def measure_bandwidths(
    offload_dir: Path,
    *,
    progress: bool = True,
    cuda: bool = False,
    disk_bytes: int = DISK_TEST_BYTES,
    mem_bytes: int = MEM_TEST_BYTES,
    device="cuda",
    rounds: int | None = None,
    report: dict | None = None,
    notify: Callable[[str], None] | None = None,
) -> Bandwidths:
    """Measure everything the planner needs (several seconds; the disk probe dominates).

    The disk probe is sized to the free space (:func:`probe_disk`); when it is skipped ``notify`` gets
    one line saying so (default: stderr). The compute figures take up to ``rounds`` rounds (default
    CALIBRATION_ROUNDS on the CPU, 1 on a GPU), stopping at the first quiet one (:func:`is_quiet`).
    ``report``, when given, receives how the figures were taken: ``quiet``, ``others_cpu`` (CPUs other
    processes kept busy in the quietest round), ``rounds``, ``disk_probe_bytes`` (0: skipped),
    ``disk_note``. With ``cuda`` the compute figures are the GPU's (``device``), and what the
    measurement put on the GPU is released before returning (:func:`release_gpu`).
    """
    rounds = max(1, rounds or (1 if cuda else CALIBRATION_ROUNDS))
    per_round = 2 + len(MATVEC_DTYPES)
    with _progress(progress and sys.stderr is not None, 2 + per_round + int(cuda)) as bar:
        bar.step("disk read")
        disk = probe_disk(Path(offload_dir), disk_bytes, measure=measure_disk_read)
        if disk.note and disk.skipped:
            (notify or _notify)(disk.note)
        best, quiet, least = None, False, None
        try:
            for r in range(rounds):
                if r:
                    bar.grow(per_round)
                    time.sleep(ROUND_PAUSE_S)
                before = load_sample()
                figs = _compute_round(bar, cuda=cuda, mem_bytes=mem_bytes, device=device)
                others = others_cpu(before, load_sample())
                best = figs if best is None else best_round(best, figs)
                least = others if least is None or (others is not None and others < least) else least
                if is_quiet(others):
                    quiet = True
                    break
            h2d = None
            if cuda:
                release_gpu(device)  # the copy target needs the room the layers held
                bar.step("host→device")
                h2d = measure_h2d(device=device)
        finally:
            if cuda:
                release_gpu(device)
        bar.step("done")
    if report is not None:
        report.update(quiet=quiet, others_cpu=None if least is None else round(least, 3), rounds=r + 1,
                      disk_probe_bytes=disk.probe_bytes, disk_note=disk.note)
    by_dtype = {d: rate for d, (rate, _) in best["layers"].items()}
    layer_by_dtype = {d: fixed for d, (_, fixed) in best["layers"].items()}
    return Bandwidths(
        disk_read=disk.bytes_per_s,
        mem_read=best["mem"],
        matvec=by_dtype[DEFAULT_MATVEC_DTYPE],
        h2d=h2d,
        matvec_by_dtype=by_dtype,
        layer_s=layer_by_dtype[DEFAULT_MATVEC_DTYPE],
        token_s=best["token"],
        layer_s_by_dtype=layer_by_dtype,
    )


# ---------------------------------------------------------------------------- cached figures


def load_or_measure(
    offload_dir: Path,
    *,
    progress: bool = True,
    cuda: bool = False,
    cache_dir: Path | None = None,
    remeasure: bool = False,
    measure: Callable[..., Bandwidths] | None = None,
) -> Bandwidths:
    """Bandwidths for this machine and the disk under ``offload_dir``: env override, cache, or measured.

    Measured again: a cached entry without ``h2d`` when ``cuda`` is asked for, and one a run marked
    stale (:func:`check_run_speed`). An entry whose disk probe was skipped (too little free space)
    probes the disk alone once there is room. ``measure(offload_dir, progress=, cuda=)`` replaces
    :func:`measure_bandwidths` (tests).
    """
    env = bandwidths_from_env()
    if env is not None:
        return env
    path = cache_path(cache_dir)
    key = cache_key(offload_dir, cuda=cuda)
    entry = read_entries(path).get(key)
    bw = entry_bandwidths(entry)
    if not remeasure and bw is not None and (bw.h2d or not cuda) and not entry.get("stale"):
        if entry.get("disk_probe_bytes") == 0:
            bw = _probe_skipped_disk(offload_dir, path, key, entry, bw)
        return bw
    meta: dict = {}
    if measure is None:
        bw = measure_bandwidths(Path(offload_dir), progress=progress, cuda=cuda, report=meta)
    else:
        bw = measure(Path(offload_dir), progress=progress, cuda=cuda)
    fields = {**to_json(bw), **meta, "measured_at": now()}
    if entry is not None and entry.get("stale"):
        fields["rechecks"] = int(entry.get("rechecks") or 0) + 1
    update_entry(path, key, fields)
    return bw


def _probe_skipped_disk(offload_dir: Path, path: Path, key: str, entry: dict, bw: Bandwidths) -> Bandwidths:
    """The disk probe of a cached entry that skipped it, run now when the disk has room (one ``statvfs``
    otherwise); the entry keeps its compute figures."""
    if probe_size(free_bytes(Path(offload_dir))) == 0:
        return bw
    disk = probe_disk(Path(offload_dir), measure=measure_disk_read)
    if disk.skipped:
        return bw
    from dataclasses import replace

    bw = replace(bw, disk_read=disk.bytes_per_s)
    update_entry(path, key, {**entry, "disk_read": disk.bytes_per_s, "disk_probe_bytes": disk.probe_bytes,
                             "disk_note": disk.note})
    return bw


def contradicts(predicted_tok_s: float, measured_tok_s: float, factor: float = CONTRADICTION_FACTOR) -> bool:
    """Whether a measured decode speed is more than ``factor`` times faster or slower than predicted."""
    if not (predicted_tok_s > 0 and measured_tok_s > 0):
        return False
    return max(measured_tok_s / predicted_tok_s, predicted_tok_s / measured_tok_s) > factor


def check_run_speed(offload_dir: Path, predicted_tok_s: float, measured_tok_s: float, *, cuda: bool = False,
                    tokens: int | None = None, cache_dir: Path | None = None) -> str | None:
    """After a run: when its measured decode speed contradicts the plan's prediction from the cached
    figures (:func:`contradicts`), mark those figures stale so that the next run measures them again,
    and return one line saying so; None otherwise (also: figures from ``OFFLOAD_RT_BANDWIDTHS``,
    fewer than MIN_CHECK_TOKENS decode ``tokens``, already stale, or re-measured MAX_RECHECKS times for a
    contradiction already: then the figures are not what is off)."""
    if bandwidths_from_env() is not None or not contradicts(predicted_tok_s, measured_tok_s):
        return None
    if tokens is not None and tokens < MIN_CHECK_TOKENS:
        return None
    path, key = cache_path(cache_dir), cache_key(offload_dir, cuda=cuda)
    entry = read_entries(path).get(key)
    if entry_bandwidths(entry) is None or entry.get("stale") or int(entry.get("rechecks") or 0) >= MAX_RECHECKS:
        return None
    why = f"measured {measured_tok_s:.1f} tok/s where {predicted_tok_s:.1f} was predicted"
    if not update_entry(path, key, {**entry, "stale": why}):
        return None
    busy = "" if entry.get("quiet", True) else " (they were taken while the machine was busy)"
    return (f"{why}: the speeds measured {entry.get('measured_at', 'earlier')}{busy} "
            "will be measured again on the next run")


def matmul_flops(dtype: str, device: str = "cpu", *, cache_dir: Path | None = None) -> float:
    """:func:`measure_matmul_flops` once per machine, thread count, dtype (and GPU), cached beside the
    bandwidths: the speculation budget the planner derives from it must not change from run to run."""
    import torch

    key = f"matmul:{socket.gethostname()}:{os.cpu_count()}:t{torch.get_num_threads()}:{dtype}:" + (
        gpu_identity() if torch.device(device).type == "cuda" else "cpu")
    path = cache_path(cache_dir)
    entry = read_entries(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"])
    flops = measure_matmul_flops(dtype, device, reps=7)
    update_entry(path, key, {"flops": flops, "measured_at": now()})
    return flops


def quant_rows_cost(fmt: str, shapes: list[tuple[int, int]], *, cache_dir: Path | None = None,
                    measure: bool = True) -> tuple[float, float] | None:
    """:func:`~offload_rt.memory.microbench.measure_quant_rows` once per machine, thread count, format and
    set of shapes, cached beside the bandwidths (the speculation budget derived from it must not change
    from run to run). ``measure=False``: the cached figures or None (``--plan`` measures nothing)."""
    import hashlib

    import numba
    import torch

    shapes = sorted(set(shapes))
    sig = hashlib.sha1(repr(shapes).encode()).hexdigest()[:12]
    key = (f"quantrows:{socket.gethostname()}:{os.cpu_count()}:t{torch.get_num_threads()}:"
           f"n{numba.get_num_threads()}:{fmt}:{sig}")
    path = cache_path(cache_dir)
    entry = read_entries(path).get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) for k in ("one_s", "row_s")):
        return float(entry["one_s"]), float(entry["row_s"])
    if not measure:
        return None
    from offload_rt.memory.microbench import measure_quant_rows

    one, row = measure_quant_rows(fmt, shapes)
    update_entry(path, key, {"one_s": one, "row_s": row, "measured_at": now()})
    return one, row
