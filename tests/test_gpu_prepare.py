"""``runtime.prepare`` for a CUDA run, on a CPU: the GPU's figures stubbed, the arithmetic real.

``--gpu-mem G`` is the footprint nvidia-smi shows: the measured CUDA context comes off before the
planner places anything, the allocator is capped at what the budget implies, and a refusal quotes
the ``--gpu-mem`` that works (issue 9, defect 4). Then the plan is built on the CPU stand-in for a
GPU (``SplitAccel``) and must reserve, tier by tier, what it planned.
"""

from __future__ import annotations

import re

import pytest
import torch

from offload_rt import runtime
from offload_rt.accel import SplitAccel
from offload_rt.config import RunConfig, parse_size
from offload_rt.engine import model_groups
from offload_rt.errors import BudgetError
from offload_rt.memory import gpu
from offload_rt.models.llama import LlamaArgs
from tests.test_plan_runs import write_checkpoint

MiB = 1 << 20
CONTEXT = 300 * MiB
TOTAL = 80 << 30
HINTS = {"disk_read": 1.3e9, "matvec": 1.5e11, "h2d": 2.5e10}


@pytest.fixture(scope="module")
def store(tmp_path_factory, default_gguf):
    import storage

    tmp = tmp_path_factory.mktemp("gpu_prepare")
    ckpt = write_checkpoint(tmp / "ckpt", default_gguf, tied=False, dtype=torch.float32, vocab=1000, layers=4)
    return storage.open_or_convert(ckpt, tmp / "stores", progress=False)


@pytest.fixture
def fake_gpu(monkeypatch):
    caps = []
    monkeypatch.setattr(gpu, "measure_gpu_context", lambda *a, **k: CONTEXT)
    monkeypatch.setattr(gpu, "gpu_free_total", lambda *a, **k: (TOTAL - CONTEXT, TOTAL))
    monkeypatch.setattr(gpu, "cap_allocator", lambda device, nbytes: caps.append(nbytes))
    return caps


def prepare(store, gpu_mem, **kw):
    args = LlamaArgs.from_config(store.model_config)
    cfg = RunConfig(cpu_mem=1 << 30, gpu_mem=gpu_mem, device="cuda", bandwidth_hints=HINTS, ctx_size=64,
                    prefill_chunk=4, progress=False, **kw)
    return runtime.prepare(cfg, store, args, torch.float32, model_groups(args), "cuda"), args


def test_the_context_comes_off_an_explicit_budget_and_caps_the_allocator(store, fake_gpu):
    g = CONTEXT + 200 * MiB
    prep, args = prepare(store, g)
    assert prep.gpu_context_bytes == CONTEXT
    assert prep.budgets.device == g - CONTEXT - gpu.allocator_margin(g)
    assert fake_gpu == [g - CONTEXT]  # the allocator may hold everything but the context
    p = prep.placement
    assert p.cuda and p.device_used_bytes <= prep.budgets.device
    with torch.inference_mode():
        src = prep.factory(None, accel=SplitAccel())(store, args, torch.float32, model_groups(args))
    try:
        assert src.tiers.device.used == p.device_used_bytes and src.tiers.host.used == p.host_used_bytes
    finally:
        src.close()


def test_a_budget_below_the_working_set_quotes_a_gpu_mem_that_works(store, fake_gpu):
    small = CONTEXT + gpu.GPU_ALLOC_MARGIN_MIN_BYTES + 16 * 1024
    with pytest.raises(BudgetError) as e:
        prepare(store, small)
    msg = str(e.value)
    assert "CUDA context" in msg and "\n" not in msg
    fix = re.search(r"--gpu-mem (\S+) or use --device cpu", msg).group(1)
    prep, _ = prepare(store, parse_size(fix))  # the size it asks for plans
    assert prep.budgets.device > 0


def test_gpu_mem_zero_on_a_cuda_run_is_a_usage_error(store, fake_gpu):
    from offload_rt.errors import UsageError

    with pytest.raises(UsageError, match="--gpu-mem 0"):
        prepare(store, 0)


def test_quantized_kv_stays_in_ram_where_its_kernels_run(tmp_path, default_gguf, fake_gpu):
    """Room on the GPU for everything: float KV goes there (a dense window in floats), while --kv-dtype q4's
    chunked records stay in RAM (their kernels are the CPU's), planned at their quantized size."""
    import storage
    from storage.sources import GGUFSource
    from tests.hf_models import tiny_model

    ckpt = tmp_path / "ckpt"  # q4 KV needs a head dim that is a multiple of 32
    tiny_model("llama", seed=5, head_dim=32, num_hidden_layers=2, vocab_size=1000).save_pretrained(ckpt)
    GGUFSource(default_gguf).tokenizer(ckpt / "tokenizer.json")
    q_store = storage.open_or_convert(ckpt, tmp_path / "stores", progress=False)
    g = CONTEXT + (2 << 30)
    floats, _ = prepare(q_store, g)
    q4, _ = prepare(q_store, g, kv_dtype="q4")
    assert floats.placement.kv_tier == "device"
    assert q4.placement.kv_tier == "host"
    assert 0 < q4.placement.kv_bytes
