"""The pipeline scheduler: a :class:`~offload_rt.engine.WeightSource` that streams weights.

Every forward pass sweeps the same groups in the same order (layers 0..N-1, head).
Groups the plan keeps resident are loaded once. Groups placed on ``disk`` (and, with a
device tier, groups placed on ``host``) are fetched every pass through a ring of
reusable slots, ahead of the compute that needs them::

    reader thread:   read g1 ─ read g2 ─ read g3 ─(slot free?)─ read g1' ...  (disk → host slot)
                               └ h2d g1 ─ h2d g2 ...                          (copy stream, CUDA)
    compute:         embed ─ L0 ─ L1(wait g1) ─ L2 ─ ... ─ head ─ embed ─ L0 ...

Because the weights do not depend on the token, the reader runs ahead across pass
boundaries: while the last layers of token t compute, the first streamed layers of
token t+1 are already being read. Everything is allocated once and recycled; nothing
is allocated on the hot path, and every buffer is reserved in its :class:`Tiers` first
(the plan, ``offload_rt.memory.plan``, counts the same bytes).

Two shapes of the same pipeline, chosen by the :mod:`~offload_rt.accel` in use:

* **one memory** (``HostAccel``: CPU compute). Reads land in ``depth`` slots laid out
  as stored; a group stored at another dtype is cast, when compute takes it, into one
  cast buffer at the compute dtype.
* **split** (``CudaAccel``, or ``SplitAccel`` that runs the same logic on a CPU for
  tests). Host-tier groups are held at the compute dtype in one page-locked *arena*
  (exact size: no power-of-two rounding), which also carves ``depth`` raw slots for
  disk reads. The reader thread fills a raw slot (disk groups only; host groups are
  copied straight from the arena), then queues the host→device copy on a copy stream
  into one of ``depth`` device slots at the compute dtype; a disk group stored at
  another dtype goes up into a cast buffer and is cast on the device, on that stream.
  Compute waits for the copy's event; the copy into a slot waits for the compute
  that last used it.

Streamed reads go through ``storage`` with the page cache dropped after each read:
the host tier is the cache, the plan decides what stays.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Mapping, Sequence

import torch

from kernels_cpu.matvec import embedding
from offload_rt.accel import HostAccel, thread_context
from offload_rt.engine import Group
from offload_rt.memory.tiers import Tiers
from offload_rt.prefetch import Prefetcher
from offload_rt.trace import NullTracer
from storage.formats import QTensor
from storage.store import DIRECT_ALIGN, aligned_buffer

ALIGN = DIRECT_ALIGN  # slot offsets and buffers, so O_DIRECT reads land in them directly


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bytes(t) -> torch.Tensor:
    """The bytes under a tensor or a QTensor (uint8, for reads and byte counts)."""
    if isinstance(t, QTensor):
        return t.data.view(-1)
    return t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


class Counters:
    """Bytes moved per link during the run (reported by --stats)."""

    def __init__(self):
        self.disk_read_bytes = 0
        self.h2d_bytes = 0


class _Layout:
    """Where each tensor of a group sits inside a flat buffer: as stored, or at ``dtype`` when given.

    A quantized tensor is held as stored (its blocks are what the kernels read), whatever ``dtype``.
    """

    def __init__(self, store, group: Group, dtype: torch.dtype | None = None):
        self.entries = []  # (key, name, offset, nbytes, dtype or None (as stored), TensorInfo)
        self.cast_bytes = 0  # largest stored tensor whose dtype differs from ``dtype`` (0: none)
        off = 0
        seen = set()
        for key, name in group.tensors:
            if name in seen:
                continue
            seen.add(name)
            info = store.info(name)
            dt = None if info.quantized or dtype is None else dtype
            nbytes = info.held_bytes(dt) if dt is not None else int(info.nbytes)
            if dt is not None and info.dtype != dt:
                self.cast_bytes = max(self.cast_bytes, int(info.nbytes))
            self.entries.append((key, name, off, nbytes, dt, info))
            off = _align(off + nbytes)
        self.nbytes = off
        self._keys = [(key, name) for key, name in group.tensors]

    def views(self, buf: torch.Tensor) -> dict:
        by_name = {name: info.view(buf[off:off + nb], dt) for _k, name, off, nb, dt, info in self.entries}
        return {key: by_name[name] for key, name in self._keys}


class _Arena:
    """One host allocation carved into aligned views, page-locked once by the accelerator when it can."""

    def __init__(self, nbytes: int, accel: HostAccel):
        self.accel = accel
        self.buf = aligned_buffer(nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        self.pinned = accel.pin(self.buf) if nbytes else False
        self._off = 0

    def take(self, nbytes: int) -> torch.Tensor:
        view = self.buf[self._off:self._off + nbytes]
        self._off += _align(nbytes)
        return view

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def close(self) -> None:
        if self.pinned:
            self.accel.unpin(self.buf)
            self.pinned = False


class StreamingWeights:
    """Resident groups held once; fetched groups brought through a slot ring every pass."""

    def __init__(self, store, groups: Sequence[Group], tiers_of: Mapping[str, str], dtype: torch.dtype, *,
                 embed_name: str, embed_tier: str, tiers: Tiers, accel: HostAccel | None = None,
                 kv_tier: str = "host", depth: int = 2, readers: int = 8, tracer=None,
                 verify_first_pass: bool = True, experts=None):
        """``experts(source, groups)``: the MoE layers' expert sets ({group name: models.ops.ExpertSet}), built
        once the resident groups are in (offload_rt.runtime picks resident experts or the expert cache)."""
        self.store, self.groups, self.dtype = store, list(groups), dtype
        self.accel = accel or HostAccel()
        self.device = self.accel.device
        self.split = self.accel.split
        self.tiers = tiers
        self.tracer = tracer or NullTracer()
        self.counters = Counters()
        self.tier_of = dict(tiers_of)
        # Where the KV cache lives (the engine builds it there): the device tier is host memory without a split.
        self.kv_device = self.device if (kv_tier == "device" or not self.split) else torch.device("cpu")
        # What moves every pass: disk groups, and with a device tier host groups too (host → device).
        moving = ("disk", "host") if self.split else ("disk",)
        self.streamed = [g for g in self.groups if self.tier_of[g.name] in moving]
        disk = [g for g in self.streamed if self.tier_of[g.name] == "disk"]
        self._verified: set[str] | None = set() if verify_first_pass else None
        self._pool = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="offload-read")
        self.depth = max(1, depth) if self.streamed else 0

        raw = {g.name: _Layout(store, g) for g in disk}  # what disk reads land in (as stored)
        held = {g.name: _Layout(store, g, dtype) for g in self.groups}  # at the compute dtype
        host_groups = [g for g in self.groups if self.tier_of[g.name] == "host"]
        raw_slot = max((raw[g.name].nbytes for g in disk), default=0)

        # --- the pinned arena (split): host-tier copies at the compute dtype, then the raw disk slots
        self._arena = None
        if self.split:
            size = sum(held[g.name].nbytes for g in host_groups) + (self.depth * raw_slot if disk else 0)
            self._arena = _Arena(size, self.accel)

        # --- resident groups, loaded once into their tier
        self._resident: dict[str, dict[str, torch.Tensor]] = {}  # where compute reads them
        self._host_src: dict[str, dict[str, torch.Tensor]] = {}  # split: host copies fetched every pass
        self._held_by_name: dict[str, torch.Tensor] = {}  # every tensor held, by store name (a tied embedding
        # is the head's matrix: found here, not loaded twice)
        for g in self.groups:
            tier = self.tier_of[g.name]
            if tier == "disk":
                continue
            if self.split and tier == "host":
                tiers.host.reserve(f"weight.{g.name}", held[g.name].nbytes)
                views = held[g.name].views(self._arena.take(held[g.name].nbytes))
                self._fill(g, views)
                self._host_src[g.name] = views
                self._held_by_name.update({name: views[key] for key, name in g.tensors})
            else:
                self._resident[g.name] = self._load_group(g, tiers.get(tier), tier)

        # --- the embedding table: resident (untied: its own; tied: the head's matrix) or read by rows
        self.embed_name = embed_name
        self._embed_table = None
        if embed_tier != "disk":
            self._embed_table = self._held_by_name.get(embed_name)
            if self._embed_table is None:  # an untied table: the plan keeps it in host RAM
                self._embed_table = self._load(embed_name, tiers.host, "embed", torch.device("cpu"))

        # --- the slot rings
        self._host_slots: list[torch.Tensor] = []
        self._dev_slots: list[torch.Tensor] = []
        self._cast_buf = None
        if self.split:
            if disk:
                for i in range(self.depth):
                    tiers.host.reserve(f"slot.host.{i}", raw_slot)
                    self._host_slots.append(self._arena.take(raw_slot))
            dev_slot = max((held[g.name].nbytes for g in self.streamed), default=0)
            for i in range(self.depth):
                tiers.device.reserve(f"slot.device.{i}", dev_slot)
                self._dev_slots.append(torch.empty(dev_slot, dtype=torch.uint8, device=self.device))
            cast = max((held[g.name].cast_bytes for g in disk), default=0)
            if cast:
                tiers.device.reserve("cast", cast)
                self._cast_buf = torch.empty(cast, dtype=torch.uint8, device=self.device)
            ring, layouts = self._dev_slots, {g.name: held[g.name] for g in self.streamed}
            self._raw_views = [{n: lay.views(b) for n, lay in raw.items()} for b in self._host_slots]
        else:
            for i in range(self.depth):
                tiers.host.reserve(f"slot.host.{i}", raw_slot)
                self._host_slots.append(aligned_buffer(raw_slot))
            casting = [g for g in disk if held[g.name].cast_bytes]
            if casting:  # compute casts a slot into this buffer when it takes the group
                size = max(held[g.name].nbytes for g in casting)
                tiers.host.reserve("cast", size)
                self._cast_buf = torch.empty(size, dtype=torch.uint8)
            ring, layouts = self._host_slots, raw
        self._raw = raw
        self._views = [{n: lay.views(b) for n, lay in layouts.items()} for b in ring]
        self._cast_views = ({g.name: held[g.name].views(self._cast_buf) for g in disk
                             if held[g.name].cast_bytes and not self.split} if self._cast_buf is not None else {})

        # --- the reader thread and its hand-off (offload_rt.prefetch: the one slot ring the KV cache uses too)
        self._next_seq = 0  # next sequence number the compute side consumes
        self._pass = 0
        self._compute_done: list = [None] * len(ring)  # per slot: compute finished with it (event)
        self._host_busy: list = [None] * len(self._host_slots)  # per raw slot: its copy up is done (event)
        self._host_i = 0  # next raw slot (disk groups only)
        self._ring = None
        if self.streamed:
            self._copy_stream = self.accel.stream()
            # Inference mode is per thread: the tier tensors were made under it, and updating them in
            # place from a thread outside it raises. The current CUDA device is per thread too.
            self._ring = Prefetcher(len(ring), self._fill_slot, itertools.cycle(self.streamed),
                                    name="offload-prefetch", context=lambda: thread_context(self.accel))
        moe = [g for g in self.groups if g.experts is not None]
        self.expert_sets = experts(self, moe) if moe and experts is not None else {}
        for name, table in self._resident.items():
            if name in self.expert_sets:
                table["experts"] = self.expert_sets[name]
        self._occupancy()

    # ------------------------------------------------------------------ loading
    @property
    def pinned_host_bytes(self) -> int:
        """Host memory page-locked for fast copies (the arena), 0 when nothing is."""
        return self._arena.nbytes if self._arena is not None and self._arena.pinned else 0

    def _read_raw(self, name: str, group: str):
        """One stored tensor into a fresh host buffer (the load path; 4 KiB aligned for O_DIRECT)."""
        info = self.store.info(name)
        with self.tracer.span("disk", f"read {group}", group=group, bytes=info.nbytes):
            host = aligned_buffer(info.nbytes)
            self.store.read_into(name, host, verify=True, drop_cache=True)
        self.counters.disk_read_bytes += info.nbytes
        return info.view(host)

    def _load(self, name: str, tier, group: str, device: torch.device):
        """Read one tensor from the store into its tier at the compute dtype, or as stored when quantized
        (store → host → device)."""
        info = self.store.info(name)
        nbytes = info.held_bytes(self.dtype)
        tier.reserve(f"weight.{name}", nbytes)
        t = self._read_raw(name, group)
        if not info.quantized and t.dtype != self.dtype:
            t = t.to(self.dtype)
        if device.type != "cpu" or (self.split and tier is self.tiers.device):
            with self.tracer.span("h2d", f"h2d {group}", group=group, bytes=nbytes):
                t = t.to(device)  # its own memory (the device tier)
            self.counters.h2d_bytes += nbytes
        return t

    def _load_group(self, g: Group, tier, tier_name: str) -> dict[str, torch.Tensor]:
        device = self.device if (tier_name == "device" and self.split) else torch.device("cpu")
        table = {}
        for key, name in g.tensors:
            if name not in self._held_by_name:
                self._held_by_name[name] = self._load(name, tier, g.name, device)
            table[key] = self._held_by_name[name]
        return table

    def _fill(self, g: Group, views: dict[str, torch.Tensor]) -> None:
        """Load a host-tier group's tensors into its arena views, cast to the compute dtype."""
        done = set()
        for key, name in g.tensors:
            if name in done:
                continue
            done.add(name)
            info = self.store.info(name)
            dst = views[key]
            if info.quantized or info.dtype == dst.dtype:
                with self.tracer.span("disk", f"read {g.name}", group=g.name, bytes=info.nbytes):
                    self.store.read_into(name, dst.data if info.quantized else dst, verify=True, drop_cache=True)
                self.counters.disk_read_bytes += info.nbytes
            else:
                dst.copy_(self._read_raw(name, g.name))

    def _occupancy(self) -> None:
        occ = self.tiers.occupancy()
        self.tracer.counter("occupancy", **occ)

    # ------------------------------------------------------------------ the reader thread
    def _read_group(self, group: Group, slot_views: dict[str, torch.Tensor]) -> int:
        """disk -> host slot: all of the group's tensors, split in pieces read in parallel (O_DIRECT)."""
        verify = self._verified is not None and group.name not in self._verified
        items = [(name, _bytes(slot_views[key])) for key, name, _off, _nb, _dt, _info in self._raw[group.name].entries]
        n = self.store.read_many(items, executor=self._pool, verify=verify, drop_cache=True)
        if verify:
            self._verified.add(group.name)
        return n

    def _fill_slot(self, group: Group, slot: int):
        """On the reader thread: bring ``group`` into ``slot``; returns the copy's event (split) or None."""
        if self.split:
            return self._fetch_up(group, slot)
        with self.tracer.span("disk", f"read {group.name}", group=group.name) as a:
            a["bytes"] = nb = self._read_group(group, self._views[slot][group.name])
        self.counters.disk_read_bytes += nb
        return None

    def _fetch_up(self, group: Group, slot: int):
        """disk -> raw host slot (disk groups) -> device slot on the copy stream; returns the copy's event."""
        name, accel = group.name, self.accel
        host_i = None
        if self.tier_of[name] == "disk":
            host_i = self._host_i
            self._host_i = (host_i + 1) % len(self._host_slots)
            if self._host_busy[host_i] is not None:
                accel.sync_event(self._host_busy[host_i])  # the last copy out of this raw slot is done
            src = self._raw_views[host_i][name]
            with self.tracer.span("disk", f"read {name}", group=name) as a:
                a["bytes"] = nb = self._read_group(group, src)
            self.counters.disk_read_bytes += nb
        else:
            src = self._host_src[name]
        dst = self._views[slot][name]
        ev = accel.event()
        with accel.on(self._copy_stream):
            if self._compute_done[slot] is not None:
                accel.wait(self._compute_done[slot], self._copy_stream)  # compute is done with this slot
            # the span inside the stream's context: when profiling on CUDA it waits for this stream's copies
            with self.tracer.span("h2d", f"h2d {name}", group=name) as a:
                nb = 0
                done = set()
                for key, t in dst.items():
                    if id(t) in done:
                        continue
                    done.add(id(t))
                    s = src[key]
                    if isinstance(t, QTensor):  # blocks go up as they are (dequantized where computed)
                        t.data.copy_(s.data, non_blocking=True)
                    elif s.dtype == t.dtype:
                        t.copy_(s, non_blocking=True)
                    else:  # up as stored into the cast buffer, cast on the device (same stream: ordered)
                        stage = self._cast_buf[:s.numel() * s.element_size()].view(s.dtype).view(s.shape)
                        stage.copy_(s, non_blocking=True)
                        t.copy_(stage, non_blocking=True)
                    nb += _bytes(s).numel()
                accel.record(ev, self._copy_stream)
                a["bytes"] = nb
        self.counters.h2d_bytes += nb
        if host_i is not None:
            self._host_busy[host_i] = ev
        return ev

    # ------------------------------------------------------------------ the compute side
    def _take(self, seq: int, group: str):
        return self._ring.take(seq, waiting=lambda: self.tracer.span("compute", f"wait {group}", group=group,
                                                                     **{"pass": self._pass}))

    def _release(self, slot: int) -> None:
        ev = self.accel.event()
        if ev is not None:
            self.accel.record(ev)  # on the compute stream: the slot is reusable once this layer's kernels ran
        self._compute_done[slot] = ev
        self._ring.release(slot)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for ``ids``, on the compute device: gathered where the table lives; only the rows move."""
        table = self._embed_table
        if table is not None:
            rows = embedding(ids.to(table.device), table)
        else:
            rows = self.store.read_rows(self.embed_name, ids.tolist())  # only the rows needed, from disk
            self.counters.disk_read_bytes += _bytes(rows).numel()
            if isinstance(rows, QTensor):
                rows = embedding(torch.arange(rows.shape[0]), rows)
        if rows.device != self.device:
            self.counters.h2d_bytes += _bytes(rows).numel()
        return rows.to(device=self.device, dtype=self.dtype)

    def sweep(self) -> Iterator[tuple[Group, Mapping[str, torch.Tensor]]]:
        n = len(self.streamed)
        # A sweep abandoned half-way (an exception in compute) leaves the ring mid-cycle: skip ahead.
        while n and self._next_seq % n:
            slot, _ = self._take(self._next_seq, "resync")
            self._release(slot)
            self._next_seq += 1
        for g in self.groups:
            table = self._resident.get(g.name)
            if table is not None:
                yield g, table
                continue
            seq = self._next_seq
            slot, event = self._take(seq, g.name)
            if event is not None:
                self.accel.wait(event)  # the weights arrived on the copy stream
            views = self._views[slot][g.name]
            cast = self._cast_views.get(g.name)
            if cast is not None:  # stored at another dtype: cast into the one budgeted buffer
                held = {}
                for key, t in cast.items():
                    if isinstance(t, QTensor):  # blocks are computed from where they were read
                        held[key] = views[key]
                    else:
                        t.copy_(views[key])
                        held[key] = t
                views = held
            ex = self.expert_sets.get(g.name)
            try:
                yield g, (views if ex is None else {**views, "experts": ex})
            finally:
                self._next_seq = seq + 1
                self._release(slot)
        self._pass += 1
        if self._pass % 8 == 1:
            self._occupancy()

    def close(self) -> None:
        for ex in {id(v): v for v in self.expert_sets.values()}.values():
            close = getattr(ex, "close", None)
            if close is not None:
                close()  # prefetch reads in flight finish before the pool goes
        if self._ring is not None:
            self._ring.close()
        self._pool.shutdown(wait=True)
        self.accel.synchronize()  # copies queued on the copy stream finish before their buffers go
        if self._arena is not None:
            self._arena.close()
