"""Tokenizer and chat template: ``tokenizers`` for the vocabulary, jinja2 for templates.

The chat template is rendered the way Hugging Face does (sandboxed jinja2,
trim_blocks/lstrip_blocks, ``raise_exception``), so prompts tokenize identically.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Iterable, Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from offload_rt.errors import ModelSourceError


def _raise(message: str):
    raise TemplateError(message)


class Tokenizer:
    """Encode/decode plus chat formatting for one model."""

    def __init__(self, path: Path, meta: dict):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ModelSourceError(f"cannot read tokenizer {path}: {e}; rebuild the store with --rebuild-store") from None
        self.meta = meta
        self.chat_template: str | None = meta.get("chat_template") or None
        self.bos_token: str | None = meta.get("bos_token")
        self.eos_token: str | None = meta.get("eos_token")
        self.bos_id: int | None = meta.get("bos_token_id")
        self.add_bos: bool = bool(meta.get("add_bos_token", False))
        ids = list(meta.get("eos_token_ids") or [])
        if not ids and self.eos_token is not None:
            tid = self._tok.token_to_id(self.eos_token)
            if tid is not None:
                ids = [tid]
        self.eos_ids: frozenset[int] = frozenset(int(i) for i in ids)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` ([{"role", "content"}])."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes any BOS itself (as Hugging Face's apply_chat_template does).
        return self.encode(self.render_chat(messages), add_bos=False)


class StreamDecoder:
    """Turns a growing list of ids into text increments, holding back incomplete UTF-8."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        full = self.tok.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return new
