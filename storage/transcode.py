"""``--weights``: which format each tensor is stored in, and turning a tensor into that format.

``auto`` keeps every tensor as the source has it (a GGUF's quantized blocks stay quantized,
safetensors stay bf16/f16/f32). A float choice stores every tensor in that float type
(quantized GGUF tensors are dequantized). ``int8``/``int4`` quantize the matrices (2-D
tensors whose rows split into whole blocks: projections, each expert's projections, embedding,
head) to q8_0/q4_1, the same ggml blocks a GGUF file carries, and keep vectors (norms, biases) and
MoE routers and shared-expert gates (as llama.cpp's converter and quantizer keep ``ffn_gate_inp``
and ``ffn_gate_inp_shexp``: routing decides which experts run) as they are.
"""

from __future__ import annotations

import re

import numpy as np

from storage.errors import StorageUsageError
from storage.formats import WEIGHT_CHOICES, get_format
from storage.tensor_source import TensorSource

_NP_FLOAT = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
_ROUTER_RE = re.compile(r"^model\.layers\.\d+\.(mlp\.gate|block_sparse_moe\.gate|mlp\.shared_expert_gate)\.weight$")


def check_choice(weights: str) -> str:
    if weights not in WEIGHT_CHOICES:
        raise StorageUsageError(f"--weights: unknown choice {weights!r}; use one of {', '.join(WEIGHT_CHOICES)}")
    return weights


def target_format(t: TensorSource, weights: str) -> str:
    """The store format of source tensor ``t`` under ``--weights weights``."""
    want = WEIGHT_CHOICES[check_choice(weights)]
    if want is None or want == t.fmt:
        return t.fmt
    fmt = get_format(want)
    if not fmt.quantized:
        return want
    if len(t.shape) == 2 and t.shape[-1] % fmt.block == 0 and not _ROUTER_RE.match(t.name):
        return want
    return "float32" if get_format(t.fmt).quantized else t.fmt  # vectors keep their float type


def transcoded(t: TensorSource, fmt: str) -> TensorSource:
    """``t`` in format ``fmt`` (itself when it already is), its values made on demand."""
    if fmt == t.fmt:
        return t
    return TensorSource(t.name, fmt, t.shape, produce=lambda: encode(float_values(t), fmt))


def float_values(t: TensorSource) -> np.ndarray:
    """The values of source tensor ``t`` as a float32 array of its shape."""
    src = get_format(t.fmt)
    if t.produce is not None:
        arr = t.produce()
    else:
        n = t.nbytes
        arr = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.offset, shape=(n,))
        arr = arr.reshape(src.byte_shape(t.shape)) if src.quantized else arr.view(_NP_FLOAT[t.fmt]).reshape(t.shape)
    if src.quantized:
        return dequantize(arr, t.fmt).reshape(t.shape)
    if t.fmt == "bfloat16":
        return (np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(arr, dtype=np.float32)


def encode(values: np.ndarray, fmt: str) -> np.ndarray:
    """float32 ``values`` in format ``fmt``: float values, or a quantized format's bytes [rows, row_bytes]."""
    f = get_format(fmt)
    if fmt == "float32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if fmt == "float16":
        return np.ascontiguousarray(values.astype(np.float16))
    if fmt == "bfloat16":
        import torch

        v = np.ascontiguousarray(values, dtype=np.float32)
        v = v if v.flags.writeable else v.copy()  # (torch refuses read-only arrays: a memmap'ed source)
        return torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
    return quantize(flat, fmt).reshape(f.byte_shape(values.shape))


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """[n, k] float32 -> [n, row_bytes] uint8 blocks (the Numba quantizer; bit-identical to gguf-py's)."""
    from kernels_cpu import quant

    return quant.quantize(fmt, x)


def dequantize(data: np.ndarray, fmt: str) -> np.ndarray:
    """Quantized bytes [..., row_bytes] -> float32 [..., k] (bit-identical to gguf-py's dequantize)."""
    from kernels_cpu import quant

    rows = data.reshape(-1, data.shape[-1])
    f = get_format(fmt)
    out = np.empty((rows.shape[0], rows.shape[1] // f.block_bytes * f.block), dtype=np.float32)
    quant.dequantize_rows(fmt, np.ascontiguousarray(rows), out)
    return out.reshape(*data.shape[:-1], out.shape[-1])
