"""One forward pass for many sequences: each streamed group of weights is read once per step for all.

The server (:mod:`offload_rt.serve.backend`) decodes several sequences together, each with its own KV
cache, and prefills new ones beside them. :func:`step` sweeps the weight source once and, per group,
runs every *segment* of the step through it:

* the **decode segment**: one new token for each decoding sequence, the rows stacked (``[B, hidden]``),
  attention per row over that row's own cache (:class:`RowCaches`), every other operation under
  :func:`offload_rt.models.ops.row_invariant` — a row's bits do not depend on how many rows there are,
  so a sequence's greedy output is the same alone and batched (a sequence alone runs the same way);
* a **prefill segment** per prefilling sequence: its next prompt chunk, exactly as
  :meth:`offload_rt.engine.Engine.prefill` runs it alone (the same chunk boundaries: multiples of the
  prefill chunk from the sequence's start, :func:`prefill_chunk`).

Weights come once per step whatever the number of segments: with weights streamed from disk, a step
costs about what one sequence's token costs, and B sequences share it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kernels_cpu.matvec import decode_scope
from offload_rt.models import ops
from offload_rt.threads import torch_threads


class RowCaches:
    """The KV cache protocol's ``attend`` over a decode segment: row i attends in ``caches[i]``."""

    def __init__(self, caches: Sequence):
        self.caches = list(caches)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
               tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        if tree_mask is not None:
            raise ValueError("a decode segment has no tree")
        return torch.cat([c.attend(layer, q[i:i + 1], k[i:i + 1], v[i:i + 1], window=window)
                          for i, c in enumerate(self.caches)])


def prefill_chunk(done: int, total: int, chunk: int) -> int:
    """Tokens of the next prefill pass of a prompt whose first ``done`` of ``total`` are cached: up to the
    next multiple of ``chunk`` (so the passes are the same whatever prefix was reused)."""
    return min(total, (done // chunk + 1) * chunk) - done


@dataclass
class Prefill:
    """A prefill segment: ``ids`` are appended to ``cache``; ``logits`` wanted after the last of them."""

    cache: object
    ids: Sequence[int]
    want_logits: bool = True


@dataclass
class StepResult:
    decode_logits: torch.Tensor | None = None  # [B, vocab] float32, row i for decode sequence i
    prefill_logits: list = field(default_factory=list)  # per prefill segment: [vocab] or None
    seconds: float = 0.0


def step(engine, decode: Sequence[tuple[object, int]], prefill: Sequence[Prefill] = (), *,
         threads: int | None = None) -> StepResult:
    """One sweep of ``engine``'s weights: a token for each ``(cache, token)`` of ``decode`` (appended at its
    cache's offset) and each prefill segment's chunk. Every cache is committed afterwards. ``engine``
    provides the weight source, the model family and RoPE (its own cache and token list are not used)."""
    t0 = time.perf_counter()
    args, family, source, tr = engine.args, engine.family, engine.source, engine.tracer
    device = engine.device
    segs = []  # [x, cache, rope, is_decode, rows, logits wanted]
    if decode:
        caches = [c for c, _ in decode]
        x = source.embed(torch.tensor([t for _, t in decode], dtype=torch.long, device=device))
        pos = torch.tensor([c.offset for c in caches], dtype=torch.long)
        segs.append([x, RowCaches(caches), engine._rope(0, len(decode), pos), True, len(decode), True])
    for p in prefill:
        x = source.embed(torch.tensor(list(p.ids), dtype=torch.long, device=device))
        segs.append([x, p.cache, engine.rope.tables(p.cache.offset, len(p.ids)), False, len(p.ids), p.want_logits])
    out = StepResult(prefill_logits=[None] * len(prefill))
    if not segs:
        return out
    # threads: decode rows take the kernels' threads (torch's small row-wise ops one); prefill torch's
    cpu = device.type == "cpu"
    scope = (torch_threads(threads or engine.prefill_threads or torch.get_num_threads()) if prefill and cpu
             else decode_scope(threads) if cpu else nullcontext())
    k = engine.passes
    with scope, tr.span("compute", "batch step", rows=sum(s[4] for s in segs), **{"pass": k}):
        for group, w in source.sweep():
            with tr.span("compute", group.name, group=group.name, **{"pass": k}):
                for s in segs:
                    x, cache, rope, is_decode, _, want = s
                    if group.kind != "layer" and not want:
                        continue  # a prompt chunk before the last: no logits
                    with ops.row_invariant() if is_decode else nullcontext():
                        if group.kind == "layer":
                            s[0] = family.layer_forward(args, w, x, cache, group.index, rope, 0)
                        else:
                            s[0] = family.head_forward(args, w, x if is_decode else x[-1:])
    engine.passes += 1
    if engine.passes <= 2 and engine.on_warm is not None:
        engine.on_warm()  # as Engine.forward: the first passes touched new library code
    i = 0
    for s in segs:
        if s[3]:
            out.decode_logits = s[0]
            for c, _ in decode:
                c.commit(1)
        else:
            p = prefill[i]
            p.cache.commit(len(p.ids))
            out.prefill_logits[i] = s[0][0] if p.want_logits else None
            i += 1
    out.seconds = time.perf_counter() - t0
    return out
