"""Speculative decoding where the user meets it: ``--draft``/``--spec-budget`` in one-shot runs, piped
input and the REPL, ``--stats``/``--profile``/``--plan``, and the mistakes a user can make.

The reference everywhere is greedy autoregressive decoding of the same target: SpecExec's greedy output
must be that, token for token, whatever the budget and wherever the target's weights live (resident, or
streamed from disk under a ``--cpu-mem`` just above the working set ``--plan`` reports). The target is
the default model in float32 (``--weights f32``), the draft its own int4 copy (``self-int4``). The
context is kept at 512 tokens so that every plan and KV cache stays small; runs are few and shared.
"""

from __future__ import annotations

import io
import json
import math
import re

import pytest

from tests.cli_helpers import assert_user_error, run_cli

BASE = ("--weights", "f32", "-c", "512")
PROMPTS = {
    "chat": ("--prompt", "What is the capital of France?"),
    "poem": ("--prompt", "Write a short poem about the sea."),
    "raw": ("--raw", "--prompt", "The history of the printing press begins"),
}
NEW = 48
SHORT = 16  # tokens of the runs whose draft accepts nothing (a target pass per token)
MARGIN_MIB = 16  # the streamed runs' --cpu-mem above the plan's minimum working set with the draft
PLAN_BUDGET = 128  # the largest budget the equality runs use: the streamed --cpu-mem must hold its tree


def stats_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


class Runs:
    """CLI runs shared by the tests of this module (each launch costs seconds): memoized by arguments."""

    def __init__(self, stores):
        self.stores = stores
        self._done: dict[tuple, tuple[str, dict]] = {}

    def answer(self, *args, input=None) -> tuple[str, dict]:
        key = (args, input)
        if key not in self._done:
            proc = run_cli(*BASE, "-n", NEW, "--ignore-eos", "--stats", "--offload-dir", self.stores, *args,
                           input=input)
            self._done[key] = (proc.stdout, stats_of(proc))
        return self._done[key]

    def reference(self, prompt: str) -> tuple[str, dict]:
        """Greedy autoregressive, target resident: what every speculative run must print."""
        return self.answer(*PROMPTS[prompt])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="module")
def runs(stores):
    return Runs(stores)


@pytest.fixture(scope="module")
def plan(stores) -> dict:
    """``--plan --stats`` with the draft and the largest budget used here: stdout, the stats line and the
    minimum working set with the draft (MiB), from which the streamed runs' --cpu-mem is sized."""
    proc = run_cli(*BASE, "--draft", "self-int4", "--spec-budget", PLAN_BUDGET, "--plan", "--stats",
                   "--offload-dir", stores)
    rec = stats_of(proc)
    m = re.search(r"minimum working set with the draft ([0-9.]+) MiB", proc.stdout)
    assert m, proc.stdout
    return {"stdout": proc.stdout, "stats": rec, "min_mib": float(m.group(1))}


@pytest.fixture(scope="module")
def streamed_mem(plan) -> str:
    return f"{math.ceil(plan['min_mib']) + MARGIN_MIB}M"


def check_spec_stats(spec: dict, budget: int | None) -> None:
    """The ``spec`` record of a greedy run of NEW tokens: counts that add up, the budget that was asked."""
    assert spec is not None
    if budget is not None:
        assert spec["budget"] == budget
    else:
        assert 8 <= spec["budget"] <= 1024
    passes, accepted = spec["passes"], spec["accepted_tokens"]
    # the first token comes from the prompt's logits; each pass then yields its accepted tokens + one bonus,
    # the last pass possibly past the NEW tokens printed
    assert 1 <= passes <= NEW - 1 and passes + accepted >= NEW - 1
    assert spec["tokens_per_pass"] == pytest.approx((passes + accepted) / passes, abs=1e-4)
    assert spec["tokens_per_pass"] >= 1
    assert 1 <= spec["mean_tree_nodes"] <= spec["budget"]


# (prompt, --spec-budget or None for the planner's choice, streamed): every budget resident and streamed,
# every prompt in both, one autoregressive reference per prompt
CASES = [("chat", 8, False), ("poem", 32, False), ("raw", 128, False), ("poem", None, False),
         ("raw", 8, True), ("chat", 32, True), ("poem", 128, True), ("chat", None, True)]


@pytest.mark.parametrize("prompt,budget,streamed", CASES,
                         ids=[f"{p}-{b or 'planner'}-{'streamed' if s else 'resident'}" for p, b, s in CASES])
