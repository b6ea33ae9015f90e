"""Hugging Face checkpoint directories end to end: safetensors → store → loader → (streamed) engine → CLI text.

Each case is a tiny random model of one family, saved with ``save_pretrained`` (plus the default model's
tokenizer), in the config.json form transformers writes today (``rope_parameters``) or in the older one
(``rope_theta``/``rope_scaling``). The CLI's greedy text must equal transformers' ``generate`` on the same
weights, with every weight resident and with the layers streamed from disk.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from offload_rt.config import RunConfig
from tests.cli_helpers import run_cli
from tests.hf_models import SMOLLM_VOCAB, tiny_model, write_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
# A larger init than transformers' 0.02 spreads the logits, so greedy choices are far from ties (checked below).
INIT = dict(vocab_size=SMOLLM_VOCAB, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
BANDWIDTHS = {"disk_read": 1.3e9, "mem_read": 2.4e10, "matvec": 1.5e10}  # as tests/cli_helpers.py sets them
PROMPT = "The three primary colours are"  # 6 tokens: longer than the sliding windows below
NEW_TOKENS = 10
MIN_GAP = 1e-3  # smallest top-1 / top-2 logit gap of the reference; float32 implementations differ by ~1e-5

# id: (model_type, model overrides, config.json form, config.json edits)
CASES = {
    "llama-llama3rope-untied-oldcfg": ("llama", {"rope_scaling": LLAMA3_ROPE}, "old", {}),
    "llama-llama3rope-tied-newcfg": ("llama", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}, "new", {}),
    "mistral-slidingwindow-oldcfg": ("mistral", {"sliding_window": 4}, "old", {}),
    # Qwen2.5 configs carry a sliding_window that use_sliding_window=false switches off
    "qwen2-qkvbias-tied-oldcfg": ("qwen2", {"tie_word_embeddings": True}, "old",
                                  {"sliding_window": 4, "use_sliding_window": False, "max_window_layers": 1}),
    # use_sliding_window: only layers >= max_window_layers slide (config.layer_types)
    "qwen2-slidinglayers-newcfg": ("qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                             "max_window_layers": 1}, "new", {}),
    "qwen3-qknorm-headdim-tied-newcfg": ("qwen3", {"tie_word_embeddings": True}, "new", {}),
}


def reference_text(hf, model_dir) -> str:
    """transformers' greedy continuation of PROMPT, decoded by transformers' tokenizer from the checkpoint."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    hf.generation_config.eos_token_id = None  # like --ignore-eos
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + NEW_TOKENS
        top2 = hf(out).logits[0, ids.shape[1] - 1:-1].topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > MIN_GAP, f"the reference is {gap:.1e} from a tie: pick another seed"
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def min_working_set(model_dir, store_dir) -> int:
    """The smallest --cpu-mem the planner accepts for this model: the run that streams the most."""
    from offload_rt import runtime
    from offload_rt.loader import open_model

    cfg = RunConfig(model=str(model_dir), offload_dir=store_dir, progress=False, bandwidth_hints=BANDWIDTHS,
                    cpu_mem=1 << 40)
    m = open_model(cfg)
    return runtime.prepare(cfg, m.store, m.args, m.dtype, m.groups, "cpu").placement.min_working_set


def cli_text(model_dir, store_dir, cpu_mem) -> tuple[str, dict]:
    proc = run_cli(model_dir, "--raw", "--ignore-eos", "--prompt", PROMPT, "-n", NEW_TOKENS, "--device", "cpu",
                   "--cpu-mem", cpu_mem, "--offload-dir", store_dir, "--stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1], json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_cli_greedy_text_matches_transformers_resident_and_streamed(case, tmp_path):
    model_type, over, form, edit = CASES[case]
    hf = tiny_model(model_type, seed=1, **INIT, **over)
    model_dir = write_checkpoint(tmp_path / case, hf, form=form, config_edit=edit)
    ref = reference_text(hf, model_dir)
    stores = tmp_path / "stores"

    resident, stats = cli_text(model_dir, stores, "1G")
    assert stats["placement"]["disk"] == 0 and stats["dtype"] == "float32"
    assert resident == ref

    streamed, stats = cli_text(model_dir, stores, min_working_set(model_dir, stores))
    assert stats["placement"]["disk"] > 0 and stats["disk_read_bytes"] > 0
    assert streamed == ref


def test_config_forms_and_sliding_window_rules():
    """config.json read as transformers reads it: both RoPE spellings, and where a sliding window applies."""
    from offload_rt.errors import ModelSourceError
    from offload_rt.models.llama import LlamaArgs, rope_inv_freq
    from tests.hf_models import old_form

    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
            "num_attention_heads": 4, "vocab_size": 300}
    new = {**base, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}}
    old = old_form(new)
    assert old["rope_scaling"] == LLAMA3_ROPE and old["rope_theta"] == 500000.0 and "rope_parameters" not in old
    a, b = LlamaArgs.from_config(new), LlamaArgs.from_config(old)
    assert a.rope_theta == b.rope_theta == 500000.0 and torch.equal(rope_inv_freq(a), rope_inv_freq(b))
    plain = LlamaArgs.from_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert not torch.equal(rope_inv_freq(a), rope_inv_freq(plain))  # the scaling really is read
    with pytest.raises(ModelSourceError, match="unsupported rope scaling 'yarn'"):  # before any conversion
        LlamaArgs.from_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})

    def windows(model_type, **cfg):
        args = LlamaArgs.from_config({**base, "model_type": model_type, **cfg})
        return [args.window(i) for i in range(3)]

    assert windows("mistral", sliding_window=8) == [8, 8, 8]
    assert windows("llama", sliding_window=8) == [None] * 3  # transformers' Llama has no sliding window
    for qwen in ("qwen2", "qwen3"):
        assert windows(qwen, sliding_window=8, use_sliding_window=False) == [None] * 3
        assert windows(qwen, sliding_window=8, use_sliding_window=True, max_window_layers=1) == [None, 8, 8]
        assert windows(qwen, sliding_window=8, use_sliding_window=True,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]) == [8, None, 8]
    with pytest.raises(ModelSourceError, match="layer_types"):
        windows("qwen2", sliding_window=8, use_sliding_window=True, layer_types=["full_attention"])


