"""Autoregressive generation over an :class:`~offload_rt.engine.Engine`, streamed as text."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from offload_rt.engine import Engine
from offload_rt.errors import ContextLengthError
from offload_rt.sampling import Sampler
from offload_rt.tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenResult:
    """What one answer cost; filled in while the generator runs."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # "eos" | "stop_string" | "max_new_tokens" | "context" | "interrupted"
    token_ids: list[int] = field(default_factory=list)
    text: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes from the prefill's logits; decode covers the rest.
        n = max(0, self.new_tokens - 1)
        return n / self.decode_s if self.decode_s else 0.0


def check_context(prompt_len: int, context: int) -> None:
    if prompt_len >= context:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but the context is {context} tokens; shorten the prompt "
            "or raise --ctx-size (up to the model's context length)"
        )


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could start a stop string (kept back from the stream)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class TextStream:
    """Token ids turned into the answer's text as they come: EOS, stop strings (text that could begin one
    is held back until decided; the stop string itself is never shown), incomplete UTF-8 held back.

    :meth:`push` returns the new text a token makes showable and sets :attr:`stop_reason` ("eos",
    "stop_string") when the answer ends there; :meth:`finish` returns what was held back at the end.
    The one-shot CLI, the REPL and each request of the server use it.
    """

    def __init__(self, tok: Tokenizer, stop_strings: Sequence[str] = (), ignore_eos: bool = False,
                 keep: frozenset[int] = frozenset()):
        self.tok, self.stops, self.ignore_eos = tok, tuple(stop_strings), ignore_eos
        self.dec = StreamDecoder(tok, keep)  # keep: special tokens shown (a tool-call parser's markers)
        self.emitted = 0  # characters of dec.text already returned
        self.token_ids: list[int] = []  # the answer's tokens (an EOS that ended it excluded)
        self.stop_reason: str | None = None

    def push(self, tid: int) -> str:
        if tid in self.tok.eos_ids and not self.ignore_eos:
            self.stop_reason = "eos"
            return ""
        self.token_ids.append(tid)
        self.dec.push([tid])
        text, emitted = self.dec.text, self.emitted
        hit = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.stop_reason = "stop_string"
            self.emitted = max(emitted, hit)
            return text[emitted:hit] if hit > emitted else ""
        safe = len(text) - _holdback(text, self.stops)
        if safe > emitted:
            self.emitted = safe
            return text[emitted:safe]
        return ""

    def finish(self) -> str:
        """The text held back for a stop string that never came, and an incomplete last character (as
        U+FFFD, as transformers decodes it); nothing after a stop string."""
        if self.stop_reason == "stop_string":
            return ""
        self.dec.finish()
        piece = self.dec.text[self.emitted:]
        self.emitted = len(self.dec.text)
        return piece

    @property
    def text(self) -> str:
        return self.dec.text[:self.emitted]


def autoregressive(engine: Engine, sampler: Sampler, logits) -> Iterator[int]:
    """Tokens one forward pass each, after the prompt whose last logits are ``logits`` (the caller stops)."""
    while True:
        tid = sampler(logits)
        yield tid
        logits = engine.forward([tid])


def generate(engine: Engine, tok: Tokenizer, prompt_ids: Sequence[int], *, max_new_tokens: int,
             sampler: Sampler, stop_strings: Sequence[str] = (), result: GenResult | None = None,
             ignore_eos: bool = False,
             on_prefill: Callable[[int, int], None] | None = None,
             on_decode_start: Callable[[], None] | None = None, speculator=None) -> Iterator[str]:
    """Yield the answer's text as it is produced. ``result`` receives counts and timings.

    Stops on an EOS id, a stop string (not included in the text), ``max_new_tokens``
    or the end of the context window. With a ``speculator`` (offload_rt.spec) the tokens come a
    verified tree at a time; they are the same tokens (greedy) or distributed the same (sampling).
    """
    res = result if result is not None else GenResult()
    context = engine.max_tokens
    check_context(len(prompt_ids), context)
    res.prompt_tokens = len(prompt_ids)
    budget = min(max_new_tokens, context - len(prompt_ids))
    # On a GPU a forward pass returns once its kernels are queued: the timers wait for the device
    # (Engine.synchronize), or the prefill's work would land in decode_s at the first .item().
    sync = getattr(engine, "synchronize", None) or (lambda: None)
    t0 = time.perf_counter()
    logits = engine.prefill(prompt_ids, on_prefill)
    sync()
    res.prefill_s = time.perf_counter() - t0
    if on_decode_start:
        on_decode_start()  # e.g. the session snapshots its byte counters: what decode moves is what follows
    stream = TextStream(tok, stop_strings, ignore_eos)
    res.token_ids = stream.token_ids
    t_dec = time.perf_counter()
    res.stop_reason = "max_new_tokens" if budget == max_new_tokens else "context"
    tokens = (speculator.tokens(engine, sampler, logits) if speculator is not None
              else autoregressive(engine, sampler, logits))
    try:
        for _n, tid in zip(range(budget), tokens):  # range first: no pass runs for a token past the budget
            piece = stream.push(tid)
            res.new_tokens = len(stream.token_ids)
            if piece:
                yield piece
            if stream.stop_reason is not None:
                res.stop_reason = stream.stop_reason
                break
        sync()  # the last step's device work belongs to decode_s
        piece = stream.finish()
        if piece:
            yield piece
    except (GeneratorExit, KeyboardInterrupt):  # closed by the consumer, or Ctrl-C inside a forward pass
        res.stop_reason = "interrupted"
        raise
    finally:
        tokens.close()
        res.decode_s = time.perf_counter() - t_dec
        res.text = stream.text
