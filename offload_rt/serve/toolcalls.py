"""OpenAI tool calls: which syntax a chat template teaches its model, and the model's answer parsed back.

A model is told about tools by its chat template (``Tokenizer.render_chat(messages, tools)``) and answers
a call in its family's syntax; :func:`detect` names that syntax from the template's text:

- ``"qwen"`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, text before them allowed;
- ``"llama3"`` (Llama 3.1/3.2/3.3 JSON tool calling): the whole answer is ``{"name": ..., "parameters":
  {...}}`` (or ``"arguments"``), optionally after ``<|python_tag|>``, several joined by ``;``;
- ``"mistral"``: ``[TOOL_CALLS]`` then a JSON list ``[{"name": ..., "arguments": {...}}, ...]`` (v3, Nemo),
  or ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+, with an optional ``[CALL_ID]id``); text before allowed.
  An answer that starts with the JSON list itself also counts: ``[TOOL_CALLS]`` is a special token, which a
  decoder that skips special tokens drops (:func:`marker_tokens` lists the tokens worth keeping).

Reasoning an answer opens with (``<think>...</think>``, Qwen3's) is content, and markers it mentions do not
start calls: calls are looked for after it.

:func:`parse` turns a whole answer into OpenAI ``content`` and ``tool_calls``; a call that does not parse
(malformed JSON, no name, a truncated answer) turns the *whole* answer back into plain content with no
calls (as vLLM does), never an error. :class:`StreamParser` does the same on a stream of text deltas and
always ends with what :func:`parse` gives for the whole text: content is released while it is certainly
content; from a possible call marker on, text is held back, and the calls (each one delta with its id,
name and whole arguments, which OpenAI allows) come at :meth:`StreamParser.finish`, because a later
malformed call would turn earlier ones back into content. OpenAI clients act on tool calls only at the
stream's end (finish_reason "tool_calls") anyway.

:func:`check_tools` validates a request's ``tools`` and ``tool_choice`` (the message for an HTTP 400, or
None), :func:`template_tools` says what the template gets: nothing with ``tool_choice: "none"`` (as vLLM
does: the model is not told about tools and its answer is not parsed), only the named tool for a named
choice, every tool otherwise. Decoding is not constrained: with "required" or a named choice the model is
asked, not forced, to call. Pure Python: nothing here knows HTTP, tokens or tensors.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Sequence

FORMATS = ("qwen", "llama3", "mistral")

_QWEN_OPEN, _QWEN_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL = "[TOOL_CALLS]"
_THINK, _THINK_END = "<think>", "</think>"
_MARKER = {"qwen": _QWEN_OPEN, "mistral": _MISTRAL}  # the marker that may start calls anywhere in an answer
# v11+: [TOOL_CALLS]name[ARGS]{...}, v13 writes [CALL_ID]id before [ARGS]
_MISTRAL_NAMED = re.compile(r"([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9_\-]*)?\[ARGS\]")
_ALNUM = string.ascii_letters + string.digits


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; OpenAI clients would not


_JSON = json.JSONDecoder(parse_constant=_no_constant)
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def detect(chat_template: str | None) -> str | None:
    """The tool-call syntax ``chat_template`` teaches (one of FORMATS), from its markers; None when it has none."""
    if not chat_template:
        return None
    if _MISTRAL in chat_template:
        return "mistral"
    if _QWEN_OPEN in chat_template:
        return "qwen"
    if "<|start_header_id|>" in chat_template and (_PYTHON_TAG in chat_template
                                                  or "Environment: ipython" in chat_template):
        return "llama3"
    return None


def marker_tokens(fmt: str | None) -> tuple[str, ...]:
    """The (often special) tokens the parser reads for ``fmt``: a decoder for answers to parse should keep
    them in the text, where skipping special tokens would drop them."""
    return {"qwen": (_QWEN_OPEN, _QWEN_CLOSE), "llama3": (_PYTHON_TAG,),
            "mistral": (_MISTRAL, "[CALL_ID]", "[ARGS]")}.get(fmt or "", ())


def new_call_id(fmt: str | None) -> str:
    """A fresh tool call id: "call_" and 24 letters/digits; 9 letters/digits for Mistral, whose templates
    refuse any other id when the call comes back in the conversation."""
    n = 9 if fmt == "mistral" else 24
    body = "".join(secrets.choice(_ALNUM) for _ in range(n))
    return body if fmt == "mistral" else f"call_{body}"


# ---- parsing a whole answer ------------------------------------------------------------------------------

def parse(text: str, fmt: str | None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer: tool_calls in OpenAI's form ([{"id", "type": "function",
    "function": {"name", "arguments": JSON string}}]); content the text outside the calls (None when empty).
    A call that does not parse makes the whole text the content, with no calls."""
    start = _section_start(text, fmt)
    section = None if start is None else _parse_section(text[start:], fmt)
    if section is None:
        return (text or None), []
    calls, after = section
    pieces = [text[:start].rstrip()] + [s.strip() for s in after]
    content = "\n".join(p for p in pieces if p) or None
    return content, [{"id": new_call_id(fmt), "type": "function", "function": {"name": name, "arguments": args}}
                     for name, args in calls]


