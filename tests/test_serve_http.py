"""The HTTP layer of ``offload-run serve`` against a fake backend: a live uvicorn server in a thread, spoken to
with the official ``openai`` client (what users run) and with raw HTTP for what a client library would refuse
to send (malformed bodies, wrong keys, a client that hangs up mid-answer)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from offload_rt.serve import metrics, protocol
from offload_rt.serve.http import create_app
from offload_rt.serve.protocol import BadRequest
from offload_rt.serve.types import Delta, Done, GenRequest, PromptTooLong, QueueFull

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

API_KEY = "sk-test-key"
CONTEXT = 2048
SCRIPT = "The capital of France is Paris , a city on the Seine known for its museums and cafes ."
HAS_TOOLCALLS = importlib.util.find_spec("offload_rt.serve.toolcalls") is not None


# ---- the fake backend ---------------------------------------------------------------------------------


class FakeHandle:
    """Streams the backend's script one word per delta, up to max_tokens words or a stop string."""

    def __init__(self, backend: "FakeBackend", request: GenRequest, words: list[str], delay: float, crash: bool):
        self.backend, self.request, self.words, self.delay, self.crash = backend, request, words, delay, crash
        self.cancelled = False

    async def events(self):
        text, n, reason = "", 0, "stop"
        for word in self.words:
            if self.cancelled:
                reason = "cancelled"
                break
            if n == self.request.max_tokens:
                reason = "length"
                break
            piece = word if not text else " " + word
            cut = [(text + piece).find(s) for s in self.request.stop]
            cut = min((c for c in cut if c >= 0), default=-1)
            if cut >= 0:
                piece = (text + piece)[:cut][len(text):]
                if piece:
                    yield Delta(piece)
                    n += 1
                text += piece
                break
            if self.crash and n == 1:
                raise RuntimeError("the fake backend broke mid-answer")
            n += 1
            text += piece
            yield Delta(piece, (n,))
            await asyncio.sleep(self.delay)
        cached = self.backend.cached_for(self.request.prompt_ids)
        yield Done(reason, len(self.request.prompt_ids), n, cached_tokens=cached, text=text)

    def cancel(self) -> None:
        self.cancelled = True
        self.backend.cancelled.append(self)


class FakeBackend:
    """The Backend protocol with character "tokens" and a scripted answer; records what it was asked."""

    model_id = "fake-model"
    context_tokens = CONTEXT
    parallel = 2

    def __init__(self):
        self.submitted: list[GenRequest] = []
        self.messages: list = []
        self.cancelled: list[FakeHandle] = []
        self.full = False
        self.tools_format: str | None = None
        self.script = SCRIPT

    def chat_ids(self, messages, tools=None):
        self.messages.append((messages, tools))
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        if "UNRENDERABLE" in text:
            raise ValueError("the chat template cannot render these messages")
        return [ord(c) for c in text]

    def text_ids(self, prompt):
        return [ord(c) for c in prompt]

    def tool_format(self):
        return self.tools_format

    def cached_for(self, ids: tuple[int, ...]) -> int:
        """The longest prefix shared with an earlier prompt (a prefix cache's hit)."""
        best = 0
        for earlier in self.submitted[:-1]:
            n = 0
            for a, b in zip(earlier.prompt_ids, ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best

    def submit(self, request: GenRequest):
        asyncio.get_running_loop()  # called on the event loop, as the protocol asks
        text = "".join(map(chr, request.prompt_ids))
        if self.full:
            raise QueueFull(retry_after=7)
        if len(request.prompt_ids) >= self.context_tokens:
            raise PromptTooLong(f"the prompt is {len(request.prompt_ids)} tokens; the context is {CONTEXT}")
        if "EXPLODE" in text:
            raise RuntimeError("an unexpected failure in the backend")
        self.submitted.append(request)
        slow = "SLOW" in text
        words = ["tick"] * 3000 if slow else self.script.split(" ")
        return FakeHandle(self, request, words, 0.01 if slow else 0.0, crash="CRASH" in text)

    def metrics(self):
        return {"requests_total": len(self.submitted), "requests_active": 0, "queue_depth": 0, "batch_size": 1,
                "prompt_tokens_total": sum(len(r.prompt_ids) for r in self.submitted),
                "completion_tokens_total": 0, "prefix_cache_hits_total": 0, "cached_tokens_total": 0,
                "tokens_per_second": 12.5}


# ---- the live server ------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(app):
    """uvicorn serving ``app`` on a free port of 127.0.0.1 in a thread; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server():
    backend = FakeBackend()
    with serving(create_app(backend, api_key=API_KEY)) as port:
        yield backend, port


@pytest.fixture
def backend(server):
    backend, _ = server
    backend.full, backend.tools_format, backend.script = False, None, SCRIPT
    return backend


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key=API_KEY, max_retries=0, timeout=20)


def raw(server, method: str, path: str, body: bytes | dict | None = None, key: str | None = API_KEY):
    """(status, headers, decoded JSON or text) of one request, error statuses included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://127.0.0.1:{server[1]}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status, headers, text = resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, text = e.code, e.headers, e.read().decode()
    try:
        return status, headers, json.loads(text)
    except json.JSONDecodeError:
        return status, headers, text


def chat_body(content="What is the capital of France?", **extra) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def assert_error(result, status: int, kind: str, param: str | None = "any"):
    got, _, body = result
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] == kind, err
    if param != "any":
        assert err["param"] == param, err


