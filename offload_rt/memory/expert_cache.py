"""MoE expert cache and prefetch policy: which routed expert holds which RAM slot (no tensors).

Pure bookkeeping in the manner of :class:`~offload_rt.memory.kv_plan.ChunkTable`: the runtime
mover asks :class:`ExpertCache` which slot to read an expert into and what to evict, then moves
the bytes itself. Tested on synthetic routing traces in milliseconds.

Slots
-----
Every MoE layer owns ``slots_per_layer`` slots (one expert's packed bytes each); slot ids are
global, ``layer * slots_per_layer + i``, in ``[0, layers * slots_per_layer)``. A layer may have
fewer slots than the ``k`` experts a token routes to: the mover then runs a token's misses in
waves (read into the free slots, compute, read the next ones into the same slots).

An expert held by a slot is either *valid* (its bytes are there) or *pending* (a read into the
slot is in flight: :meth:`ExpertCache.assign` or :meth:`ExpertCache.prefetch` reserved it,
:meth:`ExpertCache.filled` makes it valid). A pending expert is never evicted and a lookup
reports it apart, so the mover waits for that read instead of issuing a second one.

Per token and layer (the mover's loop)::

    look = cache.lookup(layer, ids)              # records the access: recency, frequency, stats
    wave = []                                    # misses given a slot, read in one batch
    for e in look.misses:
        got = cache.assign(layer, e, protect=set(look.hits) | set(wave))
        if got is None:                          # every slot holds this token's experts, still needed
            read the wave (one batch), cache.filled() each, compute it and the hits; wave = []
            got = cache.assign(layer, e)
        wave.append((e, got[0]))                 # got[1]: the expert evicted, if any
    read the last wave, cache.filled() each; compute it, the hits (overlapping the reads) and
    look.pending once their reads (issued earlier) complete
    cache.prefetch(layer + 1, predicted_ids)     # while this layer computes (ExpertFlow)

``protect`` holds the experts of the token whose slots are still needed (hits and filled
experts not yet computed); pending experts are protected without being named. :func:`run_layer`
is this loop with reads that complete at once. A prefill chunk may look up the union of its
tokens' experts in one call (more ids than slots: the waves above).

Policies
--------
``lru``  evict the least recently routed expert of the layer.
``lfu``  evict the expert with the smallest decayed routing count: every routing adds 1 and
         counts halve every ``half_life`` lookups of the layer (``score = Σ 2^(-age/half_life)``),
         so an expert that was hot long ago eventually leaves. Experts the layer's current
         token routed (its last lookup) go last, whatever their count: the next token is likely
         to route them again (local routing consistency). Ties go to the least recently routed.
         Counts are kept for every expert routed (resident or not), so a hot expert that was
         pushed out by noise comes back with its history.

Prefetch treats a prediction like a use that has not happened yet: it fills free slots first,
then evicts what a miss would evict (the policy's victim among unprotected, non-pending experts
outside the prediction). It never evicts a protected or pending expert, never bumps counts, and
marks the prefetched experts most recently used so the next assign does not evict them before
their token arrives. ``limit`` caps the reads one call may issue.

Figures (:meth:`ExpertCache.stats_dict`, for ``--stats``)
---------------------------------------------------------
``hit_rate``            routed experts that needed no new read when routed (valid, or pending
                        from an earlier prefetch or assign) / all routed experts.
``prefetch_accuracy``   prefetched experts that the layer's next lookup routed / prefetched
                        experts judged by a lookup (the read was worth issuing).
``prediction_accuracy`` predicted experts (resident or not) that the next lookup routed /
                        predicted experts: the predictor's precision.

Planner model
-------------
:func:`expected_hit_rate` is the LRU hit rate under the locality model that
:func:`synthetic_trace` generates (stated there); :func:`simulate` replays a trace through the
mover loop above.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

POLICIES = ("lru", "lfu")
HALF_LIFE = 64.0  # lfu: lookups of a layer after which a routing count weighs half


@dataclass(frozen=True)
class Lookup:
    """The answer to one token's routing at one layer."""

    hits: dict[int, int]  # expert -> slot, bytes valid: compute now
    pending: dict[int, int]  # expert -> slot, a read into the slot is in flight: wait for it, read nothing
    misses: list[int]  # experts to read (assign a slot to each), in routing order


