"""Pure analysis of an offload_rt Chrome trace (no plotting): intervals, per-group times, link GB/s."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class TraceError(Exception):
    """The file is not an offload_rt trace (one-line message for the user)."""


def load_trace(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TraceError(f"trace file {path} not found; write one with offload-run ... --profile {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"cannot read trace file {path}: {e}") from None
    except json.JSONDecodeError:
        raise TraceError(f"{path} is not JSON; pass a trace written by offload-run --profile") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError(f"{path} has no traceEvents; pass a trace written by offload-run --profile")
    return data


def union_length(spans) -> float:
    """Total length covered by a set of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def intersect_length(xs, ys) -> float:
    """Length covered by both interval sets."""
    def merged(spans):
        out = []
        for a, b in sorted(spans):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out

    xs, ys = merged(xs), merged(ys)
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if hi > lo:
            total += hi - lo
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


@dataclass
class GroupRow:
    group: str
    tier: str
    bytes: int = 0  # bytes moved per decode pass (disk + h2d)
    load_s: float = 0.0  # mean per decode pass: disk read + h2d copy time
    compute_s: float = 0.0  # mean per decode pass
    wait_s: float = 0.0  # mean per decode pass: compute waiting for this group's weights


@dataclass
class Link:
    name: str
    bytes: int
    busy_s: float  # union of the track's intervals
    span_s: float  # wall time of the run's forward passes
    peak: float | None  # measured peak bytes/s
    overlap_with_compute: float  # fraction of busy time that overlapped compute

    @property
    def busy_gbps(self) -> float:
        return self.bytes / self.busy_s / 1e9 if self.busy_s else 0.0

    @property
    def wall_gbps(self) -> float:
        return self.bytes / self.span_s / 1e9 if self.span_s else 0.0


@dataclass
class Analysis:
    meta: dict
    events: list  # complete events, times in seconds: (track, name, start, end, args)
    passes: list  # (pass, tokens, start, end)
    groups: list[GroupRow] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    occupancy: list = field(default_factory=list)  # (t, {tier: bytes})
    decode_tok_s: float = 0.0
    prefill_tok_s: float = 0.0


def analyse(data: dict) -> Analysis:
    tracks = {}
    for e in data["traceEvents"]:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tracks[e.get("tid")] = e.get("args", {}).get("name", str(e.get("tid")))
    events, occupancy = [], []
    for e in data["traceEvents"]:
        ph = e.get("ph")
        if ph == "X":
            track = e.get("cat") or tracks.get(e.get("tid"), "other")
            start = float(e.get("ts", 0)) / 1e6
            events.append((track, e.get("name", ""), start, start + float(e.get("dur", 0)) / 1e6, e.get("args", {})))
        elif ph == "C" and e.get("name") == "occupancy":
            occupancy.append((float(e.get("ts", 0)) / 1e6, dict(e.get("args", {}))))
    events.sort(key=lambda r: r[2])
    meta = data.get("otherData") or {}
    passes = sorted((int(a.get("pass", 0)), int(a.get("tokens", 0)), s, t) for tr, n, s, t, a in events
                    if tr == "compute" and n == "forward")
    an = Analysis(meta=meta, events=events, passes=passes, occupancy=sorted(occupancy, key=lambda r: r[0]))
    decode = [p for p in passes if p[1] == 1]
    prefill = [p for p in passes if p[1] > 1]
    if decode:
        an.decode_tok_s = len(decode) / sum(p[3] - p[2] for p in decode)
    if prefill:
        an.prefill_tok_s = sum(p[1] for p in prefill) / sum(p[3] - p[2] for p in prefill)
    an.groups = _group_rows(events, meta, decode)
    span = (passes[-1][3] - passes[0][2]) if passes else 0.0
    computes = [(s, t) for tr, n, s, t, a in events if tr == "compute" and n != "forward" and not n.startswith("wait")]
    peaks = meta.get("peaks") or {}
    for link in ("disk", "h2d"):
        spans = [(s, t) for tr, n, s, t, a in events if tr == link]
        if not spans:
            continue
        nbytes = sum(int(a.get("bytes", 0)) for tr, n, s, t, a in events if tr == link)
        busy = union_length(spans)
        an.links.append(Link(link, nbytes, busy, span, peaks.get(link),
                             intersect_length(spans, computes) / busy if busy else 0.0))
    return an


def _group_rows(events, meta, decode) -> list[GroupRow]:
    tiers = meta.get("tiers") or {}
    n_dec = max(1, len(decode))
    windows = [(s, t) for _, _, s, t in decode]

    def in_decode(s: float) -> bool:
        return any(a <= s < b for a, b in windows) if windows else True

    rows: dict[str, GroupRow] = {}

    def row(g: str) -> GroupRow:
        if g not in rows:
            rows[g] = GroupRow(g, tiers.get(g, "-"))
        return rows[g]

    compute_by_pass = defaultdict(float)
    for tr, name, s, t, a in events:
        g = a.get("group")
        if not g:
            continue
        if tr == "compute":
            if decode and int(a.get("pass", -1)) not in {p[0] for p in decode}:
                continue
            if name.startswith("wait"):
                row(g).wait_s += (t - s) / n_dec
            else:
                row(g).compute_s += (t - s) / n_dec
                compute_by_pass[g] += 1
        elif tr in ("disk", "h2d"):
            if not in_decode(s) and decode:
                # reads run ahead of compute: attribute a read to decode if it started after the first decode pass began
                if s < windows[0][0]:
                    continue
            r = row(g)
            r.load_s += (t - s) / n_dec
            r.bytes += int(a.get("bytes", 0)) // n_dec

    def order(r: GroupRow):
        if r.group.startswith("layer."):
            return (1, int(r.group.split(".")[1]))
        return (0 if r.group == "embed" else 2, 0)

    return sorted(rows.values(), key=order)
