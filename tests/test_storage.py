"""storage: Hugging Face checkpoint -> zarr weight store, and the raw-chunk reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

import storage
import storage.convert as convert_mod
from offload_rt.errors import CorruptStoreError, ModelSourceError
from storage.sources import HFSource
from tests.cli_helpers import default_sigint

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40,
          "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "torch_dtype": "bfloat16", "eos_token_id": 2}


def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, **{c: i + 4 for i, c in enumerate("abcdefghij ")}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    return tok.to_str()


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(8, 16, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(16, generator=g),
    }


def make_hf(d: Path, ts: dict[str, torch.Tensor] | None = None, *, shards: int = 1) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    ts = tensors() if ts is None else ts
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "tokenizer.json").write_text(tiny_tokenizer_json())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                         "chat_template": "{{ messages }}", "add_bos_token": True}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 2]}))
    if shards == 1:
        save_file(ts, str(d / "model.safetensors"))
    else:
        names = list(ts)
        weight_map = {}
        for k in range(shards):
            part = {n: ts[n] for n in names[k::shards]}
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(d / fname))
            weight_map.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def store_dirs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ----------------------------------------------------------------------------- round trips
def test_round_trip_dtypes_and_manifest(tmp_path):
    ts = tensors()
    src = make_hf(tmp_path / "ckpt", ts)
    st = storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert st.path.parent == tmp_path / "cache" and st.path.name.startswith("ckpt-") and st.path.suffix == ".zarr"
    assert set(st.tensor_names) == set(ts)
    for name, ref in ts.items():
        info = st.info(name)
        assert info.dtype == ref.dtype and info.shape == tuple(ref.shape) and info.nbytes == ref.numel() * ref.element_size()
        assert same(st.load(name), ref)
    m = st.manifest
    assert m["format_version"] == 2 and m["source"]["kind"] == "hf" and m["weights"] == "auto"
    assert m["source"]["path"] == str(src.resolve()) and m["source"]["identity"]["files"]
    assert m["model_config"] == CONFIG == st.model_config
    e = m["tensors"]["model.embed_tokens.weight"]
    assert e["format"] == "bfloat16" and e["storage_dtype"] == "uint16" and e["shape"] == [40, 16]
    assert e["chunk_rows"] == 40 and e["nbytes"] == 40 * 16 * 2 and len(e["checksums"]) == 1
    assert e["checksums"][0].startswith("crc32:") and len(e["checksums"][0]) == 14
    tm = st.tokenizer_meta
    assert tm == {"file": "tokenizer.json", "chat_template": "{{ messages }}", "bos_token": "<s>", "eos_token": "</s>",
                  "bos_token_id": 1, "eos_token_ids": [3, 2], "add_bos_token": True}
    assert st.tokenizer_file.read_text() == (src / "tokenizer.json").read_text()
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_plain_zarr_reads_identical_values(tmp_path):
    ts = tensors(1)
    st = storage.open_or_convert(make_hf(tmp_path / "ckpt", ts), tmp_path / "cache", progress=False)
    group = zarr.open(str(st.path), mode="r")
    for name, ref in ts.items():
        arr = group[name]
        got = arr[:]
        if ref.dtype == torch.bfloat16:
            assert got.dtype == np.uint16 and arr.attrs["format"] == "bfloat16"
            assert np.array_equal(got, ref.view(torch.int16).numpy().view(np.uint16))
        else:
            assert np.array_equal(got, ref.numpy())
        assert arr.metadata.codecs and arr.compressors == ()


def test_sharded_checkpoint_with_index(tmp_path):
    ts = tensors(2)
    src = make_hf(tmp_path / "ckpt", ts, shards=3)
    save_file({"stray.weight": torch.zeros(2)}, str(src / "not-in-index.safetensors"))  # ignored: not in the index
    st = storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert set(st.tensor_names) == set(ts)
    for name, ref in ts.items():
        assert same(st.load(name), ref)


def test_large_tensor_is_chunked_along_axis0(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "CHUNK_LIMIT", 4096)  # 16 rows of 64 float32
    g = torch.Generator().manual_seed(3)
    even = torch.randn(100, 64, generator=g)  # 10 rows per chunk divide it evenly
    odd = torch.randn(97, 64, generator=g)  # prime: 16 rows per chunk, the edge chunk padded as zarr stores it
    ts = {"model.embed_tokens.weight": even, "lm_head.weight": odd, "model.norm.weight": torch.randn(64)}
    st = storage.open_or_convert(make_hf(tmp_path / "ckpt", ts), tmp_path / "cache", progress=False)
    e = st.manifest["tensors"]["model.embed_tokens.weight"]
    assert e["chunk_rows"] == 10 and len(e["checksums"]) == 10 and e["chunk_keys"][3] == "c/3/0"
    o = st.manifest["tensors"]["lm_head.weight"]
    assert o["chunk_rows"] == 16 and len(o["checksums"]) == 7
    sizes = [os.path.getsize(st.path / "lm_head.weight" / k) for k in o["chunk_keys"]]
    assert sizes == [16 * 64 * 4] * 7
    group = zarr.open(str(st.path), mode="r")
    for name, ref in ts.items():
        assert same(st.load(name), ref)
        assert np.array_equal(group[name][:], ref.numpy())
    rows = st.read_rows("lm_head.weight", [0, 17, 96, 17])
    assert torch.equal(rows, odd[[0, 17, 96, 17]])
    st.verify_all()


def test_read_into_any_dtype_and_threads(tmp_path):
    ts = tensors(4)
    st = storage.open_or_convert(make_hf(tmp_path / "ckpt", ts), tmp_path / "cache", progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = torch.empty(st.info(name).nbytes, dtype=torch.uint8)
    st.read_into(name, raw, verify=True)
    assert torch.equal(raw.view(torch.float32).view(16, 16), ts[name])
    with pytest.raises(ValueError):
        st.read_into(name, torch.empty(10, dtype=torch.uint8))

    def job(i):
        n = list(ts)[i % len(ts)]
        out = torch.empty(ts[n].shape, dtype=ts[n].dtype)
        st.read_into(n, out, verify=True, drop_cache=bool(i % 2))
        return same(out, ts[n])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(job, range(40)))
    st.verify_all()


# ----------------------------------------------------------------------------- reuse / invalidation
def test_second_open_reuses_store_without_reading_tensors(tmp_path, monkeypatch):
    src = make_hf(tmp_path / "ckpt")
    first = storage.open_or_convert(src, tmp_path / "cache", progress=False)

    def boom(*a, **k):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(HFSource, "tensors", boom)
    monkeypatch.setattr(HFSource, "tokenizer", boom)
    monkeypatch.setattr(convert_mod, "convert", boom)
    again = storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert again.path == first.path
    assert storage.store_path(src, tmp_path / "cache") == first.path


def test_touching_or_changing_the_source_makes_a_new_store(tmp_path):
    src = make_hf(tmp_path / "ckpt")
    a = storage.open_or_convert(src, tmp_path / "cache", progress=False)
    st = (src / "model.safetensors").stat()
    os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    b = storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert b.path != a.path
    new = tensors(7)
    save_file(new, str(src / "model.safetensors"))
    c = storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert c.path not in (a.path, b.path)
    assert same(c.load("model.norm.weight"), new["model.norm.weight"])
    (src / "README.md").write_text("irrelevant files do not change the identity")
    assert storage.open_or_convert(src, tmp_path / "cache", progress=False).path == c.path


def test_rebuild_replaces_a_garbled_store(tmp_path):
    src = make_hf(tmp_path / "ckpt")
    st = storage.open_or_convert(src, tmp_path / "cache", progress=False)
    (st.path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="--rebuild-store") as ei:
        storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert "\n" not in str(ei.value)
    (st.path / "manifest.json").unlink()
    with pytest.raises(ModelSourceError, match="--rebuild-store"):
        storage.WeightStore.open(st.path)
    again = storage.open_or_convert(src, tmp_path / "cache", rebuild=True, progress=False)
    assert again.path == st.path and same(again.load("model.norm.weight"), tensors()["model.norm.weight"])
    assert store_dirs(tmp_path / "cache") == [st.path.name]


# ----------------------------------------------------------------------------- atomicity
def test_exception_mid_write_leaves_nothing(tmp_path, monkeypatch):
    src = make_hf(tmp_path / "ckpt")
    real = convert_mod._write_tensor
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(convert_mod, "_write_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert store_dirs(tmp_path / "cache") == []

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_write_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.open_or_convert(src, tmp_path / "cache", progress=False)
    assert store_dirs(tmp_path / "cache") == []


def test_sigint_during_conversion_leaves_nothing(tmp_path):
    g = torch.Generator().manual_seed(5)
    ts = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 64, generator=g) for i in range(60)}
    src = make_hf(tmp_path / "ckpt", ts)
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import time, storage.convert as c
        real = c._write_tensor
        def slow(*a, **k):
            time.sleep(0.05)  # a large checkpoint, in slow motion
            return real(*a, **k)
        c._write_tensor = slow
        c.open_or_convert({str(src)!r}, {str(cache)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    deadline = time.time() + 30
    while time.time() < deadline:
        if any(len(list(p.glob("*/c/0/0"))) >= 3 for p in cache.glob("*.zarr.tmp-*")):
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("conversion never started writing")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    assert store_dirs(cache) == []


def test_stale_tmp_dirs_of_dead_processes_are_removed(tmp_path):
    src = make_hf(tmp_path / "ckpt")
    cache = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f"ckpt-0123456789abcdef.zarr.tmp-{int(dead.stdout)}"
    live = cache / f"other-0123456789abcdef.zarr.tmp-{os.getpid()}"
    (stale / "x").mkdir(parents=True)
    live.mkdir()
    st = storage.open_or_convert(src, cache, progress=False)
    assert not stale.exists() and live.exists()
    assert sorted(store_dirs(cache)) == sorted([st.path.name, live.name])


def test_concurrent_conversions_of_one_source(tmp_path):
    src = make_hf(tmp_path / "ckpt")
    results, errors = [], []

    def run():
        try:
            results.append(storage.open_or_convert(src, tmp_path / "cache", progress=False).path)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert store_dirs(tmp_path / "cache") == [results[0].name]


# ----------------------------------------------------------------------------- corruption and bad sources
def test_flipped_byte_is_reported_by_tensor_name(tmp_path):
    st = storage.open_or_convert(make_hf(tmp_path / "ckpt"), tmp_path / "cache", progress=False)
    name = "model.layers.0.self_attn.k_proj.weight"
    chunk = st.path / name / st.manifest["tensors"][name]["chunk_keys"][0]
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40
    chunk.write_bytes(bytes(data))
    st = storage.WeightStore.open(st.path)
    st.load("model.norm.weight")  # the others are fine
    with pytest.raises(CorruptStoreError) as ei:
        st.load(name)
    assert ei.value.tensor == name and name in str(ei.value) and "--rebuild-store" in str(ei.value)
    assert "\n" not in str(ei.value)
    st.read_into(name, torch.empty(8, 16, dtype=torch.float16), verify=False)  # unverified reads do not check
    with pytest.raises(CorruptStoreError) as ei:
        st.verify_all()
    assert ei.value.tensor == name
    chunk.write_bytes(bytes(data[:-2]))
    with pytest.raises(CorruptStoreError, match="wrong size"):
        st.load(name, verify=False)


def _one_line_error(path, match=None):
    with pytest.raises(ModelSourceError) as ei:
        storage.read_source_config(path) if match == "config" else storage.open_or_convert(path, path.parent / "cache",
                                                                                           progress=False)
    msg = str(ei.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_sources_raise_one_line_errors(tmp_path):
    assert "does not exist" in _one_line_error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    msg = _one_line_error(tmp_path / "empty")
    assert "is not a model checkpoint" in msg and "config.json" in msg
    assert "is not a model checkpoint" in _one_line_error(tmp_path / "empty", "config")
    (tmp_path / "notes.txt").write_text("hello")
    assert "is not a model checkpoint" in _one_line_error(tmp_path / "notes.txt")
    src = make_hf(tmp_path / "badcfg")
    (src / "config.json").write_text("{oops")
    assert "config.json" in _one_line_error(src, "config")


@pytest.mark.parametrize("damage", ["length", "json", "offsets", "truncated"])
def test_corrupt_safetensors_header(tmp_path, damage):
    src = make_hf(tmp_path / "ckpt")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "length":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    elif damage == "json":
        data[8:12] = b"@@@@"
    elif damage == "offsets":
        header = json.loads(data[8:8 + n])
        header["model.norm.weight"]["data_offsets"] = [10 ** 6, 10 ** 6 + 64]
        blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(blob) == n
        data[8:8 + n] = blob
    else:
        data = data[:-100]
    f.write_bytes(bytes(data))
    msg = _one_line_error(src)
    assert "model.safetensors" in msg and ("corrupt" in msg or "truncated" in msg)
    assert store_dirs(src.parent / "cache") == []


def test_missing_tokenizer_is_a_source_error(tmp_path):
    src = make_hf(tmp_path / "ckpt")
    (src / "tokenizer.json").unlink()
    assert "tokenizer.json" in _one_line_error(src)
    assert store_dirs(src.parent / "cache") == []


def test_progress_bar_does_not_break_conversion(tmp_path):
    st = storage.open_or_convert(make_hf(tmp_path / "ckpt"), tmp_path / "cache", progress=True)
    assert len(st.tensor_names) == 5
