"""Timing real decoder layers: what decode runs, timed, for the planner's per-layer cost.

* decode layer: a dense decoder layer's ``layer_forward`` (offload_rt.models) on one token (its mat-vecs
  through ``kernels_cpu.matvec.linear``: the Numba kernels for float32 and bfloat16, ``F.linear`` for
  float16, as in decode), inside ``decode_scope``, over enough distinct layers that the weights stream
  from RAM; fastest of several reps. Two layer sizes per dtype give a line
  ``seconds = layer_s + bytes / matvec``: the mat-vec rate and the rest of a layer (norms, RoPE,
  attention over a short context, kernel calls);
* per token: ``Engine.forward`` on a model without layers (a tiny head) plus the greedy sampler over a
  full vocabulary (``token_s``: embedding, RoPE tables, the sweep);
* on a GPU (:func:`measure_gpu_layer_costs`): the mat-vec rate of a matrix far larger than the GPU's L2
  and a small, launch-bound layer's time less its bytes at that rate; :func:`warm_gpu_kernels` loads
  every kernel a decode runs, :func:`release_gpu` gives back what the timing held.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

from offload_rt.memory.microbench import GPU_MATVEC_BYTES, measure_gpu_matvec, timed, timed_cuda

MiB = 1 << 20
# Decoder layers timed per dtype (hidden, intermediate, heads, KV heads; head_dim 64): a small and a large
# Llama layer (SmolLM2-135M's, and a Llama-1B-class one), so the fit spans the models this runs.
LAYER_SHAPES = ((576, 1536, 9, 3), (2048, 5632, 32, 4))
HEAD_DIM = 64
SWEEP_BYTES = 256 * MiB  # distinct weight bytes per timed sweep: more than a CPU cache holds, as in decode
CONTEXT_TOKENS = 32  # tokens already in the KV cache of a timed layer (a short conversation)
TOKEN_VOCAB = 49152  # logits the timed sampler of token_s runs over (the default model's vocabulary)
GPU_FIXED_SHAPE = LAYER_SHAPES[0]  # the small layer: launch-bound on a GPU, its time is the fixed part
GPU_FIXED_SWEEP_BYTES = 64 * MiB
WARM_SHAPE = (256, 512, 4, 1)  # warm_gpu_kernels: the smallest layer with every kernel a decode runs


def layer_tensors(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int = HEAD_DIM) -> dict[str, tuple]:
    """Shapes of one dense decoder layer's tensors, by the names its family's ``layer_forward`` reads."""
    return _layer_args(hidden, inter, heads, kv_heads, 1, head_dim=head_dim).layer_tensors(0)


def _layer_args(hidden: int, inter: int, heads: int, kv_heads: int, layers: int, vocab: int = 1,
                head_dim: int = HEAD_DIM):
    from offload_rt import models

    return models.dense_layer_args(hidden, inter, heads, kv_heads, head_dim, layers, vocab=vocab,
                                   context=CONTEXT_TOKENS + 8)


def _head_tensors(args) -> dict[str, tuple]:
    """The embedding and head tensors of ``args`` (untied: the embedding, final norm and output matrix)."""
    from offload_rt import models

    return {models.of(args).EMBED: (args.vocab_size, args.hidden_size), **args.head_tensors()}


def _weights(shapes: dict[str, tuple], dtype, device="cpu") -> dict:
    """Tensors of these shapes with every page written (values do not change a mat-vec's speed)."""
    import torch

    return {k: torch.empty(shape, dtype=dtype, device=device).fill_(1.0 if len(shape) == 1 else 0.02)
            for k, shape in shapes.items()}


def _layer_sweep(dtype: str, shape: tuple[int, int, int, int], sweep_bytes: int,
                 device="cpu") -> tuple[int, int, Callable]:
    """(weight bytes per layer, layers, sweep): ``sweep()`` runs one decode token through enough distinct
    decoder layers of ``shape`` to pass ``sweep_bytes``, as decode runs them (``layer_forward``, its
    mat-vecs through ``kernels_cpu.matvec.linear``); call it inside inference mode (on the CPU inside
    ``decode_scope``). On a GPU ``sweep()`` returns once its kernels are queued."""
    import torch

    from offload_rt import models
    from offload_rt.kv.dense import DenseKV

    dt = getattr(torch, dtype)
    hidden, inter, heads, kv_heads = shape
    shapes = layer_tensors(hidden, inter, heads, kv_heads)
    per_layer = sum(math.prod(s) for s in shapes.values()) * dt.itemsize
    n = max(2, -(-sweep_bytes // per_layer))
    args = _layer_args(hidden, inter, heads, kv_heads, n)
    fam = models.of(args)
    layers = [_weights(shapes, dt, device) for _ in range(n)]
    cache = DenseKV(n, kv_heads, HEAD_DIM, dt, CONTEXT_TOKENS + 1, device=device)
    kv = torch.full((CONTEXT_TOKENS, kv_heads, HEAD_DIM), 0.1, dtype=dt, device=device)
    for i in range(n):
        cache.store(i, kv, kv)
    cache.commit(CONTEXT_TOKENS)
    rope = fam.Rope(args, dt, device).tables(CONTEXT_TOKENS, 1)
    x = torch.full((1, hidden), 0.1, dtype=dt, device=device)

    def sweep():
        for i, w in enumerate(layers):
            fam.layer_forward(args, w, x, cache, i, rope, CONTEXT_TOKENS)  # rewrites the same KV slot

    return per_layer, n, sweep


def measure_layer_points(dtype: str, shapes=LAYER_SHAPES, *, sweep_bytes: int = SWEEP_BYTES,
                         reps: int = 15) -> list[tuple[int, float]]:
    """(weight bytes, seconds) of one decoder layer per shape at one decode token, run as decode runs it
    (torch single-threaded in ``decode_scope``). The shapes' sweeps alternate and each keeps its fastest
    rep, so a burst of other work on the machine neither favours one shape nor inflates the figures."""
    import torch

    from kernels_cpu.matvec import decode_scope

    with torch.inference_mode():
        sweeps = [_layer_sweep(dtype, s, sweep_bytes) for s in shapes]
        best = [math.inf] * len(sweeps)
        with decode_scope():
            for _, _, sweep in sweeps:
                sweep()  # warm: kernels compiled, pages touched
            for _ in range(reps):
                for i, (_, _, sweep) in enumerate(sweeps):
                    best[i] = min(best[i], timed(sweep))
    return [(per_layer, t / n) for (per_layer, n, _), t in zip(sweeps, best)]


def measure_decode_layer(dtype: str, shape: tuple[int, int, int, int], *, sweep_bytes: int = SWEEP_BYTES,
                         reps: int = 7) -> tuple[int, float]:
    """(weight bytes, seconds) of one decoder layer of ``shape`` at one decode token (fastest rep)."""
    return measure_layer_points(dtype, [shape], sweep_bytes=sweep_bytes, reps=reps)[0]


def fit_layer_cost(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(bytes/s, fixed seconds) of the line ``seconds = fixed + bytes / rate`` through measured points
    (least squares). The fixed part is clamped to [0, the smallest point's time]; a degenerate fit
    (noise: the larger layer no slower) falls back to the largest point's plain rate."""
    if not points:
        raise ValueError("fit_layer_cost needs at least one point")
    big = max(points)
    if len({b for b, _ in points}) < 2:
        return big[0] / big[1], 0.0
    mb = statistics.fmean(b for b, _ in points)
    mt = statistics.fmean(t for _, t in points)
    slope = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    if slope <= 0:
        return big[0] / big[1], 0.0
    fixed = min(max(0.0, mt - slope * mb), min(t for _, t in points))
    return 1.0 / slope, fixed


def measure_layer_costs(dtype: str, shapes=LAYER_SHAPES, **kw) -> tuple[float, float]:
    """(mat-vec bytes/s, fixed seconds per layer) for ``dtype`` from decode layers of ``shapes``."""
    return fit_layer_cost(measure_layer_points(dtype, shapes, **kw))


def measure_token_overhead(dtype: str, *, vocab: int = TOKEN_VOCAB, reps: int = 7, device="cpu") -> float:
    """Seconds per decode token outside the layers and the head mat-vec, timed directly: ``Engine.forward``
    of one token on a model with no layers and a tiny head (embedding, RoPE tables, ``decode_scope``,
    the sweep), plus the greedy sampler over a ``vocab``-sized row of logits (on ``device``: on a GPU
    its ``.item()`` waits for the step's kernels, as in decode)."""
    import torch

    from offload_rt.config import SamplingConfig
    from offload_rt import models
    from offload_rt.engine import Engine, ResidentWeights, model_groups
    from offload_rt.sampling import make_sampler

    dt = getattr(torch, dtype)
    hidden, tiny_vocab = 64, 64
    args = _layer_args(hidden, hidden, 1, 1, 0, tiny_vocab)
    tensors = _weights(_head_tensors(args), dt, device)
    logits, sample = torch.zeros(vocab, dtype=torch.float32, device=device), make_sampler(SamplingConfig())
    with torch.inference_mode():
        engine = Engine(args, ResidentWeights(model_groups(args), tensors.__getitem__, models.of(args).EMBED), dt,
                        max_tokens=8, device=device)

        def step():
            engine.forward([1])
            engine.reset()
            sample(logits)

        step()
        return min(timed(step) for _ in range(reps))


def faster_layer_cost(dtype: str, a: tuple[float, float], b: tuple[float, float],
                      shapes=LAYER_SHAPES) -> tuple[float, float]:
    """Of two (bytes/s, fixed seconds) figures of ``dtype`` (two calibration rounds), the one that times
    the layers of ``shapes`` faster in all: the less disturbed round. The pair is kept whole (a rate
    from one round and a fixed part from another would describe no measured layer)."""
    itemsize = 4 if dtype == "float32" else 2
    sizes = [itemsize * sum(math.prod(s) for s in layer_tensors(*shape).values()) for shape in shapes]

    def total(cost: tuple[float, float]) -> float:
        rate, fixed = cost
        return sum(fixed + n / rate for n in sizes)

    return a if total(a) <= total(b) else b


def measure_gpu_layer_costs(dtype: str, device, *, reps: int = 5, matvec_bytes: int = GPU_MATVEC_BYTES,
                            fixed_sweep_bytes: int = GPU_FIXED_SWEEP_BYTES,
                            clock: Callable | None = None) -> tuple[float, float]:
    """(mat-vec bytes/s, fixed seconds per layer) of decode on the GPU at ``dtype``.

    The planner adds them (``bytes / matvec + layer_s``). A decode layer on a GPU is bound by its
    launches (a few dozen small kernels queued from Python) until its weights take longer to read
    than that: the fixed part is a small layer's time, which is all launches, less its bytes at
    the measured rate. For large layers the sum overstates by up to ``layer_s`` (launches overlap
    the reading), never understates. ``clock(fn, device)`` times a run (default: ``timed_cuda``).
    """
    import torch

    clock = clock or timed_cuda
    rate = measure_gpu_matvec(dtype, device, nbytes=matvec_bytes, reps=reps, clock=clock)
    with torch.inference_mode():
        per_layer, n, sweep = _layer_sweep(dtype, GPU_FIXED_SHAPE, fixed_sweep_bytes, device)
        sweep()  # warm: every kernel of a decode layer loaded
        t = min(clock(sweep, device) for _ in range(reps)) / n
    return rate, max(0.0, t - per_layer / rate)


def warm_gpu_kernels(dtype: str, device) -> None:
    """Run a short prefill and a decode step through a tiny layer and head at ``dtype`` on ``device``:
    CUDA loads kernel modules lazily, into the context, so do this before measuring the context
    (``gpu.measure_gpu_context(warm=...)``) to count the kernels a run will load."""
    import torch

    from offload_rt import models
    from offload_rt.kv.dense import DenseKV

    dt = getattr(torch, dtype)
    hidden, inter, heads, kv_heads = WARM_SHAPE
    args = _layer_args(hidden, inter, heads, kv_heads, 1, vocab=64)
    fam = models.of(args)
    w = _weights(layer_tensors(hidden, inter, heads, kv_heads), dt, device)
    w.update(_weights(_head_tensors(args), dt, device))
    cache = DenseKV(1, kv_heads, HEAD_DIM, dt, CONTEXT_TOKENS, device=device)
    rope = fam.Rope(args, dt, device)
    with torch.inference_mode():
        for start, n in ((0, 8), (8, 1)):  # prefill (GEMMs, masked attention), then decode (GEMVs)
            ids = torch.ones(n, dtype=torch.int64, device=device)
            x = fam.embed(args, w[fam.EMBED], ids)
            x = fam.layer_forward(args, w, x, cache, 0, rope.tables(start, n), start)
            cache.commit(n)
            int(torch.argmax(fam.head_forward(args, w, x)[-1]).item())


def release_gpu(device) -> None:
    """After calibrating: nothing of it stays on the GPU or in the run's peak figures."""
    import gc

    import torch

    gc.collect()  # tensors held by reference cycles (closures) go now, not at some later collection
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)

