"""The server with ``--attention magicpig``: each sequence's tables are built by its prompt's last pass, as
``Engine.prefill`` builds them (``expect``), and a served greedy answer is the engine's own.

In process (no server process): one runtime of the default model (KV chunks and prefill passes of 256
tokens, so that the server's passes are the engine's), a backend per round, and a watch on the batch loop's
steps that records, per sequence, whether a prompt pass before the last built tables and what the tables
are when its first decode step begins. The engine's answer to the same prompt, and its tables when its
decode begins, are the reference: without the prompt's end the server built the tables in the first pass
long enough and extended them in every later one, centred on that pass's keys (other tables, other
samples).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from offload_rt.config import RunConfig, SamplingConfig
from offload_rt.generate import generate
from offload_rt.sampling import make_sampler
from offload_rt.serve import backend as backend_module
from offload_rt.serve.types import GenRequest
from tests.serve_helpers import serve_in_process

N_NEW = 12
# a system prompt of more than one KV chunk (the prefix cache's granule), then questions long enough that a
# prompt runs in 3 passes of 256 tokens, 2 of them after a restored system prompt
SYSTEM = "You are a helpful assistant for a library. " + " ".join(
    f"Rule {i}: books in section {i} are shelved by author surname and returned within {i % 7 + 7} days."
    for i in range(12))
NOTES = " ".join(f"Note {i}: the reading room on floor {i % 4} opens at {8 + i % 3} and closes at {17 + i % 4}."
                 for i in range(14))
QUESTIONS = ["Summarise these notes for a visitor. " + NOTES,
             "Which floors open earliest? Answer from these notes. " + NOTES]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    from offload_rt.build import build

    cfg = RunConfig(offload_dir=tmp_path_factory.mktemp("stores"), progress=False, attention="magicpig",
                    parallel=2, ctx_size=1024, prefill_chunk=256)
    with torch.inference_mode():
        runtime = build(cfg, serving=True)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def prompts(rt):
    ids = [rt.model.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
           for q in QUESTIONS]
    C = rt.prepared.kv.shape.chunk_tokens
    assert C == rt.engine.prefill_chunk == 256
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert C <= shared < 2 * C and all(2 * C < len(p) < 3 * C for p in ids), (shared, [len(p) for p in ids])
    return ids


@pytest.fixture(scope="module")
def reference(rt, prompts):
    """Per prompt, the engine's greedy answer and its tables when its decode began."""
    out = []
    engine = rt.engine
    for ids in prompts:
        seen = {}
        with torch.inference_mode():
            text = "".join(generate(engine, rt.model.tokenizer, ids, max_new_tokens=N_NEW, ignore_eos=True,
                                    sampler=make_sampler(SamplingConfig(temperature=0)),
                                    on_decode_start=lambda: seen.update(tables=tables(engine.cache))))
        out.append((text, seen["tables"]))
        engine.reset()
    return out


def tables(cache) -> list:
    """A cache's MagicPIG tables per layer, as digests (None: no table): what they index, their centre, buckets."""
    out = []
    for index, stop in zip(cache._index, cache._index_stop):
        if index is None:
            out.append(None)
            continue
        h = hashlib.sha256(index.mean.tobytes())
        for s in index.segments:
            h.update(repr((s.base, s.span, s.count)).encode())
            for a in (s.ids, s.offs, s.norms):
                h.update(a.tobytes())
        out.append((stop, index.stop, index.n_tokens, h.hexdigest()))
    return out


def watched_round(rt, monkeypatch, prefix, requests):
    """Serve ``requests`` together on a new backend; their Dones and, per prompt (a tuple of its ids), whether a
    pass before its last left tables, and its tables when its first decode step began."""
    from offload_rt.serve.backend import BatchBackend

    early: dict = {}  # prompt -> tables found after a pass before the prompt's last
    at_decode: dict = {}  # prompt -> tables when the first decode step began
    owner: dict = {}  # id(cache) -> the prompt it holds
    step = backend_module.step

    def watching(engine, decode, prefill=(), **kw):
        for cache, _token in decode:
            at_decode.setdefault(owner[id(cache)], tables(cache))
        res = step(engine, decode, prefill, **kw)
        for p in prefill:
            if not p.want_logits and any(t is not None for t in tables(p.cache)):
                early[owner[id(p.cache)]] = True
        return res

    backend = BatchBackend(rt, model_id="m", prefix=prefix)
    real_admit = backend._admit

    def admit():  # which prompt each cache takes
        waiting = list(backend._waiting)
        real_admit()
        for seq in waiting:
            if seq.cache is not None:
                owner[id(seq.cache)] = tuple(seq.prompt)

    monkeypatch.setattr(backend, "_admit", admit)
    monkeypatch.setattr(backend_module, "step", watching)
    reqs = [GenRequest(tuple(ids), max_tokens=N_NEW, temperature=0, ignore_eos=True) for ids in requests]
    done = serve_in_process(backend, reqs)
    monkeypatch.setattr(backend_module, "step", step)
    return done, early, at_decode


def test_served_tables_are_built_by_the_last_prompt_pass_and_answers_are_the_engines(rt, prompts, reference,
                                                                                     monkeypatch):
    """Uncached, then with the system prompt restored from the prefix cache (2 passes left) beside a prompt
    wholly cached but its last chunk: no pass before a prompt's last builds tables, the tables when decode
    begins are the engine's (same tokens, centre and buckets: built once over the whole prompt), and so is
    the greedy answer."""
    from offload_rt.serve import open_prefix_cache

    C = rt.prepared.kv.shape.chunk_tokens
    prefix = open_prefix_cache(rt)
    assert prefix is not None and prefix.granule == C
    first, early, at_decode = watched_round(rt, monkeypatch, prefix, [prompts[0]])
    assert first[0].cached_tokens == 0 and first[0].completion_tokens == N_NEW
    stop = ((len(prompts[0]) + 1 - 64) // C) * C  # the tables cover [4, stop): the rest is the exact window
    assert all(t is not None and t[:3] == (stop, stop, stop - 4) for t in at_decode[tuple(prompts[0])])
    assert not early
    assert at_decode[tuple(prompts[0])] == reference[0][1]
    assert first[0].text == reference[0][0]

    both, early, at_decode = watched_round(rt, monkeypatch, prefix, [prompts[1], prompts[0]])
    assert [d.cached_tokens for d in both] == [C, 2 * C]
    assert not early
    for ids, done, (text, ref_tables) in zip(prompts, both[::-1], reference):
        assert at_decode[tuple(ids)] == ref_tables
        assert done.text == text and done.completion_tokens == N_NEW
    prefix.close()
