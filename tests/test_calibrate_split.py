"""Issue 21, item 13: ``memory/calibrate.py`` (765 lines) did three jobs: the per-machine cache,
micro-benchmarks, timing real layers. Each now has its module; calibrate ties them together and
keeps every name its callers use (offload_rt/, tools/, tests/)."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

from offload_rt.memory import calibrate

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "offload_rt.memory.bandwidth_cache": {"bandwidths_from_env", "cache_key", "gpu_identity", "cached", "forget",
                                          "ENV_OVERRIDE", "CACHE_FILE"},
    "offload_rt.memory.disk_probe": {"measure_disk_read", "DISK_TEST_BYTES", "READ_CHUNK_BYTES"},
    "offload_rt.memory.microbench": {"measure_mem_read", "measure_matmul_flops", "measure_h2d",
                                     "GPU_MATVEC_BYTES", "MEM_TEST_BYTES"},
    "offload_rt.memory.layer_timing": {"layer_tensors", "measure_layer_points", "measure_decode_layer",
                                       "fit_layer_cost", "measure_layer_costs", "measure_token_overhead",
                                       "warm_gpu_kernels", "release_gpu"},
}


def _names_used_by_callers() -> set[str]:
    """Every ``calibrate.<name>`` in offload_rt/, tools/ and tests/ (outside the calibrate modules)."""
    used = set()
    for folder in ("offload_rt", "tools", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("calibrate.py",):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id == "calibrate"):
                    used.add(node.attr)
    return used


def test_every_name_callers_use_is_still_importable_from_calibrate():
    used = _names_used_by_callers()
    assert {"load_or_measure", "cached", "forget", "matmul_flops", "warm_gpu_kernels"} <= used
    assert not {n for n in used if not hasattr(calibrate, n)}


def test_each_job_lives_in_its_own_module():
    for module, names in JOBS.items():
        mod = importlib.import_module(module)
        for name in names:
            assert getattr(calibrate, name) is getattr(mod, name), (module, name)
            if inspect.isfunction(getattr(mod, name)):
                assert getattr(mod, name).__module__ == module
    # the cache module reads and writes JSON: no measuring, no layer code
    cache_src = (ROOT / "offload_rt/memory/bandwidth_cache.py").read_text()
    assert "perf_counter" not in cache_src and "layer_forward" not in cache_src
    # calibrate itself is the glue: measure_bandwidths, load_or_measure, check_run_speed
    assert len((ROOT / "offload_rt/memory/calibrate.py").read_text().splitlines()) < 400
    for module in JOBS:
        assert len((ROOT / (module.replace(".", "/") + ".py")).read_text().splitlines()) < 400
