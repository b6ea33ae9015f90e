"""One answer's events (a backend :class:`~offload_rt.serve.types.Handle`) → OpenAI objects, whole or streamed.

With a tool-call format (the request offered tools and the model's template has a syntax for calls) the
text goes through :mod:`offload_rt.serve.toolcalls`: whole answers are parsed once at the end, streams
through its incremental parser, so calls arrive as ``tool_calls`` deltas and ``finish_reason`` becomes
"tool_calls". Text the parser does not recognise as a call stays content. Nothing here knows HTTP; who
cancels the handle when the client leaves is the HTTP layer's business.
"""

from __future__ import annotations

from typing import AsyncIterator

from offload_rt.serve.protocol import Reply, finish_reason
from offload_rt.serve.types import Delta, Done, Handle


async def _events(handle: Handle) -> AsyncIterator[Delta | Done]:
    """The handle's events, checked to end with exactly one Done."""
    async for event in handle.events():
        yield event
        if isinstance(event, Done):
            return
    raise RuntimeError("the backend's events ended without a Done")


async def whole(handle: Handle, reply: Reply, tool_format: str | None = None) -> dict:
    """The non-streamed answer: every delta gathered, tool calls parsed at the end."""
    parts: list[str] = []
    done = None
    async for event in _events(handle):
        if isinstance(event, Delta):
            parts.append(event.text)
        else:
            done = event
    text, calls = "".join(parts), None
    if tool_format is not None:
        from offload_rt.serve import toolcalls

        text, calls = toolcalls.parse(text, tool_format)
    return reply.whole(done, text, calls or None)


async def chunks(handle: Handle, reply: Reply, tool_format: str | None = None) -> AsyncIterator[dict]:
    """The streamed answer: (chat: the role chunk,) a chunk per non-empty delta, the finish chunk, and the
    usage chunk when the request asked for it."""
    parser = None
    if tool_format is not None:
        from offload_rt.serve import toolcalls

        parser = toolcalls.StreamParser(tool_format)
    called = False
    if reply.chat:
        yield reply.first_chunk()
    done = None
    async for event in _events(handle):
        if isinstance(event, Done):
            done = event
            break
        if parser is None:
            if event.text:
                yield reply.chunk({"content": event.text} if reply.chat else event.text)
            continue
        for parsed in parser.push(event.text):
            yield reply.chunk(_delta(parsed))
    if parser is not None:
        for parsed in parser.finish():
            called = called or parsed[0] == "tool_call"
            yield reply.chunk(_delta(parsed))
    yield reply.chunk({} if reply.chat else "", finish_reason(done, called))
    if reply.include_usage:
        yield reply.usage_chunk(done)


def _delta(event: tuple) -> dict:
    """A StreamParser event as a chat delta: ("content", text), or ("tool_call", index, id, name, arguments)
    (a whole call in one delta, which OpenAI's stream format allows)."""
    if event[0] == "content":
        return {"content": event[1]}
    _, index, call_id, name, arguments = event
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}
