"""Speculative decoding end to end on tiny random models (issue 12, "What must be true").

A tiny target with a 16-token vocabulary and two drafts: the target itself (high acceptance, long
accepted paths) and a model with other weights (low acceptance). Checked against references that do
not go through the speculation code:

* sampling keeps the target's distribution: the joint distribution of the 2nd and 3rd generated
  tokens (both out of verification passes) against the exact one, enumerated with the target's
  plain prefills, by Pearson's chi-square; a deliberately biased acceptance fails the same test;
* greedy speculation gives the autoregressive greedy tokens (budgets 1…32, KV dense and in chunks);
* after speculative steps both caches hold, row for row, the K/V an autoregressive run over the
  accepted sequence computes (KV dense, in RAM chunks, spilled to disk);
* greedy speculation runs to the last row of the context window (trees cut to the room left);
* a KeyboardInterrupt in the draft or in verification leaves both engines consistent: new answers
  (speculative or autoregressive) give a clean run's tokens and caches, also to a prompt made of the
  very tokens whose tree rows were abandoned (the prefix-reusing prefill must not reuse those rows).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from offload_rt.config import SamplingConfig
from offload_rt.engine import Engine, ResidentWeights, model_groups
from offload_rt.generate import autoregressive
from offload_rt.kv.dense import DenseKV
from offload_rt.kv.tiered import TieredKV
from offload_rt.memory.kv_plan import STAGING_BATCH
from offload_rt.models import llama
from offload_rt.models.llama import LlamaArgs
from offload_rt.sampling import make_sampler
from offload_rt.spec import speculate
from offload_rt.spec.draft import Draft
from offload_rt.spec.speculate import Speculator
from offload_rt.threads import torch_threads
from tests.hf_models import tiny_model

V = 16  # vocabulary: the joint law of two tokens has 256 outcomes (~90 bins once rare ones are pooled)
MAX_TOKENS = 128  # both caches: prompt + answer + a budget-32 tree (the draft takes two rows per node)
PROMPT = [3, 1, 4, 1, 5]
PROMPTS = [PROMPT, [7, 7, 2], [0, 9, 8, 6, 12, 2, 11]]
TARGET, OTHER = 1, 2  # model seeds: the target, and the draft that is not the target
HEAD_SCALE = 6.0  # sharpens the random head: a few likely tokens per position, as in a real model
ROWS_ATOL, ROWS_RTOL = 2e-6, 1e-5  # float32 K/V (|x| ≤ ~0.5): a tree pass vs one token at a time, observed ≤ 2e-7
CHI2_Z = 3.0902  # standard normal quantile of 0.999: each fit test errs once in a thousand seeds


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (a tiny model's matrices gain nothing from a pool on a shared machine), no autograd."""
    with torch_threads(1), torch.inference_mode():
        yield


@pytest.fixture
def closing():
    """Engines to close after the test, passed or not (a spilled cache's store and reader thread)."""
    engines: list[Engine] = []
    yield engines
    for e in engines:
        e.close()


@lru_cache(maxsize=None)
def model(seed: int) -> tuple[LlamaArgs, dict[str, torch.Tensor]]:
    hf = tiny_model("llama", seed=seed, vocab_size=V, num_hidden_layers=2, max_position_embeddings=MAX_TOKENS)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    sd[llama.LM_HEAD] *= HEAD_SCALE
    return LlamaArgs.from_config(hf.config.to_dict()), sd


