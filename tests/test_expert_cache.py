"""The MoE expert cache and prefetch policy: pure bookkeeping on synthetic routing traces, milliseconds."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_rt.memory.expert_cache import (
    ExpertCache,
    expected_hit_rate,
    noisy_predictions,
    run_layer,
    simulate,
    synthetic_trace,
)

E, K = 128, 8  # Qwen3-30B-A3B: 8 of 128 experts per token


def replay(trace, slots, policy="lru", warmup=50, **kw):
    """Replay through the mover loop and return (cache, per token-and-layer hit fractions after warm-up)."""
    cache = ExpertCache(len(trace[0]), E, slots, policy, **kw)
    fractions = []
    for t, row in enumerate(trace):
        for layer, ids in enumerate(row):
            before = cache.hits + cache.inflight_hits
            run_layer(cache, layer, ids)
            if t >= warmup:
                fractions.append((cache.hits + cache.inflight_hits - before) / len(ids))
    return cache, fractions


def mean_and_tolerance(fractions, sds=4.0):
    """The mean hit fraction and ``sds`` standard errors of it. Under the trace model each token's
    hits at a layer depend on the cache only through the previous token's set, which the new picks
    are drawn independently of, so the per token-and-layer fractions are (close to) independent
    samples and sd/sqrt(n) is the standard error of their mean."""
    n = len(fractions)
    mean = sum(fractions) / n
    sd = math.sqrt(sum((f - mean) ** 2 for f in fractions) / (n - 1))
    return mean, sds * sd / math.sqrt(n) + 1e-9


# --- hit rates the policy implies ----------------------------------------------------------------

@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cache_of_k_hits_everything_on_a_trace_repeating_its_last_k_experts(policy):
    rng = random.Random(3)
    sets = [rng.sample(range(E), K) for _ in range(3)]
    trace = []
    for t in range(40):  # each token routes the previous token's k experts, in a new order
        row = []
        for s in sets:
            rng.shuffle(s)
            row.append(list(s))
        trace.append(row)
    cache = simulate(trace, K, policy, experts=E, warmup=1)
    assert cache.misses == 0 and cache.hit_rate == 1.0 and cache.evictions == 0
    assert cache.cached_experts == 3 * K
    locality_one = synthetic_trace(2, E, K, 30, 1.0, seed=1)  # the same through the trace generator
    assert simulate(locality_one, K, policy, experts=E, warmup=1).hit_rate == 1.0


@pytest.mark.parametrize("slots", [4, 16, 48])
def test_lru_on_uniform_routing_hits_slots_over_experts(slots):
    trace = synthetic_trace(2, E, K, 800, 0.0, seed=slots)
    _cache, fractions = replay(trace, slots, warmup=2 * E // K)
    mean, tol = mean_and_tolerance(fractions)
    assert abs(mean - slots / E) <= tol, (mean, slots / E, tol)
    assert tol < 0.02  # the sample is large enough for the comparison to mean something


@pytest.mark.parametrize("locality", [0.0, 0.4, 0.8])
@pytest.mark.parametrize("slots", [4, 8, 16, 32])
def test_planner_expected_hit_rate_matches_a_simulated_lru(slots, locality):
    trace = synthetic_trace(2, E, K, 600, locality, seed=int(100 * locality) + slots)
    _cache, fractions = replay(trace, slots, warmup=2 * E // K)
    mean, tol = mean_and_tolerance(fractions)
    assert abs(mean - expected_hit_rate(E, K, slots, locality)) <= tol, (mean, tol)


def test_expected_hit_rate_formula():
    assert expected_hit_rate(E, K, 16, 0.0) == pytest.approx(16 / E)
    assert expected_hit_rate(E, K, E, 0.3) == pytest.approx(1.0)
    assert expected_hit_rate(E, K, 2 * E, 0.0) == pytest.approx(1.0)  # slots beyond E add nothing
    assert expected_hit_rate(E, K, K, 1.0) == pytest.approx(1.0)
    rates = [expected_hit_rate(E, K, 16, p) for p in (0.0, 0.25, 0.5, 0.75)]
    assert rates == sorted(rates) and rates[-1] > 2 * rates[0]  # locality raises it
    sizes = [expected_hit_rate(E, K, c, 0.5) for c in (1, 4, 8, 16, 64)]
    assert sizes == sorted(sizes)
    assert expected_hit_rate(E, K, 0, 0.5) == 0.0
    with pytest.raises(ValueError):
        expected_hit_rate(E, 0, 8, 0.5)
    with pytest.raises(ValueError):
        expected_hit_rate(E, K, 8, 1.5)


def test_lfu_beats_lru_on_a_stable_hot_set_with_noise():
    trace = synthetic_trace(2, E, K, 600, 0.2, seed=5, hot_experts=16, hot_share=0.6)
    _c, lru = replay(trace, 16, "lru")
    _c, lfu = replay(trace, 16, "lfu")
    (m_lru, tol_lru), (m_lfu, tol_lfu) = mean_and_tolerance(lru), mean_and_tolerance(lfu)
    assert m_lfu - m_lru > tol_lru + tol_lfu + 0.03, (m_lfu, m_lru)


def test_lfu_matches_lru_on_locality_alone():
    """No hot set: the current token's experts go last under lfu too, so it keeps what lru keeps."""
    trace = synthetic_trace(2, E, K, 400, 0.6, seed=9)
    _c, lru = replay(trace, K, "lru")
    _c, lfu = replay(trace, K, "lfu")
    assert sum(lfu) == sum(lru)


