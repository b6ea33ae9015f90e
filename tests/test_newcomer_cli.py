"""What a newcomer runs first (issue 21), end to end with the default model, as few processes as possible:

* a first run with stdin and stderr piped: conversion and calibration run, stdin holds a byte that is not
  UTF-8 (Latin-1 ``é``): an answer, one warning line, no other byte on stderr (no progress-bar residue);
* the REPL in a pseudo-terminal: arrow-up recalls the history kept in the cache dir, a non-UTF-8 byte is
  a note, not the end of the session, a 10 KB bracketed paste arrives whole (its prompt-token count);
* a read-only offload dir: one line that says so (not "free disk space").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import assert_user_error
from tests.test_repl import Term, _controlling_tty

FIXED_BANDWIDTHS = {"OFFLOAD_RT_BANDWIDTHS": "disk=1.3e9,mem=2.4e10,matvec=1.5e10"}


def _env(cache: Path, **extra) -> dict:
    """A child's environment: its own cache dir, nothing that would change the thread or calibration setup."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OFFLOAD_RT_BANDWIDTHS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return dict(env, OFFLOAD_RT_CACHE=str(cache), **extra)


def _run(*args, env: dict, input: bytes | None = None) -> subprocess.CompletedProcess:
    """offload-run with ``env`` as its whole environment; stdin bytes; stdout and stderr decoded (U+FFFD kept)."""
    proc = subprocess.run([sys.executable, "-m", "offload_rt", *map(str, args)], input=input, capture_output=True,
                          env=env, timeout=900)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    return proc


class PasteTerm(Term):
    """tests.test_repl's terminal with a given environment, and a paste longer than the pty's buffers."""

    def __init__(self, *args, env: dict):
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "offload_rt", *map(str, args)], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     preexec_fn=_controlling_tty)
        os.close(slave)
        self.buf = b""

    def send_slowly(self, data: bytes, piece: int = 256) -> None:
        """Write ``data`` in pieces, reading the echo between them (else both sides block on full buffers)."""
        import select

        for i in range(0, len(data), piece):
            self.send(data[i:i + piece])
            while select.select([self.master], [], [], 0.05)[0]:
                self.buf += os.read(self.master, 65536)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A first run (fresh store dir and cache: conversion and calibration run), stdin and stderr piped,
    stdin Latin-1. Returns (the finished process, the offload dir holding the converted store)."""
    d = tmp_path_factory.mktemp("first")
    stores = d / "stores"
    proc = _run("--offload-dir", stores, "-n", "4", "--stats", env=_env(d / "cache"),
                input="Quelle est la capitale de la France ? Réponds en un mot.\n".encode("latin-1"))
    return proc, stores


def test_first_run_piped_non_utf8_stdin_and_a_clean_stderr(first_run):
    proc, _ = first_run
    err = proc.stderr
    assert proc.returncode == 0, err
    assert proc.stdout.strip(), "no answer"
    lines = err.split("\n")
    # lines of text only (here: the warning, the --stats line): no blank line, no progress-bar residue
    assert lines[-1] == "" and all(line.strip() for line in lines[:-1]), repr(err)
    assert "\r" not in err and "\x1b" not in err, repr(err)
    assert lines[0] == ("offload-run: warning: stdin is not valid UTF-8: 1 byte replaced with U+FFFD "
                        "(convert the text first, e.g. iconv -f latin1 -t utf-8)")
    stats = json.loads(lines[-2])
    assert stats["prompt_tokens"] > 10
    # README: idle threads wait as the code sets them (not OMP_WAIT_POLICY=PASSIVE)
    from offload_rt.threads import SPIN_ENV

    assert stats["omp_wait"] == "=".join(SPIN_ENV)
    # README: the default model runs natively from its Q4_1 blocks (not dequantized on load): what is placed
    # is the quantized size, a third of the float32 model's 4 bytes per parameter
    assert sum(stats["placement"].values()) < 135e6 * 4 / 3


def test_non_utf8_prompt_argument_is_a_warning_not_a_traceback(first_run, tmp_path):
    _, stores = first_run
    proc = _run("--offload-dir", stores, "-n", "2", "--prompt", os.fsdecode(b"caf\xe9?"),
                env=_env(tmp_path / "cache", **FIXED_BANDWIDTHS))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "offload-run: warning: --prompt is not valid UTF-8: 1 byte replaced with U+FFFD "
        "(convert the text first, e.g. iconv -f latin1 -t utf-8)"]


def _paste_text() -> str:
    """About 10 KB of multi-line text (more than the terminal's 4 KiB line buffer)."""
    para = ("The river runs past the old mill, where the wheel turned for a hundred years and the miller "
            "kept his accounts in a green ledger. ")
    return "\n".join(f"{i}. {para * 2}" for i in range(40))


def test_repl_history_editing_non_utf8_and_a_long_paste(first_run, tmp_path):
    _, stores = first_run
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "repl_history").write_text("/system You answer in one word.\n")
    term = PasteTerm("--offload-dir", stores, "--max-new-tokens", "3", env=_env(cache, **FIXED_BANDWIDTHS))
    try:
        seen = term.expect(b">>> ")
        assert b"\x1b[?2004h" in seen  # bracketed paste is on: a terminal wraps a paste in markers
        # arrow-up recalls the last line of the history file (a previous session's), Enter runs it
        term.send(b"\x1b[A")
        term.expect(b"/system You answer in one word.")
        term.send(b"\r")
        assert b"system prompt set" in term.expect(b">>> ")
        # Left/Right edit the line: "helo" -> "hello" is what the REPL gets (an unknown command echoes it)
        term.send(b"/helo\x1b[D")
        term.send(b"l\r")
        assert b"unknown command /hello;" in term.expect(b">>> ")
        # a Latin-1 byte: the turn is answered, the session goes on (GNU readline drops the invalid byte in a
        # UTF-8 locale; without readline it reaches the REPL, which replaces it and says so)
        term.send(b"caf\xe9?\r")
        out = term.expect(b">>> ", timeout=300)
        assert b"Traceback" not in out and term.proc.poll() is None
        # a 10 KB multi-line paste, as a terminal sends it with bracketed paste on: one message, whole
        term.send(b"/system\r")
        term.expect(b">>> ")
        text = _paste_text()
        term.send_slowly(b"\x1b[200~" + text.encode() + b"\x1b[201~")
        term.send(b"\r")
        term.expect(b">>> ", timeout=600)
        term.send(b"/stats\r")
        stats = json.loads(re.search(rb'\{"model".*\}', term.expect(b">>> ")).group(0))
        term.send(b"\x04")
        assert term.proc.wait(60) == 0
    finally:
        term.close()
    assert stats["prompt_tokens"] == len(_tokenizer(stores).encode_chat([{"role": "user", "content": text.strip()}]))
    history = (cache / "repl_history").read_bytes()
    assert b"/hello" in history and b"/stats" in history  # this session's lines were kept


