"""Measure the bandwidths the planner needs, once per machine and disk.

* disk read: a ~512 MiB file written to the offload dir, fsynced, dropped from
  the page cache (``posix_fadvise(DONTNEED)``), read back cold with 16 MiB reads
  into one preallocated page-aligned (mmap) buffer, with ``O_DIRECT`` where the
  filesystem allows it (buffered reads otherwise), then deleted;
* memory read: torch ``sum`` over 256 MiB of float32;
* decode layer: what decode runs, timed — a dense decoder layer's ``layer_forward`` (offload_rt.models) on one token
  (its mat-vecs through ``kernels_cpu.matvec.linear``: the Numba kernels for float32 and
  bfloat16, ``F.linear`` for float16, as in decode), inside ``decode_scope``, over enough
  distinct layers that the weights stream from RAM; fastest of several reps. Two layer
  sizes per dtype give a line ``seconds = layer_s + bytes / matvec``: the mat-vec rate
  (``matvec_by_dtype``) and the rest of a layer (``layer_s_by_dtype``: norms, RoPE,
  attention over a short context, kernel calls);
* per token: ``Engine.forward`` on a model without layers (a tiny head) plus the
  greedy sampler over a full vocabulary (``token_s``: embedding, RoPE tables, the sweep);
* host→device, only with ``cuda=True``: 256 MiB copies from host memory page-locked in place
  (``CudaAccel.pin``, as the run pins its buffers; unpinned afterwards, where torch's
  ``pin_memory()`` would keep its block cached for the life of the process).

With ``cuda=True`` compute runs on the GPU, so the compute figures are the GPU's
(:func:`measure_gpu_layer_costs`): ``matvec_by_dtype`` the weight bytes/s of a one-row
mat-vec over a matrix far larger than the GPU's L2 (queued back to back, each long enough
that the next launch hides behind it), ``layer_s_by_dtype`` the time of a small decoder
layer, which is launch-bound (eager kernels queued one by one from Python), less its
mat-vec bytes; ``token_s`` is timed on the device too. Afterwards every tensor is
freed, the caching allocator emptied and its peak statistics reset, so the run starts
clean.

:func:`load_or_measure` caches the result as JSON in ``<cache>/bandwidth.json``
(``<cache>`` = offload_rt.config.default_cache_dir(), ``OFFLOAD_RT_CACHE``
respected), keyed by hostname, the ``st_dev`` of the offload dir, the CPU count
and the compute threads, and for a CUDA run the GPU's identity (name, SMs, memory): a
CPU run and a CUDA run on one machine never share compute figures.
``OFFLOAD_RT_BANDWIDTHS="disk=1.3e9,mem=2.4e10,matvec=1.5e10[,h2d=2.5e10]"``
overrides everything (tests use it; nothing is measured).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from offload_rt.config import default_cache_dir
from offload_rt.errors import UsageError
from offload_rt.memory.plan import Bandwidths

ENV_OVERRIDE = "OFFLOAD_RT_BANDWIDTHS"
CACHE_FILE = "bandwidth.json"
CACHE_VERSION = 2  # 2: decode-layer figures from the kernel decode runs (1 timed F.linear)

MiB = 1 << 20
DISK_TEST_BYTES = 512 * MiB  # kept equal to [calibrate] in configs/defaults.toml
READ_CHUNK_BYTES = 16 * MiB
PARALLEL_PIECE_BYTES = 8 * MiB  # as storage.store.PIECE_BYTES: what the streaming reader issues
PARALLEL_READERS = 8  # as the scheduler's reader pool
PROBE_FILES = 8  # the disk probe is several files, like a weight store
MEM_TEST_BYTES = 256 * MiB
H2D_TEST_BYTES = 256 * MiB
# Decoder layers timed per dtype (hidden, intermediate, heads, KV heads; head_dim 64): a small and a large
# Llama layer (SmolLM2-135M's, and a Llama-1B-class one), so the fit spans the models this runs.
LAYER_SHAPES = ((576, 1536, 9, 3), (2048, 5632, 32, 4))
HEAD_DIM = 64
SWEEP_BYTES = 256 * MiB  # distinct weight bytes per timed sweep: more than a CPU cache holds, as in decode
CONTEXT_TOKENS = 32  # tokens already in the KV cache of a timed layer (a short conversation)
MATVEC_DTYPES = ("float32", "bfloat16", "float16")
TOKEN_VOCAB = 49152  # logits the timed sampler of token_s runs over (the default model's vocabulary)
# GPU: one matrix this large per dtype (a row of 8192 inputs), well past any GPU's L2 (50 MB on an H100),
# long enough per mat-vec (≥ 30 µs at 5 TB/s) that the next launch is queued before it ends.
GPU_MATVEC_BYTES = 256 * MiB
GPU_MATVEC_COLS = 8192
GPU_MATVEC_REPS = 20  # mat-vecs queued per timed run
GPU_FIXED_SHAPE = LAYER_SHAPES[0]  # the small layer: launch-bound on a GPU, its time is the fixed part
GPU_FIXED_SWEEP_BYTES = 64 * MiB
WARM_SHAPE = (256, 512, 4, 1)  # warm_gpu_kernels: the smallest layer with every kernel a decode runs
DEFAULT_MATVEC_DTYPE = "bfloat16"  # Bandwidths.matvec; the others in matvec_by_dtype

_ENV_KEYS = {
    "disk": "disk_read",
    "disk_read": "disk_read",
    "mem": "mem_read",
    "mem_read": "mem_read",
    "matvec": "matvec",
    "h2d": "h2d",
}


# ---------------------------------------------------------------------------- override / cache


def bandwidths_from_env(value: str | None = None) -> Bandwidths | None:
    """Parse ``OFFLOAD_RT_BANDWIDTHS``; None when unset or empty.

    Keys: disk, mem, matvec, h2d, or ``matvec_<dtype>`` (e.g. matvec_float32).
    disk and matvec are required; mem defaults to matvec; h2d to None (no CUDA).
    """
    text = os.environ.get(ENV_OVERRIDE) if value is None else value
    if not text or not text.strip():
        return None
    vals: dict[str, float] = {}
    by_dtype: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, num = part.partition("=")
        key = key.strip().lower()
        try:
            x = float(num)
        except ValueError:
            x = -1.0
        if not sep or x <= 0:
            raise UsageError(f"{ENV_OVERRIDE}: bad entry {part.strip()!r}; use key=bytes_per_second, e.g. disk=1.3e9")
        if key.startswith("matvec_"):
            by_dtype[key[len("matvec_"):]] = x
        elif key in _ENV_KEYS:
            vals[_ENV_KEYS[key]] = x
        else:
            raise UsageError(
                f"{ENV_OVERRIDE}: unknown key {key!r}; use disk, mem, matvec, matvec_<dtype> or h2d"
            )
    if "matvec" not in vals and by_dtype:
        vals["matvec"] = by_dtype.get(DEFAULT_MATVEC_DTYPE, next(iter(by_dtype.values())))
    missing = [k for k in ("disk_read", "matvec") if k not in vals]
    if missing:
        raise UsageError(f"{ENV_OVERRIDE}: missing {' and '.join(missing)}; e.g. disk=1.3e9,mem=2.4e10,matvec=1.5e10")
    return Bandwidths(
        disk_read=vals["disk_read"],
        mem_read=vals.get("mem_read", vals["matvec"]),
        matvec=vals["matvec"],
        h2d=vals.get("h2d"),
        matvec_by_dtype=by_dtype,
    )


def cache_key(offload_dir: Path, *, cuda: bool = False) -> str:
    """hostname / st_dev of the offload dir (its nearest existing ancestor) / CPU count / compute threads,
    and with ``cuda`` the GPU (:func:`gpu_identity`): a CUDA run's compute figures are the GPU's."""
    import torch

    p = Path(offload_dir).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    key = f"{socket.gethostname()}:{os.stat(p).st_dev}:{os.cpu_count()}:t{torch.get_num_threads()}"
    return f"{key}:cuda={gpu_identity()}" if cuda else key


def gpu_identity(device=None) -> str:
    """The current CUDA device as far as speed goes: name, SM count, memory (a MIG slice differs from
    its whole GPU in the last two). ``cuda`` when it cannot be read. No ``:`` (the key's separator)."""
    try:
        import torch

        props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        ident = f"{props.name}/{props.multi_processor_count}sm/{props.total_memory / 2**30:.0f}G"
    except Exception:
        return "cuda"
    return ident.replace(":", "_").replace(" ", "_")


def _to_json(bw: Bandwidths) -> dict:
    return {
        "disk_read": bw.disk_read,
        "mem_read": bw.mem_read,
        "matvec": bw.matvec,
        "h2d": bw.h2d,
        "matvec_by_dtype": dict(bw.matvec_by_dtype),
        "layer_s": bw.layer_s,
        "token_s": bw.token_s,
        "layer_s_by_dtype": dict(bw.layer_s_by_dtype),
    }


def _from_json(d: dict) -> Bandwidths:
    return Bandwidths(
        disk_read=float(d["disk_read"]),
        mem_read=float(d["mem_read"]),
        matvec=float(d["matvec"]),
        h2d=None if d.get("h2d") is None else float(d["h2d"]),
        matvec_by_dtype={str(k): float(v) for k, v in (d.get("matvec_by_dtype") or {}).items()},
        layer_s=float(d.get("layer_s") or 0.0),
        token_s=float(d.get("token_s") or 0.0),
        layer_s_by_dtype={str(k): float(v) for k, v in (d.get("layer_s_by_dtype") or {}).items()},
    )


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, entries: dict) -> None:
    """Atomic replace: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bandwidth.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    A cached entry without ``h2d`` is measured again when ``cuda`` is asked for.
    """
    env = bandwidths_from_env()
    if env is not None:
        return env
    path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    key = cache_key(offload_dir, cuda=cuda)
    entries = _read_cache(path)
    if not remeasure and key in entries:
        try:
            bw = _from_json(entries[key])
        except (KeyError, TypeError, ValueError):
            bw = None
        if bw is not None and (bw.h2d or not cuda):
            return bw
    bw = (measure or measure_bandwidths)(Path(offload_dir), progress=progress, cuda=cuda)
    entries = _read_cache(path)  # again: another process may have added its own entry
    entries[key] = {**_to_json(bw), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        _write_cache(path, entries)
    except OSError:
        pass  # a read-only cache dir costs a re-measure next time, nothing else
    return bw


def cached(offload_dir: Path, *, cache_dir: Path | None = None, cuda: bool = False) -> Bandwidths | None:
    """The cached figures of this machine, this disk and this thread count (and GPU, with ``cuda``);
    None when not measured yet."""
    entry = _read_cache(Path(cache_dir or default_cache_dir()) / CACHE_FILE).get(cache_key(offload_dir, cuda=cuda))
    try:
        return None if entry is None else _from_json(entry)
    except (KeyError, TypeError, ValueError):
        return None


def forget(offload_dir: Path, *, cache_dir: Path | None = None) -> int:
    """Drop the cached figures of this machine and the disk under ``offload_dir`` (every thread count,
    CPU and CUDA), so the next run measures them again; returns how many entries went."""
    path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    entries = _read_cache(path)
    prefix = cache_key(offload_dir).rsplit(":", 1)[0] + ":"
    keep = {k: v for k, v in entries.items() if not k.startswith(prefix)}
    if len(keep) != len(entries):
        _write_cache(path, keep)
    return len(entries) - len(keep)


# ---------------------------------------------------------------------------- measuring


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr; ``step(description)`` advances it."""
    if not enabled:
        yield lambda _desc: None
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
        first = [True]

        def step(desc: str) -> None:
            if first[0]:
                first[0] = False
            else:
                bar.advance(task)
            bar.update(task, description=desc)

        yield step
        bar.update(task, completed=total)


def measure_disk_read(directory: Path, nbytes: int = DISK_TEST_BYTES, chunk: int = READ_CHUNK_BYTES) -> float:
    """Cold read bandwidth (bytes/s) of the filesystem holding ``directory``.

    The probe is PROBE_FILES files (a weight store is many chunk files) read the way the
    scheduler reads: PARALLEL_PIECE_BYTES requests on PARALLEL_READERS threads, O_DIRECT where
    allowed, twice (decode re-reads its streamed bytes every token); also one sequential
    stream. The best of these is the disk's peak.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    per_file = max(chunk, nbytes // PROBE_FILES // chunk * chunk)
    block = os.urandom(chunk)  # incompressible, so a compressing filesystem cannot cheat
    names = []
    try:
        for _ in range(PROBE_FILES):
            fd, name = tempfile.mkstemp(prefix=".offload_rt-disk-probe.", dir=directory)
            names.append(name)
            try:
                written = 0
                while written < per_file:
                    written += os.write(fd, block[: min(chunk, per_file - written)])
                os.fsync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        seq = _read_files(names, per_file, chunk, threads=1)
        # Decode reads the same bytes every token: the parallel pattern runs twice, the better pass counts
        # (a virtual disk serves a first pass over fresh data slower than the passes after it).
        par = max(_read_files(names, per_file, PARALLEL_PIECE_BYTES, threads=PARALLEL_READERS) for _ in range(2))
    finally:
        for name in names:
            Path(name).unlink(missing_ok=True)
    return max(seq, par)


def _read_files(names: list[str], size: int, piece: int, *, threads: int) -> float:
    """Bytes/s reading every file whole in ``piece``-sized requests on ``threads`` threads."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    jobs = [(n, off) for n in names for off in range(0, size, piece)]

    def work(job) -> int:
        name, off = job
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, piece)  # page aligned: usable for O_DIRECT
        fd, direct = _open_direct(name)
        try:
            try:
                n = os.preadv(fd, [buf], off)
            except OSError:
                if not direct:
                    raise
                os.close(fd)  # O_DIRECT refused at read time (some filesystems): buffered
                fd, direct = os.open(name, os.O_RDONLY), False
                n = os.preadv(fd, [buf], off)
            if not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, off, piece, os.POSIX_FADV_DONTNEED)
            return max(0, n)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as ex:
        total = sum(ex.map(work, jobs))
    return total / max(time.perf_counter() - t0, 1e-9)


def _open_direct(name: str) -> tuple[int, bool]:
    """(fd, is_direct): O_DIRECT where the filesystem allows it."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(name, os.O_RDONLY | direct), True
        except OSError:  # tmpfs and friends: buffered, the cache was dropped above
            pass
    return os.open(name, os.O_RDONLY), False


def measure_mem_read(nbytes: int = MEM_TEST_BYTES, reps: int = 5) -> float:
    """RAM read bandwidth (bytes/s): torch sum over ``nbytes`` of float32, best of ``reps``."""
    import torch

    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    x.sum()  # warm: pages touched, threads up
    best = min(_timed(lambda: x.sum()) for _ in range(reps))
    return x.numel() * 4 / best


def measure_matmul_flops(dtype: str = "float32", device: str = "cpu", *, tokens: int = 128, dim: int = 1024,
                         reps: int = 3) -> float:
    """Floating-point operations per second of a batched linear (``tokens`` rows through a ``dim``²
    matrix) at ``dtype`` on ``device``, best of ``reps``: the per-token compute of a pass over many
    tokens (prefill, a speculation tree). ~10 ms; :func:`matmul_flops` caches it."""
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
    best = min(_timed(run) for _ in range(reps))
    return 2.0 * tokens * dim * dim / best


def matmul_flops(dtype: str, device: str = "cpu", *, cache_dir: Path | None = None) -> float:
    """:func:`measure_matmul_flops` once per machine, thread count, dtype (and GPU), cached beside the
    bandwidths: the speculation budget the planner derives from it must not change from run to run."""
    import torch

    key = f"matmul:{socket.gethostname()}:{os.cpu_count()}:t{torch.get_num_threads()}:{dtype}:" + (
        gpu_identity() if torch.device(device).type == "cuda" else "cpu")
    path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"])
    flops = measure_matmul_flops(dtype, device, reps=7)
    entries = _read_cache(path)
    entries[key] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        _write_cache(path, entries)
    except OSError:
        pass
    return flops


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
                    best[i] = min(best[i], _timed(sweep))
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
        return min(_timed(step) for _ in range(reps))


# ---------------------------------------------------------------------------- the GPU (CUDA only; kept short)


def measure_gpu_matvec(dtype: str, device, *, nbytes: int = GPU_MATVEC_BYTES, reps: int = 5) -> float:
    """Weight bytes/s of a one-row mat-vec (``F.linear``, as decode runs it on a GPU) at ``dtype``."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    w = torch.full((max(1, nbytes // (GPU_MATVEC_COLS * dt.itemsize)), GPU_MATVEC_COLS), 0.02, dtype=dt,
                   device=device)
    x = torch.full((1, GPU_MATVEC_COLS), 0.1, dtype=dt, device=device)

    def run():
        for _ in range(GPU_MATVEC_REPS):
            F.linear(x, w)

    with torch.inference_mode():
        run()  # warm: cuBLAS picks its kernel, the module loads
        best = min(_timed_cuda(run, device) for _ in range(reps))
    return w.numel() * dt.itemsize * GPU_MATVEC_REPS / best


def measure_gpu_layer_costs(dtype: str, device, *, reps: int = 5, matvec_bytes: int = GPU_MATVEC_BYTES,
                            fixed_sweep_bytes: int = GPU_FIXED_SWEEP_BYTES) -> tuple[float, float]:
    """(mat-vec bytes/s, fixed seconds per layer) of decode on the GPU at ``dtype``.

    The planner adds them (``bytes / matvec + layer_s``). A decode layer on a GPU is bound by its
    launches (a few dozen small kernels queued from Python) until its weights take longer to read
    than that: the fixed part is a small layer's time, which is all launches, less its bytes at
    the measured rate. For large layers the sum overstates by up to ``layer_s`` (launches overlap
    the reading), never understates.
    """
    import torch

    rate = measure_gpu_matvec(dtype, device, nbytes=matvec_bytes, reps=reps)
    with torch.inference_mode():
        per_layer, n, sweep = _layer_sweep(dtype, GPU_FIXED_SHAPE, fixed_sweep_bytes, device)
        sweep()  # warm: every kernel of a decode layer loaded
        t = min(_timed_cuda(sweep, device) for _ in range(reps)) / n
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
        return nbytes / min(_timed_cuda(copy, accel.device) for _ in range(reps))
    finally:
        if pinned:
            torch.cuda.synchronize(accel.device)  # no copy may still read the pages being unlocked
            accel.unpin(src)


def _timed_cuda(fn: Callable[[], object], device) -> float:
    """Seconds from an idle device to the end of the device work ``fn`` queues."""
    import torch

    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return max(time.perf_counter() - t0, 1e-9)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return max(time.perf_counter() - t0, 1e-9)


def measure_bandwidths(
    offload_dir: Path,
    *,
    progress: bool = True,
    cuda: bool = False,
    disk_bytes: int = DISK_TEST_BYTES,
    mem_bytes: int = MEM_TEST_BYTES,
    device="cuda",
) -> Bandwidths:
    """Measure everything the planner needs (several seconds; the disk probe dominates).

    With ``cuda`` the compute figures are the GPU's (``device``), and what the measurement put on
    the GPU is released before returning (:func:`release_gpu`).
    """
    with _progress(progress and sys.stderr is not None, 3 + len(MATVEC_DTYPES) + int(cuda)) as step:
        step("disk read")
        disk = measure_disk_read(Path(offload_dir), disk_bytes)
        step("memory read")
        mem = measure_mem_read(mem_bytes)
        try:
            by_dtype, layer_by_dtype = {}, {}
            for d in MATVEC_DTYPES:
                step(f"decode layer {d}" + (" (GPU)" if cuda else ""))
                by_dtype[d], layer_by_dtype[d] = measure_gpu_layer_costs(d, device) if cuda else measure_layer_costs(d)
            step("per token")
            token = measure_token_overhead(DEFAULT_MATVEC_DTYPE, device=device if cuda else "cpu")
            h2d = None
            if cuda:
                release_gpu(device)  # the copy target needs the room the layers held
                step("host→device")
                h2d = measure_h2d(device=device)
        finally:
            if cuda:
                release_gpu(device)
        step("done")
    return Bandwidths(
        disk_read=disk,
        mem_read=mem,
        matvec=by_dtype[DEFAULT_MATVEC_DTYPE],
        h2d=h2d,
        matvec_by_dtype=by_dtype,
        layer_s=layer_by_dtype[DEFAULT_MATVEC_DTYPE],
        token_s=token,
        layer_s_by_dtype=layer_by_dtype,
    )
