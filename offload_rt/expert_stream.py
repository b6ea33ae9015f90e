"""Routed experts streamed from the store through a RAM cache of expert slots.

The model hands each MoE layer's rows, expert ids and routing weights to the layer's
:class:`CachedExperts` (a ``models.ops.ExpertSet``). Per call:

1. ``cache.lookup`` (the policy, :mod:`offload_rt.memory.expert_cache`): hits, pending, misses;
2. with a next MoE layer and one row (decode): its router applied to these rows predicts its experts
   (ExpertFlow's pre-gating: the residual stream changes little between layers); the predicted ones
   not in RAM are read into slots the policy frees, on the reader pool, while this layer computes;
3. every miss gets a slot and all of the layer's misses are read in one batch (O_DIRECT, the reader
   pool: ``WeightStore.read_experts``); reads issued earlier (pending) are waited for;
4. the experts run where they are (``kernels_cpu.moe.moe_ffn`` over the slots' views).

When a layer has fewer slots than the call needs experts (one slot per layer, or a prefill chunk that
routes to most experts), the experts run one at a time in ascending id, each read into a slot the
policy frees and accumulated in the order the all-at-once path accumulates, so the output is the
same to the bit: the layer's experts are read once per call (a prefill chunk reads each used expert
once, its tokens grouped). Hit, prefetch and timing figures go to ``--stats`` (``"moe"``).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Sequence

import torch

from kernels_cpu.moe import add_weighted, moe_ffn
from offload_rt.experts import cast_parts
from offload_rt.memory.expert_cache import ExpertCache
from offload_rt.models import ops
from storage.store import aligned_buffer


PREFETCH_MIN_PRECISION = 0.5  # read predicted experts early only while at least this share of them is routed


class ExpertStream:
    """The expert slots of every MoE layer of a model, the cache policy over them, and their reads."""

    def __init__(self, store, names: Sequence[str], slots_per_layer: int, dtype: torch.dtype, *, executor,
                 tiers, counters, tracer, routers: Sequence[torch.Tensor] | None = None, active: int = 1,
                 policy: str = "lru", prefetch: bool = True):
        self.store, self.names, self.dtype = store, list(names), dtype
        self.layouts = [store.expert_layout(n) for n in self.names]
        self.unit = max(lay.unit_bytes for lay in self.layouts)
        self.experts = self.layouts[0].count
        self.cache = ExpertCache(len(self.names), self.experts, slots_per_layer, policy)
        n = self.cache.slots
        tiers.host.reserve("experts.cache", n * self.unit)
        self._buf = aligned_buffer(n * self.unit)  # 4 KiB aligned: O_DIRECT reads land in place
        self._slots = [self._buf[i * self.unit:(i + 1) * self.unit] for i in range(n)]
        self._views: dict[int, dict] = {}  # slot -> the parts of the expert it holds
        self._futures: dict[tuple[int, int], Future] = {}  # (layer, expert) -> its prefetch read
        self.executor, self.counters, self.tracer = executor, counters, tracer
        self.routers = list(routers) if routers is not None and prefetch else None
        self.active = active
        self.disk_bytes = 0  # expert bytes read (demand and prefetch)
        self.wait_s = 0.0  # compute waiting for expert reads
        self.compute_s = 0.0  # expert kernels
        self.calls = 0

    def layer(self, i: int) -> "CachedExperts":
        """The expert set of the i-th MoE layer (in sweep order)."""
        return CachedExperts(self, i)

    # ------------------------------------------------------------------ reads
    def _unit(self, li: int, slot: int) -> torch.Tensor:
        return self._slots[slot][:self.layouts[li].unit_bytes]

    def _read(self, li: int, experts: list[int], slots: list[int], *, executor) -> int:
        """Experts of layer ``li`` into their slots (one batch), bytes read."""
        with self.tracer.span("disk", f"experts {li}", layer=li, experts=len(experts),
                              bytes=len(experts) * self.layouts[li].unit_bytes):
            return self.store.read_experts(self.names[li], experts, [self._unit(li, s) for s in slots],
                                           executor=executor)

    def _filled(self, li: int, e: int, slot: int, nbytes: int) -> None:
        self.cache.filled(li, e)
        self._views[slot] = cast_parts(self.layouts[li].views(self._unit(li, slot)), self.dtype)
        self.disk_bytes += nbytes
        self.counters.disk_read_bytes += nbytes

    def _settle(self, wait_for: set[tuple[int, int]] = frozenset()) -> None:
        """Prefetch reads that completed (and those in ``wait_for``, waited for) become valid slots."""
        for key in list(self._futures):
            fut = self._futures[key]
            if key in wait_for or fut.done():
                del self._futures[key]
                li, e = key
                try:
                    nbytes = fut.result()
                except BaseException:
                    self.cache.discard(li, e)
                    raise
                self._filled(li, e, self.cache.slot_of(li, e), nbytes)

    def _prefetch(self, li: int, h: torch.Tensor) -> None:
        """Predict layer ``li``'s experts from rows h (its router) and read the missing ones early — while
        the predictor's measured precision is at least PREFETCH_MIN_PRECISION: a wrong prediction is a
        read of a whole expert the disk did not need to make (the figure keeps being measured either way)."""
        logits = ops.linear(h, self.routers[li])
        predicted = torch.topk(logits[0].float(), self.active).indices.tolist()
        precision = self.cache.prediction_accuracy
        limit = 0 if precision is not None and precision < PREFETCH_MIN_PRECISION else None
        for e, slot in self.cache.prefetch(li, predicted, limit=limit).items():
            self._futures[(li, e)] = self.executor.submit(self._read, li, [e], [slot], executor=None)

    def expert(self, li: int, e: int) -> dict:
        return self._views[self.cache.slot_of(li, e)]

    # ------------------------------------------------------------------ one layer's call
    def run(self, li: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        wanted = sorted(set(ids.reshape(-1).tolist()))
        look = self.cache.lookup(li, wanted)
        if self.routers is not None and h.shape[0] == 1 and li + 1 < len(self.names):
            self._prefetch(li + 1, h)  # read while this layer waits and computes
        t0 = time.perf_counter()
        wave = []
        for e in look.misses:
            got = self.cache.assign(li, e, protect=frozenset(wanted))
            if got is None:
                break
            wave.append((e, got[0]))
        if len(wave) < len(look.misses):  # fewer slots than experts: one at a time
            for e, _slot in wave:
                self.cache.discard(li, e)
            return self._one_by_one(li, h, ids, weights, wanted, t0)
        if wave and look.hits:  # compute what is here while the misses are read, then those as they land
            return self._overlapped(li, h, ids, weights, wanted, look, wave, t0)
        if wave:
            nbytes = self._read(li, [e for e, _ in wave], [s for _, s in wave], executor=self.executor)
            for e, s in wave:
                self._filled(li, e, s, nbytes // len(wave))
        self._settle({(li, e) for e in look.pending})
        t1 = time.perf_counter()
        with self.tracer.span("compute", f"experts {li}", layer=li, experts=len(wanted)):
            out = moe_ffn(h, ids, weights, lambda e: self.expert(li, e))
        self.wait_s += t1 - t0
        self.compute_s += time.perf_counter() - t1
        return out

    def _overlapped(self, li: int, h, ids, weights, wanted: list[int], look, wave, t0: float) -> torch.Tensor:
        """The layer's misses read (one read per expert, in parallel on the pool) while its hits compute;
        then the pending and the misses as their reads land; summed in ascending id (the same bits)."""
        futs = [(e, s, self.executor.submit(self._read, li, [e], [s], executor=None)) for e, s in wave]
        try:
            ys = self._each(li, h, ids, weights, sorted(look.hits))
        finally:
            t = time.perf_counter()
            for e, s, fut in futs:
                self._filled(li, e, s, fut.result())
            self._settle({(li, e) for e in look.pending})
            self.wait_s += time.perf_counter() - t
        ys.update(self._each(li, h, ids, weights, sorted([e for e, _ in wave] + list(look.pending))))
        return self._sum(h, weights, wanted, ys)

    def _each(self, li: int, h, ids, weights, experts) -> dict:
        """Each of ``experts`` (in a slot) on its rows, apart: {expert: (rows, positions, output)} — float32:
        the expert's own output (unit weights); bfloat16: its weighted product, rounded as the kernels round."""
        ys = {}
        for e in experts:
            tok, pos = torch.where(ids == e)  # rows in token order, as the grouped kernel sorts them
            t = time.perf_counter()
            w = weights[tok, pos][:, None] if h.dtype != torch.float32 else torch.ones(tok.numel(), 1)
            with self.tracer.span("compute", f"experts {li}", layer=li, experts=1):
                ys[e] = tok, pos, moe_ffn(h[tok], torch.full((tok.numel(), 1), e, dtype=ids.dtype), w,
                                          lambda x: self.expert(li, x), grouped=h.shape[0] > 1)
            self.compute_s += time.perf_counter() - t
        return ys

    @staticmethod
    def _sum(h, weights, wanted: list[int], ys: dict) -> torch.Tensor:
        """The experts' outputs summed in ascending id, as one moe_ffn call sums them (the same bits)."""
        out = torch.zeros_like(h)
        for e in wanted:
            tok, pos, y = ys[e]
            if h.dtype == torch.float32:
                add_weighted(out, tok, y, weights[tok, pos])
            else:
                out.index_add_(0, tok, y)
        return out

    def _one_by_one(self, li: int, h, ids, weights, wanted: list[int], t0: float) -> torch.Tensor:
        """Each expert on its rows: those already in a slot first (no read), then the others one at a time, each
        read into a slot the policy frees; accumulated in ascending id as moe_ffn does (the same bits)."""
        placed = [e for e in wanted if self.cache.slot_of(li, e) is not None]
        ys, wait = {}, 0.0
        for e in placed + [e for e in wanted if e not in placed]:
            t = time.perf_counter()
            self._settle({(li, e)} if self.cache.is_pending(li, e) else frozenset())
            if self.cache.slot_of(li, e) is None:
                got = self.cache.assign(li, e, protect=frozenset({e}))
                if got is None:  # every slot pending (prefetch reads in flight): let them land
                    self._settle({k for k in self._futures if k[0] == li})
                    got = self.cache.assign(li, e, protect=frozenset({e}))
                self._filled(li, e, got[0], self._read(li, [e], [got[0]], executor=self.executor))
            wait += time.perf_counter() - t
            ys.update(self._each(li, h, ids, weights, [e]))
        self.wait_s += wait
        return self._sum(h, weights, wanted, ys)

    def stats(self) -> dict:
        self._settle(set(self._futures))  # prefetch reads still in flight land first: their bytes count
        c = self.cache
        rec = c.stats_dict()
        rec.update(expert_disk_read_bytes=int(self.disk_bytes), expert_wait_s=round(self.wait_s, 6),
                   expert_compute_s=round(self.compute_s, 6), unit_bytes=self.unit,
                   predict=self.routers is not None)
        return rec

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        for fut in self._futures.values():
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:
                    pass
        self._futures.clear()


class CachedExperts:
    """One MoE layer's expert set over the stream's cache (``models.ops.ExpertSet``)."""

    def __init__(self, stream: ExpertStream, index: int):
        self.stream, self.index = stream, index

    def run(self, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if h.device.type != "cpu":  # beside a GPU the experts stay in RAM: only the rows cross the link
            return self.stream.run(self.index, h.cpu(), ids.cpu(), weights.cpu()).to(h.device)
        return self.stream.run(self.index, h, ids, weights)

    def close(self) -> None:
        self.stream.close()
