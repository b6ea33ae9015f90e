"""GGUF files from tiny transformers models, written the way llama.cpp's convert_hf_to_gguf.py writes them.

Tensor names come from gguf-py's own ``TensorNameMap`` (llama.cpp's table), metadata from
``TextModel.set_gguf_parameters`` (+ ``LlamaModel``'s vocab size and RoPE dimension count, the MoE
models' expert counts and widths), and Q/K rows are permuted for ``llama`` only (Mixtral included):
llama.cpp keeps Qwen2/Qwen3's rotate-half (NEOX) layout as is. MoE experts are stacked per layer
into 3-D tensors as ``Qwen2MoeModel``/``LlamaModel.modify_tensors`` do (:func:`write_moe_gguf`).
Nothing here imports ``storage``: the files are what a user would bring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from storage.gguf_tokenizer import bytes_to_unicode
from tests.ggml_kquants import BLOCK_BYTES, quantize_k

_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}
MOE_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}  # model_type -> GGUF arch
GGUF_PY_QUANTS = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # types gguf-py quantizes itself
ASCII_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
ASCII_VOCAB = 3 + (0x7F - 0x20) + len(ASCII_MERGES)  # ascii_tokens without padding: 3 special, printable, merges


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently of storage.sources."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def ascii_tokens(vocab_size: int) -> tuple[list[str], list[int]]:
    """A byte-level BPE vocabulary of printable ASCII only (any id sequence decodes to plain text),
    padded to ``vocab_size`` with ``[PAD{i}]`` tokens as convert_hf_to_gguf.py pads a short vocabulary."""
    spell = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in range(0x20, 0x7F)]
    tokens += ["".join(m.split(" ")) for m in ASCII_MERGES]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < {len(tokens)} tokens")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(5)  # UNUSED
    return tokens, types


def add_ascii_tokenizer(w: GGUFWriter, vocab_size: int, pre: str) -> None:
    tokens, types = ascii_tokens(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(ASCII_MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")


def write_hf_gguf(path: Path, hf, arch: str, qtype_of: Callable[[str, np.ndarray], Q] = lambda name, a: Q.F32,
                  file_type: int = 0) -> dict[str, np.ndarray]:
    """Write transformers model ``hf`` to ``path`` as a GGUF of ``arch``; return what the file holds.

    ``qtype_of(gguf_name, array)`` picks each tensor's type: F32, F16, Q8_0/Q4_0/Q4_1 (gguf-py's quantizer) or a
    K-quant (Q4_K, Q5_K, Q6_K).
    The result maps Hugging Face names to the float32 weights a correct reader must produce
    (K-quant tensors: the float64 decoding of their codes, rounded to float32).
    """
    c = hf.config
    tmap = gguf.get_tensor_name_map(_ARCH[arch], c.num_hidden_layers)
    w = _writer(path, c, arch, file_type)
    held: dict[str, np.ndarray] = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied head is not in the checkpoint; llama.cpp writes no output.weight
        arr = t.detach().float().numpy()
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        held[name] = _add_tensor(w, gname, arr, qtype_of(gname, arr), c, arch)
    _finish(w)
    return held


def write_moe_gguf(path: Path, ckpt: Path, qtype_of: Callable[[str, np.ndarray], Q] = lambda name, a: Q.F32,
                   file_type: int = 0, per_expert: bool = False) -> dict[str, np.ndarray]:
    """Write MoE checkpoint directory ``ckpt`` (tests.moe_models) to ``path`` as llama.cpp's converter does:
    each layer's per-expert projections stacked into ``blk.N.ffn_{gate,up,down}_exps`` ([E, out, in], ggml
    dims {in, out, E}), router ``ffn_gate_inp``, qwen2_moe's shared expert ``*_shexp``; GGUF architecture
    qwen3moe / qwen2moe / llama (Mixtral, Q/K permuted). ``qtype_of(gguf_name, array)`` picks each tensor's
    type (F32, F16, Q8_0, Q4_0, Q4_1 or a K-quant). Returns what the file holds as float32 under the
    checkpoint's (per-expert) names, as write_hf_gguf does. ``per_expert``: the early Mixtral layout instead,
    one 2-D tensor per expert ``blk.N.ffn_{gate,up,down}.E.weight`` (llama.cpp still loads such files).
    """
    import transformers

    from tests.moe_models import checkpoint_tensors

    c = transformers.AutoConfig.from_pretrained(ckpt)
    arch = MOE_ARCH[c.model_type]
    tmap = gguf.get_tensor_name_map(_ARCH[arch], c.num_hidden_layers)
    w = _writer(path, c, arch, file_type)
    n_exp = getattr(c, "num_local_experts", None) or c.num_experts
    w.add_expert_count(n_exp)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if getattr(c, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    tensors = {k: v.float().numpy() for k, v in checkpoint_tensors(ckpt).items()}
    block, projs = (("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})
                    if arch == "llama" else ("mlp", {p: p for p in ("gate_proj", "up_proj", "down_proj")}))
    held: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        if ".experts." in name:
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        held[name] = _add_tensor(w, gname, tensors[name], qtype_of(gname, tensors[name]), c, arch)
    for layer in range(c.num_hidden_layers):
        for proj, hf_proj in projs.items():
            names = [f"model.layers.{layer}.{block}.experts.{e}.{hf_proj}.weight" for e in range(n_exp)]
            if per_expert:
                for e, n in enumerate(names):
                    gname = f"blk.{layer}.ffn_{proj.split('_')[0]}.{e}.weight"
                    held[n] = _add_tensor(w, gname, tensors[n], qtype_of(gname, tensors[n]), c, arch)
                continue
            stacked = np.stack([tensors[n] for n in names])
            gname = tmap.get_name(f"model.layers.{layer}.mlp.experts.{proj}", try_suffixes=(".weight",)) + ".weight"
            values = _add_tensor(w, gname, stacked, qtype_of(gname, stacked), c, arch)
            held.update(zip(names, values))
    _finish(w)
    return held


def _writer(path: Path, c, arch: str, file_type: int) -> GGUFWriter:
    """A GGUFWriter with ``TextModel.set_gguf_parameters``' metadata of config ``c`` and the ASCII tokenizer."""
    hp = c.to_dict()
    w = GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[_ARCH[arch]])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(hp.get("head_dim") or c.hidden_size // c.num_attention_heads)
    w.add_file_type(file_type)
    add_ascii_tokenizer(w, c.vocab_size, "llama-bpe" if arch == "llama" else "qwen2")
    return w


def _add_tensor(w: GGUFWriter, gname: str, arr: np.ndarray, qtype: Q, c, arch: str) -> np.ndarray:
    """Add float32 ``arr`` as ``gname`` in ``qtype`` (Q/K rows permuted for llama); returns the float32 values
    the file holds (K-quants: the float64 decoding of their codes, rounded to float32)."""
    if qtype in BLOCK_BYTES:
        data, decoded = quantize_k(arr, qtype)
        held = decoded.astype(np.float32)
    elif qtype in GGUF_PY_QUANTS:
        data = gguf.quants.quantize(arr, qtype)
        held = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(arr.shape)
    else:
        data = arr.astype(np.float16 if qtype == Q.F16 else np.float32)
        held = data.astype(np.float32)
    if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
        data = llama_cpp_permute(data, c.num_attention_heads)
    elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
        data = llama_cpp_permute(data, c.num_attention_heads, c.num_key_value_heads)
    raw = qtype in BLOCK_BYTES or qtype in GGUF_PY_QUANTS
    w.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=qtype if raw else None)
    return held


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_into(hf, weights: dict[str, np.ndarray]) -> None:
    """Give transformers model ``hf`` exactly the weights a GGUF holds (as returned by write_hf_gguf)."""
    import torch

    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in weights:
                p.copy_(torch.from_numpy(weights[name]))
