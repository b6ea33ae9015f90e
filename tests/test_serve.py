"""``offload-run serve`` with the default model, through the official ``openai`` client.

One server (resident weights, 4 sequences) answers most tests; others start where a test needs another
set-up (weights streamed under a budget, a restart, another model's store). Greedy answers are compared
token for token: a request batched with others gives exactly what it gives alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import signal
import urllib.parse

import pytest

from tests.serve_helpers import Server, chat, wait_for

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers.",
             "Explain gravity to a child.", "Name a color of the sky at sunset.", "What do bees make?"]
# a long shared prefix (a system prompt of ~1,300 tokens): the prefix cache's case
LONG_SYSTEM = "You are a helpful assistant for a library. " + " ".join(
    f"Rule {i}: books in section {i} are shelved by author surname and returned within {i % 7 + 7} days."
    for i in range(60))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-stores")


@pytest.fixture(scope="module")
def server(store_dir):
    with Server("--offload-dir", store_dir, "--parallel", "4") as s:
        yield s


@pytest.fixture(scope="module")
def alone(server):
    """Each question's greedy answer asked alone (24 tokens)."""
    c = server.client()
    return {q: chat(c, q)[0] for q in QUESTIONS}


def test_chat_stream_completions_models_usage(server, alone):
    c = server.client()
    text, usage = chat(c, QUESTIONS[0])
    assert text == alone[QUESTIONS[0]] and "Paris" in text
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    streamed, s_usage = chat(c, QUESTIONS[0], stream=True, stream_options={"include_usage": True})
    assert streamed == text
    assert s_usage.completion_tokens == usage.completion_tokens
    r = c.completions.create(model="m", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    # stop strings end the text before them
    stopped, _ = chat(c, QUESTIONS[0], stop=["Paris"])
    assert "Paris" not in stopped and alone[QUESTIONS[0]].startswith(stopped)


def test_concurrent_requests_give_what_each_gives_alone(server, alone):
    c = server.client()
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as ex:  # 6 requests, 4 slots: two wait in the queue
        got = list(ex.map(lambda q: chat(c, q)[0], QUESTIONS))
    assert got == [alone[q] for q in QUESTIONS]
    m = server.metrics()
    assert m["requests_total"] >= 2 * len(QUESTIONS) and m["steps_total"] > 0


def test_requests_of_different_lengths_join_and_leave_mid_batch(server, alone):
    """Staggered lengths: short answers leave while long ones run, queued ones join mid-batch."""
    c = server.client()
    lengths = [4, 24, 9, 16, 24, 2]
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as ex:
        got = list(ex.map(lambda qn: chat(c, qn[0], max_tokens=qn[1]), zip(QUESTIONS, lengths)))
    tok = _token_counts(server, alone)
    for (q, n), (text, usage) in zip(zip(QUESTIONS, lengths), got):
        assert usage.completion_tokens == min(n, tok[q])
        assert alone[q].startswith(text), (q, n, text)


def _token_counts(server, alone):
    c = server.client()
    return {q: chat(c, q)[1].completion_tokens for q in alone}


def test_disconnect_mid_stream_frees_the_slot_and_leaves_others_unchanged(server, alone):
    before = server.metrics()
    u = urllib.parse.urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 2000, "temperature": 0, "stream": True}
    conn.request("POST", u.path + "/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    c = server.client()
    with cf.ThreadPoolExecutor(3) as ex:
        others = [ex.submit(chat, c, q) for q in QUESTIONS[:3]]
        assert resp.read(6) == b"data: "  # the stream has begun (read through the chunked encoding)
        conn.close()  # the client goes away mid-answer
        got = [f.result()[0] for f in others]
    assert got == [alone[q] for q in QUESTIONS[:3]]
    wait_for(lambda: server.metrics()["requests_cancelled_total"] > before["requests_cancelled_total"],
             what="the cancelled request to be counted")
    wait_for(lambda: server.metrics()["requests_active"] == 0, what="every slot to be free")


def test_prompt_longer_than_the_context_is_a_400_and_the_server_goes_on(server, alone):
    status, body, _ = server.post("/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "word " * 5000}], "max_tokens": 4})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "context" in body["error"]["message"]
    status, body, _ = server.post("/chat/completions", {"model": "m", "messages": [{"role": "bogus", "content": "x"}]})
    assert status == 400 and "role" in body["error"]["message"]
    assert chat(server.client(), QUESTIONS[0])[0] == alone[QUESTIONS[0]]


def test_prefix_cache_reuse_restart_and_identity(server, store_dir):
    c = server.client()
    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": QUESTIONS[2]}]
    first, u1 = chat(c, messages)
    assert u1.prompt_tokens > 1024 and u1.prompt_tokens_details.cached_tokens == 0
    second, u2 = chat(c, messages)
    assert second == first
    # the granule is the KV chunk (256 tokens here), not the 512-token prefill chunk: at most a chunk is redone
    cached = u2.prompt_tokens_details.cached_tokens
    assert cached % 256 == 0 and u2.prompt_tokens - 256 <= cached < u2.prompt_tokens
    assert server.metrics()["prefix_cache_hits_total"] >= 1
    # another question after the same system prompt reuses it too
    other = [messages[0], {"role": "user", "content": QUESTIONS[3]}]
    assert chat(c, other)[1].prompt_tokens_details.cached_tokens >= 1024
    # a restart finds the prefix on disk
    assert server.stop(signal.SIGTERM) == 0
    with Server("--offload-dir", store_dir, "--parallel", "2") as again:
        third, u3 = chat(again.client(), messages)
        assert third == first and u3.prompt_tokens_details.cached_tokens >= 1024
        assert again.stop(signal.SIGINT) == 0
    # another store (the same checkpoint in int8) never matches this one's prefixes
    with Server("--offload-dir", store_dir, "--weights", "int8", "--parallel", "1") as other_model:
        _, u4 = chat(other_model.client(), messages)
        assert u4.prompt_tokens_details.cached_tokens == 0


def test_streamed_weights_batched_equal_alone_within_the_memory_promise(store_dir):
    """Weights streamed from disk under a budget, 4 sequences: the same texts alone and together, and the
    process's peak RSS within baseline + --cpu-mem + slack."""
    with Server("--offload-dir", store_dir, "--weights", "f32", "--cpu-mem", "420M", "--parallel", "4",
                "--ctx-size", "1024") as s:
        c = s.client()
        alone = [chat(c, q, max_tokens=12)[0] for q in QUESTIONS[:4]]
        with cf.ThreadPoolExecutor(4) as ex:
            together = list(ex.map(lambda q: chat(c, q, max_tokens=12)[0], QUESTIONS[:4]))
        assert together == alone
        m = s.metrics()
        assert m["peak_rss_bytes"] <= m["baseline_rss_bytes"] + m["host_budget_bytes"] + m["runtime_slack_bytes"], m
        # the weights did stream: every step read layers from the store
        assert m["weight_disk_read_bytes_total"] > 20 * 100e6, m
        assert s.stop() == 0


def test_prefix_cache_over_q4_kv_keeps_its_records(store_dir):
    """--kv-dtype q4: a repeated long prompt reuses its prefix with the same answer, and each entry file holds a
    chunk's q4 records (the bytes their record shape says), not rows. (Restoring records from disk after a
    restart, bit for bit: tests/test_prefix_cache.py.)"""
    from kernels_cpu.kv_quant import KVQuant
    from offload_rt.kv.prefix import IDENTITY_FILE, MAGIC, SUFFIX

    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    with Server("--offload-dir", store_dir, "--kv-dtype", "q4", "--parallel", "1") as s:
        first, _ = chat(s.client(), messages, max_tokens=8)
        second, u2 = chat(s.client(), messages, max_tokens=8)
        assert second == first and u2.prompt_tokens_details.cached_tokens >= 1024
        assert s.stop() == 0
    roots = [p.parent for p in store_dir.glob(f"prefix-cache/*/{IDENTITY_FILE}")
             if json.loads(p.read_text())["identity"].get("kv_quant") == "q4"]
    assert len(roots) == 1
    ident = json.loads((roots[0] / IDENTITY_FILE).read_text())["identity"]
    shape = KVQuant("q4", ident["head_dim"], ident["chunk_tokens"]).record_shape(ident["kv_heads"])
    entry = 2 * ident["layers"] * shape[0] * shape[1] * shape[2]
    files = list(roots[0].glob("*" + SUFFIX))
    assert len(files) >= 4
    for f in files:
        data = f.read_bytes()
        assert len(data) == len(MAGIC) + 4 + int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little") + entry