@dataclass
class _Layer:
    """One layer's slots and history."""

    free: list[int]  # free global slot ids, pop() gives the lowest
    where: dict[int, int] = field(default_factory=dict)  # expert -> slot (valid or pending)
    pending: set[int] = field(default_factory=set)  # experts whose read is in flight
    last: dict[int, int] = field(default_factory=dict)  # expert -> sequence number of its last use
    score: dict[int, float] = field(default_factory=dict)  # lfu: decayed count as of score_tick
    score_tick: dict[int, int] = field(default_factory=dict)
    tick: int = 0  # lookups of this layer so far
    prefetched: set[int] = field(default_factory=set)  # prefetched since the last lookup, not yet judged
    predicted: set[int] = field(default_factory=set)  # predicted since the last lookup
    current: set[int] = field(default_factory=set)  # routed by the last lookup (the token being computed)


class ExpertCache:
    """Per-layer expert slots with LRU or decayed-LFU eviction, in-flight fills and prefetch.

    ``layers`` MoE layers of ``experts`` routed experts each; ``slots_per_layer`` in
    ``[1, experts]`` (the planner caps it at ``experts``: more slots would never fill).
    """

    def __init__(self, layers: int, experts: int, slots_per_layer: int, policy: str = "lru", *,
                 half_life: float = HALF_LIFE):
        if policy not in POLICIES:
            raise ValueError(f"unknown expert cache policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if layers < 1 or experts < 1:
            raise ValueError(f"an expert cache needs at least one layer and one expert (got {layers}, {experts})")
        if not 1 <= slots_per_layer <= experts:
            raise ValueError(f"slots_per_layer must be in [1, {experts}] (got {slots_per_layer})")
        if half_life <= 0:
            raise ValueError(f"half_life must be positive (got {half_life})")
        self.layers, self.experts, self.slots_per_layer, self.policy = layers, experts, slots_per_layer, policy
        self.decay = 0.5 ** (1.0 / half_life)  # per lookup of the layer
        s = slots_per_layer
        self._layers = [_Layer(free=list(range((i + 1) * s - 1, i * s - 1, -1))) for i in range(layers)]
        self._seq = 0
        self.reset_figures()

    @property
    def slots(self) -> int:
        """All slots, every layer."""
        return self.layers * self.slots_per_layer

    def reset_figures(self) -> None:
        """Zero the counters behind :meth:`stats_dict` (the cache's contents and history stay)."""
        self.hits = self.inflight_hits = self.misses = self.evictions = 0
        self.prefetches = self.prefetch_judged = self.prefetch_useful = 0
        self.predicted = self.predicted_routed = 0

    # --- the mover's calls -------------------------------------------------------------------

    def lookup(self, layer: int, ids) -> Lookup:
        """Where this token's routed experts of ``layer`` are; records the access (recency,
        frequency, hit/miss and prefetch figures). ``ids``: the routed expert ids, distinct."""
        st = self._layer(layer)
        ids = [self._expert(e) for e in ids]
        st.tick += 1
        hits, pending, misses = {}, {}, []
        for e in ids:
            self._touch(st, e)
            slot = st.where.get(e)
            if slot is None:
                misses.append(e)
            elif e in st.pending:
                pending[e] = slot
            else:
                hits[e] = slot
        self.hits += len(hits)
        self.inflight_hits += len(pending)
        self.misses += len(misses)
        routed = set(ids)
        self.prefetch_judged += len(st.prefetched)
        self.prefetch_useful += len(st.prefetched & routed)
        self.predicted += len(st.predicted)
        self.predicted_routed += len(st.predicted & routed)
        st.prefetched, st.predicted, st.current = set(), set(), routed
        return Lookup(hits, pending, misses)

    def assign(self, layer: int, expert: int, protect=frozenset()) -> tuple[int, int | None] | None:
        """Reserve a slot of ``layer`` for ``expert`` (now pending): ``(slot, evicted expert or None)``.

        A free slot first, else the policy's victim outside ``protect`` (the experts the mover is
        computing or still has to compute from their slot) and the pending ones. None when every
        slot is protected or in flight: compute what is filled, then ask again. An expert that is
        already placed gets its slot back and evicts nothing.
        """
        st = self._layer(layer)
        expert = self._expert(expert)
        if expert in st.where:
            return st.where[expert], None
        got = self._take_slot(st, protect)
        if got is None:
            return None
        slot, victim = got
        st.where[expert] = slot
        st.pending.add(expert)
        self._seq += 1
        st.last[expert] = self._seq  # the slot's newest use (also when assigned without a lookup)
        return slot, victim

    def filled(self, layer: int, expert: int) -> None:
        """The read into ``expert``'s slot completed: its bytes are valid."""
        st = self._layer(layer)
        if expert not in st.pending:
            raise ValueError(f"expert {expert} of layer {layer} has no read in flight")
        st.pending.discard(expert)

    def discard(self, layer: int, expert: int) -> None:
        """Forget ``expert`` (valid or pending: a failed or abandoned read); its slot becomes free."""
        st = self._layer(layer)
        slot = st.where.pop(expert, None)
        if slot is not None:
            st.pending.discard(expert)
            st.free.append(slot)

    def prefetch(self, layer: int, predicted, protect=frozenset(), limit: int | None = None) -> dict[int, int]:
        """Reserve slots for the predicted experts of ``layer`` that are not placed yet: ``{expert: slot}``,
        each now pending (read them, then :meth:`filled`). Predictions are taken in order (most
        confident first); stops when no slot can be taken or after ``limit`` reads."""
        st = self._layer(layer)
        predicted = [self._expert(e) for e in predicted]
        st.predicted |= set(predicted)
        keep = frozenset(protect) | frozenset(predicted)
        out: dict[int, int] = {}
        for e in predicted:
            if e in st.where or e in out:
                continue
            if limit is not None and len(out) >= limit:
                break
            got = self._take_slot(st, keep)
            if got is None:
                break
            slot = got[0]
            st.where[e] = slot
            st.pending.add(e)
            self._seq += 1
            st.last[e] = self._seq  # most recent: kept until its token looks it up
            out[e] = slot
        st.prefetched |= set(out)
        self.prefetches += len(out)
        return out

    # --- inspection ----------------------------------------------------------------------------

    def slot_of(self, layer: int, expert: int) -> int | None:
        """The slot holding ``expert`` (valid or pending), None when it is not placed."""
        return self._layer(layer).where.get(expert)

    def is_pending(self, layer: int, expert: int) -> bool:
        return expert in self._layer(layer).pending

    def resident(self, layer: int) -> dict[int, int]:
        """Valid experts of ``layer``: expert -> slot."""
        st = self._layer(layer)
        return {e: s for e, s in st.where.items() if e not in st.pending}

    @property
    def cached_experts(self) -> int:
        """Valid experts held, every layer."""
        return sum(len(st.where) - len(st.pending) for st in self._layers)

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.inflight_hits + self.misses
        return (self.hits + self.inflight_hits) / n if n else None

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_useful / self.prefetch_judged if self.prefetch_judged else None

    @property
    def prediction_accuracy(self) -> float | None:
        return self.predicted_routed / self.predicted if self.predicted else None

    def stats_dict(self) -> dict:
        """The ``--stats`` figures (JSON-ready; rates are None before anything was measured)."""
        return {"policy": self.policy, "slots": self.slots, "slots_per_layer": self.slots_per_layer,
                "cached_experts": self.cached_experts, "hits": self.hits, "inflight_hits": self.inflight_hits,
                "misses": self.misses, "hit_rate": self.hit_rate, "evictions": self.evictions,
                "prefetches": self.prefetches, "prefetch_useful": self.prefetch_useful,
                "prefetch_accuracy": self.prefetch_accuracy, "prediction_accuracy": self.prediction_accuracy}

    # --- policy --------------------------------------------------------------------------------

    def _layer(self, layer: int) -> _Layer:
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layers})")
        return self._layers[layer]

    def _expert(self, e) -> int:
        e = int(e)
        if not 0 <= e < self.experts:
            raise ValueError(f"expert {e} out of range [0, {self.experts})")
        return e

    def _touch(self, st: _Layer, e: int) -> None:
        self._seq += 1
        st.last[e] = self._seq
        if self.policy == "lfu":
            st.score[e] = self._score(st, e) + 1.0
            st.score_tick[e] = st.tick

    def _score(self, st: _Layer, e: int) -> float:
        """``e``'s decayed routing count now."""
        return st.score.get(e, 0.0) * self.decay ** (st.tick - st.score_tick.get(e, st.tick))

    def _take_slot(self, st: _Layer, protect) -> tuple[int, int | None] | None:
        """A free slot, or one freed by evicting the policy's victim; None when none may go."""
        if st.free:
            return st.free.pop(), None
        victims = [e for e in st.where if e not in st.pending and e not in protect]
        if not victims:
            return None
        if self.policy == "lru":
            victim = min(victims, key=lambda e: st.last.get(e, 0))
        else:
            victim = min(victims, key=lambda e: (e in st.current, self._score(st, e), st.last.get(e, 0)))
        self.evictions += 1
        return st.where.pop(victim), victim


