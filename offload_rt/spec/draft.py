"""The draft side of SpecExec: a resident draft model's engine scoring the leaves of a growing tree.

The draft's KV cache holds the accepted sequence up to and including the step's root, then one
row per tree node the draft has scored this step, in the order they were scored. A new batch of
leaves attends to the prefix and, through a mask over those rows, to its own ancestors (already
scored: every ancestor of a leaf was a leaf of an earlier batch) — the cache is reused across the
expansions of a step. After verification the rows of the accepted nodes stay (packed after the
root) and the rest go: the next step's first call only runs what the draft has not seen yet
(accepted nodes it never scored, and the bonus token), through the engine's prefix-reusing prefill.
"""

from __future__ import annotations

from typing import Sequence

import torch

from offload_rt.engine import Engine
from offload_rt.spec.tree import Tree


class Draft:
    """A draft model ready to score tree leaves: ``start`` a step, :meth:`logprobs` (grow's draft
    function), ``finish`` with the accepted nodes."""

    def __init__(self, engine: Engine, *, vocab: int, name: str = "draft", tracer=None):
        self.engine = engine
        self.vocab = vocab  # the target's vocabulary: draft logits past it are never proposed
        self.name = name
        self.tracer = tracer
        self.base = 0  # cache rows before this step's tree (the accepted sequence, root included)
        self._valid = 0  # cache rows known to be an autoregressive prefix
        self._first: torch.Tensor | None = None  # the draft's logits after the root
        self._fed: list[int] = []  # working-tree indices in cache-row order (after ``base``)
        self._row: dict[int, int] = {}
        self.calls = 0  # draft passes (prefill and tree batches)

    @property
    def capacity(self) -> int:
        return self.engine.cache.max_tokens

    def room(self) -> int:
        """Tree rows the draft's cache can take after the current sequence."""
        return self.capacity - self.base

    def start(self, context: Sequence[int]) -> None:
        """Begin a step whose accepted sequence (root included) is ``context``."""
        eng = self.engine
        if len(eng.tokens) > self._valid:
            eng.keep(self._valid, [])  # rows of a tree never finished (an interrupted step)
        self._first = eng.prefill(list(context))  # runs only what the cache does not hold yet
        self.calls += 1
        self.base = self._valid = len(context)
        self._fed, self._row = [], {}

    def logprobs(self, work: Tree, leaves: list[int]) -> torch.Tensor:
        """Draft log-probabilities [len(leaves), vocab] of the token after each leaf (-1: the root)."""
        if leaves == [-1]:
            return self._logsoftmax(self._first[None])
        eng = self.engine
        rows = self._fed + leaves
        mask = work.attention_mask(leaves)[:, rows]  # [L, S]: ancestors are already cached rows
        logits = eng.forward(work.input_ids(leaves).tolist(), positions=work.positions(self.base, leaves),
                             tree_mask=mask, all_logits=True)
        self.calls += 1
        for w in leaves:
            self._row[w] = len(self._fed)
            self._fed.append(w)
        return self._logsoftmax(logits)

    def finish(self, tree: Tree, accepted: Sequence[int]) -> None:
        """Keep the rows of the accepted nodes the draft scored (a prefix of the accepted path)."""
        rows = []
        for n in accepted:
            r = self._row.get(tree.origin[n] if tree.origin is not None else n)
            if r is None:
                break
            rows.append(r)
        self.engine.keep(self.base, rows)
        self._valid = self.base + len(rows)
        self._fed, self._row = [], {}

    def advance(self, path: Sequence[int], node: int, below: Sequence[int]) -> None:
        """Overlapped drafting: the pass accepted working nodes ``path`` and its bonus token is working node
        ``node``, which the draft scored (so did every node of ``path``: its ancestors). Keep their rows as
        the accepted sequence (the next step's context, ``node`` its root) and, after it, the rows of the
        scored nodes among ``below``: ``below[j]`` is the working index of node j of the next step's tree
        (:meth:`~offload_rt.spec.tree.Grower.subtree`), whose rows are then keyed by j."""
        lead = [self._row[n] for n in path] + [self._row[node]]
        tail = sorted((self._row[o], j) for j, o in enumerate(below) if o in self._row)
        self.engine.keep(self.base, lead + [r for r, _j in tail])  # rows ascend: ancestors were scored first
        self.base = self._valid = self.base + len(lead)
        self._first = None  # the root's children are already in the carried tree
        self._fed = [j for _r, j in tail]
        self._row = {j: i for i, j in enumerate(self._fed)}

    def carries(self, context: Sequence[int]) -> bool:
        """Whether the cache holds ``context`` (root included) as its accepted sequence, a carried tree after."""
        return self.base == self._valid == len(context) and self.engine.tokens[:self.base] == list(context)

    def _logsoftmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[:, :self.vocab].float(), dim=-1)

    def reset(self) -> None:
        self.engine.reset()
        self.base = self._valid = 0
        self._fed, self._row = [], {}

    def close(self) -> None:
        self.engine.close()
