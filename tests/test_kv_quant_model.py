"""The default model with quantized KV (``--kv-dtype q8|q4``) against float KV, and across placements.

Teacher-forced on the float KV's greedy tokens, the quantized caches' logits stay within a stated
error of the float ones (q8 tight, q4 looser); greedy decoding picks the same tokens wherever the float
run's choice is not a near-tie (the top two logits closer than twice that step's error). The same quantized KV in RAM and spilled to disk gives the
same tokens.
"""

from __future__ import annotations

import pytest
import torch

from kernels_cpu.kv_quant import KVQuant
from offload_rt.config import RunConfig
from offload_rt.kv.tiered import TieredKV
from offload_rt.loader import load_model
from offload_rt.memory.kv_plan import STAGING_BATCH

CHUNK = 32
N = 20
PROMPTS = [("The lighthouse keeper wrote in his log every night. He noted the wind, the ships that passed, "
            "the colour of the sea at dusk and the number of gulls on the rocks. ") * 3,
           "List the planets of the solar system in order from the sun, with one fact about each: "]
# the largest logit error teacher-forced over the prompts' N steps (logits up to ~32). Measured on this model:
# q8 0.23, q4 4.8 (bf16 KV: 0.08; the RMS error of a value row quantized over the head dim: q8 ~0.6 %, q4 ~10 %)
BOUND = {"q8": 0.4, "q4": 6.0}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(2)
    return load_model(RunConfig(offload_dir=tmp_path_factory.mktemp("stores"), progress=False))


def _cache(model, name, spill_root=None, **kw):
    a = model.args
    quant = KVQuant(name, a.head_dim, CHUNK) if name else None
    per_layer = -(-512 // CHUNK)
    host = 3 * a.num_hidden_layers if spill_root else a.num_hidden_layers * per_layer
    return TieredKV(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, model.dtype, 512, host_chunks=host,
                    staging_chunks=2 * STAGING_BATCH if spill_root else 0, disk_root=spill_root,
                    chunk_tokens=CHUNK, quant=quant, **kw)


def _decode(model, cache, ids, forced=None, n=N):
    """(logits of each of n steps [n, vocab], the tokens taken: greedy, or ``forced``)."""
    eng = model.engine
    eng.cache, eng.tokens = cache, []
    logits, out = [], []
    with torch.inference_mode():
        step = eng.prefill(ids)
        for i in range(n):
            logits.append(step.float().flatten())
            t = int(torch.argmax(step)) if forced is None else forced[i]
            out.append(t)
            step = eng.forward([t])
    return torch.stack(logits), out


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_quantized_kv_logits_within_the_bound_and_greedy_tokens_the_same_but_near_ties(model, name):
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        ref, ref_tokens = _decode(model, _cache(model, None), ids)
        forced, _ = _decode(model, _cache(model, name), ids, forced=ref_tokens)
        err = (forced - ref).abs().amax(1)
        print(name, f"max logit error {err.max():.3f}")
        assert err.max() < BOUND[name], err
        assert err.max() > 0  # quantized: not the float cache again
        _same_but_near_ties(ref, ref_tokens, _decode(model, _cache(model, name), ids)[1], err, name)


def _same_but_near_ties(ref, ref_tokens, tokens, err, what):
    """Greedy ``tokens`` are the reference's up to the first difference, which must be a near-tie there: the
    reference's top two logits closer than twice that step's logit error ``err`` (after it the texts differ)."""
    for i, (a, b) in enumerate(zip(ref_tokens, tokens)):
        if a != b:
            gap = (ref[i, a] - ref[i, b]).item()
            assert gap <= 2 * err[i].item(), (i, gap, err[i])
            print(what, f"token {i} differs: a near-tie, float gap {gap:.3f}")
            break


def test_quantized_kv_spilled_to_disk_gives_the_tokens_it_gives_in_ram(model, tmp_path):
    ids = model.tokenizer.encode(PROMPTS[0])
    assert len(ids) > 3 * CHUNK
    _, in_ram = _decode(model, _cache(model, "q4"), ids)
    spilled = _cache(model, "q4", tmp_path)
    _, on_disk = _decode(model, spilled, ids)
    assert spilled.tier_bytes()["disk"] > 0 and spilled.disk_read_bytes > 0
    spilled.close()
    assert in_ram == on_disk



def test_magicpig_over_q8_kv_is_magicpig_over_float_kv_within_q8s_bound(model):
    """MagicPIG over q8 KV through the model (tables over the closed chunks' dequantized keys, the sampled
    rows, sinks and window read from the records, the open chunk's floats merged) against MagicPIG over float
    KV, both with K = 1 bit and 64 tables so that every key is sampled (u ~ 1) and the estimators coincide:
    teacher-forced on the float MagicPIG run's greedy tokens, the logits differ by at most q8's bound, and
    greedy decoding takes the same tokens but near-ties. ~200 tokens of context: every decode step samples."""
    ids = model.tokenizer.encode(PROMPTS[0] * 2)
    n = 8
    pig = dict(attention="magicpig", lsh_k=1, lsh_l=64)
    ref, ref_tokens = _decode(model, _cache(model, None, **pig), ids, n=n)
    cache = _cache(model, "q8", **pig)
    forced, _ = _decode(model, cache, ids, forced=ref_tokens, n=n)
    assert len(ids) > 200 and all(i is not None and i.quant is not None and i.n_tokens > 100 for i in cache._index)
    err = (forced - ref).abs().amax(1)
    print(f"q8 MagicPIG vs float MagicPIG: max logit error {err.max():.3f}")
    assert 0 < err.max() < BOUND["q8"], err
    _same_but_near_ties(ref, ref_tokens, _decode(model, _cache(model, "q8", **pig), ids, n=n)[1], err, "q8 magicpig")
