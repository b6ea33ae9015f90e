"""Pure analysis of an offload_rt Chrome trace (no plotting, no I/O beyond :func:`load_trace`).

Everything here takes plain data and returns plain data, so each number in the report can be
unit-tested against hand-built traces:

* :func:`merge`, :func:`union_length`, :func:`intersect_length`, :func:`clip`, :func:`bin_coverage` —
  interval arithmetic on ``(start, end)`` pairs in seconds;
* :func:`parse_events` — the trace's complete events and ``occupancy`` counters, malformed ones skipped;
* :func:`forward_passes`, :func:`decode_runs` — forward passes and the decode phase's wall-time windows;
* :func:`group_rows` — per weight group: mean per decode pass of load (disk + h2d), compute and wait time;
* :func:`link_stats` — bytes, busy time (union of intervals), achieved GB/s, overlap with compute per link;
* :func:`analyse` — all of the above from a trace dict.

Conventions (see ``offload_rt/trace.py`` and the scheduler): tracks ``compute``, ``disk``, ``h2d``,
``cpu_attn``; ``read <group>`` / ``h2d <group>`` events carry ``{"group", "bytes"}``; compute events
``<group>`` and ``wait <group>`` carry ``{"group", "pass"}``; ``forward`` carries ``{"pass", "tokens"}``.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

LINKS = ("disk", "h2d")  # tracks that move weights, in the order the report lists them


class TraceError(Exception):
    """The input is not a usable offload_rt trace (a one-line message for the user)."""


def load_trace(path: Path) -> dict:
    """The trace file as a dict with a ``traceEvents`` list, or :class:`TraceError`."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise TraceError(f"trace file {path} not found; write one with offload-run ... --profile {path}") from None
    except IsADirectoryError:
        raise TraceError(f"{path} is a directory, not a trace file") from None
    except OSError as e:
        raise TraceError(f"cannot read trace file {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TraceError(f"{path} is not JSON; pass a trace written by offload-run --profile") from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError(f"{path} has no traceEvents list; pass a trace written by offload-run --profile")
    return data


# ---------------------------------------------------------------------------------------- intervals
def merge(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering the same points (touching intervals join; empty ones drop)."""
    out: list[list[float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def union_length(spans: Iterable[tuple[float, float]]) -> float:
    """Total length covered by a set of ``[start, end)`` intervals (overlaps counted once)."""
    return sum(b - a for a, b in merge(spans))


def intersect(xs: Iterable[tuple[float, float]], ys: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intervals covered by both sets (disjoint, sorted)."""
    xs, ys = merge(xs), merge(ys)
    i = j = 0
    out = []
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if hi > lo:
            out.append((lo, hi))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def intersect_length(xs, ys) -> float:
    """Length covered by both interval sets."""
    return sum(b - a for a, b in intersect(xs, ys))


def clip(span: tuple[float, float], windows: list[tuple[float, float]]) -> float:
    """How much of one interval lies inside ``windows`` (merged, sorted intervals)."""
    a, b = span
    total = 0.0
    i = max(0, bisect.bisect_right(windows, (a, math.inf)) - 1)
    while i < len(windows) and windows[i][0] < b:
        lo, hi = max(a, windows[i][0]), min(b, windows[i][1])
        if hi > lo:
            total += hi - lo
        i += 1
    return total


def bin_coverage(spans: Iterable[tuple[float, float]], lo: float, hi: float, nbins: int) -> list[float]:
    """Share (0..1) of each of ``nbins`` equal bins of ``[lo, hi)`` covered by the union of ``spans``."""
    out = [0.0] * nbins
    if hi <= lo or nbins <= 0:
        return out
    width = (hi - lo) / nbins
    for a, b in merge(spans):
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            continue
        i = min(nbins - 1, int((a - lo) / width))
        while i < nbins:
            b0 = lo + i * width
            cover = min(b, b0 + width) - max(a, b0)
            if cover > 0:
                out[i] += cover / width
            if b <= b0 + width:
                break
            i += 1
    return [min(1.0, x) for x in out]


# ---------------------------------------------------------------------------------------- parsing
class Span(NamedTuple):
    """One complete event, times in seconds."""

    track: str
    name: str
    start: float
    end: float
    args: dict

    @property
    def dur(self) -> float:
        return self.end - self.start

    @property
    def group(self) -> str | None:
        g = self.args.get("group")
        return g if isinstance(g, str) and g else None

    @property
    def kind(self) -> str:
        """What the bar means: ``wait``, ``forward``, or the track (``compute``, ``disk``, ``h2d``, ...)."""
        if self.track == "compute" and self.name.startswith("wait"):
            return "wait"
        if self.track == "compute" and self.name == "forward":
            return "forward"
        return self.track


class Pass(NamedTuple):
    index: int
    tokens: int
    start: float
    end: float

    @property
    def decode(self) -> bool:
        return self.tokens == 1


def _num(x, default=None):
    """A finite float from a JSON value, else ``default`` (bools are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return default
    x = float(x)
    return x if math.isfinite(x) else default


def _int(x, default=None):
    v = _num(x)
    return int(v) if v is not None else default


def parse_events(data: dict) -> tuple[list[Span], list[tuple[float, dict]]]:
    """Complete events (sorted by start) and ``occupancy`` counter samples ``(t, {tier: bytes})``.

    Events the report cannot use (not objects, no numeric timestamp) are skipped rather than fatal.
    """
    raw = [e for e in data.get("traceEvents", []) if isinstance(e, dict)]
    tracks = {}
    for e in raw:
        if e.get("ph") == "M" and e.get("name") == "thread_name" and isinstance(e.get("args"), dict):
            tracks[(e.get("pid"), e.get("tid"))] = str(e["args"].get("name", e.get("tid")))
    events, occupancy = [], []
    for e in raw:
        ph = e.get("ph")
        ts = _num(e.get("ts"))
        if ts is None:
            continue
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        if ph == "X":
            dur = max(0.0, _num(e.get("dur"), 0.0))
            cat = e.get("cat") if isinstance(e.get("cat"), str) else None
            track = tracks.get((e.get("pid"), e.get("tid"))) or cat or f"tid {e.get('tid')}"
            events.append(Span(track, str(e.get("name", "")), ts / 1e6, (ts + dur) / 1e6, args))
        elif ph == "C" and e.get("name") == "occupancy":
            vals = {k: v for k, v in ((k, _num(v)) for k, v in args.items()) if v is not None}
            if vals:
                occupancy.append((ts / 1e6, vals))
    events.sort(key=lambda s: (s.start, s.end))
    occupancy.sort(key=lambda r: r[0])
    return events, occupancy


def forward_passes(events: list[Span]) -> list[Pass]:
    """The ``forward`` events as passes, in time order (a missing pass number becomes its position)."""
    fw = [s for s in events if s.kind == "forward"]
    return [Pass(_int(s.args.get("pass"), i), _int(s.args.get("tokens"), 0), s.start, s.end)
            for i, s in enumerate(fw)]


def decode_runs(passes: list[Pass]) -> list[tuple[float, float]]:
    """Wall-time windows of the decode phase: one per run of consecutive decode passes (first start to last
    end, so time between steps — sampling, detokenising — counts; prefill and idle time between turns don't)."""
    runs: list[list[float]] = []
    prev_decode = False
    for p in passes:
        if p.decode:
            if prev_decode:
                runs[-1][1] = max(runs[-1][1], p.end)
            else:
                runs.append([p.start, p.end])
        prev_decode = p.decode
    return merge((a, b) for a, b in runs)


def pass_windows(passes: list[Pass]) -> list[tuple[float, float, Pass]]:
    """Each pass's attribution window ``[start, next pass's start)`` (the last ends at its own end).

    Reads and copies carry no pass number (the prefetcher runs ahead of compute); one is counted in the
    pass during which it started, so a window holds the prefetches that pass issued. Over several decode
    passes the mean per pass is the steady-state load per token.
    """
    out = []
    for i, p in enumerate(passes):
        end = passes[i + 1].start if i + 1 < len(passes) else p.end
        out.append((p.start, max(end, p.start), p))
    return out


# ---------------------------------------------------------------------------------------- per group
@dataclass
class GroupRow:
    """One weight group; times in seconds and bytes are means per decode pass."""

    group: str
    tier: str = "-"
    disk_bytes: float = 0.0
    h2d_bytes: float = 0.0
    disk_s: float = 0.0
    h2d_s: float = 0.0
    compute_s: float = 0.0
    wait_s: float = 0.0
    startup_bytes: int = 0  # read before the first forward pass (resident weights, first prefetches)

    @property
    def load_s(self) -> float:
        return self.disk_s + self.h2d_s

    @property
    def bytes(self) -> float:
        return self.disk_bytes + self.h2d_bytes


def group_order(name: str):
    """embed, layer.0 … layer.N (numerically), head, then anything else by name."""
    m = re.fullmatch(r"layer\.(\d+)", name)
    if m:
        return (1, int(m.group(1)), "")
    if name == "embed":
        return (0, 0, "")
    if name == "head":
        return (2, 0, "")
    return (3, 0, name)


def group_rows(events: list[Span], passes: list[Pass], tiers: dict | None = None) -> list[GroupRow]:
    """Mean per decode pass, for each group, of disk/h2d time and bytes, compute time and wait time.

    Compute and wait events are assigned by their ``pass`` argument (by time if it is missing); reads and
    copies by the pass window they started in (:func:`pass_windows`). With no decode pass in the trace the
    whole trace counts as one pass, so a prefill-only profile still shows its split.
    """
    tiers = tiers if isinstance(tiers, dict) else {}
    decode = {p.index for p in passes if p.decode}
    n = len(decode) or 1
    windows = pass_windows(passes)
    starts = [w[0] for w in windows]
    first = passes[0].start if passes else math.inf

    def pass_at(t: float) -> Pass | None:
        i = bisect.bisect_right(starts, t) - 1
        if i < 0 or t >= windows[i][1] and i + 1 == len(windows):
            return None
        return windows[i][2]

    def counts(pass_index: int | None, t: float) -> bool:
        if not decode:
            return True
        if pass_index is None:
            p = pass_at(t)
            pass_index = p.index if p else None
        return pass_index in decode

    rows: dict[str, GroupRow] = {}

    def row(g: str) -> GroupRow:
        if g not in rows:
            tier = tiers.get(g)
            rows[g] = GroupRow(g, tier if isinstance(tier, str) else "-")
        return rows[g]

    for s in events:
        g = s.group
        if g is None or s.kind == "forward":
            continue
        if s.track == "compute":
            if not counts(_int(s.args.get("pass")), s.start):
                continue
            r = row(g)
            if s.kind == "wait":
                r.wait_s += s.dur / n
            else:
                r.compute_s += s.dur / n
        elif s.track in LINKS:
            nbytes = max(0, _int(s.args.get("bytes"), 0))
            r = row(g)
            if s.start < first:
                r.startup_bytes += nbytes
                continue
            if decode:
                p = pass_at(s.start)
                if p is None or p.index not in decode:
                    continue
            if s.track == "disk":
                r.disk_s += s.dur / n
                r.disk_bytes += nbytes / n
            else:
                r.h2d_s += s.dur / n
                r.h2d_bytes += nbytes / n
    for g in tiers:  # groups that never showed up (e.g. resident and loaded untraced) still get a row
        if isinstance(g, str):
            row(g)
    return sorted(rows.values(), key=lambda r: group_order(r.group))


# ---------------------------------------------------------------------------------------- links
@dataclass
class LinkStats:
    """One link (``disk``: store -> host, ``h2d``: host -> device) over the whole trace and the decode phase."""

    name: str
    bytes: int  # whole trace
    busy_s: float  # union of the track's intervals, whole trace
    overlap_s: float  # busy time during which compute (not waiting) ran
    peak: float | None  # measured peak bytes/s from otherData.peaks
    decode_bytes: float = 0.0  # bytes moved inside the decode phase (pro rata for events straddling its edges)
    decode_busy_s: float = 0.0
    decode_wall_s: float = 0.0  # wall time of the decode phase
    decode_overlap_s: float = 0.0

    @property
    def busy_gbps(self) -> float:
        """Bytes ÷ busy time: what the link delivers while it is in use."""
        return self.bytes / self.busy_s / 1e9 if self.busy_s > 0 else 0.0

    @property
    def decode_busy_gbps(self) -> float:
        return self.decode_bytes / self.decode_busy_s / 1e9 if self.decode_busy_s > 0 else 0.0

    @property
    def decode_wall_gbps(self) -> float:
        """Decode-phase bytes ÷ decode-phase wall time: the sustained rate per token."""
        return self.decode_bytes / self.decode_wall_s / 1e9 if self.decode_wall_s > 0 else 0.0

    @property
    def overlap(self) -> float:
        """Fraction of busy time that overlapped compute."""
        return self.overlap_s / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def decode_overlap(self) -> float:
        return self.decode_overlap_s / self.decode_busy_s if self.decode_busy_s > 0 else 0.0

    @property
    def busy_vs_peak(self) -> float | None:
        return self.busy_gbps * 1e9 / self.peak if self.peak else None

    @property
    def decode_busy_of_wall(self) -> float:
        """Fraction of the decode phase during which the link was busy."""
        return self.decode_busy_s / self.decode_wall_s if self.decode_wall_s > 0 else 0.0


def compute_spans(events: list[Span]) -> list[tuple[float, float]]:
    """When compute actually ran: compute-track events other than ``forward`` and ``wait``."""
    return [(s.start, s.end) for s in events if s.track == "compute" and s.kind == "compute"]


def link_stats(events: list[Span], track: str, peak=None, decode_windows=(), computes=None) -> LinkStats | None:
    """Achieved bandwidth of one link track; ``None`` when the trace has no event on it."""
    spans = [s for s in events if s.track == track]
    if not spans:
        return None
    computes = compute_spans(events) if computes is None else computes
    windows = merge(decode_windows)
    iv = [(s.start, s.end) for s in spans]
    busy = merge(iv)
    busy_s = sum(b - a for a, b in busy)
    st = LinkStats(track, sum(max(0, _int(s.args.get("bytes"), 0)) for s in spans), busy_s,
                   intersect_length(busy, computes), _num(peak) if _num(peak) and _num(peak) > 0 else None)
    if windows:
        for s in spans:
            nbytes = max(0, _int(s.args.get("bytes"), 0))
            if s.dur > 0:
                st.decode_bytes += nbytes * clip((s.start, s.end), windows) / s.dur
            elif clip((s.start - 1e-12, s.start + 1e-12), windows) > 0:
                st.decode_bytes += nbytes
        dbusy = intersect(busy, windows)
        st.decode_busy_s = sum(b - a for a, b in dbusy)
        st.decode_wall_s = sum(b - a for a, b in windows)
        st.decode_overlap_s = intersect_length(dbusy, computes)
    return st


# ---------------------------------------------------------------------------------------- everything
@dataclass
class Analysis:
    meta: dict
    events: list[Span]
    passes: list[Pass]
    occupancy: list = field(default_factory=list)  # (t, {tier: bytes})
    groups: list[GroupRow] = field(default_factory=list)
    links: list[LinkStats] = field(default_factory=list)
    decode_windows: list = field(default_factory=list)

    @property
    def t0(self) -> float:
        """Time origin of the plots: the first event or counter sample."""
        ts = [self.events[0].start] if self.events else []
        if self.occupancy:
            ts.append(self.occupancy[0][0])
        return min(ts) if ts else 0.0

    @property
    def t_end(self) -> float:
        ts = [max(s.end for s in self.events)] if self.events else []
        if self.occupancy:
            ts.append(self.occupancy[-1][0])
        return max(ts) if ts else 0.0

    @property
    def decode_passes(self) -> list[Pass]:
        return [p for p in self.passes if p.decode]

    @property
    def prefill_passes(self) -> list[Pass]:
        return [p for p in self.passes if p.tokens > 1]

    @property
    def decode_wall_s(self) -> float:
        return sum(b - a for a, b in self.decode_windows)

    @property
    def decode_tok_s(self) -> float:
        """Decode tokens ÷ decode-phase wall time (what a user sees while tokens stream)."""
        return len(self.decode_passes) / self.decode_wall_s if self.decode_wall_s > 0 else 0.0

    @property
    def decode_forward_tok_s(self) -> float:
        """Decode tokens ÷ time inside decode forward passes (excludes sampling between steps)."""
        t = sum(p.end - p.start for p in self.decode_passes)
        return len(self.decode_passes) / t if t > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        pre = self.prefill_passes
        t = sum(p.end - p.start for p in pre)
        return sum(p.tokens for p in pre) / t if t > 0 else 0.0

    @property
    def decode_wait_fraction(self) -> float:
        """Share of decode forward time that compute spent waiting for weights."""
        dec = {p.index for p in self.decode_passes}
        t = sum(p.end - p.start for p in self.decode_passes)
        w = sum(s.dur for s in self.events if s.kind == "wait" and _int(s.args.get("pass")) in dec)
        return w / t if t > 0 else 0.0

    @property
    def predicted_tok_s(self) -> float | None:
        v = _num(self.meta.get("predicted_tok_s"))
        return v if v and v > 0 else None

    def meta_dict(self, key: str) -> dict:
        v = self.meta.get(key)
        return v if isinstance(v, dict) else {}


def analyse(data: dict) -> Analysis:
    """The report's numbers from a trace dict (as :func:`load_trace` returns)."""
    events, occupancy = parse_events(data)
    meta = data.get("otherData") if isinstance(data.get("otherData"), dict) else {}
    passes = forward_passes(events)
    an = Analysis(meta=meta, events=events, passes=passes, occupancy=occupancy, decode_windows=decode_runs(passes))
    an.groups = group_rows(events, passes, an.meta_dict("tiers"))
    peaks = an.meta_dict("peaks")
    computes = compute_spans(events)
    an.links = [st for st in (link_stats(events, link, peaks.get(link), an.decode_windows, computes)
                              for link in LINKS) if st is not None]
    return an
