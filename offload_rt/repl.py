"""The chat REPL: a small loop over the streaming generator (commands: /reset /system /stats /exit).

Ctrl-C stops the current answer and keeps the conversation (the partial answer stays in
the history); Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, TextIO

HELP = "commands: /reset (clear the conversation), /system TEXT (set the system prompt), /stats, /exit"


class ChatREPL:
    def __init__(self, session, *, out: TextIO | None = None, err: TextIO | None = None,
                 read_line: Callable[[str], str] | None = None):
        self.session = session
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.read_line = read_line or input
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
