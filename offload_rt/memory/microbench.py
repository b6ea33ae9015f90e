"""Micro-benchmarks: memory read, a batched linear's FLOP/s, a GPU mat-vec, host→device copies; the clocks
they time with, and the check that the machine was quiet while they ran.

Each figure is the best of several reps (the fastest rep is the one the least disturbed). Whether
other work shared the machine meanwhile is :func:`others_cpu` between two :func:`load_sample` s:
the CPU time the whole machine spent busy (``/proc/stat``) less this process's own, per second.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

MiB = 1 << 20
MEM_TEST_BYTES = 256 * MiB
H2D_TEST_BYTES = 256 * MiB
# GPU: one matrix this large per dtype (a row of 8192 inputs), well past any GPU's L2 (50 MB on an H100),
# long enough per mat-vec (≥ 30 µs at 5 TB/s) that the next launch is queued before it ends.
GPU_MATVEC_BYTES = 256 * MiB
GPU_MATVEC_COLS = 8192
GPU_MATVEC_REPS = 20  # mat-vecs queued per timed run
# Quiet: other processes kept less than this many CPUs busy on average while we measured
# (a tenth of the machine, at least a fifth of one CPU).
QUIET_SHARE = 0.10
QUIET_MIN_CPUS = 0.2


# ---------------------------------------------------------------------------- clocks


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes (never 0)."""
    t0 = time.perf_counter()
    fn()
    return max(time.perf_counter() - t0, 1e-9)


def timed_cuda(fn: Callable[[], object], device) -> float:
    """Seconds from an idle device to the end of the device work ``fn`` queues."""
    import torch

    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return max(time.perf_counter() - t0, 1e-9)


# ---------------------------------------------------------------------------- was the machine quiet?


@dataclass(frozen=True)
class LoadSample:
    """CPU time counters at one moment (seconds)."""

    wall: float  # time.monotonic()
    machine_busy: float  # CPU-seconds every CPU of the machine spent not idle since boot
    own: float  # CPU-seconds of this process (all its threads)


