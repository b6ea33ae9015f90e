"""The OpenAI wire format, without HTTP: request bodies in (validated), response objects out.

Every check a client can fail lives here and raises :class:`BadRequest` (HTTP 400 with an OpenAI error
object), so the HTTP layer parses bodies with nothing but ``json`` and never answers a malformed request
with anything but a clear message naming the field.

Sampling defaults are OpenAI's: ``temperature`` 1.0 and ``top_p`` 1.0 when absent (pass ``temperature: 0``
for greedy decoding). Without ``max_tokens`` / ``max_completion_tokens`` an answer runs until EOS, a stop
string or the end of the context. Accepted and ignored: ``model`` (one model is served), ``user``,
``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``metadata``, ``store``, ``parallel_tool_calls``.
Refused with a 400 naming the field: ``n`` ≠ 1, ``logprobs``, ``response_format`` other than text,
``echo``, ``suffix``, ``best_of`` ≠ 1, token-id prompts.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from offload_rt.serve.types import Done, GenRequest

MAX_STOP_STRINGS = 4  # OpenAI's limit
# role as sent → role the chat template sees ("developer" is the newer name of "system")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class BadRequest(Exception):
    """A request the client must fix (HTTP 400): the message says what, ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Options:
    """What a request asks of the answer besides its prompt: sampling, stop rules, streaming."""

    max_tokens: int | None  # None: until EOS, a stop string or the context's end
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    def gen_request(self, prompt_ids: list[int], context_tokens: int) -> GenRequest:
        """The backend's request for this prompt; without max_tokens, the rest of the context (at least one
        token, so a prompt that fills the context reaches the backend's PromptTooLong)."""
        room = max(1, context_tokens - len(prompt_ids))
        return GenRequest(
            prompt_ids=tuple(prompt_ids),
            max_tokens=room if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
        )


@dataclass(frozen=True)
class ChatCall:
    """A validated /v1/chat/completions body."""

    messages: list[dict]  # {"role", "content": str} (+ "name", "tool_calls", "tool_call_id"), roles normalised
    tools: list[dict] | None
    tool_choice: object  # "auto" | "none" | "required" | {"type": "function", ...}; None when absent
    options: Options

    def template_tools(self) -> list[dict] | None:
        """The tools the chat template shows the model (None: no tools, or tool_choice "none"; the answer is
        then not parsed for calls)."""
        if not self.tools:
            return None
        from offload_rt.serve import toolcalls  # only requests with tools need it

        return toolcalls.template_tools(self.tools, self.tool_choice)


@dataclass(frozen=True)
class CompletionCall:
    """A validated /v1/completions body."""

    prompt: str
    options: Options


# ---- requests -------------------------------------------------------------------------------------------


