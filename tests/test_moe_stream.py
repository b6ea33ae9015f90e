"""Streamed routed experts (offload_rt.expert_stream) give exactly the resident output, with figures that add up.

Library level: tiny random MoE models of each family (6 experts, 2 routed per token) go through the run's own path
(``runtime.prepare`` with bandwidth hints, ``Prepared.factory``, ``Engine``), once with every expert resident and
once per ``--expert-slots`` cap: 1 slot per layer (fewer than a token's experts: one expert at a time), 2..E-1
(a decode token's misses in one batch; a prefill chunk whose experts outnumber the slots one at a time). Logits
must be bit-equal (``torch.equal``), for a prefill of several chunks (tokens sharing experts) and for decode.
Through the CLI (few subprocesses): the memory promise on a streamed run, the trace's expert spans, ``--plan``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import storage
from offload_rt import expert_stream, models, runtime
from offload_rt.config import RunConfig, parse_size
from offload_rt.engine import Engine, model_groups
from offload_rt.expert_stream import ExpertStream
from tests.cli_helpers import run_cli
from tests.moe_models import MOE_TYPES, tiny_moe_model, write_moe_checkpoint

E = 6  # routed experts per layer (2 routed per token, 2 MoE layers)
HINTS = {"disk_read": 1.3e9, "matvec": 1.5e10}  # bandwidths given, nothing measured
CHUNK = 8  # prefill chunk: PROMPT is two chunks, SHORT one of two tokens (at most 4 experts: fit E-1 slots)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
SHORT = [7, 2]
DECODE = 6
SLOTS = (1, 2, E - 1)  # one at a time; = k (decode batched, a prefill chunk one at a time); E-1


@dataclass
class Model:
    tmp: Path
    store: object
    args: object
    dtype: torch.dtype = torch.float32
    runs: dict = field(default_factory=dict)  # (slots, prompt, prefetch) -> its Run (the tests share them)

    @property
    def groups(self):
        return model_groups(self.args)

    def run(self, slots: int | None, prompt=PROMPT, *, prefetch: bool = True) -> "Run":
        key = (slots, tuple(prompt), prefetch)
        if key not in self.runs:
            self.runs[key] = generate(self, slots, list(prompt), prefetch=prefetch)
        return self.runs[key]


@dataclass
class Run:
    tokens: list[int]
    logits: list[torch.Tensor]  # the prefill's last row, then one per decoded token
    stats: dict | None  # ExpertStream.stats() at the end (None: every expert resident)
    prefill_stats: dict | None  # the cache's figures after the prefill
    reads: int  # experts read by WeightStore.read_experts
    prefill_reads: int  # of which during the prefill
    routed: int  # distinct experts the MoE layers' calls asked for, summed over calls
    calls: int  # MoE layer calls (per prefill chunk, per decoded token)
    disk_read_bytes: int  # the source's counter


def open_model(path: Path, tmp: Path) -> Model:
    st = storage.open_or_convert(path, tmp / "stores", progress=False)
    return Model(tmp, st, models.args_from_config(st.model_config))


def generate(m: Model, slots: int | None, prompt=PROMPT, *, prefetch: bool = True, tracer=None) -> Run:
    """Greedy decode through the run's path; ``slots`` None: every expert resident (a roomy --cpu-mem)."""
    cfg = RunConfig(cpu_mem=1 << 40, device="cpu", bandwidth_hints=HINTS, ctx_size=64, prefill_chunk=CHUNK,
                    progress=False, offload_dir=m.tmp, expert_slots=slots)
    prep = runtime.prepare(cfg, m.store, m.args, m.dtype, m.groups, "cpu")
    assert prep.experts.resident == (slots is None)
    assert slots is None or prep.experts.slots_per_layer == slots
    reads, routed = [], []
    read_experts, run = m.store.read_experts, ExpertStream.run

    def counted_read(name, ids, outs, **kw):
        reads.append(len(ids))
        return read_experts(name, ids, outs, **kw)

    def counted_run(self, li, h, ids, weights):
        routed.append(len(set(ids.reshape(-1).tolist())))
        return run(self, li, h, ids, weights)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m.store, "read_experts", counted_read)
        mp.setattr(ExpertStream, "run", counted_run)
        if not prefetch:  # the stream the factory builds predicts nothing (its routers dropped)
            mp.setattr(expert_stream, "ExpertStream", functools.partial(ExpertStream, prefetch=False))
        src = prep.factory(cfg, tracer)(m.store, m.args, m.dtype, m.groups)
        eng = Engine(m.args, src, m.dtype, prefill_chunk=CHUNK, max_tokens=64, tracer=tracer)
        stream = getattr(src, "expert_stream", None)
        try:
            with torch.inference_mode():
                logits, tokens = [eng.prefill(prompt)], []
                after_prefill, prefill_reads = None if stream is None else stream.cache.stats_dict(), sum(reads)
                for _ in range(DECODE):
                    tokens.append(int(torch.argmax(logits[-1])))
                    logits.append(eng.forward([tokens[-1]]))
            stats = None if stream is None else stream.stats()
            return Run(tokens, logits, stats, after_prefill, sum(reads), prefill_reads, sum(routed), len(routed),
                       src.counters.disk_read_bytes)
        finally:
            eng.close()


