"""Quantized weights in whole models: the default model run natively from its Q4_1 blocks against its
float32 dequantization, a safetensors model quantized to int8/int4 against its bf16 weights, and
streamed quantized runs against resident ones."""

from __future__ import annotations

import json
import math

import pytest
import torch

from offload_rt.config import RunConfig
from offload_rt.loader import load_model
from tests.cli_helpers import run_cli

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
NEW_TOKENS = 24
# A greedy token may differ from the float32 run's only where float32 itself nearly ties: its logit for our
# token within NEAR_TIE of its own top logit (logits of this model span ~30; the native kernels' logits differ
# from float32's by LOGIT_ERROR at most, relative to that span, measured ~1e-3).
NEAR_TIE = 0.25
LOGIT_ERROR = 0.01
TEXT = ("The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. Every "
        "evening the keeper climbed the spiral stairs to light the lamp, and every morning he wrote in his "
        "log the ships he had seen and the weather of the night.")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="module")
def native(store_dir):
    torch.set_num_threads(2)
    return load_model(RunConfig(offload_dir=store_dir, progress=False))


@pytest.fixture(scope="module")
def f32(store_dir):
    return load_model(RunConfig(offload_dir=store_dir, progress=False, weights="f32"))


def greedy(model, ids, n=NEW_TOKENS):
    eng = model.engine
    eng.reset()
    out, seen = [], []
    with torch.inference_mode():
        logits = eng.prefill(ids)
        for _ in range(n):
            seen.append(logits.clone())
            out.append(int(torch.argmax(logits)))
            logits = eng.forward([out[-1]])
    return out, seen


def test_native_q4_1_is_stored_as_the_file(native):
    st = native.store
    formats = {st.info(n).fmt.name for n in st.tensor_names}
    assert formats == {"q4_1", "q8_0", "float32"}  # the file's own types: nothing dequantized
    assert st.total_bytes < 100e6 and native.dtype == torch.float32


def test_native_q4_1_gives_the_float32_greedy_text(native, f32):
    for prompt in PROMPTS:
        ids = native.tokenizer.encode(prompt)
        got, got_logits = greedy(native, ids)
        ref, ref_logits = greedy(f32, ids)
        span = float(ref_logits[0].max() - ref_logits[0].min())
        err = float((got_logits[0] - ref_logits[0]).abs().max()) / span
        assert err < LOGIT_ERROR, (prompt, err)
        if got != ref:  # allowed only at a float32 near-tie, and then both continue from different text
            i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
            gap = float(ref_logits[i][ref[i]] - ref_logits[i][got[i]])
            assert gap < NEAR_TIE, (prompt, i, gap)


@pytest.fixture(scope="module")
def smollm_bf16(tmp_path_factory, f32):
    """The default model's weights (its float32 dequantization) saved as a bf16 safetensors checkpoint."""
    import shutil

    from safetensors.torch import save_file

    dest = tmp_path_factory.mktemp("ckpt") / "smollm-bf16"
    dest.mkdir()
    st = f32.store
    save_file({n: st.load(n).to(torch.bfloat16) for n in st.tensor_names}, str(dest / "model.safetensors"))
    cfg = dict(st.model_config, torch_dtype="bfloat16")
    (dest / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(st.tokenizer_file, dest / "tokenizer.json")
    meta = st.tokenizer_meta
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {k: meta[k] for k in ("bos_token", "eos_token", "chat_template", "add_bos_token")}))
    return dest


def teacher_forced(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 and the logits row of every step, one token at a time."""
    eng = model.engine
    eng.reset()
    logps, rows = [], []
    with torch.inference_mode():
        logits = eng.prefill(ids[:1])
        for t in ids[1:]:
            rows.append(logits.float())
            logps.append(float(torch.log_softmax(logits.float(), -1)[t]))
            logits = eng.forward([t])
    return logps, torch.stack(rows)


# Perplexity on TEXT relative to bf16 (29.3), and the logits' RMS error relative to their spread, measured
# with the quantized embedding's rows in the compute dtype (bfloat16), as every run computes them:
# int8 -2.1 % / 0.039, int4 +10.8 % / 0.108 (a 135M model loses more to 4 bits than large ones do);
# the bounds are about twice that. (Before, a resident library model kept those rows in float32: -0.5 % /
# 0.030 and +12.8 % / 0.111.)
BOUNDS = {"int8": (0.045, 0.08), "int4": (0.25, 0.2)}


@pytest.mark.parametrize("choice", ["int8", "int4"])
def test_quantized_safetensors_stay_within_the_stated_error_of_bf16(smollm_bf16, tmp_path, choice):
    cfgs = {w: RunConfig(model=str(smollm_bf16), offload_dir=tmp_path, progress=False, weights=w)
            for w in ("auto", choice)}
    ref_model = load_model(cfgs["auto"])
    ids = ref_model.tokenizer.encode(TEXT)
    ref_lp, ref_rows = teacher_forced(ref_model, ids)
    q_model = load_model(cfgs[choice])
    assert q_model.dtype == torch.bfloat16
    assert {q_model.store.info(n).fmt.name for n in q_model.store.tensor_names} == \
        {{"int8": "q8_0", "int4": "q4_1"}[choice], "bfloat16"}
    lp, rows = teacher_forced(q_model, ids)
    ppl_ref, ppl = math.exp(-sum(ref_lp) / len(ref_lp)), math.exp(-sum(lp) / len(lp))
    rms = float(((rows - ref_rows) ** 2).mean().sqrt() / ref_rows.std())
    ppl_bound, rms_bound = BOUNDS[choice]
    assert ppl_ref < 60  # real weights on real text (random weights: ~49152)
    assert abs(ppl / ppl_ref - 1) < ppl_bound, (ppl, ppl_ref)
    assert rms < rms_bound, rms


def _run(*args):
    proc = run_cli("--raw", "--prompt", PROMPTS[2], "-n", "16", "--ignore-eos", "--stats", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


def test_streamed_and_resident_quantized_runs_give_identical_text(store_dir):
    text, stats = _run("--offload-dir", store_dir, "--cpu-mem", "2G")
    assert stats["placement"]["disk"] == 0
    streamed, s = _run("--offload-dir", store_dir, "--cpu-mem", "80M", "-c", "128")
    assert s["placement"]["disk"] > 0 and s["disk_read_bytes_decode"] > 0
    assert streamed == text
