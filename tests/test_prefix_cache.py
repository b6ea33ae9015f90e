"""The prefix cache (offload_rt.kv.prefix): keys, granular lookups, restore, RAM LRU, disk, restart, corruption.

Tiny random K/V (2 layers, 2 KV heads, d = 8, 4-token chunks) for the policy; quantized KV (q8/q4) with d = 32
and 32-token chunks (the quantization's group); tests with the default model check that a restored prefix plus
the prefill of the rest gives the logits of a full prefill, bit for bit (float and quantized KV).
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels_cpu.kv_quant import KVQuant
from offload_rt.kv.dense import DenseKV
from offload_rt.kv.prefix import IDENTITY_FILE, MAGIC, SUFFIX, PrefixCache, model_identity
from offload_rt.kv.tiered import TieredKV
from offload_rt.memory.kv_plan import STAGING_BATCH

L, NKV, D, C = 2, 2, 8, 4
ENTRY = 2 * L * C * NKV * D * 4  # one chunk's K and V, float32
IDENT = {"store": "tiny-0123456789abcdef.zarr", "source": {"path": "/m/tiny", "size": 1}, "weights": "auto",
         "tokenizer": "ab" * 32, "kv_dtype": "float32", "layers": L, "kv_heads": NKV, "head_dim": D}


def cache(kind: str = "dense", root=None, max_tokens: int = 64):
    if kind == "dense":
        return DenseKV(L, NKV, D, torch.float32, max_tokens)
    # 3 RAM chunks per layer of 2-token chunks: a prefix of more than 6 tokens spills
    return TieredKV(L, NKV, D, torch.float32, max_tokens, host_chunks=3 * L, staging_chunks=2 * STAGING_BATCH,
                    disk_root=root, chunk_tokens=2)


def filled(n: int, seed: int = 0, kind: str = "dense", root=None):
    """A cache holding n tokens of random K/V."""
    c = cache(kind, root)
    g = torch.Generator().manual_seed(seed)
    c.load([torch.randn(n, NKV, D, generator=g) for _ in range(L)], [torch.randn(n, NKV, D, generator=g)
                                                                     for _ in range(L)])
    return c


def same_rows(a, b, n: int) -> bool:
    return all(torch.equal(x, y) for layer in range(L) for x, y in zip(a.rows(layer, 0, n), b.rows(layer, 0, n)))


def ids_of(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_lookup_covers_saved_whole_granules_never_the_last_token():
    pc = PrefixCache(None, IDENT, C, ram_bytes=100 * ENTRY, granule=2 * C)
    ids = ids_of(23)
    assert pc.lookup(ids) == 0
    assert pc.save(ids, filled(23)) == 16  # 2 granules of 8; the last 7 tokens are no whole granule
    assert pc.save(ids, filled(23)) == 0  # nothing new
    assert pc.lookup(ids) == 16
    assert pc.lookup(ids[:17] + [7, 7, 7]) == 16
    assert pc.lookup(ids[:16]) == 8  # the whole prompt is stored, but its last token must be computed
    assert pc.lookup(ids[:13] + [9] * 10) == 8  # differs inside the second granule
    assert pc.lookup([1] + ids[1:]) == 0  # a different first token: no key of the chain matches
    assert pc.lookup(ids[:1]) == 0 and pc.lookup([]) == 0
    s = pc.stats()
    assert s["lookups"] == 8 and s["entries"] == 4 and s["ram_bytes"] == 4 * ENTRY and s["disk_bytes"] == 0
    with pytest.raises(ValueError, match="multiple"):
        PrefixCache(None, IDENT, C, ram_bytes=0, granule=6)
    with pytest.raises(ValueError, match="lacks"):
        PrefixCache(None, {"store": "x"}, C, ram_bytes=0)


@pytest.mark.parametrize("kind", ["dense", "tiered"])
def test_restore_loads_the_source_rows_bit_for_bit(tmp_path, kind):
    src = filled(30, kind=kind, root=tmp_path / "src")
    pc = PrefixCache(None, IDENT, C, ram_bytes=100 * ENTRY)
    ids = ids_of(30)
    pc.save(ids, src)
    dst = cache(kind, tmp_path / "dst")
    n = pc.lookup(ids)
    assert n == 28 and pc.restore(ids, n, dst) == 28 and dst.offset == 28
    assert same_rows(src, dst, 28)
    if kind == "tiered":  # rows were read from spilled chunks and loaded into a spilling cache
        assert src.disk_read_bytes > 0 and dst.tier_bytes()["disk"] > 0
    assert pc.stats()["hits"] == 1 and pc.stats()["hit_tokens"] == 28
    with pytest.raises(ValueError, match="empty"):
        pc.restore(ids, n, dst)
    assert pc.restore(ids, 100, cache()) == 28  # never past what a lookup allows
    for c in (src, dst):
        getattr(c, "close", lambda: None)()


def test_other_model_or_tokenizer_never_matches(tmp_path):
    ids = ids_of(20)
    mine = PrefixCache(tmp_path / "a", IDENT, C, ram_bytes=100 * ENTRY)
    mine.save(ids, filled(20))
    mine.close()
    assert mine.lookup(ids) == 16
    others = [{**IDENT, "tokenizer": "cd" * 32}, {**IDENT, "store": "other-0123456789abcdef.zarr"},
              {**IDENT, "source": {"path": "/m/tiny", "size": 2}}, {**IDENT, "kv_dtype": "bfloat16"}]
    for other in others:  # the chain starts from the identity: not one key in common
        assert set(PrefixCache(None, other, C, ram_bytes=0).keys(ids, 4)).isdisjoint(mine.keys(ids, 4))
    assert set(PrefixCache(None, IDENT, 2 * C, ram_bytes=0).keys(ids, 2)).isdisjoint(mine.keys(ids, 4))

    # a file of this identity under another identity's name is refused when read (the header's seed)
    theirs = PrefixCache(tmp_path / "b", others[0], C, ram_bytes=0)
    (tmp_path / "b" / (theirs.keys(ids, 1)[0] + SUFFIX)).write_bytes(
        (tmp_path / "a" / (mine.keys(ids, 1)[0] + SUFFIX)).read_bytes())
    theirs = PrefixCache(tmp_path / "b", others[0], C, ram_bytes=0)
    assert theirs.lookup(ids) == 4  # found by name (indexing reads no file)
    assert theirs.restore(ids, 4, cache()) == 0 and theirs.stats()["dropped"] == 1 and theirs.lookup(ids) == 0

    # a root claimed by another identity is emptied for the new one (its entries could never match)
    PrefixCache(tmp_path / "a", others[1], C, ram_bytes=0)
    assert not list((tmp_path / "a").glob("*" + SUFFIX))
    assert "other-0123456789abcdef" in (tmp_path / "a" / IDENTITY_FILE).read_text()
    assert PrefixCache(tmp_path / "a", IDENT, C, ram_bytes=0).lookup(ids) == 0


def test_ram_lru_spills_to_disk_and_restores_from_it(tmp_path):
    ids = ids_of(25)
    src = filled(25)
    pc = PrefixCache(tmp_path, IDENT, C, ram_bytes=3 * ENTRY)
    assert pc.save(ids, src) == 24
    pc.flush()
    s = pc.stats()
    assert s["ram_entries"] == 3 and s["ram_bytes"] <= 3 * ENTRY and s["disk_entries"] == 6 and s["entries"] == 6
    assert s["disk_bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*" + SUFFIX))
    dst = cache()
    assert pc.restore(ids, pc.lookup(ids), dst) == 24 and same_rows(src, dst, 24)  # the first 3 from disk
    assert pc.stats()["ram_entries"] == 3  # read back into RAM, within its budget

    ram_only = PrefixCache(None, IDENT, C, ram_bytes=3 * ENTRY)
    ram_only.save(ids, src)
    assert ram_only.lookup(ids) == 0  # the first chunks were evicted and nothing holds them


def test_disk_stays_within_its_budget_least_recently_used_removed(tmp_path):
    pc = PrefixCache(tmp_path, IDENT, C, ram_bytes=0, disk_bytes=10 * ENTRY)
    a, b = ids_of(13, 100), ids_of(13, 500)
    pc.save(a, filled(13, 1))
    pc.flush()
    one = pc.stats()["disk_bytes"] // 3
    pc.restore(a, 12, cache())  # a was used last
    pc.disk_budget = 5 * one
    pc.save(b, filled(13, 2))
    pc.flush()
    s = pc.stats()
    assert s["disk_bytes"] <= 5 * one and s["disk_entries"] == 5 == len(list(tmp_path.glob("*" + SUFFIX)))
    assert pc.lookup(b) == 12 and pc.lookup(a) == 0  # a's oldest chunk went first, and the chain breaks there


@pytest.mark.parametrize("close", [True, False])
def test_a_restarted_cache_finds_and_restores_the_entries(tmp_path, close):
    ids = ids_of(18)
    src = filled(18)
    pc = PrefixCache(tmp_path, IDENT, C, ram_bytes=100 * ENTRY)  # everything fits in RAM: written through anyway
    pc.save(ids, src)
    if close:
        pc.close()
    else:
        pc.flush()  # a server killed after its writes: no close
    (tmp_path / f".{'0' * 64}{SUFFIX}.999999999.abc{'.tmp'}").write_bytes(b"half")  # a dead writer's leftover
    again = PrefixCache(tmp_path, IDENT, C, ram_bytes=100 * ENTRY)
    assert again.stats()["disk_entries"] == 4 and again.stats()["ram_entries"] == 0
    assert not list(tmp_path.glob("*.tmp"))
    dst = cache()
    assert again.lookup(ids) == 16 and again.restore(ids, 16, dst) == 16 and same_rows(src, dst, 16)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "swap"])
def test_a_corrupt_file_is_a_miss_and_is_removed(tmp_path, damage):
    ids = ids_of(18)
    src = filled(18)
    pc = PrefixCache(tmp_path, IDENT, C, ram_bytes=0)
    pc.save(ids, src)
    pc.close()
    keys = pc.keys(ids, 4)
    bad = tmp_path / (keys[2] + SUFFIX)
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01
    elif damage == "truncate":
        data = data[:-4]
    elif damage == "header":
        data[8:12] = b"\xff\xff\x00\x00"
    else:  # another chunk's valid file under this chunk's name
        data = bytearray((tmp_path / (keys[3] + SUFFIX)).read_bytes())
    bad.write_bytes(data)
    again = PrefixCache(tmp_path, IDENT, C, ram_bytes=0, granule=2 * C)
    assert again.lookup(ids) == 16  # names only: found, not yet validated
    dst = cache()
    assert again.restore(ids, 16, dst) == 8 and dst.offset == 8 and same_rows(src, dst, 8)
    assert not bad.exists() and again.stats()["dropped"] == 1 and again.lookup(ids) == 8


def test_model_identity_names_store_source_tokenizer_and_kv_shape(tmp_path):
    class Store:
        path = tmp_path / "m-0123456789abcdef.zarr"
        manifest = {"source": {"identity": {"file": "m.gguf", "size": 3}}, "weights": "auto"}
        tokenizer_file = tmp_path / "tokenizer.json"

    class Args:
        num_hidden_layers, num_key_value_heads, head_dim = L, NKV, D

    Store.tokenizer_file.write_text('{"model": 1}')
    ident = model_identity(Store, Args, torch.bfloat16)
    assert ident["store"] == Store.path.name and ident["source"] == Store.manifest["source"]["identity"]
    assert (ident["kv_dtype"], ident["layers"], ident["kv_heads"], ident["head_dim"]) == ("bfloat16", L, NKV, D)
    Store.tokenizer_file.write_text('{"model": 2}')
    assert model_identity(Store, Args, torch.bfloat16)["tokenizer"] != ident["tokenizer"]


# ---------------------------------------------------------------- quantized KV (--kv-dtype q8|q4)

QD, QC = 32, 32  # head dim and chunk: the quantization's group divides both


def q_ident(name: str) -> dict:
    """A quantized KV's identity; its kv_dtype the compute dtype's (bf16 as on a GPU), not the float32 of the
    quantized cache's floats: entries do not depend on it."""
    return {**IDENT, "kv_dtype": "bfloat16", "head_dim": QD, "kv_quant": name}