def assert_same(a: Run, b: Run) -> None:
    assert a.tokens == b.tokens
    for i, (x, y) in enumerate(zip(a.logits, b.logits, strict=True)):
        assert torch.equal(x, y), (i, float((x - y).abs().max()))


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe-stream")
    return {mt: open_model(write_moe_checkpoint(tmp / mt, tiny_moe_model(mt, seed=1, experts=E)), tmp)
            for mt in MOE_TYPES}


# --- streamed == resident, bit for bit ------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_TYPES)
@pytest.mark.parametrize("prompt,slots", [(PROMPT, s) for s in SLOTS] + [(SHORT, E - 1)],
                         ids=[f"prefill-2-chunks-slots-{s}" for s in SLOTS] + ["prefill-2-tokens-batched"])
def test_streamed_experts_give_the_resident_output(family_models, family, prompt, slots):
    m = family_models[family]
    ref, got = m.run(None, prompt), m.run(slots, prompt)
    assert ref.reads == 0 and ref.stats is None  # the reference read no expert
    assert got.reads > 0
    assert_same(got, ref)


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("family", MOE_TYPES)
def test_prefetch_never_changes_outputs(family_models, family, slots):
    on = family_models[family].run(slots)
    off = family_models[family].run(slots, prefetch=False)
    assert_same(on, off)
    assert on.stats["predict"] and not off.stats["predict"]
    assert off.stats["prefetches"] == 0 and off.stats["prediction_accuracy"] is None
    assert on.stats["prediction_accuracy"] is not None  # decode tokens predicted the next layer's experts
    assert on.stats["prefetches"] > 0 or slots == 1  # and read some early (one slot may hold a predicted one)


# --- the cache's figures ------------------------------------------------------------------------------

@pytest.mark.parametrize("slots", SLOTS)
@pytest.mark.parametrize("family", MOE_TYPES)
def test_cache_figures_add_up(family_models, family, slots):
    r = family_models[family].run(slots)
    s = r.stats
    assert s["slots_per_layer"] == slots and s["slots"] == 2 * slots
    assert s["hits"] + s["inflight_hits"] + s["misses"] == r.routed  # every routed expert judged once
    assert s["hit_rate"] == pytest.approx((s["hits"] + s["inflight_hits"]) / r.routed)
    assert s["expert_disk_read_bytes"] == r.reads * s["unit_bytes"]  # whole units, nothing else
    assert r.disk_read_bytes >= s["expert_disk_read_bytes"]  # the run's disk counter includes them
    assert 0 < s["cached_experts"] <= s["slots"]
    assert s["prefetch_useful"] <= s["prefetches"]
    assert s["expert_wait_s"] >= 0 and s["expert_compute_s"] > 0


