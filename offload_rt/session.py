"""A chat/answer session: a loaded model plus sampling settings, producing streamed answers.

Front ends (one-shot CLI, REPL, benchmarks) call :meth:`Session.answer`; it applies the
chat template (unless raw), checks the context length and streams the text.
"""

from __future__ import annotations

from typing import Iterator

from offload_rt.config import RunConfig, SamplingConfig
from offload_rt.generate import GenResult, check_context, generate
from offload_rt.loader import LoadedModel
from offload_rt.sampling import make_sampler
from offload_rt.stats import stats_record
from offload_rt.status import StatusLine

PREFILL_PROGRESS_TOKENS = 2048  # prompts at least this long show prefill progress


class Session:
    def __init__(self, model: LoadedModel, cfg: RunConfig, *, placement: dict | None = None,
                 counters=None, device: str = "cpu", gpu_context_bytes: int = 0, speculator=None):
        self.model, self.cfg = model, cfg
        self.sampler = make_sampler(cfg.sampling)
        self.placement = placement
        self.counters = counters  # object with disk_read_bytes / h2d_bytes, or None
        self.device = device
        self.gpu_context_bytes = gpu_context_bytes
        self.speculator = speculator  # offload_rt.spec.speculate.Speculator (--draft), or None
        self.last = GenResult()
        self._at_decode = None  # (disk, h2d) byte counters when the last answer's decode began
        self._attention_at_decode = None  # the cache's attention_s then
        self._kv_disk_at_decode = None  # the cache's disk counters then (_kv_disk_counters)

    def prompt_ids(self, messages_or_text, *, raw: bool | None = None) -> list[int]:
        tok = self.model.tokenizer
        raw = self.cfg.raw if raw is None else raw
        if isinstance(messages_or_text, str):
            if raw or tok.chat_template is None:
                return tok.encode(messages_or_text)
            messages_or_text = [{"role": "user", "content": messages_or_text}]
        return tok.encode_chat(messages_or_text)

    def answer(self, messages_or_text, *, raw: bool | None = None, sampling: SamplingConfig | None = None,
               max_new_tokens: int | None = None, stop: tuple[str, ...] | None = None) -> Iterator[str]:
        """Stream the answer's text. ``sampling``, ``max_new_tokens`` and ``stop`` are this answer's settings
        (default: the run's, from the command line)."""
        ids = self.prompt_ids(messages_or_text, raw=raw)
        check_context(len(ids), self.model.engine.max_tokens)
        self.last = GenResult()
        self._at_decode = None
        if self.speculator is not None:
            self.speculator.new_answer()
        status = StatusLine(enabled=self.cfg.progress)
        sampler = self.sampler if sampling is None else make_sampler(sampling)
        pieces = generate(self.model.engine, self.model.tokenizer, ids,
                          max_new_tokens=self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
                          sampler=sampler, stop_strings=self.cfg.stop if stop is None else stop, result=self.last,
                          ignore_eos=self.cfg.ignore_eos, on_decode_start=self._snapshot, speculator=self.speculator,
                          on_prefill=status.prefill_progress() if len(ids) >= PREFILL_PROGRESS_TOKENS else None)
        # Progress and "waiting" notices live on one status line until the first token, never per token:
        # the answer's text is never split.
        return status.until_first_token(pieces)

    def _snapshot(self) -> None:
        c = self.counters
        self._at_decode = (getattr(c, "disk_read_bytes", 0), getattr(c, "h2d_bytes", 0))
        self._attention_at_decode = getattr(self.model.engine.cache, "attention_s", 0.0)
        self._kv_disk_at_decode = _kv_disk_counters(self.model.engine.cache)

    def kv_stats(self) -> dict:
        """KV bytes per tier, decode time in attention (seconds), KV chunk bytes moved to and from disk (the
        whole run), and what decode read from the disk tier: bytes per generated token after the first (the
        first comes from the prefill), and the disk chunks its attention covered against those it read
        (summed over layers and steps: ``--attention exact`` reads all, ``select`` a share)."""
        cache = self.model.engine.cache
        attn = getattr(cache, "attention_s", 0.0)
        at_decode = attn if self._attention_at_decode is None else self._attention_at_decode
        now = _kv_disk_counters(cache)
        read, spilled, chunks_read = (a - b for a, b in zip(now, self._kv_disk_at_decode or now))
        return {"kv_bytes_by_tier": cache.tier_bytes(),
                "kv_dtype": getattr(cache, "kv_dtype", str(cache.dtype).replace("torch.", "")),
                "kv_bytes_per_token": getattr(cache, "stored_bytes_per_token", None),
                "attention_s": round(attn - at_decode, 6),
                "kv_disk_read_bytes": int(getattr(cache, "disk_read_bytes", 0)),
                "kv_disk_write_bytes": int(getattr(cache, "disk_write_bytes", 0)),
                "kv_disk_read_bytes_per_token": round(read / max(1, self.last.new_tokens - 1)),
                "kv_disk_chunks_decode": {"spilled": spilled, "read": chunks_read},
                "attention": getattr(cache, "attention", "exact")}

    def stats(self) -> dict:
        c = self.counters
        disk0, h2d0 = self._at_decode or (getattr(c, "disk_read_bytes", 0), getattr(c, "h2d_bytes", 0))
        return stats_record(model=self.model.name, device=self.device, result=self.last,
                            disk_read_bytes=getattr(c, "disk_read_bytes", 0), h2d_bytes=getattr(c, "h2d_bytes", 0),
                            placement=self.placement, dtype=str(self.model.dtype).replace("torch.", ""),
                            stop_reason=self.last.stop_reason, gpu_context_bytes=self.gpu_context_bytes,
                            disk_read_bytes_decode=int(getattr(c, "disk_read_bytes", 0) - disk0),
                            h2d_bytes_decode=int(getattr(c, "h2d_bytes", 0) - h2d0), **self.kv_stats(),
                            spec=self.speculator.stats.as_dict() if self.speculator is not None else None)


def _kv_disk_counters(cache) -> tuple[int, int, int]:
    """A KV cache's (disk bytes read, disk chunks its attention covered, disk chunks it read); 0 for a cache
    without a disk tier."""
    return (int(getattr(cache, "disk_read_bytes", 0)), int(getattr(cache, "disk_chunks_seen", 0)),
            int(getattr(cache, "disk_chunks_read", 0)))
