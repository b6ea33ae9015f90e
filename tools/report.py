"""The profiling report: ``python -m tools.report TRACE.json -o report.html [--png report.png]``.

Reads a Chrome trace written by ``offload-run --profile`` and renders a self-contained
HTML page (plots embedded) plus a PNG: the timeline per track, the per-layer split of
load / compute / wait, achieved GB/s per link against the measured peak, and tier
occupancy over time. Analysis lives in :mod:`tools.report_analysis` (pure, tested).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from pathlib import Path

from tools.report_analysis import Analysis, TraceError, analyse, load_trace

COLORS = {"compute": "#4c78a8", "wait": "#e45756", "disk": "#f58518", "h2d": "#54a24b", "cpu_attn": "#b279a2"}
TRACK_ORDER = ["compute", "disk", "h2d", "cpu_attn"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def figure(an: Analysis):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(13, 15), gridspec_kw={"height_ratios": [1.2, 1.2, 1.4, 1]})
    t0 = an.passes[0][2] if an.passes else (an.events[0][2] if an.events else 0.0)
    tracks = [t for t in TRACK_ORDER if any(e[0] == t for e in an.events)]

    def timeline(ax, lo=None, hi=None, title=""):
        for y, track in enumerate(tracks):
            bars = {}
            for tr, name, s, t, a in an.events:
                if tr != track or name == "forward":
                    continue
                if lo is not None and (t < lo or s > hi):
                    continue
                kind = "wait" if name.startswith("wait") else track
                bars.setdefault(kind, []).append((s - t0, max(t - s, 1e-6)))
            for kind, spans in bars.items():
                ax.broken_barh(spans, (y - 0.38, 0.76), facecolors=COLORS.get(kind, "#999999"), label=kind)
        ax.set_yticks(range(len(tracks)), tracks)
        ax.set_xlabel("seconds")
        ax.set_title(title)
        if lo is not None:
            ax.set_xlim(lo - t0, hi - t0)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), loc="upper right", fontsize=8)

    timeline(axes[0], title="timeline: whole run")
    decode = [p for p in an.passes if p[1] == 1]
    if decode:
        last = decode[-2:] if len(decode) > 1 else decode
        timeline(axes[1], last[0][2], last[-1][3], title=f"timeline: last {len(last)} decode pass(es)")
    else:
        axes[1].set_axis_off()

    ax = axes[2]
    rows = an.groups
    x = range(len(rows))
    load = [r.load_s * 1e3 for r in rows]
    comp = [r.compute_s * 1e3 for r in rows]
    wait = [r.wait_s * 1e3 for r in rows]
    ax.bar([i - 0.27 for i in x], load, 0.27, color=COLORS["disk"], label="load (disk+h2d)")
    ax.bar(list(x), comp, 0.27, color=COLORS["compute"], label="compute")
    ax.bar([i + 0.27 for i in x], wait, 0.27, color=COLORS["wait"], label="wait")
    ax.set_xticks(list(x), [r.group.replace("layer.", "L") for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("ms per decode pass")
    ax.set_title("per group: load / compute / wait (mean over decode passes)")
    ax.legend(fontsize=8)

    ax = axes[3]
    if an.occupancy:
        ts = [t - t0 for t, _ in an.occupancy]
        for tier, color in (("device", "#54a24b"), ("host", "#4c78a8"), ("disk", "#f58518")):
            ys = [v.get(tier, 0) / 2**20 for _, v in an.occupancy]
            if any(ys):
                ax.step(ts, ys, where="post", label=tier, color=color)
        ax.set_ylabel("MiB")
        ax.set_xlabel("seconds")
        ax.set_title("tier occupancy (bytes reserved per tier)")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def render_html(an: Analysis, png: bytes, source: Path) -> str:
    m = an.meta
    esc = html.escape
    link_rows = []
    for l in an.links:
        peak = f"{l.peak / 1e9:.2f}" if l.peak else "—"
        frac = f"{100 * l.busy_gbps * 1e9 / l.peak:.0f}%" if l.peak else "—"
        link_rows.append(f"<tr><td>{esc(l.name)}</td><td>{_fmt_bytes(l.bytes)}</td><td>{l.busy_s:.3f}</td>"
                         f"<td>{l.busy_gbps:.2f}</td><td>{l.wall_gbps:.2f}</td><td>{peak}</td><td>{frac}</td>"
                         f"<td>{100 * l.overlap_with_compute:.0f}%</td></tr>")
    group_rows = [f"<tr><td>{esc(r.group)}</td><td>{esc(r.tier)}</td><td>{_fmt_bytes(r.bytes)}</td>"
                  f"<td>{r.load_s * 1e3:.2f}</td><td>{r.compute_s * 1e3:.2f}</td><td>{r.wait_s * 1e3:.2f}</td></tr>"
                  for r in an.groups]
    placement = m.get("placement") or {}
    place = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in placement.items())
    predicted = m.get("predicted_tok_s")
    summary = [
        ("model", m.get("model", "—")), ("device", m.get("device", "—")),
        ("forward passes", len(an.passes)), ("decode passes", sum(1 for p in an.passes if p[1] == 1)),
        ("decode tok/s (achieved)", f"{an.decode_tok_s:.3f}"),
        ("decode tok/s (predicted by the plan)", f"{predicted:.3f}" if predicted else "—"),
        ("prefill tok/s", f"{an.prefill_tok_s:.2f}" if an.prefill_tok_s else "—"),
        ("placement", place or "—"), ("prefetch depth", m.get("prefetch_depth", "—")),
    ]
    img = base64.b64encode(png).decode()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>offload_rt report — {esc(str(m.get('model', source.name)))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>offload_rt profile: {esc(str(m.get('model', source.name)))}</h1>
<p>trace: {esc(str(source))}</p>
<h2>Summary</h2><table>{''.join(f'<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>' for k, v in summary)}</table>
<h2>Links</h2><table><tr><th>link</th><th>bytes</th><th>busy s</th><th>GB/s while busy</th><th>GB/s over the run</th>
<th>measured peak GB/s</th><th>busy GB/s vs peak</th><th>busy time overlapping compute</th></tr>{''.join(link_rows)}</table>
<h2>Per group (mean per decode pass)</h2><table><tr><th>group</th><th>tier</th><th>bytes moved</th><th>load ms</th>
<th>compute ms</th><th>wait ms</th></tr>{''.join(group_rows)}</table>
<h2>Plots</h2><img alt="timeline, per-group split and occupancy" src="data:image/png;base64,{img}">
</body></html>
"""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None, help="HTML report (default: TRACE.html)")
    p.add_argument("--png", type=Path, default=None, help="PNG of the plots (default: the HTML path with .png)")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    out = a.output or a.trace.with_suffix(".html")
    png_path = a.png or out.with_suffix(".png")
    try:
        an = analyse(load_trace(a.trace))
        if not an.events:
            raise TraceError(f"{a.trace} holds no events; profile a run that generates tokens")
        fig = figure(an)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        png = buf.getvalue()
        _atomic_write(png_path, png)
        _atomic_write(out, render_html(an, png, a.trace).encode())
    except TraceError as e:
        if a.debug:
            raise
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if a.debug:
            raise
        print(f"report: error: cannot write the report: {e.strerror or e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