def test_lfu_lets_a_stale_hot_set_go():
    """1000 tokens on hot set A, then hot set B: A's counts decay and B takes the cache over."""
    half_life = 16
    a, b = list(range(16)), list(range(16, 32))
    rng = random.Random(2)
    cache = ExpertCache(1, E, 16, "lfu", half_life=half_life)
    for _ in range(1000):
        run_layer(cache, 0, rng.sample(a, K))
    assert set(cache.resident(0)) == set(a)
    for t in range(40 * half_life):
        run_layer(cache, 0, rng.sample(b, K))
        if set(cache.resident(0)) == set(b):
            break
    assert set(cache.resident(0)) == set(b)
    # Counts near 1/(1 - 2^(-1/16)) ≈ 23.6 must decay below a newcomer's ~1: about log2(23.6) ≈ 4.6 half-lives.
    assert t <= 10 * half_life


# --- protection, in-flight fills, waves ----------------------------------------------------------

def test_single_slot_per_layer_runs_a_tokens_misses_in_waves():
    cache = ExpertCache(2, E, 1)
    assert cache.assign(1, 7) == (1, None)  # global slot ids: layer 1's only slot is 1
    cache.filled(1, 7)
    look = cache.lookup(0, [3, 5, 9])
    assert look.hits == {} and look.misses == [3, 5, 9]
    assert cache.assign(0, 3) == (0, None)
    assert cache.assign(0, 5) is None  # 3's read is in flight: its slot cannot be taken
    cache.filled(0, 3)
    assert cache.assign(0, 5, protect={3}) is None  # filled but not computed yet
    assert cache.assign(0, 5) == (0, 3)  # 3 computed: 5 is read into the same slot
    cache.filled(0, 5)
    assert cache.resident(0) == {5: 0} and cache.resident(1) == {7: 1}
    # the mover loop: every miss its own wave, one slot
    assert run_layer(cache, 0, [1, 2, 5, 4]) == [[1], [2], [4]]
    assert cache.resident(0) == {4: 0}


def test_the_first_wave_keeps_the_hits_it_is_computed_with():
    cache = ExpertCache(1, E, 2)
    run_layer(cache, 0, [1, 2])
    assert run_layer(cache, 0, [1, 3, 4]) == [[3], [4]]  # 3 takes 2's slot, not the hit 1's; then a wave
    assert set(cache.resident(0)) == {3, 4}
    assert cache.evictions == 2


def test_a_pending_expert_is_reported_pending_not_missed():
    cache = ExpertCache(1, E, 4)
    slot, _ = cache.assign(0, 11)
    look = cache.lookup(0, [11, 12])
    assert look.pending == {11: slot} and look.misses == [12] and look.hits == {}
    assert cache.assign(0, 11) == (slot, None)  # asked again: same slot, no second read
    cache.filled(0, 11)
    assert cache.lookup(0, [11]).hits == {11: slot}
    assert (cache.hits, cache.inflight_hits, cache.misses) == (1, 1, 1)


