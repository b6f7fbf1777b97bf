"""`chorus simulate`: a federated run in Flower's simulation engine (Ray), through `flwr run`.

This is the documented Flower 1.42 path, nothing private: a SuperLink in simulation mode (``flower-superlink
--insecure --simulation``), a ``[superlink.<name>]`` connection to it in ``$FLWR_HOME/config.toml``, and
``flwr run <app> <name> --run-config <file> --federation-config "num-supernodes=N ..." --stream``. It is
what ``flwr run`` does by itself with a managed local SuperLink (``address = ":local:"``), except that we
start and stop the SuperLink:
    - the managed SuperLink listens on fixed ports (39091, 39093) whatever FLWR_HOME is, so two runs at once
      (two test sessions, a benchmark beside a test) would share one, and the first to finish would stop the
      other's; ours listens on a free port of its own;
    - ``flwr run`` gives the managed SuperLink 15 s to come up, which a loaded machine exceeds; we wait up to
      ``SUPERLINK_START_TIMEOUT``;
    - the managed SuperLink keeps running after the run; we stop ours, with everything it started.
Data and artifacts are prepared here first, so the synthesis progress bar shows in this terminal and the
simulated devices only ever read them.

Resources: Flower's Ray backend defaults to 2 CPUs per simulated device, so a 2-core machine trains one device
at a time. We pass ``client-resources-num-cpus=1 init-args-num-cpus=P`` (P = the cores this process may use,
or ``parallel``), so P devices train at once, each on one torch thread (the ClientApp sets it). Ray's actor
pool holds P worker processes whatever the number of simulated devices: a device is a partition id and a
Context in the simulation process, not a process, so 1,000 devices cost no more worker memory than 20. Ray
starts its workers at a nice value 15 above their parent's; ``RAY_worker_niceness=0`` keeps the devices at the
run's priority, so that on a shared machine they do not starve behind the server processes.

Sampling: :func:`sampling_overrides` maps "K of N devices per round, P at once" onto the strategy's keys.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from shared.config import RunConfig, StrategyConfig
from shared.data.prepare import corpus_dir, plan_split, prepare
from shared.models.checkpoint import init_checkpoint_path
from shared.processes import sigterm_as_interrupt, stop_pid, stop_tree

__all__ = [
    "REPO_ROOT",
    "available_cores",
    "free_port",
    "sampling_overrides",
    "simulate",
    "stage_app",
    "stop_local_superlink",
    "superlink_marker",
    "toml_value",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "chorus-simulation"  # the [superlink.<name>] entry in $FLWR_HOME/config.toml
SUPERLINK_START_TIMEOUT = 180.0  # seconds for our SuperLink to answer /health
APP_PACKAGES = ("server", "client", "shared")  # what the ServerApp and the ClientApp import


class SimulationError(RuntimeError):
    """The Flower run did not complete."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sampling_overrides(clients: int, per_round: int, *, parallel: int) -> dict[str, int | float]:
    """Run-config keys so that every round trains and evaluates exactly ``per_round`` of ``clients`` devices,
    with ``parallel`` of them running at once.

    Flower's FedAvg (and the strategies built on it) samples ``max(int(connected * fraction), min_nodes)``
    nodes with ``random.sample`` after waiting until ``min_available_nodes`` are connected. Fraction
    ``(per_round + 0.5) / clients`` gives exactly ``per_round`` (half a device of margin against a float
    product that falls just under an integer), and ``min-available-nodes = clients`` makes the first round
    wait until every simulated device has registered, so all of them can be drawn. ``min-*-nodes`` stay at
    the config's default (capped at ``per_round``): in this server they are also the fewest answers a round
    aggregates, so that one failing device of 50 does not void the round.

    ``strategy.max-in-flight`` = 2 x ``parallel``: a device in each Ray actor and one queued behind it, no
    more messages waiting than that (``server/exchange.py:_send_and_receive`` says why).
    """
    if not 1 <= per_round <= clients:
        raise ValueError(f"per-round devices must be in 1..{clients} (the number of clients), got {per_round}")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    fraction = min(1.0, (per_round + 0.5) / clients)
    defaults = StrategyConfig()
    return {
        "strategy.fraction-train": fraction,
        "strategy.fraction-evaluate": fraction,
        "strategy.min-train-nodes": min(per_round, defaults.min_train_nodes),
        "strategy.min-evaluate-nodes": min(per_round, defaults.min_evaluate_nodes),
        "strategy.min-available-nodes": clients,
        "strategy.max-in-flight": 2 * parallel,
    }


def superlink_marker(flwr_home: Path) -> str:
    """Text in the command line of the SuperLink a run starts for ``flwr_home`` (its state directory)."""
    return str(flwr_home / "local-superlink")