def parse_chat(body: object, context_tokens: int) -> ChatCall:
    """A chat completion request, checked field by field (BadRequest on the first problem)."""
    body = _object(body)
    if "messages" not in body:
        raise BadRequest("'messages' is required", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array of message objects", param="messages")
    if not messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")
    tools, tool_choice = body.get("tools"), body.get("tool_choice")
    if tools is not None or tool_choice is not None:
        _check_tools(tools, tool_choice)
    older = _max_tokens(body, "max_tokens", context_tokens)
    newer = _max_tokens(body, "max_completion_tokens", context_tokens)  # max_tokens' newer name wins
    max_tokens = older if newer is None else newer
    _refuse(body, "logprobs", lambda v: v not in (None, False), "logprobs are not supported")
    _refuse(body, "top_logprobs", lambda v: v not in (None, 0), "logprobs are not supported")
    _refuse_response_format(body)
    return ChatCall(
        messages=[_message(i, m) for i, m in enumerate(messages)],
        tools=tools or None,
        tool_choice=tool_choice,
        options=_options(body, max_tokens),
    )


def parse_completion(body: object, context_tokens: int) -> CompletionCall:
    """A (legacy) text completion request: the prompt is one string, no chat template."""
    body = _object(body)
    if "prompt" not in body:
        raise BadRequest("'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise BadRequest("token-id prompts are not supported: send the prompt as a string", param="prompt")
    if isinstance(prompt, list):
        raise BadRequest("'prompt' must be a string or an array of exactly one string (batches are not "
                         "supported)", param="prompt")
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", param="prompt")
    _refuse(body, "logprobs", lambda v: v not in (None, 0, False), "logprobs are not supported")
    _refuse(body, "echo", lambda v: v not in (None, False), "echo is not supported")
    _refuse(body, "suffix", lambda v: v not in (None, ""), "suffix (fill-in-the-middle) is not supported")
    _refuse(body, "best_of", lambda v: v not in (None, 1), "best_of other than 1 is not supported")
    return CompletionCall(prompt=prompt, options=_options(body, _max_tokens(body, "max_tokens", context_tokens)))


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _options(body: dict, max_tokens: int | None) -> Options:
    """Sampling, stop strings and streaming: the fields chat and text completions share."""
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise BadRequest("'n' must be 1: several choices per request (n>1) are not supported", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    include_usage = (stream_options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise BadRequest("'seed' must be an integer", param="seed")
    return Options(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0, low_open=False),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed,
        stop=_stop(body.get("stop")),
        stream=bool(stream),
        include_usage=bool(stream) and bool(include_usage),
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise BadRequest(f"'{key}' must be a number", param=key)
    if v > high or v < low or (low_open and v == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"'{key}' is {v}; it must be in {interval}", param=key)
    return float(v)


def _max_tokens(body: dict, key: str, context_tokens: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise BadRequest(f"'{key}' must be an integer", param=key)
    if v < 1:
        raise BadRequest(f"'{key}' is {v}; it must be at least 1", param=key)
    if v > context_tokens:
        raise BadRequest(
            f"'{key}' is {v} but the model's context is {context_tokens} tokens (prompt and answer together)",
            param=key,
        )
    return v


def _stop(stop: object) -> tuple[str, ...]:
    """Stop strings: one string or up to four; empty strings are dropped (they would stop at once)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or an array of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    return tuple(s for s in stop if s)


def _refuse(body: dict, key: str, bad, why: str) -> None:
    if bad(body.get(key)):
        raise BadRequest(f"'{key}': {why}", param=key)


def _refuse_response_format(body: dict) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "text":
        raise BadRequest("'response_format': only {\"type\": \"text\"} is supported (no JSON mode)",
                         param="response_format")


def _check_tools(tools: object, tool_choice: object) -> None:
    """``tools`` and ``tool_choice`` as serve.toolcalls checks them."""
    from offload_rt.serve import toolcalls  # only requests with tools need it

    problem = toolcalls.check_tools(tools, tool_choice)
    if problem:
        raise BadRequest(problem, param="tool_choice" if problem.startswith("tool_choice") else "tools")


def _message(i: int, m: object) -> dict:
    """One chat message as the template takes it: role normalised, content one string."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"{where} must be an object with 'role' and 'content'", param=where)
    role = m.get("role")
    if not isinstance(role, str):
        raise BadRequest(f"{where}.role is required and must be a string", param=f"{where}.role")
    if role not in ROLES:
        raise BadRequest(f"{where}.role '{role}' is not one of {', '.join(ROLES)}", param=f"{where}.role")
    out: dict = {"role": ROLES[role]}
    tool_calls = m.get("tool_calls") if role == "assistant" else None
    out["content"] = _content(where, m.get("content"), may_be_empty=role == "assistant")
    if tool_calls is not None:
        out["tool_calls"] = _past_tool_calls(where, tool_calls)
    for key in ("name", "tool_call_id"):
        if key in m and m[key] is not None:
            if not isinstance(m[key], str):
                raise BadRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
            out[key] = m[key]
    return out


def _content(where: str, content: object, *, may_be_empty: bool) -> str:
    """A message's text: a string, or an array of text parts joined (images, audio, files: 400)."""
    if content is None:
        if may_be_empty:
            return ""
        raise BadRequest(f"{where}.content is required", param=f"{where}.content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of text parts", param=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest(f"{at} must be an object with a 'type'", param=at)
        if part["type"] != "text":
            raise BadRequest(f"{at}: content parts of type '{part['type']}' are not supported (text only)", param=at)
        if not isinstance(part.get("text"), str):
            raise BadRequest(f"{at}.text must be a string", param=f"{at}.text")
        texts.append(part["text"])
    return "".join(texts)


def _past_tool_calls(where: str, calls: object) -> list[dict]:
    """An assistant message's earlier tool calls, arguments decoded to objects as chat templates expect
    (a string that is not JSON stays a string)."""
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"{at} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                             param=at)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


# ---- responses ------------------------------------------------------------------------------------------


def usage(done: Done) -> dict:
    """OpenAI's usage object, with the prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def finish_reason(done: Done, tool_calls: bool = False) -> str:
    """"tool_calls" when the answer's calls were parsed, else the backend's reason."""
    return "tool_calls" if tool_calls else done.finish_reason


class Reply:
    """The objects of one answer (one id and creation time for the whole answer and its chunks).

    ``chat`` selects chat.completion[.chunk] objects, else text_completion ones."""

    def __init__(self, model: str, *, chat: bool, include_usage: bool = False):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, done: Done, text: str, tool_calls: list[dict] | None = None) -> dict:
        """The non-streamed answer: chat.completion (content None beside tool calls) or text_completion."""
        if self.chat:
            message = {"role": "assistant", "content": (text or None) if tool_calls else text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": finish_reason(done, bool(tool_calls))}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(done)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(done)}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(done)}

    def chunk(self, delta: dict | str, finish: str | None = None) -> dict:
        """One streamed chunk: a chat delta ({"role"}, {"content"}, {"tool_calls"}; {} with the finish
        reason) or a text completion's new text."""
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            obj = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None  # OpenAI: every chunk carries the field, null until the last one
        return obj

    def first_chunk(self) -> dict:
        """A chat stream's opening chunk (the assistant role)."""
        return self.chunk({"role": "assistant", "content": ""})

    def usage_chunk(self, done: Done) -> dict:
        """The last chunk of a stream with include_usage: no choices, the usage."""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(done)}
