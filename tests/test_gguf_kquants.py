"""K-quant GGUF tensors (Q4_K, Q5_K, Q6_K): kept as the file's blocks, read back exactly, and a K-quant model
end to end through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize

import storage
from kernels_gpu import quant as gpu_quant
from storage import transcode
from storage.formats import QTensor
from storage.sources import GGUFSource
from tests.cli_helpers import run_cli
from tests.ggml_kquants import quantize_k
from tests.gguf_models import add_ascii_tokenizer, load_into, write_hf_gguf
from tests.hf_models import tiny_model

KQUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
# NMSE of a K-quant against the float weights it encodes (min/max scales, Gaussian weights with sub-block
# magnitudes spread 20x): about 6e-3, 1.4e-3, 3.4e-4 measured; bounds leave ~1.6x. A misread scale, min or
# high bit costs orders of magnitude more.
WEIGHT_NMSE = {Q.Q4_K: 1e-2, Q.Q5_K: 2.5e-3, Q.Q6_K: 6e-4}


def nmse(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(((got - ref) ** 2).sum() / (ref ** 2).sum())


def varied_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows whose 16-value sub-blocks have magnitudes from 0.05 to 1, so the 6-bit scales and
    mins take small and large values (both halves of ggml's 12-byte scale packing are exercised)."""
    rng = np.random.default_rng(seed)
    mag = rng.uniform(0.05, 1.0, (rows, cols // 16, 1))
    return (rng.standard_normal((rows, cols // 16, 16)) * mag).reshape(rows, cols).astype(np.float32)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_kquant_tensor_reads_back(tmp_path, qtype):
    w = varied_weights(48, 512, seed=int(qtype))  # 48 rows of two super-blocks each
    raw, decoded = quantize_k(w, qtype)
    path = tmp_path / f"{qtype.name}.gguf"
    gw = GGUFWriter(str(path), "llama")
    for k, v in {"block_count": 1, "embedding_length": 512, "feed_forward_length": 48, "head_count": 4}.items():
        getattr(gw, f"add_{k}")(v)
    add_ascii_tokenizer(gw, 200, "llama-bpe")
    gw.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=qtype)
    gw.add_tensor("token_embd.weight", np.zeros((200, 512), np.float32))
    gw.write_header_to_file(); gw.write_kv_data_to_file(); gw.write_tensors_to_file(); gw.close()

    (src,) = [t for t in GGUFSource(path).tensors() if t.name == "model.layers.0.mlp.down_proj.weight"]
    assert (src.fmt, src.shape) == (qtype.name.lower(), (48, 512))
    st = storage.open_or_convert(path, tmp_path / "cache", progress=False)
    q = st.load(src.name)
    assert isinstance(q, QTensor) and q.fmt.name == qtype.name.lower() and tuple(q.shape) == w.shape
    assert np.array_equal(q.data.numpy(), raw)  # the file's bytes, as they are
    assert st.info(src.name).nbytes == raw.nbytes
    got = gpu_quant.dequantize(q).numpy()
    assert np.array_equal(got, transcode.dequantize(q.data.numpy(), q.fmt.name))  # the CPU kernels' reading

    # gguf-py's own dequantization of the same bytes
    assert np.array_equal(got, dequantize(raw, qtype).reshape(w.shape))
    # the float64 value of every code (d * sc * q - dmin * m, or d * sc * (q - 32)): float32 rounding only
    assert nmse(got, decoded) < 1e-13, nmse(got, decoded)
    assert np.abs(got - decoded).max() <= 1e-6 * np.abs(decoded).max()
    # and it is the quantization of the weights, to that format's precision
    assert nmse(got, w) < WEIGHT_NMSE[qtype], nmse(got, w)
    st.verify_all()


# Q4_K_M-like mix over every K-quant: each of Q, K (un-permuted after dequantization), V, O, the MLP,
# the embedding and the head.
MIX = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_K, "ffn_gate": Q.Q5_K,
       "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q4_K, "output": Q.Q6_K}


def mix_type(name: str, arr: np.ndarray) -> Q:
    kind = name.rsplit(".", 2)[-2]
    return MIX[kind] if arr.ndim == 2 else Q.F32  # norms stay F32, as llama.cpp keeps 1-d tensors


def test_kquant_llama_cli_matches_transformers(tmp_path):
    """A llama GGUF of Q4_K/Q5_K/Q6_K weights, run by offload-run, says what transformers says on those weights."""
    hf = tiny_model("llama", seed=21, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny-Q4_K_M.gguf"
    held = write_hf_gguf(path, hf, "llama", qtype_of=mix_type, file_type=15)  # 15 = MOSTLY_Q4_K_M
    before = hf.model.layers[0].self_attn.q_proj.weight.detach().clone()
    load_into(hf, held)
    assert not torch.equal(before, hf.model.layers[0].self_attn.q_proj.weight)  # really the quantized weights

    from tokenizers import Tokenizer

    GGUFSource(path).tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    prompt = "hello world"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    n_new = 16
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    expected = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)

    proc = run_cli(path, "--raw", "--prompt", prompt, "--max-new-tokens", n_new, "--ignore-eos",
                   "--offload-dir", tmp_path / "stores", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
