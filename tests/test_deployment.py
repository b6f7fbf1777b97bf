"""End to end on real processes: a TLS SuperLink with SuperNode authentication, two devices with their own
data directories, a round through `flwr run`; and a device whose key was never registered is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
from shared.config import RunConfig
from shared.models.checkpoint import load_checkpoint
from simulations.bench_faults import device_dirs
from simulations.simulate import free_port, stage_app, toml_value
from tests.conftest import REPO_ROOT, TINY_RUN, TinyWorkdir, needs_espeak

pytestmark = [pytest.mark.slow, needs_espeak]

# 2 public + 2 held-out speakers on the server, 2 federated speakers, each on its own device.
DEPLOY_RUN = {
    **TINY_RUN,
    "synth.speakers": 6,
    "num-server-rounds": 1,
    "run-id": "deploy",
    "strategy.min-train-nodes": 2,
    "strategy.min-evaluate-nodes": 2,
    "strategy.min-available-nodes": 2,
    "strategy.timeout": 180.0,
}


def test_tls_superlink_two_authenticated_devices(tmp_path: Path, tiny_workdir: TinyWorkdir) -> None:
    workdir = tiny_workdir(tmp_path / "server", DEPLOY_RUN)
    cfg = RunConfig.from_flat({**DEPLOY_RUN, "workdir": str(workdir)})
    devices = device_dirs(cfg, tmp_path)
    assert len(devices) == 2
    certs = make_dev_certificates(tmp_path / "pki")
    keys = make_node_keys(tmp_path / "pki", 3)  # the third is never registered
    port = free_port()
    overrides = tmp_path / "run_config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flat().items()))

    link = start_superlink(certs=tmp_path / "pki", port=port, state_dir=tmp_path / "superlink")
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        wait_until_listening(link, "127.0.0.1", port, timeout=60)
        flwr_home = write_flower_config(tmp_path / "flwr", address=f"127.0.0.1:{port}", root_cert=certs.ca_cert)
        node_ids = register_supernodes([k.public_key for k in keys[:2]], flwr_home=flwr_home)
        assert len(set(node_ids)) == 2
        for index, (data, artifacts) in enumerate(devices + devices[:1]):
            nodes.append(
                start_supernode(
                    superlink=f"127.0.0.1:{port}",
                    data_dir=data,
                    artifacts_dir=artifacts,
                    root_cert=certs.ca_cert,
                    auth_key=keys[index].private_key,
                    port=free_port(),
                    state_dir=tmp_path / f"supernode-{index}",
                )
            )
        intruder = nodes[2]

        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("flwr")),
                "run",
                str(stage_app(tmp_path / "app")),
                CONNECTION_NAME,
                "--run-config",
                str(overrides),
                "--stream",
            ],
            env=flower_env(flwr_home),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=420,
        )
        logs = {p.name: (p / "supernode.log").read_text() for p in sorted(tmp_path.glob("supernode-*"))}
        assert result.returncode == 0, (
            result.stdout[-3000:],
            result.stderr[-3000:],
            (tmp_path / "superlink" / "superlink.log").read_text()[-3000:],
            logs,
        )

        run_dir = workdir / "runs" / "deploy"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1], result.stdout[-3000:]
        for record in records[1:]:
            assert record["train_replies"] == 2 and record["train_failures"] == 0
            assert record["eval_replies"] == 2 and record["device_words"] > 0
        initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
        final = load_checkpoint(run_dir / "checkpoints" / "global.pt")
        assert final.meta["round"] == 1
        changed = [k for k in initial if not torch.equal(initial[k], final.state_dict[k])]
        assert len(changed) > len(initial) // 2, "two devices' updates should move the global model"

        # The unregistered device was refused: it logs Flower's exit code 305 and exits with status 1.
        assert intruder.wait(timeout=60) == 1
        refused = (tmp_path / "supernode-2" / "supernode.log").read_text()
        assert "Exit Code: 305" in refused and "Failed to activate SuperNode" in refused
        assert "No SuperNode found with the given public key" in (tmp_path / "superlink" / "superlink.log").read_text()
    finally:
        for node in nodes:
            stop_supernode(node)
        stop_process(link)
