"""Mixture-of-Experts models (qwen3_moe, mixtral, qwen2_moe) run by offload_rt with every expert resident, at
library level, against transformers on the same weights: greedy tokens (and each step's logits) from the
Hugging Face directory, from GGUF files with stacked experts (F32, Q8_0 experts, a Q4_K/Q6_K mix) and with
``--weights int4`` (q4_1 experts); a prefill of several rows per chunk (tokens sharing experts); and one
speculation-tree pass (rows at arbitrary positions under a tree mask) equal to each path run alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from offload_rt.config import RunConfig
from offload_rt.loader import load_model
from offload_rt.spec.tree import Tree
from storage.experts import parse_expert_name
from tests.gguf_models import write_moe_gguf
from tests.moe_models import (MOE_TYPES, checkpoint_tensors, greedy_reference, model_from_tensors, tiny_moe_model,
                              write_moe_checkpoint)

PROMPT = [5, 17, 33, 4, 90, 12, 7, 250, 61]  # 9 rows: prefill chunks of 4, 4, 1 (PREFILL_CHUNK)
PREFILL_CHUNK = 4
NEW_TOKENS = 10
# (model_type, wide) -> a seed whose greedy run is varied and far from ties
SEED = {("qwen3_moe", False): 4, ("mixtral", False): 3, ("qwen2_moe", False): 5,
        ("qwen3_moe", True): 0, ("mixtral", True): 6, ("qwen2_moe", True): 7}
# Logits: same weights, float32, only the order of the sums differs: measured up to 9e-7 (logits up to ~1);
# a reference's smallest top-1 / top-2 gap (moe_models.MIN_GAP) stays 25x above, so equal tokens are fair.
ATOL = 2e-5


class Models:
    """Checkpoints and GGUF files shared by the tests of this module (built once each, on first use)."""

    def __init__(self, root: Path):
        self.root = root
        self.stores = root / "stores"
        self._cache: dict = {}

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def hf(self, model_type: str, wide: bool = False):
        """(transformers model, its checkpoint directory); ``wide``: hidden size and expert width 256 (K-quants)."""
        over = dict(hidden_size=256, width=256) if wide else {}

        def build():
            hf = tiny_moe_model(model_type, seed=SEED[model_type, wide], **over)
            return hf, write_moe_checkpoint(self.root / f"{model_type}{'-wide' if wide else ''}", hf)
        return self._once(("hf", model_type, wide), build)

    def gguf(self, model_type: str, kind: str):
        """(GGUF path, what it holds under the checkpoint's names) of ``model_type`` with weight types ``kind``."""
        def build():
            _, ckpt = self.hf(model_type, wide=kind == "kmix")
            path = self.root / f"{model_type}-{kind}.gguf"
            return path, write_moe_gguf(path, ckpt, qtype_of=GGUF_KINDS[kind])
        return self._once(("gguf", model_type, kind), build)


def q8_experts(name: str, arr: np.ndarray) -> Q:
    """Q8_0 routed and shared experts, the rest F32."""
    return Q.Q8_0 if name.endswith(("_exps.weight", "gate_shexp.weight", "up_shexp.weight",
                                    "down_shexp.weight")) else Q.F32


def kquant_mix(name: str, arr: np.ndarray) -> Q:
    """A Q4_K_M-like mix: Q6_K down projections (routed and shared) and head, Q4_K for other matrices whose rows
    are whole 256-value super-blocks, Q8_0 for the rest (attention output); norms and routers F32, as
    llama.cpp keeps ``ffn_gate_inp`` and ``ffn_gate_inp_shexp``."""
    if arr.ndim == 1 or ".ffn_gate_inp" in name:
        return Q.F32
    if name == "output.weight" or name.endswith(("ffn_down_exps.weight", "ffn_down_shexp.weight")):
        return Q.Q6_K
    return Q.Q4_K if arr.shape[-1] % 256 == 0 else Q.Q8_0


GGUF_KINDS = {"f32": lambda name, arr: Q.F32, "q8_0": q8_experts, "kmix": kquant_mix}
# the formats of one expert's parts (gate_proj, up_proj, down_proj) in the store, per case
EXPERT_FORMATS = {"hf": ("float32",) * 3, "f32": ("float32",) * 3, "q8_0": ("q8_0",) * 3,
                  "kmix": ("q4_k", "q4_k", "q6_k"), "int4": ("q4_1",) * 3}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("moe-models"))


