"""A tiny random-weight Llama checkpoint with the default model's tokenizer and chat template.

Fast CLI tests run it instead of the default model: converting it and answering take well under
a second, and its vocabulary (SmolLM2's) makes prompts, chat templates and stop strings real.
The tokenizer comes straight from the default GGUF's metadata; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# ~0.94 MiB per layer in float32 beside a 24 MiB tied embedding (the head): small budgets stream layers
SHAPE = dict(hidden=128, layers=8, intermediate=512, heads=4, kv_heads=2, tie=True)
CONTEXT = 1024  # 4 KiB of KV cache per token


def write_tiny_checkpoint(out: Path, gguf: Path, *, seed: int = 0) -> Path:
    """Write the checkpoint directory ``out`` (config.json, safetensors, tokenizer files)."""
    import tools.make_checkpoint as mc
    from storage.sources import GGUFSource

    tok_dir = out.with_name(out.name + "-tokenizer")
    tok_dir.mkdir(parents=True, exist_ok=True)
    meta = GGUFSource(gguf).tokenizer(tok_dir / "tokenizer.json")
    with pytest.MonkeyPatch.context() as mp:  # make_checkpoint would convert the default model into ~/.cache
        mp.setattr(mc, "default_tokenizer_files", lambda: (tok_dir / "tokenizer.json", meta))
        return mc.make_checkpoint(out, dtype="float32", seed=seed, context=CONTEXT, **SHAPE)
