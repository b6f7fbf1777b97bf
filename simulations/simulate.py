"""`chorus simulate`: a federated run in Flower's simulation engine (Ray), through `flwr run`.

This is the documented Flower 1.42 path, nothing private: ``flwr run <app> --run-config <file>
--federation-config num-supernodes=N --stream`` against a managed local SuperLink (``address = ":local:"``
in ``$FLWR_HOME/config.toml``). Two things the bare command leaves to us:
    - data and artifacts are prepared here first, so the synthesis progress bar shows in this terminal
      and the simulated devices only ever read them;
    - the local SuperLink keeps running after the run: we stop the one our FLWR_HOME started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from shared.config import RunConfig
from shared.data.prepare import prepare
from shared.processes import stop_pid

__all__ = ["REPO_ROOT", "simulate", "stop_local_superlink"]

REPO_ROOT = Path(__file__).resolve().parents[1]


class SimulationError(RuntimeError):
    """The Flower run did not complete."""


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    # `flwr run` starts `flower-superlink` by name: make this interpreter's scripts findable.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def stop_local_superlink(flwr_home: Path) -> None:
    """Stop the managed SuperLink that `flwr run` left running for this FLWR_HOME (and only that one)."""
    marker = str(flwr_home / "local-superlink")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            stop_pid(int(proc.name), timeout=10.0)  # with its simulation process and Ray workers


def simulate(cfg: RunConfig, *, num_supernodes: int, progress: bool = True) -> Path:
    """Prepare data, run ``cfg.num_server_rounds`` rounds on ``num_supernodes`` simulated devices; returns
    the run directory (``runs/<run-id>/`` under the workdir)."""
    if not cfg.run_id:
        cfg = RunConfig.from_flat({**cfg.to_flat(), "run-id": datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")})
    if not cfg.workdir:
        cfg = RunConfig.from_flat({**cfg.to_flat(), "workdir": str(cfg.workdir_path)})
    prepared = prepare(cfg, progress=progress)
    if num_supernodes > len(prepared.split.federated):
        raise SimulationError(f"--clients {num_supernodes} exceeds the {len(prepared.split.federated)} federated "
                              f"speakers of {prepared.corpus.root}; synthesize more speakers")
    run_dir = cfg.workdir_path / "runs" / cfg.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = run_dir / "run_config.toml"
    overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.to_flat().items()))
    flwr_home = cfg.workdir_path / ".flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    cmd = [flwr, "run", str(REPO_ROOT), "--run-config", str(overrides),
           "--federation-config", f"num-supernodes={num_supernodes}", "--stream"]
    try:
        result = subprocess.run(cmd, env=_flower_env(flwr_home), cwd=REPO_ROOT)
    finally:
        stop_local_superlink(flwr_home)
    report = run_dir / "report.md"
    if result.returncode != 0 or not report.exists():
        log_file = flwr_home / "local-superlink" / "superlink.log"
        raise SimulationError(f"flwr run exited with {result.returncode} and wrote no {report}; "
                              f"see the SuperLink log {log_file}")
    return run_dir