def q_cache(name: str, root=None, max_tokens: int = 8 * QC) -> TieredKV:
    """An empty quantized cache: chunks in RAM, or 2 RAM chunks per layer and the rest spilled under ``root``."""
    spill = dict(host_chunks=2 * L, staging_chunks=2 * STAGING_BATCH, disk_root=root) if root else \
        dict(host_chunks=L * max_tokens // QC)
    return TieredKV(L, NKV, QD, torch.float32, max_tokens, chunk_tokens=QC, quant=KVQuant(name, QD, QC), **spill)


def q_filled(name: str, n: int, seed: int = 0, root=None) -> TieredKV:
    """A quantized cache holding n tokens of random K/V (the newest two chunks of a layer keep their floats)."""
    c = q_cache(name, root)
    g = torch.Generator().manual_seed(seed)
    c.load([torch.randn(n, NKV, QD, generator=g) for _ in range(L)],
           [torch.randn(n, NKV, QD, generator=g) for _ in range(L)])
    return c


def pool_records(c: TieredKV, layer: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V records a quantized cache holds for a chunk in RAM, read from its pools."""
    tier, slot = c._table.chunks[layer][chunk]
    assert tier == "host"
    return c.kpool[slot], c.vpool[slot]


def holds_records_of(c: TieredKV, ref: TieredKV, chunks: int) -> bool:
    """Whether ``c`` holds (RAM or disk) the records ``ref`` holds in RAM for its first chunks."""
    return all(torch.equal(x, y) for layer in range(L) for i in range(chunks)
               for x, y in zip(c.records(layer, i), pool_records(ref, layer, i)))


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("name", ["q8", "q4"])
def test_quantized_entries_are_the_kv_records_and_restore_to_the_same_bits(tmp_path, name, spill):
    n = 3 * QC + 5  # chunks 0, 1, 2 closed (0: records only; 1, 2: floats kept too), 3 open
    ref = q_filled(name, n)
    src = q_filled(name, n, root=tmp_path / "src") if spill else ref  # spilled: chunk 0 on disk
    ids = ids_of(n)
    pc = PrefixCache(tmp_path / "pc", q_ident(name), QC, ram_bytes=1 << 20)
    assert pc.save(ids, src) == 3 * QC
    pc.flush()
    for i, key in enumerate(pc.keys(ids, 3)):  # each entry holds what the KV holds: its chunk's records
        e = pc._ram[key]
        for layer in range(L):
            assert torch.equal(e.k[layer], pool_records(ref, layer, i)[0])
            assert torch.equal(e.v[layer], pool_records(ref, layer, i)[1])
    if spill:
        assert src.disk_read_bytes > 0

    # bytes: the records' (the record shape's), RAM and disk; the float32 rows' would be ~3.6x (q8), ~6.4x (q4)
    entry = 2 * L * int(torch.tensor(KVQuant(name, QD, QC).record_shape(NKV)).prod())
    rows = 2 * L * QC * NKV * QD * 4
    s = pc.stats()
    assert s["ram_bytes"] == 3 * entry and entry < rows / (3 if name == "q8" else 6)
    files = sorted((tmp_path / "pc").glob("*" + SUFFIX))
    header = len(MAGIC) + 4 + int.from_bytes(files[0].read_bytes()[len(MAGIC):len(MAGIC) + 4], "little")
    assert len(files) == 3 and {f.stat().st_size for f in files} == {header + entry}
    assert s["disk_bytes"] == 3 * (header + entry)

    # restored (from disk, after a restart) into a cache used before (its floats stale): the same records and
    # their rows; then the same rows written after them close the open chunk to the same records, same rows
    again = PrefixCache(tmp_path / "pc", q_ident(name), QC, ram_bytes=1 << 20)
    dst = q_filled(name, n, seed=5, root=tmp_path / "dst" if spill else None)
    dst.reset()
    assert again.restore(ids, again.lookup(ids), dst) == 3 * QC and again.stats()["dropped"] == 0
    assert holds_records_of(dst, ref, 3)
    quant = KVQuant(name, QD, QC)
    for layer in range(L):
        k, v = dst.rows(layer, 0, 3 * QC)
        recs = [pool_records(ref, layer, i) for i in range(3)]
        assert torch.equal(k, torch.cat([quant.dequantize_keys(rk) for rk, _ in recs], dim=1).transpose(0, 1))
        assert torch.equal(v, torch.cat([quant.dequantize_values(rv) for _, rv in recs], dim=1).transpose(0, 1))
    g = torch.Generator().manual_seed(1)
    tail = [(torch.randn(QC, NKV, QD, generator=g), torch.randn(QC, NKV, QD, generator=g)) for _ in range(L)]
    for c in {id(x): x for x in (ref, src, dst)}.values():
        c.trim(c.offset - 3 * QC)
        c.load([k for k, _v in tail], [v for _k, v in tail])
    assert holds_records_of(dst, ref, 4)
    assert all(torch.equal(x, y) for layer in range(L)
               for x, y in zip(ref.rows(layer, 3 * QC, 4 * QC), dst.rows(layer, 3 * QC, 4 * QC)))
    dst.trim(1)  # chunk 3 open again
    e = pc._ram[pc.keys(ids, 1)[0]]
    with pytest.raises(ValueError, match="chunk boundary"):
        dst.load_records([e.k[i][None] for i in range(L)], [e.v[i][None] for i in range(L)])
    with pytest.raises(ValueError, match="closed chunks"):
        dst.records(0, 3)
    for c in (ref, src, dst):
        c.close()


@pytest.mark.parametrize("damage", ["old format", "flip"])
def test_a_quantized_file_of_the_old_format_or_corrupt_is_a_miss_and_is_removed(tmp_path, damage):
    ids = ids_of(2 * QC + 1)
    if damage == "old format":  # a quantized KV's entries were its rows in the identity's kv_dtype, same keys
        old = PrefixCache(None, q_ident("q4"), QC, ram_bytes=0)
        old.quant, old.root = None, tmp_path
        old._shape, old._dtype, old._encoding = (L, QC, NKV, QD), torch.bfloat16, "bfloat16"
        old._open_root()
        g = torch.Generator().manual_seed(0)
        rows = TieredKV(L, NKV, QD, torch.float32, 4 * QC, host_chunks=4 * L, chunk_tokens=QC)
        rows.load([torch.randn(2 * QC + 1, NKV, QD, generator=g) for _ in range(L)],
                  [torch.randn(2 * QC + 1, NKV, QD, generator=g) for _ in range(L)])
        assert old.save(ids, rows) == 2 * QC
        old.close()
    else:
        pc = PrefixCache(tmp_path, q_ident("q4"), QC, ram_bytes=0)
        pc.save(ids, q_filled("q4", 2 * QC + 1))
        pc.close()
        bad = tmp_path / (pc.keys(ids, 1)[0] + SUFFIX)
        data = bytearray(bad.read_bytes())
        data[-7] ^= 0x10
        bad.write_bytes(data)
    files = list(tmp_path.glob("*" + SUFFIX))
    again = PrefixCache(tmp_path, q_ident("q4"), QC, ram_bytes=1 << 20)
    assert again.lookup(ids) == 2 * QC  # names only: found, not yet validated
    dst = q_cache("q4")
    assert again.restore(ids, 2 * QC, dst) == 0 and dst.offset == 0
    assert again.stats()["dropped"] == 1 and again.lookup(ids) == 0
    first = tmp_path / (again.keys(ids, 1)[0] + SUFFIX)
    assert first in files and not first.exists()


# ---------------------------------------------------------------- the default model


TEXT = ("The lighthouse keeper wrote in his log every night. He noted the wind, the ships that passed, "
        "the colour of the sea at dusk and the number of gulls on the rocks. ")


def test_restored_prefix_then_prefill_gives_the_full_prefills_logits(tmp_path):
    from offload_rt.config import RunConfig
    from offload_rt.loader import load_model, resident_kv

    torch.set_num_threads(2)
    model = load_model(RunConfig(offload_dir=tmp_path / "stores", progress=False))
    a, eng = model.args, model.engine
    eng.prefill_chunk = 128
    ids = model.tokenizer.encode(TEXT * 40)[:600]
    other = ids[:300] + model.tokenizer.encode("Meanwhile, far inland, " + TEXT * 12)[:250]

    def run(prompt, pc=None):
        """Logits after prompt in a new cache, its first tokens restored from pc (if given)."""
        eng.cache, eng.tokens = resident_kv(a, model.dtype, 1024, "cpu"), []
        n = pc.restore(prompt, pc.lookup(prompt), eng.cache) if pc is not None else 0
        eng.tokens = list(prompt[:n])
        with torch.inference_mode():
            return eng.prefill(prompt), n

    ident = model_identity(model.store, a, model.dtype)
    pc = PrefixCache(tmp_path / "prefix", ident, 64, ram_bytes=1 << 30, granule=128)
    full, _ = run(ids)
    assert pc.save(ids, eng.cache) == 512
    reused, n = run(ids, pc)
    assert n == 512 and torch.equal(reused, full)
    fresh_other, _ = run(other)
    reused_other, n = run(other, pc)
    assert n == 256 and torch.equal(reused_other, fresh_other)  # the shared 300 tokens, rounded to the granule
    pc.close()
    restarted = PrefixCache(tmp_path / "prefix", ident, 64, ram_bytes=1 << 30, granule=128)
    from_disk, n = run(ids, restarted)
    assert n == 512 and torch.equal(from_disk, full) and restarted.stats()["ram_entries"] == 8


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    from offload_rt.config import RunConfig
    from offload_rt.loader import load_model

    torch.set_num_threads(2)
    return load_model(RunConfig(offload_dir=tmp_path_factory.mktemp("stores"), progress=False))


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_restored_quantized_prefix_gives_the_full_prefills_kv_and_logits(tmp_path, default_model, name):
    """--kv-dtype q8|q4: a prefix restored from its records (RAM, then disk after a restart) plus the prefill of
    the rest gives the records, rows and logits of a full prefill with the same KV, bit for bit."""
    model = default_model
    a, eng = model.args, model.engine
    eng.prefill_chunk = 64
    ids = model.tokenizer.encode(TEXT * 20)[:300]
    quant = KVQuant(name, a.head_dim, 64)

    def run(pc=None):
        """(logits after ids in a new quantized cache, its first tokens restored from pc (if given), the cache)."""
        eng.cache = TieredKV(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, model.dtype, 512,
                             host_chunks=a.num_hidden_layers * 8, chunk_tokens=64, quant=quant)
        n = pc.restore(ids, pc.lookup(ids), eng.cache) if pc is not None else 0
        eng.tokens = list(ids[:n])
        with torch.inference_mode():
            return eng.prefill(ids), n, eng.cache

    ident = model_identity(model.store, a, model.dtype, name)
    pc = PrefixCache(tmp_path / "prefix", ident, 64, ram_bytes=1 << 30, granule=128)
    full, _, ref = run()
    assert pc.save(ids, ref) == 256
    assert pc.stats()["ram_bytes"] == 4 * 2 * a.num_hidden_layers * ref.kpool[0].numel()  # 4 chunks of records
    pc.close()
    for cache in (pc, PrefixCache(tmp_path / "prefix", ident, 64, ram_bytes=1 << 30, granule=128)):
        logits, n, got = run(cache)
        assert n == 256 and torch.equal(logits, full)
        for layer in range(a.num_hidden_layers):
            for c in range(4):
                assert torch.equal(got.kpool[got._table.chunks[layer][c][1]], ref.kpool[ref._table.chunks[layer][c][1]])
                assert torch.equal(got.vpool[got._table.chunks[layer][c][1]], ref.vpool[ref._table.chunks[layer][c][1]])
            assert all(torch.equal(x, y) for x, y in zip(got.rows(layer, 256, 300), ref.rows(layer, 256, 300)))


def test_prefill_passes_start_at_multiples_of_the_prefill_chunk():
    """After a reused prefix the first pass runs to the next multiple of prefill_chunk, the others from
    multiples: the passes a prefill from scratch runs (what makes a granule-aligned restore bit-identical)."""
    from offload_rt.engine import Engine, ResidentWeights, model_groups
    from offload_rt.models import llama
    from tests.test_scheduler import tiny

    args, sd = tiny(False)
    eng = Engine(args, ResidentWeights(model_groups(args), lambda n: sd[n].float(), llama.EMBED), torch.float32,
                 max_tokens=64, prefill_chunk=8)
    passes, forward = [], eng.forward
    eng.forward = lambda ids: passes.append((eng.cache.offset, len(ids))) or forward(ids)
    progress = []
    ids = [(7 * i) % 50 + 1 for i in range(30)]
    with torch.inference_mode():
        eng.prefill(ids, lambda done, total: progress.append((done, total)))
        assert passes == [(0, 8), (8, 8), (16, 8), (24, 6)] and progress[-1] == (30, 30)
        passes.clear()
        eng.prefill(ids[:13] + [2, 3, 4] * 5)  # 13 tokens reused
        assert passes == [(13, 3), (16, 8), (24, 4)]
        passes.clear()
        eng.prefill(eng.tokens[:16] + [5])  # reused up to a multiple: one pass from there
        assert passes == [(16, 1)]


def test_serve_prefill_pass_and_granule():
    """The server's pass divides its granule and the granule is whole KV chunks: a restored prefix always ends
    at a pass boundary of the uncached prompt (the bit-identity above)."""
    from offload_rt.serve import prefill_pass

    assert prefill_pass(512, 256) == (256, 256)  # the default: a chunk's granule, not the 512-token pass
    assert prefill_pass(128, 256) == (128, 256) and prefill_pass(100, 256) == (64, 256)
    for chunk, kv in [(512, 256), (256, 256), (128, 256), (100, 256), (1, 64), (96, 64), (48, 96)]:
        step, granule = prefill_pass(chunk, kv)
        assert step <= max(chunk, 1) and granule % step == 0 and granule % kv == 0
