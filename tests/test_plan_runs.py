"""The plan against the run: what --plan accepts runs, what it refuses could not (issue 8, bug 1).

Tiny checkpoints go through the real path: a converted weight store, ``runtime.prepare`` (group
sizes, embedding accounting, the planner) and ``Prepared.factory`` (the Tiers and the
StreamingWeights a run builds). The oracle is the factory itself: every placement the runtime
could build is built once with unbounded tiers and its host reservation recorded.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload_rt import runtime
from offload_rt.config import RunConfig
from offload_rt.engine import Engine, ResidentWeights, model_groups
from offload_rt.errors import BudgetError
from offload_rt.memory.plan import Budgets
from offload_rt.models import llama
from offload_rt.models.llama import LlamaArgs
from tests.cli_helpers import run_cli
from tests.hf_models import tiny_model

HINTS = {"disk_read": 1.3e9, "matvec": 1.5e10}  # bandwidths given, nothing measured
PROMPT = [3, 1, 4, 1, 5]
# (tied, stored dtype, compute dtype): both embedding kinds, and a bf16 store computed in float32
VARIANTS = {
    "untied": (False, torch.float32, "float32"),
    "tied": (True, torch.float32, "float32"),
    "untied-bf16-store-f32": (False, torch.bfloat16, "float32"),
}


def write_checkpoint(path, default_gguf, *, tied: bool, dtype: torch.dtype, vocab: int, layers: int = 2):
    from storage.sources import GGUFSource

    model = tiny_model("llama", seed=5, tie_word_embeddings=tied, num_hidden_layers=layers, vocab_size=vocab)
    model.to(dtype).save_pretrained(path)
    GGUFSource(default_gguf).tokenizer(path / "tokenizer.json")  # the default model's, from its GGUF header
    return path


def config(tmp, budget) -> RunConfig:
    return RunConfig(cpu_mem=budget, device="cpu", bandwidth_hints=HINTS, ctx_size=64, prefill_chunk=4,
                     progress=False, offload_dir=tmp)


class Case:
    """One converted tiny model, its reference tokens, and every host use the runtime could build."""

    def __init__(self, tmp, default_gguf, tied, stored, dtype):
        import storage

        ckpt = write_checkpoint(tmp / "ckpt", default_gguf, tied=tied, dtype=stored, vocab=1000)
        self.tmp = tmp
        self.store = storage.open_or_convert(ckpt, tmp / "stores", progress=False)
        self.args = LlamaArgs.from_config(self.store.model_config)
        self.dtype = getattr(torch, dtype)
        self.groups = model_groups(self.args)
        store, dt = self.store, self.dtype
        self.reference = greedy(self.args, ResidentWeights(self.groups, lambda n: store.load(n).to(dt), llama.EMBED),
                                self.dtype)
        self.template = self.prepare(1 << 40)
        self.uses = {self.host_use(t, d, e): (t, d, e) for t, d, e in self.buildable()}

    def prepare(self, budget) -> runtime.Prepared:
        return runtime.prepare(config(self.tmp, budget), self.store, self.args, self.dtype, self.groups, "cpu")

    def buildable(self):
        """Every (tiers, depth, embedding tier) a run of this model can be given (depth: runtime's bounds)."""
        names = [g.name for g in self.groups]
        for tiers in itertools.product(("host", "disk"), repeat=len(names)):
            streamed = "disk" in tiers
            for depth in range(runtime.MIN_STREAM_DEPTH, runtime.MAX_PREFETCH_DEPTH + 1) if streamed else [1]:
                for embed in ("disk",) if streamed or self.args.tie_word_embeddings else ("host", "disk"):
                    yield dict(zip(names, tiers)), depth, embed

    def build(self, tiers, depth, embed, budget):
        """The real factory over a placement with these tiers, under this host budget."""
        p = dataclasses.replace(self.template.placement, tiers=tiers, prefetch_depth=depth, embed_tier=embed)
        prep = dataclasses.replace(self.template, placement=p, budgets=Budgets(device=None, host=budget))
        return prep.factory(config(self.tmp, budget))(self.store, self.args, self.dtype, self.groups)

    def host_use(self, tiers, depth, embed) -> int:
        src = self.build(tiers, depth, embed, None)
        try:
            return src.tiers.host.used
        finally:
            src.close()


def greedy(args, source, dtype, n=3) -> list[int]:
    eng = Engine(args, source, dtype, prefill_chunk=4, max_tokens=64)
    try:
        with torch.inference_mode():
            logits, out = eng.prefill(PROMPT), []
            for _ in range(n):
                out.append(int(torch.argmax(logits)))
                logits = eng.forward([out[-1]])
            return out
    finally:
        eng.close()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, default_gguf):
    return {name: Case(tmp_path_factory.mktemp(name), default_gguf, *v) for name, v in VARIANTS.items()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_accepted_plans_run_and_refused_ones_could_not(cases, data):
    case = cases[data.draw(st.sampled_from(sorted(cases)), label="model")]
    uses = sorted(case.uses)
    edge = st.builds(lambda u, d: max(0, u + d), st.sampled_from(uses), st.sampled_from([-1, 0, 1]))
    budget = data.draw(st.one_of(edge, st.integers(0, uses[-1] + (1 << 20))), label="budget")
    try:
        prepared = case.prepare(budget)
    except BudgetError:
        assert budget < uses[0], f"refused, yet {case.uses[uses[0]]} runs in {uses[0]} bytes"
        return
    p = prepared.placement
    assert p.min_working_set == uses[0]  # the smallest budget anything runs in, exactly
    source = prepared.factory(config(case.tmp, budget))(case.store, case.args, case.dtype, case.groups)
    try:
        # the run reserved exactly what the plan counted, within the budget (a bounded Tier raises otherwise)
        assert source.tiers.host.used == p.host_used_bytes <= prepared.budgets.host
        resident = {w for w in source.tiers.host.items if w.startswith("weight.")}
        kept = p.embed_tier == "host" or (case.args.tie_word_embeddings and p.tiers["head"] == "host")
        assert (f"weight.{llama.EMBED}" in resident) == kept
        assert greedy(case.args, source, case.dtype) == case.reference  # and it computes the same tokens
    finally:
        source.close()


def test_the_stored_bytes_are_what_streams(cases):
    """A bf16 store computed in float32: the plan streams the stored bytes, holds the float32 ones."""
    case = cases["untied-bf16-store-f32"]
    specs = runtime.group_specs(case.store, case.groups, case.dtype, case.args)
    for s in specs:
        assert s.nbytes == 2 * s.stored and s.slot >= s.stored
    streamed = case.prepare(case.template.placement.min_working_set).placement
    assert streamed.streamed
    assert streamed.stream_bytes_per_token == sum(s.stored for s in specs if streamed.tiers[s.name] == "disk")
    assert streamed.tier_bytes["host"] == sum(s.nbytes for s in specs if streamed.tiers[s.name] == "host")


# ---------------------------------------------------------------------------- the CLI, as reported


def _used(plan_out: str) -> int:
    m = re.search(r"memory used: host .*?\((\d+) bytes\)", plan_out)
    assert m, plan_out
    return int(m.group(1))


def test_budget_that_plan_reports_runs(tmp_path, default_gguf):
    """The report: `--plan` said a resident untied model uses N bytes, and the run at N refused the embedding."""
    ckpt = write_checkpoint(tmp_path / "untied", default_gguf, tied=False, dtype=torch.float32, vocab=49152)
    common = ("--offload-dir", tmp_path / "stores", "--ctx-size", "128")
    big = run_cli(ckpt, "--cpu-mem", "1G", "--plan", *common)
    assert big.returncode == 0, big.stderr
    assert "placement: layers 0-1: host, head: host" in big.stdout
    assert "embedding table on host (12.00 MiB)" in big.stdout
    n = _used(big.stdout)
    run = run_cli(ckpt, "--cpu-mem", n, "--raw", "--prompt", "Hello there", "--max-new-tokens", "3", "--ignore-eos",
                  *common)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    # one byte less: the same resident layers, the table's rows read instead
    less = run_cli(ckpt, "--cpu-mem", n - 1, "--plan", *common)
    assert less.returncode == 0, less.stderr
    assert "placement: layers 0-1: host, head: host" in less.stdout
    assert "embedding rows read from disk" in less.stdout and _used(less.stdout) == n - 12 * 2**20
