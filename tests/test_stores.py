"""``offload-run list / rm / prune`` over real converted stores, and the subcommand dispatch of ``offload-run``.

Two tiny random checkpoints (a synthetic byte-level tokenizer: nothing is downloaded, a conversion takes
milliseconds) are converted into a fresh store directory per test; one is then made stale by changing or
deleting its checkpoint. The CLI runs in-process (``cli.main(argv)``); ``serve.main`` is replaced by a
recorder, so the dispatch tests check what reaches it without starting a server.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from offload_rt import cli
from offload_rt.config import format_size, parse_size

SHAPE = dict(hidden=32, layers=2, intermediate=64, heads=2, kv_heads=1, tie=True, vocab=300)


def _checkpoint(path: Path, seed: int) -> Path:
    from tools.make_checkpoint import make_checkpoint

    return make_checkpoint(path, dtype="float32", seed=seed, context=256, synthetic_tokenizer=True, **SHAPE)


@pytest.fixture
def shelf(tmp_path):
    """Checkpoints model-a and model-b, each converted into ``tmp_path/stores``."""
    import storage

    stores = tmp_path / "stores"
    a, b = _checkpoint(tmp_path / "model-a", 0), _checkpoint(tmp_path / "model-b", 1)
    sa = storage.open_or_convert(a, stores, progress=False).path
    sb = storage.open_or_convert(b, stores, progress=False).path
    return SimpleNamespace(dir=stores, a=a, b=b, sa=sa, sb=sb)


@pytest.fixture
def run(capsys, monkeypatch):
    """``run(*argv)`` → (exit status, stdout, stderr) of ``cli.main(argv)`` in this process."""
    from offload_rt import threads

    monkeypatch.setattr(threads, "configure_process", lambda: True)  # leave this process's OpenMP settings be

    def call(*argv):
        capsys.readouterr()
        try:
            cli.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err
    return call


def du(path: Path) -> int:
    """Bytes on disk, counted independently of offload_rt.stores (as test_cli_errors counts a store)."""
    return path.lstat().st_blocks * 512 + sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def row(out: str, name: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith(name)]
    return line


def dead_pid() -> int:
    """A pid whose process has exited (reaped): what a killed converter leaves behind."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------------ list


def test_list_shows_source_format_size_and_what_became_stale(shelf, run, monkeypatch):
    code, out, err = run("list", "--offload-dir", shelf.dir)
    assert code == 0 and err == ""
    for store, ckpt in ((shelf.sa, shelf.a), (shelf.sb, shelf.b)):
        line = row(out, store.name)
        assert str(ckpt.resolve()) in line and "auto: float32" in line
        assert format_size(du(store)) in line and line.endswith("ok")
    assert f"2 stores, {format_size(du(shelf.sa) + du(shelf.sb))} in {shelf.dir}" in out
    assert "prune" not in out  # nothing to prune yet

    monkeypatch.setenv("OFFLOAD_RT_CACHE", str(shelf.dir.parent))  # the default store dir: <cache>/stores
    assert run("list")[1] == out

    (weights,) = shelf.b.glob("*.safetensors")
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint changed (as a re-download would)
    out = run("list", "--offload-dir", shelf.dir)[1]
    assert row(out, shelf.sa.name).endswith("ok")
    assert row(out, shelf.sb.name).endswith("stale: source changed since conversion")
    assert f"offload-run prune would free {format_size(du(shelf.sb))} (1 item)" in out

    import shutil

    shutil.rmtree(shelf.b)
    assert row(run("list", "--offload-dir", shelf.dir)[1], shelf.sb.name).endswith("stale: source gone")


def test_a_store_under_another_name_is_another_format_version(shelf, run):
    """A store whose name is not the one this version computes for its checkpoint is never opened again."""
    other = shelf.sa.with_name("model-a-0000000000000000.zarr")
    shelf.sa.rename(other)
    out = run("list", "--offload-dir", shelf.dir)[1]
    assert row(out, other.name).endswith("stale: another store format version")


def test_last_used_is_when_a_run_last_opened_the_store(shelf, run):
    from storage.convert import LAST_USED, mark_used, open_converted

    long_ago = time.mktime((2001, 2, 3, 4, 5, 0, 0, 0, -1))
    os.utime(shelf.sa / LAST_USED, (long_ago, long_ago))
    assert "2001-02-03 04:05" in row(run("list", "--offload-dir", shelf.dir)[1], shelf.sa.name)
    assert open_converted(shelf.a, shelf.dir).path == shelf.sa  # a warm start opens it
    assert (shelf.sa / LAST_USED).stat().st_mtime > long_ago
    assert "2001-02-03" not in run("list", "--offload-dir", shelf.dir)[1]
    mark_used(shelf.dir / "no-such-store.zarr")  # cannot be written (read-only, gone): no error, a run goes on


