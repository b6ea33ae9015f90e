"""Chrome trace events (JSON ``traceEvents``), one track per resource.

Tracks: ``disk`` (reads from the weight store), ``h2d`` (host->device copies),
``compute`` (model work and waits), ``cpu_attn`` (CPU attention kernels). Complete
events ("X") carry ``args`` such as ``{"group": "layer.3", "bytes": 12345}``; counter
events ("C") named ``occupancy`` carry bytes per tier. ``otherData`` holds run metadata
(model, placement, measured peak bandwidths in bytes/s) for ``tools.report``.
The file opens as is in Perfetto and chrome://tracing.

On a GPU the work a span wraps is only *queued* when its body returns: the span would time
the enqueue. ``Tracer(synchronize=...)`` waits for the device at the start and end of each
span on the ``compute`` and ``h2d`` tracks (a disk read queues nothing, and its thread must
not wait for the GPU), so those spans time the device work. Only for ``--profile`` on CUDA:
each wait is a round trip to the device (tens of µs) and stalls the CPU until the queue
drains, so a profiled run is slower than an unprofiled one. Pass a wait on the *current
stream* (:func:`current_stream_sync`), not a device-wide synchronize: h2d spans then wait
for the copy stream only and compute spans for the compute stream, so copies still overlap
compute as in a real run. For that a span must be opened inside the ``torch.cuda.stream``
context whose work it times (the current stream is per thread and per context).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

TRACKS = {"compute": 1, "disk": 2, "h2d": 3, "cpu_attn": 4, "kv_disk": 5, "spec": 6}


class Tracer:
    """Collects events in memory (cheap, thread-safe append) and writes them once at the end."""

    def __init__(self, synchronize: Callable[[], None] | None = None,
                 sync_tracks: frozenset[str] = frozenset({"compute", "h2d"})):
        self.synchronize = synchronize  # called at the start and end of spans on sync_tracks (module docstring)
        self.sync_tracks = sync_tracks  # tracks whose spans queue device work (disk reads queue none)
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.meta: dict = {}
        self._lock = threading.Lock()
        self.pid = os.getpid()

    def now_us(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6

    def complete(self, track: str, name: str, start_us: float, end_us: float, **args) -> None:
        ev = {"name": name, "ph": "X", "pid": self.pid, "tid": TRACKS[track], "ts": round(start_us, 3),
              "dur": round(max(0.0, end_us - start_us), 3), "cat": track}
        if args:
            ev["args"] = args
        with self._lock:
            self.events.append(ev)

    @contextmanager
    def span(self, track: str, name: str, **args):
        sync = self.synchronize if track in self.sync_tracks else None
        if sync is not None:
            sync()  # work queued before the span is not the span's
        start = self.now_us()
        try:
            yield args  # the caller may add args (e.g. bytes) before the span closes
        finally:
            if sync is not None and sys.exc_info()[0] is None:
                sync()  # the span ends when its queued work has run (not after a failure: keep that error)
            self.complete(track, name, start, self.now_us(), **args)

    def counter(self, name: str, **values) -> None:
        ev = {"name": name, "ph": "C", "pid": self.pid, "ts": round(self.now_us(), 3), "args": values}
        with self._lock:
            self.events.append(ev)

    def instant(self, track: str, name: str, **args) -> None:
        ev = {"name": name, "ph": "i", "s": "t", "pid": self.pid, "tid": TRACKS[track], "ts": round(self.now_us(), 3),
              "args": args}
        with self._lock:
            self.events.append(ev)

    def to_json(self) -> dict:
        names = [{"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid, "args": {"name": track}}
                 for track, tid in TRACKS.items()]
        names.append({"name": "process_name", "ph": "M", "pid": self.pid, "args": {"name": "offload_rt"}})
        with self._lock:
            events = list(self.events)
        return {"traceEvents": names + events, "displayTimeUnit": "ms", "otherData": self.meta}

    def write(self, path: Path) -> None:
        """Write atomically (temp file + rename): a failed run leaves no half trace."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)


def current_stream_sync(device) -> Callable[[], None]:
    """A ``Tracer(synchronize=...)`` for CUDA: wait for the calling thread's current stream on ``device``."""
    import torch

    return lambda: torch.cuda.current_stream(device).synchronize()


class NullTracer:
    """Tracing off: the same calls, doing nothing."""

    meta: dict = {}

    def now_us(self) -> float:
        return 0.0

    def complete(self, *a, **k) -> None:
        pass

    @contextmanager
    def span(self, track, name, **args):
        yield args

    def counter(self, *a, **k) -> None:
        pass

    def instant(self, *a, **k) -> None:
        pass
