"""The chat REPL in a real pseudo-terminal: multi-turn, commands, Ctrl-C keeps the chat, Ctrl-D exits."""

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

ENV = {"OFFLOAD_RT_BANDWIDTHS": "disk=1.3e9,mem=2.4e10,matvec=1.5e10"}


def _controlling_tty():
    # after setsid: make the pty (fd 0) this session's terminal, so Ctrl-C sends SIGINT
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


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


def test_full_context_keeps_the_chat_and_suggests_reset():
    """A turn that no longer fits the context window is an error for that turn only; /reset recovers."""
    import io
    from types import SimpleNamespace

    from offload_rt.errors import ContextLengthError
    from offload_rt.repl import ChatREPL

    class FakeSession:
        model = SimpleNamespace(name="fake", tokenizer=SimpleNamespace(chat_template="{{ x }}"))

        def answer(self, messages, raw=False):
            if sum(len(m["content"]) for m in messages) > 20:
                raise ContextLengthError("the prompt is 30 tokens but the context is 24 tokens; shorten the prompt")
            yield "ok"

        def stats(self):
            return {}

    lines = iter(["a question that is too long", "/reset", "hi"])

    def read_line(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    repl = ChatREPL(FakeSession(), out=out, err=err, read_line=read_line)
    assert repl.run() == 0
    assert "context is 24 tokens" in err.getvalue() and "/reset to start a new conversation" in err.getvalue()
    assert repl.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert out.getvalue().rstrip().endswith("ok")
