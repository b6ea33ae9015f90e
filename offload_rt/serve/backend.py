"""The continuous-batching scheduler: requests join and leave a running batch between steps.

The *batch loop* (:meth:`BatchBackend.run`) owns the model; ``offload-run serve`` runs it on the main
thread, the HTTP event loop on another (OpenMP parallel regions launched from a second thread ran the
same steps 1.8x slower: :meth:`BatchBackend.run`). Each loop it admits waiting requests while a sequence
slot (a KV cache of the run's plan) is free, reusing a cached prompt prefix when the prefix cache has
one, then runs one :func:`offload_rt.batch.step`: a new token for every decoding sequence and the next
prompt pass of the oldest sequences still prefilling, as many as fit in one prefill chunk of tokens
(iteration-level scheduling, as Orca and vLLM do). Tokens are sampled per request (its own sampler
and seed), turned into text (stop strings, EOS) and sent to the request's handle; a finished,
cancelled or disconnected request frees its slot and KV before the next step. Requests beyond
``parallel`` wait, and beyond ``queue_depth`` waiting are refused
(:class:`~offload_rt.serve.types.QueueFull`: HTTP 503).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections import deque
from typing import AsyncIterator, Sequence

import torch

from offload_rt.batch import Prefill, prefill_chunk, step
from offload_rt.config import SamplingConfig
from offload_rt.generate import TextStream
from offload_rt.kv import expect_prompt
from offload_rt.sampling import make_sampler
from offload_rt.serve import prefill_pass
from offload_rt.serve.types import Counters, Delta, Done, GenRequest, PromptTooLong, QueueFull

RATE_WINDOW_S = 10.0  # /metrics tokens_per_second: decode tokens over this many seconds


class _Handle:
    """A request's event queue on the event loop (fed from the batch loop's thread) and its cancel flag."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake):
        self._loop, self._wake = loop, wake
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False

    def put(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    async def events(self) -> AsyncIterator[Delta | Done]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Done):
                return

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._wake()


class _Seq:
    """One request in the batch: its prompt's progress, its KV cache, its sampler and text."""

    def __init__(self, req: GenRequest, handle: _Handle, tok):
        self.req, self.handle = req, handle
        self.prompt = list(req.prompt_ids)
        self.cache = None  # a KV cache while the sequence holds a slot
        self.done = 0  # prompt tokens in the cache
        self.cached = 0  # of those, restored from the prefix cache
        self.next_token: int | None = None  # sampled, not yet in the cache (decode appends it)
        self.sampler = make_sampler(SamplingConfig(temperature=req.temperature, top_p=req.top_p, seed=req.seed))
        self.stream = TextStream(tok, req.stop, req.ignore_eos, tok.token_ids(req.keep_tokens))
        self.generated = 0