def test_greedy_speculation_prints_the_autoregressive_answer(runs, streamed_mem, prompt, budget, streamed):
    ref_text, ref = runs.reference(prompt)
    assert ref["spec"] is None and ref["new_tokens"] == NEW and ref_text.strip()
    args = [*PROMPTS[prompt], "--draft", "self-int4"]
    if budget is not None:
        args += ["--spec-budget", str(budget)]
    if streamed:
        args += ["--cpu-mem", streamed_mem]
    text, rec = runs.answer(*args)
    assert rec["new_tokens"] == NEW and rec["stop_reason"] == "max_new_tokens"
    if streamed:
        assert rec["placement"]["disk"] > 0 and rec["disk_read_bytes_decode"] > 0, rec
        # --cpu-mem holds the draft too: the budget reported is the one given, and the run keeps its promise
        # (peak RSS while serving <= baseline + --cpu-mem + slack)
        from offload_rt.config import parse_size

        assert rec["host_budget_bytes"] == parse_size(streamed_mem)
        assert rec["host_reserved_peak_bytes"] <= rec["host_budget_bytes"]
        assert rec["run_peak_rss_bytes"] <= rec["baseline_rss_bytes"] + rec["host_budget_bytes"] + \
            rec["runtime_slack_bytes"], rec
    else:
        assert rec["placement"]["disk"] == 0
    if budget is None and not streamed:  # resident, speculation is predicted slower: the planner runs without it
        assert rec["spec"] is None
    else:
        check_spec_stats(rec["spec"], budget)
    assert text == ref_text


def test_overlapped_drafting_prints_the_autoregressive_answer(runs, streamed_mem):
    """--spec-overlap, the target streamed: the draft grows on a second thread beside the target's passes
    (int4 kernels beside the streamed float32 layers); the same greedy answer."""
    ref_text, _ = runs.reference("chat")
    text, rec = runs.answer(*PROMPTS["chat"], "--draft", "self-int4", "--spec-budget", "16", "--spec-overlap",
                            "--cpu-mem", streamed_mem)
    check_spec_stats(rec["spec"], 16)
    assert rec["spec"]["ahead_s"] > 0 and rec["placement"]["disk"] > 0, rec
    assert text == ref_text


def test_a_separate_draft_with_the_same_tokenizer(runs, tmp_path_factory, default_gguf):
    """--draft PATH: a random-weight checkpoint with SmolLM2's vocabulary proposes (nearly) nothing the
    target accepts; every token is then the target's own and the answer is still the reference."""
    from tests.tiny_checkpoint import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path_factory.mktemp("draft") / "tiny", default_gguf)
    ref_text, _ = runs.reference("chat")
    proc = run_cli(*BASE, *PROMPTS["chat"], "-n", SHORT, "--ignore-eos", "--stats", "--draft", tiny,
                   "--spec-budget", "8", "--offload-dir", runs.stores)
    spec = stats_of(proc)["spec"]
    assert spec["budget"] == 8 and spec["passes"] + spec["accepted_tokens"] >= SHORT - 1
    answer = proc.stdout.removesuffix("\n")
    assert len(answer) > 10 and ref_text.startswith(answer)  # the first SHORT of the reference's NEW tokens


def test_piped_stdin_answers_as_the_prompt_option(runs):
    """``echo prompt | offload-run --draft self-int4``: the pipe's final newline is not part of the question."""
    flag_text, _ = runs.answer(*PROMPTS["poem"], "--draft", "self-int4", "--spec-budget", "32")
    piped_text, rec = runs.answer("--draft", "self-int4", "--spec-budget", "32",
                                  input=PROMPTS["poem"][1] + "\n")
    check_spec_stats(rec["spec"], 32)
    assert piped_text == flag_text == runs.reference("poem")[0]


def test_profile_has_draft_tree_build_and_verify_spans(stores, tmp_path):
    trace = tmp_path / "trace.json"
    rec = stats_of(run_cli(*BASE, *PROMPTS["chat"], "-n", "16", "--ignore-eos", "--stats", "--draft", "self-int4",
                           "--spec-budget", "16", "--profile", trace, "--offload-dir", stores))
    spec = rec["spec"]
    events = json.loads(trace.read_text())["traceEvents"]
    spans = {name: [e for e in events if e.get("ph") == "X" and e.get("name") == name]
             for name in ("draft", "tree-build", "verify")}
    # one tree and one verification per target pass; every draft call inside some tree's building
    assert len(spans["verify"]) == len(spans["tree-build"]) == spec["passes"] >= 1
    assert len(spans["draft"]) >= spec["passes"]
    builds = [(e["ts"], e["ts"] + e["dur"]) for e in spans["tree-build"]]
    for d in spans["draft"]:
        assert any(a - 1 <= d["ts"] and d["ts"] + d["dur"] <= b + 1 for a, b in builds), d
    assert all(e["args"]["nodes"] == 17 for e in spans["verify"])  # the root + a full tree of 16


