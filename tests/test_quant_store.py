"""Quantized weights in the store: GGUF quants kept as the file's blocks and read back bit for bit,
exotic types dequantized with a warning, ``--weights`` choices at conversion, store sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

import storage
from kernels_gpu import quant as gpu_quant
from offload_rt.errors import UsageError
from storage import transcode
from storage.formats import FORMATS, QTensor
from storage.sources import unpermute_qk
from tests.ggml_kquants import quantize_k
from tests.gguf_models import add_ascii_tokenizer, write_hf_gguf
from tests.hf_models import tiny_model, write_checkpoint

HIDDEN, HEADS = 512, 4
NATIVE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mag = rng.uniform(0.02, 1.5, (rows, cols // 16, 1))
    return (rng.standard_normal((rows, cols // 16, 16)) * mag).reshape(rows, cols).astype(np.float32)


def encode(arr: np.ndarray, qt: Q) -> np.ndarray:
    """What a GGUF writer stores for ``arr`` in type ``qt`` (bytes for block types)."""
    if qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return quantize_k(arr, qt)[0]
    if qt == Q.F16:
        return arr.astype(np.float16)
    if qt == Q.F32:
        return arr
    return quantize(arr, qt)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]], n_layers: int) -> None:
    w = GGUFWriter(str(path), "llama")
    for k, v in {"block_count": n_layers, "embedding_length": HIDDEN, "feed_forward_length": 64,
                 "head_count": HEADS, "head_count_kv": HEADS}.items():
        getattr(w, f"add_{k}")(v)
    add_ascii_tokenizer(w, 200, "llama-bpe")
    for name, (arr, qt) in tensors.items():
        data = encode(arr, qt)
        w.add_tensor(name, data, raw_dtype=qt if qt not in (Q.F32, Q.F16) else None)
    w.add_tensor("token_embd.weight", np.zeros((200, HIDDEN), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def values(t) -> np.ndarray:
    return (gpu_quant.dequantize(t) if isinstance(t, QTensor) else t.float()).numpy()


def test_every_native_gguf_type_is_kept_and_reads_back_bit_for_bit(tmp_path):
    spec = {f"blk.{i}.ffn_down.weight": (weights(24 + i, HIDDEN, seed=i), qt) for i, qt in enumerate(NATIVE)}
    spec["blk.0.attn_q.weight"] = (weights(HIDDEN, HIDDEN, seed=50), Q.Q4_K)  # Q/K rows un-permuted as blocks
    spec["blk.0.attn_k.weight"] = (weights(HIDDEN, HIDDEN, seed=51), Q.Q8_0)
    path = tmp_path / "types.gguf"
    write_gguf(path, spec, n_layers=len(NATIVE))
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    for gname, (arr, qt) in spec.items():
        name = storage.sources.gguf_to_hf_name(gname)
        raw = encode(arr, qt)
        info = st.info(name)
        assert info.fmt.name == {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(qt.name, qt.name.lower())
        assert info.shape == arr.shape and info.nbytes == raw.nbytes  # the file's bytes, no more
        ref = dequantize(raw, qt).reshape(arr.shape).astype(np.float32)
        got = st.load(name)
        if "attn_q" in gname or "attn_k" in gname:  # llama.cpp's converter permuted these rows
            raw, ref = unpermute_qk(raw, HEADS), unpermute_qk(ref, HEADS)
        if info.quantized:
            assert isinstance(got, QTensor) and np.array_equal(got.data.numpy(), raw.reshape(got.data.shape))
            assert np.array_equal(bits(transcode.dequantize(got.data.numpy(), info.fmt.name)), bits(ref))  # Numba
        assert np.array_equal(bits(values(got)), bits(ref)), gname  # torch (the device path)
    st.verify_all()


def test_other_gguf_types_are_dequantized_with_a_warning(tmp_path, capfd):
    arr = weights(16, HIDDEN, seed=3)
    path = tmp_path / "q5.gguf"
    write_gguf(path, {"blk.0.ffn_down.weight": (arr, Q.Q5_0), "blk.0.ffn_up.weight": (arr, Q.Q4_1)}, n_layers=1)
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and "1 Q5_0" in err and "float32" in err
    info = st.info("model.layers.0.mlp.down_proj.weight")
    assert info.fmt.name == "float32"
    assert np.array_equal(st.load(info.name).numpy(), dequantize(quantize(arr, Q.Q5_0), Q.Q5_0))
    assert st.info("model.layers.0.mlp.up_proj.weight").fmt.name == "q4_1"


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    hf = tiny_model("llama", seed=5, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", hf, dtype=torch.bfloat16)


@pytest.mark.parametrize("choice,fmt,qt", [("int4", "q4_1", Q.Q4_1), ("int8", "q8_0", Q.Q8_0)])
def test_weights_quantize_the_matrices_of_a_safetensors_checkpoint(tmp_path, tiny_bf16, choice, fmt, qt):
    cache = tmp_path / "cache"
    full = storage.open_or_convert(tiny_bf16, cache, progress=False)
    st = storage.open_or_convert(tiny_bf16, cache, weights=choice, progress=False)
    assert st.path != full.path and st.path.name.endswith(f"-{choice}.zarr") and full.path.is_dir()
    assert st.manifest["weights"] == choice
    assert storage.store_path(tiny_bf16, cache, choice) == st.path
    for name in full.tensor_names:
        src = full.load(name)
        info = st.info(name)
        if src.dim() == 2:
            assert info.fmt.name == fmt
            want = quantize(src.float().numpy(), qt)  # gguf-py's quantizer is the reference
            assert np.array_equal(st.load(name).data.numpy(), want), name
            assert info.nbytes == src.numel() * FORMATS[fmt].block_bytes // 32
        else:  # norms keep the checkpoint's float type
            assert info.fmt.name == "bfloat16" and torch.equal(st.load(name), src)


def test_float_weights_from_a_quantized_gguf(tmp_path):
    arr = weights(8, HIDDEN, seed=9)
    path = tmp_path / "q.gguf"
    write_gguf(path, {"blk.0.ffn_down.weight": (arr, Q.Q4_K), "blk.0.attn_norm.weight": (arr[0], Q.F32)}, n_layers=1)
    ref = dequantize(quantize_k(arr, Q.Q4_K)[0], Q.Q4_K).reshape(arr.shape)
    f32 = storage.open_or_convert(path, tmp_path / "cache", weights="f32", progress=False)
    assert {f32.info(n).fmt.name for n in f32.tensor_names} == {"float32"}
    assert np.array_equal(f32.load("model.layers.0.mlp.down_proj.weight").numpy(), ref)
    bf = storage.open_or_convert(path, tmp_path / "cache", weights="bf16", progress=False)
    assert torch.equal(bf.load("model.layers.0.mlp.down_proj.weight"), torch.from_numpy(ref).to(torch.bfloat16))
    assert torch.equal(bf.load("model.layers.0.input_layernorm.weight"), torch.from_numpy(arr[0]).to(torch.bfloat16))
    # requantized: int8 of the dequantized values
    q8 = storage.open_or_convert(path, tmp_path / "cache", weights="int8", progress=False)
    assert np.array_equal(q8.load("model.layers.0.mlp.down_proj.weight").data.numpy(), quantize(ref, Q.Q8_0))


def test_unknown_weights_choice_is_a_usage_error(tmp_path, tiny_bf16):
    with pytest.raises(UsageError, match="--weights"):
        storage.open_or_convert(tiny_bf16, tmp_path / "cache", weights="int3", progress=False)


def test_q4_k_m_store_is_no_larger_than_the_file(tmp_path):
    from tests.test_gguf_kquants import mix_type

    hf = tiny_model("llama", seed=2, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny-Q4_K_M.gguf"
    write_hf_gguf(path, hf, "llama", qtype_of=mix_type, file_type=15)
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    tensor_bytes = sum(t.n_bytes for t in storage.sources.GGUFSource(path).tensor_infos())
    assert st.total_bytes == tensor_bytes
    on_disk = sum(f.stat().st_size for f in st.path.rglob("*") if f.is_file() and f.parent != st.path)
    assert on_disk <= 1.03 * path.stat().st_size


def test_a_version_1_store_still_opens(tmp_path, tiny_bf16):
    st = storage.open_or_convert(tiny_bf16, tmp_path / "cache", progress=False)
    ref = {n: st.load(n) for n in st.tensor_names}
    m = json.loads((st.path / "manifest.json").read_text())
    m["format_version"] = 1
    for t in m["tensors"].values():
        t["dtype"] = t.pop("format")
    (st.path / "manifest.json").write_text(json.dumps(m))
    old = storage.WeightStore.open(st.path)
    assert all(torch.equal(old.load(n), ref[n]) for n in ref)