# --- routing traces, simulation and the planner's model ------------------------------------------

def synthetic_trace(layers: int, experts: int, k: int, tokens: int, locality: float, seed: int = 0, *,
                    hot_experts: int = 0, hot_share: float = 0.0) -> list[list[list[int]]]:
    """A routing trace ``trace[token][layer] = [k distinct expert ids]`` with controlled locality.

    Model (per layer, independently): token 0 routes a uniform k-subset. Token t keeps each
    expert of token t-1's set with probability ``locality`` (independently, so the overlap is
    Binomial(k, locality)); the other picks are *fresh*: drawn without replacement from the
    experts not already picked for token t (the previous set's dropped experts included).
    ``locality`` 0 is uniform independent routing, what a random-weight router gives.

    ``hot_experts``/``hot_share``: each fresh pick comes from the layer's fixed hot set (a random
    ``hot_experts``-subset) with probability ``hot_share``, else from all experts: a stable hot
    set plus noise (:func:`expected_hit_rate` assumes ``hot_share`` 0).
    """
    if not 1 <= k <= experts or not 0.0 <= locality <= 1.0 or not 0.0 <= hot_share <= 1.0:
        raise ValueError(f"need 1 <= k <= experts and probabilities in [0, 1] "
                         f"(k={k}, experts={experts}, locality={locality}, hot_share={hot_share})")
    if hot_share and not k <= hot_experts <= experts:
        raise ValueError(f"hot_experts must be in [k, experts] (got {hot_experts})")
    rng = random.Random(seed)
    hot = [rng.sample(range(experts), hot_experts) if hot_share else [] for _ in range(layers)]
    prev: list[list[int]] = [[] for _ in range(layers)]
    trace = []
    for _t in range(tokens):
        row = []
        for layer in range(layers):
            picked = [e for e in prev[layer] if rng.random() < locality]
            chosen = set(picked)
            while len(picked) < k:
                pool = hot[layer] if hot_share and rng.random() < hot_share else None
                e = rng.choice(pool) if pool else rng.randrange(experts)
                if e not in chosen:
                    chosen.add(e)
                    picked.append(e)
            row.append(picked)
            prev[layer] = picked
        trace.append(row)
    return trace


