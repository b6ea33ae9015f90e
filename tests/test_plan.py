"""The placement planner: pure policy, no tensors, milliseconds."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_rt.errors import BudgetError
from offload_rt.memory.plan import (
    Bandwidths,
    Budgets,
    GroupSpec,
    _pipelined,
    cli_size,
    format_plan,
    plan,
    spread,
)

MiB = 1 << 20
GiB = 1 << 30
CPU_BW = Bandwidths(disk_read=1.3e9, mem_read=2.4e10, matvec=1.35e10, h2d=None)
GPU_BW = Bandwidths(disk_read=1.3e9, mem_read=2.4e10, matvec=2e11, h2d=2.5e10)


def model(n_layers=24, layer=100 * MiB, head=60 * MiB) -> list[GroupSpec]:
    return [GroupSpec(f"layers.{i}", "layer", layer) for i in range(n_layers)] + [GroupSpec("head", "head", head)]


def host_used(p, groups) -> int:
    """Recount the host side from the tiers alone (independent of the planner's own sums)."""
    sizes = p.group_bytes
    resident = sum(sizes[g.name] for g in groups if p.tiers[g.name] == "host")
    disk = [sizes[g.name] for g in groups if p.tiers[g.name] == "disk"]
    kv = p.kv_bytes if p.kv_tier == "host" else 0
    return resident + p.prefetch_depth * max(disk, default=0) + kv + p.activation_bytes


def device_used(p, groups) -> int:
    sizes = p.group_bytes
    resident = sum(sizes[g.name] for g in groups if p.tiers[g.name] == "device")
    fetched = [sizes[g.name] for g in groups if p.tiers[g.name] != "device"]
    kv = p.kv_bytes if p.kv_tier == "device" else 0
    return resident + p.prefetch_depth * max(fetched, default=0) + kv


def test_everything_resident_when_budget_is_large():
    groups = model()
    p = plan(groups, Budgets(device=None, host=64 * GiB), CPU_BW, kv_bytes=100 * MiB)
    assert set(p.tiers.values()) == {"host"}
    assert p.stream_bytes_per_token == 0 and p.buffer_bytes == 0
    assert p.bound == "compute"
    assert p.tier_bytes["host"] == sum(g.nbytes for g in groups)
    assert p.predicted_s_per_token == pytest.approx(sum(g.nbytes for g in groups) / CPU_BW.matvec)


def test_everything_on_device_when_gpu_budget_is_large():
    groups = model()
    p = plan(groups, Budgets(device=64 * GiB, host=1 * GiB), GPU_BW, kv_bytes=100 * MiB)
    assert set(p.tiers.values()) == {"device"}
    assert p.h2d_bytes_per_token == 0 and p.device_buffer_bytes == 0 and p.kv_tier == "device"


def test_minimum_budget_streams_every_group():
    groups = model()
    kv, act = 50 * MiB, 8 * MiB
    minimum = 100 * MiB + kv + act  # largest group, one buffer, KV, activations
    p = plan(groups, Budgets(None, minimum), CPU_BW, kv_bytes=kv, activation_bytes=act)
    assert set(p.tiers.values()) == {"disk"}
    assert p.prefetch_depth == 1 and p.buffer_bytes == 100 * MiB
    assert p.min_working_set == minimum
    assert p.bound == "disk"
    assert host_used(p, groups) <= minimum


def test_below_minimum_raises_with_the_number():
    groups = model()
    with pytest.raises(BudgetError) as e:
        plan(groups, Budgets(None, 100 * MiB), CPU_BW, kv_bytes=1 * GiB)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("--cpu-mem 100M is below the minimum working set of 1.10 GiB")
    assert "one layer in flight" in msg
    m = re.search(r"raise it to at least ([\d.]+)G", msg)
    assert m and float(m.group(1)) * GiB >= 1 * GiB + 100 * MiB
    with pytest.raises(BudgetError, match="2 layers in flight"):
        plan(groups, Budgets(None, 200 * MiB), CPU_BW, kv_bytes=0, prefetch_depth=2, activation_bytes=1)


def test_gpu_budget_below_one_group_raises():
    with pytest.raises(BudgetError, match=r"^--gpu-mem 50M is below the minimum working set"):
        plan(model(), Budgets(50 * MiB, 64 * GiB), GPU_BW, kv_bytes=0)


def test_streamed_layers_are_spread_evenly():
    n = 32
    groups = model(n_layers=n)
    for budget in (800 * MiB, 1600 * MiB, 2400 * MiB):
        p = plan(groups, Budgets(None, budget), CPU_BW, kv_bytes=0)
        idx = [int(name.split(".")[1]) for name in p.streamed if name.startswith("layers.")]
        assert 0 < len(idx) < n
        gaps = [b - a for a, b in zip(idx, idx[1:])] + [idx[0] + n - idx[-1]]  # cyclic: sweeps repeat
        assert max(gaps) - min(gaps) <= 1, (budget, idx)


def test_spread_helper():
    assert spread(0, 5) == [] and spread(5, 5) == list(range(5))
    for n in range(1, 40):
        for k in range(1, n + 1):
            s = spread(k, n)
            assert len(set(s)) == k and all(0 <= i < n for i in s)


def test_interleaving_beats_a_contiguous_block():
    sizes = [100 * MiB] * 24
    k = 8
    block = ["disk" if i < k else "host" for i in range(24)]
    spaced = ["disk" if i in set(spread(k, 24)) else "host" for i in range(24)]
    bw = Bandwidths(disk_read=1.3e9, mem_read=2.4e10, matvec=4e9)
    t_block = _pipelined(sizes, block, bw, 2, False)
    t_spaced = _pipelined(sizes, spaced, bw, 2, False)
    assert t_spaced < t_block
    # interleaved, the reader is never idle here: the sweep takes as long as the slower link
    assert t_spaced == pytest.approx(max(sum(sizes) / bw.matvec, k * sizes[0] / bw.disk_read), rel=1e-6)


def test_predicted_tok_s_is_monotone_in_host_budget():
    groups = model(n_layers=16, layer=100 * MiB, head=150 * MiB)
    last = 0.0
    for budget in range(300 * MiB, 2 * GiB, 37 * MiB):
        p = plan(groups, Budgets(None, budget), CPU_BW, kv_bytes=40 * MiB)
        assert p.predicted_tok_s >= last * (1 - 1e-9)
        last = p.predicted_tok_s


def test_cuda_fills_device_first_then_host_then_disk():
    groups = model(n_layers=24, layer=100 * MiB, head=60 * MiB)
    p = plan(groups, Budgets(device=1 * GiB, host=1 * GiB), GPU_BW, kv_bytes=50 * MiB)
    tiers = list(p.tiers.values())
    assert {"device", "host", "disk"} <= set(tiers)
    assert p.device_used_bytes <= 1 * GiB and p.host_used_bytes <= 1 * GiB
    assert p.tier_bytes["device"] >= 1 * GiB - 50 * MiB - 2 * p.device_buffer_bytes - 100 * MiB
    assert p.h2d_bytes_per_token == p.tier_bytes["host"] + p.tier_bytes["disk"]
    # with more device memory, groups move to the device, never away from it
    q = plan(groups, Budgets(device=2 * GiB, host=1 * GiB), GPU_BW, kv_bytes=50 * MiB)
    assert q.tier_bytes["device"] > p.tier_bytes["device"]
    # no device budget: nothing is placed on the device tier
    r = plan(groups, Budgets(device=None, host=1 * GiB), CPU_BW, kv_bytes=50 * MiB)
    assert "device" not in r.tiers.values() and r.h2d_bytes_per_token == 0


def test_tied_embedding_joins_the_head_untied_is_ignored():
    groups = model(n_layers=4, layer=10 * MiB, head=1 * MiB)
    big = Budgets(None, 10 * GiB)
    tied = plan(groups, big, CPU_BW, kv_bytes=0, embed_bytes=50 * MiB, tied=True)
    untied = plan(groups, big, CPU_BW, kv_bytes=0, embed_bytes=50 * MiB, tied=False)
    assert tied.group_bytes["head"] == 51 * MiB and untied.group_bytes["head"] == 1 * MiB
    assert tied.tier_bytes["host"] - untied.tier_bytes["host"] == 50 * MiB


def test_given_prefetch_depth_is_used():
    groups = model()
    p = plan(groups, Budgets(None, 1 * GiB), CPU_BW, kv_bytes=0, prefetch_depth=3)
    assert p.prefetch_depth == 3 and p.buffer_bytes == 3 * 100 * MiB
    assert host_used(p, groups) <= 1 * GiB


def test_format_plan_names_the_bound_and_the_speed():
    groups = model()
    p = plan(groups, Budgets(None, 1 * GiB), CPU_BW, kv_bytes=20 * MiB)
    text = format_plan(p, groups, CPU_BW)
    assert f"{p.predicted_tok_s:.3g} tok/s" in text
    assert "bound by disk" in text
    assert text.startswith("placement: layers 0")
    assert "head: host" in text and "disk 1.30 GB/s" in text
    g = plan(groups, Budgets(1 * GiB, 1 * GiB), GPU_BW, kv_bytes=20 * MiB)
    assert "h2d 25.00 GB/s" in format_plan(g, groups, GPU_BW)


def test_cli_size():
    assert cli_size(100 * MiB) == "100M" and cli_size(8 * GiB) == "8G"
    assert cli_size(int(1.23 * GiB), round_up=True) == "1.3G"
    assert cli_size(150 * MiB + 1, round_up=True) == "151M"


sizes_st = st.integers(min_value=1 * MiB, max_value=400 * MiB)


@settings(max_examples=150, deadline=None)
@given(
    layers=st.lists(sizes_st, min_size=1, max_size=24),
    head=sizes_st,
    host=st.integers(min_value=0, max_value=8 * GiB),
    device=st.one_of(st.none(), st.integers(min_value=0, max_value=6 * GiB)),
    kv=st.integers(min_value=0, max_value=1 * GiB),
    act=st.integers(min_value=0, max_value=64 * MiB),
    depth=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
)
def test_budgets_are_never_exceeded(layers, head, host, device, kv, act, depth):
    groups = [GroupSpec(f"layers.{i}", "layer", b) for i, b in enumerate(layers)] + [GroupSpec("head", "head", head)]
    bw = GPU_BW if device else CPU_BW
    try:
        p = plan(groups, Budgets(device, host), bw, kv_bytes=kv, activation_bytes=act, prefetch_depth=depth)
    except BudgetError as e:
        assert "minimum working set" in str(e)
        # the minimum really is infeasible: one buffer of the largest group plus KV/activations
        if not device:
            assert host < max(layers + [head]) * (depth or 1) + kv + act
        return
    assert host_used(p, groups) <= host
    assert p.host_used_bytes == host_used(p, groups)
    if device:
        assert device_used(p, groups) <= device
    else:
        assert "device" not in p.tiers.values()
    assert sum(p.tier_bytes.values()) == sum(layers) + head
    assert p.stream_bytes_per_token == p.tier_bytes["disk"]
    assert p.predicted_s_per_token >= p.pipelined_s_per_token * (1 - 1e-9) or p.prefetch_depth == 1
    assert p.pipelined_s_per_token >= p.overlapped_s_per_token * (1 - 1e-9)
    assert p.bound in ("disk", "h2d", "compute")


@settings(max_examples=60, deadline=None)
@given(
    layers=st.lists(sizes_st, min_size=1, max_size=12),
    head=sizes_st,
    kv=st.integers(min_value=0, max_value=256 * MiB),
    budgets=st.lists(st.integers(min_value=0, max_value=6 * GiB), min_size=2, max_size=6),
)
def test_predicted_speed_never_drops_with_more_host_memory(layers, head, kv, budgets):
    groups = [GroupSpec(f"layers.{i}", "layer", b) for i, b in enumerate(layers)] + [GroupSpec("head", "head", head)]
    last = 0.0
    for h in sorted(budgets):
        try:
            p = plan(groups, Budgets(None, h), CPU_BW, kv_bytes=kv)
        except BudgetError:
            assert last == 0.0  # once feasible, a larger budget stays feasible
            continue
        assert p.predicted_tok_s >= last * (1 - 1e-9)
        last = p.predicted_tok_s


def test_kv_budget_follows_the_context_window():
    import dataclasses

    import torch

    from offload_rt.errors import UsageError
    from offload_rt.models.llama import LlamaArgs
    from offload_rt.runtime import DEFAULT_CTX, context_tokens, kv_reserve_bytes

    args = LlamaArgs(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                     max_position_embeddings=32768)
    assert context_tokens(args, None) == DEFAULT_CTX
    assert context_tokens(args, 10000) == 10000
    with pytest.raises(UsageError, match="at most 32768"):
        context_tokens(args, 40000)
    # K and V, every layer, every KV head: 2 * 2 * 2 * 16 * 4 bytes per float32 token
    assert kv_reserve_bytes(args, torch.float32, 1000) == 1000 * 2 * 2 * 2 * 16 * 4
    small = dataclasses.replace(args, max_position_embeddings=2048)
    assert context_tokens(small, None) == 2048
