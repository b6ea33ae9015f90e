"""Packed experts: each routed expert of a MoE layer as one contiguous, 4 KiB-aligned unit of bytes.

A checkpoint names its experts one tensor per expert and projection (Hugging Face
``model.layers.{L}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight``, Mixtral's
``model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w2,w3}.weight``; a GGUF's stacked
``ffn_*_exps`` are sliced into the same names by storage.gguf_source). :func:`pack_experts`
turns a layer's experts into one store tensor::

    model.layers.{L}.mlp.experts  (mixtral: model.layers.{L}.block_sparse_moe.experts)
    format "uint8", shape [E, U], chunk_rows 1: one chunk file per expert, so one read brings one expert

Unit layout (:class:`ExpertLayout`): gate_proj [I, H], up_proj [I, H], down_proj [H, I] back to
back, each part at a multiple of :data:`PART_ALIGN` bytes, in its own format (a float type or a
ggml block format: a Q4_K_M file mixes q4_k and q6_k), the unit zero-padded to a multiple of
:data:`UNIT_ALIGN` (what O_DIRECT reads need). Mixtral's w1 is gate_proj, w3 up_proj, w2 down_proj.
The manifest entry carries the layout under ``"experts"`` (see :meth:`ExpertLayout.to_manifest`).

Units are produced one at a time at conversion (``TensorSource.produce_chunk``): converting a
layer holds one expert's bytes, whatever the number of experts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from storage.errors import ModelSourceError
from storage.formats import Format, QTensor, get_format
from storage.tensor_source import TensorSource

PARTS = ("gate_proj", "up_proj", "down_proj")  # order of the parts in a unit
PART_ALIGN = 64  # bytes: every part starts at a multiple (float views, SIMD loads)
UNIT_ALIGN = 4096  # bytes: a unit is a multiple (O_DIRECT block size)
MIXTRAL_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\."
                        r"(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def packed_name(layer: int, block: str = "mlp") -> str:
    """The store name of layer ``layer``'s packed experts (``block``: "mlp", or "block_sparse_moe" for Mixtral)."""
    return f"model.layers.{layer}.{block}.experts"


def expert_name(layer: int, expert: int, part: str, block: str = "mlp") -> str:
    """The Hugging Face name of one expert's projection (``part`` one of :data:`PARTS`)."""
    if block == "block_sparse_moe":
        part = {v: k for k, v in MIXTRAL_PARTS.items()}[part]
    return f"model.layers.{layer}.{block}.experts.{expert}.{part}.weight"


def parse_expert_name(name: str) -> tuple[str, int, str] | None:
    """(packed tensor name, expert id, part) of a per-expert tensor name; None for any other tensor."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    layer, block, expert, part = m.groups()
    if (block == "block_sparse_moe") != (part in MIXTRAL_PARTS):
        return None
    return packed_name(int(layer), block), int(expert), MIXTRAL_PARTS.get(part, part)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ExpertPart:
    """One projection inside an expert unit: its format, logical shape and byte range."""

    name: str  # "gate_proj" | "up_proj" | "down_proj"
    fmt: Format
    shape: tuple  # logical shape [out, in]
    offset: int  # bytes from the unit's start (a multiple of PART_ALIGN)
    nbytes: int  # fmt.nbytes(shape)

    def view(self, unit: torch.Tensor):
        """This part over ``unit`` (uint8 [U], any device), zero-copy: a float tensor of its dtype and shape,
        or a QTensor over its blocks."""
        b = unit[self.offset:self.offset + self.nbytes]
        if self.fmt.quantized:
            return QTensor(b.view(self.fmt.byte_shape(self.shape)), self.fmt, self.shape)
        return b.view(self.fmt.dtype).view(self.shape)


@dataclass(frozen=True)
class ExpertLayout:
    """How the bytes of one expert unit split into its parts (the same for every expert of a layer)."""

    count: int  # experts in the layer (E: rows of the packed tensor)
    unit_bytes: int  # bytes of one unit (U: a multiple of UNIT_ALIGN)
    parts: dict  # part name -> ExpertPart, in unit order

    @classmethod
    def build(cls, count: int, parts: list[tuple[str, str, tuple]]) -> "ExpertLayout":
        """The layout of units holding ``parts`` = [(name, format name, shape)] in that order."""
        placed, pos = {}, 0
        for name, fmt, shape in parts:
            f = get_format(fmt)
            shape = tuple(int(s) for s in shape)
            placed[name] = ExpertPart(name, f, shape, pos, f.nbytes(shape))
            pos = _round_up(pos + placed[name].nbytes, PART_ALIGN)
        return cls(int(count), max(UNIT_ALIGN, _round_up(pos, UNIT_ALIGN)), placed)

    def views(self, unit: torch.Tensor) -> dict:
        """{part name: tensor or QTensor} over ``unit`` (uint8 [unit_bytes], any device), zero-copy."""
        if unit.dtype != torch.uint8 or unit.dim() != 1 or unit.numel() != self.unit_bytes:
            raise ValueError(f"an expert unit is uint8 [{self.unit_bytes}]; got {unit.dtype} {tuple(unit.shape)}")
        return {n: p.view(unit) for n, p in self.parts.items()}

    def to_manifest(self) -> dict:
        """The manifest's ``"experts"`` entry."""
        return {"count": self.count, "unit_bytes": self.unit_bytes,
                "parts": {n: {"format": p.fmt.name, "shape": list(p.shape), "offset": p.offset, "nbytes": p.nbytes}
                          for n, p in self.parts.items()}}

    @classmethod
    def from_manifest(cls, entry: dict) -> "ExpertLayout":
        """The layout an ``"experts"`` entry describes (ValueError/KeyError/TypeError when it is malformed)."""
        parts = {}
        for n, p in entry["parts"].items():
            f = get_format(p["format"])
            shape = tuple(int(s) for s in p["shape"])
            parts[n] = ExpertPart(n, f, shape, int(p["offset"]), int(p["nbytes"]))
        layout = cls(int(entry["count"]), int(entry["unit_bytes"]), parts)
        layout.check()
        return layout

    def check(self) -> None:
        """ValueError unless every part is whole, aligned and inside the unit."""
        if self.count < 1 or self.unit_bytes < 1 or self.unit_bytes % UNIT_ALIGN:
            raise ValueError(f"bad count {self.count} or unit_bytes {self.unit_bytes}")
        for p in self.parts.values():
            if p.nbytes != p.fmt.nbytes(p.shape) or p.offset % PART_ALIGN or p.offset + p.nbytes > self.unit_bytes:
                raise ValueError(f"part {p.name} does not fit its unit")


