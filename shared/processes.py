"""Process trees (Linux /proc): stopping a process with everything it started, and measuring a tree's memory and CPU.

Flower detaches its SuperExec and app processes into sessions of their own (they name their parent with
``--parent-pid``), so a process group is not the whole tree: both the coordinator (SuperLink) and a device
(SuperNode) stop their Flower processes with :func:`stop_tree`, and ``chorus bench federation`` samples the peak
memory and CPU time of a run's whole tree with :class:`TreeMemorySampler`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Any
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

__all__ = [
    "PSS_EVERY",
    "SAMPLE_INTERVAL",
    "TreeMemorySampler",
    "interrupt",
    "sigterm_as_interrupt",
    "stop_pid",
    "stop_tree",
    "tree_cpu_seconds",
]

SAMPLE_INTERVAL = 0.5  # seconds between /proc samples of the process tree
PSS_EVERY = 20  # samples between PSS readings (every 10 s): smaps_rollup costs far more CPU than RSS


def _process_tree(pid: int) -> list[int]:
    """``pid``'s live descendants, including Flower's detached helpers that name it with ``--parent-pid`` (a
    SuperExec outlives a SuperNode that exits on its own, reparented away from it), with theirs."""
    return sorted(_tree(_proc_table(), [pid]) - {pid})


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_tree(proc: subprocess.Popen[Any], timeout: float, *, first: signal.Signals = signal.SIGTERM) -> int | None:
    """Send ``first`` (SIGTERM; SIGKILL to emulate a crash) to ``proc`` and its tree, SIGKILL what is left after
    ``timeout``; ``proc``'s exit status or None."""
    pids = [proc.pid, *_process_tree(proc.pid)]
    for pid in pids:
        _signal(pid, first)
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


def interrupt(signum: int, frame: object) -> None:
    """A signal handler that raises KeyboardInterrupt: installed for SIGTERM, ``kill`` (a scheduler, ``timeout``) runs
    the cleanup Ctrl-C runs, so the Flower and Ray processes a command started stop with it."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """:func:`interrupt` as the SIGTERM handler inside the block (the previous one after it); a no-op outside the
    main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


