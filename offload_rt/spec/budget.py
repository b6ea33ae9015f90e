"""How many tree nodes to verify per target pass (``--spec-budget``'s default): pure policy, no tensors.

A best-first tree of B nodes is worth 1 + the sum of its nodes' probabilities of being accepted
(the bonus token, plus every node whose whole path the target agrees with). Before any run we do
not know the draft's quality, so :func:`expected_tokens` models it with one number, the draft's
*agreement* ``a``: the target's next token is the draft's k-th guess with probability a(1-a)^(k-1)
(geometric: the draft's favourite is right with probability a, and so on down its list), the same
at every node. The best B nodes of that tree are what SpecExec's search would keep.

A pass then costs the target's sweep (streaming dominates: nearly flat in the number of tokens
until the compute of B tokens overtakes it) plus the draft's calls (about one per tree level, each
a resident pass over up to a batch of leaves). :func:`choose_budget` picks the power of two in
8…1024 with the most predicted tokens per second.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

MIN_BUDGET, MAX_BUDGET = 8, 1024  # --spec-budget's range
AGREEMENT_SELF_INT4 = 0.80  # the target's own int4 weights as the draft (measured on D2, docs/BENCHMARKS.md)
AGREEMENT_DRAFT = 0.60  # a separate smaller model of the same family


@dataclass(frozen=True)
class PassCost:
    """Seconds, from the placement and the measured rates."""

    target_fixed_s: float  # one target pass over one token (the sweep: streaming or resident compute)
    target_token_s: float  # each further token of a batched target pass (its compute)
    draft_fixed_s: float  # one draft pass over one token
    draft_token_s: float  # each further token of a batched draft pass

    def target_pass_s(self, tokens: int) -> float:
        """A pass over ``tokens``: the weights' sweep hides the compute of a batch up to its own length."""
        return max(self.target_fixed_s, self.target_token_s * tokens)

    def draft_s(self, budget: int, levels: int, batch: int = 128) -> float:
        """Building a tree of ``budget`` nodes ``levels`` deep: one call per level at least, more when a
        level's leaves exceed a batch; every node is scored about once."""
        calls = 1 + max(levels, math.ceil(budget / batch))
        return calls * self.draft_fixed_s + budget * self.draft_token_s


def expected_tokens(budget: int, agreement: float, *, max_children: int = 8, max_depth: int = 32) -> tuple[float, int]:
    """(expected tokens per pass, depth of the tree) for the ``budget`` most likely nodes under the
    geometric agreement model (see the module docstring)."""
    a = min(max(agreement, 1e-6), 1 - 1e-6)
    child = [a * (1 - a) ** k for k in range(max_children)]
    heap = [(-child[k], 1, k) for k in range(max_children)]  # (-path probability, depth, rank)
    heapq.heapify(heap)
    total, depth = 1.0, 0
    for _ in range(budget):
        if not heap:
            break
        p, d, _k = heapq.heappop(heap)
        total += -p
        depth = max(depth, d)
        if d < max_depth:
            for k in range(max_children):
                heapq.heappush(heap, (p * child[k], d + 1, k))
    return total, depth


def budgets() -> list[int]:
    out, b = [], MIN_BUDGET
    while b <= MAX_BUDGET:
        out.append(b)
        b *= 2
    return out


def predict(budget: int, cost: PassCost, agreement: float) -> tuple[float, float]:
    """(tokens per pass, tokens per second) predicted for ``budget``."""
    tokens, depth = expected_tokens(budget, agreement)
    seconds = cost.target_pass_s(budget + 1) + cost.draft_s(budget, depth)
    return tokens, tokens / seconds if seconds > 0 else math.inf


def choose_budget(cost: PassCost, agreement: float, sizes: list[int] | None = None) -> int:
    """The budget among ``sizes`` (default :func:`budgets`) with the most predicted tokens per second
    (the smaller on a tie)."""
    return max(sizes or budgets(), key=lambda b: (round(predict(b, cost, agreement)[1], 9), -b))


def check_budget(budget: int) -> int:
    """``--spec-budget`` within its range, else a UsageError-worthy ValueError."""
    if not MIN_BUDGET <= budget <= MAX_BUDGET:
        raise ValueError(f"--spec-budget {budget} is outside {MIN_BUDGET}…{MAX_BUDGET}; pick a tree size in that range")
    return budget
