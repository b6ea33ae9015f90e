"""Tensor formats: the one notion of how a tensor's values are laid out in bytes.

A format is either a float type (one element per block) or a block quantization of the
last axis, ggml's own layouts kept bit for bit, so a GGUF file's quantized tensors are
stored as they come and safetensors weights quantized at conversion use the same blocks:

=========  =====  =====  ==========================================================
format     block  bytes  one block (little-endian)
=========  =====  =====  ==========================================================
float32        1      4
float16        1      2
bfloat16       1      2
q4_0          32     18  f16 d, 16 B nibbles: x = (q - 8) * d
q4_1          32     20  f16 d, f16 m, 16 B nibbles: x = q * d + m   (our "int4")
q8_0          32     34  f16 d, 32 int8: x = q * d                  (our "int8")
q4_k         256    144  f16 d, f16 dmin, 12 B 6-bit scales/mins, 128 B nibbles
q5_k         256    176  f16 d, f16 dmin, 12 B scales/mins, 32 B high bits, 128 B nibbles
q6_k         256    210  128 B low nibbles, 64 B high 2-bits, 16 int8 scales, f16 d
uint8          1      1  raw bytes, stored as they are (packed expert units: storage.experts)
=========  =====  =====  ==========================================================

In nibble blocks of 32 the low nibbles of the 16 bytes are elements 0..15, the high ones
16..31 (ggml's order). A quantized tensor of logical shape ``(..., k)`` is stored as bytes of
shape ``(..., k // block * bytes)`` (:meth:`Format.byte_shape`): rows stay rows, so row
chunks, row reads (embedding lookups) and row permutations work on bytes unchanged.

:class:`QTensor` is a quantized matrix in memory (its bytes as a uint8 tensor, on any
device) with its format and logical shape; ``kernels_cpu.matvec.linear`` and
``kernels_cpu.quant.embedding`` dispatch on it, so model code is the same for every format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    name: str
    block: int  # elements per block along the last axis
    block_bytes: int  # bytes per block
    dtype: torch.dtype | None = None  # float formats: the torch dtype; quantized: None

    @property
    def quantized(self) -> bool:
        return self.dtype is None

    @property
    def raw(self) -> bool:
        """Opaque bytes (``uint8``): neither values to cast nor blocks to dequantize; held as stored."""
        return self.dtype == torch.uint8

    @property
    def storage_dtype(self) -> str:
        """zarr data type of the stored array (bfloat16 as its bits, quantized blocks as bytes)."""
        if self.quantized:
            return "uint8"
        return {"bfloat16": "uint16"}.get(self.name, self.name)

    def byte_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored array: the last axis in bytes for quantized formats, else ``shape``."""
        shape = tuple(int(s) for s in shape)
        if not self.quantized:
            return shape
        self.check_shape(shape)
        return (*shape[:-1], shape[-1] // self.block * self.block_bytes)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if self.quantized and (not shape or shape[-1] % self.block):
            raise ValueError(f"a {self.name} tensor needs a last axis that is a multiple of {self.block}; got {shape}")

    def nbytes(self, shape: tuple[int, ...]) -> int:
        n = 1
        for s in self.byte_shape(shape):
            n *= int(s)
        return n * (1 if self.quantized else self.block_bytes)

    def row_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of one row (one index of axis 0); the whole tensor for a 0-d one."""
        if not shape:
            return self.nbytes(shape)
        return self.nbytes(shape) // int(shape[0]) if shape[0] else 0

    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("float32", 1, 4, torch.float32),
    Format("float16", 1, 2, torch.float16),
    Format("bfloat16", 1, 2, torch.bfloat16),
    Format("q4_0", 32, 18),
    Format("q4_1", 32, 20),
    Format("q8_0", 32, 34),
    Format("q4_k", 256, 144),
    Format("q5_k", 256, 176),
    Format("q6_k", 256, 210),
    Format("uint8", 1, 1, torch.uint8),
)}
FLOAT_FORMATS = {n: f for n, f in FORMATS.items() if f.dtype is not None and f.dtype.is_floating_point}
# --weights: what each choice stores matrices as (None: keep the source's format)
WEIGHT_CHOICES = {"auto": None, "f32": "float32", "f16": "float16", "bf16": "bfloat16", "int8": "q8_0", "int4": "q4_1"}
# ggml type name -> store format kept as is (others are dequantized to float32 at conversion)
GGML_NATIVE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "Q4_0": "q4_0", "Q4_1": "q4_1",
               "Q8_0": "q8_0", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tensor format {name!r}; known: {', '.join(FORMATS)}") from None


def format_of(dtype: torch.dtype) -> Format:
    for f in FLOAT_FORMATS.values():
        if f.dtype == dtype:
            return f
    raise ValueError(f"no tensor format for {dtype}")


class QTensor:
    """A block-quantized matrix: ``data`` uint8 [rows, row_bytes] (any device), ``fmt``, logical ``shape``.

    Quacks enough like a tensor for the code that moves weights around (``shape``, ``device``,
    ``nbytes``, ``to(device)``); the math goes through the kernels that dispatch on it.
    """

    __slots__ = ("data", "fmt", "shape")

    def __init__(self, data: torch.Tensor, fmt: Format, shape: tuple[int, ...]):
        shape = tuple(int(s) for s in shape)
        if data.dtype != torch.uint8 or tuple(data.shape) != fmt.byte_shape(shape):
            raise ValueError(f"QTensor: {fmt.name} bytes of shape {fmt.byte_shape(shape)} expected for logical "
                             f"shape {shape}, got {data.dtype} {tuple(data.shape)}")
        self.data, self.fmt, self.shape = data, fmt, torch.Size(shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dim(self) -> int:
        return len(self.shape)

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "QTensor":
        """The same bytes on ``device`` (``dtype`` is ignored: a quantized weight keeps its format)."""
        if device is None or torch.device(device) == self.data.device:
            return self
        return QTensor(self.data.to(device, non_blocking=non_blocking), self.fmt, tuple(self.shape))

    def __repr__(self) -> str:
        return f"QTensor({self.fmt.name}, shape={tuple(self.shape)}, device={self.device})"
