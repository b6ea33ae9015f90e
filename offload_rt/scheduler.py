"""The pipeline scheduler: a :class:`~offload_rt.engine.WeightSource` that streams weights.

Every forward pass sweeps the same groups in the same order (layers 0..N-1, head).
Groups the plan keeps resident are loaded once. Groups placed on ``disk`` (and, with
CUDA, groups placed on ``host``) are fetched every pass through a ring of reusable
slots, ahead of the compute that needs them::

    reader thread:   read g1 ─ read g2 ─ read g3 ─(slot free?)─ read g1' ...  (disk → host slot)
                               └ h2d g1 ─ h2d g2 ...                          (copy stream, CUDA)
    compute:         embed ─ L0 ─ L1(wait g1) ─ L2 ─ ... ─ head ─ embed ─ L0 ...

Because the weights do not depend on the token, the reader runs ahead across pass
boundaries: while the last layers of token t compute, the first streamed layers of
token t+1 are already being read. Slots are allocated once (pinned with CUDA) and
recycled; nothing is allocated on the hot path (unless the store dtype differs from
the compute dtype, which costs one cast per tensor).

Streamed reads go through ``storage`` with the page cache dropped after each read:
the host tier is the cache, the plan decides what stays.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Mapping, Sequence

import torch

from offload_rt.engine import Group
from offload_rt.memory.tiers import Tiers
from offload_rt.trace import NullTracer
from storage.store import DIRECT_ALIGN, aligned_buffer

ALIGN = DIRECT_ALIGN  # slot offsets and buffers, so O_DIRECT reads land in them directly


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Counters:
    """Bytes moved per link during the run (reported by --stats)."""

    def __init__(self):
        self.disk_read_bytes = 0
        self.h2d_bytes = 0


class _Layout:
    """Where each tensor of a group sits inside a flat slot buffer."""

    def __init__(self, store, group: Group):
        self.entries = []  # (key, name, offset, nbytes, dtype, shape)
        off = 0
        for key, name in group.tensors:
            info = store.info(name)
            self.entries.append((key, name, off, info.nbytes, info.dtype, tuple(info.shape)))
            off = _align(off + info.nbytes)
        self.nbytes = off

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for key, _name, off, nb, dtype, shape in self.entries:
            out[key] = buf[off:off + nb].view(dtype).view(shape)
        return out


class StreamingWeights:
    """Resident groups held once; streamed groups fetched each pass through a slot ring."""

    def __init__(self, store, groups: Sequence[Group], tiers_of: Mapping[str, str], dtype: torch.dtype, *,
                 embed_name: str, embed_tier: str, tiers: Tiers, device: torch.device | str = "cpu",
                 depth: int = 2, readers: int = 8, tracer=None, verify_first_pass: bool = True):
        self.store, self.groups, self.dtype = store, list(groups), dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.tiers = tiers
        self.tracer = tracer or NullTracer()
        self.counters = Counters()
        self.tier_of = dict(tiers_of)
        # What has to move every pass: disk groups (disk->host), and with CUDA host groups too (host->device).
        moving = ("disk", "host") if self.cuda else ("disk",)
        self.streamed = [g for g in self.groups if self.tier_of[g.name] in moving]
        self._seq_of_group = {g.name: i for i, g in enumerate(self.streamed)}
        self._verified: set[str] = set() if verify_first_pass else None
        self._pool = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="offload-read")
        self._pinned_ok = True

        # --- resident groups: loaded once, into their tier
        self._resident: dict[str, dict[str, torch.Tensor]] = {}
        self._host_src: dict[str, dict[str, torch.Tensor]] = {}  # CUDA: pinned host copies to stream up
        cache: dict[str, torch.Tensor] = {}
        for g in self.groups:
            tier = self.tier_of[g.name]
            if tier == "disk":
                continue
            target = "device" if (tier == "device" or not self.cuda) else "host"
            table = {}
            for key, name in g.tensors:
                if (name, target) not in cache:
                    t = self._load(name, target, g.name)
                    cache[(name, target)] = t
                table[key] = cache[(name, target)]
            if tier == "device" or not self.cuda:
                self._resident[g.name] = table
            else:
                self._host_src[g.name] = table

        # --- the embedding: resident, or read by rows from the store
        self.embed_name = embed_name
        self._embed_table = None
        if embed_tier != "disk":
            key = (embed_name, "device" if self.cuda and embed_tier == "device" else ("host" if self.cuda else "device"))
            self._embed_table = cache[key] if key in cache else self._load(embed_name, key[1], "embed")

        # --- the slot rings
        self._layouts = {g.name: _Layout(store, g) for g in self.streamed}
        slot_bytes = max((l.nbytes for l in self._layouts.values()), default=0)
        self.depth = max(1, depth) if self.streamed else 0
        self._host_slots: list[torch.Tensor] = []
        self._dev_slots: list[torch.Tensor] = []
        if self.streamed:
            n_host = self.depth if not self.cuda else 2
            disk_streamed = any(self.tier_of[g.name] == "disk" for g in self.streamed)
            if disk_streamed or not self.cuda:
                for i in range(n_host):
                    tiers.host.reserve(f"slot.host.{i}", slot_bytes)
                    self._host_slots.append(self._alloc_host(slot_bytes))
            if self.cuda:
                for i in range(self.depth):
                    tiers.device.reserve(f"slot.device.{i}", slot_bytes)
                    self._dev_slots.append(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device))
        ring = self._dev_slots if self.cuda else self._host_slots
        self._views = [{name: lay.views(buf) for name, lay in self._layouts.items()} for buf in ring]
        self._host_views = [{name: lay.views(buf) for name, lay in self._layouts.items()} for buf in self._host_slots]

        # --- the reader thread and its hand-off
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(ring)):
            self._free.put(i)
        self._ready: dict[int, tuple[int, object]] = {}  # seq -> (slot, cuda event or None)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._next_seq = 0  # next sequence number the compute side consumes
        self._pass = 0
        self._thread = None
        if self.streamed:
            if self.cuda:
                self._copy_stream = torch.cuda.Stream(device=self.device)
                self._compute_done = [None] * len(ring)
                self._host_busy = [None] * len(self._host_slots)
            self._thread = threading.Thread(target=self._reader_loop, name="offload-prefetch", daemon=True)
            self._thread.start()
        self._occupancy()

    # ------------------------------------------------------------------ loading
    def _alloc_host(self, nbytes: int) -> torch.Tensor:
        """A host buffer whose start is 4 KiB aligned (O_DIRECT reads), pinned with CUDA when possible."""
        return aligned_buffer(nbytes, self._alloc_raw)

    def _alloc_raw(self, nbytes: int) -> torch.Tensor:
        if self.cuda and self._pinned_ok:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:  # pinned allocation can fail (ulimit -l, fragmentation): keep going
                import sys

                print(f"offload-run: warning: pinned host memory unavailable ({e}); using pageable memory, "
                      "host->device copies will be slower", file=sys.stderr)
                self._pinned_ok = False
        return torch.empty(nbytes, dtype=torch.uint8)

    def _load(self, name: str, target: str, group: str) -> torch.Tensor:
        """Read one tensor from the store into its resident tier (the one copy path: store -> host -> device)."""
        info = self.store.info(name)
        tier = self.tiers.get(target)
        nbytes = info.numel * self.dtype.itemsize if hasattr(info, "numel") else \
            int(torch.Size(info.shape).numel()) * self.dtype.itemsize
        tier.reserve(f"weight.{name}", nbytes)
        with self.tracer.span("disk", f"read {group}", group=group, bytes=info.nbytes):
            host = self._alloc_host(info.nbytes) if self.cuda else torch.empty(info.nbytes, dtype=torch.uint8)
            self.store.read_into(name, host, verify=True, drop_cache=True)
        self.counters.disk_read_bytes += info.nbytes
        t = host.view(info.dtype).view(tuple(info.shape))
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
        if target == "device" and self.cuda:
            with self.tracer.span("h2d", f"h2d {group}", group=group, bytes=nbytes):
                t = t.to(self.device)
            self.counters.h2d_bytes += nbytes
        return t

    def _occupancy(self) -> None:
        occ = self.tiers.occupancy()
        self.tracer.counter("occupancy", **occ)

    # ------------------------------------------------------------------ the reader thread
    def _read_group(self, group: Group, slot_views: dict[str, torch.Tensor]) -> int:
        """disk -> host slot: all of the group's tensors, split in pieces read in parallel (O_DIRECT)."""
        layout = self._layouts[group.name]
        verify = self._verified is not None and group.name not in self._verified
        items = [(name, slot_views[key]) for key, name, _off, _nb, _dt, _shape in layout.entries]
        n = self.store.read_many(items, executor=self._pool, verify=verify, drop_cache=True)
        if verify:
            self._verified.add(group.name)
        return n

    def _reader_loop(self) -> None:
        try:
            seq = 0
            host_i = 0
            while not self._stop.is_set():
                try:
                    slot = self._free.get(timeout=0.1)
                except queue.Empty:
                    continue
                group = self.streamed[seq % len(self.streamed)]
                event = None
                if not self.cuda:
                    with self.tracer.span("disk", f"read {group.name}", group=group.name) as a:
                        a["bytes"] = nb = self._read_group(group, self._views[slot][group.name])
                    self.counters.disk_read_bytes += nb
                else:
                    event = self._cuda_fetch(group, slot, host_i)
                    host_i = (host_i + 1) % max(1, len(self._host_slots))
                with self._cond:
                    self._ready[seq] = (slot, event)
                    self._cond.notify_all()
                seq += 1
        except BaseException as e:  # surfaced on the compute side
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _cuda_fetch(self, group: Group, slot: int, host_i: int):
        """disk -> pinned host slot (if on disk) -> device slot on the copy stream; returns the copy event."""
        name = group.name
        if self.tier_of[name] == "disk":
            if self._host_busy[host_i] is not None:
                self._host_busy[host_i].synchronize()  # the previous copy out of this host slot is done
            hv = self._host_views[host_i][name]
            with self.tracer.span("disk", f"read {name}", group=name) as a:
                a["bytes"] = nb = self._read_group(group, hv)
            self.counters.disk_read_bytes += nb
            src = hv
        else:
            src = self._host_src[name]
        dst = self._views[slot][name]
        done = self._compute_done[slot]
        ev = torch.cuda.Event()
        with self.tracer.span("h2d", f"h2d {name}", group=name) as a:
            with torch.cuda.stream(self._copy_stream):
                if done is not None:
                    self._copy_stream.wait_event(done)  # compute finished with this device slot
                nb = 0
                for key, t in dst.items():
                    t.copy_(src[key], non_blocking=True)
                    nb += t.numel() * t.element_size()
                ev.record(self._copy_stream)
            a["bytes"] = nb
        self.counters.h2d_bytes += nb
        if self.tier_of[name] == "disk":
            self._host_busy[host_i] = ev
        return ev

    # ------------------------------------------------------------------ the compute side
    def _take(self, seq: int, group: str):
        with self._cond:
            if seq not in self._ready and self._error is None:
                with self.tracer.span("compute", f"wait {group}", group=group, **{"pass": self._pass}):
                    while seq not in self._ready and self._error is None:
                        self._cond.wait(0.5)
            if self._error is not None:
                raise self._error
            return self._ready.pop(seq)

    def _release(self, slot: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record()  # compute stream: the slot is reusable once this layer's kernels have run
            self._compute_done[slot] = ev
        self._free.put(slot)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed_table is not None:
            return torch.nn.functional.embedding(ids.to(self._embed_table.device), self._embed_table)
        rows = self.store.read_rows(self.embed_name, ids.tolist())  # only the rows needed, from disk
        self.counters.disk_read_bytes += rows.numel() * rows.element_size()
        return rows.to(self.dtype).to(self.device)

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
                torch.cuda.current_stream().wait_event(event)  # weights arrived on the copy stream
            views = self._views[slot][g.name]
            if views and next(iter(views.values())).dtype != self.dtype:
                views = {k: v.to(self.dtype) for k, v in views.items()}  # slow path: store dtype != compute dtype
            try:
                yield g, views
            finally:
                self._next_seq = seq + 1
                self._release(slot)
        self._pass += 1
        if self._pass % 8 == 1:
            self._occupancy()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)
