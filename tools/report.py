"""The profiling report: ``python -m tools.report TRACE.json -o report.html [--png report.png]``.

Reads a Chrome trace written by ``offload-run --profile TRACE.json`` and writes a self-contained HTML
page (plots embedded as PNG data URIs, plain CSS) plus one PNG with all the plots stacked:

1. the timeline per track (compute / wait / disk read / h2d), with a zoom on the last decode passes;
2. per weight group, the mean per decode pass of load (disk + h2d), compute and wait time, its tier and bytes;
3. achieved GB/s per link (while busy, and over the decode phase's wall time) against the measured peak,
   and how much of the link's busy time overlapped compute;
4. tier occupancy over time and the planned placement per tier;
5. a summary: passes, decode tok/s achieved against the plan's prediction.

The numbers come from :mod:`tools.report_analysis` (pure, unit-tested); this module only draws and writes.
Errors a user can cause (missing file, not JSON, no events, unwritable output) print one line on stderr
and exit with status 2. Outputs are written atomically (temporary file + rename).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from pathlib import Path

from tools.report_analysis import Analysis, TraceError, analyse, bin_coverage, load_trace

COLORS = {"compute": "#4c78a8", "wait": "#e45756", "disk": "#f58518", "h2d": "#54a24b", "cpu_attn": "#b279a2"}
KIND_LABELS = {"compute": "compute", "wait": "wait for weights", "disk": "disk read", "h2d": "h2d copy",
               "cpu_attn": "CPU attention"}
TIER_COLORS = {"device": "#54a24b", "host": "#4c78a8", "disk": "#f58518", "buffers": "#9d755d"}
TRACK_ORDER = ["compute", "disk", "h2d", "cpu_attn"]
OTHER = "#9d9d9d"
DENSE_EVENTS = 3000  # above this many events a timeline panel is drawn binned
WIDTH_IN, DPI = 12.0, 100  # every figure has the same width so they stack into one PNG


# ---------------------------------------------------------------------------------------- formatting
def fmt_bytes(n) -> str:
    """Decimal units, like GB/s: 2e9 -> '2.00 GB'."""
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _short(group: str) -> str:
    return group.replace("layer.", "L")


# ---------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _plt().close(fig)
    return buf.getvalue()


def _tracks(an: Analysis) -> list[str]:
    present = {s.track for s in an.events if s.kind != "forward"}
    return [t for t in TRACK_ORDER if t in present] + sorted(present - set(TRACK_ORDER))


def _draw_timeline(ax, an: Analysis, tracks: list[str], lo: float, hi: float, title: str, label_groups: bool):
    from matplotlib.patches import Patch

    t0 = an.t0
    min_w = (hi - lo) / 1500  # keep sub-pixel events visible
    passes = [p for p in an.passes if p.end >= lo and p.start <= hi]
    if len(passes) <= 300:
        for i, p in enumerate(passes):
            color = "#fff4d6" if not p.decode else ("#eeeeee" if p.index % 2 else "#f8f8f8")
            ax.axvspan(p.start - t0, p.end - t0, color=color, zorder=0, lw=0)
            if label_groups and min(p.end, hi) - max(p.start, lo) > (hi - lo) * 0.12:
                ax.text((max(p.start, lo) + min(p.end, hi)) / 2 - t0, 0.985,
                        f"pass {p.index} ({'decode' if p.decode else f'prefill, {p.tokens} tok'})",
                        ha="center", va="top", fontsize=8, color="#555555", transform=ax.get_xaxis_transform())
    kinds = []
    visible = [s for s in an.events if s.kind != "forward" and s.end >= lo and s.start <= hi]
    dense = len(visible) > DENSE_EVENTS
    nbins = 600
    for y, track in enumerate(tracks):
        bars: dict[str, list] = {}
        for s in visible:
            if s.track == track:
                bars.setdefault(s.kind, []).append((s.start, s.end))
        if dense:  # too many events to see one by one: per bin, the share of time of each kind, stacked
            width = (hi - lo) / nbins
            xs = [lo - t0 + (i + 0.5) * width for i in range(nbins)]
            bottom = [y + 0.38] * nbins
            for kind, spans in bars.items():
                frac = bin_coverage(spans, lo, hi, nbins)
                ax.bar(xs, [-0.76 * f for f in frac], width, bottom=bottom, color=COLORS.get(kind, OTHER), lw=0,
                       zorder=2)
                bottom = [b - 0.76 * f for b, f in zip(bottom, frac)]
        else:
            for kind, spans in bars.items():
                ax.broken_barh([(a - t0, max(b - a, min_w)) for a, b in spans], (y - 0.38, 0.76),
                               facecolors=COLORS.get(kind, OTHER), lw=0, zorder=2)
        for kind in bars:
            if kind not in kinds:
                kinds.append(kind)
    order = list(COLORS)
    kinds.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    if label_groups:
        labelled = [s for s in visible if s.group and s.kind in ("compute", "disk", "h2d")]
        if len(labelled) <= 150:
            for s in labelled:
                if s.dur > (hi - lo) / 60:
                    ax.text((s.start + s.end) / 2 - t0, tracks.index(s.track), _short(s.group), ha="center",
                            va="center", fontsize=6.5, color="white", zorder=3, clip_on=True)
    ax.set_yticks(range(len(tracks)), tracks)
    ax.set_ylim(len(tracks) - 0.4, -0.6 - (0.45 if label_groups else 0))  # first track on top, room for labels
    ax.set_xlim(lo - t0, hi - t0)
    ax.set_xlabel("seconds since the trace started" + (
        f"   ({len(visible)} events, binned: bar height = share of each bin's time)" if dense else ""))
    ax.set_title(title, loc="left", fontsize=10)
    handles = [Patch(color=COLORS.get(k, OTHER), label=KIND_LABELS.get(k, k)) for k in kinds]
    if any(not p.decode for p in passes) and len(passes) <= 300:
        handles.append(Patch(color="#fff4d6", label="prefill pass"))
    if handles:
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(handles), fontsize=8,
                  frameon=False, borderaxespad=0.2)


def figure_timeline(an: Analysis):
    tracks = _tracks(an)
    if not tracks:
        return None
    decode = an.decode_passes
    zoom = decode[-2:] if len(an.passes) > 3 and decode else []
    h_row = 0.55
    heights = [1.2 + h_row * len(tracks)] + ([1.5 + h_row * len(tracks)] if zoom else [])
    plt = _plt()
    fig, axes = plt.subplots(len(heights), 1, figsize=(WIDTH_IN, sum(heights) + 0.4),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    _draw_timeline(axes[0][0], an, tracks, an.t0, an.t_end,
                   f"Timeline: whole run ({len(an.passes)} forward passes)", label_groups=False)
    if zoom:
        lo, hi = zoom[0].start, zoom[-1].end
        pad = (hi - lo) * 0.01
        _draw_timeline(axes[1][0], an, tracks, lo - pad, hi + pad,
                       f"Zoom: last {len(zoom)} decode pass{'es' if len(zoom) > 1 else ''}", label_groups=True)
    fig.tight_layout()
    return fig


def figure_groups(an: Analysis):
    rows = an.groups
    if not rows:
        return None
    plt = _plt()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.8))
    x = list(range(len(rows)))
    w = 0.27
    ax.bar([i - w for i in x], [r.load_s * 1e3 for r in rows], w, color=COLORS["disk"], label="load (disk + h2d)")
    ax.bar(x, [r.compute_s * 1e3 for r in rows], w, color=COLORS["compute"], label="compute")
    ax.bar([i + w for i in x], [r.wait_s * 1e3 for r in rows], w, color=COLORS["wait"], label="wait for weights")
    ax.set_xticks(x, [_short(r.group) for r in rows], rotation=90 if len(rows) > 24 else 0,
                  fontsize=7 if len(rows) > 24 else 8)
    tiers_seen = []
    for tick, r in zip(ax.get_xticklabels(), rows):
        tick.set_color(TIER_COLORS.get(r.tier, "#333333"))
        if r.tier in TIER_COLORS and r.tier not in tiers_seen:
            tiers_seen.append(r.tier)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("ms per decode pass" if an.decode_passes else "ms (whole trace)")
    ax.set_title("Per group: load / compute / wait, mean over decode passes (label colour = tier)"
                 if an.decode_passes else "Per group: load / compute / wait over the whole trace (no decode pass)",
                 loc="left", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    leg = ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=3)
    if tiers_seen:
        ax.add_artist(leg)
        ax.legend(handles=[Patch(color=TIER_COLORS[t], label=f"tier {t}") for t in tiers_seen], loc="upper right",
                  fontsize=8, frameon=False, ncol=len(tiers_seen))
    ax.margins(y=0.18)
    fig.tight_layout()
    return fig


def figure_links(an: Analysis):
    if not an.links:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.0 + 0.9 * len(an.links)))
    # like with like: with a decode phase both bars describe it; otherwise the whole trace
    decode = any(l.decode_wall_s for l in an.links)
    series = [("while busy (decode)" if decode else "while busy",
               (lambda l: l.decode_busy_gbps) if decode else (lambda l: l.busy_gbps), "#4c78a8"),
              ("over decode wall time", lambda l: l.decode_wall_gbps, "#72b7b2"),
              ("measured peak", lambda l: (l.peak or 0) / 1e9, "#bab0ac")]
    h = 0.8 / len(series)
    for j, (label, fn, color) in enumerate(series):
        ys = [i + (j - 1) * h for i in range(len(an.links))]
        vals = [fn(l) for l in an.links]
        ax.barh(ys, vals, h, color=color, label=label)
        for y, v in zip(ys, vals):
            if v > 0:
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(an.links)), [l.name for l in an.links])
    ax.invert_yaxis()
    ax.set_xlabel("GB/s")
    ax.margins(x=0.12)
    ax.set_title("Achieved bandwidth per link", loc="left", fontsize=10)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False, borderaxespad=0.2)
    fig.tight_layout()
    return fig


def figure_occupancy(an: Analysis):
    placement = {k: v for k, v in an.meta_dict("placement").items() if isinstance(v, (int, float)) and v > 0}
    if not an.occupancy and not placement:
        return None
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.2), gridspec_kw={"width_ratios": [4, 1]})
    if an.occupancy:
        t0, t_end = an.t0, an.t_end
        ts = [t - t0 for t, _ in an.occupancy] + [t_end - t0]
        used = {k for _, v in an.occupancy for k, x in v.items() if x}  # all-zero series would hide the axis
        tiers = [t for t in TIER_COLORS if t in used] + sorted(used - set(TIER_COLORS))
        for tier in tiers:
            ys = [v.get(tier, 0) / 1e9 for _, v in an.occupancy]
            ax.step(ts, ys + ys[-1:], where="post", label=tier, color=TIER_COLORS.get(tier, OTHER), lw=1.6)
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, max(t_end - t0, 1e-9))
        ax.margins(y=0.15)
        ax.set_ylabel("GB")
        ax.set_xlabel("seconds since the trace started")
        if tiers:
            ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(tiers), fontsize=8, frameon=False,
                      borderaxespad=0.2)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no occupancy counters in the trace", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("Tier occupancy over time (bytes reserved)", loc="left", fontsize=10)
    if placement:
        names = list(placement)
        bx.bar(names, [placement[k] / 1e9 for k in names], color=[TIER_COLORS.get(k, OTHER) for k in names])
        for i, k in enumerate(names):
            bx.text(i, placement[k] / 1e9, fmt_bytes(placement[k]), ha="center", va="bottom", fontsize=7)
        bx.margins(y=0.2)
        bx.set_ylabel("GB")
        bx.set_title("Placement (weights)", loc="left", fontsize=10)
    else:
        bx.set_axis_off()
    fig.tight_layout()
    return fig


def render_figures(an: Analysis) -> dict[str, bytes]:
    """The report's plots as PNG bytes, by section name (sections with nothing to draw are left out)."""
    out = {}
    for name, make in (("timeline", figure_timeline), ("groups", figure_groups), ("links", figure_links),
                       ("occupancy", figure_occupancy)):
        fig = make(an)
        if fig is not None:
            out[name] = _png(fig)
    return out


