"""Issue 21, in process (no model): the conversion bar, the REPL's input decoding and history file, and the
README's claims that a test can hold."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from rich.console import Console

from offload_rt import repl as repl_mod
from offload_rt.tokenizer import decode_input, scrub_undecodable
from storage.convert import _Progress
from tests.test_repl import FakeSession, chat

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LONG_NAME = "converting Meta-Llama-3.1-70B-Instruct-Q4_K_M-00001-of-00002"


def _bar_lines(width: int, label: str) -> list[str]:
    console = Console(file=io.StringIO(), width=width, force_terminal=True)
    bar = _Progress(True, 41_878_272_000, label, console=console)
    try:
        bar.advance(5_000_000)
        time.sleep(0.2)  # a second sample: the speed and time-left columns fill in (the widest the bar gets)
        bar.advance(5_000_000_000)
        p = bar._p
        return ["".join(seg.text for seg in line) for line in console.render_lines(p.get_renderable(), console.options)]
    finally:
        bar.close()


def test_conversion_bar_is_one_line_short_of_the_terminal_width():
    for width in (80, 60, 120):
        for label in ("converting SmolLM2-135M-Instruct.Q4_1", LONG_NAME):
            lines = _bar_lines(width, label)
            assert len(lines) == 1, lines  # no wrap: the label is cut, not the figures
            assert len(lines[0].rstrip()) < width, lines
            assert re.search(r"\d+\.\d+/41\.9 GB", lines[0]), lines


def test_conversion_bar_writes_nothing_off_a_terminal():
    out = io.StringIO()
    bar = _Progress(True, 1000, "converting x", console=Console(file=out, force_terminal=False))
    bar.advance(500)
    bar.close()
    assert out.getvalue() == ""


def test_undecodable_input_becomes_replacement_characters():
    assert decode_input("café?".encode("latin-1")) == ("caf\ufffd?", 1)
    assert decode_input("café".encode()) == ("café", 0)
    # what Python makes of a Latin-1 byte on stdin/argv under a UTF-8 or C locale (surrogateescape)
    assert scrub_undecodable("caf\udce9 \udcff") == ("caf\ufffd \ufffd", 2)


def test_repl_replaces_undecodable_bytes_and_says_so():
    session = FakeSession()
    _, _, err = chat(session, "caf\udce9?")
    assert session.prompts == [[{"role": "user", "content": "caf\ufffd?"}]]
    assert "1 byte that are not UTF-8, replaced with U+FFFD" in err


def test_repl_history_lives_in_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFLOAD_RT_CACHE", str(tmp_path / "cache"))
    assert repl_mod.history_path() == tmp_path / "cache" / "repl_history"


def test_repl_lines_are_kept_in_a_new_history_file(monkeypatch, tmp_path):
    readline = __import__("pytest").importorskip("readline")
    path = tmp_path / "cache" / "repl_history"  # neither the file nor its directory exists yet

    def typed(_prompt):  # what input() does with readline: the line joins the history
        readline.add_history("a line typed")
        return "a line typed"

    monkeypatch.setattr("builtins.input", typed)
    reader = repl_mod.LineReader(path)
    assert reader(">>> ") == "a line typed"
    assert path.read_text().splitlines()[-1] == "a line typed"


def test_readme_claims_the_code_holds():
    from offload_rt.threads import SPIN_ENV

    # the wait policy the code sets (tests/test_newcomer_cli.py checks a run reports it)
    assert "=".join(SPIN_ENV) in README
    assert "OMP_WAIT_POLICY=PASSIVE` unless" not in README
    # the default model is not dequantized on load (tests/test_newcomer_cli.py checks what a run places)
    assert "dequantized on load" not in README and "Q4_1 blocks" in README
    # the REPL's history file, where the REPL keeps it
    assert f"`{repl_mod.HISTORY_FILE}`" in README
    # the console scripts the README names are the ones pyproject.toml installs
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in scripts:
        assert f"{name} " in README, name
