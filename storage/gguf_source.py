"""Reading a GGUF file: its header (metadata, tensor table), the HF-style config, the tensors.

Tensors whose ggml type is one of the store's formats (storage.formats.GGML_NATIVE: float
types, Q4_0/Q4_1/Q8_0, Q4_K/Q5_K/Q6_K) are kept as they are: a raw byte range copied by the
converter, or, for the Q/K projections llama.cpp's converter permuted, their rows put back
in order as bytes (a row of blocks moves whole, so quantized rows permute exactly). Any other
type is dequantized to float32 with gguf-py (:data:`DEQUANTIZED`: the converter warns).

MoE files (qwen2moe, qwen3moe, llama with experts = mixtral): the stacked ``ffn_*_exps`` tensors
become one TensorSource per expert and projection under the Hugging Face per-expert names (byte
ranges of the file, each expert's slice of the stack; early Mixtral files' per-expert
``blk.N.ffn_{gate,up,down}.E.weight`` too), which the converter packs per layer like a
Hugging Face checkpoint's (storage.experts); router ``ffn_gate_inp`` and the shared expert
``*_shexp`` get Hugging Face names too. Other MoE architectures pass through under their
transformers model_type (``deepseek_v2``, ``gpt_oss``, ...): the model layer refuses them.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import ModelSourceError
from storage.experts import expert_name
from storage.formats import GGML_NATIVE, get_format
from storage.tensor_source import TensorSource, numel as _numel, stat_entry as _stat_entry

_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")
# Architectures whose Q/K rows llama.cpp's converter permutes (LlamaModel.permute) and we un-permute.
PERMUTED_ARCHS = {"llama", "mistral"}
_ARCH_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                    "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # + llama with experts: "mixtral"
# MoE architectures offload_rt does not run: passed through under transformers' model_type, so the model
# layer refuses them by name (other unknown architectures pass through with '-' as '_')
_OTHER_MODEL_TYPE = {"deepseek2": "deepseek_v2", "gpt-oss": "gpt_oss", "glm4moe": "glm4_moe",
                     "qwen3next": "qwen3_next", "llama4": "llama4", "dots1": "dots1", "ernie4_5-moe": "ernie4_5_moe",
                     "qwen3vlmoe": "qwen3_vl_moe", "granitemoe": "granitemoe", "olmoe": "olmoe", "phimoe": "phimoe"}
# stacked experts: blk.N.ffn_{gate,up,down}_exps.weight, ggml dims {n_embd, n_ff, E} (gate/up) and
# {n_ff, n_embd, E} (down): expert e is bytes [e * n / E, (e + 1) * n / E) of the tensor
_EXPS_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_EXP_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")  # early Mixtral files: one per expert


ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's llama3 RoPE: theta_i = pos * base^(-2i/d) / factor_i


def gguf_to_hf_name(name: str, moe_block: str = "mlp") -> str:
    """Hugging Face name of a GGUF tensor (unknown names are kept as they are); ``moe_block`` names the MoE
    router's module ("mlp", or "block_sparse_moe" for Mixtral)."""
    m = _BLK_RE.match(name)
    if m and m.group(2) == "ffn_gate_inp":
        return f"model.layers.{m.group(1)}.{moe_block}.gate.{m.group(3)}"
    if m and m.group(2) in _GGUF_BLOCK:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in _GGUF_TOP:
        return f"{_GGUF_TOP[m.group(1)]}.{m.group(2)}"
    return name


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute`` along axis 0 (``n_head`` = heads of that projection)."""
    dim = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (what convert_hf_to_gguf.py applies to Q and K); for tests."""
    return np.ascontiguousarray(w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                                .swapaxes(1, 2).reshape(w.shape))