# -- the memory and CPU time of a process tree -------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, list[bytes], int]]:
    """pid -> (ppid, argv, CPU time in clock ticks: user + system) for every live process (Linux /proc)."""
    table: dict[int, tuple[int, list[bytes], int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()  # fields[0] is field 3 of proc(5), "state"
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            table[int(entry.name)] = (int(fields[1]), argv, int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _tree(table: Mapping[int, tuple[int, list[bytes], int]], roots: Iterable[int]) -> set[int]:
    """``roots`` and their descendants: by parent pid, and by Flower's ``--parent-pid`` argument (its SuperExec
    and app processes may be detached from the process that started them)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, argv, _) in table.items():
        children.setdefault(ppid, []).append(pid)
        for flag, value in zip(argv, argv[1:]):
            if flag == b"--parent-pid" and value.isdigit():
                children.setdefault(int(value), []).append(pid)
    found = {r for r in roots if r in table}
    frontier = list(found)
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, []) if c not in found]
        found.update(frontier)
    return found


def _label(argv: list[bytes]) -> str:
    """A short name: the script a Python process runs (flwr, flower-superlink, ...) or the executable."""
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    first = words[0].split()[0]
    base = os.path.basename(first)
    if base.startswith("python") and len(words) > 1:
        if "-c" in words[1:-1]:
            code = words[words.index("-c") + 1]
            return (
                "multiprocessing worker"
                if "spawn_main" in code
                else "multiprocessing resource tracker"
                if "resource_tracker" in code
                else "python -c"
            )
        rest = [w for w in words[1:] if not w.startswith("-")]
        if words[1] == "-m" and len(words) > 2:
            return words[2]
        if rest:
            return os.path.basename(rest[0])
    if first.startswith("ray::"):
        return first.rstrip(":").removesuffix(".run")  # an actor while it runs a task: ray::ClientAppActor.run
    if base == "default_worker.py":
        return "ray worker (not yet an actor)"
    return base


def _memory(pid: int, *, pss: bool) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in bytes ((RSS, 0) without ``pss``); (0, 0) if it has gone. PSS reads
    smaps_rollup, which walks the process's page tables (costly for a large process), so it is sampled sparingly."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0, 0
    if not pss:
        return rss, 0
    with contextlib.suppress(OSError, IndexError, ValueError):  # no smaps_rollup: PSS falls back to RSS
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return rss, int(line.split()[1]) * 1024
    return rss, rss


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU time (user + system) used so far by the live processes of ``root``'s tree (default: this one)."""
    table = _proc_table()
    return sum(table[pid][2] for pid in _tree(table, [os.getpid() if root is None else root])) / _TICK


class TreeMemorySampler(threading.Thread):
    """Samples a process tree every ``interval`` s until :meth:`stop`: the peaks of its summed RSS / PSS, and
    the CPU time it has used since the first sample (a process that exits keeps the CPU time it was last seen
    with).

    Roots: this process and every process whose command line contains one of ``markers`` (looked up at each
    sample). ``watch``: a file (metrics.jsonl) whose line count is followed: ``cpu_at_lines[n]`` is the tree's
    CPU time at the first sample that saw ``n`` lines."""

    def __init__(self, markers: Iterable[str] = (), *, interval: float = SAMPLE_INTERVAL, watch: Path | None = None) -> None:
        super().__init__(name="tree-memory-sampler", daemon=True)
        self._markers = [m.encode() for m in markers]
        self._interval = interval
        self._watch = watch
        self._stopped = threading.Event()
        self._cpu_ticks: dict[int, int] = {}  # pid -> CPU ticks when last seen in the tree
        self._labels: dict[int, str] = {}  # pid -> label
        self._cpu_start: dict[int, int] = {}  # pid -> CPU ticks at the first sample, for processes running then
        self.samples = 0
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.peak_rss_by_process: dict[str, int] = {}  # label -> summed RSS at the RSS peak
        self.loadavg: list[float] = []  # the machine's 1-minute load average at each sample
        self.cpu_at_lines: dict[int, float] = {}
        self.own_cpu_seconds = 0.0  # this sampler's thread: the measurement's own cost, inside the tree's

    @property
    def cpu_seconds(self) -> float:
        """CPU time the tree has used since the first sample."""
        return sum(t - self._cpu_start.get(pid, 0) for pid, t in self._cpu_ticks.items()) / _TICK

    def cpu_seconds_by_process(self) -> dict[str, float]:
        """:attr:`cpu_seconds` per process label (the latest title of each process)."""
        out: dict[str, float] = {}
        for pid, ticks in self._cpu_ticks.items():
            label = self._labels[pid]
            out[label] = out.get(label, 0.0) + (ticks - self._cpu_start.get(pid, 0)) / _TICK
        return dict(sorted(((k, round(v, 1)) for k, v in out.items()), key=lambda kv: -kv[1]))

    def sample(self) -> None:
        started = time.thread_time()
        try:
            self._sample()
        finally:
            self.own_cpu_seconds += time.thread_time() - started

    def _sample(self) -> None:
        table = _proc_table()
        roots = {os.getpid()} | {
            pid for pid, (_, argv, _) in table.items() if self._markers and any(m in b" ".join(argv) for m in self._markers)
        }
        pids = _tree(table, roots)
        rss_total, pss_total = 0, 0
        by_label: dict[str, int] = {}
        with_pss = self.samples % PSS_EVERY == 0
        for pid in pids:
            rss, pss = _memory(pid, pss=with_pss)
            rss_total += rss
            pss_total += pss
            label = _label(table[pid][1])  # the latest title (Ray workers retitle themselves) ...
            if label == "?" and pid in self._labels:  # ... unless it has exited: a zombie's command line is empty
                label = self._labels[pid]
            self._labels[pid] = label
            by_label[label] = by_label.get(label, 0) + rss
            if self.samples == 0:  # already running: count its CPU from now on
                self._cpu_start[pid] = table[pid][2]
            self._cpu_ticks[pid] = max(self._cpu_ticks.get(pid, 0), table[pid][2])
        self.samples += 1
        self.loadavg.append(os.getloadavg()[0])
        self.peak_pss = max(self.peak_pss, pss_total)
        self.peak_processes = max(self.peak_processes, len(pids))
        if rss_total > self.peak_rss:
            self.peak_rss = rss_total
            self.peak_rss_by_process = dict(sorted(by_label.items(), key=lambda kv: -kv[1]))
        if self._watch is not None:
            try:
                lines = sum(1 for line in self._watch.read_text().splitlines() if line.strip())
            except OSError:
                lines = 0
            self.cpu_at_lines.setdefault(lines, self.cpu_seconds)

    def run(self) -> None:
        while not self._stopped.is_set():
            self.sample()
            self._stopped.wait(self._interval)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=10)
        self.sample()

    def __enter__(self) -> TreeMemorySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