@pytest.fixture
def moe_rows(monkeypatch) -> list[int]:
    """The number of rows of every call of the routed-experts op (models.ops.moe) during a test."""
    from offload_rt.models import ops

    rows, op = [], ops.moe

    def counting(experts, h, ids, weights):
        rows.append(h.shape[0])
        return op(experts, h, ids, weights)

    monkeypatch.setattr(ops, "moe", counting)
    return rows


def open_resident(models: Models, path: Path, **cfg):
    """offload_rt's resident model of ``path`` (library level), prefill in chunks of PREFILL_CHUNK rows."""
    return load_model(RunConfig(model=str(path), offload_dir=models.stores, progress=False,
                                prefill_chunk=PREFILL_CHUNK, **cfg))


def greedy_ours(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Our greedy continuation: prefill, then one decode step per token; each step's logits [n, vocab]."""
    eng = model.engine
    tokens, logits = [], []
    with torch.inference_mode():
        row = eng.prefill(prompt)
        for i in range(n):
            logits.append(row.float())
            tokens.append(int(row.argmax()))
            if i + 1 < n:
                row = eng.forward([tokens[-1]])
    return tokens, torch.stack(logits)


def expert_formats(model) -> set[tuple[str, ...]]:
    """The part formats of every packed expert tensor of a loaded model's store."""
    st, args = model.store, model.args
    names = [args.expert_tensor(i) for i in range(args.num_hidden_layers)]
    assert all(names), "every layer of these models is sparse"
    return {tuple(p.fmt.name for p in st.expert_layout(n).parts.values()) for n in names}


def routes(hf, ids: list[int]) -> list[torch.Tensor]:
    """transformers' expert choices [T, k] per layer for the rows ``ids`` (one causal pass)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    k = hf.config.num_experts_per_tok
    return [r.reshape(len(ids), -1).topk(k, dim=-1).indices for r in out.router_logits]


def quantized_like_store(ckpt: Path, store, qtype: Q) -> dict[str, np.ndarray]:
    """The checkpoint's tensors, each one the store holds as ``qtype`` replaced by gguf-py's quantization to
    ``qtype`` and back (the float weights a correct run computes with)."""
    fmt = qtype.name.lower()
    out = {}
    for name, t in checkpoint_tensors(ckpt).items():
        w = t.float().numpy()
        packed = parse_expert_name(name)
        held = (store.expert_layout(packed[0]).parts[packed[2]].fmt.name if packed else store.info(name).fmt.name)
        out[name] = dequantize(quantize(w, qtype), qtype).reshape(w.shape) if held == fmt else w
    assert any(parse_expert_name(n) is not None and not np.array_equal(out[n], checkpoint_tensors(ckpt)[n].numpy())
               for n in out), "no expert was quantized"
    return out


CASES = [(t, kind) for kind in ("hf", "f32", "q8_0", "kmix", "int4") for t in MOE_TYPES]


@pytest.mark.parametrize("model_type,kind", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_greedy_tokens_match_transformers(models, model_type, kind, moe_rows):
    """Prefill (chunks of 4 rows, tokens sharing experts) and decode give transformers' greedy tokens, and
    every step's logits to float32 precision, on the weights the source holds."""
    hf, ckpt = models.hf(model_type, wide=kind == "kmix")
    if kind in ("hf", "int4"):
        ours = open_resident(models, ckpt, weights="int4" if kind == "int4" else "auto")
        ref_model = hf if kind == "hf" else model_from_tensors(
            ckpt, quantized_like_store(ckpt, ours.store, Q.Q4_1), models.root / f"{model_type}-int4-ref")
    else:
        path, held = models.gguf(model_type, kind)
        ours = open_resident(models, path)
        ref_model = model_from_tensors(ckpt, held, models.root / f"{model_type}-{kind}-ref")
    assert ours.args.model_type == model_type and ours.dtype == torch.float32
    assert expert_formats(ours) == {EXPERT_FORMATS[kind]}

    ref_tokens, ref_logits = greedy_reference(ref_model, PROMPT, NEW_TOKENS)
    tokens, logits = greedy_ours(ours, PROMPT, NEW_TOKENS)
    layers = ours.args.num_hidden_layers  # prefill chunks of 4, 4, 1 rows, then one row per decode step
    assert moe_rows == [4] * layers + [4] * layers + [1] * layers * NEW_TOKENS
    err = (logits - ref_logits).abs().max().item()
    assert tokens == ref_tokens
    assert err < ATOL, err


def test_prompt_rows_share_and_vary_experts(models):
    """What the tests above rely on: the routers are decisive and varied, so a prefill chunk's rows share some
    experts and not others (the expert kernel groups rows per expert)."""
    for model_type in MOE_TYPES:
        hf, _ = models.hf(model_type)
        for layer, ids in enumerate(routes(hf, PROMPT)):
            chunk = ids[:PREFILL_CHUNK]
            counts = torch.bincount(chunk.flatten())
            assert counts.max() >= 2, (model_type, layer, chunk)  # an expert serving several rows
            assert len({tuple(sorted(r)) for r in ids.tolist()}) >= 2, (model_type, layer, ids)  # rows differ


def sample_tree() -> Tree:
    """Nine candidate tokens in five paths, up to three deep (sibling and cousin rows at equal positions)."""
    t = Tree()
    a, b = t.add(-1, [11, 22], [-0.1, -0.5])
    c, d = t.add(a, [33, 44], [-0.3, -0.9])
    (e,) = t.add(b, [55], [-1.0])
    t.add(c, [66, 11], [-0.6, -0.7])
    t.add(e, [77], [-1.2])
    t.add(d, [8], [-1.5])
    return t


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_tree_pass_equals_each_path_alone(models, model_type, moe_rows):
    """One forward pass over a speculation tree (rows at arbitrary positions, a tree mask) gives every node
    transformers' logits for its root-to-node path run alone; a whole-prompt pass gives every prompt row's;
    keeping the accepted path continues as a plain run would."""
    hf, ckpt = models.hf(model_type)
    eng = open_resident(models, ckpt).engine
    tree = sample_tree()
    with torch.no_grad():
        ref_prompt = hf(torch.tensor([PROMPT])).logits[0]
        ref_paths = [hf(torch.tensor([PROMPT + tree.path_tokens(i)])).logits[0, -1] for i in range(len(tree))]
    with torch.inference_mode():
        rows = eng.forward(PROMPT, all_logits=True)  # one pass of 9 rows
        torch.testing.assert_close(rows, ref_prompt, atol=ATOL, rtol=0)
        start = eng.cache.offset
        logits = eng.forward(tree.input_ids().tolist(), positions=tree.positions(start),
                             tree_mask=tree.attention_mask(), all_logits=True)
        assert logits.shape == (len(tree), hf.config.vocab_size)
        assert moe_rows[-1] == len(tree)  # the tree's rows went through the experts together
        for i, ref in enumerate(ref_paths):
            err = (logits[i] - ref).abs().max().item()
            assert err < ATOL, (i, tree.path_tokens(i), err)
        path = tree.path(len(tree) - 4)  # 11 -> 33 -> 66
        assert [tree.tokens[i] for i in path] == [11, 33, 66]
        eng.keep(start, path)
        nxt = eng.forward([8])
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT + [11, 33, 66, 8]])).logits[0, -1]
    assert (nxt - ref).abs().max().item() < ATOL
