"""Stopping a process together with everything it started (Linux /proc).

Flower detaches its SuperExec and app processes into sessions of their own, so killing a process group is not
enough; both the coordinator (SuperLink) and a device (SuperNode) stop their Flower processes this way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["stop_pid", "stop_tree"]


def _process_tree(pid: int) -> list[int]:
    """``pid``'s live descendants, and Flower's detached helpers that name it with ``--parent-pid`` (a
    SuperExec outlives a SuperNode that exits on its own, reparented away from it), with theirs (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
        if any(a == b"--parent-pid" and b == str(pid).encode() for a, b in zip(args, args[1:])):
            children.setdefault(pid, []).append(int(entry.name))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, []) if c not in found and c != pid]
        found += frontier
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_tree(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM ``proc`` and its tree, SIGKILL what is left after ``timeout``; ``proc``'s exit status or None."""
    pids = [proc.pid, *_process_tree(proc.pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc.poll() is None or any(_running(pid) for pid in pids[1:])):
        time.sleep(0.1)
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def stop_pid(pid: int, timeout: float) -> None:
    """``stop_tree`` for a process this one did not start (found by its command line)."""
    pids = [pid, *_process_tree(pid)]
    for p in pids:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        if _running(p):
            _signal(p, signal.SIGKILL)
