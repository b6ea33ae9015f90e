"""Read-path micro-benchmark of the weight store: zarr's array API vs zarr's store API vs ``read_into``.

    python -m tools.bench_read --store STORE.zarr          # an existing weight store
    python -m tools.bench_read --make /tmp/bench           # builds (once) a ~1.5 GB synthetic bf16 store there

Cold figures drop the page cache before each pass (``sync; echo 3 > /proc/sys/vm/drop_caches``,
needs root; skipped otherwise); warm figures read once to fill the cache, then time a second pass.
Prints a markdown table of GB/s (and the conversion write speed / crc32 speed as side figures).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from storage.convert import convert
from storage.sources import TensorSource
from storage.store import WeightStore, aligned_buffer


class SyntheticSource:
    """A fake source: ``n`` random bf16 matrices of ``rows x cols`` (no checkpoint on disk needed)."""

    kind = "hf"

    def __init__(self, path: Path, n: int = 16, rows: int = 5632, cols: int = 8192):
        self.path, self.n, self.rows, self.cols = path, n, rows, cols
        self.display_name = "synthetic"

    def identity(self):
        return {"path": str(self.path), "kind": "synthetic", "files": []}

    def config(self):
        return {"model_type": "synthetic"}

    def tensors(self):
        def make(seed):
            return lambda: np.random.default_rng(seed).integers(0, 1 << 16, (self.rows, self.cols), dtype=np.uint16)

        return [TensorSource(f"w.{i}", "bfloat16", (self.rows, self.cols), produce=make(i)) for i in range(self.n)]

    def tokenizer(self, dest: Path):
        dest.write_text("{}")
        return {"file": "tokenizer.json", "chat_template": None, "bos_token": None, "eos_token": None,
                "bos_token_id": None, "eos_token_ids": [], "add_bos_token": False}


def make_store(root: Path) -> tuple[Path, float | None]:
    dest = root / "bench-synthetic.zarr"
    if (dest / "manifest.json").is_file():
        return dest, None
    root.mkdir(parents=True, exist_ok=True)
    src = SyntheticSource(root)
    # time only the writes: generate the data first (the conversion's own cost is the copy + crc + fsync)
    data = {t.name: t.produce() for t in src.tensors()}
    src.tensors = lambda: [TensorSource(n, "bfloat16", a.shape, produce=(lambda a=a: a)) for n, a in data.items()]
    tmp = root / "bench-synthetic.zarr.tmp"
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    t0 = time.perf_counter()
    convert(src, tmp, progress=False)
    dt = time.perf_counter() - t0
    os.replace(tmp, dest)
    return dest, sum(a.nbytes for a in data.values()) / dt / 1e9


def can_drop() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def run_zarr_array(st: WeightStore, names):
    import zarr

    g = zarr.open_group(str(st.path), mode="r")
    for n in names:
        g[n][:]


def run_zarr_store(st: WeightStore, names):
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    store = LocalStore(str(st.path), read_only=True)
    proto = default_buffer_prototype()
    for n in names:
        for key in st.manifest["tensors"][n]["chunk_keys"]:
            sync(store.get(f"{n}/{key}", prototype=proto))


def make_read_into(threads: int, drop: bool, verify: bool = False):
    def run(st: WeightStore, names, bufs):
        if threads == 1:
            for n in names:
                st.read_into(n, bufs[n], verify=verify, drop_cache=drop)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda n: st.read_into(n, bufs[n], verify=verify, drop_cache=drop), names))
    return run


def run_read_many(st: WeightStore, names, bufs, threads: int):
    with ThreadPoolExecutor(threads) as pool:
        st.read_many([(n, bufs[n]) for n in names], executor=pool)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--store", type=Path, help="an existing weight store directory")
    g.add_argument("--make", type=Path, help="directory to build (once) a ~1.5 GB synthetic store in")
    ap.add_argument("--repeat", type=int, default=2, help="passes per figure (best is reported)")
    a = ap.parse_args(argv)

    write_gbs = None
    path = a.store
    if a.make:
        path, write_gbs = make_store(a.make)
    st = WeightStore.open(path)
    names = st.tensor_names
    total = st.total_bytes
    bufs = {n: aligned_buffer(st.info(n).nbytes) for n in names}
    cold_ok = can_drop()

    rows = [
        ("zarr array API `arr[:]`", lambda: run_zarr_array(st, names), None),
        ("zarr store API `store.get(key)`", lambda: run_zarr_store(st, names), None),
    ]
    for t in (1, 2, 4):
        rows.append((f"`read_into`, {t} thread{'s' if t > 1 else ''}",
                     (lambda t=t: make_read_into(t, False)(st, names, bufs)),
                     (lambda t=t: make_read_into(t, True)(st, names, bufs))))
    for t in (4, 8):
        rows.append((f"`read_many` (the streaming hot path: 8 MiB pieces, O_DIRECT), {t} threads",
                     (lambda t=t: run_read_many(st, names, bufs, t)), None))
    rows.append(("`read_into` + crc32 verify, 2 threads", lambda: make_read_into(2, False, True)(st, names, bufs),
                 lambda: make_read_into(2, True, True)(st, names, bufs)))

    print(f"store: {path} — {len(names)} tensors, {total / 1e9:.2f} GB; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores", file=sys.stderr)
    out = ["| read path | cold GB/s | warm GB/s |", "|---|---|---|"]
    for label, warm_fn, cold_fn in rows:
        cold_fn = cold_fn or warm_fn
        cold = []
        if cold_ok:
            for _ in range(a.repeat):
                drop_caches()
                cold.append(timed(cold_fn))
        warm_fn()  # fill the page cache
        warm = [timed(warm_fn) for _ in range(a.repeat)]
        c = f"{total / min(cold) / 1e9:.2f}" if cold else "—"
        w = f"{total / min(warm) / 1e9:.2f}"
        out.append(f"| {label} | {c} | {w} |")
        print(out[-1], file=sys.stderr)
    buf = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    crc = min(timed(zlib.crc32, buf) for _ in range(3))
    print("\n".join(out))
    print(f"\ncrc32 (zlib {zlib.ZLIB_RUNTIME_VERSION}, one thread): {buf.nbytes / crc / 1e9:.2f} GB/s")
    if write_gbs is not None:
        print(f"conversion (raw chunk writes + crc32 + fsync): {write_gbs:.2f} GB/s")
    if not cold_ok:
        print("(cold figures skipped: cannot write /proc/sys/vm/drop_caches; run as root)")
    print(f"\ncommand: python -m tools.bench_read {' '.join(argv if argv is not None else sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