def stack_pngs(pngs: list[bytes]) -> bytes:
    """One PNG with the given images one under another (white padding where narrower)."""
    import numpy as np

    plt = _plt()
    if not pngs:  # nothing to draw (e.g. only forward events): still a valid PNG
        fig = plt.figure(figsize=(WIDTH_IN, 1.0))
        fig.text(0.5, 0.5, "nothing to plot in this trace", ha="center", va="center")
        pngs = [_png(fig)]
    imgs = [plt.imread(io.BytesIO(p), format="png")[..., :3] for p in pngs]
    width = max(i.shape[1] for i in imgs)
    rows = [np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=1.0) for i in imgs]
    buf = io.BytesIO()
    plt.imsave(buf, np.concatenate(rows, axis=0), format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- HTML
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1240px;color:#222;
padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 9px;
text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}tr.total td{font-weight:600;
background:#fafafa}img{max-width:100%;display:block;margin:.5em 0}.note{color:#666;font-size:.85em;max-width:70em}"""


def _table(header: list[str] | None, rows: list[list], total: list | None = None) -> str:
    esc = html.escape
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    if total:
        out.append('<tr class="total">' + "".join(f"<td>{c}</td>" for c in total) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def summary_rows(an: Analysis, source: Path) -> list[tuple[str, str]]:
    m = an.meta
    dec, pre = an.decode_passes, an.prefill_passes
    predicted = an.predicted_tok_s
    placement = an.meta_dict("placement")
    budgets = {k: v for k, v in an.meta_dict("budgets").items() if isinstance(v, (int, float))}
    rows = [
        ("model", str(m.get("model", "—"))), ("device", str(m.get("device", "—"))), ("trace", str(source)),
        ("forward passes", f"{len(an.passes)} ({len(pre)} prefill, {len(dec)} decode)"),
        ("prefill tokens", str(sum(p.tokens for p in pre))),
        ("prefill tok/s", f"{an.prefill_tok_s:.2f}" if pre else "—"),
        ("decode tok/s (achieved)", f"{an.decode_tok_s:.3f}" if dec else "—"),
        ("decode tok/s (forward passes only)", f"{an.decode_forward_tok_s:.3f}" if dec else "—"),
        ("decode tok/s (predicted by the plan)", f"{predicted:.3f}" if predicted else "—"),
        ("achieved ÷ predicted", f"{100 * an.decode_tok_s / predicted:.0f}%" if predicted and dec else "—"),
        ("mean decode pass", f"{1e3 * sum(p.end - p.start for p in dec) / len(dec):.2f} ms" if dec else "—"),
        ("decode time compute waited for weights", _pct(an.decode_wait_fraction) if dec else "—"),
        ("placement", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in placement.items()
                                if isinstance(v, (int, float))) or "—"),
        ("budgets", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in budgets.items()) or "—"),
        ("prefetch depth", str(m.get("prefetch_depth", "—"))),
    ]
    return rows