def words(n: int) -> str:
    return " ".join(SCRIPT.split(" ")[:n])


# ---- the openai client -----------------------------------------------------------------------------------


def test_chat_whole_and_streamed_answers_agree(client, backend):
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Capital "}, {"type": "text", "text": "of France?"}]}]
    whole = client.chat.completions.create(model="fake-model", messages=msgs, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == "fake-model"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == SCRIPT
    assert whole.choices[0].finish_reason == "stop"
    seen, _ = backend.messages[-1]
    assert [m["role"] for m in seen] == ["system", "user"] and seen[1]["content"] == "Capital of France?"
    assert backend.submitted[-1].temperature == 0.0

    stream = client.chat.completions.create(model="fake-model", messages=msgs, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3  # one chunk per delta


def test_usage_counts_prompt_completion_and_cached_tokens(client, backend):
    first = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me about Paris"}])
    prompt_ids = backend.submitted[-1].prompt_ids
    assert first.usage.prompt_tokens == len(prompt_ids)
    assert first.usage.completion_tokens == len(SCRIPT.split(" "))
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me about Paris"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.prompt_tokens_details.cached_tokens == backend.cached_for(prompt_ids) > 0


def test_sampling_options_reach_the_backend(client, backend):
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    default = backend.submitted[-1]
    assert (default.temperature, default.top_p, default.seed, default.stop) == (1.0, 1.0, None, ())
    assert default.max_tokens == CONTEXT - len(default.prompt_ids)  # until the context ends
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0.5,
                                       top_p=0.9, seed=42, stop=["Seine"], max_completion_tokens=50)
    sent = backend.submitted[-1]
    assert (sent.temperature, sent.top_p, sent.seed, sent.stop, sent.max_tokens) == (0.5, 0.9, 42, ("Seine",), 50)
    assert r.choices[0].message.content == SCRIPT[: SCRIPT.index("Seine")]


def test_max_tokens_truncates_with_finish_length(client, backend):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content == words(3) and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_text_completions(client, backend):
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=4)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == words(4) and r.choices[0].finish_reason == "length"
    assert backend.submitted[-1].prompt_ids == tuple(map(ord, "Once upon a time"))
    chunks = list(client.completions.create(model="m", prompt=["Once upon a time"], max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 4


def test_models_lists_the_one_model(client, backend):
    listed = client.models.list().data
    assert [(m.id, m.owned_by) for m in listed] == [(backend.model_id, "offload_rt")]
    assert client.models.retrieve(backend.model_id).id == backend.model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("some-other-model")


def test_an_error_mid_stream_reaches_the_client_as_an_error_event(client, backend):
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "CRASH"}], stream=True))
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "ok"}]).choices


@pytest.mark.skipif(not HAS_TOOLCALLS, reason="offload_rt.serve.toolcalls is not merged yet")
def test_tool_calls_whole_and_streamed(client, backend):
    from offload_rt.serve import toolcalls

    backend.tools_format = toolcalls.detect("{% for tool in tools %}<tools>{{ tool }}</tools>{% endfor %}"
                                            "<tool_call>{{ name }}</tool_call>")
    assert backend.tools_format is not None
    backend.script = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=tools)
    assert backend.messages[-1][1] == tools
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model="m", messages=msgs, tools=tools, stream=True))
    names = "".join(tc.function.name or "" for c in chunks for tc in (c.choices[0].delta.tool_calls or []))
    args = "".join(tc.function.arguments or "" for c in chunks for tc in (c.choices[0].delta.tool_calls or []))
    assert names == "get_weather" and json.loads(args) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(model="m", messages=msgs, tools=tools, tool_choice="none")
    assert backend.messages[-1][1] is None  # tool_choice "none": the model is not shown the tools
    assert none.choices[0].message.content == backend.script and none.choices[0].finish_reason == "stop"


