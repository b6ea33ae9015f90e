"""MoE experts in the weight store: each layer's experts packed into one tensor of 4 KiB-aligned units, read back
per expert (read_experts + ExpertLayout.views) equal to the checkpoint's tensors, from Hugging Face directories
and GGUF files with stacked experts, through --weights transcoding; the error paths."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

import storage
from offload_rt.errors import CorruptStoreError, ModelSourceError
from storage import transcode
from storage.experts import PART_ALIGN, PARTS, UNIT_ALIGN, ExpertLayout, expert_name, pack_experts, packed_name
from storage.formats import QTensor
from storage.sources import GGUFSource, TensorSource
from storage.store import aligned_buffer
from tests.gguf_models import add_ascii_tokenizer, write_moe_gguf
from tests.moe_models import EXPERTS, MOE_TYPES, checkpoint_tensors, tiny_moe_model, write_moe_checkpoint

BLOCK = {"mixtral": "block_sparse_moe"}  # the experts' module (others: "mlp")


def block_of(model_type: str) -> str:
    return BLOCK.get(model_type, "mlp")


def checkpoint(tmp_path, model_type: str, dtype=None, **over):
    return write_moe_checkpoint(tmp_path / f"{model_type}-ckpt", tiny_moe_model(model_type, **over), dtype=dtype)


def read_units(st, name: str, ids, *, direct: bool = True, executor=None) -> list[torch.Tensor]:
    """Experts ``ids`` of ``name``: 4 KiB-aligned buffers (O_DIRECT) or, with direct=False, misaligned ones."""
    lay = st.expert_layout(name)
    if direct:
        outs = [aligned_buffer(lay.unit_bytes) for _ in ids]
    else:
        outs = [torch.empty(lay.unit_bytes + 1, dtype=torch.uint8)[1:] for _ in ids]
    assert st.read_experts(name, ids, outs, executor=executor, direct=direct, verify=True) == len(ids) * lay.unit_bytes
    return outs


def packed_names(st) -> list[str]:
    return [n for n in st.tensor_names if st.expert_layout(n) is not None]


def check_layout(lay: ExpertLayout, st, name: str) -> None:
    assert list(lay.parts) == list(PARTS)
    assert lay.unit_bytes % UNIT_ALIGN == 0 and all(p.offset % PART_ALIGN == 0 for p in lay.parts.values())
    ends = [p.offset + p.nbytes for p in lay.parts.values()]
    assert ends[-1] <= lay.unit_bytes < ends[-1] + UNIT_ALIGN + PART_ALIGN  # padded, not more
    info = st.info(name)
    assert (info.fmt.name, info.shape) == ("uint8", (lay.count, lay.unit_bytes))
    assert st.manifest["tensors"][name]["chunk_rows"] == 1 and st.manifest["tensors"][name]["experts"] == lay.to_manifest()


# ---------------------------------------------------------------- Hugging Face directories


@pytest.mark.parametrize("model_type,dtype", [(t, None) for t in MOE_TYPES] + [("qwen3_moe", torch.bfloat16)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_hf_experts_read_back_bit_exact(tmp_path, model_type, dtype):
    ckpt = checkpoint(tmp_path, model_type, dtype)
    ref = checkpoint_tensors(ckpt)
    st = storage.open_or_convert(ckpt, tmp_path / "cache", progress=False)
    block = block_of(model_type)
    assert st.manifest["format_version"] == 3
    assert packed_names(st) == [packed_name(layer, block) for layer in range(2)]
    assert not [n for n in st.tensor_names if ".experts." in n]  # no per-expert tensor left
    for name in ref:  # everything else is stored as before
        if ".experts." not in name:
            assert torch.equal(st.load(name), ref[name]), name
    for layer in range(2):
        name = packed_name(layer, block)
        lay = st.expert_layout(name)
        check_layout(lay, st, name)
        assert lay.count == EXPERTS
        ids = [3, 0, 2, 1]
        units = read_units(st, name, ids, executor=ThreadPoolExecutor(2))
        whole = st.load(name)  # [E, U] uint8, one expert per row
        for e, unit in zip(ids, units):
            assert torch.equal(whole[e], unit)
            views = lay.views(unit)
            for part, t in views.items():
                want = ref[expert_name(layer, e, part, block)]
                assert t.dtype == want.dtype and torch.equal(t, want), (name, e, part)
            assert views["gate_proj"].data_ptr() == unit.data_ptr()  # zero-copy
    assert st.expert_layout("model.layers.0.input_layernorm.weight") is None


@pytest.mark.parametrize("weights,fmt,qtype", [("int4", "q4_1", Q.Q4_1), ("int8", "q8_0", Q.Q8_0)])
def test_hf_experts_transcoded_then_packed(tmp_path, weights, fmt, qtype):
    ckpt = checkpoint(tmp_path, "qwen2_moe")
    ref = checkpoint_tensors(ckpt)
    st = storage.open_or_convert(ckpt, tmp_path / "cache", weights=weights, progress=False)
    name = packed_name(1)
    lay = st.expert_layout(name)
    assert {p.fmt.name for p in lay.parts.values()} == {fmt}
    for e, unit in enumerate(read_units(st, name, range(EXPERTS))):
        for part, q in lay.views(unit).items():
            w = ref[expert_name(1, e, part)].numpy()
            assert isinstance(q, QTensor) and tuple(q.shape) == w.shape
            assert np.array_equal(q.data.numpy(), quantize(w, qtype)), (e, part)  # gguf-py's quantization
    # the router and the shared expert's gate stay float (as llama.cpp keeps ffn_gate_inp, ffn_gate_inp_shexp);
    # the shared expert is quantized
    assert st.info("model.layers.1.mlp.gate.weight").fmt.name == "float32"
    assert st.info("model.layers.1.mlp.shared_expert_gate.weight").fmt.name == "float32"
    assert st.info("model.layers.1.mlp.shared_expert.up_proj.weight").fmt.name == fmt


def test_layout_views_on_any_device():
    lay = ExpertLayout.build(8, [("gate_proj", "q4_0", (3, 32)), ("up_proj", "bfloat16", (3, 32)),
                                 ("down_proj", "float16", (32, 3))])
    assert [p.nbytes for p in lay.parts.values()] == [54, 192, 192]
    assert [p.offset for p in lay.parts.values()] == [0, 64, 256] and lay.unit_bytes == 4096  # aligned, padded
    assert ExpertLayout.from_manifest(json.loads(json.dumps(lay.to_manifest()))) == lay
    views = lay.views(torch.empty(lay.unit_bytes, dtype=torch.uint8, device="meta"))  # any device: no copy
    assert isinstance(views["gate_proj"], QTensor) and views["gate_proj"].device.type == "meta"
    assert tuple(views["gate_proj"].shape) == (3, 32) and views["gate_proj"].nbytes == 54
    assert (views["up_proj"].dtype, tuple(views["up_proj"].shape)) == (torch.bfloat16, (3, 32))
    assert (views["down_proj"].dtype, tuple(views["down_proj"].shape)) == (torch.float16, (32, 3))
    with pytest.raises(ValueError):
        lay.views(torch.empty(lay.unit_bytes, dtype=torch.float32))


def test_direct_and_buffered_reads_agree(tmp_path):
    st = storage.open_or_convert(checkpoint(tmp_path, "mixtral"), tmp_path / "cache", progress=False)
    name = packed_name(0, "block_sparse_moe")
    direct = read_units(st, name, [2, 3, 1], direct=True)
    buffered = read_units(st, name, [2, 3, 1], direct=False, executor=ThreadPoolExecutor(3))
    assert all(a.data_ptr() % 4096 == 0 for a in direct) and all(b.data_ptr() % 4096 for b in buffered)
    for a, b in zip(direct, buffered):
        assert torch.equal(a, b)
    out = aligned_buffer(st.expert_layout(name).unit_bytes)
    with pytest.raises(IndexError):
        st.read_experts(name, [EXPERTS], [out])
    with pytest.raises(ValueError):
        st.read_experts(name, [0], [out[:-1]])
    with pytest.raises(ValueError):
        st.read_experts("model.layers.0.input_layernorm.weight", [0], [out])


@pytest.mark.parametrize("damage", ["truncate", "remove", "flip"])
def test_damaged_expert_chunk_is_a_corrupt_store(tmp_path, damage):
    st = storage.open_or_convert(checkpoint(tmp_path, "qwen3_moe"), tmp_path / "cache", progress=False)
    name = packed_name(1)
    key = st.manifest["tensors"][name]["chunk_keys"][2]
    f = st.path / name / key
    if damage == "truncate":
        os.truncate(f, f.stat().st_size - 4096)
    elif damage == "remove":
        f.unlink()
    else:
        data = bytearray(f.read_bytes())
        data[100] ^= 1
        f.write_bytes(bytes(data))
    read_units(st, name, [0, 1, 3])  # the other experts still read
    with pytest.raises(CorruptStoreError) as e:
        read_units(st, name, [1, 2])
    assert e.value.tensor == name and name in str(e.value) and "\n" not in str(e.value)
    assert "--rebuild-store" in str(e.value)
    with pytest.raises(CorruptStoreError):
        st.load(name)


# ---------------------------------------------------------------- packing errors


def _sources(shapes: dict, fmt: str = "float32") -> list[TensorSource]:
    out = []
    for (layer, e, part), shape in shapes.items():
        out.append(TensorSource(expert_name(layer, e, part), fmt, shape,
                                produce=lambda shape=shape: np.zeros(shape, np.float32)))
    return out


def _layer(n: int) -> dict:
    return {(0, e, p): ((64, 32) if p == "down_proj" else (32, 64)) for e in range(n) for p in PARTS}


def test_pack_experts_bounded_producer_and_order():
    norm = TensorSource("model.norm.weight", "float32", (64,), produce=lambda: np.zeros(64, np.float32))
    out = pack_experts([norm] + _sources(_layer(3)), count=3)
    assert [t.name for t in out] == ["model.norm.weight", packed_name(0)]
    packed = out[1]
    assert packed.produce is None and packed.chunk_rows == 1 and packed.shape == (3, 6 * UNIT_ALIGN)  # 3 x 8 KiB parts
    assert packed.produce_chunk(2).nbytes == 6 * UNIT_ALIGN  # one expert at a time
    assert pack_experts([norm]) == [norm]


@pytest.mark.parametrize("case", ["missing expert", "missing part", "extra expert", "shape", "format"])
def test_pack_experts_refuses_inconsistent_layers(case):
    shapes = _layer(4)
    fmt_of = {}
    if case == "missing expert":
        shapes = {k: v for k, v in shapes.items() if k[1] != 2}
    elif case == "missing part":
        del shapes[(0, 1, "up_proj")]
    elif case == "shape":
        shapes[(0, 3, "gate_proj")] = (64, 64)
    elif case == "format":
        fmt_of[(0, 1, "down_proj")] = "float16"
    srcs = [TensorSource(t.name, fmt_of.get(k, "float32"), t.shape, produce=t.produce)
            for k, t in zip(shapes, _sources(shapes))]
    with pytest.raises(ModelSourceError) as e:
        pack_experts(srcs, count=3 if case == "extra expert" else 4)
    msg = str(e.value)
    assert packed_name(0) in msg and "\n" not in msg
    assert {"missing expert": "expert 2 is missing", "missing part": "expert 1 lacks up_proj",
            "extra expert": "has expert 3", "shape": "expert 3's gate_proj",
            "format": "expert 1's down_proj is float16"}[case] in msg


def test_checkpoint_missing_an_expert_is_a_model_source_error(tmp_path):
    from safetensors.torch import save_file

    ckpt = checkpoint(tmp_path, "mixtral")
    tensors = checkpoint_tensors(ckpt)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="model.layers.1.block_sparse_moe.experts: expert 3 lacks down_proj"):
        storage.open_or_convert(ckpt, tmp_path / "cache", progress=False)


def test_manifest_experts_entry_is_checked(tmp_path):
    st = storage.open_or_convert(checkpoint(tmp_path, "qwen3_moe"), tmp_path / "cache", progress=False)
    m = json.loads((st.path / "manifest.json").read_text())
    m["tensors"][packed_name(0)]["experts"]["parts"]["up_proj"]["offset"] = 8  # misaligned
    (st.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelSourceError, match=f"tensor {packed_name(0)}: bad experts entry"):
        storage.WeightStore.open(st.path)


# ---------------------------------------------------------------- GGUF files with stacked experts

KMIX = {"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q4_K, "ffn_down_exps": Q.Q6_K}  # Q4_K_M-like experts
CASES = {  # model_type -> (shape overrides, expert types by GGUF name)
    "qwen3_moe": (dict(hidden_size=256, width=256), KMIX),
    "qwen2_moe": ({}, {"ffn_gate_exps": Q.Q8_0, "ffn_up_exps": Q.Q8_0, "ffn_down_exps": Q.Q4_0,
                       "ffn_gate_shexp": Q.Q8_0}),
    "mixtral": ({}, {"ffn_gate_exps": Q.F16, "ffn_up_exps": Q.F16, "ffn_down_exps": Q.F16}),
}
PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def moe_gguf(tmp_path, model_type: str):
    over, types = CASES[model_type]
    ckpt = checkpoint(tmp_path, model_type, **over)
    path = tmp_path / f"{model_type}.gguf"
    held = write_moe_gguf(path, ckpt, lambda gname, a: types.get(gname.split(".")[-2], Q.F32))
    return ckpt, path, held


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_gguf_stacked_experts(tmp_path, model_type):
    ckpt, path, held = moe_gguf(tmp_path, model_type)
    hf_cfg = json.loads((ckpt / "config.json").read_text())
    cfg = GGUFSource(path).config()
    assert cfg["model_type"] == model_type
    for key in ("hidden_size", "num_hidden_layers", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "norm_topk_prob", "intermediate_size"):
        if key in hf_cfg and (key != "norm_topk_prob" or model_type != "mixtral"):
            assert cfg[key] == hf_cfg[key], key
    assert cfg["num_experts"] == cfg["num_local_experts"] == EXPERTS
    if model_type == "qwen2_moe":
        assert cfg["qkv_bias"] is True and cfg["norm_topk_prob"] is False

    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    block = block_of(model_type)
    raw = {t.name: t for t in GGUFReader(str(path)).tensors}
    for name, want in held.items():  # router, shared expert, attention (Mixtral's Q/K un-permuted): as held
        if ".experts." not in name:
            got = st.load(name)
            got = transcode.dequantize(got.data.numpy(), got.fmt.name) if isinstance(got, QTensor) else got.numpy()
            assert np.array_equal(got.astype(np.float32), want), name
    for layer in range(2):
        name = packed_name(layer, block)
        lay = st.expert_layout(name)
        check_layout(lay, st, name)
        for e, unit in enumerate(read_units(st, name, range(EXPERTS))):
            for part, v in lay.views(unit).items():
                t = raw[f"blk.{layer}.ffn_{PROJ[part]}_exps.weight"]
                assert lay.parts[part].fmt.name == t.tensor_type.name.lower().replace("f16", "float16")
                piece = np.ascontiguousarray(t.data[e])  # the file's slice of expert e, as it is
                if isinstance(v, QTensor):
                    assert np.array_equal(v.data.numpy(), piece), (name, e, part)
                    got = transcode.dequantize(v.data.numpy(), v.fmt.name)  # our kernels' decoding
                    ggml = dequantize(piece, t.tensor_type)  # gguf-py's
                    assert np.array_equal(got, ggml), (name, e, part)
                else:
                    assert np.array_equal(v.numpy(), piece), (name, e, part)
                    got = v.float().numpy()
                want = held[expert_name(layer, e, part, block)]
                assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (name, e, part)


def test_gguf_other_expert_types(tmp_path):
    """Q5_K and Q4_1 experts stay blocks; Q5_0 (no native kernel) is dequantized per expert to float32."""
    types = {"ffn_gate_exps": Q.Q5_K, "ffn_up_exps": Q.Q5_0, "ffn_down_exps": Q.Q4_1}
    ckpt = checkpoint(tmp_path, "qwen3_moe", hidden_size=256, width=256)
    path = tmp_path / "m.gguf"
    held = write_moe_gguf(path, ckpt, lambda gname, a: types.get(gname.split(".")[-2], Q.F32))
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    lay = st.expert_layout(packed_name(1))
    assert {n: p.fmt.name for n, p in lay.parts.items()} == {"gate_proj": "q5_k", "up_proj": "float32",
                                                             "down_proj": "q4_1"}
    for e, unit in enumerate(read_units(st, packed_name(1), range(EXPERTS))):
        for part, v in lay.views(unit).items():
            got = transcode.dequantize(v.data.numpy(), v.fmt.name) if isinstance(v, QTensor) else v.numpy()
            want = held[expert_name(1, e, part)]
            assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (e, part)


def test_gguf_per_expert_mixtral_layout(tmp_path):
    """Early Mixtral GGUFs: one tensor per expert (blk.N.ffn_gate.E.weight), packed the same way."""
    ckpt = checkpoint(tmp_path, "mixtral")
    path = tmp_path / "m.gguf"
    expert = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")
    held = write_moe_gguf(path, ckpt, lambda gname, a: Q.Q8_0 if expert.match(gname) else Q.F32, per_expert=True)
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    name = packed_name(0, "block_sparse_moe")
    assert packed_names(st) == [name, packed_name(1, "block_sparse_moe")]
    lay = st.expert_layout(name)
    for e, unit in enumerate(read_units(st, name, range(EXPERTS))):
        for part, v in lay.views(unit).items():
            got = transcode.dequantize(v.data.numpy(), "q8_0")
            assert np.array_equal(got, held[expert_name(0, e, part, "block_sparse_moe")]), (e, part)


def test_gguf_kquant_experts_transcoded_to_int4(tmp_path):
    _, path, held = moe_gguf(tmp_path, "qwen3_moe")
    st = storage.open_or_convert(path, tmp_path / "cache", weights="int4", progress=False)
    lay = st.expert_layout(packed_name(0))
    assert {p.fmt.name for p in lay.parts.values()} == {"q4_1"}
    raw = {t.name: t for t in GGUFReader(str(path)).tensors}
    (unit,) = read_units(st, packed_name(0), [1])
    for part, q in lay.views(unit).items():
        t = raw[f"blk.0.ffn_{PROJ[part]}_exps.weight"]
        values = dequantize(np.ascontiguousarray(t.data[1]), t.tensor_type)
        assert np.array_equal(q.data.numpy(), quantize(values, Q.Q4_1)), part


def _bare_gguf(path, arch: str, meta: dict) -> None:
    w = GGUFWriter(str(path), arch)
    for k, v in meta.items():
        w.add_uint32(f"{arch}.{k}", v)
    add_ascii_tokenizer(w, 200, "llama-bpe")
    w.add_tensor("token_embd.weight", np.zeros((200, 64), np.float32))
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 32, 64), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.mark.parametrize("arch,model_type", [("deepseek2", "deepseek_v2"), ("gpt-oss", "gpt_oss"),
                                             ("glm4moe", "glm4_moe")])
def test_unsupported_moe_arch_passes_through(tmp_path, arch, model_type):
    path = tmp_path / "m.gguf"
    _bare_gguf(path, arch, {"block_count": 1, "embedding_length": 64, "expert_count": 4})  # no head count
    assert GGUFSource(path).config()["model_type"] == model_type  # the model layer refuses it, not storage
