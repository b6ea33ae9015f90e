"""A checkpoint tensor as a source describes it, before conversion (shared by the readers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from storage.formats import get_format


@dataclass
class TensorSource:
    """One tensor of a checkpoint, in Hugging Face naming and row-major (logical) shape."""

    name: str
    fmt: str  # storage.formats name: "float32" | "float16" | "bfloat16" | "q4_1" | ...
    shape: tuple[int, ...]
    file: Path | None = None  # raw little-endian bytes at [offset, offset + nbytes) of file ...
    offset: int = 0
    produce: Callable[[], np.ndarray] | None = None  # ... or an array built on demand (C-contiguous; for a
    # quantized format its bytes, [rows, row_bytes] uint8)
    produce_chunk: Callable[[int], np.ndarray] | None = None  # ... or chunk i's bytes built on demand, one chunk
    # at a time (chunk_rows rows of axis 0 each; packed experts: one expert unit), so memory stays one chunk
    chunk_rows: int | None = None  # rows per chunk file (None: the converter's choice; required with produce_chunk)
    experts: dict | None = None  # packed experts: the manifest's "experts" entry (storage.experts.ExpertLayout)

    @property
    def nbytes(self) -> int:
        return get_format(self.fmt).nbytes(self.shape)


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def stat_entry(f: Path) -> dict:
    st = f.stat()
    return {"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
