"""The routed experts' own tiers: how many stay in RAM, what a token reads from disk (no tensors).

A MoE model's always-needed part (attention, norms, routers, shared experts, embedding, head) is
planned as any model (:func:`offload_rt.memory.plan.plan`). Its routed experts are placed here, in
what the host budget leaves:

- every expert resident when they all fit (``resident``: a model that fits, M0);
- else a cache of ``slots_per_layer`` expert slots per MoE layer (one packed expert each) and the rest
  on disk: per token and layer the ``k`` routed experts that miss are read into slots the cache policy
  frees (:mod:`offload_rt.memory.expert_cache`).

The minimum is one slot per MoE layer (a token's experts then run one after another) plus a resident
copy of every layer's router, which predicts the next layer's experts for prefetching.

Cost per decode token: the k active experts' bytes at the mat-vec rate in every MoE layer, plus the
misses' bytes at the disk rate (``(1 - hit_rate) * k`` per layer), the hit rate from
:func:`~offload_rt.memory.expert_cache.expected_hit_rate` at the locality assumed (0 for random-weight
routers: a cache of C of E experts then hits C/E).
"""

from __future__ import annotations

from dataclasses import dataclass

from offload_rt.config import format_size
from offload_rt.memory.expert_cache import expected_hit_rate

LOCALITY = 0.0  # routing locality the cost model assumes (random routers have none; trained ones ~0.3-0.5)


@dataclass(frozen=True)
class ExpertSpec:
    """What the planner needs of a MoE model's routed experts."""

    layers: int  # MoE layers
    experts: int  # routed experts per MoE layer (E)
    active: int  # experts a token routes to per layer (k)
    unit_bytes: int  # one expert as stored (a cache slot; 4 KiB-aligned)
    held_bytes: int  # one expert held resident at the compute dtype (= unit_bytes when it is not cast)
    router_bytes: int  # every MoE layer's router at the compute dtype (the predictor's resident copy)

    @property
    def total_stored(self) -> int:
        return self.layers * self.experts * self.unit_bytes

    @property
    def total_held(self) -> int:
        return self.layers * self.experts * self.held_bytes

    @property
    def min_bytes(self) -> int:
        """The smallest host share the experts can run in: one slot per layer, the routers."""
        return self.layers * self.unit_bytes + self.router_bytes


@dataclass(frozen=True)
class ExpertPlan:
    spec: ExpertSpec
    resident: bool  # every expert held in RAM (no cache, nothing read per token)
    slots_per_layer: int  # cache slots per MoE layer (= experts when resident)
    host_bytes: int  # what the experts take of the host budget (all resident, or slots + routers)
    hit_rate: float  # expected share of routed experts found in RAM (1.0 resident)
    disk_bytes_per_token: int  # expected expert bytes read from disk per decode token
    compute_s_per_token: float  # the active experts' mat-vecs per token
    disk_s_per_token: float  # the misses' reads per token (overlapping nothing: the token waits for them)

    @property
    def cache_share(self) -> float:
        return self.slots_per_layer / self.spec.experts

    def describe(self) -> str:
        s = self.spec
        head = (f"experts: {s.layers} MoE layers x {s.experts} routed experts ({format_size(s.unit_bytes)} each, "
                f"{format_size(s.total_stored)} in all), {s.active} active per token "
                f"({format_size(s.layers * s.active * s.unit_bytes)} per token)")
        if self.resident:
            return head + f"; all resident ({format_size(self.host_bytes)} of RAM)"
        disk_experts = s.layers * (s.experts - self.slots_per_layer)
        return (head + f"; RAM cache {self.slots_per_layer} per layer = {s.layers * self.slots_per_layer} experts, "
                f"{format_size(s.layers * self.slots_per_layer * s.unit_bytes)} ({100 * self.cache_share:.1f}% of "
                f"all experts) + routers {format_size(s.router_bytes)}; {disk_experts} experts "
                f"({format_size(disk_experts * s.unit_bytes)}) on disk; expected hit rate "
                f"{100 * self.hit_rate:.1f}% (locality {LOCALITY:g}), "
                f"{format_size(self.disk_bytes_per_token)} read per token")


def plan_experts(spec: ExpertSpec, host_left: int, *, disk_read: float, matvec: float,
                 locality: float = LOCALITY, max_slots: int | None = None) -> ExpertPlan:
    """Place the routed experts in ``host_left`` bytes (>= ``spec.min_bytes``, what the dense plan left);
    ``max_slots`` (``--expert-slots``) caps the experts cached per layer."""
    compute = spec.layers * spec.active * spec.unit_bytes / max(matvec, 1.0)
    if host_left >= spec.total_held and (max_slots is None or max_slots >= spec.experts):
        return ExpertPlan(spec, True, spec.experts, spec.total_held, 1.0, 0, compute, 0.0)
    slots = (host_left - spec.router_bytes) // max(spec.layers * spec.unit_bytes, 1)
    slots = int(max(1, min(spec.experts - 1, slots, max_slots or spec.experts)))
    hit = expected_hit_rate(spec.experts, spec.active, slots, locality)
    disk = int(round(spec.layers * spec.active * (1.0 - hit) * spec.unit_bytes))
    return ExpertPlan(spec, False, slots, spec.layers * slots * spec.unit_bytes + spec.router_bytes, hit, disk,
                      compute, disk / max(disk_read, 1.0))
