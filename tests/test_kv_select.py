"""Selective reads of a spilled KV cache (issue 22): the key bounds, the policy, the cache's select mode, and
passkey retrieval at ~6k tokens with the KV mostly on disk.

The bounds and the policy are pure numpy (offload_rt.memory.kv_select); TieredKV's ``attention="select"``
is checked against its own exact mode (every chunk selected: the same bits, since the RAM runs and the disk
batches are computed and merged in the same order) and against DenseKV (a planted key is found).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from offload_rt.kv.dense import DenseKV
from offload_rt.kv.tiered import TieredKV, _batches
from offload_rt.memory import kv_select as ks
from offload_rt.memory.kv_plan import CHUNK_TOKENS as C_MODEL
from offload_rt.memory.kv_plan import STAGING_BATCH, KVShape, split_kv

L, NKV, D, NH = 2, 2, 16, 6
C = 16  # tokens per chunk in the small caches


# ---------------------------------------------------------------- bounds and policy (no torch)


def test_the_bound_is_at_least_every_score_of_the_chunk():
    rng = np.random.default_rng(0)
    for trial in range(50):
        keys = rng.standard_normal((8, NKV, 32, D)).astype(np.float32) * rng.uniform(0.1, 5)
        keys[:, :, :, trial % D] *= 20  # an outlier channel, as real keys have
        q = rng.standard_normal((NH, D)).astype(np.float32) * rng.uniform(0.1, 5)
        kmin, kmax = (np.stack(x) for x in zip(*(ks.key_bounds(k) for k in keys)))
        bound = ks.score_bounds(q, kmin, kmax)
        G = NH // NKV
        true = np.einsum("hd,nhcd->nhc", q.astype(np.float64),
                         keys.astype(np.float64)[:, np.arange(NH) // G]).max(axis=2)  # query head h reads KV h // G
        assert bound.shape == (8, NH) and (true <= bound).all(), (true - bound).max()


def test_the_bound_is_the_score_when_a_chunk_holds_one_key():
    """min = max = the key: the bound is exactly q . k (it is not just some large number)."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((5, NKV, 1, D)).astype(np.float32)
    q = rng.standard_normal((NH, D)).astype(np.float32)
    kmin, kmax = (np.stack(x) for x in zip(*(ks.key_bounds(k) for k in keys)))
    true = np.einsum("hd,nhcd->nhc", q.astype(np.float64), keys.astype(np.float64)[:, np.arange(NH) // 3])[..., 0]
    np.testing.assert_allclose(ks.score_bounds(q, kmin, kmax), true, rtol=1e-12)


def test_the_reference_is_the_log_sum_exp_of_the_given_scores():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((NKV, 5, D)) * 4
    q = rng.standard_normal((NH, D))
    s = np.einsum("hd,hmd->hm", q, keys[np.arange(NH) // (NH // NKV)])
    ref = ks.reference(q, keys)
    np.testing.assert_allclose(ref, np.log(np.exp(s).sum(axis=1)), rtol=1e-12)
    assert (ref >= s.max(axis=1)).all()


def test_the_policy_picks_the_chunk_holding_a_planted_key():
    rng = np.random.default_rng(2)
    n, planted = 20, 13
    keys = rng.standard_normal((n, NKV, 64, D)).astype(np.float32)
    q = rng.standard_normal((NH, D)).astype(np.float32)
    keys[planted, 1, 40] = 3 * q[4] / np.linalg.norm(q[4]) * math.sqrt(D)  # query head 4 reads KV head 1
    kmin, kmax = (np.stack(x) for x in zip(*(ks.key_bounds(k) for k in keys)))
    bounds = ks.score_bounds(q, kmin, kmax)
    ram = rng.standard_normal((64, D)).astype(np.float64) @ q.T.astype(np.float64)  # scores of the RAM keys
    ref = np.log(np.exp(ram).sum(axis=0))
    assert list(ks.choose(bounds, ref, n * 64, limit=1)) == [planted]
    picked = ks.choose(bounds, ref, n * 64, limit=5)
    assert planted in picked and len(picked) == 5 and list(picked) == sorted(picked)


def test_the_policy_skips_what_cannot_matter_and_keeps_to_its_limit():
    ref = np.zeros(2)
    n_keys = 400
    far = -(math.log(n_keys) + ks.MARGIN_NATS)
    bounds = np.array([[far - 1, far - 5],  # below the margin for both heads: never read
                       [far + 1, far - 5],  # near enough for head 0
                       [-3.0, 2.0],
                       [1.0, -9.0],
                       [0.5, 0.5]])
    assert list(ks.choose(bounds, ref, n_keys, limit=10)) == [1, 2, 3, 4]
    assert list(ks.choose(bounds, ref, n_keys, limit=2)) == [2, 3]  # the largest bound - ref over the heads
    assert list(ks.choose(bounds, np.array([0.0, 4.0]), n_keys, limit=2)) == [3, 4]  # ref is per head
    # nothing computed yet (ref -inf): every chunk may matter, the oldest first
    assert list(ks.choose(bounds, np.full(2, -np.inf), n_keys, limit=3)) == [0, 1, 2]
    assert list(ks.choose(bounds[:0], ref, n_keys, limit=3)) == []


def test_budget_is_a_share_of_the_disk_chunks_at_least_one():
    assert [ks.budget(n, 0.25) for n in (0, 1, 3, 4, 22, 100)] == [0, 1, 1, 1, 5, 25]
    assert ks.budget(22, 1.0) == 22 and ks.budget(3, 0.999) == 2


def test_batches_are_runs_or_packed():
    chunks = [1, 2, 3, 7, 8, 20] + list(range(30, 30 + STAGING_BATCH + 5))
    runs = _batches(chunks, STAGING_BATCH, packed=False)
    assert runs[:3] == [(1, 2, 3), (7, 8), (20,)] and all(len(b) <= STAGING_BATCH for b in runs)
    assert [c for b in runs for c in b] == chunks and all(b == tuple(range(b[0], b[-1] + 1)) for b in runs)
    packed = _batches(chunks, STAGING_BATCH, packed=True)
    assert [len(b) for b in packed] == [STAGING_BATCH, STAGING_BATCH, len(chunks) - 2 * STAGING_BATCH] and \
        len(chunks) - 2 * STAGING_BATCH > 0
    assert [c for b in packed for c in b] == chunks


def test_the_split_budgets_the_key_bounds_of_every_chunk():
    shape = KVShape(n_layers=4, kv_heads=2, head_dim=64, itemsize=4, chunk_tokens=256)
    cb = shape.chunk_bytes
    part = split_kv(shape, 4096, kv_cpu_mem=40 * cb, disk_free=10 ** 12, model_tokens=8192)
    assert part.bound_bytes == 4 * 16 * ks.abstract_bytes(2, 64) > 0
    assert part.host_bytes <= 40 * cb < part.host_bytes + cb  # the chunks give way to the bounds
    assert "key bounds" in part.describe()
    whole = split_kv(shape, 4096, kv_cpu_mem=None, disk_free=None, model_tokens=8192)
    assert whole.bound_bytes == 0
    kv = TieredKV(4, 2, 64, torch.float32, 4096, host_chunks=part.host_chunks, staging_chunks=part.staging_chunks,
                  disk_root=None)
    assert kv._kmin.nbytes == 0  # nothing spills: no bounds kept
    kv.close()


# ---------------------------------------------------------------- the cache's select mode


def _cache(root, attention, share=ks.DEFAULT_SHARE, max_tokens=800):
    return TieredKV(L, NKV, D, torch.float32, max_tokens, host_chunks=3 * L, staging_chunks=2 * STAGING_BATCH,
                    disk_root=root, chunk_tokens=C, attention=attention, select_share=share)


def _qkv(T, gen):
    return [tuple(torch.randn(T, n, D, generator=gen) for n in (NH, NKV, NKV)) for _layer in range(L)]


def test_select_with_every_chunk_read_is_exact_attention_bit_for_bit(tmp_path):
    """share 1: every disk chunk read, in the exact mode's batches and merge order: the same bits. Prefill
    blocks and tree steps stay exact in select mode."""
    exact, sel = _cache(tmp_path / "e", "exact"), _cache(tmp_path / "s", "select", share=1.0)
    gen = torch.Generator().manual_seed(0)
    for T in (300, 1, 1, 1, 40, 1, 1):
        for layer, (q, k, v) in enumerate(_qkv(T, gen)):
            assert torch.equal(exact.attend(layer, q, k, v), sel.attend(layer, q, k, v))
        exact.commit(T)
        sel.commit(T)
    assert sel.disk_chunks_seen == exact.disk_chunks_seen > 0
    assert sel.disk_chunks_read == sel.disk_chunks_seen and sel.disk_read_bytes == exact.disk_read_bytes
    for c in (exact, sel):
        c.close()


def test_select_reads_a_share_of_the_disk_and_finds_a_planted_key(tmp_path, monkeypatch):
    """A decode query aligned with one old key of each layer: the select cache reads at most a quarter of the
    disk chunks per step, yet its output is DenseKV's (the planted key holds nearly all the weight)."""
    monkeypatch.setattr(ks, "GAP_BYTES", 0)  # what is chosen is what is read (no gaps read through)
    ref, sel = DenseKV(L, NKV, D, torch.float32, 800), _cache(tmp_path, "select")
    gen = torch.Generator().manual_seed(1)
    steps = _qkv(600, gen)
    q1 = torch.randn(1, NH, D, generator=gen)
    for layer, (q, k, v) in enumerate(steps):
        k[100 + 57 * layer, 0] = 6 * q1[0, 0] / q1[0, 0].norm() * math.sqrt(D)  # query head 0 reads KV head 0
        ref.attend(layer, q, k, v)
        sel.attend(layer, q, k, v)
    ref.commit(600)
    sel.commit(600)
    seen0, read0, bytes0 = sel.disk_chunks_seen, sel.disk_chunks_read, sel.disk_read_bytes
    for layer, (_q, k, v) in enumerate(_qkv(1, gen)):
        a, b = ref.attend(layer, q1, k, v), sel.attend(layer, q1, k, v)
        torch.testing.assert_close(b[:, :D], a[:, :D], rtol=1e-3, atol=1e-3)  # the head that found the key
    seen, read = sel.disk_chunks_seen - seen0, sel.disk_chunks_read - read0
    assert seen > 30 and 0 < read <= ks.DEFAULT_SHARE * seen  # each layer: a quarter of its own, rounded down
    assert sel.disk_read_bytes - bytes0 == read * sel._store().chunk_bytes
    sel.close()


def test_select_reads_ahead_what_each_layer_chose_last_and_attends_what_it_chooses(tmp_path, monkeypatch):
    """Decode with selection queues each layer's last step's choice while the layer before computes; the step
    then attends exactly what it chooses now (the same result as a cache reading nothing ahead), and a chunk
    read ahead but not chosen again counts as read."""
    plan = {300: [1, 2, 3], 301: [2, 3, 5]}  # the offset a step starts at -> the disk chunks it chooses
    events = []

    def choose(self, layer, q, end, disk):
        events.append(("select", layer))
        return [c for c in plan[end - 1] if c in disk]

    monkeypatch.setattr(TieredKV, "_select", choose)
    monkeypatch.setattr(ks, "GAP_BYTES", 0)  # no reading through gaps (the next test)
    ahead, plain = _cache(tmp_path / "a", "select"), _cache(tmp_path / "p", "select")
    plain._read_ahead = lambda layer, n_chunks: None
    queue = ahead._queue
    ahead._queue = lambda layer, batches: events.append(("queue", layer, batches)) or queue(layer, batches)
    gen = torch.Generator().manual_seed(3)
    for T in (300, 1, 1):
        before = {c: (c.disk_chunks_read, c.disk_read_bytes) for c in (ahead, plain)}
        events.clear()
        for layer, (q, k, v) in enumerate(_qkv(T, gen)):
            torch.testing.assert_close(ahead.attend(layer, q, k, v), plain.attend(layer, q, k, v), rtol=1e-5,
                                       atol=1e-6)
        for c in (ahead, plain):
            c.commit(T)
        read = {c: (c.disk_chunks_read - n, c.disk_read_bytes - b) for c, (n, b) in before.items()}
        if T == 1:
            assert read[plain][0] == 3 * L  # what each layer chose
    # the second step: layer 1's last choice (1, 2, 3) was queued before its query chose (2, 3, 5); chunk 1 was
    # read for nothing, chunk 5 after the choice
    assert events.index(("queue", 1, [(1, 2, 3)])) < events.index(("select", 1)) < events.index(("queue", 1, [(5,)]))
    cb = ahead._store().chunk_bytes
    assert read[ahead] == (3 + 4 * (L - 1), (3 + 4 * (L - 1)) * cb)  # layer 0's is not read ahead (a new step)
    for c in (ahead, plain):
        c.close()


def test_short_gaps_between_chosen_chunks_are_read_through_not_attended(tmp_path, monkeypatch):
    """kv_select.coalesce: a gap of at most ``gap`` chunks, all on disk, between two chosen ones is read too;
    the cache attends only the chosen chunks (the result of reading them alone) and counts what it read."""
    assert ks.coalesce([1, 3, 8, 9, 14], set(range(20)), gap=2) == [1, 2, 3, 8, 9, 14]
    assert ks.coalesce([1, 3], set(range(20)) - {2}, gap=2) == [1, 3]  # the gap is not all on disk
    assert ks.coalesce([1, 4], set(range(20)), gap=2) == [1, 2, 3, 4] and ks.coalesce([], {1}, gap=3) == []
    monkeypatch.setattr(TieredKV, "_select", lambda self, layer, q, end, disk: [c for c in (2, 5, 9) if c in disk])
    through, apart = _cache(tmp_path / "t", "select"), _cache(tmp_path / "a", "select")
    gen = torch.Generator().manual_seed(4)
    for T in (300, 1):
        before = {c: c.disk_chunks_read for c in (through, apart)}
        for layer, (q, k, v) in enumerate(_qkv(T, gen)):
            monkeypatch.setattr(ks, "GAP_BYTES", 2 * through._store().chunk_bytes)  # gaps of 2 chunks
            a = through.attend(layer, q, k, v)
            monkeypatch.setattr(ks, "GAP_BYTES", 0)
            torch.testing.assert_close(a, apart.attend(layer, q, k, v), rtol=1e-5, atol=1e-6)
        for c in (through, apart):
            c.commit(T)
    assert apart.disk_chunks_read - before[apart] == 3 * L and through.disk_chunks_read - before[through] == 5 * L
    for c in (through, apart):
        c.close()


def test_a_failure_mid_step_leaves_the_disk_reads_usable(tmp_path, monkeypatch):
    """The disk batches are queued before the RAM chunks compute: an exception there gives the ring back what
    was queued, and the next step reads and computes as if nothing had happened."""
    from kernels_cpu import attention as kern

    sel, exact = _cache(tmp_path / "s", "select", share=1.0), _cache(tmp_path / "e", "exact")
    gen = torch.Generator().manual_seed(5)
    for layer, (q, k, v) in enumerate(_qkv(200, gen)):
        sel.attend(layer, q, k, v)
        exact.attend(layer, q, k, v)
    sel.commit(200)
    exact.commit(200)
    real = kern.attend
    monkeypatch.setattr(kern, "attend", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    q, k, v = _qkv(1, gen)[0]
    with pytest.raises(RuntimeError, match="boom"):
        sel.attend(0, q, k, v)
    monkeypatch.setattr(kern, "attend", real)
    for layer, (q, k, v) in enumerate(_qkv(1, gen)):
        assert torch.equal(sel.attend(layer, q, k, v), exact.attend(layer, q, k, v))
    for c in (sel, exact):
        c.close()


# ---------------------------------------------------------------- the default model, KV mostly on disk


def test_the_passkey_at_6k_tokens_is_found_reading_a_quarter_of_the_disk(tmp_path_factory, monkeypatch):
    """One ~6k-token passkey prompt (tests/passkey_prompts.py) prefilled into a cache in RAM, its rows loaded
    (``load``, the prefix cache's restore path) into a cache split as ``--kv-cpu-mem 64M`` splits it, most of
    it on disk, then decoded twice from there (tests/passkey_prompts.answers): exact attention reading every
    disk chunk, then selection. Both answers hold the key; selection read at most a quarter of each layer's
    disk chunks per step. One prompt: the prefill costs ~25 s on 2 cores with OpenMP workers waiting as a run
    sets them (GOMP_SPINCOUNT=10000, offload_rt.threads.configure_process), 4-5 min with libgomp's default
    spinning (torch's and Numba's pools then fight for the cores)."""
    from offload_rt.config import RunConfig
    from offload_rt.loader import load_model
    from tests.passkey_prompts import answers, make_prompts

    ctx = 8192
    torch.set_num_threads(2)
    model = load_model(RunConfig(offload_dir=tmp_path_factory.mktemp("stores"), progress=False, ctx_size=ctx))
    a = model.args
    kv_shape = (a.num_hidden_layers, a.num_key_value_heads, a.head_dim, model.dtype, ctx)
    (p,) = make_prompts(model.tokenizer, 1, 6000, seed=7)
    ram = TieredKV(*kv_shape, host_chunks=a.num_hidden_layers * -(-ctx // C_MODEL))
    model.engine.cache, model.engine.tokens = ram, []
    with torch.inference_mode():
        model.engine.prefill(p.ids)
    split = split_kv(KVShape(*kv_shape[:3], model.dtype.itemsize), ctx, kv_cpu_mem=64 << 20, disk_free=1 << 40,
                     model_tokens=ctx)
    cache = TieredKV(*kv_shape, host_chunks=split.host_chunks, staging_chunks=split.staging_chunks,
                     disk_root=tmp_path_factory.mktemp("kv"))
    cache.load(*zip(*(ram.rows(layer, 0, ram.offset) for layer in range(a.num_hidden_layers))))
    ram.close()
    model.engine.cache = cache
    steps = []
    choose = TieredKV._select

    def counting(self, layer, q, end, disk):
        read = choose(self, layer, q, end, disk)
        steps.append((len(disk), len(read)))
        return read

    monkeypatch.setattr(TieredKV, "_select", counting)
    out = answers(model.engine, p.ids, ("exact", "select"), n_new=8)
    text = {mode: model.tokenizer.decode(toks) for mode, toks in out.items()}
    tiers = cache.tier_bytes()
    cache.close()
    assert tiers["disk"] > 3 * tiers["host"], tiers  # the KV is mostly on disk
    assert str(p.key) in text["exact"], text
    assert str(p.key) in text["select"], text
    assert len(steps) == 7 * a.num_hidden_layers  # every decode step of every layer selected
    assert all(0 < read <= disk // 4 for disk, read in steps), steps
