"""The CUDA path's logic on a CPU: a device tier of its own (``SplitAccel``), the same scheduler code.

Regressions of issue 9 that need no GPU: the reader thread's in-place copies into buffers made under
inference mode, the plan counting exactly what the run places on each tier (embedding and KV included,
tied and untied, every store/compute dtype pair), host-slot sizing and rotation, mixed-dtype groups.
"""

from __future__ import annotations

import pytest
import torch

from offload_rt import runtime
from offload_rt.accel import HostAccel, SplitAccel
from offload_rt.engine import Engine, ResidentWeights, model_groups
from offload_rt.memory.plan import Bandwidths, Budgets, plan
from offload_rt.memory.tiers import Tiers
from offload_rt.models import llama
from offload_rt.scheduler import StreamingWeights, _Layout
from storage.formats import FORMATS, QTensor
from tests.fake_store import FakeStore
from tests.test_scheduler import greedy, names, tiny

GPU_BW = Bandwidths(disk_read=1.3e9, mem_read=2.4e10, matvec=2e11, h2d=2.5e10)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def store_of(tied: bool, stored, mixed: bool = False) -> FakeStore:
    """The tiny model's tensors stored at ``stored`` (a torch dtype, or a quantized format's name: matrices
    in its blocks, vectors in float32, as a GGUF holds them); ``mixed``: norms kept in float32."""
    _args, sd = tiny(tied)
    out = {}
    for k, v in sd.items():
        if isinstance(stored, str):
            out[k] = quantized(v, stored) if v.dim() == 2 else v.float()
        else:
            out[k] = v.float() if (mixed and v.dim() == 1) else v.to(stored)
    return FakeStore(out)


def quantized(v: torch.Tensor, fmt: str) -> QTensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    blocks = quantize(v.float().numpy(), GGMLQuantizationType[fmt.upper()])
    return QTensor(torch.from_numpy(blocks), FORMATS[fmt], tuple(v.shape))


def reference(tied: bool, store: FakeStore, dtype: torch.dtype) -> list[int]:
    args, _ = tiny(tied)
    src = ResidentWeights(model_groups(args), lambda n: store.tensors[n].to(dtype=dtype), llama.EMBED)
    eng = Engine(args, src, dtype, prefill_chunk=5, max_tokens=64)
    with torch.inference_mode():
        return greedy(eng, PROMPT)


def run(tied, store, dtype, tiers_of, *, accel, depth=2, embed_tier="disk", kv_tier="host", build_in_inference=True):
    args, _ = tiny(tied)
    tiers = Tiers(host_budget=None, device_budget=None, cuda=accel.split)
    if build_in_inference:  # as the app does: every tier tensor is made under inference mode
        with torch.inference_mode():
            src = StreamingWeights(store, model_groups(args), tiers_of, dtype, embed_name=llama.EMBED,
                                   embed_tier=embed_tier, tiers=tiers, accel=accel, depth=depth, kv_tier=kv_tier)
    else:
        src = StreamingWeights(store, model_groups(args), tiers_of, dtype, embed_name=llama.EMBED,
                               embed_tier=embed_tier, tiers=tiers, accel=accel, depth=depth, kv_tier=kv_tier)
    eng = Engine(args, src, dtype, prefill_chunk=5, max_tokens=64, kv_device=src.kv_device)
    try:
        with torch.inference_mode():
            return greedy(eng, PROMPT), src
    finally:
        eng.close()


@pytest.mark.parametrize("accel", [HostAccel(), SplitAccel()], ids=["host", "split"])
def test_reader_thread_updates_inference_mode_buffers(accel):
    """Regression (defect 1): slots made under inference_mode() and filled in place by the reader thread
    (not in inference mode: it is per thread) raised "Inplace update to inference tensor outside InferenceMode"."""
    store = store_of(False, torch.float32)
    ref = reference(False, store, torch.float32)
    tiers_of = {n: "disk" for n in names(False)}
    out, src = run(False, store, torch.float32, tiers_of, accel=accel)
    assert out == ref and src.counters.disk_read_bytes > 0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("stored,dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
                         ids=["f32-f32", "bf16-f32", "bf16-bf16", "f32-bf16"])
def test_split_placements_give_the_cpu_tokens(tied, stored, dtype):
    """Device, host copies (streamed up) and disk, interleaved, with the embedding from each place."""
    store = store_of(tied, stored)
    ref = reference(tied, store, dtype)
    ns = names(tied)
    cycle = ["device", "host", "disk"]
    mixed = {n: cycle[i % 3] for i, n in enumerate(ns)}
    head_host = {**{n: "device" for n in ns}, "head": "host"}  # defect 7: tied head fetched from host RAM
    for tiers_of, embed in [(mixed, "disk"), (head_host, "host"), ({n: "host" for n in ns}, "host"),
                            ({n: "device" for n in ns}, "host")]:
        out, _ = run(tied, store, dtype, tiers_of, accel=SplitAccel(), depth=3, embed_tier=embed)
        assert out == ref, (tiers_of, embed)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_quantized_blocks_stream_on_both_paths(tied, fmt):
    """Quantized matrices go through slots, the pinned arena and device slots as blocks (the same bytes as
    stored) and give the resident run's tokens on every placement, the embedding gathered from its blocks."""
    store = store_of(tied, fmt)
    ref = reference(tied, store, torch.float32)
    ns = names(tied)
    cycle = ["device", "host", "disk"]
    for accel in (HostAccel(), SplitAccel()):
        for tiers_of, embed in [({n: cycle[i % 3] for i, n in enumerate(ns)}, "disk"),
                                ({n: "disk" for n in ns}, "host")]:
            if not accel.split:
                tiers_of = {n: ("host" if t == "device" else t) for n, t in tiers_of.items()}
            out, src = run(tied, store, torch.float32, tiers_of, accel=accel, depth=3, embed_tier=embed)
            assert out == ref, (accel, tiers_of, embed)
            # what crossed the links are the stored blocks (float32 would be ~4-6x more): at most every
            # tensor once per pass (2 prefill + 12 decode passes) and the next pass's read-ahead
            stored = sum(store.info(n).nbytes for n in store.tensors)
            assert 0 < src.counters.disk_read_bytes <= 15 * stored