def link_rows(an: Analysis) -> tuple[list[str], list[list[str]]]:
    """Metrics down, links across."""
    ls = an.links
    metrics = [
        ("bytes moved", lambda l: fmt_bytes(l.bytes)),
        ("busy s (union of intervals)", lambda l: f"{l.busy_s:.3f}"),
        ("GB/s while busy", lambda l: f"{l.busy_gbps:.2f}"),
        ("measured peak GB/s", lambda l: f"{l.peak / 1e9:.2f}" if l.peak else "—"),
        ("busy GB/s ÷ peak", lambda l: _pct(l.busy_vs_peak)),
        ("busy time overlapping compute", lambda l: _pct(l.overlap)),
        ("decode phase: bytes", lambda l: fmt_bytes(l.decode_bytes) if l.decode_wall_s else "—"),
        ("decode phase: wall s", lambda l: f"{l.decode_wall_s:.3f}" if l.decode_wall_s else "—"),
        ("decode phase: GB/s over wall time", lambda l: f"{l.decode_wall_gbps:.2f}" if l.decode_wall_s else "—"),
        ("decode phase: GB/s while busy", lambda l: f"{l.decode_busy_gbps:.2f}" if l.decode_busy_s else "—"),
        ("decode phase: link busy", lambda l: _pct(l.decode_busy_of_wall) if l.decode_wall_s else "—"),
        ("decode phase: busy time overlapping compute", lambda l: _pct(l.decode_overlap) if l.decode_busy_s else "—"),
    ]
    return ["metric"] + [l.name for l in ls], [[html.escape(name)] + [fn(l) for l in ls] for name, fn in metrics]