def noisy_predictions(trace, experts: int, accuracy: float, seed: int = 0) -> list[list[list[int]]]:
    """A stand-in predictor: each routed expert predicted correctly with probability ``accuracy``,
    else replaced by another expert not routed there (so ``prediction_accuracy`` ≈ ``accuracy``)."""
    rng = random.Random(seed)
    out = []
    for row in trace:
        prow = []
        for ids in row:
            routed = set(ids)
            pred = []
            for e in ids:
                if rng.random() >= accuracy:
                    while (e := rng.randrange(experts)) in routed or e in pred:
                        pass
                pred.append(e)
            prow.append(pred)
        out.append(prow)
    return out


def run_layer(cache: ExpertCache, layer: int, ids) -> list[list[int]]:
    """The mover's loop (module docstring) for one token at one layer, reads completing at once:
    returns the waves of misses read (the first shares the slots with the hits, computed with it)."""
    look = cache.lookup(layer, ids)
    waves: list[list[int]] = [[]]
    needed = set(look.hits)  # slots of this token not yet computed
    for e in look.misses:
        got = cache.assign(layer, e, protect=needed)
        if got is None:  # every slot holds an expert of this token not yet computed
            waves.append([])  # compute them: their slots may be taken
            needed = set()
            got = cache.assign(layer, e)
        needed.add(e)
        cache.filled(layer, e)
        waves[-1].append(e)
    return [w for w in waves if w]


