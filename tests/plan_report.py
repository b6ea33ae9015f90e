"""Read the ``--plan`` report back into numbers (offload_rt.memory.plan.format_plan writes it)."""

from __future__ import annotations

import re

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE = r"(\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)"
# format_size prints two decimals: a printed size is within this many of its unit of the true one
ROUNDING = 0.005


def line(report: str, label: str) -> str:
    """The report's line that starts with ``label:`` (without the label)."""
    for ln in report.splitlines():
        if ln.startswith(label + ":"):
            return ln[len(label) + 1:].strip()
    raise AssertionError(f"no {label!r} line in the plan:\n{report}")


def sizes(text: str) -> dict[str, tuple[float, float]]:
    """Every ``<word> <size>`` in ``text``: word -> (low, high) bounds in bytes of the printed size."""
    out = {}
    for word, value, unit in re.findall(r"([A-Za-z]+) " + _SIZE, text):
        v = float(value)
        tol = 0 if unit == "B" else ROUNDING
        out[word] = ((v - tol) * _UNITS[unit], (v + tol) * _UNITS[unit])
    return out


def close(printed: tuple[float, float], exact: int) -> bool:
    """Whether a printed size (bounds from :func:`sizes`) is ``exact`` bytes."""
    return printed[0] <= exact <= printed[1]


def placement(report: str) -> dict[str, str]:
    """``layers 0-13: disk, 14: host, head: host`` -> {"layer.0": "disk", ..., "head": "host"}."""
    out = {}
    for part in line(report, "placement").split(", "):
        span, tier = part.removeprefix("layers ").split(": ")
        if span == "head":
            out["head"] = tier
            continue
        lo, _, hi = span.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            out[f"layer.{i}"] = tier
    return out


def in_flight(report: str) -> int:
    """The prefetch depth: ``staging buffers: 2 in flight, ...``."""
    return int(re.match(r"(\d+) in flight", line(report, "staging buffers")).group(1))