def group_table(an: Analysis) -> str:
    esc = html.escape
    rows = []
    for r in an.groups:
        rows.append([esc(r.group), esc(r.tier),
                     fmt_bytes(r.disk_bytes), fmt_bytes(r.h2d_bytes), _ms(r.disk_s), _ms(r.h2d_s), _ms(r.load_s),
                     _ms(r.compute_s), _ms(r.wait_s), fmt_bytes(r.startup_bytes)])
    g = an.groups
    total = ["total", "", fmt_bytes(sum(r.disk_bytes for r in g)), fmt_bytes(sum(r.h2d_bytes for r in g)),
             _ms(sum(r.disk_s for r in g)), _ms(sum(r.h2d_s for r in g)), _ms(sum(r.load_s for r in g)),
             _ms(sum(r.compute_s for r in g)), _ms(sum(r.wait_s for r in g)),
             fmt_bytes(sum(r.startup_bytes for r in g))]
    header = ["group", "tier", "disk bytes/pass", "h2d bytes/pass", "disk ms", "h2d ms", "load ms (disk+h2d)",
              "compute ms", "wait ms", "read before pass 0"]
    return _table(header, rows, total if g else None)


def render_html(an: Analysis, figs: dict[str, bytes], source: Path) -> str:
    esc = html.escape
    title = str(an.meta.get("model") or source.name)
    per = "mean per decode pass" if an.decode_passes else "whole trace (it has no decode pass)"
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>offload_rt report — {esc(title)}</title>'
        f"<style>{CSS}</style></head><body>",
        f"<h1>offload_rt profile: {esc(title)}</h1>",
        "<h2>Summary</h2>", _table(None, [[esc(k), esc(v)] for k, v in summary_rows(an, source)]),
        "<h2>Links</h2>",
    ]
    if an.links:
        header, rows = link_rows(an)
        parts += [_table(header, rows), _img(figs.get("links"), "achieved bandwidth per link"),
                  '<p class="note">Busy time is the union of the track\'s intervals (parallel reads count once). '
                  "The decode phase runs from the first to the last decode pass of each run of consecutive decode "
                  "passes; bytes of events straddling its edges count pro rata. Overlap: share of the link's busy "
                  "time during which compute ran (waits excluded).</p>"]
    else:
        parts.append("<p>No disk or h2d events in the trace (everything resident?).</p>")
    parts += ["<h2>Timeline</h2>", _img(figs.get("timeline"), "timeline per track") or "<p>No events to draw.</p>"]
    parts += [f"<h2>Per group ({esc(per)})</h2>", group_table(an), _img(figs.get("groups"), "per-group split"),
              '<p class="note">Compute and wait are assigned to passes by their pass number. Reads and copies '
              "carry none (the prefetcher runs ahead), so each counts in the pass during which it started; the "
              "mean over decode passes is the steady-state load per token. Groups resident in a tier are read "
              "once before the first pass (last column).</p>"]
    parts += ["<h2>Tier occupancy</h2>",
              _img(figs.get("occupancy"), "tier occupancy over time") or "<p>No occupancy counters in the trace.</p>"]
    placement = {k: v for k, v in an.meta_dict("placement").items() if isinstance(v, (int, float))}
    if placement:
        parts.append(_table(["tier", "placed weights"], [[esc(k), fmt_bytes(v)] for k, v in placement.items()]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------- CLI
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def build(trace: Path, out: Path, png_path: Path) -> Analysis:
    """Analyse ``trace`` and write the HTML report and the stacked PNG; raises TraceError / OSError."""
    an = analyse(load_trace(trace))
    if not an.events:
        raise TraceError(f"{trace} holds no complete events; profile a run that generates tokens")
    figs = render_figures(an)
    png = stack_pngs(list(figs.values()))
    doc = render_html(an, figs, trace).encode()
    _atomic_write(png_path, png)
    _atomic_write(out, doc)
    return an


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path, help="Chrome trace JSON written by offload-run --profile")
    p.add_argument("-o", "--output", type=Path, default=None, help="HTML report (default: TRACE with .html)")
    p.add_argument("--png", type=Path, default=None, help="PNG of all plots (default: the HTML path with .png)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    a = p.parse_args(argv)
    out = a.output or a.trace.with_suffix(".html")
    png_path = a.png or out.with_suffix(".png")
    try:
        if a.trace.resolve() in (out.resolve(), png_path.resolve()):
            raise TraceError(f"the output would overwrite the trace {a.trace}; pick another -o / --png")
        build(a.trace, out, png_path)
    except TraceError as e:
        if a.debug:
            raise
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if a.debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"report: error: cannot write the report{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
