"""Run offload-run in a subprocess, as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_cli(*args, input=None, env=None, timeout=600, cwd=None):
    e = dict(os.environ)
    e.setdefault("OFFLOAD_RT_BANDWIDTHS", "disk=1.3e9,mem=2.4e10,matvec=1.5e10")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "offload_rt", *map(str, args)], input=input, capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=cwd)


def assert_user_error(proc, *needles):
    """Exit status 2, exactly one line on stderr, no traceback, the message names the problem."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def default_sigint() -> None:
    """preexec_fn for a child a test interrupts: SIGINT back to its default disposition. A shell runs
    background jobs (`make test &`, nohup) with SIGINT ignored, children inherit that, and Python then
    never installs its KeyboardInterrupt handler, so Ctrl-C tests would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
