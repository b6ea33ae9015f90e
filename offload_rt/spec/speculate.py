"""SpecExec decoding: a draft grows a tree, the target verifies it in one pass, the accepted path stays.

:class:`Speculator` turns the logits after a prompt into an endless stream of tokens, like
autoregressive decoding does, but each pass of the (offloaded) target yields between 1 and
depth + 1 of them. Every emitted token is the target's own choice at its position (argmax when
greedy, a draw from the target's distribution otherwise, one draw per node the walk visits), so
the output is exactly the autoregressive one (greedy) or distributed exactly as it (sampling);
the draft decides only how far one pass gets.

State between steps: the target's cache holds the accepted sequence up to, not including, the
last emitted token (the *root*, as in autoregressive decoding); each step feeds the root and the
tree in one pass, keeps the root and the accepted nodes, and the bonus token becomes the next root.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from offload_rt.engine import Engine
from offload_rt.spec.draft import Draft
from offload_rt.spec.ahead import GrowAhead
from offload_rt.spec.tree import DEFAULT_MAX_DEPTH, Grower, Tree, accept
from offload_rt.trace import NullTracer

MAX_CHILDREN = 8  # draft proposals per expanded leaf
MAX_BATCH = 128  # leaves per draft call (ALGORITHMS.md: ≤ 128)
AHEAD_ROWS = 4  # overlapped drafting: draft rows per step, in tree budgets (the draft's cache is sized for it)
AHEAD_BATCH = 16  # leaves per draft call beside the pass: the pass's end waits for the call in flight


@dataclass
class SpecStats:
    """What speculation did over one answer (``--stats`` ``spec``)."""

    budget: int
    passes: int = 0  # target verification passes
    accepted_tokens: int = 0  # drafted tokens the target accepted
    tokens: int = 0  # tokens the passes produced: accepted + one bonus each
    tree_nodes: int = 0  # nodes verified, summed over passes
    draft_calls: int = 0
    draft_s: float = 0.0  # tree building, draft passes included
    verify_s: float = 0.0  # target passes
    carried: int = 0  # steps whose tree search started from the one grown during the previous pass (overlap)
    ahead_s: float = 0.0  # drafting beside the target's passes (overlap; inside verify_s)

    def as_dict(self) -> dict:
        p = max(self.passes, 1)
        return {"passes": self.passes, "accepted_tokens": self.accepted_tokens,
                "tokens_per_pass": round(self.tokens / p, 4) if self.passes else 0.0, "budget": self.budget,
                "mean_tree_nodes": round(self.tree_nodes / p, 2) if self.passes else 0.0,
                "draft_calls": self.draft_calls, "draft_s": round(self.draft_s, 6),
                "verify_s": round(self.verify_s, 6), "carried": self.carried, "ahead_s": round(self.ahead_s, 6)}


def verification_mask(tree: Tree) -> torch.Tensor:
    """[n + 1, n + 1]: the root (row/column 0) seen by every node, nodes masked by the tree."""
    n = len(tree)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.attention_mask()
    return mask


class Speculator:
    """Speculative decoding over a target engine with a :class:`Draft` under a node ``budget``."""

    def __init__(self, draft: Draft, budget: int, *, tracer=None, max_children: int = MAX_CHILDREN,
                 max_batch: int = MAX_BATCH, max_depth: int = DEFAULT_MAX_DEPTH, overlap: bool = False,
                 ahead_threads: int = 1):
        if budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        self.draft, self.budget = draft, budget
        self.tracer = tracer or NullTracer()
        self.max_children, self.max_batch, self.max_depth = max_children, max_batch, max_depth
        self.stats = SpecStats(budget)
        self.overlap = overlap  # grow the next tree while the target verifies this one (GrowAhead)
        self.ahead_threads = ahead_threads  # the draft's compute threads while it runs beside the target's pass
        self.ahead_rows = AHEAD_ROWS
        self.ahead_complete = False  # tests: the pass waits for the growth ahead to end by itself
        self._carried: Grower | None = None  # the next step's search state, grown during the last pass

    def new_answer(self) -> SpecStats:
        self._carried = None
        self.stats = SpecStats(self.budget)
        return self.stats

    def tokens(self, engine: Engine, sampler: Callable[[torch.Tensor], int], logits: torch.Tensor) -> Iterator[int]:
        """The answer's tokens after the prompt whose last logits are ``logits``, endlessly (the caller stops)."""
        self._carried = None
        root = sampler(logits)
        yield root
        while True:
            for t in self.step(engine, sampler, root):
                yield t
                root = t

    def step(self, engine: Engine, sampler: Callable[[torch.Tensor], int], root: int) -> list[int]:
        """One tree: draft, verify, keep. Returns the tokens after ``root`` (accepted + bonus)."""
        st, tr = self.stats, self.tracer
        r = engine.cache.offset  # tokens before the root
        target_room = engine.cache.max_tokens - r - 1
        budget = min(self.budget, target_room)
        carried, self._carried = self._carried, None
        t0 = time.perf_counter()
        tree, grower = Tree(), None
        tree.origin = []
        draft = self.draft
        calls0 = draft.calls
        if budget >= 1:
            with tr.span("spec", "tree-build", budget=budget, carried=carried is not None):
                context = engine.tokens + [root]
                if carried is not None and draft.carries(context):
                    grower = carried
                    st.carried += 1
                else:
                    draft.start(context)
                    grower = self._grower()
                budget = min(budget, draft.room() // 2)
                if budget >= 1:
                    grower.run(self._scored, budget, max_evaluated=2 * budget)
                    tree = grower.tree(budget)
        t1 = time.perf_counter()
        st.draft_s += t1 - t0
        ahead = self._grow_ahead(grower, budget) if self.overlap and len(tree) else None
        try:
            with tr.span("spec", "verify", nodes=len(tree) + 1):
                out, accepted = self._verify(engine, sampler, root, tree)
        finally:
            if ahead is not None:
                ahead.finish(complete=self.ahead_complete)  # the draft's call in flight ends before anything else touches the draft
        st.draft_calls += draft.calls - calls0
        if len(tree):
            node = None
            if ahead is not None and ahead.error is None:
                st.ahead_s += ahead.seconds
                path = [tree.origin[i] for i in accepted]
                node = grower.work.child(path[-1] if path else -1, out[-1])
            if node is not None and node in grower.expanded:  # the pass ended where the draft had grown on
                self._carried, below = grower.subtree(node)
                draft.advance(path, node, below)
            else:
                draft.finish(tree, accepted)
            if ahead is not None:
                ahead.reraise()
        st.verify_s += time.perf_counter() - t1
        st.passes += 1
        st.tree_nodes += len(tree)
        st.accepted_tokens += len(out) - 1
        st.tokens += len(out)
        return out

    def _grower(self) -> Grower:
        return Grower(max_children=self.max_children, max_batch=self.max_batch, max_depth=self.max_depth)

    def _scored(self, work: Tree, leaves: list[int]) -> torch.Tensor:
        """grow's draft function: the draft's log-probabilities after ``leaves`` (traced)."""
        with self.tracer.span("spec", "draft", leaves=len(leaves)):
            return self.draft.logprobs(work, leaves)

    def _grow_ahead(self, grower: Grower, budget: int) -> GrowAhead:
        """Overlapped drafting: grow on past the verified tree while the target's pass runs (on a thread)."""
        rows = min(self.draft.room(), self.ahead_rows * budget)
        pinned = {i for _s, i in grower.order[:budget]}  # the tree being verified
        return GrowAhead(lambda stop: grower.run(self._scored, self.ahead_rows * budget, max_evaluated=rows,
                                                 stop=stop, pinned=pinned, max_batch=AHEAD_BATCH),
                         threads=self.ahead_threads, engine=self.draft.engine)

    def _verify(self, engine: Engine, sampler, root: int, tree: Tree) -> tuple[list[int], list[int]]:
        """One target pass over root + tree: (the tokens after the root, the accepted nodes)."""
        r = engine.cache.offset
        if not len(tree):  # no room for a tree (the end of the context): one autoregressive step
            return [sampler(engine.forward([root]))], []
        pos = torch.cat([torch.tensor([r]), tree.positions(r + 1)])
        logits = engine.forward([root] + tree.tokens, positions=pos, tree_mask=verification_mask(tree),
                                all_logits=True)
        try:
            accepted, bonus = accept(tree, lambda i: sampler(logits[i + 1]))
            engine.keep(r, [0] + [1 + i for i in accepted])
        except BaseException:
            if engine.cache.offset > r:  # interrupted before the tree was pruned: drop it whole
                engine.keep(r, [])
            raise
        return [tree.tokens[i] for i in accepted] + [bonus], accepted
