"""The profiling report (tools.report): pure analysis against hand-built traces with known numbers,
the rendered HTML/PNG through the CLI, and the CLI's one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload_rt.trace import Tracer
from tools.report_analysis import (Pass, analyse, bin_coverage, clip, decode_runs, forward_passes, group_rows,
                                   intersect_length, link_stats, merge, parse_events, union_length)

ROOT = Path(__file__).resolve().parents[1]
S = 1e6  # microseconds per second
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_report(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.report", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------------------- intervals
def test_interval_union():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4  # overlap counted once
    assert union_length([(0, 10), (2, 3), (4, 5)]) == 10  # nested
    assert union_length([(0, 1), (1, 2)]) == 2  # touching
    assert union_length([(3, 3), (5, 4)]) == 0  # empty and reversed intervals add nothing
    assert union_length([]) == 0
    assert merge([(5, 6), (0, 2), (1, 3)]) == [(0, 3), (5, 6)]


def test_interval_intersection_and_clip():
    assert intersect_length([(0, 4)], [(1, 2), (3, 6)]) == 2
    assert intersect_length([(0, 1), (0.5, 2)], [(0, 2)]) == 2  # overlapping inputs are merged first
    assert intersect_length([(0, 1)], []) == 0
    assert clip((1, 5), [(0, 2), (4, 10)]) == 2
    assert clip((3, 4), [(0, 2), (5, 6)]) == 0


def test_bin_coverage():
    # bins [0,1) [1,2) [2,3) [3,4); overlapping spans are merged before they are counted
    assert bin_coverage([(0.5, 2.0), (1.0, 1.5), (3.25, 3.5)], 0, 4, 4) == pytest.approx([0.5, 1.0, 0.0, 0.25])
    assert bin_coverage([(-5, 10)], 0, 4, 2) == [1.0, 1.0] and bin_coverage([], 0, 1, 3) == [0.0] * 3


def test_decode_runs_split_by_prefill():
    ps = [Pass(0, 8, 0, 1), Pass(1, 1, 1.1, 2), Pass(2, 1, 2.2, 3), Pass(3, 5, 10, 11), Pass(4, 1, 11, 12)]
    assert decode_runs(ps) == [(1.1, 3), (11, 12)]  # the idle time between turns is not decode time


# ---------------------------------------------------------------------------------------- a trace with known numbers
def known_trace() -> dict:
    """Startup read, one prefill pass, two decode passes; every interval chosen by hand (seconds).

    disk: startup  read layer.0 [0, 1] 1 GB (resident in host)
          prefill  read layer.1 [1, 2] 1 GB
          decode b read layer.1 [b, b+1] 1 GB  and  read head [b+0.5, b+1.5] 0.5 GB (overlapping)
          -> busy 1 + 1 + 1.5 + 1.5 = 5 s for 5 GB = 1.00 GB/s; decode phase [3, 7]: 3 GB / 4 s = 0.75 GB/s
    h2d:  decode b h2d layer.1 [b+0.25, b+0.75] 2 GB -> 4 GB in 1 s = 4.00 GB/s (peak 8 GB/s: 50%)
    compute per decode pass b in (3, 5): layer.0 [b, b+.5], wait layer.1 [b+.5, b+1], layer.1 [b+1, b+1.75],
          head [b+1.75, b+2]
    """
    tr = Tracer()
    tr.complete("disk", "read layer.0", 0, 1 * S, group="layer.0", bytes=10**9)
    # prefill, pass 0: [1, 3], 8 tokens
    tr.complete("compute", "forward", 1 * S, 3 * S, tokens=8, **{"pass": 0})
    tr.complete("compute", "layer.0", 1 * S, 1.5 * S, group="layer.0", **{"pass": 0})
    tr.complete("disk", "read layer.1", 1 * S, 2 * S, group="layer.1", bytes=10**9)
    tr.complete("compute", "wait layer.1", 1.5 * S, 2 * S, group="layer.1", **{"pass": 0})
    tr.complete("compute", "layer.1", 2 * S, 3 * S, group="layer.1", **{"pass": 0})
    for p, b in ((1, 3.0), (2, 5.0)):
        tr.complete("compute", "forward", b * S, (b + 2) * S, tokens=1, **{"pass": p})
        tr.complete("compute", "layer.0", b * S, (b + 0.5) * S, group="layer.0", **{"pass": p})
        tr.complete("disk", "read layer.1", b * S, (b + 1) * S, group="layer.1", bytes=10**9)
        tr.complete("h2d", "h2d layer.1", (b + 0.25) * S, (b + 0.75) * S, group="layer.1", bytes=2 * 10**9)
        tr.complete("disk", "read head", (b + 0.5) * S, (b + 1.5) * S, group="head", bytes=5 * 10**8)
        tr.complete("compute", "wait layer.1", (b + 0.5) * S, (b + 1) * S, group="layer.1", **{"pass": p})
        tr.complete("compute", "layer.1", (b + 1) * S, (b + 1.75) * S, group="layer.1", **{"pass": p})
        tr.complete("compute", "head", (b + 1.75) * S, (b + 2) * S, group="head", **{"pass": p})
    for t, host in ((0.5, 10**9), (4.0, 1.5 * 10**9)):
        tr.now_us = lambda t=t: t * S
        tr.counter("occupancy", device=2 * 10**9, host=host, disk=0, buffers=3 * 10**8)
    tr.meta.update(model="known-model", device="cuda", tiers={"layer.0": "host", "layer.1": "disk", "head": "disk"},
                   placement={"device": 0, "host": 10**9, "disk": 15 * 10**8},
                   peaks={"disk": 2e9, "h2d": 8e9, "mem": 5e10}, predicted_tok_s=1.0, prefetch_depth=2)
    return tr.to_json()


def test_known_trace_summary():
    an = analyse(known_trace())
    assert [p.index for p in an.decode_passes] == [1, 2] and len(an.prefill_passes) == 1
    assert an.decode_windows == [(3.0, 7.0)]
    assert an.decode_tok_s == pytest.approx(0.5)  # 2 tokens over 4 s of decode
    assert an.prefill_tok_s == pytest.approx(4.0)  # 8 tokens in 2 s
    assert an.decode_wait_fraction == pytest.approx(0.25)  # 0.5 s of 2 s per decode pass


def test_known_trace_groups():
    rows = {r.group: r for r in analyse(known_trace()).groups}
    assert list(rows) == ["layer.0", "layer.1", "head"]
    l0, l1, head = rows["layer.0"], rows["layer.1"], rows["head"]
    assert (l0.tier, l1.tier, head.tier) == ("host", "disk", "disk")
    # layer.0 is resident: read once before the first pass, nothing per decode pass
    assert l0.load_s == 0 and l0.startup_bytes == 10**9 and l0.compute_s == pytest.approx(0.5) and l0.wait_s == 0
    # layer.1: the prefill pass's read and wait are not part of the decode mean
    assert l1.disk_s == pytest.approx(1.0) and l1.h2d_s == pytest.approx(0.5) and l1.load_s == pytest.approx(1.5)
    assert l1.disk_bytes == pytest.approx(1e9) and l1.h2d_bytes == pytest.approx(2e9)
    assert l1.compute_s == pytest.approx(0.75) and l1.wait_s == pytest.approx(0.5)
    assert head.disk_s == pytest.approx(1.0) and head.disk_bytes == pytest.approx(5e8)
    assert head.compute_s == pytest.approx(0.25) and head.wait_s == 0


def test_known_trace_links():
    an = analyse(known_trace())
    disk, h2d = an.links
    assert disk.name == "disk" and disk.bytes == 5 * 10**9
    assert disk.busy_s == pytest.approx(5.0)  # overlapping reads counted once
    assert disk.busy_gbps == pytest.approx(1.0)
    assert disk.peak == 2e9 and disk.busy_vs_peak == pytest.approx(0.5)
    assert disk.overlap == pytest.approx(0.5)  # 0.5 s in prefill + 1 s per decode pass, of 5 s busy
    assert disk.decode_wall_s == pytest.approx(4.0) and disk.decode_bytes == pytest.approx(3e9)
    assert disk.decode_wall_gbps == pytest.approx(0.75) and disk.decode_busy_gbps == pytest.approx(1.0)
    assert disk.decode_overlap == pytest.approx(2 / 3) and disk.decode_busy_of_wall == pytest.approx(0.75)
    assert h2d.busy_gbps == pytest.approx(4.0) and h2d.decode_wall_gbps == pytest.approx(1.0)
    assert h2d.overlap == pytest.approx(0.5) and h2d.busy_vs_peak == pytest.approx(0.5)


def test_decode_bytes_pro_rata_at_the_phase_edge():
    tr = Tracer()
    tr.complete("compute", "forward", 1 * S, 3 * S, tokens=1, **{"pass": 0})
    tr.complete("disk", "read layer.0", 0, 2 * S, group="layer.0", bytes=10**9)  # half inside the decode phase
    events, _ = parse_events(tr.to_json())
    st = link_stats(events, "disk", None, [(1.0, 3.0)])
    assert st.decode_bytes == pytest.approx(5e8) and st.decode_busy_s == pytest.approx(1.0)
    assert st.decode_wall_gbps == pytest.approx(0.25) and st.peak is None


def test_groups_without_decode_passes_use_the_whole_trace():
    tr = Tracer()
    tr.complete("compute", "forward", 0, 2 * S, tokens=4, **{"pass": 0})
    tr.complete("compute", "wait layer.3", 0, 0.5 * S, group="layer.3", **{"pass": 0})
    tr.complete("compute", "wait layer.3", 1 * S, 1.25 * S, group="layer.3", **{"pass": 0})
    events, _ = parse_events(tr.to_json())
    (row,) = group_rows(events, forward_passes(events), {})
    assert row.group == "layer.3" and row.tier == "-" and row.wait_s == pytest.approx(0.75)


def test_malformed_events_and_metadata_are_skipped():
    data = known_trace()
    data["traceEvents"] += [42, "x", {"ph": "X", "name": "no ts"}, {"ph": "X", "ts": "soon", "dur": 1},
                            {"ph": "C", "name": "occupancy", "ts": 1, "args": {"host": "lots"}},
                            {"ph": "X", "ts": 1, "dur": 1, "name": "layer.9", "tid": 1, "args": ["not", "a", "dict"]}]
    data["otherData"] = {"tiers": "nope", "peaks": None, "predicted_tok_s": "fast", "placement": []}
    an = analyse(data)
    assert an.links[0].busy_gbps == pytest.approx(1.0) and an.links[0].peak is None
    assert an.predicted_tok_s is None and {r.tier for r in an.groups} == {"-"}


# ---------------------------------------------------------------------------------------- the CLI
def test_report_cli_renders_known_figures(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps(known_trace()))
    out = tmp_path / "r.html"
    p = run_report(trace, "-o", out)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    # per group: tier, disk/h2d bytes per pass, disk/h2d/load/compute/wait ms per pass, bytes read before pass 0
    assert ("<tr><td>layer.1</td><td>disk</td><td>1.00 GB</td><td>2.00 GB</td><td>1000.00</td><td>500.00</td>"
            "<td>1500.00</td><td>750.00</td><td>500.00</td><td>0 B</td></tr>") in text
    assert ("<tr><td>layer.0</td><td>host</td><td>0 B</td><td>0 B</td><td>0.00</td><td>0.00</td><td>0.00</td>"
            "<td>500.00</td><td>0.00</td><td>1.00 GB</td></tr>") in text
    assert "<tr><td>head</td><td>disk</td><td>500.00 MB</td><td>0 B</td><td>1000.00</td>" in text
    # links: disk, h2d columns
    assert "<tr><th>metric</th><th>disk</th><th>h2d</th></tr>" in text
    assert "<tr><td>busy s (union of intervals)</td><td>5.000</td><td>1.000</td></tr>" in text
    assert "<tr><td>GB/s while busy</td><td>1.00</td><td>4.00</td></tr>" in text
    assert "<tr><td>measured peak GB/s</td><td>2.00</td><td>8.00</td></tr>" in text
    assert "<tr><td>busy time overlapping compute</td><td>50%</td><td>50%</td></tr>" in text
    assert "<tr><td>decode phase: GB/s over wall time</td><td>0.75</td><td>1.00</td></tr>" in text
    # summary
    assert "<tr><td>decode tok/s (achieved)</td><td>0.500</td></tr>" in text
    assert "<tr><td>decode tok/s (predicted by the plan)</td><td>1.000</td></tr>" in text
    assert "<tr><td>achieved ÷ predicted</td><td>50%</td></tr>" in text
    assert "<tr><td>forward passes</td><td>3 (1 prefill, 2 decode)</td></tr>" in text
    # self-contained: the plots are inline, nothing is fetched
    assert text.count('src="data:image/png;base64,') == 4 and "http://" not in text and "https://" not in text
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 20_000
    assert p.stdout.strip() == str(out)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.html", "r.png", "t.json"]  # no temp files left


def test_report_cli_minimal_trace_and_png_path(tmp_path):
    """No otherData, no forward passes, no occupancy, a CPU-only run: still a report."""
    tr = Tracer()
    tr.complete("disk", "read layer.0", 0, 2 * S, group="layer.0", bytes=2 * 10**9)
    tr.complete("compute", "layer.0", 2 * S, 3 * S, group="layer.0")
    data = tr.to_json()
    del data["otherData"]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps(data))
    png = tmp_path / "plots.png"
    p = run_report(trace, "--png", png)  # -o defaults to the trace path with .html
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "t.html").read_text()
    assert "<tr><td>GB/s while busy</td><td>1.00</td></tr>" in text  # 2 GB over 2 busy seconds
    assert "<td>layer.0</td><td>-</td>" in text
    assert png.read_bytes()[:8] == PNG_MAGIC and not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("{not json", "not JSON"),
    ("\xff\xfe binary", "not JSON"),
    ('{"a": 1}', "no traceEvents"),
    ('[{"ph": "X"}]', "no traceEvents"),
    ('{"traceEvents": []}', "no complete events"),
])
def test_report_bad_input(tmp_path, content, needle):
    trace = tmp_path / "t.json"
    if content is not None:
        trace.write_bytes(content.encode("latin-1"))
    p = run_report(trace, "-o", tmp_path / "r.html")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.png").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ([] if content is None else ["t.json"])


def test_report_unwritable_output(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps(known_trace()))
    p = run_report(trace, "-o", tmp_path / "missing" / "r.html")
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "cannot write" in p.stderr and "missing" in p.stderr
    p = run_report(trace, "-o", trace)
    assert p.returncode == 2 and "overwrite" in p.stderr and json.loads(trace.read_text())["traceEvents"]