@pytest.mark.skipif(not HAS_TOOLCALLS, reason="offload_rt.serve.toolcalls is not merged yet")
def test_bad_tools_are_400(server, backend):
    for tools, choice in [("get_weather", None), ([{"type": "function"}], None), (None, "required")]:
        body = chat_body(tools=tools, tool_choice=choice)
        assert_error(raw(server, "POST", "/v1/chat/completions", body), 400, "invalid_request_error")


# ---- errors over raw HTTP ----------------------------------------------------------------------------------


BAD_CHATS = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
    ({"model": "m"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    (chat_body(max_tokens=-5), "max_tokens"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_tokens=10**9), "max_tokens"),
    (chat_body(max_completion_tokens="ten"), "max_completion_tokens"),
    (chat_body(temperature=5), "temperature"),
    (chat_body(top_p=0), "top_p"),
    (chat_body(n=2), "n"),
    (chat_body(stream="yes"), "stream"),
    (chat_body(seed=1.5), "seed"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat_body(logprobs=True), "logprobs"),
    (chat_body("UNRENDERABLE"), "messages"),
]


@pytest.mark.parametrize("body,param", BAD_CHATS, ids=lambda v: str(v)[:40] if isinstance(v, (bytes, dict)) else v)
def test_bad_chat_requests_get_400_and_the_server_keeps_serving(server, backend, body, param):
    before = len(backend.submitted)
    assert_error(raw(server, "POST", "/v1/chat/completions", body), 400, "invalid_request_error", param)
    assert len(backend.submitted) == before
    status, _, ok = raw(server, "POST", "/v1/chat/completions", chat_body())
    assert status == 200 and ok["choices"][0]["message"]["content"] == SCRIPT


def test_n_above_one_says_it_is_unsupported(server, backend):
    _, _, body = raw(server, "POST", "/v1/chat/completions", chat_body(n=2))
    assert "not supported" in body["error"]["message"]


def test_bad_completion_requests(server, backend):
    assert_error(raw(server, "POST", "/v1/completions", {"model": "m"}), 400, "invalid_request_error", "prompt")
    assert_error(raw(server, "POST", "/v1/completions", {"prompt": [1, 2, 3]}), 400, "invalid_request_error", "prompt")
    assert_error(raw(server, "POST", "/v1/completions", {"prompt": ["a", "b"]}), 400, "invalid_request_error")


def test_a_prompt_longer_than_the_context_is_400(server, backend):
    result = raw(server, "POST", "/v1/completions", {"prompt": "x" * (CONTEXT + 10)})
    assert_error(result, 400, "invalid_request_error", "prompt")
    assert result[2]["error"]["code"] == "context_length_exceeded"