def simulate(trace, slots: int, policy: str = "lru", *, experts: int | None = None, predictions=None,
             half_life: float = HALF_LIFE, warmup: int = 0) -> ExpertCache:
    """Replay ``trace`` (``trace[token][layer]``) through an :class:`ExpertCache` of ``slots`` per layer.

    ``predictions`` (same shape, optional): each token's predicted experts of a layer are
    prefetched (filled at once) before that layer's lookup. ``warmup``: tokens replayed before
    the figures are reset. Returns the cache (its figures, its state).
    """
    layers = len(trace[0])
    experts = experts or 1 + max(e for row in trace for ids in row for e in ids)
    cache = ExpertCache(layers, experts, slots, policy, half_life=half_life)
    for t, row in enumerate(trace):
        if t == warmup and warmup:
            cache.reset_figures()
        for layer, ids in enumerate(row):
            if predictions is not None:
                for e in cache.prefetch(layer, predictions[t][layer]):
                    cache.filled(layer, e)
            run_layer(cache, layer, ids)
    return cache


def expected_hit_rate(experts: int, active: int, slots: int, locality: float = 0.0) -> float:
    """The LRU hit rate of ``slots`` experts per layer under :func:`synthetic_trace`'s model.

    With ``E`` experts, ``k`` active, ``C`` slots (capped at E), ``p`` locality: token t keeps
    ``m ~ Binomial(k, p)`` experts of token t-1's set. After token t-1 an LRU holds all of that
    set when ``C >= k`` (else a C-subset of it), so a kept expert hits with probability
    ``r = min(C, k) / k``; the ``k - m`` fresh picks are uniform over the ``E - m`` experts not
    kept, of which ``C - j`` are resident (``j`` the kept ones that hit, E[j | m] = m·r). Linear in
    j, so exactly (in steady state)::

        hit_rate = (1/k) Σ_m P(m) [ m·r + (k - m)(C - m·r) / (E - m) ]

    For uniform routing (p = 0) this is ``C / E``.
    """
    if not 1 <= active <= experts or slots < 0 or not 0.0 <= locality <= 1.0:
        raise ValueError(f"need 1 <= active <= experts, slots >= 0, locality in [0, 1] "
                         f"(experts={experts}, active={active}, slots={slots}, locality={locality})")
    k, c, e = active, min(slots, experts), experts
    r = min(c, k) / k
    total = 0.0
    for m in range(k + 1):
        pm = math.comb(k, m) * locality ** m * (1.0 - locality) ** (k - m)
        fresh = (k - m) * (c - m * r) / (e - m) if m < e else 0.0
        total += pm * (m * r + fresh)
    return total / k
