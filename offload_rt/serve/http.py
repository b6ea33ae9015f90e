"""The OpenAI-compatible HTTP API over a :class:`~offload_rt.serve.types.Backend` (FastAPI).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health, GET /metrics.
Bodies are read as plain JSON and validated by :mod:`offload_rt.serve.protocol` (no pydantic models), so
every client error is one OpenAI error object ``{"error": {"message", "type", "param", "code"}}``: 400 for
a bad body or a prompt too long for the context, 401 for a missing or wrong API key (``/health`` stays
open), 404/405 for unknown routes and methods, 503 with Retry-After when the backend's queue is full, 500
(generic message, traceback logged on stderr) for anything unexpected; the server keeps serving.

Streams are Server-Sent Events (``data: {json}`` ... ``data: [DONE]``). A client that goes away (its
connection closes, streamed or not) has its handle cancelled at once, so its batch slot and KV are freed
for the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from offload_rt.serve import answer, metrics, protocol, toolcalls
from offload_rt.serve.protocol import BadRequest, Reply
from offload_rt.serve.types import Backend, GenRequest, Handle, PromptTooLong, QueueFull

log = logging.getLogger("offload_rt.serve")
INTERNAL_ERROR = "internal server error (the server's log has the details)"


class ApiError(Exception):
    """An error answered as an OpenAI error object with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    # OpenAI's types: unknown routes and models are invalid requests too
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class _CatchAll:
    """ASGI middleware: an exception no handler took becomes a 500 error object (the traceback goes to the
    log), so one broken request never takes the server or its connection handling down."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _error_response(500, INTERNAL_ERROR)(scope, receive, send)


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, NaN/Infinity, absurd nesting
        raise BadRequest(f"the request body is not valid JSON: {e}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _submit(backend: Backend, request: GenRequest, param: str) -> Handle:
    try:
        return backend.submit(request)
    except QueueFull as e:
        raise ApiError(503, str(e), code="server_busy", headers={"Retry-After": str(e.retry_after)}) from None
    except PromptTooLong as e:
        raise ApiError(400, str(e) or "the prompt is longer than the model's context", param=param,
                       code="context_length_exceeded") from None


async def _cancel_when_gone(receive, handle: Handle) -> None:
    """Wait for the client's disconnect (the request body was read: the next message is the disconnect)
    and free the request's slot at once."""
    while (await receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


async def _answer(request: Request, handle: Handle, reply: Reply, tool_format: str | None, stream: bool):
    """The response for a submitted request: SSE or one JSON object. The handle is cancelled as soon as
    the client leaves (a watcher waits for the disconnect from now on, before any byte is sent), and when
    the answer fails before its Done."""
    watcher = asyncio.create_task(_cancel_when_gone(request.receive, handle))
    if stream:
        return StreamingResponse(_sse(watcher, handle, answer.chunks(handle, reply, tool_format)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finished = False
    try:
        obj = await answer.whole(handle, reply, tool_format)
        finished = True
        return JSONResponse(obj)
    finally:
        watcher.cancel()
        if not finished:
            handle.cancel()


async def _sse(watcher: asyncio.Task, handle: Handle, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    finished = False
    try:
        try:
            async for obj in chunks:
                yield f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
            finished = True
        except Exception:  # mid-stream: the status is sent already, so the error is an event
            log.exception("internal error while streaming an answer")
            yield f"data: {json.dumps(error_body(500, INTERNAL_ERROR))}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on the client's disconnect (cancellation) and on aclose()
        watcher.cancel()
        if not finished:
            handle.cancel()


def _bearer_check(api_key: str | None):
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _with_defaults(body, defaults: dict | None):
    """The request body with the server's defaults for the fields it leaves out (validated as the client's)."""
    if not defaults or not isinstance(body, dict):
        return body
    return {**{k: v for k, v in defaults.items() if body.get(k) is None}, **{k: v for k, v in body.items() if v is not None}}


def create_app(backend: Backend, *, api_key: str | None = None, defaults: dict | None = None) -> FastAPI:
    """The FastAPI app serving ``backend``; with ``api_key`` every route but /health needs
    ``Authorization: Bearer <api_key>``."""
    app = FastAPI(title="offload_rt", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CatchAll)
    created = int(time.time())
    auth = [] if api_key is None else [Depends(_bearer_check(api_key))]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, e: BadRequest):
        return _error_response(400, e.message, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(400, f"invalid request: {e.errors()}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=auth)
    async def metrics_text():
        return PlainTextResponse(metrics.render(backend.metrics()), media_type=metrics.CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": backend.model_id, "object": "model", "created": created, "owned_by": "offload_rt"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str):
        if model != backend.model_id:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{backend.model_id}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request):
        call = protocol.parse_chat(_with_defaults(await _json_body(request), defaults), backend.context_tokens)
        tools = call.template_tools()
        try:
            ids = backend.chat_ids(call.messages, tools)
        except ValueError as e:
            raise BadRequest(str(e), param="messages") from None
        tool_format = backend.tool_format() if tools else None
        gen = call.options.gen_request(ids, backend.context_tokens)
        if tool_format is not None:  # the parser reads the format's markers: the decoder keeps them
            gen = dataclasses.replace(gen, keep_tokens=toolcalls.marker_tokens(tool_format))
        handle = _submit(backend, gen, "messages")
        reply = Reply(backend.model_id, chat=True, include_usage=call.options.include_usage)
        return await _answer(request, handle, reply, tool_format, call.options.stream)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        call = protocol.parse_completion(_with_defaults(await _json_body(request), defaults),
                                         backend.context_tokens)
        ids = backend.text_ids(call.prompt)
        handle = _submit(backend, call.options.gen_request(ids, backend.context_tokens), "prompt")
        reply = Reply(backend.model_id, chat=False, include_usage=call.options.include_usage)
        return await _answer(request, handle, reply, None, call.options.stream)

    return app
