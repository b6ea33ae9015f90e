"""The placement planner: which weight group lives on which tier, and how fast that runs.

Pure policy — no torch, no files, no clocks. Inputs are sizes in bytes and
bandwidths in bytes/s; the output is a frozen :class:`Placement` that the memory
manager and the scheduler carry out. Tests run it with made-up numbers in
milliseconds (STYLE.md §3, bookkeeping apart from bytes).

Tiers
-----
``device``  GPU memory. Only when a device budget is given (``Budgets.device``
            not None and > 0); compute then runs there.
``host``    RAM (pinned when CUDA is used). Without CUDA the device tier *is*
            host memory, so residency is simply ``host``.
``disk``    the zarr weight store, read again on every forward pass into
            reusable staging buffers.

Three sizes per group (:class:`GroupSpec`)
------------------------------------------
``nbytes``  held: the group at the compute dtype. What residency costs and what
            the mat-vec reads.
``stored``  the group as stored. What crosses the disk and the host→device link
            (a bf16 store run in float32 moves half the bytes it holds).
``slot``    one staging slot for the group: its stored tensors, each at an
            O_DIRECT-aligned offset (the scheduler's slot layout).

Cost model (decode, one token, after FlexGen)
---------------------------------------------
For every group g, in sweep order::

    compute_g = nbytes_g / matvec  (+ layer_s for a decoder layer)
                (+ (stored_g + nbytes_g) / mem_read when g streams without CUDA and stored ≠ held: the cast)
    disk_g    = stored_g / disk_read   if g streams from disk, else 0
    h2d_g     = moved_g / h2d          if CUDA and g is not device-resident, else 0
                (moved: stored bytes for a disk group, held bytes for a host copy, kept at the compute dtype)
    time_g    = max(compute_g, disk_g, h2d_g)

    predicted_s_per_token = token_s + Σ_g time_g

``matvec`` is the measured weight bytes/s of a decode layer's mat-vecs at the compute
dtype, ``layer_s`` the measured rest of a decode layer (norms, RoPE, attention over a
short context, kernel calls), ``token_s`` the measured per-token work outside the
sweep (embedding, sampling); see offload_rt.memory.calibrate.

A group's transfers are assumed to overlap with compute (the scheduler loads
group g while earlier groups compute), but transfers are never assumed to hide
behind the compute of *other* groups — a conservative figure. One refinement:
with a single staging buffer (``prefetch_depth == 1``) a fetched group that
directly follows another fetched group cannot be loaded until that group has
finished computing, so it pays ``compute_g + transfer_g``.

Two more figures are reported beside it:

* ``overlapped_s_per_token = token_s + max(Σ compute, Σ disk, Σ h2d)`` — the fully
  overlapped lower bound: every link busy all the time.
* ``pipelined_s_per_token`` — a small discrete-event simulation of the
  scheduler (disk reader, copy engine and compute as serial resources, at most
  ``prefetch_depth`` fetched groups in flight, steady state over sweeps). It
  lies between the two and is the figure that rewards interleaving (below).

``bound`` names the term that accounts for most of ``predicted_s_per_token``
(each group's time attributed to its largest term): ``disk``, ``h2d`` or
``compute``.

Budgets (every byte the run reserves in its Tiers, nothing else)
----------------------------------------------------------------
Without CUDA (one memory, the host):
        host-resident groups (held) + ``depth`` slots of the largest disk group (stored
        layout, what reads land in) + one cast buffer (held layout) when a disk group is
        stored at another dtype + KV + ``activation_bytes`` + the untied embedding table if kept.
With CUDA:
  Host:   host-resident groups (held layout, in one page-locked arena) + ``depth`` raw
          staging slots of the largest disk group (stored layout, page-locked) + KV when
          on the host + the untied embedding table if kept (rows are gathered on the host,
          only they go up).
  Device: device-resident groups (held) + ``depth`` slots of the largest fetched group's
          held layout + a cast buffer (the largest stored tensor to cast, when a fetched
          group needs one) + KV when on the device + ``activation_bytes``.

KV goes on the device when it fits there beside one staging buffer, otherwise
it lives on the host. Without CUDA it is on the host.

An untied embedding table (``embed_bytes``) is kept in host RAM only when no group
streams from disk and it fits; otherwise its rows are read from the store per token
(a few KiB). A tied one is the head's output matrix and belongs to the head group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal, Mapping, Sequence

from offload_rt.config import format_size
from offload_rt.errors import BudgetError

# Bounds for the automatic prefetch depth; kept equal to [planner] in configs/defaults.toml
# (tests/test_presets.py checks they agree).
MIN_PREFETCH_DEPTH = 1
MAX_PREFETCH_DEPTH = 4

Tier = Literal["device", "host", "disk"]
TIERS: tuple[str, ...] = ("device", "host", "disk")
_EPS = 1e-9  # relative tolerance when comparing predicted times


@dataclass(frozen=True)
class GroupSpec:
    """One unit of placement: a decoder layer or the head, in sweep order.

    Sizes count every tensor the group's sweep step uses, a tied embedding included in
    the head (the head mat-vec reads the whole embedding matrix every token).
    """

    name: str  # unique, e.g. "layers.0" or "head"
    kind: Literal["layer", "head"]
    nbytes: int  # held: bytes of the group's tensors at the compute dtype (residency, mat-vec)
    stored_bytes: int | None = None  # bytes as stored: what a fetch moves over disk / host→device (None: nbytes)
    slot_bytes: int | None = None  # one staging slot: stored tensors at aligned offsets (None: stored)
    held_slot_bytes: int | None = None  # the tensors at the compute dtype, aligned (a ring slot, a pinned copy)
    cast_bytes: int | None = None  # largest stored tensor that needs a cast to the compute dtype (0: none)

    @property
    def stored(self) -> int:
        return int(self.nbytes if self.stored_bytes is None else self.stored_bytes)

    @property
    def slot(self) -> int:
        return int(self.stored if self.slot_bytes is None else self.slot_bytes)

    @property
    def held_slot(self) -> int:
        """Not given: the stored layout when sizes agree (same dtype), else the packed held bytes."""
        if self.held_slot_bytes is not None:
            return int(self.held_slot_bytes)
        return self.slot if self.nbytes == self.stored else int(self.nbytes)

    @property
    def cast(self) -> int:
        """Not given: nothing to cast when sizes agree, else the whole stored group (an upper bound)."""
        if self.cast_bytes is not None:
            return int(self.cast_bytes)
        return 0 if self.nbytes == self.stored else self.stored


@dataclass(frozen=True)
class Bandwidths:
    """Measured (or hinted) speeds in bytes/s and fixed costs in s; see offload_rt.memory.calibrate."""

    disk_read: float  # cold sequential read of the weight store, large reads
    mem_read: float  # RAM read bandwidth (torch sum), all threads
    matvec: float  # weight bytes/s of a decode layer's mat-vecs at the compute dtype (the kernel decode runs)
    h2d: float | None = None  # pinned host→device copy; None = no CUDA
    matvec_by_dtype: Mapping[str, float] = field(default_factory=dict, compare=False)  # "float32" → bytes/s
    layer_s: float = 0.0  # seconds per decoder layer per decode token besides its mat-vec bytes
    token_s: float = 0.0  # seconds per decode token outside the sweep (embedding, sampling, the loop)
    layer_s_by_dtype: Mapping[str, float] = field(default_factory=dict, compare=False)  # "float32" → s

    def for_dtype(self, dtype: str | None) -> "Bandwidths":
        """The same figures with ``matvec`` and ``layer_s`` taken for ``dtype`` where it was measured."""
        out = self
        if dtype and dtype in self.matvec_by_dtype:
            out = replace(out, matvec=float(self.matvec_by_dtype[dtype]))
        if dtype and dtype in self.layer_s_by_dtype:
            out = replace(out, layer_s=float(self.layer_s_by_dtype[dtype]))
        return out


@dataclass(frozen=True)
class Budgets:
    """Byte budgets, already resolved (offload_rt.memory.budgets.resolve_budget)."""

    device: int | None  # GPU bytes; None (or 0) = no device tier: compute on the CPU
    host: int  # RAM bytes for resident weights, staging buffers, host KV and activations


@dataclass(frozen=True)
class GroupCost:
    """Predicted seconds per decode token for one group."""

    compute_s: float
    disk_s: float  # 0 unless the group streams from disk
    h2d_s: float  # 0 unless CUDA and the group is not device-resident
    time_s: float  # what the group adds to predicted_s_per_token


@dataclass(frozen=True)
class Placement:
    """The plan: where every weight group lives and what that costs per decode token."""

    tiers: Mapping[str, str]  # group name → "device" | "host" | "disk"
    tier_bytes: Mapping[str, int]  # "device"/"host"/"disk" → weight bytes held there (disk: as stored)
    stream_bytes_per_token: int  # bytes read from disk per decode token (as stored)
    h2d_bytes_per_token: int  # bytes copied host→device per decode token (0 without CUDA)
    prefetch_depth: int  # fetched groups in flight (staging buffers per tier)
    buffer_bytes: int  # host staging slots (inside the host budget)
    device_buffer_bytes: int  # device staging: depth × the largest slot of a group not on the device
    kv_bytes: int  # KV cache bytes
    kv_tier: str  # "device" | "host"
    activation_bytes: int  # counted in the host budget
    host_used_bytes: int  # everything counted against the host budget
    device_used_bytes: int  # everything counted against the device budget (0 without one)
    min_working_set: int  # smallest host budget any placement of this model can run in (bytes)
    predicted_s_per_token: float  # token_s + Σ_g max(compute_g, disk_g, h2d_g)
    predicted_tok_s: float
    overlapped_s_per_token: float  # token_s + max(Σ compute, Σ disk, Σ h2d): lower bound
    pipelined_s_per_token: float  # scheduler simulation with prefetch_depth buffers
    bound: str  # "disk" | "h2d" | "compute"
    per_group: Mapping[str, GroupCost]
    group_bytes: Mapping[str, int]  # held bytes per group (a tied embedding inside the head)
    cuda: bool  # a device tier was planned
    embed_tier: str = ""  # untied embedding table: "device" | "host" resident, "disk" = rows read; "" = none (tied)
    embed_bytes: int = 0  # bytes of the resident untied embedding table (0 when its rows are read)

    @property
    def streamed(self) -> list[str]:
        """Names of the groups read from disk every pass, in sweep order."""
        return [n for n, t in self.tiers.items() if t == "disk"]

    @property
    def resident_bytes(self) -> int:
        return self.tier_bytes.get("device", 0) + self.tier_bytes.get("host", 0)


# ---------------------------------------------------------------------------- helpers


def spread(k: int, n: int) -> list[int]:
    """``k`` of ``range(n)`` spread evenly: gaps differ by at most one.

    >>> spread(3, 12), spread(1, 5), spread(4, 4)
    ([2, 6, 10], [2], [0, 1, 2, 3])
    """
    if k <= 0 or n <= 0:
        return []
    k = min(k, n)
    return [int((i + 0.5) * n / k) for i in range(k)]


def cli_size(n: int, *, round_up: bool = False) -> str:
    """A size as a user would type it: ``100M``, ``1.3G``; ``round_up`` to one decimal of G / whole M."""
    g, m = 1 << 30, 1 << 20
    if n >= g:
        v = n / g
        v = math.ceil(v * 10 - 1e-9) / 10 if round_up else round(v, 2)
        return f"{v:g}G"
    if n >= m or round_up:
        v = n / m
        v = math.ceil(v - 1e-9) if round_up else round(v, 1)
        return f"{v:g}M"
    return f"{n}"


def _largest(sizes: Iterable[int]) -> int:
    return max(sizes, default=0)


def _moved(g: GroupSpec, tier: str) -> int:
    """Bytes a fetch copies host→device: as stored from a disk slot, at the compute dtype from a host copy."""
    return g.stored if tier == "disk" else g.nbytes


def _is_fetched(tier: str, cuda: bool) -> bool:
    """Moved every pass: from disk, and with CUDA also from host RAM up to the device."""
    return tier != "device" if cuda else tier == "disk"


class _Candidate:
    """One feasible assignment under evaluation (internal)."""

    __slots__ = ("tiers", "depth", "predicted", "pipelined", "costs", "host_used", "device_used")

    def __init__(self, tiers: list[str], depth: int):
        self.tiers = tiers
        self.depth = depth


# ---------------------------------------------------------------------------- cost model


def _group_costs(groups: Sequence[GroupSpec], tiers: Sequence[str], bw: Bandwidths, depth: int,
                 cuda: bool) -> list[GroupCost]:
    out: list[GroupCost] = []
    n = len(groups)
    fetched = [_is_fetched(t, cuda) for t in tiers]
    for i, (g, t) in enumerate(zip(groups, tiers)):
        c = g.nbytes / bw.matvec + (bw.layer_s if g.kind == "layer" else 0.0)
        if t == "disk" and not cuda and g.stored != g.nbytes:
            c += (g.stored + g.nbytes) / bw.mem_read  # the slot is cast to the compute dtype on the CPU
        d = g.stored / bw.disk_read if t == "disk" else 0.0
        h = _moved(g, t) / bw.h2d if (cuda and t != "device" and bw.h2d) else 0.0
        time = max(c, d, h)
        if depth == 1 and fetched[i] and n > 1 and fetched[i - 1]:
            # one buffer: this load waits until the previous fetched group has computed
            time = c + max(d, h)
        out.append(GroupCost(c, d, h, time))
    return out


def _pipelined(costs: Sequence[GroupCost], tiers: Sequence[str], depth: int, cuda: bool) -> float:
    """Steady-state seconds per sweep of a simulated scheduler.

    Resources are serial: the disk reader, the host→device copy engine (CUDA) and
    compute. A fetched group (not resident where compute runs) goes disk → [h2d] →
    compute; its first transfer may start only once the fetched group ``depth``
    places earlier has finished computing (its buffer is then free). Three sweeps
    run back to back; the third one's duration is the steady state. Each stage takes
    the group's ``disk_s``, ``h2d_s`` and ``compute_s`` from ``costs``.
    """
    n = len(costs)
    if n == 0:
        return 0.0
    disk_free = h2d_free = compute_free = 0.0
    done: list[float] = []  # compute end time of each fetched job, in order
    ends = []
    for _sweep in range(3):
        for c, t in zip(costs, tiers):
            fetched = _is_fetched(t, cuda)
            ready = 0.0
            if fetched:
                k = len(done)
                ready = done[k - depth] if k >= depth else 0.0
                if t == "disk":
                    start = max(disk_free, ready)
                    disk_free = start + c.disk_s
                    ready = disk_free
                if cuda and c.h2d_s:
                    start = max(h2d_free, ready)
                    h2d_free = start + c.h2d_s
                    ready = h2d_free
            start = max(compute_free, ready)
            compute_free = start + c.compute_s
            if fetched:
                done.append(compute_free)
        ends.append(compute_free)
    return ends[2] - ends[1]


def _bound(costs: Sequence[GroupCost]) -> str:
    acc = {"compute": 0.0, "disk": 0.0, "h2d": 0.0}
    for g in costs:
        name = max((("compute", g.compute_s), ("disk", g.disk_s), ("h2d", g.h2d_s)), key=lambda kv: kv[1])[0]
        acc[name] += g.time_s
    return max(acc, key=lambda k: (acc[k], k == "compute"))


# ---------------------------------------------------------------------------- memory


def host_staging_bytes(groups: Sequence[GroupSpec], tiers: Sequence[str], depth: int, cuda: bool) -> int:
    """Host slots the scheduler reserves for a placement (see the module docstring)."""
    disk = [g for g, t in zip(groups, tiers) if t == "disk"]
    if not disk:
        return 0
    if cuda:  # raw reads land in page-locked slots; any cast happens on the device
        return depth * _largest(g.slot for g in disk)
    cast = _largest(g.held_slot for g in disk if g.cast)  # compute casts a slot into this one buffer
    return depth * _largest(g.slot for g in disk) + cast


def device_staging_bytes(groups: Sequence[GroupSpec], tiers: Sequence[str], depth: int, cuda: bool) -> int:
    """Device slots the scheduler reserves: ``depth`` of the largest fetched held layout, plus the cast buffer."""
    if not cuda:
        return 0
    return (depth * _largest(g.held_slot for g, t in zip(groups, tiers) if t != "device")
            + _largest(g.cast for g, t in zip(groups, tiers) if t == "disk"))


# ---------------------------------------------------------------------------- choosing


def _streaming_sets(layers: list[int], head: list[int]) -> list[list[int]]:
    """Candidate index sets to move down a tier, fewest first.

    Layers are taken ``spread`` evenly through the sweep; the head is kept up
    unless every layer has gone already (it is usually the largest group, and its
    staging buffer would be sized by it).
    """
    sets = [[]]
    for k in range(1, len(layers) + 1):
        sets.append([layers[i] for i in spread(k, len(layers))])
    if head:
        sets.append(sorted(layers + head))
    return sets


def plan(
    groups: Sequence[GroupSpec],
    budgets: Budgets,
    bw: Bandwidths,
    *,
    kv_bytes: int,
    prefetch_depth: int | None = None,
    activation_bytes: int = 0,
    embed_bytes: int = 0,
    depth_bounds: tuple[int, int] = (MIN_PREFETCH_DEPTH, MAX_PREFETCH_DEPTH),
    kv_device_ok: bool = True,
) -> Placement:
    """Place ``groups`` (sweep order: layers 0..N-1, then the head) on device/host/disk.

    Policy: maximise resident bytes, device before host before disk. Groups that
    must stream are chosen **spread evenly through the sweep** (``spread``), not
    as a contiguous block. Why: the disk reader fetches the next streamed layer
    while the resident layers before it compute. With streamed layers interleaved,
    every read has a run of resident compute to hide behind, and the reader stays
    busy all sweep long; with one contiguous block, the reader sits idle (buffers
    full) during the resident stretch and then the block runs at bare disk speed,
    one layer at a time. ``pipelined_s_per_token`` shows the difference.

    ``prefetch_depth`` None: tried from ``depth_bounds`` (1..4 by default); the
    plan with the lowest ``predicted_s_per_token`` wins, then the lowest
    ``pipelined_s_per_token``, then the deeper prefetch (spare budget buys depth,
    depth never costs a resident layer unless it pays). Since every candidate's
    cost is independent of the host budget and a larger budget only admits more
    candidates, the prediction never gets worse as ``--cpu-mem`` grows.

    ``embed_bytes``: an untied embedding table at the compute dtype (0 when tied or
    absent). It costs ~nothing per token either way (a few rows), so it never displaces
    a group: it is kept resident, where compute runs, only when no group streams from
    disk and it fits beside everything else; otherwise its rows are read from the store.

    ``kv_bytes``: what the KV cache takes (offload_rt.memory.kv_plan: its RAM part when it
    spills to disk); ``kv_device_ok`` False keeps it off the device.

    Raises BudgetError when a budget cannot hold the minimum working set
    (one group in flight, its staging buffer, KV cache and activations).
    """
    if not groups:
        raise ValueError("plan() needs at least one group")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError("group names must be unique")
    groups = list(groups)
    held = [int(g.nbytes) for g in groups]
    held_slots = [g.held_slot for g in groups]
    casts = [g.cast for g in groups]
    if any(min(g.nbytes, g.stored, g.slot) < 0 for g in groups) or min(kv_bytes, activation_bytes, embed_bytes) < 0:
        raise ValueError("sizes must not be negative")
    cuda = budgets.device is not None and budgets.device > 0
    if cuda and not bw.h2d:
        raise ValueError("a device budget needs a measured host→device bandwidth (Bandwidths.h2d)")
    lo, hi = depth_bounds
    if prefetch_depth is not None:
        if prefetch_depth < 1:
            raise ValueError("prefetch_depth must be at least 1")
        depths = [prefetch_depth]
    else:
        depths = list(range(max(1, lo), max(1, lo, hi) + 1))

    n = len(groups)
    layers = [i for i, g in enumerate(groups) if g.kind != "head"]
    head = [i for i, g in enumerate(groups) if g.kind == "head"]
    layer_set, head_set = set(layers), set(head)
    total = sum(held)
    H, D = int(budgets.host), int(budgets.device or 0)

    # With CUDA the activations live where compute runs; host copies are held in their aligned layout.
    act_dev, act_host = (activation_bytes, 0) if cuda else (0, activation_bytes)
    host_held = held_slots if cuda else held
    # KV: on the device when it fits there beside one staging buffer (or beside everything).
    kv_on_device = False
    if cuda and kv_device_ok:  # (not when the KV is chunked across host and disk, or sampled by MagicPIG)
        one_slot = _largest(held_slots) + _largest(casts)
        kv_on_device = kv_bytes + act_dev + (0 if total + kv_bytes + act_dev <= D else one_slot) <= D
    kv_dev = kv_bytes if kv_on_device else 0
    kv_host = 0 if kv_on_device else kv_bytes

    # Level 1 (CUDA only): which groups leave the device ("fetched"). Depends on the device budget only.
    def device_level(depth: int) -> tuple[list[int], int] | None:
        if not cuda:
            return list(range(n)), 0
        best = None
        for cand in _streaming_sets(layers, head):
            down = sum(held[i] for i in cand)
            # the cast buffer counted as if every fetched group came from disk (level 2 may need less)
            used = (total - down + depth * _largest(held_slots[i] for i in cand) + _largest(casts[i] for i in cand)
                    + kv_dev + act_dev)
            if used <= D and (best is None or down < best[0]):
                best = (down, cand, used)
        return None if best is None else (best[1], best[2])

    # Level 2: which of the fetched groups stream from disk; the rest stay in host RAM.
    best: _Candidate | None = None
    device_ok = False
    min_ws_host = None
    for depth in depths:
        level = device_level(depth)
        if level is None:
            continue
        fetched, _ = level
        dev_resident = sum(held[i] for i in range(n) if i not in set(fetched)) if cuda else 0
        device_ok = True
        f_layers = [i for i in fetched if i in layer_set]
        f_head = [i for i in fetched if i in head_set]
        fset = set(fetched)
        for cand in _streaming_sets(f_layers, f_head):
            disk = set(cand)
            tiers = ["disk" if i in disk else ("host" if (i in fset or not cuda) else "device") for i in range(n)]
            used = (sum(host_held[i] for i in fset - disk) + host_staging_bytes(groups, tiers, depth, cuda)
                    + kv_host + act_host)
            dev_used = (dev_resident + device_staging_bytes(groups, tiers, depth, cuda) + kv_dev + act_dev
                        if cuda else 0)
            min_ws_host = used if min_ws_host is None else min(min_ws_host, used)  # the smallest that runs
            if used > H:
                continue
            c = _Candidate(tiers, depth)
            c.host_used, c.device_used = used, dev_used
            c.costs = _group_costs(groups, tiers, bw, depth, cuda)
            c.predicted = bw.token_s + sum(g.time_s for g in c.costs)
            c.pipelined = None
            if best is None or c.predicted < best.predicted * (1 - _EPS):
                best = c
            elif c.predicted <= best.predicted * (1 + _EPS):
                c.pipelined = _pipelined(c.costs, tiers, depth, cuda)
                if best.pipelined is None:
                    best.pipelined = _pipelined(best.costs, best.tiers, best.depth, cuda)
                if c.pipelined < best.pipelined * (1 - _EPS) or (
                    c.pipelined <= best.pipelined * (1 + _EPS) and c.depth > best.depth
                ):
                    best = c

    if not device_ok:
        need = kv_dev + act_dev + min(depths) * _largest(held_slots) + _largest(casts)
        raise _budget_error("device", need,
            f"--gpu-mem {cli_size(D)} is below the minimum working set of {format_size(need)} "
            f"({_in_flight(min(depths))}, buffers{' and KV cache' if kv_dev else ''}); "
            f"raise it to at least {cli_size(need, round_up=True)} or use --device cpu"
        )
    if best is None:
        need = min_ws_host if min_ws_host is not None else kv_host + act_host + _largest(held_slots)
        raise _budget_error("host", need,
            f"--cpu-mem {cli_size(H)} is below the minimum working set of {format_size(need)} "
            f"({_in_flight(min(depths))}, buffers and KV cache); raise it to at least {cli_size(need, round_up=True)}"
        )
    return _placement(best, groups, bw, cuda, kv_bytes, kv_on_device, activation_bytes, min_ws_host,
                      prefetch_depth, embed_bytes, H, D)


def _budget_error(tier: str, need: int, message: str) -> BudgetError:
    """The error, with the tier and the bytes it needs attached (callers that budget in other units,
    such as a GPU footprint that includes the CUDA context, restate it)."""
    e = BudgetError(message)
    e.tier, e.need = tier, int(need)
    return e


def _in_flight(depth: int) -> str:
    return "one layer in flight" if depth == 1 else f"{depth} layers in flight"


def _placement(best, groups, bw, cuda, kv_bytes, kv_on_device, activation_bytes, min_ws, asked_depth,
               embed_bytes, H, D) -> Placement:
    tiers = best.tiers
    depth = best.depth
    fetched = [g for g, t in zip(groups, tiers) if _is_fetched(t, cuda)]
    if not fetched and asked_depth is None:
        depth = MIN_PREFETCH_DEPTH  # nothing streams: depth is moot
    tier_bytes = {t: 0 for t in TIERS}
    for g, t in zip(groups, tiers):
        tier_bytes[t] += g.stored if t == "disk" else g.nbytes
    host_used, device_used = best.host_used, best.device_used
    # The untied embedding table: kept in host RAM when nothing streams from disk and it fits. With CUDA
    # too: a lookup gathers a few rows on the host and sends only those up (device memory is dearer).
    embed_tier, embed_res = ("disk" if embed_bytes else ""), 0
    if embed_bytes and not any(t == "disk" for t in tiers) and host_used + embed_bytes <= H:
        embed_tier, embed_res, host_used = "host", embed_bytes, host_used + embed_bytes
    if embed_res:
        tier_bytes[embed_tier] += embed_res
    costs = best.costs
    predicted = best.predicted
    pipelined = best.pipelined if best.pipelined is not None else _pipelined(costs, tiers, best.depth, cuda)
    overlapped = bw.token_s + max(sum(g.compute_s for g in costs), sum(g.disk_s for g in costs),
                                  sum(g.h2d_s for g in costs))
    return Placement(
        tiers={g.name: t for g, t in zip(groups, tiers)},
        tier_bytes=tier_bytes,
        stream_bytes_per_token=sum(g.stored for g, t in zip(groups, tiers) if t == "disk"),
        h2d_bytes_per_token=sum(_moved(g, t) for g, t in zip(groups, tiers) if _is_fetched(t, cuda)) if cuda else 0,
        prefetch_depth=depth,
        buffer_bytes=host_staging_bytes(groups, tiers, depth, cuda),
        device_buffer_bytes=device_staging_bytes(groups, tiers, depth, cuda),
        kv_bytes=kv_bytes,
        kv_tier="device" if kv_on_device else "host",
        activation_bytes=activation_bytes,
        host_used_bytes=host_used,
        device_used_bytes=device_used if cuda else 0,
        min_working_set=int(min_ws or 0),
        predicted_s_per_token=predicted,
        predicted_tok_s=(1.0 / predicted) if predicted > 0 else math.inf,
        overlapped_s_per_token=overlapped,
        pipelined_s_per_token=bw.token_s + pipelined,
        bound=_bound(costs),
        per_group={g.name: c for g, c in zip(groups, costs)},
        group_bytes={g.name: int(g.nbytes) for g in groups},
        cuda=cuda,
        embed_tier=embed_tier,
        embed_bytes=embed_res,
    )


# ---------------------------------------------------------------------------- --plan


def _runs(groups: Sequence[GroupSpec], tiers: Mapping[str, str]) -> list[str]:
    """Run-length compressed tiers: ``layers 0-5: host``, ``6: disk``, ..., ``head: host``."""
    out: list[str] = []
    layer_tiers = [tiers[g.name] for g in groups if g.kind != "head"]
    i, first = 0, True
    while i < len(layer_tiers):
        j = i
        while j + 1 < len(layer_tiers) and layer_tiers[j + 1] == layer_tiers[i]:
            j += 1
        span = f"{i}" if i == j else f"{i}-{j}"
        out.append(f"{'layers ' if first else ''}{span}: {layer_tiers[i]}")
        first = False
        i = j + 1
    for g in groups:
        if g.kind == "head":
            out.append(f"{g.name}: {tiers[g.name]}")
    return out


def _rate(x: float | None) -> str:
    return "-" if not x else f"{x / 1e9:.2f} GB/s"


def _tok_s(s: float) -> str:
    return "inf" if s <= 0 else f"{1.0 / s:.3g}"


def format_plan(placement: Placement, groups: Sequence[GroupSpec], bw: Bandwidths) -> str:
    """The ``--plan`` report: plain text, one fact per line (safe on any terminal and in logs)."""
    p = placement
    lines = ["placement: " + ", ".join(_runs(groups, p.tiers))]
    tb = p.tier_bytes
    per_tier = [f"{t} {format_size(tb.get(t, 0))}" for t in TIERS if p.cuda or t != "device"]
    embed = {"disk": "; embedding rows read from disk"}.get(
        p.embed_tier, f"; embedding table on {p.embed_tier} ({format_size(p.embed_bytes)})" if p.embed_tier else "")
    lines.append("weights: " + ", ".join(per_tier) + f" ({len(p.streamed)} of {len(groups)} groups streamed)" + embed)
    lines.append(
        f"staging buffers: {p.prefetch_depth} in flight, host {format_size(p.buffer_bytes)}"
        + (f", device {format_size(p.device_buffer_bytes)}" if p.cuda else "")
        + f"; KV cache {format_size(p.kv_bytes)} on {p.kv_tier}"
        + (f"; activations {format_size(p.activation_bytes)}" if p.activation_bytes else "")
    )
    lines.append(
        f"memory used: host {format_size(p.host_used_bytes)} ({p.host_used_bytes} bytes)"
        + (f", device {format_size(p.device_used_bytes)} ({p.device_used_bytes} bytes)" if p.cuda else "")
        + f"; minimum working set {format_size(p.min_working_set)}"
    )
    lines.append(
        f"per token: disk {format_size(p.stream_bytes_per_token)}"
        + (f", host→device {format_size(p.h2d_bytes_per_token)}" if p.cuda else "")
    )
    lines.append(
        f"predicted: {p.predicted_tok_s:.3g} tok/s ({p.predicted_s_per_token * 1e3:.1f} ms/token), bound by {p.bound}; "
        f"pipelined {_tok_s(p.pipelined_s_per_token)} tok/s, fully overlapped {_tok_s(p.overlapped_s_per_token)} tok/s"
    )
    lines.append(
        f"bandwidths: disk {_rate(bw.disk_read)}, memory {_rate(bw.mem_read)}, matvec {_rate(bw.matvec)}"
        + (f", h2d {_rate(bw.h2d)}" if bw.h2d else "")
        + (f"; fixed costs: {bw.layer_s * 1e3:.3f} ms per layer, {bw.token_s * 1e3:.3f} ms per token"
           if bw.layer_s or bw.token_s else "")
    )
    return "\n".join(lines)