class _GGUFTensorInfo:
    __slots__ = ("name", "dims", "qtype", "data_offset", "n_bytes")

    def __init__(self, name, dims, qtype, data_offset, n_bytes):
        self.name, self.dims, self.qtype, self.data_offset, self.n_bytes = name, dims, qtype, data_offset, n_bytes

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))  # ggml lists the innermost dimension first

    def byte_shape(self) -> tuple[int, ...]:
        """numpy shape of the raw data, as gguf.quants.dequantize expects it (rows..., bytes per row)."""
        from gguf import GGML_QUANT_SIZES

        block, tsize = GGML_QUANT_SIZES[self.qtype]
        dims = self.hf_shape
        return (*dims[:-1], dims[-1] // block * tsize) if dims else ()


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


def parse_gguf_header(path: Path) -> tuple[dict, list[_GGUFTensorInfo]]:
    """(metadata dict, tensor infos with absolute data offsets) of a GGUF file, reading only its header.

    Much faster than ``gguf.GGUFReader`` (which builds a numpy view per vocabulary string, ~2 s for
    SmolLM2) and strict about truncation: anything past the end of the file raises ModelSourceError.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    def bad(why: str):
        return ModelSourceError(f"{path} is truncated or corrupt ({why}); re-download or re-export the GGUF file")

    try:
        size = path.stat().st_size
        if size < 24:
            raise bad("file too short for a GGUF header")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelSourceError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    buf = memoryview(mm)
    try:
        pos = 0

        def take(n: int) -> memoryview:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise bad(f"header runs past the end of the file at byte {pos}")
            v = buf[pos:pos + n]
            pos += n
            return v

        def u32() -> int:
            return int.from_bytes(take(4), "little")

        def u64() -> int:
            return int.from_bytes(take(8), "little")

        def string() -> str:
            return bytes(take(u64())).decode("utf-8", errors="replace")

        def value(vtype: int):
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, count = u32(), u64()
                if itype == 8:
                    return [string() for _ in range(count)]
                if itype == 9:
                    return [value(9) for _ in range(count)]
                if itype not in _GGUF_NP:
                    raise bad(f"unknown array type {itype}")
                dt = np.dtype(_GGUF_NP[itype])
                return np.frombuffer(take(count * dt.itemsize), dtype=dt).tolist()
            if vtype not in _GGUF_SCALARS:
                raise bad(f"unknown value type {vtype}")
            fmt = _GGUF_SCALARS[vtype]
            return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

        if bytes(take(4)) != b"GGUF":
            raise ModelSourceError(f"{path} is not a GGUF file (bad magic); pass a .gguf file or a checkpoint directory")
        version = u32()
        if version < 2:
            raise ModelSourceError(f"{path} is GGUF version {version}, which is too old; re-export it with a current llama.cpp")
        n_tensors, n_kv = u64(), u64()
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(u32())
        infos = []
        for _ in range(n_tensors):
            name = string()
            nd = u32()
            if nd > 8:
                raise bad(f"tensor {name} has {nd} dimensions")
            dims = tuple(u64() for _ in range(nd))
            qt, off = u32(), u64()
            try:
                qtype = GGMLQuantizationType(qt)
                block, tsize = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelSourceError(f"{path}: tensor {name} has an unknown GGML type {qt}; "
                                       "update the gguf package or re-export the file") from None
            if dims and dims[0] % block:
                raise bad(f"tensor {name} row length {dims[0]} is not a multiple of its block size {block}")
            infos.append(_GGUFTensorInfo(name, dims, qtype, off, _numel(dims) // block * tsize))
        align = int(meta.get("general.alignment", 32) or 32)
        data_start = (pos + align - 1) // align * align
        for t in infos:
            t.data_offset += data_start
            if t.data_offset + t.n_bytes > size:
                raise bad(f"tensor {t.name} lies past the end of the file")
        return meta, infos
    finally:
        buf.release()
        mm.close()


class GGUFSource:
    kind = "gguf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._meta: dict | None = None
        self._infos: list = []

    @property
    def display_name(self) -> str:
        name = self.path.resolve().name
        return name[:-5] if name.lower().endswith(".gguf") else name

    def identity(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "files": [_stat_entry(self.path)]}

    # -- parsing
    def _parse(self) -> None:
        if self._meta is None:
            self._meta, self._infos = parse_gguf_header(self.path)

    def metadata(self) -> dict:
        self._parse()
        return self._meta

    def tensor_infos(self) -> list:
        self._parse()
        return self._infos

    def _arch(self) -> str:
        arch = self.metadata().get("general.architecture")
        if not isinstance(arch, str):
            raise ModelSourceError(f"{self.path} has no general.architecture; re-export the GGUF file with llama.cpp")
        return arch

    def config(self) -> dict:
        m = self.metadata()
        arch = self._arch()
        names = {t.name for t in self.tensor_infos()}

        def get(key, default=None):
            v = m.get(f"{arch}.{key}", default)
            if isinstance(v, list):  # per-layer values: all equal for the families we run
                v = v[0] if v else default
            return v

        cfg: dict[str, Any] = {"model_type": self.model_type(), "architectures": [arch]}
        required = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                    "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count"}
        for hf, key in required.items():
            v = get(key)
            if v is None:
                if arch not in _ARCH_MODEL_TYPE:  # an architecture we do not run: the model layer refuses it
                    return cfg
                raise ModelSourceError(f"{self.path} lacks {arch}.{key} in its metadata; re-export the GGUF file with llama.cpp")
            cfg[hf] = int(v)
        heads = cfg["num_attention_heads"]
        cfg["num_key_value_heads"] = int(get("attention.head_count_kv", heads) or heads)
        cfg["rms_norm_eps"] = float(get("attention.layer_norm_rms_epsilon", 1e-6))
        cfg["rope_theta"] = float(get("rope.freq_base", 10000.0))
        cfg["max_position_embeddings"] = int(get("context_length", 4096))
        vocab = get("vocab_size")
        if vocab is None:
            toks = m.get("tokenizer.ggml.tokens")
            if toks:
                vocab = len(toks)
            else:
                for t in self.tensor_infos():
                    if t.name == "token_embd.weight":
                        vocab = t.hf_shape[0]
        if vocab is None:
            raise ModelSourceError(f"{self.path} does not say its vocabulary size; re-export the GGUF file with llama.cpp")
        cfg["vocab_size"] = int(vocab)
        head_dim = get("attention.key_length") or get("rope.dimension_count")
        if head_dim:
            cfg["head_dim"] = int(head_dim)
        cfg["tie_word_embeddings"] = "output.weight" not in names
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names and arch not in ("qwen2", "qwen2moe")
        if arch == "qwen2moe":
            cfg["qkv_bias"] = "blk.0.attn_q.bias" in names
        self._moe_config(cfg, get, names)
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in names
        sw = get("attention.sliding_window")
        if sw:
            cfg["sliding_window"] = int(sw)
            if arch == "qwen2":
                cfg["use_sliding_window"] = True
        stype = get("rope.scaling.type")
        if stype and stype != "none":
            rs = {"rope_type": stype, "type": stype}
            if get("rope.scaling.factor") is not None:
                rs["factor"] = float(get("rope.scaling.factor"))
            if get("rope.scaling.original_context_length") is not None:
                rs["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
            cfg["rope_scaling"] = rs
        if ROPE_FREQS in names:  # llama3-style scaling as llama.cpp stores it: per-frequency divisors
            cfg["rope_scaling"] = {"rope_type": "freq_factors", "freq_factors": self._rope_freq_factors(cfg)}
        for hf, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
            if isinstance(m.get(key), int):
                cfg[hf] = m[key]
        ftype = m.get("general.file_type")
        cfg["torch_dtype"] = {0: "float32", 1: "float16", 32: "bfloat16"}.get(ftype, "float32")
        return cfg

    def model_type(self) -> str:
        """transformers' model_type of this file: its architecture's, "mixtral" for llama with experts."""
        arch = self._arch()
        if arch == "llama" and int(self.metadata().get("llama.expert_count") or 0) > 0:
            return "mixtral"
        return _ARCH_MODEL_TYPE.get(arch) or _OTHER_MODEL_TYPE.get(arch) or arch.replace("-", "_")

    def _moe_config(self, cfg: dict, get, names: set) -> None:
        """The MoE keys of a Hugging Face config (qwen2_moe, qwen3_moe, mixtral) from the metadata."""
        n = int(get("expert_count") or 0)
        if n <= 0:
            return
        cfg["num_experts"] = cfg["num_local_experts"] = n
        cfg["num_experts_per_tok"] = int(get("expert_used_count") or 0)
        if cfg["model_type"] == "mixtral":  # its feed_forward_length is the experts' width
            return
        width = get("expert_feed_forward_length")
        if width is None:  # the stacked tensors say it: ggml dims {n_embd, n_ff, E}
            width = next((t.dims[1] for t in self.tensor_infos() if t.name == "blk.0.ffn_gate_exps.weight"), None)
        if width is not None:
            cfg["moe_intermediate_size"] = int(width)
        shared = get("expert_shared_feed_forward_length")
        if shared is None:
            shared = next((t.dims[1] for t in self.tensor_infos() if t.name == "blk.0.ffn_gate_shexp.weight"), None)
        if shared is not None:
            cfg["shared_expert_intermediate_size"] = int(shared)
        # llama.cpp renormalises the top-k weights for qwen3moe and not for qwen2moe (build_moe_ffn's norm_w)
        cfg["norm_topk_prob"] = cfg["model_type"] == "qwen3_moe"
        cfg["decoder_sparse_step"] = 1  # llama.cpp: every layer is MoE
        cfg["mlp_only_layers"] = []

    def _rope_freq_factors(self, cfg: dict) -> list[float]:
        info = next(t for t in self.tensor_infos() if t.name == ROPE_FREQS)
        from gguf import GGMLQuantizationType as Q

        raw = {Q.F32: "float32", Q.F16: "float16"}.get(info.qtype)  # others (BF16, quants) via dequantize
        arr = _gguf_producer(info, raw, info.hf_shape, None, self.path)().astype(np.float64).ravel()
        half = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) // 2
        if arr.size != half or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ModelSourceError(f"{self.path}: {ROPE_FREQS} has {arr.size} entries (expected {half} positive "
                                   "values); re-export the GGUF file with llama.cpp")
        return [float(x) for x in arr]

    def tensors(self) -> list[TensorSource]:
        """Every tensor in its store format: ggml types of :data:`GGML_NATIVE` as they are, others in float32."""
        import gguf
        from gguf import GGMLQuantizationType as Q

        arch = self._arch()
        cfg = self.config()
        heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
        permute = arch in PERMUTED_ARCHS
        block = "block_sparse_moe" if cfg["model_type"] == "mixtral" else "mlp"
        out = []
        for t in self.tensor_infos():
            if t.name == ROPE_FREQS:  # folded into the config's rope_scaling
                continue
            if _EXPS_RE.match(t.name):
                out.extend(self._expert_tensors(t, block))
                continue
            name = gguf_to_hf_name(t.name, block)
            legacy = _EXP_RE.match(t.name)
            if legacy:
                name = expert_name(int(legacy.group(1)), int(legacy.group(3)), f"{legacy.group(2)}_proj", block)
            shape = t.hf_shape
            if name.endswith("mlp.shared_expert_gate.weight") and len(shape) == 1:
                shape = (1, *shape)  # HF's [1, H]
            qtype = t.qtype
            n_head = None
            if permute and re.match(r"^blk\.\d+\.attn_q\.(weight|bias)$", t.name):
                n_head = heads
            elif permute and re.match(r"^blk\.\d+\.attn_k\.(weight|bias)$", t.name):
                n_head = kv_heads
            native = GGML_NATIVE.get(qtype.name)
            if native is not None and len(shape) < 2 and get_format(native).quantized:
                native = None  # a quantized vector (never written by llama.cpp): dequantized
            if native is not None and n_head is None:
                out.append(TensorSource(name, native, shape, file=self.path, offset=int(t.data_offset)))
                continue
            traits = getattr(gguf.quants, "_type_traits", None)
            if native is None and qtype != Q.F64 and traits is not None and qtype not in traits:
                raise ModelSourceError(f"{self.path}: tensor {t.name} has type {qtype.name}, which cannot be "
                                       "dequantized; use a GGUF with F32/F16/BF16 or Q4_0/Q4_1/Q8_0/K-quant tensors")
            out.append(TensorSource(name, native or "float32", shape,
                                    produce=_gguf_producer(t, native, shape, n_head, self.path)))
        if not out:
            raise ModelSourceError(f"{self.path} has no tensors; re-export the GGUF file with llama.cpp")
        return out

    def _expert_tensors(self, t, block: str) -> list[TensorSource]:
        """The per-expert tensors (HF names) of stacked experts ``t``: byte ranges of the file, no copy
        (a type the store cannot keep: each expert's slice dequantized on demand)."""
        layer, proj = _EXPS_RE.match(t.name).groups()
        if len(t.dims) != 3 or t.n_bytes % t.dims[2]:
            raise ModelSourceError(f"{self.path}: tensor {t.name} has shape {list(t.dims)}, expected 3 dimensions "
                                   "(experts last); re-export the GGUF file with llama.cpp")
        n = t.dims[2]
        per = t.n_bytes // n
        shape = tuple(reversed(t.dims[:2]))
        native = GGML_NATIVE.get(t.qtype.name)
        out = []
        for e in range(n):
            name = expert_name(int(layer), e, f"{proj}_proj", block)
            offset = int(t.data_offset) + e * per
            if native is not None:
                out.append(TensorSource(name, native, shape, file=self.path, offset=offset))
            else:
                piece = _GGUFTensorInfo(f"{t.name}[{e}]", t.dims[:2], t.qtype, offset, per)
                out.append(TensorSource(name, "float32", shape, produce=_gguf_producer(piece, None, shape, None,
                                                                                        self.path)))
        return out

    def dequantized_types(self) -> dict[str, int]:
        """ggml type name -> tensors of that type the store cannot keep as they are (dequantized to float32)."""
        counts: dict[str, int] = {}
        for t in self.tensor_infos():
            if t.name != ROPE_FREQS and t.qtype.name not in GGML_NATIVE:
                counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return counts

    def tokenizer(self, dest: Path) -> dict:
        from storage.gguf_tokenizer import build_tokenizer

        tok_json, meta = build_tokenizer(self.metadata(), self.path)
        dest.write_text(tok_json, encoding="utf-8")
        return meta


def _gguf_producer(t, native, shape, n_head, path):
    """A callable returning tensor ``t`` as a C-contiguous array: in its native format (float values,
    or a quantized format's bytes [rows, row_bytes]) with Q/K rows un-permuted, else dequantized to float32."""

    def produce() -> np.ndarray:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        data = np.memmap(path, dtype=np.uint8, mode="r", offset=t.data_offset, shape=(t.n_bytes,))
        try:
            if t.qtype == Q.F64:
                arr = data.view("<f8").astype(np.float32).reshape(shape)
            elif native is not None and get_format(native).quantized:
                arr = data.reshape(t.byte_shape())
            elif native is not None:
                arr = data.view({"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[native]).reshape(shape)
            else:
                arr = dequantize(data.reshape(t.byte_shape()), t.qtype).astype(np.float32, copy=False).reshape(shape)
        except NotImplementedError:
            raise ModelSourceError(f"{path}: tensor {t.name} has type {t.qtype.name}, which cannot be dequantized; "
                                   "use a GGUF with F32/F16/BF16 or Q4_0/Q4_1/Q8_0/K-quant tensors") from None
        if n_head is not None:
            arr = unpermute_qk(arr, n_head)  # along axis 0: whole rows (of values or of blocks) move
        arr = np.ascontiguousarray(arr)
        if isinstance(arr, np.memmap):
            arr = np.array(arr)
        return arr

    return produce