def _lead(text: str, pos: int = 0) -> int:
    """Where the first character from ``pos`` on that is not whitespace is (len(text) when none)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _origin(text: str) -> int | None:
    """Where calls may begin in a whole answer: after the reasoning it opens with (``<think>...</think>``,
    which may well mention call markers), at 0 without; None when the reasoning never ends."""
    j = _lead(text)
    if not text.startswith(_THINK, j):
        return 0
    k = text.find(_THINK_END, j + len(_THINK))
    return None if k < 0 else k + len(_THINK_END)


def _section_start(text: str, fmt: str | None) -> int | None:
    """Where the tool calls of a whole answer would begin, None when there is no call marker."""
    origin = _origin(text)
    if origin is None:
        return None
    if fmt in _MARKER:
        i = text.find(_MARKER[fmt], origin)
        if i >= 0:
            return i
    j = _lead(text, origin)
    if fmt == "mistral" and text.startswith("[", j):
        return j
    if fmt == "llama3" and (text.startswith("{", j) or text.startswith(_PYTHON_TAG, j)):
        return j
    return None


def _json_at(text: str, pos: int):
    """(value, end) of the JSON value after whitespace at ``pos``; None when there is none."""
    pos = _lead(text, pos)
    try:
        return _JSON.raw_decode(text, pos)
    except (ValueError, RecursionError):  # not JSON; nested deeper than Python's json reads
        return None


def _call(obj, *, need_arguments: bool) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) of one call object, None when it is not one. Arguments are an
    object, under "arguments" or "parameters" (Llama's word), or a string holding one; absent ones are {}
    unless ``need_arguments`` (an answer without a marker, which could be a JSON answer that has a "name")."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in ("arguments", "parameters") if k in obj), None)
    if key is None and need_arguments:
        return None
    args = {} if key is None else obj[key]
    if isinstance(args, str):
        found = _json_at(args, 0)
        if not found or args[_lead(args, found[1]):]:
            return None
        args = found[0]
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _parse_section(section: str, fmt: str | None):
    """([(name, arguments)], [text after each call]) of the calls ``section`` starts with; None when a call
    does not parse."""
    if fmt == "qwen":
        return _parse_qwen(section)
    if fmt == "mistral":
        return _parse_mistral(section)
    if fmt == "llama3":
        return _parse_llama3(section)
    return None


def _parse_qwen(section: str):
    calls, after, pos = [], [], 0
    while True:
        found = _json_at(section, pos + len(_QWEN_OPEN))
        call = found and _call(found[0], need_arguments=False)
        if not call:
            return None
        calls.append(call)
        pos = _lead(section, found[1])
        if section.startswith(_QWEN_CLOSE, pos):
            pos += len(_QWEN_CLOSE)
        elif pos < len(section):  # only the last block may lack its closing tag (the answer ended there)
            return None
        nxt = section.find(_QWEN_OPEN, pos)
        after.append(section[pos:] if nxt < 0 else section[pos:nxt])
        if nxt < 0:
            return calls, after
        pos = nxt


def _parse_mistral(section: str):
    calls, after, pos = [], [], 0
    bare = not section.startswith(_MISTRAL)  # the JSON list alone: the marker was decoded away
    while True:
        if not bare:
            pos += len(_MISTRAL)
        pos = _lead(section, pos)
        named = None if bare else _MISTRAL_NAMED.match(section, pos)
        if named:
            found = _json_at(section, named.end())
            if not found or not isinstance(found[0], dict):
                return None
            got = [_call({"name": named.group(1), "arguments": found[0]}, need_arguments=True)]
        else:
            found = _json_at(section, pos)
            if not found:
                return None
            items = found[0] if isinstance(found[0], list) else [found[0]]
            if bare and not isinstance(found[0], list):
                return None
            got = [_call(item, need_arguments=bare) for item in items]
        if not got or not all(got):
            return None
        calls += got
        pos = found[1]
        nxt = section.find(_MISTRAL, pos)
        after.append(section[pos:] if nxt < 0 else section[pos:nxt])
        if nxt < 0:
            return calls, after
        pos, bare = nxt, False


def _parse_llama3(section: str):
    calls, pos = [], len(_PYTHON_TAG) if section.startswith(_PYTHON_TAG) else 0
    while True:
        found = _json_at(section, pos)
        call = found and _call(found[0], need_arguments=True)
        if not call:
            return None
        calls.append(call)
        pos = _lead(section, found[1])
        if pos == len(section):
            return calls, []
        if section[pos] == ";":
            pos += 1
        elif section[pos] != "{":
            return None


# ---- streaming -------------------------------------------------------------------------------------------

def _partial_marker(text: str, marker: str, start: int) -> int:
    """The first index >= start from which ``text`` ends in a proper prefix of ``marker``; len(text) if none."""
    for k in range(max(start, len(text) - len(marker) + 1), len(text)):
        if marker.startswith(text[k:]):
            return k
    return len(text)


class StreamParser:
    """:func:`parse` over an answer arriving in pieces: ``push(delta)`` and ``finish()`` return events,
    ("content", text) or ("tool_call", index, id, name, arguments); all of them together say what
    ``parse`` says of the whole text."""

    def __init__(self, fmt: str | None):
        self.fmt = fmt
        self.text = ""
        self._sent = 0  # text[:_sent] went out as content
        self._scan = 0  # no whole marker (or end of reasoning, while _origin is None) starts before this index
        self._origin: int | None = None  # where calls may begin (_origin()), once known
        self._held = False  # a call section has begun: everything waits for finish()
        self._free = fmt is None  # no call can come any more: everything goes out as it comes
        self._done = False

    def push(self, delta: str) -> list[tuple]:
        if self._done:
            raise RuntimeError("StreamParser.push after finish")
        self.text += delta
        if self._held:
            return []
        end = len(self.text) if self._free else self._safe_end()
        if end <= self._sent:
            return []
        out, self._sent = self.text[self._sent:end], end
        return [("content", out)]

    def _safe_end(self) -> int:
        """How far the text is content whatever comes next: up to a call marker or what may begin one,
        less the whitespace before it (which content drops when a call follows)."""
        text = self.text
        if self._origin is None:  # where calls may begin is not known yet
            j = _lead(text)
            head = text[j:j + len(_THINK)]
            if head != _THINK and _THINK.startswith(head):
                return self._sent  # nothing yet, or perhaps reasoning beginning
            if head != _THINK:
                self._origin = 0
            else:
                k = text.find(_THINK_END, max(self._scan, j + len(_THINK)))
                if k < 0:  # reasoning: content whatever follows
                    self._scan = max(j + len(_THINK), len(text) - len(_THINK_END) + 1)
                    return len(text)
                self._origin = self._scan = k + len(_THINK_END)
        origin, hold = self._origin, len(text)
        marker = _MARKER.get(self.fmt)
        if marker is not None:
            i = text.find(marker, max(self._scan, origin))
            if i >= 0:
                self._held = True
                hold = i
            else:
                self._scan = max(origin, len(text) - len(marker) + 1)
                hold = _partial_marker(text, marker, max(self._sent, origin))
        if not self._held and self.fmt in ("llama3", "mistral"):
            j = _lead(text, origin)
            head = text[j:j + len(_PYTHON_TAG)]
            if self.fmt == "llama3":
                if head.startswith("{") or head == _PYTHON_TAG:
                    self._held = True
                    hold = j
                elif head and not _PYTHON_TAG.startswith(head):
                    self._free = True  # an answer not starting as a call is plain text
                    return len(text)
                else:
                    hold = j
            elif head.startswith("["):  # perhaps the bare list of calls: wait for it to end or a marker
                hold = j
        return self._sent + len(text[self._sent:hold].rstrip())

    def finish(self) -> list[tuple]:
        """The rest: held-back content, then the calls."""
        if self._done:
            return []
        self._done = True
        content, calls = parse(self.text, self.fmt)
        rest = (content or "")[self._sent:]
        events: list[tuple] = [("content", rest)] if rest else []
        events += [("tool_call", i, c["id"], c["function"]["name"], c["function"]["arguments"])
                   for i, c in enumerate(calls)]
        return events


# ---- the request's tools ---------------------------------------------------------------------------------

def check_tools(tools, tool_choice) -> str | None:
    """The message for an HTTP 400 when a request's ``tools`` or ``tool_choice`` is not valid OpenAI, else
    None. ``tools`` is None or a non-empty list of {"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}; ``tool_choice`` None, "none", "auto", "required" or
    {"type": "function", "function": {"name": one of the tools}}."""
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            return "'tools' must be a non-empty array of function tools"
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type") != "function":
                return f"{where}: each tool must be an object with \"type\": \"function\""
            function = tool.get("function")
            if not isinstance(function, dict):
                return f"{where}.function: must be an object"
            name = function.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
                return f"{where}.function.name: must be 1 to 64 letters, digits, '_' or '-'"
            if name in names:
                return f"{where}.function.name: {name!r} is given twice"
            names.append(name)
            if "description" in function and not isinstance(function["description"], (str, type(None))):
                return f"{where}.function.description: must be a string"
            if "parameters" in function and not isinstance(function["parameters"], (dict, type(None))):
                return f"{where}.function.parameters: must be a JSON Schema object"
            if "strict" in function and not isinstance(function["strict"], (bool, type(None))):
                return f"{where}.function.strict: must be a boolean"
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    if tool_choice == "required":
        return None if names else "tool_choice 'required' needs 'tools'"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            return "tool_choice.function.name: must be a string"
        return None if name in names else f"tool_choice names function {name!r}, which is not in 'tools'"
    return ("tool_choice must be \"none\", \"auto\", \"required\" or "
            "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def template_tools(tools: Sequence[dict] | None, tool_choice) -> list[dict] | None:
    """The tools the chat template is given for a request that passed :func:`check_tools`: None (no tools:
    the answer is then plain content, not parsed) without tools or with tool_choice "none"; only the named
    tool for a named choice; all of them otherwise."""
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return [t for t in tools if t["function"]["name"] == name]
    return list(tools)
