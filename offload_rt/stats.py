"""The ``--stats`` JSON line (keys stable, see DESIGN.md) and process measurements."""

from __future__ import annotations

import json
import resource
import sys

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    VmHWM from /proc (per address space), not ru_maxrss: Linux carries ru_maxrss across
    execve, so a process started by a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes() -> int:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() and torch.cuda.is_initialized() else 0


def stats_record(*, model: str, device: str, result, disk_read_bytes: int = 0, h2d_bytes: int = 0,
                 placement: dict | None = None, spec: dict | None = None, **extra) -> dict:
    rec = {
        "model": model,
        "device": device,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "prefill_s": round(result.prefill_s, 6),
        "decode_s": round(result.decode_s, 6),
        "prefill_tok_s": round(result.prefill_tok_s, 4),
        "decode_tok_s": round(result.decode_tok_s, 4),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": peak_gpu_bytes(),
        "disk_read_bytes": int(disk_read_bytes),
        "h2d_bytes": int(h2d_bytes),
        "placement": placement or {"device": 0, "host": 0, "disk": 0},
        "spec": spec,
    }
    rec.update(extra)
    return rec


def emit(rec: dict, stream=None) -> None:
    stream = stream or sys.stderr
    stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
    stream.flush()