def expert_count(config: dict) -> int | None:
    """Routed experts per MoE layer a Hugging Face config declares (None for a dense model)."""
    for key in ("num_experts", "num_local_experts"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def pack_experts(tensors: list[TensorSource], count: int | None = None) -> list[TensorSource]:
    """``tensors`` with each layer's per-expert tensors replaced by one packed tensor (at the place of the
    layer's first expert tensor); others unchanged. ``count``: the experts each layer must have (from the
    config), else as many as the highest id found. Missing experts or parts, or parts whose shape or format
    differs between experts of a layer: ModelSourceError naming the packed tensor."""
    groups: dict[str, dict[int, dict[str, TensorSource]]] = {}
    out: list = []
    for t in tensors:
        parsed = parse_expert_name(t.name)
        if parsed is None:
            out.append(t)
            continue
        packed, e, part = parsed
        if packed not in groups:
            groups[packed] = {}
            out.append(packed)  # placeholder: replaced below
        groups[packed].setdefault(e, {})[part] = t
    return [_pack_layer(x, groups[x], count) if isinstance(x, str) else x for x in out]


def _pack_layer(name: str, experts: dict[int, dict[str, TensorSource]], count: int | None) -> TensorSource:
    n = int(count) if count else max(experts) + 1

    def bad(why: str) -> ModelSourceError:
        return ModelSourceError(f"MoE tensor {name}: {why}; the checkpoint is incomplete or inconsistent, "
                                "re-download or re-export it")

    extra = sorted(e for e in experts if e >= n)
    if extra:
        raise bad(f"has expert {extra[0]} but the model has {n} experts")
    for e in range(n):
        have = experts.get(e, {})
        missing = [p for p in PARTS if p not in have]
        if missing:
            raise bad(f"expert {e} lacks {', '.join(missing)}" if have else f"expert {e} is missing")
    first = experts[0]
    for e in range(1, n):
        for p in PARTS:
            a, b = first[p], experts[e][p]
            if (a.fmt, tuple(a.shape)) != (b.fmt, tuple(b.shape)):
                raise bad(f"expert {e}'s {p} is {b.fmt} {list(b.shape)} but expert 0's is {a.fmt} {list(a.shape)}")
    layout = ExpertLayout.build(n, [(p, first[p].fmt, first[p].shape) for p in PARTS])
    sources = [[experts[e][p] for p in PARTS] for e in range(n)]

    def produce_chunk(e: int) -> np.ndarray:
        unit = np.zeros(layout.unit_bytes, dtype=np.uint8)
        for part, src in zip(layout.parts.values(), sources[e]):
            unit[part.offset:part.offset + part.nbytes] = source_bytes(src)
        return unit

    return TensorSource(name, "uint8", (n, layout.unit_bytes), produce_chunk=produce_chunk, chunk_rows=1,
                        experts=layout.to_manifest())


def source_bytes(t: TensorSource) -> np.ndarray:
    """The stored bytes of source tensor ``t`` (flat uint8): produced, or read from its file range."""
    if t.produce is not None:
        a = t.produce()
        if a.nbytes != t.nbytes or not a.flags.c_contiguous:
            raise ModelSourceError(f"tensor {t.name} did not convert to its declared shape {t.shape}; "
                                   "report this with the model file")
        return a.reshape(-1).view(np.uint8)
    n = t.nbytes
    try:
        fd = os.open(t.file, os.O_RDONLY)
    except OSError as e:
        raise ModelSourceError(f"cannot read {t.file}: {e.strerror}; check the checkpoint files") from None
    try:
        buf = np.empty(n, dtype=np.uint8)
        got = os.preadv(fd, [memoryview(buf)], t.offset) if n else 0
        while 0 < got < n:
            more = os.preadv(fd, [memoryview(buf)[got:]], t.offset + got)
            if more <= 0:
                break
            got += more
        if got != n:
            raise ModelSourceError(f"{t.file} is truncated (tensor {t.name} ends past the end of the file); "
                                   "re-download or re-export it")
        if hasattr(os, "posix_fadvise"):  # read once: do not keep the source in the page cache
            os.posix_fadvise(fd, t.offset, n, os.POSIX_FADV_DONTNEED)
        return buf
    finally:
        os.close(fd)
