"""Chrome trace events (JSON ``traceEvents``), one track per resource.

Tracks: ``disk`` (reads from the weight store), ``h2d`` (host->device copies),
``compute`` (model work and waits), ``cpu_attn`` (CPU attention kernels). Complete
events ("X") carry ``args`` such as ``{"group": "layer.3", "bytes": 12345}``; counter
events ("C") named ``occupancy`` carry bytes per tier. ``otherData`` holds run metadata
(model, placement, measured peak bandwidths in bytes/s) for ``tools.report``.
The file opens as is in Perfetto and chrome://tracing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TRACKS = {"compute": 1, "disk": 2, "h2d": 3, "cpu_attn": 4}


class Tracer:
    """Collects events in memory (cheap, thread-safe append) and writes them once at the end."""

    def __init__(self):
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
        start = self.now_us()
        try:
            yield args  # the caller may add args (e.g. bytes) before the span closes
        finally:
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
