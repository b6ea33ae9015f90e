"""One self-erasing status line on a terminal, shown only until an answer's first token.

Chat tools show progress where the answer will appear and take it away before the text
starts; nothing is printed per token, so the answer's text is never split. Here:

* while the prompt is processed: ``prefill 1024/6000 tokens (310 tok/s)`` (long prompts);
* when the first token takes longer than ``delay`` seconds (streaming a model from disk,
  a busy machine): ``waiting for the first token… 3 s``, updated once a second;
* the line is erased (carriage return + erase-line) before the first piece of text is
  written, and when the answer ends or is interrupted.

Only when stderr is a terminal: piped stderr (scripts, ``--stats`` readers) gets nothing.
A lock orders the ticker thread's writes with :meth:`StatusLine.clear`, so no status text
can land after the answer has started.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterator, TextIO

ERASE = "\r\x1b[2K"


class StatusLine:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, delay: float = 1.0):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None or enabled:
            try:
                enabled = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.delay = delay
        self._lock = threading.Lock()
        self._shown = False
        self._done = threading.Event()
        self._prefill: str | None = None
        self._ticker: threading.Thread | None = None

    def show(self, text: str) -> None:
        with self._lock:
            if not self.enabled or self._done.is_set():
                return
            self.stream.write(ERASE + text)
            self.stream.flush()
            self._shown = True

    def clear(self) -> None:
        """Erase the line and show nothing more (idempotent)."""
        with self._lock:
            self._done.set()
            if self._shown:
                self.stream.write(ERASE)
                self.stream.flush()
                self._shown = False

    def prefill_progress(self):
        """A callback for Engine.prefill: ``(done, total)`` tokens."""
        start = time.perf_counter()

        def report(done: int, total: int) -> None:
            rate = done / max(1e-9, time.perf_counter() - start)
            self._prefill = f"prefill {done}/{total} tokens ({rate:.0f} tok/s)"
            self.show(self._prefill)

        return report

    def _tick(self) -> None:
        start = time.perf_counter()
        wait = self.delay
        while not self._done.wait(wait):
            wait = 1.0
            if self._prefill is None:  # a long prompt shows its own progress instead
                self.show(f"waiting for the first token… {time.perf_counter() - start:.0f} s")

    def until_first_token(self, pieces: Iterator[str]) -> Iterator[str]:
        """Pass ``pieces`` through; the status line lives until the first one (or the end)."""
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="offload-status", daemon=True)
            self._ticker.start()
        try:
            for piece in pieces:
                self.clear()
                yield piece
        finally:
            self.clear()
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # an abandoned answer (Ctrl-C in the REPL) ends the generation too
