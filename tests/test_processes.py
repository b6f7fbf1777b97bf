"""`kill` (SIGTERM) stops what a command started, as Ctrl-C does: ``sigterm_as_interrupt`` around a process tree."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO_ROOT

# A command in miniature: it starts a child and stops it in `finally`, the shape of `chorus simulate` around its
# SuperLink; it prints the child's pid and the SIGTERM handler outside the block afterwards.
COMMAND = """
import signal, subprocess, sys
from shared.processes import sigterm_as_interrupt, stop_tree
before = signal.getsignal(signal.SIGTERM)
try:
    with sigterm_as_interrupt():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        try:
            child.wait()
        finally:
            stop_tree(child, timeout=5.0)
except KeyboardInterrupt:
    print("restored" if signal.getsignal(signal.SIGTERM) is before else "not restored", flush=True)
    sys.exit(130)
"""


def test_sigterm_runs_the_cleanup_and_restores_the_handler() -> None:
    proc = subprocess.Popen([sys.executable, "-c", COMMAND], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert Path(f"/proc/{child}").exists()
    time.sleep(0.2)  # inside child.wait()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and rest.strip() == "restored"
    assert not Path(f"/proc/{child}").exists(), "the child outlived the command that was killed"
