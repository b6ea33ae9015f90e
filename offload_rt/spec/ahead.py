"""Overlapped drafting's thread: the draft grows on while the target's verification pass runs.

A streamed target's pass mostly waits for its weights to arrive from disk; the draft is resident
and needs only the cores. :class:`GrowAhead` runs a growth function (the step's search resumed
past its budget, :meth:`offload_rt.spec.tree.Grower.run`) on a thread from the moment the tree
is handed to the target until :meth:`finish`, which asks it to stop before its next draft call
and waits for the call in flight: only then may anything else touch the draft (its engine and
cache are not shared during the pass, and are whole again after it).

The thread computes with ``threads`` threads (Numba's count is per thread; torch's intra-op count
is set on the draft engine for the pass, which nothing else runs meanwhile), leaving the rest of
the cores to the target's layers and the reader. An error on the thread (or a KeyboardInterrupt a
test injects there) is kept and raised by :meth:`reraise` once the step has put the caches in order.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch


class GrowAhead:
    """``grow(stop)`` on a thread until :meth:`finish`; ``stop()`` turns True once finish is called."""

    def __init__(self, grow: Callable[[Callable[[], bool]], int], *, threads: int = 1, engine=None):
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.seconds = 0.0  # the thread's time spent growing
        self.calls = 0
        self._engine = engine
        self._prefill_threads = getattr(engine, "prefill_threads", None)
        if engine is not None:
            engine.prefill_threads = threads  # batched draft passes: torch's threads for the pass
        self._thread = threading.Thread(target=self._run, args=(grow, threads), name="offload-draft-ahead",
                                        daemon=True)
        self._thread.start()

    def _run(self, grow, threads: int) -> None:
        t0 = time.perf_counter()
        try:
            import numba

            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # this thread's own
            with torch.inference_mode():  # per thread, like the engines' tensors were made
                self.calls = grow(self._stop.is_set)
        except BaseException as e:  # raised on the caller's side (reraise)
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0

    def finish(self, *, complete: bool = False) -> None:
        """Stop before the next draft call and wait for the one in flight (a Ctrl-C meanwhile waits too:
        the draft's cache must not be in use when the caller goes on). ``complete``: let the growth run
        to its own end first (tests: a carried tree that does not depend on timing)."""
        try:
            if complete:
                self._join()
            self._stop.set()
            self._join()
        finally:
            if self._engine is not None:
                self._engine.prefill_threads = self._prefill_threads

    def _join(self) -> None:
        interrupted = None
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt as e:  # pragma: no cover - a second Ctrl-C while the thread ends
                interrupted = e
                self._stop.set()
        if interrupted is not None:
            raise interrupted

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error
