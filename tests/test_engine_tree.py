"""One forward pass over a tree of candidate tokens (SpecExec verification, issue 12): every node's logits
are those of running its root-to-node path alone, and keeping the accepted path leaves the engine where an
autoregressive run over that path would be, with the KV dense and in RAM chunks."""

from __future__ import annotations

import pytest
import torch

from offload_rt.engine import Engine, ResidentWeights, model_groups
from offload_rt.kv.dense import DenseKV
from offload_rt.kv.tiered import TieredKV
from offload_rt.models import llama
from offload_rt.spec.tree import Tree
from tests.test_scheduler import tiny

PREFIX = [3, 1, 4, 1, 5, 9, 2]


def engine(cache_kind: str) -> Engine:
    args, sd = tiny(False)
    src = ResidentWeights(model_groups(args), lambda n: sd[n].float(), llama.EMBED)
    shape = (args.num_hidden_layers, args.num_key_value_heads, args.head_dim, torch.float32, 64)
    cache = DenseKV(*shape) if cache_kind == "dense" else TieredKV(*shape, host_chunks=args.num_hidden_layers * 16,
                                                                   chunk_tokens=4)
    return Engine(args, src, torch.float32, max_tokens=64, prefill_chunk=64, cache=cache)


def alone(tokens: list[int]) -> torch.Tensor:
    """Logits after ``tokens`` from a fresh engine, one causal pass."""
    with torch.inference_mode():
        return engine("dense").prefill(tokens)


def sample_tree() -> Tree:
    t = Tree()
    a, b = t.add(-1, [11, 22], [-0.1, -0.5])
    c, d = t.add(a, [33, 44], [-0.3, -0.9])
    (e,) = t.add(b, [55], [-1.0])
    t.add(c, [66, 11], [-0.6, -0.7])  # 11 again, deeper: siblings distinct, not tokens
    t.add(e, [77], [-1.2])
    return t


@pytest.mark.parametrize("cache_kind", ["dense", "tiered"])
def test_tree_pass_gives_each_node_its_paths_logits_and_keep_continues_the_accepted_path(cache_kind):
    tree = sample_tree()
    eng = engine(cache_kind)
    with torch.inference_mode():
        eng.prefill(PREFIX)
        start = eng.cache.offset
        assert start == len(PREFIX)
        logits = eng.forward(tree.input_ids().tolist(), positions=tree.positions(start),
                             tree_mask=tree.attention_mask(), all_logits=True)
        assert logits.shape == (len(tree), tiny(False)[0].vocab_size)
        for i in range(len(tree)):
            ref = alone(PREFIX + tree.path_tokens(i))
            assert torch.allclose(logits[i], ref, atol=2e-5, rtol=1e-5), (i, (logits[i] - ref).abs().max())
        # accept the path to the deepest node under the first branch, then continue from it
        path = tree.path(len(tree) - 3)  # 11 -> 33 -> 66
        assert [tree.tokens[i] for i in path] == [11, 33, 66]
        eng.keep(start, path)
        assert eng.cache.offset == start + 3 and eng.tokens == PREFIX + [11, 33, 66]
        nxt = eng.forward([8])
        assert torch.allclose(nxt, alone(PREFIX + [11, 33, 66, 8]), atol=2e-5, rtol=1e-5)
        # and prefill reuses the kept prefix (nothing recomputed before the new tail)
        assert torch.allclose(eng.prefill(PREFIX + [11, 33, 66, 8, 2]), alone(PREFIX + [11, 33, 66, 8, 2]),
                              atol=2e-5, rtol=1e-5)


def test_positions_are_checked():
    eng = engine("dense")
    with torch.inference_mode(), pytest.raises(ValueError, match="positions"):
        eng.forward([1, 2], positions=torch.tensor([0]))
