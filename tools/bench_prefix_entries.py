"""What a prefix-cache entry of a quantized KV costs (``--kv-dtype q8|q4``): bytes per entry, entries a RAM
budget holds, and the time to save and restore a prompt's prefix.

    python -m tools.bench_prefix_entries [--tokens 2048] [--repeats 3]

The default model's KV shape (layers, KV heads, head dim) and the server's KV chunk (256 tokens); random
K/V prefilled into a quantized cache in RAM (``TieredKV``), saved into a RAM-only prefix cache and restored
into an empty cache (best of ``--repeats``). Run it with ``PYTHONPATH`` at two trees (a baseline and a
change) in the same window to compare: it uses only the prefix cache's public calls.
"""

from __future__ import annotations

import argparse
import time

from offload_rt.threads import configure_process

configure_process()  # idle OpenMP workers wait as in a run (set before torch / numba load libgomp)

import torch  # noqa: E402

from kernels_cpu.kv_quant import KVQuant  # noqa: E402
from offload_rt.kv.prefix import PrefixCache  # noqa: E402
from offload_rt.kv.tiered import TieredKV  # noqa: E402
from offload_rt.memory.kv_plan import CHUNK_TOKENS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(2)
    from offload_rt.config import RunConfig
    from offload_rt.loader import load_model

    args = load_model(RunConfig(progress=False)).args
    L, nkv, d, C = args.num_hidden_layers, args.num_key_value_heads, args.head_dim, CHUNK_TOKENS
    n = a.tokens + 1
    ids = list(range(n))
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(n, nkv, d, generator=g) for _ in range(L)]
    v = [torch.randn(n, nkv, d, generator=g) for _ in range(L)]
    print(f"default model KV: {L} layers, {nkv} KV heads, head dim {d}; chunk {C} tokens; prefix {a.tokens} tokens")
    for name in ("q8", "q4"):
        quant = KVQuant(name, d, C)
        new = lambda: TieredKV(L, nkv, d, torch.float32, n, host_chunks=L * -(-n // C), chunk_tokens=C, quant=quant)
        src = new()
        src.load(k, v)
        ident = {"store": "bench", "source": {}, "weights": None, "tokenizer": "", "kv_dtype": "float32",
                 "layers": L, "kv_heads": nkv, "head_dim": d, "kv_quant": name}
        budget = 2 * L * a.tokens * nkv * quant.row_bytes()  # the KV's own bytes for the prefix
        save = restore = float("inf")
        for _ in range(a.repeats):
            pc = PrefixCache(None, ident, C, ram_bytes=1 << 40)
            t = time.perf_counter()
            saved = pc.save(ids, src)
            save = min(save, time.perf_counter() - t)
            dst = new()
            t = time.perf_counter()
            got = pc.restore(ids, pc.lookup(ids), dst)
            restore = min(restore, time.perf_counter() - t)
        s = pc.stats()
        per = s["ram_bytes"] // s["entries"]
        print(f"{name}: entry {per} B ({per / (2 * L * C * nkv * d * 4):.3f} of float32 rows); a RAM budget of "
              f"the prefix's own KV ({budget} B) holds {budget // per} of its {saved // C} chunks; "
              f"save {saved} tokens {save * 1e3:.1f} ms, restore {got} {restore * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
