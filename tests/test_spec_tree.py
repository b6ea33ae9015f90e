"""SpecExec tree: structure, mask and positions, best-first growth, and greedy exactness (no model)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from offload_rt.spec.tree import Tree, accept, grow

V = 16  # small vocabulary: random drafts hit the target often enough to build real accepted paths


def next_token(prefix: list[int]) -> int:
    """The fake target's greedy next token: a deterministic mix of the last tokens and the length."""
    h = len(prefix) * 7919
    for t in prefix[-4:]:
        h = (h * 31 + t * 2654435761) & 0xFFFFFFFF
    return (h >> 7) % V


def seeded(ctx: list[int], salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(bytes(str((salt, ctx)), "ascii")))
    return g


def perfect_row(ctx):
    logits = torch.zeros(V)
    logits[next_token(ctx)] = 40.0
    return torch.log_softmax(logits, -1)


def random_row(ctx, salt=1):
    return torch.log_softmax(2.0 * torch.randn(V, generator=seeded(ctx, salt)), -1)


def adversarial_row(ctx):
    row = random_row(ctx, salt=2)
    row[next_token(ctx)] = -math.inf  # never proposed
    return row


def draft_fn(seq: list[int], row_fn, calls: list | None = None):
    """A fake draft for context ``seq`` (ending with the root token), checking what grow asks."""
    def fn(work: Tree, leaves: list[int]) -> torch.Tensor:
        if calls is not None:
            calls.append(list(leaves))
        assert leaves == [-1] or (-1 not in leaves and len(set(leaves)) == len(leaves))
        return torch.stack([row_fn(seq + work.path_tokens(i)) for i in leaves])
    return fn


def target_next(seq: list[int], tree: Tree) -> list[int]:
    return [next_token(seq)] + [next_token(seq + tree.path_tokens(i)) for i in range(len(tree))]


def trie(paths: list[tuple[int, ...]]) -> tuple[Tree, list[tuple[int, ...]]]:
    """Build a tree from token sequences (prefix-closed); returns it and each node's sequence."""
    tree, index, seqs = Tree(), {(): -1}, []
    for p in sorted(set(paths), key=len):
        index[p] = tree.add(index[p[:-1]], [p[-1]], [-float(len(p))])[0]
        seqs.append(p)
    return tree, seqs


def random_paths(seed: int, n: int, depth: int, vocab: int = 3) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = set()
    for _ in range(n):
        d = int(torch.randint(1, depth + 1, (1,), generator=g))
        p = tuple(torch.randint(0, vocab, (d,), generator=g).tolist())
        out.update(p[:k] for k in range(1, d + 1))
    return list(out)


def check_invariants(tree: Tree, budget: int, max_depth: int) -> None:
    assert 1 <= len(tree) <= budget
    for i in range(len(tree)):
        p = tree.parents[i]
        assert -1 <= p < i  # parent present and earlier
        assert tree.depths[i] == (1 if p < 0 else tree.depths[p] + 1) <= max_depth
        if p >= 0:
            assert tree.scores[i] < tree.scores[p]  # decay < 0: strictly falling along paths
    for i in [-1] + list(range(len(tree))):
        toks = [tree.tokens[c] for c in tree.children(i)]
        assert len(toks) == len(set(toks))  # siblings distinct