class BatchBackend:
    """The :class:`~offload_rt.serve.types.Backend` over a built runtime (offload_rt.build.Runtime)."""

    def __init__(self, rt, *, model_id: str, queue_depth: int = 64, prefix=None):
        self.rt, self.model_id = rt, model_id
        self.engine, self.tok = rt.engine, rt.model.tokenizer
        self.context_tokens = self.engine.max_tokens
        self.parallel = rt.prepared.sequences
        self.queue_depth = queue_depth
        self.prefix = prefix  # offload_rt.kv.prefix.PrefixCache, or None
        # prefill passes: the prefill chunk, or with a prefix cache the finer pass its granule needs
        self.chunk = prefill_pass(self.engine.prefill_chunk, prefix.C)[0] if prefix is not None \
            else self.engine.prefill_chunk
        # the run's plan holds `parallel` KV caches: the engine's and one more per further sequence
        self._free = [self.engine.cache] + [rt.new_cache() for _ in range(self.parallel - 1)]
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.counters = Counters()
        self._rate: deque[tuple[float, int]] = deque()  # (time, decode tokens) of recent steps
        self.last_batch = 0
        self.error: BaseException | None = None  # what stopped the batch loop, if anything did

    # ------------------------------------------------------------------ the event loop's side
    def chat_ids(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        from offload_rt.errors import ChatTemplateError

        try:
            return self.tok.encode_chat(list(messages), tools=list(tools) if tools else None)
        except ChatTemplateError as e:
            raise ValueError(str(e)) from None

    def text_ids(self, prompt: str) -> list[int]:
        return self.tok.encode(prompt)

    def tool_format(self) -> str | None:
        from offload_rt.serve import toolcalls

        return toolcalls.detect(self.tok.chat_template)

    def submit(self, request: GenRequest) -> _Handle:
        if self.error is not None:  # the batch loop is gone: say so (HTTP 500) rather than queue forever
            raise RuntimeError(f"the model stopped after an internal error ({type(self.error).__name__}); "
                               "restart the server (its log has the details)")
        n = len(request.prompt_ids)
        if n == 0:
            raise PromptTooLong("the prompt is empty")
        if n >= self.context_tokens:
            raise PromptTooLong(f"the prompt is {n} tokens but a sequence's context is {self.context_tokens} "
                                "tokens; shorten it (or start the server with a larger --ctx-size)")
        with self._cv:
            if self._stopping or len(self._waiting) + len(self._active) >= self.parallel + self.queue_depth:
                self.counters.requests_rejected += 1
                raise QueueFull(retry_after=1)
            handle = _Handle(asyncio.get_running_loop(), self._wake)
            self._waiting.append(_Seq(request, handle, self.tok))
            self.counters.requests_total += 1
            self._cv.notify()
        return handle

    def metrics(self) -> dict:
        c = self.counters
        now = time.monotonic()
        tokens = sum(n for t, n in self._rate if now - t <= RATE_WINDOW_S)
        out = {"requests_total": c.requests_total, "requests_active": len(self._active),
               "requests_cancelled_total": c.requests_cancelled, "requests_rejected_total": c.requests_rejected,
               "queue_depth": len(self._waiting), "batch_size": self.last_batch, "parallel": self.parallel,
               "prompt_tokens_total": c.prompt_tokens_total, "completion_tokens_total": c.completion_tokens_total,
               "cached_tokens_total": c.cached_tokens_total, "prefix_cache_hits_total": c.prefix_hits,
               "steps_total": c.steps, "step_seconds_total": round(c.step_seconds, 6),
               "tokens_per_second": round(tokens / RATE_WINDOW_S, 3),
               "weight_disk_read_bytes_total": int(getattr(getattr(self.rt.source, "counters", None),
                                                           "disk_read_bytes", 0))}
        out.update(self._memory())
        return out

    def _memory(self) -> dict:
        """The memory promise's figures: the process's peak RSS since the plan, its measured baseline, the
        host budget and the slack the plan allows (peak <= baseline + budget + slack)."""
        from offload_rt.memory import baseline
        from offload_rt.stats import peak_rss_bytes

        rt = self.rt
        fields = baseline.stats_fields(rt.base)
        return {"peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": fields.get("baseline_bytes", 0),
                "host_budget_bytes": rt.prepared.budgets.host, "runtime_slack_bytes": fields.get("runtime_slack_bytes", 0)}

    def stop(self) -> None:
        """End the batch loop (from any thread): what is still queued or running is cancelled, :meth:`run` returns."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ------------------------------------------------------------------ the batch loop
    def run(self) -> None:
        """The batch loop, in the calling thread, until :meth:`stop` (or an internal error: then :attr:`error`).

        The thread that runs it should be the one that built the model (the main thread): libgomp keeps a
        pool of workers per thread that starts parallel regions, and once two pools exist (the builder's
        and a batch thread's) it counts more OpenMP threads than cores and shortens the workers' spin
        wait, so every region of a step pays a futex sleep and wake (measured: docs/BENCHMARKS.md, S1)."""
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not (self._waiting or self._active or self._stopping):
                            self._cv.wait()
                        if self._stopping:
                            break
                    self._drop_cancelled()
                    self._admit()
                    if self._active:
                        self._step()
        except BaseException as e:  # a bug or an I/O failure: every request gets its end, the server says so
            self.error = e
            traceback.print_exc(file=sys.stderr)
        for seq in list(self._active) + list(self._waiting):
            self._finish(seq, "cancelled")
        self._waiting.clear()

    def _drop_cancelled(self) -> None:
        with self._cv:
            waiting = list(self._waiting)
        for seq in [s for s in waiting + self._active if s.handle.cancelled.is_set()]:
            self.counters.requests_cancelled += 1
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while self._free:
            with self._cv:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            seq.cache = self._free.pop()
            if self.prefix is not None:
                n = self.prefix.lookup(seq.prompt)
                if n:
                    seq.cached = seq.done = self.prefix.restore(seq.prompt, n, seq.cache)
                    if seq.cached:
                        self.counters.prefix_hits += 1
            # as Engine.prefill: the prompt's end, so that MagicPIG's tables are built once, by the last
            # prompt pass (after a restored prefix, the passes left), centred on the whole prompt's keys
            expect_prompt(seq.cache, len(seq.prompt))
            self._active.append(seq)

    def _step(self) -> None:
        decode = [s for s in self._active if s.next_token is not None]
        filling, pre = self._prefills()
        res = step(self.engine, [(s.cache, s.next_token) for s in decode], pre)
        self.counters.steps += 1
        self.counters.step_seconds += res.seconds
        self.last_batch = len(decode) + len(pre)
        now = time.monotonic()
        self._rate.append((now, len(decode)))
        while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        for i, seq in enumerate(decode):
            self._token(seq, res.decode_logits[i])
        for seq, p, logits in zip(filling, pre, res.prefill_logits):
            seq.done += len(p.ids)
            if p.want_logits:
                if self.prefix is not None:
                    self.prefix.save(seq.prompt, seq.cache)
                self._token(seq, logits)

    def _prefills(self) -> tuple[list[_Seq], list[Prefill]]:
        """The prefill segments of this step: the next pass of the oldest sequences still prefilling, as many
        as fit in one prefill chunk of tokens (at least one), so that waiting prompts share a sweep of the
        weights (what a streamed layer costs) and the step's hidden states stay within what the plan
        budgets for one prefill pass. Each segment is the pass its sequence runs alone (same boundaries)."""
        filling, pre, used = [], [], 0
        for seq in self._active:
            if seq.next_token is not None:
                continue
            n = prefill_chunk(seq.done, len(seq.prompt), self.chunk)
            if pre and used + n > self.engine.prefill_chunk:
                break
            filling.append(seq)
            pre.append(Prefill(seq.cache, seq.prompt[seq.done:seq.done + n],
                               want_logits=seq.done + n == len(seq.prompt)))
            used += n
        return filling, pre

    def _token(self, seq: _Seq, logits: torch.Tensor) -> None:
        tid = seq.sampler(logits)
        piece = seq.stream.push(tid)
        seq.generated = len(seq.stream.token_ids)
        if piece:
            seq.handle.put(Delta(piece, (tid,)))
        if seq.stream.stop_reason is not None:
            self._finish(seq, "stop")
        elif seq.generated >= seq.req.max_tokens or len(seq.prompt) + seq.generated >= self.context_tokens:
            self._finish(seq, "length")
        else:
            seq.next_token = tid

    def _finish(self, seq: _Seq, reason: str) -> None:
        """Send the answer's end and give its slot back (once)."""
        if seq.handle.finished:
            return
        seq.handle.finished = True
        if reason != "cancelled":
            tail = seq.stream.finish()
            if tail:
                seq.handle.put(Delta(tail))
        c = self.counters
        c.prompt_tokens_total += len(seq.prompt)
        c.completion_tokens_total += seq.generated
        c.cached_tokens_total += seq.cached
        seq.handle.put(Done(reason, len(seq.prompt), seq.generated, seq.cached, seq.stream.text))
        if seq in self._active:
            self._active.remove(seq)
        else:
            with self._cv:
                if seq in self._waiting:
                    self._waiting.remove(seq)
        if seq.cache is not None:
            seq.cache.reset()
            self._free.append(seq.cache)
            seq.cache = None