def toml_value(value: bool | int | float | str) -> str:
    """A run-config value as TOML (for ``flwr run --run-config FILE``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stage_app(dest: Path) -> Path:
    """``dest`` made a copy of the Flower app (``pyproject.toml`` and :data:`APP_PACKAGES`), for ``flwr run``;
    returns ``dest``.

    ``flwr run DIR`` lists every file under DIR before it picks the app's files for the FAB: run on the checkout,
    that is the virtualenv, ``.git`` and the tool caches too, tens of thousands of files at every run. The copy holds
    only the app (no model weights: a run names its checkpoint by absolute path)."""
    shutil.rmtree(dest, ignore_errors=True)
    for package in APP_PACKAGES:
        shutil.copytree(REPO_ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    shutil.copy2(REPO_ROOT / "pyproject.toml", dest)
    return dest


def _flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no network look-up from every Flower process
    # Ray adds 15 to its workers' nice value (its `worker_niceness`): on a busy machine the simulated devices
    # then starve behind the SuperLink, the ServerApp and everything else. They are the workload: keep them at
    # the run's own priority (Ray applies the value as an increment).
    env.setdefault("RAY_worker_niceness", "0")
    # The SuperLink starts `flower-superexec`, `flwr-serverapp`, `flwr-simulation` by name: make this
    # interpreter's scripts findable.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def stop_local_superlink(flwr_home: Path) -> None:
    """Stop a SuperLink still running for this FLWR_HOME (ours after an interrupted run, or one a bare
    ``flwr run`` left), and only that one, with its simulation process and Ray workers."""
    marker = superlink_marker(flwr_home)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            stop_pid(int(proc.name), timeout=10.0)


def _start_superlink(flwr_home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``flower-superlink`` in simulation mode on a free port, in a session of its own, its log in
    ``$FLWR_HOME/local-superlink/superlink.log`` and its state (messages and model arrays, on disk rather than
    in memory) in a database of its own there, so that runs sharing a workdir never share a SuperLink;
    returns once it answers ``/health``."""
    state_dir = Path(superlink_marker(flwr_home))
    state_dir.mkdir(parents=True, exist_ok=True)
    log_file = state_dir / "superlink.log"
    port = free_port()
    exe = shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) or "flower-superlink"
    cmd = [
        exe,
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(_database(flwr_home, port)),
    ]
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=state_dir, start_new_session=True
        )
    deadline = time.monotonic() + SUPERLINK_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with {proc.returncode} before serving; see {log_file}")
        with contextlib.suppress(urllib.error.URLError, OSError):  # not up yet
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2.0) as reply:
                if reply.status == 200:
                    return proc, port, log_file
        time.sleep(0.3)
    stop_tree(proc, timeout=10.0)
    raise SimulationError(
        f"flower-superlink did not answer on 127.0.0.1:{port} within {SUPERLINK_START_TIMEOUT:.0f} s; see {log_file}"
    )


def _database(flwr_home: Path, port: int) -> Path:
    return Path(superlink_marker(flwr_home)) / f"state-{port}.db"


def _write_connection(flwr_home: Path, port: int) -> None:
    """``$FLWR_HOME/config.toml`` with one connection, to our SuperLink (this FLWR_HOME is Chorus' own)."""
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def simulate(cfg: RunConfig, *, num_supernodes: int, progress: bool = True, parallel: int | None = None) -> Path:
    """Prepare data, run ``cfg.num_server_rounds`` rounds on ``num_supernodes`` simulated devices, at most
    ``parallel`` (default: :func:`available_cores`) training at once; returns the run directory
    (``runs/<run-id>/`` under the workdir)."""
    parallel = available_cores() if parallel is None else parallel
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if not cfg.run_id:
        cfg = RunConfig.from_flat({**cfg.to_flat(), "run-id": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")})
    if not cfg.workdir:
        cfg = RunConfig.from_flat({**cfg.to_flat(), "workdir": str(cfg.workdir_path)})
    init = init_checkpoint_path(cfg.model)
    if init is not None:  # an absolute path: the app runs from a bundle (FAB) that carries no weights
        cfg = RunConfig.from_flat({**cfg.to_flat(), "model.init-checkpoint": str(init.resolve())})
    federated = len(plan_split(cfg)[0].federated)  # known before the corpus is synthesized
    if num_supernodes > federated:
        raise SimulationError(
            f"--clients {num_supernodes} exceeds the {federated} federated speakers of {corpus_dir(cfg)}; "
            "synthesize more speakers"
        )
    prepare(cfg, progress=progress)
    run_dir = cfg.workdir_path / "runs" / cfg.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = run_dir / "run_config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flat().items()))
    flwr_home = cfg.workdir_path / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    env = _flower_env(flwr_home)
    with sigterm_as_interrupt():  # `kill` stops the SuperLink, its run and Ray, as Ctrl-C does
        superlink, port, log_file = _start_superlink(flwr_home, env)
        try:
            _write_connection(flwr_home, port)
            with tempfile.TemporaryDirectory(prefix="chorus-app-") as app:
                cmd = [
                    flwr,
                    "run",
                    str(stage_app(Path(app))),
                    CONNECTION,
                    "--run-config",
                    str(overrides),
                    "--federation-config",
                    f"num-supernodes={num_supernodes} client-resources-num-cpus=1 init-args-num-cpus={parallel}",
                    "--stream",
                ]
                result = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
        finally:
            stop_tree(superlink, timeout=10.0)  # with its SuperExec, ServerApp, simulation process and Ray
            for suffix in ("", "-wal", "-shm", "-journal"):  # the run's record is runs/<run-id>/, not this state
                Path(f"{_database(flwr_home, port)}{suffix}").unlink(missing_ok=True)
    report = run_dir / "report.md"
    if result.returncode != 0 or not report.exists():
        raise SimulationError(f"flwr run exited with {result.returncode} and wrote no {report}; see the SuperLink log {log_file}")
    return run_dir
