"""The slot ring and its reader thread: fill reusable buffers ahead of the compute that needs them.

One mechanism for everything the runtime streams: the weights' disk (and host→device)
fetches (:mod:`offload_rt.scheduler`) and the KV cache's disk chunks
(:mod:`offload_rt.kv.tiered`). The reader thread takes work items in order, waits for a
free slot, fills it (``fill(item, slot)`` runs on the thread and returns a payload, e.g. a
copy event), and publishes it under the item's sequence number. The consumer takes
sequence numbers 0, 1, 2... in order and releases each slot when done with it, which
lets the reader reuse it. Nothing is allocated per item: the slots are the caller's.

Items come from an iterator: an endless cycle (weights: every pass sweeps the same
groups, so the reader runs ahead across passes) or :meth:`Prefetcher.submit` (KV: the
chunks a layer needs are known when its attention is about to run).
"""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from typing import Any, Callable, Iterable

_SUBMITTED = object()  # items come from submit()


class Prefetcher:
    """``n_slots`` slots filled ahead of the consumer by one thread, in item order."""

    def __init__(self, n_slots: int, fill: Callable[[Any, int], Any], items: Iterable | None = None, *,
                 name: str = "offload-prefetch", context: Callable[[], Any] = nullcontext):
        self._fill = fill
        self._context = context  # entered on the thread (inference mode, CUDA device: offload_rt.accel)
        self._items = iter(items) if items is not None else None
        self._work: queue.Queue = queue.Queue()
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n_slots):
            self._free.put(i)
        self._ready: dict[int, tuple[int, Any]] = {}  # seq -> (slot, payload)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.submitted = 0  # items handed to submit() so far (the next one's sequence number)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item) -> int:
        """Queue one item (only without an ``items`` iterator); returns its sequence number."""
        self._work.put(item)
        self.submitted += 1
        return self.submitted - 1

    def _next_item(self):
        if self._items is not None:
            return next(self._items)
        while not self._stop.is_set():
            try:
                return self._work.get(timeout=0.1)
            except queue.Empty:
                continue
        return _SUBMITTED

    def _loop(self) -> None:
        try:
            with self._context():
                seq = 0
                while not self._stop.is_set():
                    item = self._next_item()
                    if item is _SUBMITTED:
                        return
                    slot = None
                    while slot is None and not self._stop.is_set():
                        try:
                            slot = self._free.get(timeout=0.1)
                        except queue.Empty:
                            continue
                    if slot is None:
                        return
                    payload = self._fill(item, slot)
                    with self._cond:
                        self._ready[seq] = (slot, payload)
                        self._cond.notify_all()
                    seq += 1
        except StopIteration:
            return
        except BaseException as e:  # surfaced on the consumer's side
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def ready(self, seq: int) -> bool:
        with self._cond:
            return seq in self._ready

    def take(self, seq: int, waiting: Callable[[], Any] = nullcontext) -> tuple[int, Any]:
        """(slot, payload) of item ``seq``, waiting for the reader (inside ``waiting()``, e.g. a trace span)."""
        with self._cond:
            if seq not in self._ready and self._error is None:
                with waiting():
                    while seq not in self._ready and self._error is None:
                        self._cond.wait(0.5)
            if self._error is not None:
                raise self._error
            return self._ready.pop(seq)

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