# --- structure -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_and_positions_match_prefix_relation(seed):
    tree, seqs = trie(random_paths(seed, n=25, depth=6))
    mask = tree.attention_mask()
    want = torch.tensor([[a[:len(b)] == b for b in seqs] for a in seqs])
    assert torch.equal(mask, want)
    rows = [len(tree) - 1, 0, len(tree) // 2]
    assert torch.equal(tree.attention_mask(rows), want[rows])
    assert tree.positions(100).tolist() == [100 + len(s) - 1 for s in seqs]
    assert tree.positions(5, rows).tolist() == [5 + len(seqs[r]) - 1 for r in rows]
    for i, s in enumerate(seqs):
        assert tuple(tree.path_tokens(i)) == s
        assert [tuple(seqs[c]) for c in tree.children(i)] == [t for t in seqs if len(t) == len(s) + 1 and t[:-1] == s]
    assert tree.input_ids().tolist() == [s[-1] for s in seqs]


def test_add_rejects_bad_nodes():
    tree = Tree()
    a, b = tree.add(-1, [3, 4], [-0.1, -0.2])
    assert tree.children(-1) == [a, b] and tree.depths == [1, 1]
    with pytest.raises(ValueError, match="already a child"):
        tree.add(-1, [3], [-1.0])
    with pytest.raises(ValueError, match="not a node"):
        tree.add(5, [1], [-1.0])
    with pytest.raises(ValueError, match="scores"):
        tree.add(a, [1, 2], [-1.0])
    c = tree.add(a, [1], [-0.5])[0]
    with pytest.raises(ValueError, match="without its parent"):
        tree.select([c])
    sub = tree.select([c, a])
    assert sub.tokens == [3, 1] and sub.parents == [-1, 0] and sub.origin == [a, c]


# --- acceptance ------------------------------------------------------------------------------

def reference_accept(tree: Tree, nxt: list[int]) -> tuple[list[int], int]:
    """Brute force: the deepest node whose whole path agrees with the target, then its next token."""
    best = []
    for i in range(len(tree)):
        path = tree.path(i)
        ok = all(tree.tokens[j] == nxt[(tree.parents[j]) + 1] for j in path)
        if ok and len(path) > len(best):
            best = path
    return best, nxt[(best[-1] if best else -1) + 1]


@pytest.mark.parametrize("seed", range(6))
def test_accept_matches_brute_force_and_autoregressive(seed):
    tree, seqs = trie(random_paths(seed, n=40, depth=7))
    prefix = [seed, 5]
    g = torch.Generator().manual_seed(seed)
    for trial in range(5):
        if trial == 0:  # the target agrees with one deep path: acceptance must go all the way
            deep = max(range(len(tree)), key=lambda i: tree.depths[i])
            on = set(tree.path(deep))
            nxt = [tree.tokens[tree.path(deep)[0]]] + [
                tree.tokens[tree.path(deep)[tree.depths[i]]] if i in on and i != deep else 0 for i in range(len(tree))]
        else:
            nxt = torch.randint(0, 3, (len(tree) + 1,), generator=g).tolist()
        nodes, bonus = accept(tree, torch.tensor(nxt))
        assert (nodes, bonus) == reference_accept(tree, nxt)
        if trial == 0:
            assert nodes == tree.path(deep)
        # the emitted tokens are what the target produces one token at a time
        target = {tuple(prefix) + s: nxt[i + 1] for i, s in enumerate(seqs)} | {tuple(prefix): nxt[0]}
        out, ctx = [], tuple(prefix)
        for _ in range(len(nodes) + 1):
            t = target[ctx]
            out.append(t)
            ctx = ctx + (t,)
        assert [tree.tokens[i] for i in nodes] + [bonus] == out
    with pytest.raises(ValueError, match="n \\+ 1"):
        accept(tree, [0] * len(tree))


# --- growth ----------------------------------------------------------------------------------

def implicit_top(row_fn, budget, k, max_depth, decay):
    """Brute force: every node of the tree where each node has its k most likely draft tokens, the best ``budget``."""
    nodes, frontier = [], [((), 0.0)]
    while frontier:
        path, score = frontier.pop()
        if len(path) == max_depth:
            continue
        vals, toks = torch.topk(row_fn(list(path)).float(), k)
        for v, t in zip(vals.tolist(), toks.tolist()):
            s = score + decay + min(v, 0.0)
            nodes.append((s, path + (t,)))
            frontier.append((path + (t,), s))
    nodes.sort(key=lambda x: -x[0])
    return {p for _s, p in nodes[:budget]}


@pytest.mark.parametrize("budget", [1, 5, 20, 60, 500])
@pytest.mark.parametrize("max_batch", [1, 4, 128])
def test_grow_keeps_exactly_the_best_nodes(budget, max_batch):
    """Best-first growth with the sound stop finds the budget best nodes of the implicit tree."""
    row = lambda ctx: random_row([9] + ctx, salt=3)  # noqa: E731
    k, depth, decay = 3, 4, math.log(0.95)  # implicit tree: 3 + 9 + 27 + 81 = 120 nodes
    tree = grow(draft_fn([9], lambda c: row(c[1:])), budget, max_children=k, max_batch=max_batch,
                max_depth=depth, decay=decay)
    check_invariants(tree, budget, depth)
    assert {tuple(tree.path_tokens(i)) for i in range(len(tree))} == implicit_top(row, budget, k, depth, decay)
    assert len(tree) == min(budget, 120)


@pytest.mark.parametrize("row_fn", [perfect_row, random_row, adversarial_row])
@pytest.mark.parametrize("budget", [1, 7, 64])
def test_grow_invariants_and_draft_calls(row_fn, budget):
    seq, calls = [1, 2, 3], []
    tree = grow(draft_fn(seq, row_fn, calls), budget, max_children=4, max_batch=8, max_depth=10)
    check_invariants(tree, budget, 10)
    assert calls[0] == [-1] and all(0 < len(c) <= 8 for c in calls)
    asked = [i for c in calls[1:] for i in c]
    assert len(asked) == len(set(asked))  # each working node is expanded once
    assert tree.origin is not None and len(tree.origin) == len(tree) and tree.origin == sorted(tree.origin)


def test_origin_maps_to_working_tree_and_parents_expanded_first():
    seq, snapshots = [4, 4], []

    def fn(work, leaves):
        for i in leaves:
            if i >= 0:
                p = work.parents[i]
                assert p == -1 or any(p in s for s in snapshots)  # parent went through the draft earlier
        snapshots.append(list(leaves))
        fn.work = work
        return torch.stack([random_row(seq + work.path_tokens(i)) for i in leaves])

    tree = grow(fn, 30, max_children=5, max_batch=3, max_depth=6)
    work = fn.work
    for i, o in enumerate(tree.origin):
        assert tree.path_tokens(i) == work.path_tokens(o) and tree.scores[i] == work.scores[o]


@pytest.mark.parametrize("decay", [math.log(0.95), 0.0])
@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_perfect_draft_builds_a_long_enough_chain(budget, decay):
    max_depth, seq = 16, [7, 1, 3]
    tree = grow(draft_fn(seq, perfect_row), budget, max_depth=max_depth, decay=decay)
    nodes, bonus = accept(tree, target_next(seq, tree))
    assert len(nodes) + 1 >= min(budget, max_depth) + 1


def test_grow_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        grow(draft_fn([1], random_row), 0)
    with pytest.raises(ValueError, match="shape"):
        grow(lambda work, leaves: torch.zeros(len(leaves) + 1, V), 4)


# --- exactness -------------------------------------------------------------------------------

@pytest.mark.parametrize("row_fn", [perfect_row, random_row, adversarial_row])
@pytest.mark.parametrize("budget", [1, 5, 64])
def test_speculative_greedy_equals_autoregressive(row_fn, budget):
    prompt, n = [3, 1, 4, 1, 5], 48
    want = list(prompt)
    while len(want) < len(prompt) + n:
        want.append(next_token(want))
    seq, passes = list(prompt), 0
    while len(seq) < len(prompt) + n:
        tree = grow(draft_fn(seq, row_fn), budget, max_children=4, max_batch=16, max_depth=12)
        nodes, bonus = accept(tree, target_next(seq, tree))
        assert 1 <= len(nodes) + 1 <= max(tree.depths) + 1
        seq += [tree.tokens[i] for i in nodes] + [bonus]
        passes += 1
    assert seq[:len(want)] == want
    if row_fn is adversarial_row:
        assert passes == n  # nothing drafted is ever accepted: one token per pass
    if row_fn is perfect_row and budget > 1:
        assert passes < n / 4


@pytest.mark.parametrize("budget", [1, 5, 12])
def test_perfect_draft_costs_one_call_per_level(budget):
    """Leaves whose children cannot beat the worst kept node are never sent to the draft."""
    seq, calls = [2, 2], []
    tree = grow(draft_fn(seq, perfect_row, calls), budget, max_batch=1, max_depth=16)
    assert len(calls) == budget  # the root, then each chain node but the last
    assert sorted(tree.depths) == list(range(1, budget + 1))


def test_positive_draft_logprobs_never_raise_scores():
    """Rounding can give log p slightly above 0; clamping keeps scores falling so trimming stays ancestor-closed."""
    seq = [6]
    tree = grow(draft_fn(seq, lambda c: perfect_row(c) + 1e-3), 6, max_depth=8, decay=0.0)
    for i, p in enumerate(tree.parents):
        assert p < 0 or tree.scores[i] <= tree.scores[p]
    assert max(tree.scores) <= 0.0


def test_root_rows():
    """-1 (the root) is a valid row for positions and masks (the draft's first call), not for token ids."""
    tree, seqs = trie([(1,), (1, 2), (0,)])
    deep = seqs.index((1, 2))
    assert tree.positions(10, [-1, deep]).tolist() == [9, 11]
    assert tree.attention_mask([-1, deep]).tolist() == [[False] * 3, [s == (1,) or s == (1, 2) for s in seqs]]
    with pytest.raises(ValueError, match="root"):
        tree.input_ids([-1])
    with pytest.raises(ValueError, match="rows"):
        tree.positions(0, [3])
