"""``offload-run serve`` in a subprocess on a free port, as a user starts it, and clients for it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from tests.cli_helpers import default_sigint

READY = re.compile(r"serving .* on (http://[^ ]+/v1)")


class Server:
    """``with Server("--offload-dir", d) as s:`` — s.url (…/v1), s.stderr (lines so far), s.stop() -> status."""

    def __init__(self, *args, timeout: float = 300, env: dict | None = None):
        e = dict(os.environ)
        e.setdefault("OFFLOAD_RT_BANDWIDTHS", "disk=1.3e9,mem=2.4e10,matvec=1.5e10")
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "offload_rt", "serve", "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                                     preexec_fn=default_sigint)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._drain, daemon=True).start()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + self.stderr)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = READY.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # the process ended before it was ready

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    # ------------------------------------------------------------------ clients
    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=300)

    def post(self, path: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of a raw POST (body: bytes as is, else JSON)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=60) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.removeprefix("offload_rt_")] = float(value)
        return out


def chat(client, content: str | list, max_tokens: int = 24, stream: bool = False, **kw):
    """Greedy chat answer text (streamed: the deltas joined) and the usage (None when streamed without it)."""
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    r = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=max_tokens,
                                       stream=stream, **kw)
    if not stream:
        return r.choices[0].message.content, r.usage
    text, usage = "", None
    for chunk in r:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def serve_in_process(backend, requests) -> list:
    """Each request's :class:`~offload_rt.serve.types.Done` from an in-process backend, the requests submitted
    together: the batch loop on this thread (as ``offload-run serve`` runs it), their event loop in another.
    The backend is stopped afterwards (one use)."""
    import asyncio

    done: list = [None] * len(requests)
    failed: list[BaseException] = []

    async def answers() -> None:
        async def one(i, request):
            async for event in backend.submit(request).events():
                done[i] = event  # the last one is the Done
        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    def client() -> None:
        try:
            asyncio.run(answers())
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            failed.append(e)
        finally:
            backend.stop()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    backend.run()
    thread.join(60)
    if failed:
        raise failed[0]
    assert backend.error is None, backend.error
    return done