def _tokenizer(stores: Path):
    from offload_rt.tokenizer import Tokenizer
    from storage.store import WeightStore

    (path,) = stores.glob("*.zarr")
    store = WeightStore.open(path)
    return Tokenizer(store.tokenizer_file, store.tokenizer_meta)


# ---------------------------------------------------------------------------------------------- read-only


def _read_only(path: Path, fill=None):
    """Make ``path`` a read-only directory (after ``fill(path)`` put its content there): a read-only tmpfs
    when root (permissions do not stop root), mode 0555 otherwise. Returns an undo callable; skips the
    test where neither can be done."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        if fill:
            fill(path)
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("running as root where tmpfs cannot be mounted: no way to make a read-only directory")
    if fill:
        fill(path)
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    return lambda: subprocess.run(["umount", str(path)], check=True)


def test_read_only_offload_dir_with_a_store_runs_and_says_so(first_run, tmp_path):
    """The store is there and can be read; the first run's disk measurement cannot write beside it: the run
    answers (models on read-only media are legitimate) with one note naming the read-only dir, no traceback."""
    _, stores = first_run
    ro = tmp_path / "ro"
    undo = _read_only(ro, lambda p: shutil.copytree(stores, p, dirs_exist_ok=True))
    try:
        proc = _run("--offload-dir", ro, "-p", "hi", "-n", "2", env=_env(tmp_path / "cache"))
    finally:
        undo()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith("offload-run: note: disk speed not measured") and str(ro) in err[0], err
    assert "free" not in err[0]


def test_read_only_empty_offload_dir_is_not_told_to_free_space(tmp_path):
    ro = tmp_path / "ro"
    undo = _read_only(ro)
    try:
        proc = _run("--offload-dir", ro, "-p", "hi", "-n", "2", env=_env(tmp_path / "cache", **FIXED_BANDWIDTHS))
    finally:
        undo()
    err = assert_user_error(proc, f"{ro} is not ")
    assert "free" not in err