@pytest.mark.parametrize("slots", SLOTS)
@pytest.mark.parametrize("family", MOE_TYPES)
def test_each_miss_and_prefetch_is_read_once(family_models, family, slots):
    """What the figures call a hit needed no read: experts read = misses + prefetches, in decode (where slots >= k
    take a token's experts at once) and over the whole run (a prefill chunk's experts one at a time)."""
    r = family_models[family].run(slots)
    s, p = r.stats, r.prefill_stats
    decode = (r.reads - r.prefill_reads, s["misses"] - p["misses"] + s["prefetches"] - p["prefetches"])
    assert decode[0] == decode[1], ("decode", decode, s)
    assert r.reads == s["misses"] + s["prefetches"], ("whole run", r.reads, s)


@pytest.mark.parametrize("family", MOE_TYPES)
def test_a_cache_of_all_but_one_expert_hits_after_warm_up(family_models, family):
    r = family_models[family].run(E - 1)
    p, s = r.prefill_stats, r.stats
    judged = (s["hits"] + s["inflight_hits"] + s["misses"]) - (p["hits"] + p["inflight_hits"] + p["misses"])
    hits = (s["hits"] + s["inflight_hits"]) - (p["hits"] + p["inflight_hits"])
    assert judged == DECODE * 2 * 2  # tokens x MoE layers x routed experts
    assert hits / judged >= 0.6, s  # ~5/6 expected of uniform routing; a miss needs the one absent expert
    assert 2 * 2 <= s["cached_experts"] <= 2 * (E - 1)  # at least the last token's experts


