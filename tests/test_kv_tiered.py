"""The KV protocol's implementations against each other, and the chunk policy on its own.

DenseKV (one buffer, torch attention) is the reference; TieredKV keeps chunks in RAM
(Numba kernels) and spills them to a zarr store on disk. Same inputs, same outputs:
in every tier, after trims into spilled chunks, with tree masks and keep().
"""

from __future__ import annotations

import pytest
import torch

from offload_rt.errors import BudgetError
from offload_rt.kv.dense import DenseKV
from offload_rt.kv.tiered import TieredKV
from offload_rt.memory.kv_plan import (SINK_CHUNKS, STAGING_BATCH, ChunkTable, KVShape, min_host_chunks, split_kv,
                                      staging_batch)

L, NKV, D, NH = 3, 2, 16, 6

# ---------------------------------------------------------------- policy (no tensors)


def test_chunk_table_spills_the_oldest_non_sink_chunk_and_reads_back_after_a_trim():
    t = ChunkTable(n_layers=1, host_slots=3, disk=True)
    assert [t.place(0, c) for c in range(3)] == [(0, [], False), (1, [], False), (2, [], False)]
    slot, spills, load = t.place(0, 3)  # full: chunk 1 (oldest after the sink chunk 0) goes to disk
    assert spills == [(0, 1, 1)] and slot == 1 and not load
    slot, spills, load = t.place(0, 4)
    assert spills == [(0, 2, 2)] and slot == 2
    assert [tier for tier, _s in t.chunks[0]] == ["host", "disk", "disk", "host", "host"]
    assert t.runs(0, 5) == [("host", 0, [0]), ("disk", 1, [-1, -1]), ("host", 3, [1, 2])]
    dropped = t.truncate(2 * 16 + 5, 16)  # back into chunk 2, which is on disk
    assert dropped == [(0, 4, "host"), (0, 3, "host")] and sorted(t.free) == [1, 2]
    slot, spills, load = t.place(0, 2)  # writing resumes in chunk 2: it comes back from disk
    assert load and not spills and t.chunks[0][2] == ("host", slot)
    assert t.place(0, 0) == (0, [], False)  # in RAM already: nothing moves


def test_a_layer_without_chunks_of_its_own_spills_the_fullest_layers_oldest():
    t = ChunkTable(n_layers=2, host_slots=4, disk=True)
    for c in range(4):  # a long prefill: layer 0 takes every slot first
        t.place(0, c)
    slot, spills, _ = t.place(1, 0)
    assert spills == [(0, 1, 1)] and slot == 1  # not layer 0's sink chunk, nor its last (still being written)


def test_chunk_table_without_disk_or_victim_is_an_internal_error():
    t = ChunkTable(n_layers=1, host_slots=1, disk=False)
    t.place(0, 0)
    with pytest.raises(RuntimeError):
        t.place(0, 1)
    with pytest.raises(ValueError):
        ChunkTable(1, 4, True).place(0, 2)  # chunks are placed in order


def test_split_kv_sizes_ram_and_disk():
    shape = KVShape(n_layers=4, kv_heads=2, head_dim=64, itemsize=4, chunk_tokens=256)
    cb = shape.chunk_bytes
    assert cb == 2 * 2 * 256 * 64 * 4
    whole = split_kv(shape, 4096, kv_cpu_mem=None, disk_free=None, model_tokens=8192)
    assert (whole.host_chunks, whole.disk_chunks, whole.staging_chunks) == (64, 0, 0)
    assert whole.host_bytes == 4096 * shape.bytes_per_token and not whole.spills
    part = split_kv(shape, 4096, kv_cpu_mem=40 * cb, disk_free=10 ** 12, model_tokens=8192)
    # RAM: the staging chunks, the key bounds of every chunk the window may spill, chunks in what is left
    assert part.staging_chunks == 2 * STAGING_BATCH and part.bound_bytes == 64 * shape.abstract_bytes
    assert part.host_chunks == (40 * cb - part.bound_bytes) // cb - 2 * STAGING_BATCH
    assert part.host_chunks + part.disk_chunks == 64 and 40 * cb - cb < part.host_bytes <= 40 * cb
    assert part.longest_context == 8192  # the disk has room for the model's whole window
    assert "disk" in part.describe() and "longest context that fits: 8192" in part.describe()
    with pytest.raises(BudgetError, match="--kv-cpu-mem"):
        split_kv(shape, 4096, kv_cpu_mem=cb, disk_free=10 ** 12, model_tokens=8192)
    with pytest.raises(BudgetError, match="--offload-dir"):
        split_kv(shape, 4096, kv_cpu_mem=40 * cb, disk_free=cb, model_tokens=8192)
    with pytest.raises(BudgetError, match="MagicPIG"):
        split_kv(shape, 4096, kv_cpu_mem=40 * cb, disk_free=10 ** 12, model_tokens=8192, table_bytes_per_token=10)
    assert min_host_chunks(shape, 4096) == 4 * (SINK_CHUNKS + 1)


