"""The chat REPL: in a real pseudo-terminal (multi-turn, commands, Ctrl-C keeps the chat, Ctrl-D exits),
and in-process over a fake session (what each turn's prompt carries)."""

import fcntl
import io
import os
import pty
import select
import subprocess
import sys
import termios
import time
from types import SimpleNamespace

import pytest

from offload_rt.errors import ContextLengthError
from offload_rt.repl import ChatREPL
from tests.cli_helpers import default_sigint

ENV = {"OFFLOAD_RT_BANDWIDTHS": "disk=1.3e9,mem=2.4e10,matvec=1.5e10"}


def _controlling_tty():
    # after setsid: make the pty (fd 0) this session's terminal, so Ctrl-C sends SIGINT
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    default_sigint()


class Term:
    def __init__(self, *args):
        self.master, slave = pty.openpty()
        env = dict(os.environ, **ENV)
        self.proc = subprocess.Popen([sys.executable, "-m", "offload_rt", *map(str, args)], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     preexec_fn=_controlling_tty)
        os.close(slave)
        self.buf = b""

    def expect(self, needle: bytes, timeout=180.0) -> bytes:
        end = time.monotonic() + timeout
        while needle not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; screen:\n{self.buf.decode(errors='replace')}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"process ended waiting for {needle!r}:\n{self.buf.decode(errors='replace')}")
                self.buf += chunk
        i = self.buf.index(needle) + len(needle)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.master)


@pytest.fixture
def term(tmp_path):
    t = Term("--offload-dir", tmp_path / "stores", "--max-new-tokens", "200")
    yield t
    t.close()


def test_chat_turns_commands_interrupt_and_exit(term):
    term.expect(b">>> ")
    term.send(b"What is the capital of France?\r")
    answer = term.expect(b">>> ")
    assert b"Paris" in answer
    # second turn sees the first (history is kept): ask about "it"
    term.send(b"/stats\r")
    stats = term.expect(b">>> ")
    assert b'"new_tokens"' in stats
    # Ctrl-C during a long answer stops it and keeps the chat going
    term.send(b"Write a very long story about a dragon.\r")
    term.expect(b"dragon.\r\n")  # the terminal's echo of the line
    term.expect(b" ", timeout=120)  # the answer has started streaming
    term.send(b"\x03")
    term.expect(b"(stopped)")
    term.expect(b">>> ")
    term.send(b"/system You answer in French.\r")
    assert b"system prompt set" in term.expect(b">>> ")
    term.send(b"/reset\r")
    assert b"cleared" in term.expect(b">>> ")
    term.send(b"/nonsense\r")
    assert b"unknown command" in term.expect(b">>> ")
    term.send(b"\x04")  # Ctrl-D
    assert term.proc.wait(60) == 0


class FakeSession:
    """Stands in for Session: records the messages each turn is asked to answer; answers from a script.

    An answer is a list of pieces; a KeyboardInterrupt in it is raised there, as Ctrl-C would be mid-stream.
    A conversation whose text grows past ``context`` characters is a ContextLengthError, as a full
    context window is.
    """

    model = SimpleNamespace(name="fake", tokenizer=SimpleNamespace(chat_template="{{ x }}"))

    def __init__(self, answers=(), context=None):
        self.answers = list(answers)
        self.context = context
        self.prompts: list[list[dict]] = []

    def answer(self, messages, raw=False):
        assert not raw
        self.prompts.append([dict(m) for m in messages])  # a copy: what this turn's prompt was
        if self.context is not None and sum(len(m["content"]) for m in messages) > self.context:
            raise ContextLengthError("the prompt is 30 tokens but the context is 24 tokens; shorten the prompt")
        pieces = self.answers.pop(0) if self.answers else ["ok"]

        def stream():
            for piece in pieces:
                if piece is KeyboardInterrupt:
                    raise KeyboardInterrupt
                yield piece

        return stream()

    def stats(self):
        return {}


def chat(session, *lines):
    """Run a ChatREPL over ``lines`` (then Ctrl-D); returns (repl, stdout text, stderr text)."""
    it = iter(lines)

    def read_line(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    repl = ChatREPL(session, out=out, err=err, read_line=read_line)
    assert repl.run() == 0
    return repl, out.getvalue(), err.getvalue()


def test_history_reaches_the_next_turns_prompt():
    session = FakeSession(answers=[["Paris", "."], ["About 2.1 million."]])
    chat(session, "What is the capital of France?", "How many people live there?")
    assert session.prompts[1] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "How many people live there?"},
    ]


def test_system_prompt_reaches_the_prompt():
    session = FakeSession()
    repl, _, err = chat(session, "hello", "/system You answer in French.", "Bonjour?", "/system", "hi")
    assert "system prompt set" in err
    assert session.prompts[0] == [{"role": "user", "content": "hello"}]
    # setting it starts a new conversation that begins with it
    assert session.prompts[1] == [{"role": "system", "content": "You answer in French."},
                                  {"role": "user", "content": "Bonjour?"}]
    assert session.prompts[2] == [{"role": "user", "content": "hi"}]  # /system alone clears it


def test_ctrl_c_keeps_the_partial_answer_in_the_history():
    session = FakeSession(answers=[["Once upon", " a time", KeyboardInterrupt, " never sent"], ["ok"]])
    repl, out, err = chat(session, "Tell me a long story.", "Go on.")
    assert "(stopped)" in err
    assert "Once upon a time" in out and "never sent" not in out
    assert session.prompts[1] == [
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": "Once upon a time"},
        {"role": "user", "content": "Go on."},
    ]


def test_full_context_keeps_the_chat_and_suggests_reset():
    """A turn that no longer fits the context window is an error for that turn only; /reset recovers."""
    session = FakeSession(context=20)
    long_question = "q" * 17  # fits alone, with its answer "ok" it fills the window
    repl, out, err = chat(session, long_question, "hi", "/reset", "hi")
    assert "context is 24 tokens" in err and "/reset to start a new conversation" in err
    assert "(conversation cleared)" in err
    # the failed "hi" left no trace; after /reset the same "hi" is asked alone (and fits)
    assert session.prompts[-1] == [{"role": "user", "content": "hi"}]
    assert repl.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert out.rstrip().endswith("ok")
