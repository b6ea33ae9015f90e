"""``offload-run serve``: an OpenAI-compatible HTTP server over one loaded model (continuous batching).

:func:`main` builds the model once (:func:`offload_rt.build.build`, planning ``--parallel`` sequences'
KV and the prefix cache), runs the batch loop (:mod:`offload_rt.serve.backend`) on the main thread and
serves the HTTP API (:mod:`offload_rt.serve.http`) with uvicorn in another thread until SIGINT or
SIGTERM: then it stops accepting, lets in-flight requests finish (up to :data:`GRACE_S`, then cancels
them), flushes the prefix cache and exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

GRACE_S = 30  # seconds in-flight requests get to finish after SIGINT/SIGTERM


def prefix_root(cfg, store) -> object:
    """Where the prefix cache persists: ``<offload-dir>/prefix-cache/<store dir name>/`` (``offload-run prune``
    removes it with its store)."""
    from offload_rt.config import PREFIX_CACHE_DIR

    return cfg.store_dir / PREFIX_CACHE_DIR / store.path.name


PREFIX_DISK_RAM_RATIO = 16  # the prefix cache's disk share: this many times its RAM share ...
PREFIX_DISK_FREE_SHARE = 0.2  # ... and at most this share of the free disk


def prefill_pass(prefill_chunk: int, kv_chunk: int) -> tuple[int, int]:
    """The server's prefill pass and prefix-cache granule, in tokens, given ``--prefill-chunk`` and the KV chunk.

    A restored prefix must end where a prefill pass of the uncached prompt ends, so that the passes left
    to run are the uncached run's and the answer's bits are the same (``Engine.prefill``): passes run
    at multiples of the pass size from the sequence's start, and the granule (what a lookup rounds down
    to) is the KV chunk (entries are whole chunks), so the pass is the largest divisor of the KV chunk
    not above ``prefill_chunk``: the KV chunk itself by default (a cached prefix then misses less than
    one chunk, not a whole 512-token pass; its price is more, smaller passes: docs/BENCHMARKS.md, S3)."""
    step = next(d for d in range(min(max(1, prefill_chunk), kv_chunk), 0, -1) if kv_chunk % d == 0)
    return step, kv_chunk


def open_prefix_cache(rt):
    """The prefix cache of this model and store: RAM as planned (``Prepared.prefix_bytes``), persisted under
    ``<offload-dir>/prefix-cache/<store>/`` (None when the plan left it no RAM). Its granule comes from
    :func:`prefill_pass`: a reused prefix leaves the same prefill passes to run, so the answer's bits are
    those of an uncached prompt."""
    import shutil

    from offload_rt.errors import UsageError
    from offload_rt.kv.prefix import PrefixCache, model_identity

    prepared, model, engine = rt.prepared, rt.model, rt.engine
    if not prepared.prefix_bytes:
        return None
    chunk = prepared.kv.shape.chunk_tokens
    _, granule = prefill_pass(engine.prefill_chunk, chunk)
    root = prefix_root(rt.cfg, model.store)
    from offload_rt.runtime import kv_dtypes

    kv_dtype, quant = kv_dtypes(rt.cfg, model.args, model.dtype)
    identity = {**model_identity(model.store, model.args, kv_dtype, rt.cfg.kv_dtype if quant else None),
                "device": rt.device}
    try:
        root.mkdir(parents=True, exist_ok=True)
        disk = min(PREFIX_DISK_RAM_RATIO * prepared.prefix_bytes, int(PREFIX_DISK_FREE_SHARE * shutil.disk_usage(root).free))
        return PrefixCache(root, identity, chunk_tokens=chunk, ram_bytes=prepared.prefix_bytes, disk_bytes=disk,
                           granule=granule)
    except OSError as e:
        raise UsageError(f"cannot keep the prefix cache in {root}: {e.strerror or e}; choose a writable "
                         "--offload-dir") from None


def describe(rt, host: str, port: int) -> str:
    p = rt.prepared
    ctx = rt.engine.max_tokens if rt.engine is not None else p.kv.tokens
    return (f"serving {rt.model.name} on http://{host}:{port}/v1 ({p.sequences} sequences in parallel, "
            f"{ctx} tokens of context each; Ctrl-C stops)")


def main(cfg, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None, queue_depth: int = 64,
         plan_only: bool = False, defaults: dict | None = None) -> int:
    """Serve until SIGINT/SIGTERM; 0 when stopped so. ``defaults``: request fields (temperature, top_p, seed,
    max_tokens, stop) a request that leaves them out gets (the command line's given options)."""
    import torch

    from offload_rt.build import build
    from offload_rt.errors import UsageError

    if cfg.draft is not None:
        raise UsageError("--draft is not supported by serve yet (speculation runs one sequence at a time); "
                         "drop --draft")
    sock = None if plan_only else listen(host, port)  # before the model loads: a taken port fails at once
    with torch.inference_mode():
        rt = build(cfg, plan_only=plan_only, serving=True)
    if plan_only:
        from offload_rt.app import print_plan

        print_plan(rt, stats=False)
        print(f"serve: {rt.prepared.sequences} sequences in parallel (--parallel), prefix cache "
              f"{_mib(rt.prepared.prefix_bytes)} of RAM")
        return 0
    import uvicorn

    from offload_rt.serve.backend import BatchBackend
    from offload_rt.serve.http import create_app

    try:
        prefix = open_prefix_cache(rt)
    except BaseException:
        rt.close()
        raise
    backend = BatchBackend(rt, model_id=rt.model.name, queue_depth=queue_depth, prefix=prefix)
    app = create_app(backend, api_key=api_key, defaults=defaults)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S,
                            lifespan="off")
    server = uvicorn.Server(config)
    failed: list[BaseException] = []

    def serve_http() -> None:  # uvicorn's event loop, in its own thread; its end ends the batch loop
        try:
            server.run(sockets=[sock])
        except BaseException as e:
            failed.append(e)
        finally:
            backend.stop()

    http = threading.Thread(target=serve_http, name="offload-http", daemon=True)
    try:
        with _stop_signals(server):
            print(f"offload-run: {describe(rt, host, sock.getsockname()[1])}", file=sys.stderr, flush=True)
            http.start()
            backend.run()  # the model's steps on the main thread, the one that built it (BatchBackend.run)
            while http.is_alive():  # the loop ended on an error: HTTP answers 500s until a signal stops it
                http.join(0.5)
    finally:
        server.should_exit = True
        http.join(GRACE_S + 5)
        backend.stop()
        if prefix is not None:
            prefix.close()
        rt.close()
        sock.close()
    if failed:
        raise failed[0]
    return 0


def listen(host: str, port: int):
    """The server's listening socket (port 0: any free one); a UsageError when it cannot be had."""
    import socket

    from offload_rt.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}; pass an address of this machine (e.g. 127.0.0.1)") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (or --host)") from None
    sock.set_inheritable(True)
    return sock


def _mib(n: int) -> str:
    from offload_rt.config import format_size

    return format_size(n)


@contextlib.contextmanager
def _stop_signals(server):
    """SIGINT/SIGTERM (handled on the main thread, which runs the batch loop) ask uvicorn, in its thread, for a
    graceful stop: it stops accepting, in-flight requests finish (up to :data:`GRACE_S`), and the process
    exits 0 (uvicorn's own handlers would re-raise the signal: exit 130/143); a second SIGINT stops at once."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in sigs}

    def stop(sig, frame):
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True
        print("offload-run: stopping: finishing the requests in flight", file=sys.stderr, flush=True)

    for s in sigs:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
