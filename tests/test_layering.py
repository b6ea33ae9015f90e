"""Layering the issue 21 review asked for: storage is free of offload_rt, and a warm start reads no checkpoint
header (the store's manifest has what the run needs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "storage").glob("*.py")), ids=lambda p: p.name)
def test_storage_does_not_import_offload_rt(path):
    assert not [m for m in _imports(path) if m.split(".")[0] == "offload_rt"], path


def test_storage_errors_are_user_errors_of_their_kind():
    """offload_rt's classes match their storage twins, so callers (and the CLI's exit status 2) name one
    hierarchy."""
    import storage.errors as se
    from offload_rt.errors import BudgetError, CorruptStoreError, ModelSourceError, UsageError, UserError

    assert isinstance(se.CorruptStoreError("x", tensor="t"), CorruptStoreError)
    assert isinstance(se.ModelSourceError("x"), ModelSourceError) and isinstance(se.ModelSourceError("x"), UserError)
    assert isinstance(se.StorageUsageError("x"), UsageError)
    assert not isinstance(se.ModelSourceError("x"), CorruptStoreError)
    assert not isinstance(BudgetError("x"), ModelSourceError)
    with pytest.raises(CorruptStoreError):
        raise se.CorruptStoreError("x")


def test_a_warm_start_parses_no_gguf_header(tmp_path, monkeypatch):
    import storage.gguf_source as gs
    from offload_rt.config import RunConfig
    from offload_rt.loader import default_model_path, open_store

    cfg = RunConfig(offload_dir=tmp_path, progress=False)
    path, first = open_store(cfg)  # converts: the header is parsed
    calls = []
    real = gs.parse_gguf_header
    monkeypatch.setattr(gs, "parse_gguf_header", lambda p: calls.append(p) or real(p))
    path2, again = open_store(cfg)
    assert path2 == path == default_model_path() and again.path == first.path
    assert calls == []
