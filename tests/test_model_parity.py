"""Our Llama-family forward against Hugging Face transformers on the same weights (float32)."""

import pytest
import torch

from offload_rt.engine import Engine, ResidentWeights, model_groups
from offload_rt.models import llama
from offload_rt.models.llama import LlamaArgs
from tests.hf_models import tiny_model

CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"num_key_value_heads": 4}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
]


def engine_for(hf, dtype=torch.float32, prefill_chunk=512):
    cfg = hf.config.to_dict()
    args = LlamaArgs.from_config(cfg)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    source = ResidentWeights(model_groups(args), lambda n: sd[n].to(dtype), llama.EMBED)
    return Engine(args, source, dtype, prefill_chunk=prefill_chunk)


@pytest.mark.parametrize("model_type,over", CASES, ids=[f"{m}-{'-'.join(o) or 'base'}" for m, o in CASES])
def test_logits_match_transformers(model_type, over):
    hf = tiny_model(model_type, **over)
    eng = engine_for(hf, prefill_chunk=7)  # several prefill chunks: exercises the offset mask
    ids = torch.randint(0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        ours_last = eng.prefill(ids.tolist())
    assert torch.allclose(ours_last, ref[-1], atol=1e-4, rtol=1e-4), (ours_last - ref[-1]).abs().max()
    # Decode steps one token at a time continue to match.
    with torch.no_grad():
        for t in [5, 17, 99]:
            ids = torch.cat([ids, torch.tensor([t])])
            ref = hf(ids[None]).logits[0, -1]
            ours = eng.forward([t])
            assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_continuation_identical(model_type):
    hf = tiny_model(model_type, seed=3)
    eng = engine_for(hf)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          pad_token_id=0, eos_token_id=None)
        ref = out[0, len(prompt):].tolist()
        logits = eng.prefill(prompt)
        ours = []
        for _ in range(32):
            t = int(torch.argmax(logits))
            ours.append(t)
            logits = eng.forward([t])
    assert ours == ref


def test_sliding_window_matches_transformers():
    hf = tiny_model("mistral", seed=5, sliding_window=16)
    eng = engine_for(hf)
    ids = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, -1]
        ours = eng.prefill(ids.tolist())
    assert (ours - ref).abs().max() < 1e-4


def test_prefix_reuse_gives_same_logits():
    hf = tiny_model("llama", seed=4)
    eng = engine_for(hf)
    a = list(range(10, 40))
    b = a[:20] + [7, 8, 9]
    with torch.no_grad():
        eng.prefill(a)
        reused = eng.prefill(b)  # trims the cache back to the 20-token common prefix
        fresh = engine_for(hf).prefill(b)
    assert eng.cache.offset == len(b)
    assert torch.equal(reused, fresh) or (reused - fresh).abs().max() < 1e-5


def test_unsupported_model_type_is_a_user_error():
    from offload_rt.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="unsupported model_type 'gpt2'"):
        LlamaArgs.from_config({"model_type": "gpt2"})
