"""Checkpoint readers: a Hugging Face directory (safetensors) or a GGUF file.

A source answers four questions without converting anything:

* ``identity()``  -- what the store key is made of (path, file names, sizes, mtimes: ``stat`` only);
* ``config()``    -- the Hugging Face style config dict (metadata only, no tensor data);
* ``tensors()``   -- one :class:`TensorSource` per tensor (headers parsed, data not read), in its
  storage format (storage.formats): either a raw byte range of a file, copied as is, or a
  callable producing a numpy array (un-permuted Q/K rows, a dequantized exotic GGUF type);
* ``tokenizer(dest)`` -- writes ``tokenizer.json`` to ``dest`` and returns the tokenizer metadata.

The readers live in ``safetensors_source`` and ``gguf_source``; this module picks one.
Every problem with the source raises :class:`ModelSourceError` with a one-line message.
"""

from __future__ import annotations

import os
from pathlib import Path

from storage.errors import ModelSourceError
from storage.gguf_source import (GGUFSource, gguf_to_hf_name, parse_gguf_header, permute_qk,  # noqa: F401
                                 unpermute_qk)
from storage.safetensors_source import HFSource, read_safetensors_header  # noqa: F401
from storage.tensor_source import TensorSource  # noqa: F401

NOT_A_CHECKPOINT = "{} is not a model checkpoint: expected config.json and *.safetensors, or a .gguf file"


def open_source(path: str | os.PathLike) -> "HFSource | GGUFSource":
    """The reader for ``path`` (a checkpoint directory or a .gguf file); checks only what ``stat`` can."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelSourceError(f"model path {path} does not exist; pass a checkpoint directory or a .gguf file")
    if p.is_dir():
        if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
            raise ModelSourceError(NOT_A_CHECKPOINT.format(p))
        return HFSource(p)
    if p.is_file():
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelSourceError(f"cannot read {p}: {e.strerror}; check the path and its permissions") from None
        if magic == b"GGUF":
            return GGUFSource(p)
        if p.suffix.lower() == ".gguf":
            raise ModelSourceError(f"{p} is not a valid GGUF file (bad magic); re-download or re-export it")
    raise ModelSourceError(NOT_A_CHECKPOINT.format(p))


def read_source_config(path: str | os.PathLike) -> dict:
    """The HF-style config dict of a checkpoint, from metadata only (no tensor data is read)."""
    return open_source(path).config()
