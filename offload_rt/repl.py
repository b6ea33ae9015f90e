"""The chat REPL: a small loop over the streaming generator (commands: /reset /system /stats /exit).

Ctrl-C stops the current answer and keeps the conversation (the partial answer stays in
the history); Ctrl-D or /exit leaves.

Lines are read with readline where Python has it (GNU readline or libedit): arrow keys edit and
recall, the history persists in ``<cache dir>/repl_history`` (``OFFLOAD_RT_CACHE``, else
``$XDG_CACHE_HOME/offload_rt``), and with GNU readline a paste arrives as one message, its line
breaks kept (bracketed paste), however long: the terminal's 4 KiB line buffer is not in the way.
Bytes that are not UTF-8 become U+FFFD, with a note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

from offload_rt.tokenizer import scrub_undecodable

HELP = "commands: /reset (clear the conversation), /system TEXT (set the system prompt), /stats, /exit"
HISTORY_FILE = "repl_history"
HISTORY_LENGTH = 1000  # lines kept in the history file


def history_path() -> Path:
    """Where the REPL keeps its input history: beside the converted stores, in offload_rt's cache dir."""
    from offload_rt.config import default_cache_dir

    return default_cache_dir() / HISTORY_FILE


class LineReader:
    """``input()`` with line editing, a persistent history and bracketed paste, where readline exists.

    Without readline (a Python built without it) this is plain ``input()``. Each line read is appended
    to the history file at once (a killed session keeps what was typed; two sessions at once both keep
    theirs), which is kept to its last HISTORY_LENGTH lines. A history file that cannot be read or
    written is no error.
    """

    def __init__(self, history: Path | None = None):
        self.history = history
        self.readline = None
        try:
            import readline
        except ImportError:  # no line editing on this build of Python: input() as it is
            return
        self.readline = readline
        if "libedit" not in (readline.__doc__ or ""):
            # CPython turns GNU readline's bracketed paste off (for its own REPL); a chat wants it: a paste,
            # line breaks and all, is one message
            readline.parse_and_bind("set enable-bracketed-paste on")
        readline.set_history_length(HISTORY_LENGTH)
        if history is not None:
            try:
                readline.read_history_file(history)
            except OSError:  # none yet, or unreadable: start empty
                pass

    def __call__(self, prompt: str) -> str:
        line = input(prompt)
        if self.readline is not None and self.history is not None and line.strip():
            try:
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self.history.touch()  # (readline appends only to a file that exists)
                if hasattr(self.readline, "append_history_file"):
                    self.readline.append_history_file(1, self.history)  # (then cut to the history length)
                else:  # a readline library without append_history
                    self.readline.write_history_file(self.history)
            except OSError:  # a read-only cache dir: the history lives as long as the session
                pass
        return line


def terminal_reader() -> LineReader:
    """The REPL's reader of the terminal: readline, the history file, stdin's undecodable bytes kept
    (as lone surrogates, which the REPL turns into U+FFFD) instead of ending the session."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    return LineReader(history_path())


class ChatREPL:
    def __init__(self, session, *, out: TextIO | None = None, err: TextIO | None = None,
                 read_line: Callable[[str], str] | None = None):
        self.session = session
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.read_line = read_line or terminal_reader()
        self.system: str | None = None
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def handle_command(self, line: str) -> bool:
        """Run a /command; False means leave the REPL."""
        cmd, _, arg = line.partition(" ")
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.history.clear()
            print("(conversation cleared)", file=self.err)
        elif cmd == "/system":
            self.system = arg.strip() or None
            self.history.clear()
            print("(system prompt set; conversation cleared)" if self.system else "(system prompt cleared)", file=self.err)
        elif cmd == "/stats":
            print(json.dumps(self.session.stats()), file=self.err)
        else:
            print(f"unknown command {cmd}; {HELP}", file=self.err)
        return True

    def turn(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        raw = self.session.model.tokenizer.chat_template is None
        prompt = text if raw else self.messages()
        pieces: list[str] = []
        stream = self.session.answer(prompt, raw=raw)
        try:
            for piece in stream:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.out.write("\n")
            print("(stopped)", file=self.err)
        self.out.write("\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": "".join(pieces)})

    def run(self) -> int:
        print(f"offload-run chat with {self.session.model.name}. {HELP}; Ctrl-C stops an answer, Ctrl-D exits.",
              file=self.err)
        while True:
            try:
                line = self.read_line(">>> ")
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            line, bad = scrub_undecodable(line)
            if bad:
                print(f"(the line had {bad} byte{'s' if bad > 1 else ''} that are not UTF-8, replaced with U+FFFD)",
                      file=self.err)
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.handle_command(line):
                    return 0
                continue
            try:
                self.turn(line)
            except KeyboardInterrupt:  # Ctrl-C during prefill
                print("(stopped)", file=self.err)
            except Exception as e:  # a user error (e.g. context full) ends the turn, not the chat
                from offload_rt.errors import ContextLengthError, UserError

                if not isinstance(e, UserError):
                    raise
                self.history.pop()
                hint = "; or /reset to start a new conversation" if isinstance(e, ContextLengthError) else ""
                print(f"error: {e}{hint}", file=self.err)
