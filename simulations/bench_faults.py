"""`chorus bench faults`: a deployment that loses a device and its server mid-run, and what it recorded.

Real processes on loopback, as in the README's Deployment section: a TLS SuperLink with SuperNode
authentication, three SuperNodes (each one synthetic speaker's data directory and the public artifacts), the
tiny model of the CI tests, and ``flwr run`` of this app with ``num-server-rounds`` 4. Two faults:

    1. **a device killed mid-round and rejoining**: once device 0 has taken its round-2 train message, its
       SuperNode and app processes get SIGKILL (a phone that dies); its owner starts it again with the same key
       every 5 s until the SuperLink lets it in. Its round-2 reply never comes (the server waits up to
       ``strategy.timeout``); the round aggregates the others (``strategy.min-train-nodes`` 2), and the device
       should answer again from round 3.
    2. **the SuperLink killed mid-run**: once round 3 is recorded, the SuperLink and everything it started
       (its SuperExec and the ServerApp) get SIGKILL. It restarts on the same port with the same database (the
       registered device keys survive); the SuperNodes reconnect by themselves; ``flwr run`` with
       ``resume=true`` and the same ``run-id`` continues from the last committed checkpoint and finishes.

The outcome (per-round answers and failures from ``metrics.jsonl``, the committed round at the kill, the
final checkpoint's round, wall times) goes to ``runs/<bench-id>/faults.json`` and stdout. The server's disk
failing while it writes a checkpoint is tested in-process (``tests/test_resume.py``): nothing here adds to it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.device import start_supernode, stop_supernode
from server.deploy import (
    CONNECTION_NAME,
    flower_env,
    make_dev_certificates,
    make_node_keys,
    register_supernodes,
    start_superlink,
    stop_process,
    wait_until_listening,
    write_flower_config,
)
from shared.config import TINY_RUN, RunConfig
from shared.data.prepare import prepare
from shared.files import write_text_atomic
from shared.models.checkpoint import load_checkpoint
from shared.processes import sigterm_as_interrupt, stop_tree
from simulations.simulate import REPO_ROOT, free_port, stage_app, toml_value

__all__ = ["FAULT_RUN", "device_dirs", "main", "run_faults"]

DEVICES = 3
REJOIN_AFTER_S = 5.0  # between a device's restarts
# The CI-sized run (shared/config.py's TINY_RUN): 2 public + 2 held-out speakers on the server, 3 devices.
FAULT_RUN: dict[str, Any] = {
    **TINY_RUN,
    "synth.speakers": 7,
    "num-server-rounds": 4,
    "run-id": "faults",
    "strategy.min-train-nodes": 2,
    "strategy.min-evaluate-nodes": 2,
    "strategy.min-available-nodes": 2,
    "strategy.timeout": 90.0,
}


def device_dirs(cfg: RunConfig, root: Path) -> list[tuple[Path, Path]]:
    """One (data dir, artifacts dir) per federated speaker: its own recordings and a copy of the public artifacts,
    as a phone would hold them."""
    prepared = prepare(cfg, progress=False)
    by_speaker = prepared.corpus.by_speaker()
    manifest = [json.loads(line) for line in (prepared.corpus.root / "manifest.jsonl").read_text().splitlines()]
    devices = []
    for index, speaker in enumerate(prepared.split.federated):
        data, artifacts = root / f"device-{index}" / "data", root / f"device-{index}" / "artifacts"
        ids = {u.id for u in by_speaker[speaker]}
        entries = [e for e in manifest if e["id"] in ids]
        for entry in entries:
            (data / entry["audio"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(prepared.corpus.root / entry["audio"], data / entry["audio"])
        (data / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        artifacts.mkdir(parents=True, exist_ok=True)
        for name in (f"tokenizer-{cfg.model.vocab_size}.model", "cmvn.json"):
            shutil.copy2(prepared.artifacts / name, artifacts / name)
        devices.append((data, artifacts))
    return devices


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _wait_for_round(run_dir: Path, server_round: int, *, flwr: subprocess.Popen[str], timeout: float) -> float:
    """Block until round ``server_round`` is in metrics.jsonl; the seconds it took."""
    start = time.monotonic()
    while not any(r.get("round") == server_round for r in _records(run_dir)):
        if flwr.poll() is not None:
            raise RuntimeError(f"`flwr run` exited with {flwr.returncode} before round {server_round} was recorded")
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"round {server_round} was not recorded within {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - start


def _wait_for_log(log: Path, text: str, count: int, *, timeout: float) -> None:
    """Block until ``text`` appears ``count`` times in ``log``."""
    deadline = time.monotonic() + timeout
    while not (log.is_file() and log.read_text(errors="replace").count(text) >= count):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log} did not say {text!r} {count} times within {timeout:.0f} s")
        time.sleep(0.2)


def _rejoin(
    start: Callable[[int], subprocess.Popen[bytes]], index: int, *, timeout: float
) -> tuple[subprocess.Popen[bytes], int]:
    """Start device ``index`` again until the SuperLink lets it in: it refuses to activate a key it still
    counts as online (Flower: up to 2 heartbeat intervals, 60 s, after the device's last heartbeat), and the
    SuperNode then exits (code 305). Returns the running SuperNode and the number of starts."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while time.monotonic() < deadline:
        time.sleep(REJOIN_AFTER_S)
        attempts += 1
        proc = start(index)
        settled = time.monotonic() + 2 * REJOIN_AFTER_S  # a refused start exits within a few seconds
        while proc.poll() is None and time.monotonic() < settled:
            time.sleep(0.2)
        if proc.poll() is None:
            return proc, attempts
    raise TimeoutError(f"device {index} was not let back in within {timeout:.0f} s ({attempts} starts)")


def run_faults(workdir: Path, *, bench_id: str = "bench-faults", timeout: float = 900.0) -> dict[str, Any]:
    """Run the two faults of the module docstring under ``workdir/runs/<bench_id>/``; the outcome."""
    root = (workdir / "runs" / bench_id).resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cfg = RunConfig.from_flat({**FAULT_RUN, "workdir": str(workdir.resolve())})
    run_dir = cfg.workdir_path / "runs" / cfg.run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    devices = device_dirs(cfg, root / "devices")
    certs = make_dev_certificates(root / "pki")
    keys = make_node_keys(root / "pki", DEVICES)
    port = free_port()
    overrides = root / "run_config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flat().items()))
    resume_overrides = root / "run_config_resume.toml"
    resume_overrides.write_text(overrides.read_text().replace("resume = false", "resume = true"))
    flwr_exe = str(Path(sys.executable).with_name("flwr"))
    app = stage_app(root / "app")
    outcome: dict[str, Any] = {"devices": DEVICES, "rounds": cfg.num_server_rounds, "strategy_timeout_s": cfg.strategy.timeout}

    def link() -> subprocess.Popen[bytes]:
        proc = start_superlink(certs=root / "pki", port=port, state_dir=root / "superlink")
        wait_until_listening(proc, "127.0.0.1", port, timeout=120)
        return proc

    def node(index: int) -> subprocess.Popen[bytes]:
        data, artifacts = devices[index]
        return start_supernode(
            superlink=f"127.0.0.1:{port}",
            data_dir=data,
            artifacts_dir=artifacts,
            root_cert=certs.ca_cert,
            auth_key=keys[index].private_key,
            port=free_port(),
            state_dir=root / f"supernode-{index}",
        )

    def flwr_run(config: Path, name: str) -> subprocess.Popen[str]:
        log = (root / f"{name}.log").open("w")
        return subprocess.Popen(
            [flwr_exe, "run", str(app), CONNECTION_NAME, "--run-config", str(config), "--stream"],
            env=flower_env(flwr_home),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    start = time.monotonic()
    superlink = link()
    nodes: list[subprocess.Popen[bytes]] = []
    runs: list[subprocess.Popen[str]] = []
    try:
        flwr_home = write_flower_config(root / "flwr", address=f"127.0.0.1:{port}", root_cert=certs.ca_cert)
        register_supernodes([k.public_key for k in keys], flwr_home=flwr_home)
        nodes = [node(i) for i in range(DEVICES)]
        runs.append(flwr_run(overrides, "flwr-run"))
        _wait_for_round(run_dir, 1, flwr=runs[-1], timeout=timeout)

        # 1. A device dies holding its round-2 train message, and its owner restarts it until it is let back in.
        _wait_for_log(root / "supernode-0" / "supernode.log", "Receiving: train message", 2, timeout=timeout)
        stop_tree(nodes[0], 0.0, first=signal.SIGKILL)
        killed = time.monotonic()
        nodes[0], attempts = _rejoin(node, 0, timeout=timeout)
        outcome["device_killed_in_round"] = 2
        outcome["device_rejoined_s_after_kill"] = round(time.monotonic() - killed, 1)
        outcome["device_start_attempts"] = attempts
        _wait_for_round(run_dir, 3, flwr=runs[-1], timeout=timeout)

        # 2. The SuperLink dies with everything it started; it comes back, and the run resumes.
        stop_tree(superlink, 0.0, first=signal.SIGKILL)
        stop_tree(runs[-1], 0.0)  # `flwr run --stream` lost its stream
        committed = load_checkpoint(run_dir / "checkpoints" / "global.pt").meta["round"]
        outcome["superlink_killed_after_round"] = 3
        outcome["committed_round_at_kill"] = int(committed)
        restarted = time.monotonic()
        superlink = link()
        runs.append(flwr_run(resume_overrides, "flwr-run-resume"))
        if runs[-1].wait(timeout=timeout) != 0:
            raise RuntimeError(f"the resumed `flwr run` exited with {runs[-1].returncode}; see {root / 'flwr-run-resume.log'}")
        outcome["resume_s"] = round(time.monotonic() - restarted, 1)
        final = load_checkpoint(run_dir / "checkpoints" / "global.pt")
        outcome["final_round"] = int(final.meta["round"])
        outcome["per_round"] = [
            {k: r.get(k) for k in ("round", "train_replies", "train_failures", "eval_replies", "eval_failures", "heldout_wer")}
            for r in _records(run_dir)
        ]
        outcome["resumed"] = "resuming run" in (root / "flwr-run-resume.log").read_text()
    finally:
        for proc in runs:
            if proc.poll() is None:
                stop_tree(proc, 5.0)
        for supernode in nodes:
            stop_supernode(supernode)
        stop_process(superlink)
    outcome["seconds"] = round(time.monotonic() - start, 1)
    write_text_atomic(root / "faults.json", json.dumps(outcome, indent=1) + "\n")
    return outcome


def main(*, workdir: Path, bench_id: str, as_json: bool) -> None:
    """Progress to stderr; stdout carries the outcome (JSON with ``as_json``, else one line per round)."""
    with contextlib.redirect_stdout(sys.stderr), sigterm_as_interrupt():  # `kill` stops the deployment too
        outcome = run_faults(workdir, bench_id=bench_id)
    if as_json:
        print(json.dumps(outcome))
        return
    for r in outcome["per_round"]:
        print(
            f"round {r['round']}: train {r['train_replies']} ok / {r['train_failures']} failed, evaluate "
            f"{r['eval_replies']} ok / {r['eval_failures']} failed, held-out WER {r['heldout_wer']}"
        )
    print(
        f"SuperLink killed after round 3 (committed: round {outcome['committed_round_at_kill']}); resumed: "
        f"{outcome['resumed']}; final round {outcome['final_round']}; {outcome['seconds']} s in all"
    )