def test_list_of_an_empty_or_missing_dir(tmp_path, run):
    code, out, err = run("list", "--offload-dir", tmp_path / "none")
    assert (code, err) == (0, "") and out.strip() == f"no weight stores in {tmp_path / 'none'}"


# -------------------------------------------------------------------------------------------------- rm


def test_rm_by_full_name_and_by_prefix_with_its_prefix_cache(shelf, run):
    prefix = shelf.dir / "prefix-cache" / shelf.sa.name
    prefix.mkdir(parents=True)
    (prefix / "chunk").write_bytes(b"k" * 10000)
    size_a, size_p = du(shelf.sa), du(prefix)
    code, out, err = run("rm", shelf.sa.name, "--offload-dir", shelf.dir)
    assert code == 0 and err == ""
    assert not shelf.sa.exists() and not prefix.exists() and shelf.sb.is_dir()
    assert f"removed {shelf.sa.name} ({format_size(size_a)})" in out
    assert f"removed prefix-cache/{shelf.sa.name} ({format_size(size_p)}, the prefix cache of {shelf.sa.name})" in out
    assert f"freed {format_size(size_a + size_p)} (2 items)" in out

    code, out, _ = run("rm", "model-b", "--offload-dir", shelf.dir)  # the start of one name
    assert code == 0 and not shelf.sb.exists() and f"removed {shelf.sb.name}" in out


@pytest.mark.parametrize("names, needles", [
    (["model-"], ["'model-' matches 2 weight stores", "give more of the name"]),
    (["gamma"], ["no weight store named 'gamma'"]),
    (["model-a", "gamma"], ["no weight store named 'gamma'"]),  # one bad name: nothing removed
])
def test_rm_an_unknown_or_ambiguous_name_is_one_line_and_removes_nothing(shelf, run, names, needles):
    code, out, err = run("rm", *names, "--offload-dir", shelf.dir)
    err = one_line_error(code, err, *needles)
    assert shelf.sa.name in err and shelf.sb.name in err  # the candidates
    assert out == "" and shelf.sa.is_dir() and shelf.sb.is_dir()


def test_rm_in_an_empty_dir(tmp_path, run):
    one_line_error(*run("rm", "x", "--offload-dir", tmp_path)[::2], "holds none")


# ----------------------------------------------------------------------------------------------- prune


def _junk(shelf):
    """Beside the two stores (model-b's checkpoint now gone): what prune must remove and what it must keep."""
    import shutil

    import torch

    from storage.kv_store import LOCK_FILE, KVChunkStore

    shutil.rmtree(shelf.b)
    d = shelf.dir
    dead_tmp = d / f"{shelf.sa.name}.tmp-{dead_pid()}"
    dead_old = d / f"{shelf.sa.name}.old-{dead_pid()}"
    live_tmp = d / f"{shelf.sa.name}.tmp-{os.getpid()}"  # a conversion under way
    live_kv = KVChunkStore(d / "kv-cache", 1, 1, 1, 16, 8, torch.float32)  # held by this process (made first: a
    dead_kv = d / "kv-cache" / "kv-1-dead"                                # new KV store removes dead ones)
    for p in (dead_tmp, dead_old, live_tmp, dead_kv):
        p.mkdir(parents=True)
        (p / "data").write_bytes(b"x" * 5000)
    (dead_kv / LOCK_FILE).touch()  # its owner's flock went with the owner
    prefix = {n: d / "prefix-cache" / n for n in (shelf.sa.name, shelf.sb.name, "model-c-0123456789abcdef.zarr")}
    for p in prefix.values():
        p.mkdir(parents=True)
        (p / "chunk").write_bytes(b"p" * 3000)
    gone = [shelf.sb, prefix[shelf.sb.name], dead_tmp, dead_old, dead_kv, prefix["model-c-0123456789abcdef.zarr"]]
    kept = [shelf.sa, prefix[shelf.sa.name], live_tmp, live_kv.path]
    return gone, kept, live_kv