@pytest.mark.parametrize("slots", [1, E - 1])
def test_trace_shows_expert_reads_and_compute(family_models, slots):
    from offload_rt.trace import Tracer

    tracer = Tracer()
    r = generate(family_models["qwen3_moe"], slots, tracer=tracer)
    spans = expert_spans(tracer.to_json())
    reads = spans["disk"]
    assert sum(e["args"]["bytes"] for e in reads) == r.stats["expert_disk_read_bytes"]
    assert sum(e["args"]["experts"] for e in reads) == r.reads
    for track in ("disk", "compute"):
        assert {e["name"] for e in spans[track]} == {"experts 0", "experts 1"}, (track, slots)
    assert r.calls == 2 * (-(-len(PROMPT) // CHUNK) + DECODE)  # MoE layers x (prefill chunks + tokens)
    assert len(spans["compute"]) >= r.calls, slots  # every call computes its experts


# --- quantized experts from a GGUF file ----------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_TYPES)
def test_quantized_gguf_experts_stream_exactly(tmp_path, family):
    from gguf import GGMLQuantizationType as Q

    from tests.gguf_models import write_moe_gguf

    types = {"ffn_gate_exps": Q.Q8_0, "ffn_up_exps": Q.Q4_0, "ffn_down_exps": Q.Q8_0}
    ckpt = write_moe_checkpoint(tmp_path / "ckpt", tiny_moe_model(family, seed=2, experts=E))
    path = tmp_path / "m.gguf"
    write_moe_gguf(path, ckpt, lambda gname, a: types.get(gname.split(".")[-2], Q.F32))
    m = open_model(path, tmp_path)
    lay = m.store.expert_layout(m.args.expert_tensor(0))
    assert {p.fmt.name for p in lay.parts.values()} == {"q8_0", "q4_0"}
    ref = m.run(None)
    for slots in (1, 3):
        assert_same(m.run(slots), ref)


# --- through the CLI: the memory promise, the trace, --plan -----------------------------------------------

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A qwen3_moe checkpoint with the default model's tokenizer (its vocabulary)."""
    from tests.hf_models import SMOLLM_VOCAB

    tmp = tmp_path_factory.mktemp("moe-cli")
    return write_moe_checkpoint(tmp / "ckpt", tiny_moe_model("qwen3_moe", seed=1, experts=E,
                                                             vocab_size=SMOLLM_VOCAB))


def stats_line(proc) -> dict:
    return json.loads(proc.stderr.strip().splitlines()[-1])


def expert_spans(trace: dict) -> dict[str, list[dict]]:
    """A Chrome trace's "experts N" spans by track ("disk": reads, "compute": kernels)."""
    tracks = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    spans = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"].startswith("experts ")]
    return {track: [e for e in spans if e["tid"] == tracks[track]] for track in ("disk", "compute")}


def files_under(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


CLI_RUN = ("--raw", "--prompt", "The cache of experts", "--max-new-tokens", "12", "--threads", "1")


def test_streamed_cli_run_keeps_the_memory_promise_and_traces_experts(tmp_path, cli_model):
    off = tmp_path / "off"
    low = run_cli(cli_model, "--offload-dir", off, "--cpu-mem", "4096", *CLI_RUN)
    assert low.returncode == 2, low.stderr
    budget = re.search(r"raise it to at least (\S+)$", low.stderr.strip()).group(1)  # the smallest that works
    trace = tmp_path / "trace.json"
    streamed = run_cli(cli_model, "--offload-dir", off, "--cpu-mem", budget, "--expert-slots", "1", *CLI_RUN,
                       "--stats", "--profile", trace)
    assert streamed.returncode == 0, streamed.stderr
    whole = run_cli(cli_model, "--offload-dir", off, *CLI_RUN)
    assert whole.returncode == 0, whole.stderr
    assert streamed.stdout.strip() and streamed.stdout == whole.stdout

    rec = stats_line(streamed)
    assert rec["host_budget_bytes"] == parse_size(budget)
    assert rec["run_peak_rss_bytes"] <= rec["peak_rss_bytes"]
    assert rec["peak_rss_bytes"] <= rec["baseline_bytes"] + rec["host_budget_bytes"] + rec["runtime_slack_bytes"], rec
    moe = rec["moe"]
    assert moe["resident"] is False and moe["slots_per_layer"] == 1 and moe["experts_per_layer"] == E
    assert moe["expert_disk_read_bytes"] > 0 and moe["expert_disk_read_bytes"] % moe["unit_bytes"] == 0
    assert moe["cached_experts"] == 2 and 0 <= moe["hit_rate"] <= 1
    assert moe["predicted_hit_rate"] == pytest.approx(1 / E, abs=1e-4)

    spans = expert_spans(json.loads(trace.read_text()))
    assert sum(e["args"]["bytes"] for e in spans["disk"]) == moe["expert_disk_read_bytes"]
    for track in ("disk", "compute"):
        assert {e["name"] for e in spans[track]} == {"experts 0", "experts 1"}, track


def test_plan_prints_the_expert_tiers_and_runs_nothing(tmp_path, cli_model):
    off = tmp_path / "off"
    args = (cli_model, "--offload-dir", off, "--cpu-mem", "1G", "--expert-slots", "2", "--plan")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert not off.exists() or not any(off.iterdir())  # --plan converts nothing: planned from the headers
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert not off.exists() or not any(off.iterdir())
    line = [ln for ln in again.stdout.splitlines() if ln.startswith("experts:")]
    assert len(line) == 1, again.stdout
    line = line[0]
    assert f"2 MoE layers x {E} routed experts" in line and "2 active per token" in line
    assert "RAM cache 2 per layer = 4 experts" in line and f"({100 * 2 / E:.1f}% of all experts)" in line
    assert f"{2 * (E - 2)} experts" in line and "on disk" in line
    assert re.search(r"predicted decode with the routed experts: [0-9.]+ tok/s", again.stdout)
    assert line in first.stdout.splitlines()