def load_sample(stat_path: str = "/proc/stat") -> LoadSample | None:
    """The counters now; None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        with open(stat_path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    try:
        ticks = [int(x) for x in fields[1:]]
    except ValueError:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    busy = sum(ticks[:3]) + sum(ticks[5:8])
    t = os.times()
    return LoadSample(time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system)


def others_cpu(before: LoadSample | None, after: LoadSample | None) -> float | None:
    """CPUs other processes kept busy on average between two samples; None when unknown."""
    if before is None or after is None or after.wall <= before.wall:
        return None
    others = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return max(0.0, others) / (after.wall - before.wall)


def is_quiet(others: float | None, cpus: int | None = None) -> bool:
    """Whether others' CPU use leaves the machine's figures undisturbed; unknown counts as quiet."""
    if others is None:
        return True
    return others <= max(QUIET_MIN_CPUS, QUIET_SHARE * (cpus or os.cpu_count() or 1))


# ---------------------------------------------------------------------------- the benchmarks


def measure_mem_read(nbytes: int = MEM_TEST_BYTES, reps: int = 5) -> float:
    """RAM read bandwidth (bytes/s): torch sum over ``nbytes`` of float32, best of ``reps``."""
    import torch

    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    x.sum()  # warm: pages touched, threads up
    best = min(timed(lambda: x.sum()) for _ in range(reps))
    return x.numel() * 4 / best


def measure_matmul_flops(dtype: str = "float32", device: str = "cpu", *, tokens: int = 128, dim: int = 1024,
                         reps: int = 3) -> float:
    """Floating-point operations per second of a batched linear (``tokens`` rows through a ``dim``²
    matrix) at ``dtype`` on ``device``, best of ``reps``: the per-token compute of a pass over many
    tokens (prefill, a speculation tree). ~10 ms; ``calibrate.matmul_flops`` caches it."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    x = torch.randn(tokens, dim, dtype=dt, device=device)
    w = torch.randn(dim, dim, dtype=dt, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run():
        F.linear(x, w)
        sync()

    run()  # warm
    best = min(timed(run) for _ in range(reps))
    return 2.0 * tokens * dim * dim / best


def measure_gpu_matvec(dtype: str, device, *, nbytes: int = GPU_MATVEC_BYTES, reps: int = 5,
                       clock: Callable | None = None) -> float:
    """Weight bytes/s of a one-row mat-vec (``F.linear``, as decode runs it on a GPU) at ``dtype``.
    ``clock(fn, device)``: how a run is timed (default :func:`timed_cuda`)."""
    import torch
    import torch.nn.functional as F

    clock = clock or timed_cuda
    dt = getattr(torch, dtype)
    w = torch.full((max(1, nbytes // (GPU_MATVEC_COLS * dt.itemsize)), GPU_MATVEC_COLS), 0.02, dtype=dt,
                   device=device)
    x = torch.full((1, GPU_MATVEC_COLS), 0.1, dtype=dt, device=device)

    def run():
        for _ in range(GPU_MATVEC_REPS):
            F.linear(x, w)

    with torch.inference_mode():
        run()  # warm: cuBLAS picks its kernel, the module loads
        best = min(clock(run, device) for _ in range(reps))
    return w.numel() * dt.itemsize * GPU_MATVEC_REPS / best


def measure_h2d(nbytes: int = H2D_TEST_BYTES, reps: int = 5, device="cuda") -> float:
    """Host→device copy bandwidth (bytes/s), best of ``reps``, from host memory page-locked in place.

    ``CudaAccel.pin`` registers exactly these pages, as the run pins its own buffers, and ``unpin``
    gives them back: ``pin_memory()`` would round the block up to a power of two and keep it in
    torch's host cache for the life of the process. Where the memory cannot be locked (``ulimit -l``),
    the figure is the pageable copy's, which is what the run will get too.
    """
    import torch

    from offload_rt.accel import CudaAccel
    from storage.store import aligned_buffer

    accel = CudaAccel(device)
    src = aligned_buffer(nbytes)  # page-aligned, so exactly its own pages are locked
    src.fill_(1)
    pinned = accel.pin(src)
    try:
        dst = torch.empty(nbytes, dtype=torch.uint8, device=accel.device)

        def copy():
            dst.copy_(src, non_blocking=True)

        copy()
        return nbytes / min(timed_cuda(copy, accel.device) for _ in range(reps))
    finally:
        if pinned:
            torch.cuda.synchronize(accel.device)  # no copy may still read the pages being unlocked
            accel.unpin(src)


def measure_quant_rows(fmt: str, shapes: list[tuple[int, int]], *, tokens: int = 32, reps: int = 5) -> tuple[float, float]:
    """The fused quantized kernels (``kernels_cpu.matvec.linear`` as decode and tree passes call it: the
    mat-vec for one row, the multi-row kernel for more) over the matrices ``shapes`` ([n, k]
    each, in ``fmt`` blocks): (seconds for one row through all of them, seconds per further row), from
    the best of ``reps`` sweeps at 1 and at ``tokens`` rows. What a resident int4 draft's pass costs in
    its linears (spec.setup.pass_cost): one row is bound by the weight bytes, a batch by the arithmetic."""
    import torch

    from kernels_cpu.matvec import linear
    from storage.formats import FORMATS, QTensor

    f = FORMATS[fmt]
    ws = [QTensor(torch.zeros(f.byte_shape((n, k)), dtype=torch.uint8), f, (n, k)) for n, k in shapes]
    xs = {t: {k: torch.randn(t, k) for _n, k in shapes} for t in (1, tokens)}

    def sweep(t: int):
        for w in ws:
            linear(xs[t][w.shape[1]], w)

    sweep(1)  # warm: compiled, pages touched
    one = min(timed(lambda: sweep(1)) for _ in range(reps))
    many = min(timed(lambda: sweep(tokens)) for _ in range(reps))
    return one, max(many - one, 0.0) / (tokens - 1)