def test_plan_shows_the_draft_and_the_predicted_tokens_per_pass(plan):
    out, spec = plan["stdout"], plan["stats"]["spec"]
    draft = next(ln for ln in out.splitlines() if ln.startswith("draft: "))
    assert draft.startswith("draft: SmolLM2-135M-Instruct.Q4_1.gguf (self-int4), resident in host RAM, "), draft
    m = re.search(rf"speculation: budget {PLAN_BUDGET} tree nodes \(--spec-budget\); "
                  r"predicted ([0-9.]+) tokens per target pass", out)
    assert m, out
    assert 1 <= float(m.group(1)) <= PLAN_BUDGET + 1
    assert spec["budget"] == PLAN_BUDGET and spec["draft_bytes"] > 0
    assert spec["predicted_tokens_per_pass"] == pytest.approx(float(m.group(1)), abs=0.01)
    # the draft is budgeted beside the target: the minimum holds the draft's bytes and a working set
    assert plan["min_mib"] * 2**20 > spec["draft_bytes"]


@pytest.fixture(scope="module")
def ascii_gguf(tmp_path_factory):
    """A tiny llama GGUF whose tokenizer is a 300-token ASCII BPE, not SmolLM2's."""
    from tests.gguf_models import write_hf_gguf
    from tests.hf_models import tiny_model

    path = tmp_path_factory.mktemp("ascii") / "ascii.gguf"
    write_hf_gguf(path, tiny_model("llama", seed=3), "llama")
    return path


def test_budget_out_of_range_or_without_draft_is_a_user_error(stores):
    for budget in ("4", "2000"):
        assert_user_error(run_cli(*BASE, "-p", "hi", "--draft", "self-int4", "--spec-budget", budget,
                                  "--offload-dir", stores), f"--spec-budget {budget} is outside 8…1024")
    assert_user_error(run_cli(*BASE, "-p", "hi", "--spec-budget", "16", "--offload-dir", stores),
                      "--spec-budget", "--draft")
    assert_user_error(run_cli(*BASE, "-p", "hi", "--spec-overlap", "--offload-dir", stores), "--spec-overlap", "--draft")


def test_missing_draft_is_a_user_error(stores):
    assert_user_error(run_cli(*BASE, "-p", "hi", "--draft", "/no/such/path", "--offload-dir", stores),
                      "--draft /no/such/path", "does not exist")


def test_draft_with_another_tokenizer_is_a_user_error(stores, ascii_gguf):
    assert_user_error(run_cli(*BASE, "-p", "hi", "--draft", ascii_gguf, "--offload-dir", stores),
                      f"--draft {ascii_gguf} has a different tokenizer", "300 tokens against 49152")


def test_cpu_mem_too_small_for_the_draft_is_a_user_error(stores, plan):
    # below the draft alone
    assert_user_error(run_cli(*BASE, "-p", "hi", "--draft", "self-int4", "--cpu-mem", "100M",
                              "--offload-dir", stores), "the draft", "more than --cpu-mem allows")
    # the draft fits, the target's working set beside it does not: the figure is the plan's
    below = f"{math.floor(plan['min_mib']) - 1}M"
    assert_user_error(run_cli(*BASE, "-p", "hi", "--draft", "self-int4", "--spec-budget", PLAN_BUDGET,
                              "--cpu-mem", below, "--offload-dir", stores),
                      f"--cpu-mem {below} is below the minimum working set of {plan['min_mib']:.2f} MiB with the draft")


# --- the REPL, in-process over the Session app.main builds ---------------------------------------------------

T1, T2 = "Write a long story about a dragon.", "Give the story a title."


def chat_session(monkeypatch, stores, script, *, draft: bool, extra=()):
    """Run ``app.main`` interactively with ``script`` as the typed lines (then Ctrl-D).

    A script item is a line, or ``(arm, line)``: ``arm()`` is called before the line is handed over.
    Returns per turn (prompt messages, answer text, token ids, stop reason), the REPL's stderr, and the
    answers (text, token ids) the same session gives afterwards to each message list in ``extra``.
    """
    from offload_rt import app, repl
    from offload_rt.config import RunConfig

    rec = {"turns": [], "extra": []}

    class ScriptedREPL(repl.ChatREPL):
        def __init__(self, session, **_kw):
            lines = iter(script)

            def read_line(_prompt):
                item = next(lines, None)
                if item is None:
                    raise EOFError
                if isinstance(item, tuple):
                    item[0]()
                    item = item[1]
                return item

            super().__init__(session, out=io.StringIO(), err=io.StringIO(), read_line=read_line)
            rec["repl"] = self

        def turn(self, text):
            prompt = [dict(m) for m in self.messages()] + [{"role": "user", "content": text}]
            super().turn(text)
            last = self.session.last
            rec["turns"].append((prompt, self.history[-1]["content"], list(last.token_ids), last.stop_reason))

        def run(self):
            code = super().run()
            for messages in extra:
                text = "".join(self.session.answer(messages))
                rec["extra"].append((text, list(self.session.last.token_ids)))
            return code

    monkeypatch.setenv("OFFLOAD_RT_BANDWIDTHS", "disk=1.3e9,mem=2.4e10,matvec=1.5e10")
    monkeypatch.setattr(repl, "ChatREPL", ScriptedREPL)
    cfg = RunConfig(weights="f32", offload_dir=stores, ctx_size=512, max_new_tokens=32, progress=False,
                    draft="self-int4" if draft else None, spec_budget=16 if draft else None)
    import torch

    threads = torch.get_num_threads()
    try:
        assert app.main(cfg, prompt=None, interactive=True, stats=False) == 0
    finally:
        torch.set_num_threads(threads)  # app.main leaves torch at one thread while it serves
    return rec["turns"], rec["repl"].err.getvalue(), rec["extra"]