def test_small_chunks_are_read_in_larger_batches_where_the_budget_has_room():
    """Staging (two read batches) of small chunks (q4 records): up to STAGING_BYTES a batch and a sixteenth of
    --kv-cpu-mem, never below two batches of STAGING_BATCH, never pushing the working set out."""
    shape = KVShape(n_layers=30, kv_heads=3, head_dim=64, itemsize=1, quant_row=36, name="q4")  # ~54 KiB chunks
    cb = shape.chunk_bytes
    roomy = split_kv(shape, 8192, kv_cpu_mem=40 << 20, disk_free=10 ** 12, model_tokens=8192)
    assert roomy.spills and roomy.staging_chunks == 2 * staging_batch(cb, 40 << 20) == 2 * ((2 << 20) // cb)
    assert 2 * STAGING_BATCH < roomy.staging_chunks and roomy.staging_chunks * cb <= (40 << 20) // 8
    need = min_host_chunks(shape, 8192)
    least = (need + 2 * STAGING_BATCH) * cb + roomy.bound_bytes + shape.float_bytes
    tight = split_kv(shape, 8192, kv_cpu_mem=least + cb, disk_free=10 ** 12, model_tokens=8192)
    assert tight.staging_chunks == 2 * STAGING_BATCH and tight.host_chunks >= need  # runs, as before
    big = KVShape(n_layers=4, kv_heads=8, head_dim=128, itemsize=2)  # 1 MiB chunks: batches of 8
    assert split_kv(big, 32768, kv_cpu_mem=96 << 20, disk_free=10 ** 12, model_tokens=32768).staging_chunks == 16


# ---------------------------------------------------------------- the implementations against each other


def _pair(dtype, host_chunks, disk_root, chunk=16, max_tokens=600):
    ref = DenseKV(L, NKV, D, dtype, max_tokens)
    kv = TieredKV(L, NKV, D, dtype, max_tokens, host_chunks=host_chunks,
                  staging_chunks=2 * STAGING_BATCH if disk_root else 0, disk_root=disk_root, chunk_tokens=chunk)
    return ref, kv


def _step(ref, kv, T, gen, dtype, tree_mask=None, window=None):
    err = 0.0
    for layer in range(L):
        q, k, v = (torch.randn(T, n, D, generator=gen).to(dtype) for n in (NH, NKV, NKV))
        a = ref.attend(layer, q, k, v, tree_mask=tree_mask, window=window).float()
        b = kv.attend(layer, q, k, v, tree_mask=tree_mask, window=window).float()
        assert b.shape == (T, NH * D)
        err = max(err, (a - b).abs().max().item() / a.abs().max().item())
    ref.commit(T)
    kv.commit(T)
    return err


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("spill", [False, True])
def test_tiered_equals_dense_through_prefill_decode_trim_and_keep(tmp_path, dtype, tol, spill):
    ref, kv = _pair(dtype, host_chunks=8 if spill else 200, disk_root=tmp_path if spill else None)
    gen = torch.Generator().manual_seed(0)
    errs = [_step(ref, kv, T, gen, dtype) for T in (37, 1, 1, 100, 1, 20, 1)]
    if spill:
        assert kv.tier_bytes()["disk"] > 0 and kv.disk_write_bytes > 0 and kv.disk_read_bytes > 0
    else:
        assert kv.tier_bytes()["disk"] == 0 and kv.disk_read_bytes == 0
    assert ref.trim(60) == kv.trim(60) == 60  # back into chunks that were spilled
    errs += [_step(ref, kv, T, gen, dtype) for T in (5, 1)]
    ref.keep(ref.offset - 6, [0, 2, 5])  # a speculation keeps an accepted path
    kv.keep(kv.offset - 6, [0, 2, 5])
    assert ref.offset == kv.offset
    errs += [_step(ref, kv, 1, gen, dtype)]
    assert max(errs) < tol, errs
    kv.close()
    assert not any(tmp_path.iterdir())  # the spilled chunks' store is gone


def test_tree_mask_and_sliding_window_match_dense(tmp_path):
    ref, kv = _pair(torch.float32, host_chunks=8, disk_root=tmp_path)
    gen = torch.Generator().manual_seed(1)
    _step(ref, kv, 70, gen, torch.float32)
    # a tree: node 0 root; 1, 2 children of 0; 3 child of 1; 4 child of 2; 5 child of 3
    parent = [-1, 0, 0, 1, 2, 3]
    tree = torch.zeros(6, 6, dtype=torch.bool)
    for i, p in enumerate(parent):
        tree[i, i] = True
        while p >= 0:
            tree[i, p] = True
            p = parent[p]
    assert _step(ref, kv, 6, gen, torch.float32, tree_mask=tree) < 1e-5
    assert _step(ref, kv, 1, gen, torch.float32, window=24) < 1e-5
    assert _step(ref, kv, 9, gen, torch.float32, window=24) < 1e-5
    kv.close()


def test_cache_refuses_more_than_its_window():
    kv = TieredKV(1, NKV, D, torch.float32, 20, host_chunks=4, chunk_tokens=8)
    with pytest.raises(ValueError, match="cannot hold"):
        kv.attend(0, torch.zeros(21, NH, D), torch.zeros(21, NKV, D), torch.zeros(21, NKV, D))


def side_by_side(ref, kv, passes, gen, nh: int = NH) -> list[float]:
    """Both caches through the same passes (T tokens of random q, k, v in every layer of ``kv``, committed):
    the relative error (Frobenius) of kv's outputs against ref's, per pass and layer."""
    errs = []
    for T in passes:
        for layer in range(kv.n_layers):
            q, k, v = (torch.randn(T, n, kv.head_dim, generator=gen) for n in (nh, kv.kv_heads, kv.kv_heads))
            a, b = ref.attend(layer, q, k, v), kv.attend(layer, q, k, v)
            errs.append(((a - b).norm() / a.norm()).item())
        ref.commit(T)
        kv.commit(T)
    return errs


def test_magicpig_mode_keeps_sinks_and_window_exact_and_samples_the_rest():
    """With K = 1 bit and 64 tables every key collides in >= 2 tables with probability ~1 and u ~ 1:
    the sampled estimate is then exact attention, so the cache's split (sinks + window exact, the
    tables over the rest, extended as chunks leave the window, merged by LSE) must equal DenseKV."""
    ref = DenseKV(2, NKV, D, torch.float32, 1200)
    kv = TieredKV(2, NKV, D, torch.float32, 1200, host_chunks=64, chunk_tokens=64, attention="magicpig",
                  lsh_k=1, lsh_l=64)
    errs = side_by_side(ref, kv, (700, 1, 1, 90, 1), torch.Generator().manual_seed(2))
    assert kv._index[0] is not None and kv._index_stop[0] == ((kv.offset - 1 - 64) // 64) * 64
    assert max(errs) < 1e-3, errs


def test_magicpig_tables_are_built_by_the_prompts_last_pass_as_the_first_step_would_build_them():
    """With expect(n) the prompt's passes before the last build no tables, the last builds every layer's
    (centred on the whole prompt's keys), and the first decode step hashes nothing more; the decode
    outputs equal, bit for bit, those of a cache whose first decode step builds them (prefilled with
    exact attention, switched to MagicPIG after)."""
    def cache():
        return TieredKV(2, NKV, D, torch.float32, 1200, host_chunks=64, chunk_tokens=64, attention="magicpig",
                        lsh_k=4, lsh_l=8)

    early, late = cache(), cache()
    late.attention = "exact"
    gen = torch.Generator().manual_seed(5)
    n, passes = 700, (256, 256, 188)
    early.expect(n)
    for T in passes:
        qkv = [[torch.randn(T, h, D, generator=gen) for h in (NH, NKV, NKV)] for _layer in range(2)]
        assert early._index == [None, None]  # this pass does not reach the prompt's end: no tables yet
        for layer in range(2):
            early.attend(layer, *qkv[layer])
            late.attend(layer, *qkv[layer])
        early.commit(T)
        late.commit(T)
    tables = list(early._index)
    stop = ((n + 1 - 64) // 64) * 64
    assert all(t is not None and t.stop == stop for t in tables) and late._index == [None, None]
    keys = early.rows(0, 4, stop)[0].double()
    assert torch.allclose(torch.from_numpy(tables[0].mean).double(), keys.mean(0), atol=1e-5)
    late.attention = "magicpig"
    for _step in range(3):
        for layer in range(2):
            q, k, v = (torch.randn(1, h, D, generator=gen) for h in (NH, NKV, NKV))
            assert torch.equal(early.attend(layer, q, k, v), late.attend(layer, q, k, v))
        early.commit(1)
        late.commit(1)
    assert early._index == tables and [t.n_tokens for t in tables] == [stop - 4] * 2  # not rebuilt, not extended


@pytest.mark.parametrize("kind", ["dense", "ram", "spilled"])
def test_load_of_a_caches_rows_gives_the_same_rows_and_the_same_attention(tmp_path, kind):
    """load() appends rows read from another cache (the prefix cache's restore): the new cache's rows are
    the source's, bit for bit, and attention over them gives the source's outputs."""
    def make(root):
        if kind == "dense":
            return DenseKV(L, NKV, D, torch.bfloat16, 600)
        spill = kind == "spilled"
        return TieredKV(L, NKV, D, torch.bfloat16, 600, host_chunks=8 if spill else 200,
                        staging_chunks=2 * STAGING_BATCH if spill else 0, disk_root=root if spill else None,
                        chunk_tokens=16)

    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    gen = torch.Generator().manual_seed(3)

    def step(caches, T):
        outs = []
        for layer in range(L):
            q, k, v = (torch.randn(T, n, D, generator=gen).to(torch.bfloat16) for n in (NH, NKV, NKV))
            outs.append([c.attend(layer, q, k, v) for c in caches])
        for c in caches:
            c.commit(T)
        return outs

    for T in (90, 1, 1, 40):
        step([a], T)
    b.load(*zip(*(a.rows(layer, 0, a.offset) for layer in range(L))))
    assert b.offset == a.offset == 132
    for layer in range(L):
        assert all(torch.equal(x, y) for x, y in zip(a.rows(layer, 0, a.offset), b.rows(layer, 0, b.offset)))
    if kind == "spilled":
        assert b.tier_bytes()["disk"] > 0 and b.disk_write_bytes > 0
    for T in (5, 1):
        assert all(torch.equal(oa, ob) for oa, ob in step([a, b], T))
    with pytest.raises(ValueError, match="expected"):
        b.load([torch.zeros(2, NKV, D)] * L, [torch.zeros(2, NKV, D)] * L)  # float32 rows into a bf16 cache
    for c in (a, b):
        getattr(c, "close", lambda: None)()


def test_exact_decode_reads_the_next_layers_disk_chunks_ahead_and_each_once(tmp_path, monkeypatch):
    """A decode step queues the next layer's disk chunks behind its own (exact attention reads them all), so
    the ring reads them while this layer computes: outputs equal the dense reference, a step without a new
    chunk reads every layer's disk chunks exactly once, a step whose writes spill (the queued batches no
    longer the layer's) reads them again, and a step abandoned half-way leaves nothing queued behind."""
    ref, kv = _pair(torch.float32, host_chunks=8, disk_root=tmp_path)
    gen = torch.Generator().manual_seed(3)
    errs = [_step(ref, kv, 100, gen, torch.float32)]
    reads = []
    fill = kv._ring._fill  # the ring's reader calls it on its thread for every batch
    monkeypatch.setattr(kv._ring, "_fill", lambda item, half: reads.append(item) or fill(item, half))
    for _ in range(20):  # across the chunk boundary at 112 tokens
        reads.clear()
        new_chunk = kv.offset % 16 == 0
        errs.append(_step(ref, kv, 1, gen, torch.float32))
        on_disk = [(layer, tuple(c for c, (tier, _s) in enumerate(kv._table.chunks[layer]) if tier != "host"))
                   for layer in range(L)]
        assert all(chunks for _layer, chunks in on_disk)  # every layer has disk chunks: every layer read ahead
        if not new_chunk:
            assert sorted(reads) == on_disk, (reads, on_disk)
    # an abandoned step: layer 0 attended (the ahead of layer 1 queued), then a rollback and on
    q, k, v = (torch.randn(1, n, D, generator=gen) for n in (NH, NKV, NKV))
    kv.attend(0, q, k, v)
    assert kv._ahead is not None
    assert ref.trim(40) == kv.trim(40) == 40
    assert kv._ahead is None
    errs += [_step(ref, kv, T, gen, torch.float32) for T in (3, 1, 1)]
    assert max(errs) < 1e-5, errs
    kv.close()
