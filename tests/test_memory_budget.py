"""The process's own memory cost is measured, and `auto` budgets keep a run inside a cgroup limit.

The subprocess test creates a real memory cgroup (root and a writable cgroup v1 or v2 memory
controller; skipped with the reason otherwise), runs a streamed answer in it with
``--cpu-mem auto`` and reads the cgroup's own peak charge afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from offload_rt.memory import baseline, budgets
from tests.cli_helpers import run_cli

MiB = 1 << 20
# The default model dequantized to float32 (543 MB): large enough that half its weights leave room to stream.
PROMPT = ("--raw", "--prompt", "The three primary colours are", "--max-new-tokens", "12", "--ignore-eos",
          "--ctx-size", "256", "--weights", "f32")


# ---------------------------------------------------------------------------- cgroup accounting (no processes)


def _v1(tmp_path, *, limit, usage, stat):
    d = tmp_path / "memory" / "job"
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.stat").write_text("".join(f"{k} {v}\n" for k, v in stat.items()))
    cg = tmp_path / "cgroup"
    cg.write_text("4:memory:/job\n0::/\n")
    return cg


def test_mapped_library_pages_are_not_counted_as_free(tmp_path):
    # 1 GiB limit, 900 MiB charged of which 500 MiB inactive page cache, 300 MiB of it mapped (library
    # code in use): only 200 MiB can be reclaimed without hurting the process.
    cg = _v1(tmp_path, limit=1024 * MiB, usage=900 * MiB,
             stat={"total_cache": 520 * MiB, "total_inactive_file": 500 * MiB, "total_mapped_file": 300 * MiB})
    mem = budgets.cgroup_memory(cg, tmp_path)
    assert mem.reclaimable == 200 * MiB
    assert mem.unreclaimable == 700 * MiB
    assert budgets.cgroup_headroom(cg, tmp_path) == 324 * MiB


def test_cgroup_v2_keys(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    d = tmp_path / "a"
    d.mkdir()
    (d / "memory.max").write_text(f"{2048 * MiB}\n")
    (d / "memory.current").write_text(f"{1024 * MiB}\n")
    (d / "memory.stat").write_text(f"anon {600 * MiB}\nfile {400 * MiB}\ninactive_file {350 * MiB}\n"
                                   f"file_mapped {100 * MiB}\n")
    cg = tmp_path / "cgroup"
    cg.write_text("0::/a\n")
    mem = budgets.cgroup_memory(cg, tmp_path)
    assert (mem.cache, mem.reclaimable) == (400 * MiB, 250 * MiB)
    assert mem.headroom == 2048 * MiB - (1024 - 250) * MiB


@pytest.mark.parametrize("rss_mib, room_mib", [(400, 1000), (900, 700)])
def test_auto_budget_under_a_cgroup_leaves_slack_and_margin(monkeypatch, rss_mib, room_mib):
    # 1600 MiB limit, 600 MiB charged. The process's own RSS counts in full even where the cgroup
    # charges less of it (library pages charged to whoever loaded them first).
    cg = budgets.CgroupMemory(Path("/x"), 1600 * MiB, 600 * MiB, cache=0, inactive_file=0, mapped_file=0)
    monkeypatch.setattr(budgets, "cgroup_memory", lambda *a, **k: cg)
    monkeypatch.setattr(baseline, "rss_bytes", lambda: rss_mib * MiB)
    got = budgets.resolve_budget("auto", kind="cpu")
    rest = room_mib * MiB - baseline.RUNTIME_SLACK_BYTES
    assert got == rest - max(int(rest * budgets.CPU_MARGIN_FRACTION), budgets.CGROUP_MARGIN_MIN_BYTES)


def test_mapped_files_parses_proc_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f10 r-xp 00000000 08:01 123 /usr/lib/libfoo.so\n"
        "7f10-7f20 r--p 00010000 08:01 123 /usr/lib/libfoo.so\n"
        "7f20-7f30 rw-p 00000000 00:00 0 \n"
        "7f30-7f40 r--p 00000000 08:01 456 /tmp/gone.bin (deleted)\n"
        "7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n"
        "7f40-7f50 r--s 00000000 08:01 789 /data/with space.bin\n")
    assert baseline.mapped_files(maps) == ["/usr/lib/libfoo.so", "/data/with space.bin"]


def test_measure_in_this_process():
    b = baseline.measure()
    assert b.rss_bytes > 50 * MiB  # torch is imported in this process
    assert b.baseline_bytes >= b.rss_bytes
    assert b.dropped_cache_bytes >= 0


# ---------------------------------------------------------------------------- a real cgroup


def _memory_cgroup_root() -> tuple[Path, bool] | None:
    """(directory to create cgroups in, is_v2), or None when this machine does not allow it."""
    if os.geteuid() != 0:
        return None
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir() and (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return v1, False
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        ctl = root / "cgroup.subtree_control"
        if ctl.exists() and "memory" in ctl.read_text().split() and os.access(root, os.W_OK):
            return root, True
    return None


class MemoryCgroup:
    def __init__(self, limit: int):
        found = _memory_cgroup_root()
        assert found is not None
        root, self.v2 = found
        self.path = root / f"offload_rt_test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
        self.limit = limit

    def run(self, *args) -> subprocess.CompletedProcess:
        procs = self.path / "cgroup.procs"
        env = dict(os.environ)
        env.setdefault("OFFLOAD_RT_BANDWIDTHS", "disk=1.3e9,mem=2.4e10,matvec=1.5e10")
        return subprocess.run([sys.executable, "-m", "offload_rt", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=600, preexec_fn=lambda: procs.write_text(str(os.getpid())))

    def peak(self) -> int:
        return int((self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def test_auto_budget_keeps_a_streamed_run_under_the_cgroup_limit(tmp_path):
    if _memory_cgroup_root() is None:
        pytest.skip("needs root and a writable cgroup memory controller (v1 or v2) to create a memory cgroup")
    store_dir = tmp_path / "stores"
    ref = run_cli(*PROMPT, "--offload-dir", store_dir, "--cpu-mem", "4G", "--stats")  # converts; resident
    assert ref.returncode == 0, ref.stderr
    resident = json.loads(ref.stderr.strip().splitlines()[-1])
    # A limit that holds the measured process and under half the weights: the run must stream.
    weights = resident["placement"]["host"]
    limit = resident["baseline_bytes"] + weights // 2 + baseline.RUNTIME_SLACK_BYTES
    cg = MemoryCgroup(limit)
    try:
        proc = cg.run(*PROMPT, "--offload-dir", store_dir, "--cpu-mem", "auto", "--stats")
        peak = cg.peak()
    finally:
        cg.remove()
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stderr.strip().splitlines()[-1])
    assert rec["baseline_cgroup_bytes"] is not None  # it saw the limit
    assert rec["placement"]["disk"] > 0  # streamed
    assert rec["host_budget_bytes"] < limit - rec["baseline_bytes"]
    assert proc.stdout == ref.stdout  # same greedy answer as the resident run
    print(f"cgroup limit {limit >> 20} MiB, peak {peak >> 20} MiB, baseline {rec['baseline_bytes'] >> 20} MiB, budget {rec['host_budget_bytes'] >> 20} MiB")
    assert peak < limit, f"cgroup peak {peak} reached the limit {limit}"