@pytest.mark.parametrize("edit,message", [
    ({"tie_word_embeddings": False}, "has no tensor lm_head.weight, which its config.json implies"),
    ({"intermediate_size": 128}, "tensor model.layers.0.mlp.gate_proj.weight has shape [160, 64] but config.json "
                                 "implies [128, 64]"),
], ids=["missing-tensor", "wrong-shape"])
def test_config_that_does_not_match_the_weights_is_a_user_error(edit, message, tmp_path):
    from offload_rt.errors import ModelSourceError
    from offload_rt.loader import open_model

    model_dir = write_checkpoint(tmp_path / "m", tiny_model("llama", tie_word_embeddings=True), config_edit=edit)
    with pytest.raises(ModelSourceError, match=re.escape(message)):
        open_model(RunConfig(model=str(model_dir), offload_dir=tmp_path / "stores", progress=False))


# ---------------------------------------------------------------- half precision

# Tolerance for logits against transformers in the same dtype: max |ours - theirs| <= 8 eps * max |theirs|.
# Each rounding to the dtype is off by at most eps/2 relative; the two implementations round at different
# points (fused vs eager attention, float32-accumulating decode mat-vec vs torch's), and the differences
# compound over 3 layers and the final norm: measured ~3 eps here. A wrong operation (RoPE, a norm, a bias)
# is off by O(1) relative (> 100 eps); bf16 computed for an fp16 checkpoint is off by ~25 fp16 eps.
HALF_TOL_EPS = 8
HALF_CASES = {
    "bf16-llama-untied-oldcfg": ("llama", torch.bfloat16, "old", {}),
    "fp16-qwen2-tied-newcfg": ("qwen2", torch.float16, "new", {"tie_word_embeddings": True}),
    "bf16-qwen3-tied-newcfg": ("qwen3", torch.bfloat16, "new", {"tie_word_embeddings": True}),
}


def open_engine(model_dir, store_dir, cpu_mem=None):
    """The model as app.main runs it: planned for ``cpu_mem`` (None: all resident), streamed source, engine."""
    from offload_rt import runtime
    from offload_rt.loader import attach_engine, open_model

    cfg = RunConfig(model=str(model_dir), offload_dir=store_dir, progress=False, bandwidth_hints=BANDWIDTHS,
                    cpu_mem=cpu_mem if cpu_mem is not None else 1 << 40)
    model = open_model(cfg)
    prepared = runtime.prepare(cfg, model.store, model.args, model.dtype, model.groups, "cpu")
    source = prepared.factory(cfg)(model.store, model.args, model.dtype, model.groups)
    return model, attach_engine(model, cfg, source), prepared.placement


@pytest.mark.parametrize("case", list(HALF_CASES))
def test_half_precision_is_the_default_and_matches_transformers(case, tmp_path):
    model_type, dtype, form, over = HALF_CASES[case]
    hf = tiny_model(model_type, seed=2, **INIT, **over)
    model_dir = write_checkpoint(tmp_path / case, hf, form=form, dtype=dtype)  # hf is now in dtype too
    model, engine, _ = open_engine(model_dir, tmp_path / "stores")
    try:
        assert model.dtype == dtype and engine.cache.dtype == dtype  # the checkpoint's dtype, no --dtype given
        ids = torch.randint(0, SMOLLM_VOCAB, (24,), generator=torch.Generator().manual_seed(0))
        tol = HALF_TOL_EPS * torch.finfo(dtype).eps
        with torch.no_grad():
            ref = hf(ids[None]).logits[0, -1].float()
            got = engine.prefill(ids.tolist())
            assert (got - ref).abs().max() <= tol * ref.abs().max(), ((got - ref).abs().max(), ref.abs().max())
            for t in (5, 17, 1000):  # decode steps (the bf16 mat-vec kernel, the KV cache in dtype)
                ids = torch.cat([ids, torch.tensor([t])])
                ref = hf(ids[None]).logits[0, -1].float()
                got = engine.forward([t])
                assert (got - ref).abs().max() <= tol * ref.abs().max(), ((got - ref).abs().max(), t)
    finally:
        engine.close()


def test_bf16_streamed_logits_identical_to_resident(tmp_path):
    hf = tiny_model("llama", seed=3, **INIT, rope_scaling=LLAMA3_ROPE)
    model_dir = write_checkpoint(tmp_path / "bf16", hf, dtype=torch.bfloat16)
    stores = tmp_path / "stores"
    ids = torch.randint(0, SMOLLM_VOCAB, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    runs = []
    for cpu_mem in (None, min_working_set(model_dir, stores)):
        model, engine, placement = open_engine(model_dir, stores, cpu_mem)
        try:
            assert model.dtype == torch.bfloat16
            assert bool(placement.streamed) == (cpu_mem is not None)  # the second run streams from disk
            with torch.no_grad():
                logits = [engine.prefill(ids)]
                for _ in range(4):
                    logits.append(engine.forward([int(logits[-1].argmax())]))
            runs.append(torch.stack(logits))
        finally:
            engine.close()
    assert torch.equal(runs[0], runs[1])
