"""Every option changes what a run does: each test fails if its option were ignored.

Runs a tiny random-weight checkpoint with the default model's tokenizer (tests/tiny_checkpoint.py), so
answers are gibberish but deterministic, and a run takes a couple of seconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

import offload_rt
from tests.cli_helpers import run_cli
from tests.tiny_checkpoint import write_tiny_checkpoint

PROMPT = "Name three colours."
FIXED = ("-n", "16", "--ignore-eos")  # sixteen new tokens, always
STREAM_BUDGET = "36M"  # the tiny model's 24 MiB head and KV stay, about half its layers stream


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    """(checkpoint dir, store dir); the store is converted by the first run."""
    d = tmp_path_factory.mktemp("tiny")
    return write_tiny_checkpoint(d / "tiny", default_gguf), d / "stores"


def run(tiny, *args, **kw):
    ckpt, stores = tiny
    return run_cli(ckpt, "--offload-dir", stores, *args, **kw)


def answer(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]  # the CLI ends the answer with a newline


def stats(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


def tokenizer(tiny):
    from offload_rt.tokenizer import Tokenizer
    from storage.store import WeightStore

    (path,) = tiny[1].glob("tiny-*.zarr")
    store = WeightStore.open(path)
    return Tokenizer(store.tokenizer_file, store.tokenizer_meta)


@pytest.fixture(scope="module")
def greedy(tiny):
    """(answer, stats) of the plain run: chat template, greedy, float32, everything resident."""
    proc = run(tiny, "--prompt", PROMPT, *FIXED, "--stats")
    return answer(proc), stats(proc)


@pytest.fixture(scope="module")
def sampled(tiny):
    """Answers at temperature 1 with seeds 1, 1 and 2."""
    return [answer(run(tiny, "--prompt", PROMPT, *FIXED, "--temperature", "1.0", "--seed", s)) for s in "112"]


def test_temperature_samples_and_the_seed_reproduces(greedy, sampled):
    first, again, other = sampled
    assert first != greedy[0]  # sampling, not argmax
    assert first == again  # same seed, same answer
    assert first != other  # another seed, another answer


@pytest.mark.parametrize("flag", [("--top-k", "1"), ("--top-p", "1e-6")])
def test_top_k_and_top_p_narrow_sampling_to_the_best_token(tiny, greedy, sampled, flag):
    """Keeping only the most likely token makes sampling greedy; ignored, the answer would be seed 1's."""
    assert sampled[0] != greedy[0]
    got = answer(run(tiny, "--prompt", PROMPT, *FIXED, "--temperature", "1.0", "--seed", "1", *flag))
    assert got == greedy[0]


def test_stop_string_ends_the_answer_before_it(tiny, greedy):
    text = greedy[0]
    words = [w for w in text.split() if len(w) >= 3 and text.find(w) > 0]
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    proc = run(tiny, "--prompt", PROMPT, *FIXED, "--stop", "\u2603 never \u2603", "--stop", stop, "--stats")
    assert answer(proc) == text[:text.find(stop)]
    assert stats(proc)["new_tokens"] < greedy[1]["new_tokens"] == 16


def test_raw_sends_the_prompt_without_the_chat_template(tiny, greedy):
    tok = tokenizer(tiny)
    proc = run(tiny, "--raw", "--prompt", PROMPT, *FIXED, "--stats")
    assert stats(proc)["prompt_tokens"] == len(tok.encode(PROMPT))
    assert greedy[1]["prompt_tokens"] == len(tok.encode_chat([{"role": "user", "content": PROMPT}]))
    assert stats(proc)["prompt_tokens"] < greedy[1]["prompt_tokens"]
    assert answer(proc) != greedy[0]  # another prompt, another continuation


def test_prompt_file_is_the_whole_prompt(tiny, greedy, tmp_path):
    question = "Name three colours.\nThen name three more."
    f = tmp_path / "q.txt"
    f.write_text(question + "\n")  # the file's final newline is not part of the question
    proc = run(tiny, "--prompt-file", f, *FIXED, "--stats")
    assert stats(proc)["prompt_tokens"] == len(tokenizer(tiny).encode_chat([{"role": "user", "content": question}]))
    assert answer(proc) != greedy[0]


def test_dtype_sets_the_compute_dtype(tiny, greedy):
    proc = run(tiny, "--prompt", PROMPT, *FIXED, "--dtype", "bfloat16", "--stats")
    s = stats(proc)
    assert s["dtype"] == "bfloat16" and greedy[1]["dtype"] == "float32"
    assert s["placement"]["host"] * 2 == greedy[1]["placement"]["host"]  # resident weights at half the bytes


def test_prefetch_depth_is_the_runs(tiny, greedy):
    chosen = stats(run(tiny, "--prompt", PROMPT, *FIXED, "--cpu-mem", STREAM_BUDGET, "--stats"))
    assert chosen["placement"]["disk"] > 0  # the budget makes it stream
    depth = 3 if chosen["prefetch_depth"] != 3 else 2  # not what the planner picks by itself
    proc = run(tiny, "--prompt", PROMPT, *FIXED, "--cpu-mem", STREAM_BUDGET, "--prefetch-depth", depth, "--stats")
    assert stats(proc)["prefetch_depth"] == depth
    assert answer(proc) == greedy[0]  # streamed at any depth: the same tokens


def test_rebuild_store_converts_a_corrupt_store_again(tiny, greedy, tmp_path):
    from storage.store import WeightStore

    stores = tmp_path / "stores"
    (path,) = tiny[1].glob("tiny-*.zarr")
    shutil.copytree(path, stores / path.name)  # a private copy to damage
    tensor = stores / path.name / "model.layers.1.mlp.up_proj.weight"
    chunk = next(p for p in tensor.rglob("*") if p.is_file() and p.name != "zarr.json")
    good = chunk.read_bytes()
    chunk.write_bytes(good[:64] + bytes([good[64] ^ 0xFF]) + good[65:])
    proc = run_cli(tiny[0], "--offload-dir", stores, "--prompt", PROMPT, *FIXED, "--rebuild-store")
    assert answer(proc) == greedy[0]
    WeightStore.open(stores / path.name).verify_all()  # every checksum holds again
    assert chunk.read_bytes() == good


# offload-run with a probe: prints how many threads torch computes the prefill on, then runs the CLI as is.
THREAD_PROBE = """
import sys, torch
from offload_rt.engine import Engine
real_prefill = Engine.prefill
def prefill(self, *a, **k):
    print(f"probe: prefill on {torch.get_num_threads()} threads", file=sys.stderr)
    return real_prefill(self, *a, **k)
Engine.prefill = prefill
from offload_rt.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("flag", ["--threads", "-t"])
def test_threads_sets_the_compute_threads(tiny, flag):
    """In a fresh process, as a user runs it (the thread count is process state): with OMP_NUM_THREADS=2
    torch would use 2 threads; the flag asks for 1."""
    ckpt, stores = tiny
    env = dict(os.environ, OMP_NUM_THREADS="2", OFFLOAD_RT_BANDWIDTHS="disk=1.3e9,mem=2.4e10,matvec=1.5e10")
    proc = subprocess.run([sys.executable, "-c", THREAD_PROBE, str(ckpt), "--offload-dir", str(stores),
                           "--prompt", PROMPT, "-n", "2", flag, "1"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "probe: prefill on 1 threads" in proc.stderr.splitlines()


def test_version_is_the_package_metadata():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"offload-run {importlib.metadata.version('offload_rt')}\n"
    assert importlib.metadata.version("offload_rt") == offload_rt.__version__
