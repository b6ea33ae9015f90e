"""The per-machine cache of calibrated figures, and the environment override that replaces it.

``<cache>/bandwidth.json`` (``<cache>`` = offload_rt.config.default_cache_dir(), ``OFFLOAD_RT_CACHE``
respected) maps a key to one entry. A bandwidth entry is keyed by hostname, the ``st_dev`` of the
offload dir, the CPU count and the compute threads, and for a CUDA run the GPU's identity (name, SMs,
memory): a CPU run and a CUDA run on one machine never share compute figures. Besides the figures an
entry records how they were taken (``quiet``, ``others_cpu``, ``disk_probe``) and, once a run has
contradicted them, ``stale`` (the next run measures again; see offload_rt.memory.calibrate).
``OFFLOAD_RT_BANDWIDTHS="disk=1.3e9,mem=2.4e10,matvec=1.5e10[,h2d=2.5e10]"`` overrides everything
(tests use it; nothing is measured). No measuring here: this module reads and writes JSON.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

from offload_rt.config import default_cache_dir
from offload_rt.errors import UsageError
from offload_rt.memory.plan import Bandwidths

ENV_OVERRIDE = "OFFLOAD_RT_BANDWIDTHS"
CACHE_FILE = "bandwidth.json"
CACHE_VERSION = 2  # 2: decode-layer figures from the kernel decode runs (1 timed F.linear)
DEFAULT_MATVEC_DTYPE = "bfloat16"  # Bandwidths.matvec; the others in matvec_by_dtype

_ENV_KEYS = {
    "disk": "disk_read",
    "disk_read": "disk_read",
    "mem": "mem_read",
    "mem_read": "mem_read",
    "matvec": "matvec",
    "h2d": "h2d",
}


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


def cache_path(cache_dir: Path | None = None) -> Path:
    """The cache file under ``cache_dir`` (default: the user's cache dir)."""
    return Path(cache_dir or default_cache_dir()) / CACHE_FILE


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


def to_json(bw: Bandwidths) -> dict:
    """The figures of ``bw`` as a cache entry's fields."""
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


def from_json(d: dict) -> Bandwidths:
    """The figures of a cache entry; KeyError/TypeError/ValueError when it is not one."""
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


def entry_bandwidths(entry) -> Bandwidths | None:
    """The figures of a cache entry; None when it is missing or malformed."""
    if not isinstance(entry, dict):
        return None
    try:
        return from_json(entry)
    except (KeyError, TypeError, ValueError):
        return None


def read_entries(path: Path) -> dict:
    """Every entry of the cache file; {} when it is missing, unreadable or of another version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def write_entries(path: Path, entries: dict) -> None:
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


def update_entry(path: Path, key: str, fields: dict | None) -> bool:
    """Set (``fields``) or drop (None) the entry ``key``, re-reading the file first (another process may
    have added its own entry). False when the file cannot be written (a read-only cache dir costs a
    re-measure next time, nothing else)."""
    entries = read_entries(path)
    if fields is None:
        entries.pop(key, None)
    else:
        entries[key] = fields
    try:
        write_entries(path, entries)
    except OSError:
        return False
    return True


def now() -> str:
    """The timestamp entries carry (``measured_at``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def cached(offload_dir: Path, *, cache_dir: Path | None = None, cuda: bool = False) -> Bandwidths | None:
    """The cached figures of this machine, this disk and this thread count (and GPU, with ``cuda``);
    None when not measured yet."""
    return entry_bandwidths(read_entries(cache_path(cache_dir)).get(cache_key(offload_dir, cuda=cuda)))


def forget(offload_dir: Path, *, cache_dir: Path | None = None) -> int:
    """Drop the cached figures of this machine and the disk under ``offload_dir`` (every thread count,
    CPU and CUDA), so the next run measures them again; returns how many entries went."""
    path = cache_path(cache_dir)
    entries = read_entries(path)
    prefix = cache_key(offload_dir).rsplit(":", 1)[0] + ":"
    keep = {k: v for k, v in entries.items() if not k.startswith(prefix)}
    if len(keep) != len(entries):
        write_entries(path, keep)
    return len(entries) - len(keep)
