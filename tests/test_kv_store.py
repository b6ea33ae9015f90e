"""storage.kv_store: the KV cache's disk tier (zarr chunk files, raw reads into preallocated views)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import storage.kv_store as kv_store
from storage.errors import NoSpaceError, StorageError
from storage.kv_store import LOCK_FILE, KVChunkStore, MissingChunkError
from storage.store import DIRECT_ALIGN, aligned_buffer

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NKV, C = 2, 16
ALIGNED_D = 64  # K of one chunk: 2 * 16 * 64 elements, a multiple of 4 KiB for every dtype
ODD_D = 24  # 2 * 16 * 24 * 2 bytes: not a multiple of 4 KiB


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of ``t`` (bitwise comparison: bf16 has no numpy dtype, NaN != NaN)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def kv_pair(d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(NKV, C, d, generator=g).to(dtype), torch.randn(NKV, C, d, generator=g).to(dtype))


def views(d: int, dtype: torch.dtype, aligned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [NKV, C, d] views back to back in one buffer (as in a host pool): starting on a 4 KiB
    boundary, or 64 bytes past one (never aligned, whatever the allocator returned)."""
    half = NKV * C * d * dtype.itemsize
    if aligned:
        buf = aligned_buffer(2 * half)
    else:
        raw = torch.empty(2 * half + 2 * DIRECT_ALIGN, dtype=torch.uint8)
        skip = (-raw.data_ptr()) % DIRECT_ALIGN + 64
        buf = raw[skip:skip + 2 * half]
    buf.fill_(0xEE)
    return buf[:half].view(dtype).view(NKV, C, d), buf[half:].view(dtype).view(NKV, C, d)


def filled_views(d: int, dtype: torch.dtype, aligned: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = views(d, dtype, aligned)
    src_k, src_v = kv_pair(d, dtype, seed)
    k.copy_(src_k)
    v.copy_(src_v)
    return k, v


def make(root: Path, dtype=torch.bfloat16, d: int = ALIGNED_D, layers: int = 2, chunks: int = 3) -> KVChunkStore:
    return KVChunkStore(root, layers, chunks, NKV, C, d, dtype)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["aligned", "unaligned_address", "odd_size"])
def test_write_then_read_into_returns_the_same_bytes(tmp_path, monkeypatch, dtype, case):
    d = ODD_D if case == "odd_size" else ALIGNED_D
    aligned = case == "aligned"
    store = make(tmp_path, dtype, d)
    direct = []  # per write or read: was its file descriptor opened with O_DIRECT
    o_direct = getattr(os, "O_DIRECT", 0)
    for name in ("pwritev", "preadv"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, bufs, off, real=real: direct.append(
            bool(fcntl.fcntl(fd, fcntl.F_GETFL) & o_direct)) or real(fd, bufs, off))
    k, v = filled_views(d, dtype, aligned, seed=1)
    store.write(1, 2, k, v)
    k_out, v_out = views(d, dtype, aligned)
    assert store.read_into(1, 2, k_out, v_out) == store.chunk_bytes == 2 * k.numel() * dtype.itemsize
    np.testing.assert_array_equal(bits(k_out), bits(k))
    np.testing.assert_array_equal(bits(v_out), bits(v))
    monkeypatch.undo()
    # a write is O_DIRECT exactly when both views are 4 KiB aligned in address and size; a read always is
    # (odd views or ranges through a bounce buffer); a filesystem that refuses it gets buffered I/O
    if o_direct and store._direct:
        assert direct == [aligned, True]
    else:
        assert direct[-1] is False
    store.close()


def test_rewrite_replaces_a_chunk_and_raw_byte_views_work(tmp_path):
    with make(tmp_path, torch.float16) as store:
        store.write(0, 0, *kv_pair(ALIGNED_D, torch.float16, seed=2))
        k, v = kv_pair(ALIGNED_D, torch.float16, seed=3)
        store.write(0, 0, k, v)
        raw_k = torch.empty(k.numel() * 2, dtype=torch.uint8)  # raw uint8 slots of the right size are accepted
        raw_v = torch.empty_like(raw_k)
        store.read_into(0, 0, raw_k, raw_v)
        np.testing.assert_array_equal(raw_k.numpy(), bits(k))
        np.testing.assert_array_equal(raw_v.numpy(), bits(v))


# ---------------------------------------------------------------------- zarr layout
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zarr_reads_what_was_written(tmp_path, dtype):
    with make(tmp_path, dtype, layers=2, chunks=3) as store:
        k, v = kv_pair(ALIGNED_D, dtype, seed=4)
        store.write(1, 2, k, v)
        arr = zarr.open_array(str(store.path), mode="r")
        assert arr.shape == (2, 3, 2, NKV, C, ALIGNED_D) == store.shape
        assert arr.attrs["logical_dtype"] == str(dtype).removeprefix("torch.")
        got = np.ascontiguousarray(arr[1, 2])
        if dtype == torch.bfloat16:
            assert got.dtype == np.uint16
        else:
            np.testing.assert_array_equal(got[0], k.numpy())
            np.testing.assert_array_equal(got[1], v.numpy())
        np.testing.assert_array_equal(got[0].view(np.uint8).reshape(-1), bits(k))  # K at [0], V at [1], bitwise
        np.testing.assert_array_equal(got[1].view(np.uint8).reshape(-1), bits(v))
        assert not np.asarray(arr[0, 0]).any()  # never written: zarr's fill value


