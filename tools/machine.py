"""The machine a benchmark ran on, in one line, for every printed figure (issue 22: the same kernel
reached 86-90 % of memory bandwidth on one machine of this project's kind and 54-57 % on another,
which a figure without its CPU cannot tell apart)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """lscpu's model name with family/model (a VM may show only "AMD EPYC"), CPU count, hypervisor and
    the vector extensions the kernels use; /proc/cpuinfo's model name where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    kv = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
    if "Model name" not in kv:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
        return f"unknown CPU, {os.cpu_count()} CPUs"
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in kv.get("Flags", "").split()]
    hv = kv.get("Hypervisor vendor")
    return (f"{kv['Model name']} (family {kv.get('CPU family', '?')} model {kv.get('Model', '?')}), "
            f"{kv.get('CPU(s)', os.cpu_count())} CPUs{f', {hv} guest' if hv else ''}, {' '.join(flags)}")