def test_api_key(server, backend):
    assert_error(raw(server, "POST", "/v1/chat/completions", chat_body(), key="wrong"), 401, "authentication_error")
    status, headers, body = raw(server, "GET", "/v1/models", key=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and body["error"]["code"] == "invalid_api_key"
    assert raw(server, "GET", "/metrics", key=None)[0] == 401
    assert raw(server, "GET", "/health", key=None)[:3:2] == (200, {"status": "ok"})
    assert raw(server, "GET", "/v1/models")[0] == 200


def test_without_an_api_key_every_route_is_open():
    with serving(create_app(FakeBackend())) as port:
        assert raw((None, port), "GET", "/v1/models", key=None)[0] == 200
        assert raw((None, port), "POST", "/v1/chat/completions", chat_body(), key=None)[0] == 200


def test_unknown_routes_and_methods(server, backend):
    assert_error(raw(server, "GET", "/v1/nothing-here"), 404, "invalid_request_error")
    status, headers, body = raw(server, "GET", "/v1/chat/completions")
    assert_error((status, headers, body), 405, "invalid_request_error")
    assert "POST" in headers["Allow"]


def test_queue_full_is_503_with_retry_after(server, backend):
    backend.full = True
    status, headers, body = raw(server, "POST", "/v1/chat/completions", chat_body(stream=True))
    assert_error((status, headers, body), 503, "server_error")
    assert headers["Retry-After"] == "7"
    backend.full = False
    assert raw(server, "POST", "/v1/chat/completions", chat_body())[0] == 200


def test_an_unexpected_failure_is_a_generic_500(server, backend):
    status, _, body = raw(server, "POST", "/v1/chat/completions", chat_body("EXPLODE"))
    assert_error((status, None, body), 500, "server_error")
    assert "EXPLODE" not in body["error"]["message"] and "unexpected" not in body["error"]["message"]
    assert raw(server, "POST", "/v1/chat/completions", chat_body())[0] == 200


def test_metrics_are_prometheus_text_from_the_backend(server, backend):
    raw(server, "POST", "/v1/chat/completions", chat_body())
    status, headers, text = raw(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = text.splitlines()
    assert "# TYPE offload_rt_requests_total counter" in lines and "# TYPE offload_rt_queue_depth gauge" in lines
    values = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert int(values["offload_rt_requests_total"]) == len(backend.submitted) > 0
    assert float(values["offload_rt_tokens_per_second"]) == backend.metrics()["tokens_per_second"]


# ---- clients that go away -----------------------------------------------------------------------------------


def wait_for(predicate, what: str, seconds: float = 15):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_client_leaving_mid_stream_cancels_its_request(server, backend):
    before = len(backend.cancelled)
    conn = http.client.HTTPConnection("127.0.0.1", server[1], timeout=20)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body("SLOW", stream=True)),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    handle_count = len(backend.submitted)
    resp.close()
    conn.close()
    wait_for(lambda: len(backend.cancelled) > before, "the backend's handle was never cancelled")
    assert backend.cancelled[-1].request is backend.submitted[handle_count - 1]


def test_a_client_leaving_before_a_whole_answer_cancels_its_request(server, backend):
    before, submitted = len(backend.cancelled), len(backend.submitted)
    body = json.dumps(chat_body("SLOW")).encode()
    sock = socket.create_connection(("127.0.0.1", server[1]), timeout=20)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: len(backend.submitted) > submitted, "the request never reached the backend")
    sock.close()
    wait_for(lambda: len(backend.cancelled) > before, "the backend's handle was never cancelled")


# ---- protocol and metrics without a server --------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": ["hi"]}, "messages[0]"),
    (chat_body(stream_options={"include_usage": "yes"}, stream=True), "stream_options.include_usage"),
    (chat_body(top_p=1.5), "top_p"),
    (chat_body(temperature=-0.1), "temperature"),
    (chat_body(temperature=True), "temperature"),
    (chat_body(stop=5), "stop"),
    (chat_body(response_format={"type": "json_object"}), "response_format"),
    (chat_body(max_tokens=CONTEXT + 1), "max_tokens"),
])
def test_parse_chat_rejects(body, param):
    with pytest.raises(BadRequest) as e:
        protocol.parse_chat(body, CONTEXT)
    assert e.value.param == param and e.value.message


def test_parse_chat_accepts_and_normalises():
    call = protocol.parse_chat({
        "messages": [
            {"role": "developer", "content": "sys"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        "max_tokens": 10, "max_completion_tokens": 20, "stop": "END", "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }, CONTEXT)
    assert [m["role"] for m in call.messages] == ["system", "assistant", "tool"]
    assert call.messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert call.messages[1]["content"] == "" and call.messages[2]["tool_call_id"] == "c1"
    opts = call.options
    assert (opts.max_tokens, opts.stop, opts.temperature, opts.stream, opts.include_usage) == (20, ("END",), 0.0,
                                                                                              True, True)
    req = opts.gen_request([1, 2, 3], CONTEXT)
    assert req.prompt_ids == (1, 2, 3) and req.max_tokens == 20


def test_metrics_render_types_and_values():
    text = metrics.render({"requests_total": 3, "tokens_per_second": 2.5, "batch_size": 0, "new_figure": 1,
                           "label": "skip me"})
    lines = text.splitlines()
    assert lines.count("# TYPE offload_rt_requests_total counter") == 1
    assert "offload_rt_requests_total 3" in lines and "offload_rt_tokens_per_second 2.5" in lines
    assert "# TYPE offload_rt_new_figure gauge" in lines and "skip me" not in text
    assert not any("queue_depth" in line for line in lines)  # not reported: not invented
