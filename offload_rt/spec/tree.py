"""SpecExec's token tree: flat node arrays, parallel best-first growth, greedy-exact acceptance (no model).

One speculation step works on a tree whose root is the last accepted token (it is already
decided, so it is not a node). Nodes are kept in flat lists, parents before children: token
id, parent index (-1 = the root), depth (1 for the root's children) and the cumulative draft
log-probability of the root-to-node path. From those the engine gets everything a single
forward pass over the tree needs: the tokens, absolute positions (:meth:`Tree.positions`)
and the tree attention mask (:meth:`Tree.attention_mask`: a node sees the cached prefix,
its ancestors and itself).

:func:`grow` is SpecExec's search: the draft scores the unexpanded leaves with the highest
cumulative probability in batches, each gets its top children, and the tree keeps the
``budget`` best nodes overall. The streamed target costs about the same for one token as for
hundreds, so the budget is spent on the continuations most likely to be accepted, wherever
they are in the tree, rather than on a fixed width or depth.

:func:`accept` walks the tree with the target's own next token at every node. The emitted
tokens are always the target's (a drafted token only decides how far one pass gets), so for
any tree, good or bad, greedy output equals autoregressive greedy output and sampling output
is distributed as the target's.

Wiring (engine side, per step; the root token sits at position ``r``, the number of tokens
before it, and the tree's nodes follow at ``positions(r + 1)``):

- ``grow(draft_fn, budget)``: ``draft_fn(work, leaves)`` runs the draft over ``leaves`` of the
  *working* tree ``work``: ``[-1]`` alone on the first call (the root token at position ``r``),
  then nodes: their tokens at ``work.positions(r + 1, leaves)`` with mask rows
  ``work.attention_mask(leaves)`` over the working nodes. Working indices never change during a
  step, so the draft can key its KV by them; every ancestor of a leaf was itself a leaf of an
  earlier call, so its KV is already there. The returned tree's ``origin`` maps its nodes back.
- Verify: one target pass over the root token and ``tree.input_ids()`` at positions ``r`` and
  ``tree.positions(r + 1)``, the root visible to all, nodes masked by ``tree.attention_mask()``;
  ``target_next[0]`` from the root's logits, ``target_next[1 + i]`` from node i's.
- ``accept(tree, target_next)``: keep the KV rows of the root and of the ``accepted`` nodes (in
  that order, now contiguous from ``r``), drop the rest, and make ``bonus`` the next root.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

DEFAULT_MAX_DEPTH = 32  # a chain longer than this needs as many sequential draft calls; little gain past it
DEFAULT_DECAY = math.log(0.95)  # SpecExec's per-level penalty: prefers bushy trees over long shaky chains


class Tree:
    """The nodes of one speculation step in flat lists, parents before children.

    ``origin`` is set on trees :func:`grow` returns: node i was node ``origin[i]`` of the working
    tree the draft saw (None for trees built by hand).
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.scores: list[float] = []
        self.origin: list[int] | None = None
        self._kids: dict[int, dict[int, int]] = {}  # parent -> {token: child}; -1 is the root

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, tokens: Sequence[int] | torch.Tensor,
            scores: Sequence[float] | torch.Tensor) -> list[int]:
        """Append children of ``parent`` (-1: the root); returns their indices.

        Raises ValueError for an unknown parent, a token already among the parent's children
        (acceptance follows one child per token) or mismatched lengths.
        """
        tokens = [int(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)]
        scores = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
        if len(tokens) != len(scores):
            raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
        if not -1 <= parent < len(self):
            raise ValueError(f"parent {parent} is not a node of a tree of {len(self)} nodes")
        kids = self._kids.setdefault(parent, {})
        depth = 1 if parent < 0 else self.depths[parent] + 1
        added = []
        for t, s in zip(tokens, scores):
            if t in kids:
                raise ValueError(f"token {t} is already a child of node {parent}")
            kids[t] = len(self.tokens)
            added.append(len(self.tokens))
            self.tokens.append(t)
            self.parents.append(parent)
            self.depths.append(depth)
            self.scores.append(s)
        return added

    def children(self, i: int) -> list[int]:
        """Indices of node ``i``'s children (``i = -1``: the root's), in insertion order."""
        return sorted(self._kids.get(i, {}).values())

    def child(self, i: int, token: int) -> int | None:
        """The child of ``i`` holding ``token``, if any."""
        return self._kids.get(i, {}).get(int(token))

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to ``i`` (empty for the root, -1)."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def path_tokens(self, i: int) -> list[int]:
        """The tokens after the root along :meth:`path`."""
        return [self.tokens[j] for j in self.path(i)]

    def _rows(self, rows: Sequence[int], root_ok: bool) -> list[int]:
        rows = [int(r) for r in rows]
        lo = -1 if root_ok else 0
        if any(not lo <= r < len(self) for r in rows):
            what = ("nodes or -1 (the root)" if root_ok
                    else "nodes (the root's token is the last accepted one, not stored)")
            raise ValueError(f"rows must be {what} of a tree of {len(self)} nodes, got {rows}")
        return rows

    def input_ids(self, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Token ids, int64 [n] (or of ``rows``, which must be nodes)."""
        if rows is None:
            return torch.tensor(self.tokens, dtype=torch.int64)
        return torch.tensor([self.tokens[r] for r in self._rows(rows, False)], dtype=torch.int64)

    def positions(self, start: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Absolute positions, int64 [n] (or of ``rows``; -1, the root, is at ``start - 1``): ``start + depth - 1``.

        ``start`` is the position of the root's children, i.e. the number of tokens the cache holds
        before the tree; siblings share a position because they are alternatives for one slot.
        """
        depths = self.depths if rows is None else [0 if r < 0 else self.depths[r] for r in self._rows(rows, True)]
        return torch.tensor(depths, dtype=torch.int64) + (start - 1)

    def attention_mask(self, rows: Sequence[int] | None = None) -> torch.Tensor:
        """bool [n, n] (or [len(rows), n]): entry (i, j) is True iff j is i or an ancestor of i.

        The cached prefix (and the root) is visible to every node and is not part of this mask; a
        row for -1, the root, is all False. Built by pointer jumping along parents, one vectorised
        step per level, so it stays cheap for deep trees.
        """
        n = len(self)
        idx = torch.arange(n) if rows is None else torch.tensor(self._rows(rows, True), dtype=torch.int64)
        if n == 0 or idx.numel() == 0:
            return torch.zeros(idx.numel(), n, dtype=torch.bool)
        parents = torch.tensor(self.parents + [-1], dtype=torch.int64)  # slot n: "above the root"
        parents[parents < 0] = n
        idx[idx < 0] = n
        mask = torch.zeros(idx.numel(), n + 1, dtype=torch.bool)
        r = torch.arange(idx.numel())
        cur = idx.clone()
        for _ in range(max(self.depths[i] if i < n else 0 for i in idx.tolist())):
            mask[r, cur] = True
            cur = parents[cur]
        return mask[:, :n]

    def select(self, keep: Sequence[int]) -> Tree:
        """A new tree of the ancestor-closed node set ``keep`` in the same relative order.

        ``origin`` of the result maps each of its nodes to its index here (composed with this
        tree's own ``origin`` when it has one). Raises ValueError if a kept node's parent is not kept.
        """
        order = sorted(set(int(k) for k in keep))
        new_index = {-1: -1}
        out = Tree()
        for i in order:
            p = self.parents[i]
            if p not in new_index:
                raise ValueError(f"node {i} kept without its parent {p}")
            new_index[i] = out.add(new_index[p], [self.tokens[i]], [self.scores[i]])[0]
        out.origin = [self.origin[i] for i in order] if self.origin is not None else order
        return out


DraftFn = Callable[[Tree, list[int]], torch.Tensor]


def grow(draft_logprobs: DraftFn, budget: int, *, max_children: int = 8, max_batch: int = 128,
         max_depth: int = DEFAULT_MAX_DEPTH, decay: float = DEFAULT_DECAY, max_steps: int | None = None,
         max_evaluated: int | None = None) -> Tree:
    """Build the step's tree: SpecExec's parallel best-first search under a node budget.

    ``draft_logprobs(work, leaves)`` returns draft log-probabilities [len(leaves), vocab] of the
    token after each leaf (-1: the root; asked only on the first call, alone). Each call takes
    the ``max_batch`` unexpanded kept leaves with the best cumulative score; each leaf proposes
    its ``max_children`` most likely tokens with score = leaf score + log p + ``decay``, and the
    tree keeps the ``budget`` best nodes seen so far (ties go to the older node). Log-probs are
    clamped to ≤ 0, so scores fall strictly along every path when ``decay`` < 0 and never rise
    otherwise: the kept set is ancestor-closed and a leaf whose ``score + decay`` does not beat
    the worst kept node of a full tree cannot contribute. Growth stops when no leaf below
    ``max_depth`` can (or after ``max_steps`` draft calls, or once ``max_evaluated`` nodes went through
    the draft: what bounds the draft's KV rows for one step). Stopping on that bound rather than on
    "this batch added nothing" makes the result exactly the ``budget`` best nodes of the tree in
    which every node has its ``max_children`` draft favourites, whatever ``max_batch`` is.

    Returns a tree of at most ``budget`` nodes, parents before children, ``origin`` mapping its
    nodes to the working tree's indices (what the draft's KV is keyed by).
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    g = Grower(max_children=max_children, max_batch=max_batch, max_depth=max_depth, decay=decay)
    g.run(draft_logprobs, budget, max_steps=max_steps, max_evaluated=max_evaluated)
    return g.tree(budget)


class Grower:
    """:func:`grow`'s search state, kept between calls so that growth can go on past a budget.

    ``work`` is the working tree (every node any draft call proposed), ``expanded`` the leaves the
    draft has scored (-1: the root), ``order`` every node as (-score, index), best first. The kept
    set of a budget B is ``order[:B]``: the B best nodes ever proposed, which is what grow's
    truncated list holds, so resuming with a larger budget continues the same best-first search
    (overlapped drafting grows past the verified tree while the target's pass runs, and
    :meth:`subtree` turns the part under the pass's outcome into the next step's state).
    """

    def __init__(self, *, max_children: int = 8, max_batch: int = 128, max_depth: int = DEFAULT_MAX_DEPTH,
                 decay: float = DEFAULT_DECAY):
        if max_children < 1 or max_batch < 1 or max_depth < 1:
            raise ValueError("max_children, max_batch and max_depth must be at least 1")
        self.max_children, self.max_batch, self.max_depth, self.decay = max_children, max_batch, max_depth, decay
        self.work = Tree()
        self.expanded: set[int] = set()
        self.order: list[tuple[float, int]] = []

    @property
    def evaluated(self) -> int:
        """Nodes the draft has scored (its KV rows this step), the root's token not counted."""
        return len(self.expanded) - (-1 in self.expanded)

    def run(self, draft_logprobs: DraftFn, budget: int, *, max_steps: int | None = None,
            max_evaluated: int | None = None, stop: Callable[[], bool] | None = None,
            pinned: set[int] | None = None, max_batch: int | None = None) -> int:
        """Best-first growth towards the ``budget`` best nodes (see :func:`grow`); ``stop()`` is asked
        before each draft call (growth ends when it says so). ``pinned`` nodes are kept on top of the
        ``budget`` best others (overlapped drafting: the tree under verification, whose nodes are never
        where a pass ends, while the budget goes to the alternatives beside and below it, where the
        pass's outcome may be); ``max_batch`` overrides the state's for these calls. Returns the number of
        draft calls."""
        if budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        work, decay, steps = self.work, self.decay, 0
        batch = max_batch or self.max_batch
        while max_steps is None or steps < max_steps:
            if pinned:
                others = [x for x in self.order if x[1] not in pinned][:budget]
                kept = sorted(others + [x for x in self.order if x[1] in pinned])
            else:
                others = kept = self.order[:budget]
            worst = -others[-1][0] if len(others) >= budget else -math.inf
            if -1 not in self.expanded:
                leaves = [-1]
            else:
                leaves = [i for _s, i in kept if i not in self.expanded and work.depths[i] < self.max_depth
                          and work.scores[i] + decay > worst][:batch]  # kept is sorted: best first
            if max_evaluated is not None and leaves != [-1]:
                leaves = leaves[:max(0, max_evaluated - self.evaluated)]
            if not leaves or (stop is not None and stop()):
                break
            logp = draft_logprobs(work, leaves)
            if logp.dim() != 2 or logp.shape[0] != len(leaves):
                raise ValueError(f"draft returned log-probs of shape {tuple(logp.shape)} for {len(leaves)} leaves")
            k = min(self.max_children, logp.shape[1])
            vals, toks = torch.topk(logp.detach().float().cpu(), k, dim=-1)
            fresh: list[tuple[float, int]] = []
            for leaf, row_v, row_t in zip(leaves, vals.tolist(), toks.tolist()):
                self.expanded.add(leaf)
                base = (0.0 if leaf < 0 else work.scores[leaf]) + decay
                new_t, new_s = [], []
                for v, t in zip(row_v, row_t):  # descending: stop at the first that cannot enter
                    s = base + min(v, 0.0)
                    if not math.isfinite(s) or s <= worst:
                        break
                    new_t.append(t)
                    new_s.append(s)
                fresh += [(-s, i) for s, i in zip(new_s, work.add(leaf, new_t, new_s))]
            self.order = sorted(self.order + fresh)
            steps += 1
        return steps

    def tree(self, budget: int) -> Tree:
        """The ``budget`` best nodes as a tree (``origin``: their working indices)."""
        return self.work.select([i for _s, i in self.order[:budget]])

    def subtree(self, node: int) -> tuple[Grower, list[int]]:
        """The search state of a step whose root is working node ``node`` (which the draft scored):
        its descendants, scores and depths taken relative to it, and which of them were scored.
        Returns (the new state, its nodes' indices here in its index order)."""
        work = self.work
        if node not in self.expanded or node < 0:
            raise ValueError(f"node {node} was not scored by the draft")
        g = Grower(max_children=self.max_children, max_batch=self.max_batch, max_depth=self.max_depth,
                   decay=self.decay)
        new = {node: -1}
        base_s = work.scores[node]
        old: list[int] = []
        for i in range(node + 1, len(work)):  # parents before children: one pass finds every descendant
            p = new.get(work.parents[i])
            if p is None:
                continue
            new[i] = g.work.add(p, [work.tokens[i]], [work.scores[i] - base_s])[0]
            old.append(i)
        g.expanded = {new[i] for i in self.expanded if i in new}
        g.order = sorted((-s, i) for i, s in enumerate(g.work.scores))
        return g, old


def accept(tree: Tree, target_next: torch.Tensor | Sequence[int] | Callable[[int], int]) -> tuple[list[int], int]:
    """Follow the target down the tree: returns (accepted nodes root→leaf, bonus token).

    ``target_next[0]`` is the target's token after the root, ``target_next[1 + i]`` after node i
    (its argmax when greedy, one draw from its distribution per node when sampling); or a callable
    ``target_next(i)`` (i = -1 for the root) asked only for the nodes the walk visits, so sampling
    draws one token per visited node rather than one per node of the tree. A child is
    accepted iff its token is the target's token at its parent; siblings are distinct, so at most
    one child matches and the accepted path is unique. The bonus is the target's token after the
    last accepted node: every pass yields between 1 and depth + 1 tokens, all of them the target's.
    """
    if callable(target_next):
        nxt_of = target_next
    else:
        nxt = target_next.tolist() if isinstance(target_next, torch.Tensor) else list(target_next)
        if len(nxt) != len(tree) + 1:
            raise ValueError(f"target_next has {len(nxt)} entries for a tree of {len(tree)} nodes (need n + 1)")

        def nxt_of(i: int) -> int:
            return nxt[i + 1]
    node, path = -1, []
    while (c := tree.child(node, t := int(nxt_of(node)))) is not None:
        path.append(c)
        node = c
    return path, t