class Interrupt:
    """Ctrl-C on the k-th call of ``owner.name`` after :meth:`arm`: the call runs, then KeyboardInterrupt
    (the state it changed is what the interrupted step leaves behind)."""

    def __init__(self, monkeypatch, owner, name: str, k: int):
        self.k, self.calls, self.fired = k, None, 0
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            if self.calls is not None:
                self.calls += 1
                if self.calls == self.k:
                    self.calls, self.fired = None, self.fired + 1
                    raise KeyboardInterrupt
            return out

        monkeypatch.setattr(owner, name, wrapped)

    def arm(self) -> None:
        self.calls = 0

    def disarm(self) -> None:
        """(Should the armed answer end before the k-th call, the next one is not interrupted.)"""
        self.calls = None


@pytest.fixture(scope="module")
def repl_runs(stores) -> dict:
    """Three conversations over one session with the draft: two stopped by Ctrl-C in their first answer
    (during a tree's draft calls; after a verification pass, before its tree is pruned), then a clean one;
    and, in a session without speculation, the same two turns plus an answer to each stopped
    conversation's next history."""
    from offload_rt.spec import draft as draft_mod
    from offload_rt.spec import speculate

    with pytest.MonkeyPatch.context() as mp:
        in_draft = Interrupt(mp, draft_mod.Draft, "logprobs", 6)
        in_verify = Interrupt(mp, speculate, "accept", 3)
        script = [(in_draft.arm, T1), (in_draft.disarm, T2), "/reset", (in_verify.arm, T1), (in_verify.disarm, T2),
                  "/reset", T1, T2]
        turns, err, _ = chat_session(mp, stores, script, draft=True)
        fired = (in_draft.fired, in_verify.fired)
    after = [turns[1], turns[3]]
    with pytest.MonkeyPatch.context() as mp:
        ref_turns, _, ref_after = chat_session(mp, stores, [T1, T2], draft=False,
                                               extra=[prompt for prompt, *_ in after])
    return {"turns": turns, "err": err, "fired": fired, "stopped": [turns[0], turns[2]], "after": after,
            "ref_turns": ref_turns, "ref_after": ref_after}


def test_repl_with_draft_answers_as_without(repl_runs):
    """The clean conversation with speculation is the autoregressive one, token for token."""
    turns, ref_turns = repl_runs["turns"], repl_runs["ref_turns"]
    assert len(turns) == 6 and len(ref_turns) == 2
    for (prompt, text, ids, _), (ref_prompt, ref_text, ref_ids, _) in zip(turns[4:], ref_turns):
        assert prompt == ref_prompt and ids == ref_ids and text == ref_text


def test_repl_ctrl_c_mid_tree_keeps_the_conversation(repl_runs):
    """Ctrl-C stops the answer ("(stopped)"), the partial answer (a prefix of the full one) stays in the
    history, and the next turn answers that history as a fresh autoregressive session does."""
    assert repl_runs["fired"] == (1, 1)
    assert repl_runs["err"].count("(stopped)") == 2
    ref_t1 = repl_runs["ref_turns"][0]
    for (_prompt, text, ids, _reason), (next_prompt, *_rest) in zip(repl_runs["stopped"], repl_runs["after"]):
        assert ids and text and len(ids) < len(ref_t1[2])
        assert ref_t1[2][:len(ids)] == ids and ref_t1[1].startswith(text)
        assert next_prompt == [{"role": "user", "content": T1}, {"role": "assistant", "content": text},
                               {"role": "user", "content": T2}]
    for (_p, text, ids, _r), (ref_text, ref_ids) in zip(repl_runs["after"], repl_runs["ref_after"]):
        assert ids == ref_ids and text == ref_text


def test_repl_ctrl_c_mid_tree_is_reported_as_interrupted(repl_runs):
    """/stats after a Ctrl-C: the answer's stop_reason says it was interrupted."""
    assert [reason for *_, reason in repl_runs["stopped"]] == ["interrupted", "interrupted"]
