"""The profiling report: pure trace analysis with known numbers, and the CLI's error paths."""

import json
import subprocess
import sys

import pytest

from offload_rt.trace import Tracer
from tools.report_analysis import analyse, intersect_length, union_length


def test_interval_union_and_intersection():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_length([]) == 0
    assert intersect_length([(0, 4)], [(1, 2), (3, 6)]) == 2


def synthetic_trace():
    """Two decode passes of two groups; layer.1 streams from disk: 1 GB read in 1 s each pass."""
    tr = Tracer()
    s = 1e6  # microseconds per second
    for p in range(2):
        base = p * 3 * s
        tr.complete("compute", "forward", base, base + 3 * s, tokens=1, **{"pass": p})
        tr.complete("compute", "layer.0", base, base + 1 * s, group="layer.0", **{"pass": p})
        tr.complete("disk", "read layer.1", base + 0.5 * s, base + 1.5 * s, group="layer.1", bytes=10**9)
        tr.complete("compute", "wait layer.1", base + 1 * s, base + 1.5 * s, group="layer.1", **{"pass": p})
        tr.complete("compute", "layer.1", base + 1.5 * s, base + 3 * s, group="layer.1", **{"pass": p})
    tr.counter("occupancy", device=0, host=123, disk=456)
    tr.meta.update(model="m", tiers={"layer.0": "host", "layer.1": "disk"}, peaks={"disk": 2e9})
    return tr.to_json()


def test_analysis_figures():
    an = analyse(synthetic_trace())
    assert an.decode_tok_s == pytest.approx(2 / 6)
    rows = {r.group: r for r in an.groups}
    assert rows["layer.1"].tier == "disk" and rows["layer.0"].tier == "host"
    assert rows["layer.1"].load_s == pytest.approx(1.0) and rows["layer.1"].wait_s == pytest.approx(0.5)
    assert rows["layer.1"].compute_s == pytest.approx(1.5) and rows["layer.0"].load_s == 0
    assert rows["layer.1"].bytes == 10**9
    (disk,) = an.links
    assert disk.busy_gbps == pytest.approx(1.0)  # 2 GB over 2 busy seconds
    assert disk.wall_gbps == pytest.approx(2 / 6)
    assert disk.overlap_with_compute == pytest.approx(0.5)  # half of each read overlapped layer.0
    assert disk.peak == 2e9


def test_report_cli_renders(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps(synthetic_trace()))
    out = tmp_path / "r.html"
    p = subprocess.run([sys.executable, "-m", "tools.report", str(trace), "-o", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert "<td>layer.1</td><td>disk</td>" in text and "1.00" in text
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("content,needle", [(None, "not found"), ("{not json", "not JSON"), ('{"a": 1}', "no traceEvents")])
def test_report_bad_input(tmp_path, content, needle):
    trace = tmp_path / "t.json"
    if content is not None:
        trace.write_text(content)
    p = subprocess.run([sys.executable, "-m", "tools.report", str(trace), "-o", str(tmp_path / "r.html")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