def test_mixed_dtype_groups_stream_on_both_paths():
    """Regression (defect 8): only a group's first tensor's dtype was checked, so F16 matrices beside F32
    norms (GGUF) were not all cast."""
    store = store_of(False, torch.float16, mixed=True)
    ref = reference(False, store, torch.float32)
    tiers_of = {n: ("disk" if i % 2 else "host") for i, n in enumerate(names(False))}
    for accel in (HostAccel(), SplitAccel()):
        assert run(False, store, torch.float32, tiers_of, accel=accel)[0] == ref


def test_split_host_slots_hold_disk_groups_only_and_rotate():
    """Regression (defect 11): host slots were sized by the largest fetched group (host ones too), fixed at
    two, and the slot index advanced on host groups as well, so interleaved placements reused one slot."""
    store = store_of(False, torch.float32)
    args, _ = tiny(False)
    groups = model_groups(args)
    # sizing: only the (small) head streams from disk; the larger layers are host copies, fetched too
    tiers_of = {g.name: ("disk" if g.kind == "head" else "host") for g in groups}
    _out, src = run(False, store, torch.float32, tiers_of, accel=SplitAccel(), depth=3)
    assert len(src._host_slots) == 3
    assert src._host_slots[0].numel() == _Layout(store, groups[-1]).nbytes < _Layout(store, groups[0]).nbytes
    # rotation: odd layers on disk, interleaved with host copies
    tiers_of = {g.name: ("disk" if g.kind == "layer" and g.index % 2 else "host") for g in groups}
    dests = []
    orig = store.read_many

    def spy(items, **kw):
        dests.append(items[0][1].data_ptr())
        return orig(items, **kw)

    store.read_many = spy
    _out, src = run(False, store, torch.float32, tiers_of, accel=SplitAccel(), depth=3)
    # consecutive disk reads land in the 3 raw slots in turn
    assert len(dests) >= 6 and len(set(dests[:3])) == 3 and dests[3:6] == dests[:3]


def test_kv_cache_lives_on_the_planned_tier():
    """Regression (defect 3): the cache was built on the compute device whatever the plan said."""
    store = store_of(False, torch.float32)
    ns = names(False)
    for kv_tier, want in (("host", torch.device("cpu")), ("device", SplitAccel().device)):
        _out, src = run(False, store, torch.float32, {n: "device" for n in ns}, accel=SplitAccel(), kv_tier=kv_tier)
        assert src.kv_device == want
    args, _ = tiny(False)
    eng = Engine(args, ResidentWeights(model_groups(args), lambda n: store.tensors[n], llama.EMBED), torch.float32,
                 max_tokens=16, kv_device="cpu")
    assert eng.cache.device == torch.device("cpu") and eng.cache.compute_device == torch.device("cpu")


def _prepared(tied, stored, dtype, host, device, kv_tokens=48):
    store = store_of(tied, stored)
    args, _ = tiny(tied)
    groups = model_groups(args)
    specs = runtime.group_specs(store, groups, dtype, args)
    p = plan(specs, Budgets(device=device, host=host), GPU_BW,
             kv_bytes=runtime.kv_reserve_bytes(args, dtype, kv_tokens), activation_bytes=runtime.activation_bytes(args, 4),
             embed_bytes=runtime.untied_embed_bytes(store, args, dtype), depth_bounds=(2, 3))
    return store, args, groups, runtime.Prepared(p, GPU_BW, specs, Budgets(device=device, host=host), "cuda")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("stored,dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.float32, torch.bfloat16), ("q4_1", torch.float32),
                                          ("q8_0", torch.bfloat16)],
                         ids=["f32-f32", "bf16-f32", "f32-bf16", "q4_1-f32", "q8_0-bf16"])
def test_plan_counts_what_the_split_run_places_on_each_tier(tied, stored, dtype):
    """The plan's device and host figures are the bytes the run reserves, tier by tier (weights, slots,
    cast buffer, KV, activations, embedding), for device budgets from everything-fits to one-layer-fits."""
    _s, args, groups, big = _prepared(tied, stored, dtype, 1 << 40, 1 << 40)
    total = big.placement.device_used_bytes
    seen = set()
    for frac in (1.0, 0.85, 0.7, 0.45, 0.3):
        try:
            store, args, groups, prep = _prepared(tied, stored, dtype, int(total * 0.6), int(total * frac))
        except Exception as e:  # a budget below the minimum working set is refused by the plan, not the run
            assert "minimum working set" in str(e)
            continue
        p = prep.placement
        seen.add(tuple(sorted(set(p.tiers.values()))))
        with torch.inference_mode():
            src = prep.factory(None, accel=SplitAccel())(store, args, dtype, groups)
        try:
            assert src.tiers.device.used == p.device_used_bytes <= prep.budgets.device, p
            assert src.tiers.host.used == p.host_used_bytes <= prep.budgets.host, p
            assert src._arena.nbytes == sum(v for k, v in src.tiers.host.items.items()
                                            if k.startswith(("weight.layer", "weight.head", "slot.host")))
        finally:
            src.close()
    assert len(seen) >= 2  # more than one kind of placement was checked