# ---------------------------------------------------------------------- many, missing, lifetime
def test_read_many_in_parallel(tmp_path):
    with make(tmp_path, torch.bfloat16, layers=2, chunks=3) as store:
        written = {}
        for i, (layer, chunk) in enumerate([(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (0, 1)]):
            written[layer, chunk] = kv_pair(ALIGNED_D, torch.bfloat16, seed=10 + i)
            store.write(layer, chunk, *written[layer, chunk])
        outs = {key: views(ALIGNED_D, torch.bfloat16, aligned=i % 2 == 0) for i, key in enumerate(written)}
        with ThreadPoolExecutor(2) as pool:
            n = store.read_many([(layer, chunk, *outs[layer, chunk]) for layer, chunk in written], executor=pool)
        assert n == len(written) * store.chunk_bytes
        for key, (k, v) in written.items():
            np.testing.assert_array_equal(bits(outs[key][0]), bits(k))
            np.testing.assert_array_equal(bits(outs[key][1]), bits(v))


def test_consecutive_chunks_of_a_layer_are_one_read(tmp_path, monkeypatch):
    """A layer's file holds its chunks one after the other: read_many reads each run of consecutive chunks
    of a layer (in the order given) with one preadv, into views anywhere, aligned or not."""
    with make(tmp_path, torch.float32, ODD_D, layers=2, chunks=5) as store:
        written = {}
        for i, key in enumerate([(0, c) for c in range(5)] + [(1, 1), (1, 2)]):
            written[key] = kv_pair(ODD_D, torch.float32, seed=30 + i)
            store.write(*key, *written[key])
        order = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (0, 0), (0, 4)]  # runs: 3 chunks, 2, 1, 1
        outs = {key: views(ODD_D, torch.float32, aligned=False) for key in order}
        calls = []
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(off) or real(fd, bufs, off))
        assert store.read_many([(*key, *outs[key]) for key in order]) == len(order) * store.chunk_bytes
        # O_DIRECT reads these odd-sized chunks' range widened to 4 KiB edges (a bounce buffer)
        edge = 4096 if store._direct else 1
        assert sorted(calls) == sorted(c * store.chunk_bytes // edge * edge for c in (1, 1, 0, 4))
        for key in order:
            np.testing.assert_array_equal(bits(outs[key][0]), bits(written[key][0]))
            np.testing.assert_array_equal(bits(outs[key][1]), bits(written[key][1]))


def test_unwritten_or_discarded_chunks_raise(tmp_path):
    with make(tmp_path) as store:
        k, v = kv_pair(ALIGNED_D, torch.bfloat16, seed=5)
        out = views(ALIGNED_D, torch.bfloat16, aligned=True)
        with pytest.raises(MissingChunkError, match=r"layer 0, chunk 1\).*never written"):
            store.read_into(0, 1, *out)
        store.write(0, 1, k, v)
        store.write(1, 1, k, v)
        store.discard(0, 1)
        with pytest.raises(MissingChunkError):
            store.read_into(0, 1, *out)
        # read_many checks every item before reading any: the written one is not read either
        other = views(ALIGNED_D, torch.bfloat16, aligned=False)
        with pytest.raises(MissingChunkError):
            store.read_many([(1, 1, *other), (0, 1, *out)])
        assert (bits(other[0]) == 0xEE).all()
        with pytest.raises(IndexError):
            store.write(2, 0, k, v)
        with pytest.raises(ValueError, match="has 8192 bytes"):
            store.read_into(1, 1, torch.empty(NKV, C, 2 * ALIGNED_D, dtype=torch.bfloat16), out[1])
        with pytest.raises(ValueError, match="contiguous"):
            store.write(1, 1, k.transpose(1, 2), v)


def test_close_removes_the_directory_and_stores_do_not_collide(tmp_path):
    a, b = make(tmp_path), make(tmp_path)
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path
    ka, va = kv_pair(ALIGNED_D, torch.bfloat16, seed=6)
    kb, vb = kv_pair(ALIGNED_D, torch.bfloat16, seed=7)
    a.write(0, 0, ka, va)
    b.write(0, 0, kb, vb)
    out = views(ALIGNED_D, torch.bfloat16, aligned=True)
    a.read_into(0, 0, *out)
    np.testing.assert_array_equal(bits(out[0]), bits(ka))
    b.read_into(0, 0, *out)
    np.testing.assert_array_equal(bits(out[1]), bits(vb))
    a.close()
    assert not a.path.exists() and a.closed and b.path.is_dir()
    a.close()  # idempotent
    b.close()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_process_store_is_removed_by_the_next_one(tmp_path):
    live = make(tmp_path)
    dead = tmp_path / "kv-999999-gone"  # what a killed run leaves: the directory, its lock file free
    dead.mkdir()
    (dead / LOCK_FILE).touch()
    (dead / "c.0.0.0.0.0.0").write_bytes(b"x" * 100)
    new = make(tmp_path)
    assert not dead.exists()
    assert live.path.is_dir() and new.path.is_dir()  # a live store's lock is held: kept
    live.close()
    new.close()


def test_interpreter_exit_removes_an_unclosed_store(tmp_path):
    code = textwrap.dedent(f"""
        import torch
        from storage.kv_store import KVChunkStore
        s = KVChunkStore({str(tmp_path)!r}, 1, 1, 1, 8, 8, torch.float32)
        s.write(0, 0, torch.ones(1, 8, 8), torch.ones(1, 8, 8))
        print(s.path)
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.parent == tmp_path and not path.exists()


# ---------------------------------------------------------------------- page cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore over a shared read-only mapping; maps nothing in)."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        n = os.fstat(fd).st_size
        addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = (ctypes.c_ubyte * ((n + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        try:
            assert libc.mincore(addr, n, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, n)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec)


@pytest.fixture
def cache_droppable(tmp_path):
    """Skip where this filesystem keeps a file's pages after write-back + DONTNEED (tmpfs) or mincore is missing."""
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        pytest.skip("needs Linux mincore and posix_fadvise")
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\1" * (1 << 16))
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    try:
        if resident_pages(probe) != 0:
            pytest.skip("this filesystem keeps file pages cached (tmpfs?): nothing to drop")
    except (OSError, AttributeError, AssertionError) as e:
        pytest.skip(f"mincore unavailable: {e}")
    probe.unlink()


@pytest.mark.usefixtures("cache_droppable")
@pytest.mark.parametrize("d,aligned", [(ALIGNED_D, True), (ALIGNED_D, False), (ODD_D, False)],
                         ids=["direct", "buffered", "odd_size"])
def test_page_cache_is_dropped_after_write_and_read(tmp_path, d, aligned):
    with make(tmp_path / "kv", torch.float32, d) as store:
        k, v = filled_views(d, torch.float32, aligned, seed=8)
        store.write(0, 1, k, v)
        chunk_file = Path(store._layer_path(0))  # the layer's file: its chunk slots one after the other
        assert chunk_file.stat().st_size == store.shape[1] * store.chunk_bytes
        assert resident_pages(chunk_file) == 0
        store.read_into(0, 1, *views(d, torch.float32, aligned))
        assert resident_pages(chunk_file) == 0
        with open(chunk_file, "rb") as f:  # the check can fail: a plain read leaves the pages cached
            f.read()
        assert resident_pages(chunk_file) > 0


# ---------------------------------------------------------------------- user errors
def test_disk_full_while_writing(tmp_path, monkeypatch):
    root = tmp_path / "offload"
    store = make(root)
    k, v = kv_pair(ALIGNED_D, torch.bfloat16, seed=9)
    store.write(0, 0, k, v)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(NoSpaceError) as e:
        store.write(0, 0, k, v)
    assert isinstance(e.value, StorageError)  # the class the CLI turns into one line and exit status 2
    msg = str(e.value)
    assert msg.startswith(f"--offload-dir {root} is full: {store.total_bytes} bytes")
    assert "free space or point --offload-dir elsewhere" in msg
    assert (e.value.needed, e.value.directory) == (store.total_bytes, root)
    with pytest.raises(MissingChunkError):  # the failed write left the chunk unreadable, not stale
        store.read_into(0, 0, *views(ALIGNED_D, torch.bfloat16, aligned=True))
    monkeypatch.undo()

    # a filesystem that allocates blocks lazily reports a full disk at write-back (the buffered path)
    monkeypatch.setattr(kv_store, "_write_back", full)
    with pytest.raises(NoSpaceError, match="is full"):
        store.write(1, 0, *filled_views(ALIGNED_D, torch.bfloat16, aligned=False, seed=9))
    store.close()


def test_too_little_free_space_fails_up_front(tmp_path, monkeypatch):
    usage = kv_store.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(kv_store.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    with pytest.raises(NoSpaceError, match=r"has 1\.0 MiB free but the KV cache spilled there needs up to") as e:
        KVChunkStore(tmp_path, 32, 64, 8, 256, 128, torch.bfloat16)  # 32 GiB
    assert e.value.needed == 32 * 64 * 2 * 8 * 256 * 128 * 2
    assert list(tmp_path.iterdir()) == []


def test_root_that_is_not_a_writable_directory(tmp_path):
    not_dir = tmp_path / "a-file"
    not_dir.write_text("")
    with pytest.raises(StorageError, match=r"cannot create the KV cache's directory in --offload-dir .*a-file"):
        make(not_dir)
    with pytest.raises(ValueError, match="dtype"):
        KVChunkStore(tmp_path, 1, 1, 1, 8, 8, torch.int8)
