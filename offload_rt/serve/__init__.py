"""``offload-run serve``: an OpenAI-compatible HTTP server over one loaded model (continuous batching).

:func:`main` builds the model once (:func:`offload_rt.build.build`, planning ``--parallel`` sequences'
KV and the prefix cache), starts the batch thread (:mod:`offload_rt.serve.backend`) and serves the
HTTP API (:mod:`offload_rt.serve.http`) with uvicorn until SIGINT or SIGTERM: then it stops accepting,
lets in-flight requests finish (up to :data:`GRACE_S`, then cancels them), flushes the prefix cache
and exits 0.
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


def open_prefix_cache(rt):
    """The prefix cache of this model and store: RAM as planned (``Prepared.prefix_bytes``), persisted under
    ``<offload-dir>/prefix-cache/<store>/`` (None when the plan left it no RAM). Its granule is the prefill
    chunk (when a multiple of the KV chunk): a reused prefix leaves the same prefill passes to run, so the
    answer's bits are those of an uncached prompt."""
    import shutil

    from offload_rt.errors import UsageError
    from offload_rt.kv.prefix import PrefixCache, model_identity

    prepared, model, engine = rt.prepared, rt.model, rt.engine
    if not prepared.prefix_bytes:
        return None
    chunk = prepared.kv.shape.chunk_tokens
    granule = engine.prefill_chunk if engine.prefill_chunk % chunk == 0 else chunk
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
    server = _Server(config)
    backend.start()
    try:
        print(f"offload-run: {describe(rt, host, sock.getsockname()[1])}", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        backend.stop()
        if prefix is not None:
            prefix.close()
        rt.close()
        sock.close()
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


class _Server:
    """uvicorn's server with our signal handling: SIGINT/SIGTERM ask for a graceful stop and the process
    exits 0 afterwards (uvicorn re-raises the captured signal, which would exit 130/143); a second
    SIGINT stops at once."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                sigs = (signal.SIGINT, signal.SIGTERM)
                before = {s: signal.getsignal(s) for s in sigs}

                def stop(sig, frame):
                    if self.should_exit and sig == signal.SIGINT:
                        self.force_exit = True
                    self.should_exit = True
                    print("offload-run: stopping: finishing the requests in flight", file=sys.stderr, flush=True)

                for s in sigs:
                    signal.signal(s, stop)
                try:
                    yield
                finally:
                    for s, h in before.items():
                        signal.signal(s, h)

        return Server(config)