def test_prune_removes_stale_stores_and_leftovers_only(shelf, run):
    gone, kept, live_kv = _junk(shelf)
    sizes = {p: du(p) for p in gone}

    code, out, err = run("prune", "--offload-dir", shelf.dir, "--dry-run")
    assert code == 0 and err == ""
    assert all(p.exists() for p in gone + kept)  # a dry run removes nothing
    dry = out

    code, out, err = run("prune", "--offload-dir", shelf.dir)
    assert code == 0 and err == ""
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)
    lines = out.strip().splitlines()
    assert len(lines) == len(gone) + 1
    for p in gone:  # every removal named, with its size
        rel = p.relative_to(shelf.dir)
        assert any(ln.startswith(f"removed {rel} ({format_size(sizes[p])}") for ln in lines), (rel, out)
    assert "stale: source gone" in row(out, f"removed {shelf.sb.name}")
    assert lines[-1] == f"freed {format_size(sum(sizes.values()))} ({len(gone)} items) in {shelf.dir}"
    assert dry == out.replace("removed ", "would remove ").replace("freed ", "would free ")

    assert run("prune", "--offload-dir", shelf.dir)[1].strip() == f"nothing to prune in {shelf.dir}"
    live_kv.close()


# -------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def served(monkeypatch):
    """Replaces serve.main (the lead's) with a recorder: calls[-1] = (cfg, keyword arguments)."""
    from offload_rt import serve

    calls = []

    def fake_main(cfg, **kw):
        calls.append((cfg, kw))
        return 0
    monkeypatch.setattr(serve, "main", fake_main, raising=False)
    monkeypatch.delenv("OFFLOAD_RT_API_KEY", raising=False)
    return calls


def test_serve_reaches_serve_main_with_the_run_options_parsed(run, served, tmp_path):
    code, out, err = run("serve", "some/model", "--port", "9001", "--parallel", "3", "--gpu-mem", "0",
                         "--cpu-mem", "2G", "-n", "7", "--temperature", "0.5", "--offload-dir", tmp_path,
                         "--api-key", "k", "--plan")
    assert (code, err) == (0, "")
    cfg, kw = served[-1]
    assert (cfg.model, cfg.parallel, cfg.gpu_mem, cfg.cpu_mem) == ("some/model", 3, 0, parse_size("2G"))
    assert (cfg.max_new_tokens, cfg.sampling.temperature, cfg.store_dir) == (7, 0.5, tmp_path)
    assert kw == dict(host="127.0.0.1", port=9001, api_key="k", queue_depth=64, plan_only=True,
                      defaults={"temperature": 0.5, "max_tokens": 7})


def test_serve_defaults_and_the_api_key_from_the_environment(run, served, monkeypatch):
    monkeypatch.setenv("OFFLOAD_RT_API_KEY", "from-env")
    assert run("serve", "--host", "0.0.0.0", "--queue-depth", "0")[0] == 0
    cfg, kw = served[-1]
    assert cfg.model is None and cfg.parallel is None
    assert kw == dict(host="0.0.0.0", port=8080, api_key="from-env", queue_depth=0, plan_only=False, defaults={})


@pytest.mark.parametrize("argv, needle", [
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--parallel", "0"], "--parallel"),
    (["--queue-depth", "-1"], "--queue-depth"),
    (["--api-key", " "], "--api-key"),
    (["--prompt", "hi"], "--prompt"),  # a run's one-shot options are not the server's
    (["--stats"], "--stats"),
    (["--gpu-mem", "lots"], "--gpu-mem"),  # the run's own checks
])
def test_bad_serve_options_are_one_line_exit_2(run, served, argv, needle):
    one_line_error(*run("serve", *argv)[::2], needle)
    assert served == []


def test_a_user_error_inside_the_server_is_one_line(run, monkeypatch):
    from offload_rt import serve
    from offload_rt.errors import UsageError

    def fails(cfg, **kw):
        raise UsageError("address already in use\nsecond line")
    monkeypatch.setattr(serve, "main", fails, raising=False)
    one_line_error(*run("serve")[::2], "offload-run: error: address already in use")


def test_help_names_the_subcommands_and_a_model_named_like_one_runs(run, monkeypatch):
    code, out, err = run("--help")
    assert code == 0 and out.startswith("Usage: offload-run [OPTIONS] [MODEL]")
    for sub in ("serve", "list", "rm NAME", "prune", "./serve"):
        assert re.search(rf"offload-run {re.escape(sub)}\b|runs as {re.escape(sub)}", out), sub
    assert run("serve", "--help")[1].startswith("Usage: offload-run serve [OPTIONS] [MODEL]")

    from offload_rt import app

    seen = []
    monkeypatch.setattr(app, "main", lambda cfg, **kw: seen.append((cfg, kw)) or 0)
    assert run("./serve", "--gpu-mem", "8G", "-p", "hi")[0] == 0  # not the subcommand: the run command
    cfg, kw = seen[-1]
    assert (cfg.model, cfg.gpu_mem, kw["prompt"], cfg.parallel) == ("./serve", 8 << 30, "hi", None)
    code, _, err = run("model-dir", "--parallel", "2", "-p", "hi")  # a serve option is no run option
    one_line_error(code, err, "--parallel", "see offload-run --help")