def test_discard_frees_the_slot_of_a_failed_read():
    cache = ExpertCache(1, E, 1)
    slot, _ = cache.assign(0, 2)
    cache.discard(0, 2)
    assert cache.slot_of(0, 2) is None and not cache.is_pending(0, 2)
    assert cache.assign(0, 3) == (slot, None)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_protected_experts_are_never_evicted(policy):
    rng = random.Random(4)
    cache = ExpertCache(1, 32, 6, policy)
    for _ in range(2000):
        ids = rng.sample(range(32), 4)
        look = cache.lookup(0, ids)
        protect = set(rng.sample(sorted(cache.resident(0)), min(3, len(cache.resident(0)))))
        for e in look.misses:
            in_flight = {x for x in range(32) if cache.is_pending(0, x)}
            got = cache.assign(0, e, protect=protect)
            if got is None:  # only when every placed expert is protected or in flight
                placed = [x for x in range(32) if cache.slot_of(0, x) is not None]
                assert len(placed) == 6 and all(x in protect or cache.is_pending(0, x) for x in placed)
                continue
            slot, evicted = got
            assert evicted not in protect and evicted not in in_flight
            if rng.random() < 0.8:
                cache.filled(0, e)
            protect.add(e)
        for e in [x for x in range(32) if cache.is_pending(0, x)]:
            cache.filled(0, e)


# --- prefetch ------------------------------------------------------------------------------------

def test_prefetch_accuracy_is_counted_per_token_and_layer():
    cache = ExpertCache(2, E, 4)
    cache.assign(0, 1)
    cache.filled(0, 1)
    got = cache.prefetch(0, [1, 2, 3])  # 1 is there already: two reads
    assert sorted(got) == [2, 3] and all(cache.is_pending(0, e) for e in got)
    assert cache.prefetches == 2
    look = cache.lookup(0, [2, 5])
    assert look.pending == {2: got[2]} and look.misses == [5]
    assert cache.prefetch_accuracy == 0.5  # of the prefetched 2 and 3, the token routed 2
    assert cache.prediction_accuracy == pytest.approx(1 / 3)  # of the predicted 1, 2, 3
    cache.lookup(0, [3])  # a later token routing 3 does not make the earlier prefetch useful
    assert cache.prefetch_accuracy == 0.5
    cache.prefetch(1, [4])
    cache.lookup(0, [4])  # another layer's lookup does not judge layer 1's prefetch
    assert (cache.prefetch_useful, cache.prefetch_judged) == (1, 2)
    cache.lookup(1, [4])
    assert (cache.prefetch_useful, cache.prefetch_judged) == (2, 3)
    stats = json.loads(json.dumps(cache.stats_dict()))
    assert stats["prefetch_accuracy"] == pytest.approx(2 / 3) and stats["prefetches"] == 3


def test_prefetch_never_evicts_protected_pending_or_predicted_experts():
    cache = ExpertCache(1, E, 3)
    for e in (10, 11, 12):
        cache.assign(0, e)
    cache.filled(0, 10)
    cache.filled(0, 11)  # 12 still in flight
    slot11 = cache.slot_of(0, 11)
    assert cache.prefetch(0, [20, 21], protect={10}) == {20: slot11}  # 11 was the only one that could go
    assert cache.slot_of(0, 10) is not None and cache.is_pending(0, 12) and cache.slot_of(0, 11) is None
    assert cache.prefetch(0, [21, 20, 10]) == {}  # everything left is predicted or in flight
    cache.filled(0, 12)
    cache.filled(0, 20)
    assert list(cache.prefetch(0, [30, 31, 32], limit=1)) == [30]


def test_prefetched_experts_survive_until_their_token():
    """A prefetch marks its experts most recent: the misses of the layer's own token take other slots."""
    cache = ExpertCache(1, E, 4, "lru")
    run_layer(cache, 0, [1, 2, 3, 4])
    for e in cache.prefetch(0, [5, 6]):
        cache.filled(0, e)
    look = cache.lookup(0, [5, 6, 7, 8])
    assert set(look.hits) == {5, 6}
    assert cache.prefetch_accuracy == 1.0