def make_cache(args: LlamaArgs, kind: str, disk: Path | None = None, max_tokens: int = MAX_TOKENS):
    """``dense``; ``tiered``: 4-token chunks all in RAM; ``disk``: 4-token chunks, three RAM slots per layer,
    the rest spilled under ``disk``."""
    shape = (args.num_hidden_layers, args.num_key_value_heads, args.head_dim, torch.float32, max_tokens)
    if kind == "dense":
        return DenseKV(*shape)
    if kind == "tiered":
        return TieredKV(*shape, host_chunks=args.num_hidden_layers * -(-max_tokens // 4), chunk_tokens=4)
    assert kind == "disk" and disk is not None
    disk.mkdir(parents=True, exist_ok=True)
    return TieredKV(*shape, host_chunks=3 * args.num_hidden_layers, staging_chunks=2 * STAGING_BATCH,
                    disk_root=disk, chunk_tokens=4)


def make_engine(seed: int, kind: str = "dense", disk: Path | None = None, max_tokens: int = MAX_TOKENS) -> Engine:
    args, sd = model(seed)
    src = ResidentWeights(model_groups(args), lambda n: sd[n], llama.EMBED)
    return Engine(args, src, torch.float32, max_tokens=max_tokens, prefill_chunk=max_tokens,
                  cache=make_cache(args, kind, disk, max_tokens))


def make_spec(draft_seed: int, budget: int, kind: str = "dense", disk: Path | None = None,
              max_tokens: int = MAX_TOKENS) -> Speculator:
    return Speculator(Draft(make_engine(draft_seed, kind, disk, max_tokens), vocab=V), budget)


GREEDY = make_sampler(SamplingConfig(temperature=0.0))


def take(tokens, n: int) -> list[int]:
    """The first n tokens of an endless token iterator, which is then closed."""
    out = list(itertools.islice(tokens, n))
    tokens.close()
    return out


@lru_cache(maxsize=None)
def autoregressive_greedy(prompt: tuple[int, ...], n: int) -> list[int]:
    eng = make_engine(TARGET)
    return take(autoregressive(eng, GREEDY, eng.prefill(list(prompt))), n)


# ---------------------------------------------------------------- the chi-square machinery


def chi2_critical(df: int, z: float = CHI2_Z) -> float:
    """Upper quantile of chi-square with ``df`` degrees of freedom (Wilson–Hilferty; within 1% for df ≥ 10)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: Counter, probs: dict, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom for observed ``counts`` against ``probs``.

    Outcomes expected fewer than ``min_expected`` times are pooled into one bin (grown with the
    next-rarest outcomes until it reaches ``min_expected``); an observed outcome of probability zero
    makes the statistic infinite.
    """
    n = sum(counts.values())
    if any(probs.get(k, 0.0) <= 0.0 for k in counts):
        return math.inf, 1
    bins = sorted(((n * p, counts.get(k, 0)) for k, p in probs.items() if p > 0), reverse=True)
    while len(bins) > 1 and bins[-1][0] < min_expected:  # pool the rarest into the next rarest
        e, o = bins.pop()
        e2, o2 = bins.pop()
        bins.append((e + e2, o + o2))
        bins.sort(reverse=True)
    return sum((o - e) ** 2 / e for e, o in bins), len(bins) - 1


def test_chi2_critical_values_match_the_table():
    # chi-square upper 0.1% points (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.4)
    for df, table in ((10, 29.588), (20, 45.315), (50, 86.661), (100, 149.449)):
        assert abs(chi2_critical(df) - table) / table < 0.01, df


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The law a sampler with ``cfg`` draws from (float64): temperature, then top-k, then top-p."""
    x = logits.double() / cfg.temperature
    if cfg.top_k:
        x = x.masked_fill(x < torch.topk(x, cfg.top_k).values[-1], -math.inf)
    p = torch.softmax(x, -1)
    if cfg.top_p < 1.0:
        sp, order = torch.sort(p, descending=True)
        before = torch.cumsum(sp, 0) - sp  # the mass of the more likely tokens
        p = torch.zeros_like(p).scatter(0, order, sp * (before <= cfg.top_p))
        p /= p.sum()
    return p


def exact_pairs(cfg: SamplingConfig) -> dict[tuple[int, int], float]:
    """P(2nd, 3rd generated token) after PROMPT, summed over the 1st: every continuation by plain prefills."""
    eng = make_engine(TARGET)
    out: dict[tuple[int, int], float] = {}
    p1 = target_probs(eng.prefill(PROMPT), cfg)
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = target_probs(eng.prefill(PROMPT + [t1]), cfg)
        for t2 in torch.nonzero(p2).flatten().tolist():
            p3 = target_probs(eng.prefill(PROMPT + [t1, t2]), cfg) * (p1[t1] * p2[t2])
            for t3, p in enumerate(p3.tolist()):
                if p > 0:
                    out[(t2, t3)] = out.get((t2, t3), 0.0) + p
    assert abs(sum(out.values()) - 1.0) < 1e-9
    return out


def speculative_pairs(target: Engine, spec: Speculator, cfg: SamplingConfig, n: int) -> Counter:
    """(2nd, 3rd) token of ``n`` speculative answers to PROMPT, both engines reset before each."""
    sampler = make_sampler(cfg)
    counts: Counter = Counter()
    for _ in range(n):
        target.reset()
        spec.draft.reset()
        _t1, t2, t3 = take(spec.tokens(target, sampler, target.prefill(PROMPT)), 3)
        counts[(t2, t3)] += 1
    return counts


SAMPLES = 800
PLAIN = SamplingConfig(temperature=1.0, seed=1234)
TRUNCATED = SamplingConfig(temperature=0.7, top_k=6, top_p=0.85, seed=4321)


@pytest.mark.parametrize("cfg", [PLAIN, TRUNCATED], ids=["t1", "t0.7-k6-p0.85"])
@pytest.mark.parametrize("draft, budget", [(OTHER, 4), (TARGET, 16)], ids=["other-draft", "self-draft"])
def test_speculative_sampling_keeps_the_targets_joint_distribution(draft, budget, cfg):
    target, spec = make_engine(TARGET), make_spec(draft, budget)
    counts = speculative_pairs(target, spec, cfg, SAMPLES)
    stat, df = chi_square(counts, exact_pairs(cfg))
    assert df >= 10  # the law is spread enough for the test to mean something
    assert stat < chi2_critical(df), (stat, df, chi2_critical(df))
    # the trees were used: tokens 2 and 3 came out of verification passes, accepted paths among them
    st = spec.stats
    assert st.passes >= SAMPLES and st.accepted_tokens > SAMPLES // 10, st.as_dict()
    if draft == TARGET:
        assert st.tokens / st.passes > 1.4, st.as_dict()  # its own draft: long accepted paths


def lenient_accept(tree, target_next):
    """A plausible bug: when the target's draw at the root is none of its children, descend into the
    draft's favourite child anyway (a drafted token emitted that the target did not choose)."""
    node, path = -1, []
    while True:
        t = int(target_next(node))
        c = tree.child(node, t)
        if c is None and node == -1 and tree.children(-1):
            c = tree.children(-1)[0]
        if c is None:
            return path, t
        path.append(c)
        node = c


def test_the_fit_test_detects_a_biased_acceptance(monkeypatch):
    monkeypatch.setattr(speculate, "accept", lenient_accept)
    target, spec = make_engine(TARGET), make_spec(OTHER, 4)
    counts = speculative_pairs(target, spec, PLAIN, SAMPLES)
    stat, df = chi_square(counts, exact_pairs(PLAIN))
    assert stat > chi2_critical(df), (stat, df, chi2_critical(df))


# ---------------------------------------------------------------- greedy: token for token


def assert_greedy_answers(target: Engine, spec: Speculator, n: int) -> None:
    """Each of PROMPTS answered greedily by speculation (both engines reset): the autoregressive tokens."""
    for prompt in PROMPTS:
        target.reset()
        spec.draft.reset()
        got = take(spec.tokens(target, GREEDY, target.prefill(prompt)), n)
        assert got == autoregressive_greedy(tuple(prompt), n), (spec.budget, prompt)


@pytest.mark.parametrize("draft", [TARGET, OTHER], ids=["self-draft", "other-draft"])
@pytest.mark.parametrize("kind", ["dense", "tiered"])
def test_greedy_speculation_equals_autoregressive_greedy(kind, draft):
    target = make_engine(TARGET, kind)
    spec = make_spec(draft, 1)
    n = 20
    for budget in (1, 3, 8, 32):
        spec.budget = budget
        spec.new_answer()
        assert_greedy_answers(target, spec, n)
        st = spec.stats
        assert st.tree_nodes > 0 and st.accepted_tokens > 0, (budget, st.as_dict())  # trees verified, used
        if draft == TARGET:  # its own draft: its first guess is the target's (but for near-ties)
            assert st.tokens / st.passes >= 1.9, (budget, st.as_dict())


@pytest.mark.parametrize("draft", [TARGET, OTHER], ids=["self-draft", "other-draft"])
def test_greedy_speculation_runs_to_the_end_of_the_context(draft):
    """Near the end of the window the tree shrinks to the target's room, then to nothing (a plain step);
    the draft's cache is sized as the app sizes it (context + two rows per node + 1)."""
    ctx, budget = 40, 8
    target = make_engine(TARGET, "tiered", max_tokens=ctx)
    spec = make_spec(draft, budget, "tiered", max_tokens=ctx + 2 * budget + 1)
    n = ctx - len(PROMPT) + 1  # as many as fit: the last step is a plain one into the cache's last row
    got = take(spec.tokens(target, GREEDY, target.prefill(PROMPT)), n)
    assert got == autoregressive_greedy(tuple(PROMPT), n)
    assert target.cache.offset == ctx and target.tokens == PROMPT + got[:-1]
    assert spec.stats.tree_nodes < spec.stats.passes * budget  # trees were cut to the room left


# ---------------------------------------------------------------- both caches after acceptance


def assert_cache_is_autoregressive(engine: Engine, seed: int) -> None:
    """``engine``'s cache rows [0, offset) are those of model ``seed`` decoding ``engine.tokens`` one at a time."""
    assert engine.cache.offset == len(engine.tokens)
    ref = make_engine(seed)
    for t in engine.tokens:
        ref.forward([t])
    for layer in range(engine.args.num_hidden_layers):
        got, want = engine.cache.rows(layer, 0, engine.cache.offset), ref.cache.rows(layer, 0, ref.cache.offset)
        for g, w, what in zip(got, want, "kv"):
            assert g.shape == w.shape
            bad = (~torch.isclose(g, w, atol=ROWS_ATOL, rtol=ROWS_RTOL)).flatten(1).any(1).nonzero().flatten()
            assert not len(bad), f"layer {layer} {what}: rows {bad.tolist()} differ, max {(g - w).abs().max():.3g}"


def test_cache_rows_read_each_tier(tmp_path):
    """``rows`` (what the cache comparisons read) against the values written, any range, RAM and disk chunks."""
    args, _ = model(TARGET)
    caches = [make_cache(args, kind, tmp_path) for kind in ("dense", "tiered", "disk")]
    gen = torch.Generator().manual_seed(3)
    kv = [torch.randn(37, args.num_key_value_heads, args.head_dim, generator=gen) for _ in range(4)]  # k, v per layer
    for cache in caches:
        for layer in range(2):
            q = torch.zeros(37, args.num_attention_heads, args.head_dim)
            cache.attend(layer, q, kv[2 * layer], kv[2 * layer + 1])
        cache.commit(37)
    assert caches[2].tier_bytes()["disk"] > 0
    for cache in caches:
        for layer, lo, hi in ((0, 0, 37), (1, 5, 23), (1, 8, 9), (0, 36, 37), (0, 12, 12)):
            k, v = cache.rows(layer, lo, hi)
            assert torch.equal(k, kv[2 * layer][lo:hi]) and torch.equal(v, kv[2 * layer + 1][lo:hi])
        with pytest.raises(ValueError):
            cache.rows(0, 30, 38)
    caches[2].close()


def run_steps(target: Engine, spec: Speculator, sampler, prompt: list[int], steps: int) -> list[int]:
    """``steps`` speculation steps after ``prompt``; returns the whole sequence (prompt + emitted tokens)."""
    seq = list(prompt)
    root = sampler(target.prefill(prompt))
    seq.append(root)
    for _ in range(steps):
        out = spec.step(target, sampler, root)
        seq += out
        root = out[-1]
    return seq


@pytest.mark.parametrize("draft", [TARGET, OTHER], ids=["self-draft", "other-draft"])
@pytest.mark.parametrize("kind", ["dense", "tiered", "disk"])
def test_after_acceptance_both_caches_equal_an_autoregressive_runs(tmp_path, closing, kind, draft):
    target = make_engine(TARGET, kind, tmp_path / "target")
    spec = make_spec(draft, 12, kind, tmp_path / "draft")
    closing += [target, spec.draft.engine]
    sampler = make_sampler(SamplingConfig(temperature=1.0, seed=7))
    seq = run_steps(target, spec, sampler, PROMPT, steps=10)
    assert target.tokens == seq[:-1]  # everything but the last root
    d = spec.draft.engine
    # the draft keeps the accepted sequence up to the last root and the accepted nodes it scored
    assert len(PROMPT) < len(d.tokens) <= len(target.tokens) and d.tokens == target.tokens[:len(d.tokens)]
    assert spec.stats.accepted_tokens > 0
    if kind == "disk":
        assert target.cache.tier_bytes()["disk"] > 0 and d.cache.tier_bytes()["disk"] > 0
    assert_cache_is_autoregressive(target, TARGET)
    assert_cache_is_autoregressive(d, draft)


# ---------------------------------------------------------------- Ctrl-C mid-tree


class Interrupt:
    """Raises KeyboardInterrupt on the ``k``-th call for which ``when(*args, **kw)`` holds, after keeping
    ``snapshot()`` (what the engines hold at that moment) in :attr:`state`."""

    def __init__(self, k: int, when=lambda *a, **kw: True, snapshot=lambda: None):
        self.k, self.when, self.snapshot = k, when, snapshot
        self.calls, self.fired, self.state = 0, False, None

    def wrap(self, fn):
        def wrapped(*args, **kw):
            if not self.fired and self.when(*args, **kw):
                self.calls += 1
                if self.calls == self.k:
                    self.fired, self.state = True, self.snapshot()
                    raise KeyboardInterrupt
            return fn(*args, **kw)
        return wrapped


WHERE = ["draft-first-step", "draft-later-step", "verify-pass", "verify-mid-layer", "accept"]


def answer_matches_a_clean_run(target: Engine, spec: Speculator, prompt: list[int], n: int, ar: bool) -> None:
    """A new answer to ``prompt`` on these engines (speculative, then ``ar``: autoregressive) has the
    clean run's greedy tokens, and leaves caches an autoregressive run would leave."""
    clean = autoregressive_greedy(tuple(prompt), n)
    assert take(spec.tokens(target, GREEDY, target.prefill(prompt)), n) == clean
    assert_cache_is_autoregressive(target, TARGET)
    assert_cache_is_autoregressive(spec.draft.engine, OTHER)
    if ar:
        assert take(autoregressive(target, GREEDY, target.prefill(prompt)), n) == clean
        assert_cache_is_autoregressive(target, TARGET)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kind", ["dense", "disk"])
def test_an_interrupted_step_leaves_both_engines_consistent(tmp_path, monkeypatch, closing, kind, where):
    """Ctrl-C in the draft's growth, in the target's pass (before it, between two layers) or in the walk
    down the tree. Then two new answers: one to a prompt that *is* the token list the engines held at
    the interrupt, tree rows included (a prefix-reusing prefill that kept those rows would reuse them:
    right tokens, wrong positions and masks), and one to the first prompt."""
    n = 16
    target = make_engine(TARGET, kind, tmp_path / "target")
    spec = make_spec(OTHER, 8, kind, tmp_path / "draft")
    d = spec.draft.engine
    closing += [target, d]

    def held() -> list[int]:
        """The longer token list of the two engines (with the tree rows a step has not settled yet)."""
        return max(list(target.tokens), list(d.tokens), key=len)

    sampler = GREEDY
    if where.startswith("draft"):  # a batch of leaves after the step's first: the draft holds tree rows
        hit = Interrupt(1 if where == "draft-first-step" else 3,
                        lambda draft, _work, leaves: leaves != [-1] and len(draft.engine.tokens) > draft.base, held)
        monkeypatch.setattr(Draft, "logprobs", hit.wrap(Draft.logprobs))
    elif where == "verify-pass":
        hit = Interrupt(3, lambda ids, **kw: kw.get("all_logits", False), held)
        monkeypatch.setattr(target, "forward", hit.wrap(target.forward))
    elif where == "verify-mid-layer":  # layer 0 has written the tree's rows, layer 1 never does
        hit = Interrupt(3, lambda layer, *a, tree_mask=None, **kw: layer == 1 and tree_mask is not None, held)
        monkeypatch.setattr(target.cache, "attend", hit.wrap(target.cache.attend))
    else:  # a draw of the walk down the tree, after the verification pass committed the tree
        hit = Interrupt(6, snapshot=held)
        sampler = hit.wrap(GREEDY)
    with pytest.raises(KeyboardInterrupt):
        take(spec.tokens(target, sampler, target.prefill(PROMPT)), n)
    assert hit.fired
    monkeypatch.undo()
    if where.startswith("draft"):  # the target is left as the last finished step left it
        assert (target.cache.offset > len(PROMPT)) == (where == "draft-later-step")
    for eng in (target, d):
        assert eng.cache.offset == len(eng.tokens)
    abandoned = hit.state
    assert len(abandoned) > len(target.tokens) + 2  # rows of an unfinished tree were there
    answer_matches_a_clean_run(target, spec, abandoned, n, ar=False)
    answer_matches_a_clean_run(target, spec, PROMPT, n, ar=True)


# ---------------------------------------------------------------- overlapped drafting (issue 22)
#
# The draft grows on during the target's pass (offload_rt.spec.ahead) and the part of that growth under
# where the pass ended is the next step's tree. ``ahead_complete`` lets the growth end by itself before
# the pass's outcome is used, so that what is carried does not depend on timing; the free-running
# thread is the run's own mode and must give the same tokens.


def make_overlap_spec(draft_seed: int, budget: int, *, complete: bool = True, kind: str = "dense",
                      disk: Path | None = None) -> Speculator:
    """A speculator with overlapped drafting; the draft's cache sized as the app sizes it (spec.setup)."""
    from offload_rt.spec.setup import draft_rows

    spec = Speculator(Draft(make_engine(draft_seed, kind, disk, MAX_TOKENS + draft_rows(budget, True)), vocab=V),
                      budget, overlap=True)
    spec.ahead_complete = complete
    return spec


@pytest.mark.parametrize("complete", [True, False], ids=["carried", "free-running"])
@pytest.mark.parametrize("draft", [TARGET, OTHER], ids=["self-draft", "other-draft"])
def test_overlapped_drafting_equals_autoregressive_greedy(draft, complete):
    target = make_engine(TARGET)
    n = 20
    for budget in (3, 8):
        spec = make_overlap_spec(draft, budget, complete=complete)
        assert_greedy_answers(target, spec, n)
        st = spec.stats
        assert st.accepted_tokens > 0 and st.ahead_s > 0, st.as_dict()
        if complete:  # some passes ended where the draft had grown on: their trees were carried over
            assert st.carried > 0, (budget, st.as_dict())


def test_a_carried_tree_holds_the_drafts_rows_for_its_paths():
    """Each row a carried tree brings along is the draft's K/V for its node at its place: what the draft
    computes for the accepted sequence followed by the node's path, one token at a time."""
    target, spec = make_engine(TARGET), make_overlap_spec(OTHER, 8)
    root = GREEDY(target.prefill(PROMPT))
    checked = 0
    for _ in range(12):
        root = spec.step(target, GREEDY, root)[-1]
        g, d = spec._carried, spec.draft
        if g is None:
            continue
        assert d.carries(target.tokens + [root])
        for row, node in enumerate(d._fed):
            ref = make_engine(OTHER)
            for t in d.engine.tokens[:d.base] + g.work.path_tokens(node):
                ref.forward([t])
            at = d.base + row
            for layer in range(d.engine.args.num_hidden_layers):
                got, want = d.engine.cache.rows(layer, at, at + 1), ref.cache.rows(layer, ref.cache.offset - 1,
                                                                                  ref.cache.offset)
                for gg, w in zip(got, want):
                    assert torch.allclose(gg, w, atol=ROWS_ATOL, rtol=ROWS_RTOL), (node, layer)
            checked += 1
    assert checked > 0  # some steps carried scored nodes


def test_overlapped_sampling_keeps_the_targets_joint_distribution():
    """The other draft: short accepted paths, so the 3rd token often comes out of a carried tree's pass."""
    target, spec = make_engine(TARGET), make_overlap_spec(OTHER, 4)
    counts = speculative_pairs(target, spec, PLAIN, SAMPLES)
    stat, df = chi_square(counts, exact_pairs(PLAIN))
    assert df >= 10
    assert stat < chi2_critical(df), (stat, df, chi2_critical(df))
    st = spec.stats
    assert st.passes >= SAMPLES and st.accepted_tokens > SAMPLES // 10 and st.carried > SAMPLES // 10, st.as_dict()


OVERLAP_WHERE = ["ahead-draft", "verify-pass", "verify-mid-layer"]


@pytest.mark.parametrize("where", OVERLAP_WHERE)
@pytest.mark.parametrize("kind", ["dense", "disk"])
def test_an_interrupted_overlapped_step_leaves_both_engines_consistent(tmp_path, monkeypatch, closing, kind, where):
    """Ctrl-C in the draft's growth beside the pass (raised on its thread, re-raised by the step), or in the
    target's pass while the draft grows beside it: then new answers give a clean run's tokens and caches."""
    import threading

    n = 16
    target = make_engine(TARGET, kind, tmp_path / "target")
    spec = make_overlap_spec(OTHER, 8, complete=True, kind=kind, disk=tmp_path / "draft")
    d = spec.draft.engine
    closing += [target, d]

    def held() -> list[int]:
        return max(list(target.tokens), list(d.tokens), key=len)

    if where == "ahead-draft":  # the 2nd draft call on the growth thread
        hit = Interrupt(2, lambda *a, **kw: threading.current_thread().name == "offload-draft-ahead", held)
        monkeypatch.setattr(Draft, "logprobs", hit.wrap(Draft.logprobs))
    elif where == "verify-pass":  # a later pass: after steps that carried trees
        hit = Interrupt(4, lambda ids, **kw: kw.get("all_logits", False), held)
        monkeypatch.setattr(target, "forward", hit.wrap(target.forward))
    else:
        hit = Interrupt(4, lambda layer, *a, tree_mask=None, **kw: layer == 1 and tree_mask is not None, held)
        monkeypatch.setattr(target.cache, "attend", hit.wrap(target.cache.attend))
    with pytest.raises(KeyboardInterrupt):
        take(spec.tokens(target, GREEDY, target.prefill(PROMPT)), n)
    assert hit.fired
    monkeypatch.undo()
    for eng in (target, d):
        assert eng.cache.offset == len(eng.tokens)
    answer_matches_a_clean_run(target, spec, hit.state, n, ar=False)
    answer_matches_a_clean_run(target, spec, PROMPT, n, ar=True)
