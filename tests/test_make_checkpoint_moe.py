"""tools/make_checkpoint.py writes Qwen3-MoE checkpoints that transformers loads as they are, and dense
checkpoints as before."""

from __future__ import annotations

import json

import pytest
import torch

from tools import make_checkpoint as mc


def test_qwen3_moe_tiny_loads_in_transformers_without_missing_or_unexpected_keys(tmp_path):
    from safetensors import safe_open
    from transformers import Qwen3MoeForCausalLM

    shape = mc.MOE_PRESETS["qwen3-moe-tiny"]
    out = mc.make_checkpoint(tmp_path / "m", dtype="float32", vocab=300, synthetic_tokenizer=True, **shape)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (8, 2, 48)
    assert cfg["norm_topk_prob"] is True and cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []

    model, info = Qwen3MoeForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.head_dim == 32 and model.config.num_experts == 8
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.weight.shape == (4 * 32, 64)  # head_dim apart from hidden / heads
    assert layer.self_attn.q_norm.weight.shape == (32,)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index["model.layers.1.mlp.experts.5.gate_proj.weight"]), "pt") as f:
        gate = f.get_tensor("model.layers.1.mlp.experts.5.gate_proj.weight")
        up = f.get_tensor("model.layers.1.mlp.experts.5.up_proj.weight")
        down = f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight")
        router = f.get_tensor("model.layers.1.mlp.gate.weight")
    assert gate.shape == up.shape == (48, 64) and down.shape == (64, 48) and router.shape == (8, 64)
    # transformers fuses the per-expert tensors on load: the values arrive where the model reads them
    assert torch.equal(layer.mlp.experts.gate_up_proj[5], torch.cat([gate, up]))
    assert torch.equal(layer.mlp.experts.down_proj[5], down)
    assert torch.equal(layer.mlp.gate.weight, router)
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 300) and bool(logits.isfinite().all())


def test_dense_checkpoint_is_unchanged_llama(tmp_path):
    out = mc.make_checkpoint(tmp_path / "d", hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2, tie=True,
                             dtype="float32", vocab=300, synthetic_tokenizer=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["head_dim"] == 16 and cfg["mlp_bias"] is False
    assert "num_experts" not in cfg and cfg["rope_theta"] == 100000.0
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.mlp.gate_proj.weight" in names and not any("experts" in n for n in names)


def test_cli_moe_without_routing_shape_is_a_one_line_error(tmp_path, capsys):
    rc = mc.main([str(tmp_path / "x"), "--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "4",
                  "--experts", "8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--experts-per-tok" in err and "--moe-intermediate" in err
    rc = mc.main([str(tmp_path / "x"), "--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "4",
                  "--experts", "8", "--experts-per-tok", "9", "--moe-intermediate", "48"])
    assert rc == 2 and "1..8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("preset", sorted(mc.PRESETS))
def test_dense_presets_keep_their_tuple(preset):
    # tools/bench_matvec.py unpacks these
    h, n, inter, heads, kv, tie = mc.PRESETS[preset]
    assert h % heads == 0 and heads % kv == 0
