"""CPU decode attention benchmarks (docs/BENCHMARKS.md, row A1).

    python -m tools.bench_attention a1 --threads 2 [--lengths 4096,16384,65536,131072] [--json PATH]
    python -m tools.bench_attention a1q --threads 2 [--lengths 16384,65536,131072] [--json PATH]

A1q (--kv-dtype): the same step over the same keys and values held as bf16 (the exact kernel) and as
q8 / q4 records (kernels_cpu/attention_q.py: closed chunks, dequantized in registers), each timed in
the same run; the speed-up is against bf16, the error against exact float64 attention over the
dequantized records (what the quantized kernel must compute), and the bf16 kernel's own error likewise.

A1: one layer's decode attention step, 32 query heads over 8 KV heads, head dim 128, bf16 KV
in chunks of 256 tokens at shuffled pool slots (as the host KV cache holds them), at 4k … 128k
tokens. Side by side in one run, on the same number of threads:

- ``kernels_cpu.attention.attend`` (Numba, torch at one thread meanwhile, as decode runs it);
- torch ``scaled_dot_product_attention`` on the same bf16 K/V laid out contiguously
  ``[1, 8, n, 128]`` (its best case: it cannot read the chunked pool), twice: as asked,
  q ``[1, 32, 1, 128]`` with ``enable_gqa`` (torch 2.13 runs that ~6x slower than it need be), and
  in the faster equivalent form, each KV head's 4 query heads as 4 queries ``[1, 8, 4, 128]``
  (decode sees every key: no mask). The speed-up is taken against the faster of the two;
- the memory read bandwidth, measured twice: a Numba parallel sum and a torch sum, each over
  1 GiB of float32 (far above the caches). The larger of the two is the limit the kernel's
  GB/s (K and V bytes read per step / time) is compared with.

Times are medians of ``--repeats`` steps (the machine is shared: a busy neighbour shows up as
noise, the median ignores the odd slow step); best-of figures go into the JSON. The kernel is
also timed on one thread, which shows how it scales across cores (compute- vs memory-bound).
"""

from __future__ import annotations

from offload_rt import threads as _threads

_threads.configure_process()  # before torch/numba load libgomp: the waiting policy decode runs with

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numba as nb  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_cpu import attention, matvec  # noqa: E402
from tools.machine import cpu_model  # noqa: E402

NH, NKV, D, CHUNK = 32, 8, 128, 256


@nb.njit(parallel=True, fastmath=True, nogil=True)
def _sum_parallel(a, parts):  # pragma: no cover - compiled
    """Sum of a float32 array, in `parts` contiguous slices spread over the threads."""
    step = a.shape[0] // parts
    out = np.zeros(parts, dtype=np.float32)
    for i in nb.prange(parts):
        part = a[i * step:(i + 1) * step]
        acc = np.float32(0.0)
        for j in range(part.shape[0]):
            acc += part[j]
        out[i] = acc
    return out.sum()


def mem_bandwidth(threads: int, repeats: int = 7) -> dict[str, float]:
    """Read bandwidth (bytes/s, median) of a Numba parallel sum and of a torch sum over 1 GiB float32."""
    x = torch.rand(1 << 28)
    a = x.numpy()
    out = {}
    with matvec.decode_scope(threads):
        _sum_parallel(a, 64)
        out["numba_sum"] = statistics.median(a.nbytes / _seconds(lambda: _sum_parallel(a, 64)) for _ in range(repeats))
    torch.set_num_threads(threads)
    x.sum()
    out["torch_sum"] = statistics.median(a.nbytes / _seconds(x.sum) for _ in range(repeats))
    return out


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _times(fn, repeats: int) -> list[float]:
    fn()  # warm: compile, caches, thread pools
    return [_seconds(fn) for _ in range(repeats)]


