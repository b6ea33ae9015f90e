"""Tokenizer and chat template: ``tokenizers`` for the vocabulary, jinja2 for templates.

The chat template is rendered the way Hugging Face transformers' ``apply_chat_template``
does (sandboxed jinja2, trim_blocks/lstrip_blocks, loop controls, ``{% generation %}``,
its ``tojson``, ``raise_exception``, ``strftime_now``; ``tools`` the OpenAI tool dicts as given,
``documents`` None; the special tokens), so prompts tokenize identically. A template that refuses a
conversation (``raise_exception``) or fails on it raises :class:`ChatTemplateError`, a user error.

OpenAI chat messages differ from what templates expect in two ways, mended before rendering (as vLLM
does): a tool call's ``function.arguments`` is a JSON string there, while templates print it with
``tojson`` and so need the object; and an assistant message that only calls tools has ``content: null``,
which some templates (Qwen3) concatenate, so it becomes "".
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from offload_rt.errors import ChatTemplateError, ModelSourceError


# A byte that did not decode, as Python's "surrogateescape" keeps it (stdin, argv, a terminal's line), or any
# other lone surrogate: the tokenizer cannot encode them.
_UNDECODABLE = re.compile("[\ud800-\udfff]")


def scrub_undecodable(text: str) -> tuple[str, int]:
    """``text`` with each undecodable byte (a lone surrogate) replaced by U+FFFD, and how many were replaced.

    Python decodes stdin, argv and terminal input with ``surrogateescape`` under a C/UTF-8 locale, so a
    Latin-1 ``\xe9`` arrives as ``\udce9``; this is the text the model can be given.
    """
    count = len(_UNDECODABLE.findall(text))
    return (_UNDECODABLE.sub("\ufffd", text), count) if count else (text, 0)


def decode_input(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Bytes of user input (a pipe, a file) as text: what does not decode becomes U+FFFD; (text, bytes replaced)."""
    return scrub_undecodable(data.decode(encoding, "surrogateescape"))


class _Refusal(TemplateError):
    """What a template's ``raise_exception(message)`` raises."""


def _raise(message: str):
    raise _Refusal(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: jinja2's own escapes HTML characters and sorts keys
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def compile_chat_template(source: str):
    """A jinja2 template in the environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template is broken (line {e.lineno}: {e.message}); fix its "
                                "chat_template or send plain text with --raw") from None


def _template_call(call):
    """An OpenAI tool call with its ``function.arguments`` JSON string as the object it encodes ("" is {});
    arguments that are not a JSON object stay as they are (templates that print strings still can)."""
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        decoded = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return call
    if not isinstance(decoded, dict):
        return call
    return {**call, "function": {**function, "arguments": decoded}}


def template_messages(messages: Iterable[dict]) -> list[dict]:
    """Chat messages as chat templates read them: fields that are None left out (OpenAI clients send
    null for absent ones), an assistant message's tool calls with object arguments and its missing content ""."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and isinstance(calls, list) and calls:
            message["tool_calls"] = [_template_call(c) for c in calls]
            message.setdefault("content", "")
        out.append(message)
    return out


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

    def vocabulary_difference(self, other: "Tokenizer") -> str | None:
        """None when ``other`` maps every token string to the same id (a draft's tokenizer must);
        else a few words on the first difference."""
        mine, theirs = self._tok.get_vocab(with_added_tokens=True), other._tok.get_vocab(with_added_tokens=True)
        if mine == theirs:
            return None
        if len(mine) != len(theirs):
            return f"{len(theirs)} tokens against {len(mine)}"
        for piece, i in mine.items():
            if theirs.get(piece) != i:
                return f"token {piece!r} is id {theirs.get(piece)} there, {i} here"
        return "the vocabularies differ"

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; an undecodable input byte (a lone surrogate) is encoded as U+FFFD."""
        ids = self._tok.encode(scrub_undecodable(text)[0], add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], keep: frozenset[int] = frozenset()) -> str:
        """Text of ``ids``, special tokens left out except those in ``keep`` (a tool-call parser's markers,
        e.g. Mistral's ``[TOOL_CALLS]``), which appear as their token text."""
        ids = list(ids)
        if not keep or not any(i in keep for i in ids):
            return self._tok.decode(ids, skip_special_tokens=True)
        out, run = [], []
        for i in ids:
            if i in keep:
                out.append(self._tok.decode(run, skip_special_tokens=True) + self._tok.id_to_token(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self._tok.decode(run, skip_special_tokens=True)

    def token_ids(self, texts: Sequence[str]) -> frozenset[int]:
        """The ids of those of ``texts`` that are single tokens of this vocabulary."""
        return frozenset(i for i in (self._tok.token_to_id(t) for t in texts) if i is not None)

    def render_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                    add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` ([{"role", "content"}], OpenAI's assistant ``tool_calls``
        and ``role: "tool"`` results included) and the OpenAI ``tools`` ([{"type": "function", "function":
        {name, description, parameters}}], None for none), as transformers renders them.

        Raises ChatTemplateError when the template refuses the conversation or fails on it.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        try:
            return self._template.render(messages=template_messages(messages),
                                         tools=None if tools is None else list(tools), documents=None,
                                         add_generation_prompt=add_generation_prompt, **specials)
        except _Refusal as e:
            raise ChatTemplateError(f"the model's chat template refused the conversation: {e.message}") from None
        except Exception as e:  # the template's own code failed (undefined name, bad type...) on these messages
            raise ChatTemplateError(f"the model's chat template failed on this conversation "
                                    f"({type(e).__name__}: {e}); send plain text with --raw") from None

    def encode_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        # The template writes any BOS itself (as Hugging Face's apply_chat_template does).
        return self.encode(self.render_chat(messages, tools), add_bos=False)


class StreamDecoder:
    """Turns a growing list of ids into text increments, holding back incomplete UTF-8."""

    def __init__(self, tok: Tokenizer, keep: frozenset[int] = frozenset()):
        self.tok, self.keep = tok, keep  # keep: special token ids shown in the text (Tokenizer.decode)
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        full = self.tok.decode(self.ids, self.keep) if self.keep else self.tok.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return new

    def finish(self) -> str:
        """The text held back at the end (a character the answer stopped in the middle of, as U+FFFD)."""
        full = self.tok.decode(self.ids, self.keep) if self.keep else self.tok.decode(self.ids)
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return new
