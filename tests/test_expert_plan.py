"""The routed experts' plan (offload_rt.memory.expert_plan): how many experts stay in RAM, what a token reads from
disk, the expected hit rate against a simulated run, and the host budget through ``runtime.prepare`` on a tiny MoE
store (the smallest budget the error names works, and the plan stays inside the budget)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from offload_rt import models, runtime
from offload_rt.config import RunConfig, parse_size
from offload_rt.engine import model_groups
from offload_rt.errors import BudgetError
from offload_rt.memory.expert_cache import expected_hit_rate, simulate, synthetic_trace
from offload_rt.memory.expert_plan import ExpertSpec, plan_experts
from tests.moe_models import tiny_moe_model, write_moe_checkpoint

BW = dict(disk_read=1.0e9, matvec=1.0e10)
HINTS = {"disk_read": 1.3e9, "matvec": 1.5e10}  # bandwidths given, nothing measured
UNIT = 3 << 20  # one expert as stored
# 4 MoE layers of 16 experts, 2 active per token, held at the stored size, 1 MiB of routers
SPEC = ExpertSpec(layers=4, experts=16, active=2, unit_bytes=UNIT, held_bytes=UNIT, router_bytes=1 << 20)


def slots_budget(slots: int, spec: ExpertSpec = SPEC) -> int:
    """The host bytes that hold exactly ``slots`` experts per layer and the routers."""
    return spec.layers * slots * spec.unit_bytes + spec.router_bytes


# --- plan_experts (pure) --------------------------------------------------------------------------

def test_spec_sizes():
    assert SPEC.total_stored == SPEC.total_held == 4 * 16 * UNIT
    assert SPEC.min_bytes == 4 * UNIT + (1 << 20)


@pytest.mark.parametrize("extra", [0, 1, 1 << 30])
def test_all_resident_when_they_fit(extra):
    p = plan_experts(SPEC, SPEC.total_held + extra, **BW)
    assert p.resident and p.slots_per_layer == SPEC.experts
    assert p.host_bytes == SPEC.total_held and p.hit_rate == 1.0
    assert p.disk_bytes_per_token == 0 and p.disk_s_per_token == 0.0
    assert p.compute_s_per_token == pytest.approx(4 * 2 * UNIT / BW["matvec"])
    assert "all resident" in p.describe()


def test_held_bytes_decide_residency():
    """Experts cast at load (a bf16 store computed in float32) need their held size to be resident."""
    spec = ExpertSpec(layers=2, experts=8, active=2, unit_bytes=4096, held_bytes=8192, router_bytes=0)
    assert not plan_experts(spec, spec.total_stored, **BW).resident
    assert plan_experts(spec, spec.total_held, **BW).resident


@pytest.mark.parametrize("slots", [1, 2, 5, 15])
def test_slots_from_the_leftover_bytes(slots):
    for left in (slots_budget(slots), min(slots_budget(slots + 1), SPEC.total_held) - 1):  # exactly, just short of one more
        p = plan_experts(SPEC, left, **BW)
        assert not p.resident and p.slots_per_layer == slots
        assert p.host_bytes == slots_budget(slots) <= left


def test_at_least_one_slot():
    for left in (SPEC.min_bytes, SPEC.min_bytes - 1, 0):  # below the minimum the planner still keeps one
        p = plan_experts(SPEC, left, **BW)
        assert p.slots_per_layer == 1 and not p.resident and p.host_bytes == SPEC.min_bytes


def test_slots_capped_below_all_experts():
    """Room for all stored experts but not their held copies: at most E-1 slots (a cache of E never misses)."""
    spec = ExpertSpec(layers=2, experts=8, active=2, unit_bytes=4096, held_bytes=8192, router_bytes=0)
    p = plan_experts(spec, spec.total_held - 1, **BW)
    assert not p.resident and p.slots_per_layer == spec.experts - 1


@pytest.mark.parametrize("cap", [1, 3, 15])
def test_slots_capped_by_max_slots(cap):
    for left in (slots_budget(10), SPEC.total_held, 1 << 40):
        p = plan_experts(SPEC, left, **BW, max_slots=cap)
        assert not p.resident
        assert p.slots_per_layer == min(cap, 10 if left == slots_budget(10) else SPEC.experts - 1)


def test_max_slots_of_all_experts_keeps_them_resident():
    assert plan_experts(SPEC, SPEC.total_held, **BW, max_slots=SPEC.experts).resident
    assert plan_experts(SPEC, SPEC.total_held, **BW, max_slots=100).resident


@pytest.mark.parametrize("slots", [1, 2, 4, 8, 15])
def test_hit_rate_and_disk_bytes_at_locality_zero(slots):
    p = plan_experts(SPEC, slots_budget(slots), **BW)
    assert p.hit_rate == pytest.approx(slots / SPEC.experts)
    assert p.cache_share == pytest.approx(slots / SPEC.experts)
    want = SPEC.layers * SPEC.active * (1 - slots / SPEC.experts) * UNIT
    assert p.disk_bytes_per_token == pytest.approx(want, abs=1)
    assert p.disk_s_per_token == pytest.approx(p.disk_bytes_per_token / BW["disk_read"])
    assert p.compute_s_per_token == pytest.approx(SPEC.layers * SPEC.active * UNIT / BW["matvec"])


def test_locality_raises_the_hit_rate():
    hits = [plan_experts(SPEC, slots_budget(4), **BW, locality=p).hit_rate for p in (0.0, 0.3, 0.6, 0.9)]
    assert hits == sorted(hits) and hits[0] < hits[-1] <= 1.0
    assert hits[2] == pytest.approx(expected_hit_rate(16, 2, 4, 0.6))


def test_describe_names_the_tiers():
    text = plan_experts(SPEC, slots_budget(4), **BW).describe()
    assert text.startswith("experts: 4 MoE layers x 16 routed experts")
    assert "2 active per token" in text
    assert "RAM cache 4 per layer = 16 experts" in text and "(25.0% of all experts)" in text
    assert f"{4 * 12} experts" in text and "on disk" in text and "expected hit rate 25.0%" in text


# --- the planner's expected hit rate against a simulated run -------------------------------------------

@pytest.mark.parametrize("experts,active,slots", [(16, 2, 1), (16, 2, 4), (16, 2, 12), (8, 2, 3), (32, 4, 8)])
def test_expected_hit_rate_matches_a_simulated_uniform_run(experts, active, slots):
    spec = ExpertSpec(layers=4, experts=experts, active=active, unit_bytes=4096, held_bytes=4096, router_bytes=0)
    p = plan_experts(spec, slots_budget(slots, spec), **BW)
    assert p.slots_per_layer == slots
    tokens, warmup = 1500, 50
    trace = synthetic_trace(spec.layers, experts, active, tokens, locality=0.0, seed=experts * 100 + slots)
    cache = simulate(trace, slots, "lru", experts=experts, warmup=warmup)
    n = (tokens - warmup) * spec.layers * active  # routed experts judged
    assert cache.hits + cache.inflight_hits + cache.misses == n
    # a token's k picks are not independent trials (drawn without replacement): 5 binomial sigmas is generous
    tol = 5 * math.sqrt(p.hit_rate * (1 - p.hit_rate) / n)
    assert abs(cache.hit_rate - p.hit_rate) <= tol, (cache.hit_rate, p.hit_rate, tol)


# --- the host budget through runtime.prepare on a tiny MoE store --------------------------------------

@pytest.fixture(scope="module")
def moe_store(tmp_path_factory):
    """A qwen3_moe store whose experts (1.5 MiB each) are larger than the MiB the error rounds its budget up by."""
    import storage

    tmp = tmp_path_factory.mktemp("expert-plan")
    model = tiny_moe_model("qwen3_moe", seed=1, experts=8, hidden_size=256, width=512)
    st = storage.open_or_convert(write_moe_checkpoint(tmp / "ckpt", model), tmp / "stores", progress=False)
    return tmp, st, models.args_from_config(st.model_config)


def prepare(moe_store, budget, **kw) -> runtime.Prepared:
    tmp, st, args = moe_store
    cfg = RunConfig(cpu_mem=budget, device="cpu", bandwidth_hints=HINTS, ctx_size=64, prefill_chunk=4,
                    progress=False, offload_dir=tmp, **kw)
    return runtime.prepare(cfg, st, args, torch.float32, model_groups(args), "cpu")


def spec_of(moe_store) -> ExpertSpec:
    return runtime.expert_spec(moe_store[1], moe_store[2], torch.float32)


def smallest_budget(moe_store) -> int:
    """The budget the below-the-minimum error names (asserting the error says it in one line)."""
    with pytest.raises(BudgetError) as info:
        prepare(moe_store, 4096)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("--cpu-mem 4096 is below the minimum working set")
    assert "expert slot per MoE layer and the routers" in msg
    m = re.search(r"raise it to at least (\S+)$", msg)
    assert m, msg
    need = parse_size(m.group(1))
    assert need >= info.value.need > 4096
    return need


def test_the_expert_spec_of_a_store(moe_store):
    _tmp, st, args = moe_store
    spec = spec_of(moe_store)
    lay = st.expert_layout(args.expert_tensor(0))
    assert (spec.layers, spec.experts, spec.active) == (2, 8, 2)
    assert spec.unit_bytes == lay.unit_bytes and spec.unit_bytes % 4096 == 0
    assert spec.held_bytes == sum(p.nbytes for p in lay.parts.values()) == 3 * 512 * 256 * 4  # float32 as stored
    assert spec.router_bytes == 2 * 8 * 256 * 4


def test_budget_below_the_minimum_names_one_that_works(moe_store):
    need = smallest_budget(moe_store)
    p = prepare(moe_store, need)  # the budget the message names plans
    assert not p.experts.resident and p.experts.slots_per_layer >= 1
    assert p.placement.host_used_bytes + p.experts.host_bytes <= need
    with pytest.raises(BudgetError):  # and a MiB less does not
        prepare(moe_store, need - (1 << 20))


def test_plan_stays_inside_the_budget(moe_store):
    """One more slot per layer for every expert slot's worth of budget added, until all experts fit."""
    spec, need = spec_of(moe_store), smallest_budget(moe_store)
    first = prepare(moe_store, need)
    for j in range(spec.experts + 1):
        budget = need + j * spec.layers * spec.unit_bytes
        p = prepare(moe_store, budget)
        ep = p.experts
        assert p.placement.host_used_bytes + ep.host_bytes <= budget, j
        if p.placement.host_used_bytes == first.placement.host_used_bytes:  # the dense part planned alike
            assert ep.slots_per_layer == min(first.experts.slots_per_layer + j, spec.experts), j
        if ep.resident:
            assert ep.host_bytes == spec.total_held and ep.hit_rate == 1.0
        else:
            assert 1 <= ep.slots_per_layer <= spec.experts - 1
            assert ep.host_bytes == spec.layers * ep.slots_per_layer * spec.unit_bytes + spec.router_bytes
    assert prepare(moe_store, need + spec.total_held).experts.resident


def test_expert_slots_caps_a_roomy_budget(moe_store):
    for slots in (1, 2, 7):
        ep = prepare(moe_store, 1 << 40, expert_slots=slots).experts
        assert not ep.resident and ep.slots_per_layer == slots
    assert prepare(moe_store, 1 << 40).experts.resident
    assert prepare(moe_store, 1 << 40, expert_slots=8).experts.resident
