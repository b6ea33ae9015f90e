"""The weight store's ``manifest.json``: what a store holds, and how to tell it is whole.

Layout of one tensor entry::

    "model.layers.0.self_attn.q_proj.weight": {
        "format": "bfloat16",           # storage.formats name (float type or ggml block quantization)
        "storage_dtype": "uint16",      # zarr data type of the array (bfloat16 as its bits, blocks as uint8)
        "shape": [2048, 2048],          # logical shape (the zarr array has Format.byte_shape of it)
        "chunk_rows": 2048,             # rows per chunk along axis 0 (one chunk unless > 256 MiB; every
                                        # chunk file holds chunk_rows rows, the last one zero-padded as zarr
                                        # stores edge chunks; its checksum covers the tensor's rows only)
        "nbytes": 8388608,              # Format.nbytes(shape)
        "checksums": ["crc32:1a2b3c4d"],          # one per chunk
        "chunk_keys": ["c/0/0"]                   # zarr chunk keys (relative to the array dir)
    }

A MoE layer's packed experts (storage.experts) are one tensor of format "uint8", shape [E, U],
chunk_rows 1 (a chunk file per expert), whose entry also has::

        "experts": {"count": E, "unit_bytes": U,
                    "parts": {"gate_proj": {"format": "q4_k", "shape": [I, H], "offset": 0, "nbytes": n}, ...}}

Such stores are format_version 3 (an older reader refuses them); stores without experts are still
written as version 2, so their store keys (storage.convert.store_key) do not change. Version 1 stores
(float formats only, under the key "dtype") are read as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from storage.errors import ModelSourceError
from storage.formats import FORMATS

FORMAT_VERSION = 2  # stores without packed experts (and the version in every store key)
EXPERTS_FORMAT_VERSION = 3  # stores with packed experts
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
CHUNK_LIMIT = 256 << 20  # bytes; tensors above this are chunked along axis 0
REBUILD_HINT = "rerun with --rebuild-store to convert it again"


def chunk_rows_for(shape: tuple[int, ...], row: int, limit: int = CHUNK_LIMIT) -> int:
    """Rows of axis 0 per chunk (``row`` bytes each): all of them unless the tensor exceeds ``limit`` bytes."""
    if not shape:
        return 1
    rows = int(shape[0])
    if rows * row <= limit or row == 0:
        return max(rows, 1)
    most = max(1, limit // row)
    # zarr stores an edge chunk at full size (padded): prefer a chunk height that divides the rows evenly
    for d in range(most, max(1, most // 4) - 1, -1):
        if rows % d == 0:
            return d
    return most


def n_chunks(shape: tuple[int, ...], chunk_rows: int) -> int:
    if not shape:
        return 1
    return -(-int(shape[0]) // chunk_rows) if shape[0] else 0


def crc_tag(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def write_manifest(store_dir: Path, manifest: dict) -> None:
    tmp = store_dir / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, store_dir / MANIFEST)


def load_manifest(store_dir: Path) -> dict:
    """The validated manifest of ``store_dir``; ModelSourceError (with the rebuild hint) if missing or garbled."""
    path = Path(store_dir) / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelSourceError(f"weight store {store_dir} has no {MANIFEST} (an incomplete store?); {REBUILD_HINT}") from None
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"weight store {store_dir} has an unreadable {MANIFEST} ({str(e).splitlines()[0]}); "
                               f"{REBUILD_HINT}") from None
    problem = _check(m)
    if problem:
        raise ModelSourceError(f"weight store {store_dir} has a bad {MANIFEST} ({problem}); {REBUILD_HINT}")
    return m


def _check(m) -> str | None:
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format_version") not in READABLE_VERSIONS:
        return f"format_version {m.get('format_version')!r}, expected one of {READABLE_VERSIONS}"
    for key, typ in (("source", dict), ("model_config", dict), ("tokenizer", dict), ("tensors", dict)):
        if not isinstance(m.get(key), typ):
            return f"missing or bad {key!r}"
    if not isinstance(m["tokenizer"].get("file"), str):
        return "tokenizer has no file"
    for name, t in m["tensors"].items():
        try:
            fmt = FORMATS.get(tensor_format(t))
            shape = [int(s) for s in t["shape"]]
            rows = int(t["chunk_rows"])
            nbytes = int(t["nbytes"])
            sums = t["checksums"]
            if fmt is None or rows < 1:
                return f"tensor {name}: bad format or chunk_rows"
            try:
                expect = fmt.nbytes(tuple(shape))
            except ValueError:
                return f"tensor {name}: its shape does not split into {fmt.name} blocks"
            if expect != nbytes or len(sums) != n_chunks(tuple(shape), rows):
                return f"tensor {name}: nbytes or checksums do not match its shape"
            keys = t.get("chunk_keys")
            if keys is not None and len(keys) != len(sums):
                return f"tensor {name}: chunk_keys do not match its checksums"
            if "experts" in t:
                problem = _check_experts(t["experts"], shape, rows)
                if problem:
                    return f"tensor {name}: {problem}"
        except (KeyError, TypeError, ValueError):
            return f"tensor {name}: missing or bad fields"
    return None


def _check_experts(entry, shape: list, chunk_rows: int) -> str | None:
    from storage.experts import ExpertLayout

    try:
        layout = ExpertLayout.from_manifest(entry)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"bad experts entry ({e})"
    if shape != [layout.count, layout.unit_bytes] or chunk_rows != 1:
        return "its experts entry does not match its shape and chunks"
    return None


def tensor_format(entry: dict) -> str:
    """The format name of a manifest tensor entry (version 1 called it "dtype")."""
    return entry.get("format") or entry["dtype"]
