"""What the HTTP layer and the batch scheduler exchange: one generation request, its events, the errors.

The HTTP layer (:mod:`offload_rt.serve.http`) turns an OpenAI request into a :class:`GenRequest`
(prompt token ids, per-request sampling and stop rules) and hands it to a :class:`Backend`; the
backend (:mod:`offload_rt.serve.backend`: the continuous-batching scheduler over one loaded model)
streams :class:`Delta` events back and ends with one :class:`Done`. Nothing here knows HTTP or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Sequence


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: tuple[int, ...]  # the whole prompt, chat template applied
    max_tokens: int  # new tokens at most (the backend also stops at the context's end: finish "length")
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    ignore_eos: bool = False
    keep_tokens: tuple[str, ...] = ()  # special tokens kept in the text (the tool-call parser's markers)


@dataclass(frozen=True)
class Delta:
    """New text of the answer (may be empty when a token completes no character yet)."""

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Done:
    """The end of an answer: why, and what it cost (OpenAI ``usage``)."""

    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens or the context) | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    text: str = ""  # the whole answer


class QueueFull(Exception):
    """Every batch slot is busy and the waiting queue is at its depth limit (HTTP 503 with Retry-After)."""

    def __init__(self, retry_after: int = 1):
        super().__init__("the server is busy: every slot is in use and the queue is full; retry later")
        self.retry_after = retry_after


class PromptTooLong(Exception):
    """The prompt does not leave room for one new token in a sequence's context (HTTP 400)."""


class Handle(Protocol):
    """One submitted request: its events as they come, and a way to give up on it."""

    def events(self) -> AsyncIterator[Delta | Done]:
        """Deltas, then exactly one Done (also after cancel())."""

    def cancel(self) -> None:
        """Free the request's batch slot and KV at once (a client that went away)."""


class Backend(Protocol):
    model_id: str  # the name /v1/models lists and responses carry
    context_tokens: int  # one sequence's context (prompt + answer)
    parallel: int  # sequences decoded together

    def chat_ids(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """The prompt ids of a chat (the model's chat template, generation prompt added); ValueError with a
        message for the client when the messages cannot be rendered."""

    def text_ids(self, prompt: str) -> list[int]:
        """The prompt ids of a plain completion prompt (no template)."""

    def tool_format(self) -> str | None:
        """The tool-call syntax of the model's chat template (serve.toolcalls.detect), None without tools."""

    def submit(self, request: GenRequest) -> Handle:
        """Queue the request (raises QueueFull or PromptTooLong); must be called on the event loop's thread."""

    def metrics(self) -> dict:
        """Counters and gauges for /metrics, keyed by metric name less the ``offload_rt_`` prefix (the known
        keys, with their type and meaning: serve.metrics.METRICS): requests_total, requests_cancelled_total,
        requests_rejected_total, requests_active, queue_depth, batch_size, prompt_tokens_total,
        completion_tokens_total, prefix_cache_hits_total, cached_tokens_total, tokens_per_second; other
        numeric keys are exported as gauges."""


@dataclass
class Counters:
    """The backend's running totals (read by /metrics)."""

    requests_total: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_tokens_total: int = 0
    prefix_hits: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    batch_rows_total: int = 0
    extra: dict = field(default_factory=dict)