def a1_case(n: int, threads: int, repeats: int, seed: int = 0) -> dict:
    """One length: Numba on `threads` and on 1 thread, torch SDPA on `threads`."""
    g = torch.Generator().manual_seed(seed)
    m = -(-n // CHUNK)
    kpool = torch.randn(m, NKV, CHUNK, D, generator=g).to(torch.bfloat16)
    vpool = torch.randn(m, NKV, CHUNK, D, generator=g).to(torch.bfloat16)
    slots = torch.randperm(m, generator=g).to(torch.int32)
    q = torch.randn(1, NH, D, generator=g)
    q_index = torch.tensor([n - 1])
    kv_bytes = 2 * n * NKV * D * 2

    # torch first: its pool spins after each region, Numba's after its own (see bench_matvec)
    order = slots.long()
    k = kpool[order].transpose(0, 1).reshape(1, NKV, -1, D)[:, :, :n].contiguous()
    v = vpool[order].transpose(0, 1).reshape(1, NKV, -1, D)[:, :, :n].contiguous()
    qt = q.transpose(0, 1)[None].to(torch.bfloat16)  # [1, NH, 1, D]
    torch.set_num_threads(threads)
    t_gqa = _times(lambda: F.scaled_dot_product_attention(qt, k, v, enable_gqa=True), repeats)
    qgrp = qt.view(1, NKV, NH // NKV, D)
    t_grp = _times(lambda: F.scaled_dot_product_attention(qgrp, k, v), repeats)
    t_sdpa = min(t_gqa, t_grp, key=statistics.median)
    ref = F.scaled_dot_product_attention(qt.float(), k.float(), v.float(), enable_gqa=True)[0, :, 0]
    del k, v

    def ours():
        return attention.attend(q, kpool, vpool, slots, n, q_index=q_index)

    with matvec.decode_scope(threads):
        t_ours = _times(ours, repeats)
        out, _lse = ours()
    with matvec.decode_scope(1):
        t_one = _times(ours, max(3, repeats // 2))
    err = float((out[0] - ref).abs().max() / ref.abs().max())
    runs = {"ours": t_ours, "ours_1t": t_one, "sdpa_gqa": t_gqa, "sdpa_grouped": t_grp, "sdpa": t_sdpa}
    med = {name: statistics.median(ts) for name, ts in runs.items()}
    return {"tokens": n, "kv_bytes": kv_bytes, "rel_err_vs_sdpa_f32": err,
            **{f"{k}_us": v * 1e6 for k, v in med.items()},
            **{f"{k}_best_us": min(ts) * 1e6 for k, ts in runs.items()},
            **{f"{k}_gbs": kv_bytes / v / 1e9 for k, v in med.items()}}


def a1q_case(n: int, threads: int, repeats: int, seed: int = 0) -> dict:
    """One length: the bf16 kernel vs the quantized kernel over q8 and q4 records of the same K/V."""
    from kernels_cpu import attention_q
    from kernels_cpu.kv_quant import KVQuant

    g = torch.Generator().manual_seed(seed)
    m = -(-n // CHUNK)
    n = m * CHUNK  # whole chunks: what the quantized records hold
    kpool = torch.randn(m, NKV, CHUNK, D, generator=g).to(torch.bfloat16)
    vpool = torch.randn(m, NKV, CHUNK, D, generator=g).to(torch.bfloat16)
    slots = torch.randperm(m, generator=g).to(torch.int32)
    q = torch.randn(1, NH, D, generator=g)
    row = {"tokens": n}
    with matvec.decode_scope(threads):
        t = _times(lambda: attention.attend(q, kpool, vpool, slots, n, q_index=torch.tensor([n - 1])), repeats)
    row.update(bf16_us=statistics.median(t) * 1e6, bf16_best_us=min(t) * 1e6, bf16_bytes=2 * n * NKV * D * 2)
    for name in ("q8", "q4"):
        fmt = KVQuant(name, D, CHUNK)
        kq = torch.empty(m, *fmt.record_shape(NKV), dtype=torch.uint8)
        vq = torch.empty_like(kq)
        for c in range(m):
            fmt.quantize(kpool[c], vpool[c], kq[c], vq[c])
        s = slots.numpy()
        with matvec.decode_scope(threads):
            t = _times(lambda: attention_q.attend(q, kq, vq, s, m, fmt), repeats)
            out, _lse = attention_q.attend(q, kq, vq, s, m, fmt)
        # exact attention over the dequantized records, in float64, a chunk at a time of the slots' order
        order = slots.long()
        kd = torch.cat([fmt.dequantize_keys(kq[c]) for c in order], 1).double()
        vd = torch.cat([fmt.dequantize_values(vq[c]) for c in order], 1).double()
        ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None].double(), kd[None], vd[None],
                                             enable_gqa=True)[0, :, 0]
        del kd, vd
        row.update({f"{name}_us": statistics.median(t) * 1e6, f"{name}_best_us": min(t) * 1e6,
                    f"{name}_bytes": 2 * m * kq[0].numel(),
                    f"{name}_rel_err": float((out[0].double() - ref).abs().max() / ref.abs().max())})
    return row


def run_a1q(a) -> dict:
    from kernels_cpu import attention_q

    attention.warm_up()
    attention_q.warm_up()
    bw = mem_bandwidth(a.threads)
    limit = max(bw.values())
    rows = [a1q_case(n, a.threads, a.repeats) for n in a.lengths]
    print(f"A1q: decode attention over bf16 vs q8 / q4 KV, {NH} query / {NKV} KV heads, d {D}, chunks of {CHUNK} "
          f"at shuffled slots, {a.threads} threads, median of {a.repeats} steps; memory read bandwidth "
          f"{limit / 1e9:.1f} GB/s.\n")
    print("| tokens | bf16 MB | bf16 µs | q8 MB | q8 µs | q8 speed-up | q4 MB | q4 µs | q4 speed-up "
          "| GB/s bf16 / q8 / q4 | q8 / q4 max rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gbs = [r[f"{k}_bytes"] / r[f"{k}_us"] / 1e3 for k in ("bf16", "q8", "q4")]
        print(f"| {r['tokens'] // 1024}k | {r['bf16_bytes'] / 1e6:.0f} | {r['bf16_us']:.0f} | {r['q8_bytes'] / 1e6:.0f} "
              f"| {r['q8_us']:.0f} | {r['bf16_us'] / r['q8_us']:.2f}× | {r['q4_bytes'] / 1e6:.0f} | {r['q4_us']:.0f} "
              f"| {r['bf16_us'] / r['q4_us']:.2f}× | {gbs[0]:.1f} / {gbs[1]:.1f} / {gbs[2]:.1f} "
              f"| {r['q8_rel_err']:.1e} / {r['q4_rel_err']:.1e} |")
    return {"scenario": "A1q", "threads": a.threads, "repeats": a.repeats, "bandwidth": bw, "limit": limit,
            "shape": {"nh": NH, "nkv": NKV, "d": D, "chunk": CHUNK}, "rows": rows}


def run_a1(a) -> dict:
    load0 = os.getloadavg()[0]
    attention.warm_up()
    bw = mem_bandwidth(a.threads)
    limit = max(bw.values())
    rows = [a1_case(n, a.threads, a.repeats) for n in a.lengths]
    print(f"A1: decode attention, {NH} query / {NKV} KV heads, d {D}, bf16 KV in chunks of {CHUNK} at shuffled "
          f"slots, {a.threads} threads, median of {a.repeats} steps. Memory read bandwidth in this run: Numba "
          f"parallel sum {bw['numba_sum'] / 1e9:.1f} GB/s, torch sum {bw['torch_sum'] / 1e9:.1f} GB/s "
          f"(limit used: {limit / 1e9:.1f}).\nCPU: {cpu_model()}. Load average (1 min) at the start / end of the "
          f"run: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n")
    print("| tokens | KV MB | SDPA enable_gqa µs | SDPA grouped µs | ours µs | speed-up | SDPA GB/s | ours GB/s "
          "| % of bandwidth | ours, 1 thread GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens'] // 1024}k | {r['kv_bytes'] / 1e6:.0f} | {r['sdpa_gqa_us']:.0f} "
              f"| {r['sdpa_grouped_us']:.0f} | {r['ours_us']:.0f} | {r['sdpa_us'] / r['ours_us']:.2f}× | {r['sdpa_gbs']:.1f} | {r['ours_gbs']:.1f} "
              f"| {100 * r['ours_gbs'] * 1e9 / limit:.0f}% | {r['ours_1t_gbs']:.1f} |")
    return {"scenario": "A1", "cpu": cpu_model(), "threads": a.threads, "repeats": a.repeats, "bandwidth": bw, "limit": limit,
            "shape": {"nh": NH, "nkv": NKV, "d": D, "chunk": CHUNK, "dtype": "bfloat16"}, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=["a1", "a1q"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 65536, 131072])
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    res = run_a1(a) if a.scenario == "a1" else run_a1q(a)
    res["command"] = "python -m tools.bench_attention " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