def test_prefetch_with_a_good_predictor_raises_the_hit_rate():
    trace = synthetic_trace(2, E, K, 300, 0.3, seed=8)
    plain = simulate(trace, 2 * K, experts=E, warmup=20)
    pred = noisy_predictions(trace, E, 0.8, seed=1)
    fetched = simulate(trace, 2 * K, experts=E, predictions=pred, warmup=20)
    assert fetched.prediction_accuracy == pytest.approx(0.8, abs=0.03)
    assert fetched.prefetch_accuracy > 0.6
    assert fetched.hit_rate > plain.hit_rate + 0.3


# --- invariants ----------------------------------------------------------------------------------

ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1), st.lists(st.integers(0, 11), min_size=1, max_size=4,
                                                                      unique=True)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(ops=ops, slots=st.integers(1, 5), policy=st.sampled_from(["lru", "lfu"]))
def test_invariants_hold_under_any_sequence_of_calls(ops, slots, policy):
    layers, experts = 2, 12
    cache = ExpertCache(layers, experts, slots, policy, half_life=3)
    for op, layer, ids in ops:
        if op == 0:
            waves = run_layer(cache, layer, ids)
            assert all(len(w) <= slots for w in waves)
            kept = ids if len(ids) <= slots else (waves[-1] if waves else [])
            assert all(cache.resident(layer).get(e) == cache.slot_of(layer, e) is not None for e in kept)
        elif op == 1:
            for e in cache.prefetch(layer, ids):
                cache.filled(layer, e)
        else:
            got = cache.assign(layer, ids[0])
            if got is not None:
                look = cache.lookup(layer, ids[:1])
                assert look.misses == [] and ids[0] in (look.hits | look.pending)
                if cache.is_pending(layer, ids[0]):
                    cache.filled(layer, ids[0])
                assert cache.lookup(layer, ids[:1]).hits == {ids[0]: got[0]}
        seen = set()
        for lay in range(layers):
            placed = {e: cache.slot_of(lay, e) for e in range(experts) if cache.slot_of(lay, e) is not None}
            assert len(placed) <= slots
            slot_ids = list(placed.values())
            assert len(set(slot_ids)) == len(slot_ids)  # a slot holds at most one expert
            assert all(lay * slots <= s < (lay + 1) * slots for s in slot_ids)  # the layer's partition
            seen |= set(slot_ids)
        assert cache.cached_experts <= cache.slots and len(seen) <= cache.slots
        assert cache.hits + cache.inflight_hits + cache.misses >= 0


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown expert cache policy"):
        ExpertCache(1, E, 4, "fifo")
    with pytest.raises(ValueError, match="slots_per_layer"):
        ExpertCache(1, E, 0)
    with pytest.raises(ValueError, match="slots_per_layer"):
        ExpertCache(1, E, E + 1)
    cache = ExpertCache(2, E, 4)
    with pytest.raises(ValueError, match="expert 128 out of range"):
        cache.lookup(0, [128])
    with pytest.raises(ValueError, match="layer 2 out of range"):
        cache.assign(2, 0)
    with pytest.raises(ValueError, match="no read in flight"):
        cache.filled(0, 5)
    with pytest.raises(ValueError):
        synthetic_trace(1, 4, 5, 10, 0.5)


def test_stats_dict_is_json_and_empty_rates_are_null():
    cache = ExpertCache(3, E, 2, "lfu")
    empty = json.loads(json.dumps(cache.stats_dict()))
    assert empty["hit_rate"] is None and empty["prefetch_accuracy"] is None and empty["cached_experts"] == 0
    assert empty["slots"] == 6 and empty["policy"] == "lfu"
    run_layer(cache, 0, [1, 2, 3])
    s = cache.stats_dict()
    assert (s["misses"], s["hit_rate"], s["evictions"], s["cached_experts"]) == (3, 0.0, 1, 2)
    cache.reset_figures()
    assert cache.stats_dict()["misses"] == 0 and cache.cached_experts == 2
