"""The default model with its KV cache in each tier: the same greedy tokens, token for token.

Dense on the compute device (torch attention), chunks in RAM (Numba kernels), and chunks
spilled to a zarr store on disk with a RAM budget far below the context's KV.
"""

from __future__ import annotations

import pytest
import torch

from offload_rt.config import RunConfig
from offload_rt.kv.dense import DenseKV
from offload_rt.kv.tiered import TieredKV
from offload_rt.loader import load_model
from offload_rt.memory.kv_plan import STAGING_BATCH

CHUNK = 32
TEXT = ("The lighthouse keeper wrote in his log every night. He noted the wind, the ships that passed, "
        "the colour of the sea at dusk and the number of gulls on the rocks. ") * 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(2)
    return load_model(RunConfig(offload_dir=tmp_path_factory.mktemp("stores"), progress=False))


def _greedy(model, cache, ids, n=24):
    eng = model.engine
    eng.cache, eng.tokens = cache, []
    with torch.inference_mode():
        logits = eng.prefill(ids)
        out = []
        for _ in range(n):
            t = int(torch.argmax(logits))
            out.append(t)
            logits = eng.forward([t])
    return out


def test_greedy_tokens_identical_with_kv_dense_in_ram_chunks_and_spilled(model, tmp_path):
    a = model.args
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) > 4 * CHUNK
    shape = (a.num_hidden_layers, a.num_key_value_heads, a.head_dim, model.dtype, 512)
    per_layer = -(-512 // CHUNK)
    dense = _greedy(model, DenseKV(*shape), ids)
    ram = TieredKV(*shape, host_chunks=a.num_hidden_layers * per_layer, chunk_tokens=CHUNK)
    in_ram = _greedy(model, ram, ids)
    assert ram.tier_bytes()["disk"] == 0
    # RAM for 3 chunks per layer (of the ~6 the context needs) plus the read buffers: the rest on disk
    spilled = TieredKV(*shape, host_chunks=3 * a.num_hidden_layers, staging_chunks=2 * STAGING_BATCH,
                       disk_root=tmp_path, chunk_tokens=CHUNK)
    on_disk = _greedy(model, spilled, ids)
    assert spilled.tier_bytes()["disk"] > spilled.tier_bytes()["host"] / 2 and spilled.disk_read_bytes > 0
    spilled.close()
    assert dense == in_ram == on_disk
