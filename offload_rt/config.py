"""Run configuration: the frozen set of choices the CLI (or a library caller) makes.

Sizes on the command line follow DESIGN.md: ``8G``, ``8GiB``, ``512M``, ``1.5G``,
``0`` (tier unused) and ``auto`` (measured free memory minus a margin). Binary units.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from offload_rt.errors import UsageError

AUTO = "auto"
KV_SPILL_DIR = "kv-cache"  # under the store dir: the KV chunks runs spill (storage.kv_store)
PREFIX_CACHE_DIR = "prefix-cache"  # under the store dir: <store name>/, the prefix cache of that weight store

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | None, *, option: str = "size") -> int | str | None:
    """Parse a size string into bytes, ``"auto"`` or None (not given).

    >>> parse_size("8G"), parse_size("512M"), parse_size("1.5GiB"), parse_size("0")
    (8589934592, 536870912, 1610612736, 0)
    """
    if text is None:
        return None
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{option}: size must not be negative, got {text}")
        return text
    s = str(text).strip()
    if s.lower() == AUTO:
        return AUTO
    m = _SIZE_RE.match(s)
    if not m:
        raise UsageError(
            f"{option}: bad size {text!r}; use a number with a binary unit such as 8G, 512M, 1.5GiB, 0 or 'auto'"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value)


def format_size(n: int | float | None) -> str:
    """Human-readable binary size: 1.50 GiB, 512.0 MiB, 12 B."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def default_cache_dir() -> Path:
    """Where converted weight stores and measured bandwidths live, outside the repo."""
    env = os.environ.get("OFFLOAD_RT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "offload_rt"


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # None = nondeterministic


KV_DTYPES = ("f16", "bf16", "q8", "q4")  # --kv-dtype's choices (kernels_cpu/kv_quant.py: the quantized ones)
KV_SELECT_SHARE = 0.25  # --kv-select-share's default (offload_rt/memory/kv_select.py: why a share)


@dataclass(frozen=True)
class RunConfig:
    model: str | None = None  # checkpoint dir, .gguf file, or None for the default model
    max_new_tokens: int = 256  # upper bound on generated tokens per answer
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dtype: str | None = None  # float32 | bfloat16 | float16 | None (checkpoint's own)
    weights: str = "auto"  # stored weight format: auto | f32 | f16 | bf16 | int8 | int4 (storage.transcode)
    device: str = "auto"  # auto | cpu | cuda
    gpu_mem: int | str | None = None  # device tier budget in bytes, "auto" or None
    cpu_mem: int | str | None = None  # host tier budget in bytes, "auto" or None
    offload_dir: Path | None = None  # where weight stores live (the disk tier)
    raw: bool = False  # no chat template
    stop: tuple[str, ...] = ()  # extra stop strings
    prefill_chunk: int = 512  # tokens per prefill forward pass
    parallel: int | None = None  # serve: sequences decoded together (None: chosen from the budgets; a run: 1)
    rebuild_store: bool = False  # convert the checkpoint again even if a store exists
    progress: bool = True  # progress bars on stderr
    profile: Path | None = None  # Chrome trace output
    config_file: Path | None = None  # TOML preset
    prefetch_depth: int | None = None  # streamed layers in flight (None: planner decides)
    threads: int | None = None  # torch intra-op threads (None: torch default)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    bandwidth_hints: dict | None = None  # preset [bandwidths] (bytes/s), used instead of measuring
    ctx_size: int | None = None  # context window in tokens (None: the model's, capped at runtime.DEFAULT_CTX)
    kv_cpu_mem: int | None = None  # host RAM for the KV cache; past it chunks spill to disk (None: all in RAM)
    kv_dtype: str | None = None  # --kv-dtype: f16 | bf16 | q8 | q4 (kernels_cpu/kv_quant.py); None: the compute dtype
    attention: str = "auto"  # auto | exact | magicpig (LSH sampling for long contexts) | select (disk chunks)
    kv_select_share: float = KV_SELECT_SHARE  # select: at most this share of a layer's disk chunks read per step
    lsh_k: int = 10  # MagicPIG: bits per hash table
    lsh_l: int = 150  # MagicPIG: hash tables
    draft: str | None = None  # SpecExec draft: a model path, or "self-int4" (the target as int4); None: off
    spec_budget: int | None = None  # tree nodes per target pass (None: the planner chooses; offload_rt.spec.budget)
    spec_overlap: bool = False  # the draft grows the next tree while the target verifies (offload_rt.spec.ahead)
    expert_slots: int | None = None  # MoE: cap on routed experts cached in RAM per layer (None: what the budget allows)

    @property
    def store_dir(self) -> Path:
        return Path(self.offload_dir) if self.offload_dir else default_cache_dir() / "stores"
