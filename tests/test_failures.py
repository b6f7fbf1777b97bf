"""Device failures: a device that raises, or drops out mid-round, does not fail the round when enough others
answer; the failure is logged and counted. With fewer than ``strategy.min-train-nodes`` answers the round keeps
the previous global model and says so.

The slow test runs Flower's real simulation engine (Ray, ``flwr.simulation.run_simulation``) in a subprocess
with our ServerApp workflow and our device functions, wrapped so that one device raises and another sleeps past
``strategy.timeout`` in round 1. The fast test drives ``run_federation`` with a scripted grid (no Ray).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from server.workflow import run_federation
from shared.config import RunConfig
from shared.models.checkpoint import load_checkpoint
from tests.conftest import TINY_RUN, TinyWorkdir, ScriptedGrid, needs_espeak, run_marked

pytestmark = pytest.mark.usefixtures("task_identity")

FAULTY, DROPOUT = 1, 2  # partition ids: raises in every train and evaluate; silent past the timeout in round 1
TIMEOUT = 20.0  # strategy.timeout (s): a normal tiny-model device answers well within it on 2 loaded cores


# -- the simulation that runs in the subprocess -------------------------------------------------------------


def _device_app(flat: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Our ClientApp's train/evaluate, with two misbehaving devices, and a ``query`` that warms a device up.
    ``run_simulation`` (unlike ``flwr run``) gives devices an empty run config: they get ``flat``."""
    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from client.client_app import evaluate as device_evaluate
    from client.client_app import train as device_train
    from client.data import node_data

    app = ClientApp()

    def with_config(context: Context) -> Context:  # Flower forbids changing a Context's run_config in place
        return Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config=dict(flat),
        )

    @app.query()
    def warm_up(msg: Message, context: Context) -> Message:
        node_data(RunConfig.from_flat(flat), context.node_config)  # load the device's data once (cached)
        return Message(RecordDict(), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == FAULTY:
            raise RuntimeError("simulated device fault")
        if partition == DROPOUT and int(msg.content["config"]["server-round"]) == 1:
            time.sleep(TIMEOUT + 5)  # drops out mid-round: its reply comes after the server stopped waiting
        return device_train(msg, with_config(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == FAULTY:
            raise RuntimeError("simulated device fault")
        return device_evaluate(msg, with_config(context))

    return app


def simulate_with_failures(flat: dict[str, Any]) -> None:
    from flwr.app import Message, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from shared.data.prepare import prepare

    cfg = RunConfig.from_flat(flat)
    prepare(cfg, progress=False)  # before the run, as `chorus simulate` does
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:  # type: ignore[no-untyped-def]
        # Ray starts its workers lazily: on a loaded 2-core machine a cold device can take longer than the short
        # strategy.timeout of this test. Bring every device up first (no timeout), then run the federation.
        while len(nodes := list(grid.get_node_ids())) < 4:
            time.sleep(0.5)
        warm = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
        assert len(list(grid.send_and_receive(warm, timeout=300))) == 4, "devices did not come up"
        run_federation(grid, cfg)

    run_simulation(
        server_app=server_app,
        client_app=_device_app(flat),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )  # 2 workers: one sleeps through round 1


# -- tests --------------------------------------------------------------------------------------------------


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)  # Ray starts slowly on 2 busy cores
@needs_espeak
def test_faulty_and_dropped_devices_in_the_ray_simulation(tmp_path: Path, tiny_workdir: TinyWorkdir) -> None:
    flat = {
        **TINY_RUN,
        "num-server-rounds": 2,
        "workdir": str(tmp_path),
        "run-id": "faults",
        "strategy.min-train-nodes": 2,
        "strategy.min-evaluate-nodes": 2,
        "strategy.min-available-nodes": 4,
        "strategy.timeout": TIMEOUT,
    }
    tiny_workdir(tmp_path, flat)
    code = f"from tests.test_failures import simulate_with_failures; simulate_with_failures({flat!r})"
    returncode, output, left = run_marked(code, name="failures", env={"FLWR_HOME": str(tmp_path / ".flwr")})
    assert returncode == 0, output[-5000:]
    assert not left, f"processes of the simulation survived it: {left}"

    run_dir = tmp_path / "runs" / "faults"
    records = _records(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    one, two = records[1], records[2]
    # Round 1: the faulty device raised, the dropped one never answered in time; the other two were aggregated.
    assert (one["train_replies"], one["train_failures"], one["aggregated"]) == (2, 2, True), one
    # Round 2: the dropped device is back (its late round-1 reply was ignored); only the faulty one fails.
    assert (two["train_replies"], two["train_failures"], two["aggregated"]) == (3, 1, True), two
    for r in (one, two):
        assert r["train_loss"] > 0 and r["heldout_words"] > 0
        assert r["eval_failures"] >= 1 and r["eval_replies"] + r["eval_failures"] == 4, r
        assert r["device_words"] > 0
    initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
    final = load_checkpoint(run_dir / "checkpoints" / "global.pt")
    assert final.meta["round"] == 2
    assert any(not torch.equal(initial[k], final.state_dict[k]) for k in initial), "the survivors were aggregated"
    assert (run_dir / "report.md").exists() and "| 2 |" in (run_dir / "report.md").read_text()
    # Logged: the device's error and the device that went silent, each with its round.
    assert "round 1 train: device" in output and "simulated device fault" in output
    assert "round 1 train: no reply within strategy.timeout from device(s)" in output
    assert "devices 2 ok / 2 failed" in output


class FlakyGrid(ScriptedGrid):
    """Node 1 raises and node 2 is silent in round 1 only; everything answers afterwards."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        server_round = int(messages[0].content["config"]["server-round"]) if messages else 0
        self.failing, self.silent = ({1}, {2}) if server_round == 1 else (set(), set())
        return super().send_and_receive(messages, timeout=timeout)


@needs_espeak
def test_too_few_answers_keep_the_global_model(tmp_path: Path, tiny_workdir: TinyWorkdir) -> None:
    flat = {
        **TINY_RUN,
        "num-server-rounds": 1,
        "workdir": str(tmp_path),
        "run-id": "few",
        "strategy.name": "fedadam",
        "strategy.min-train-nodes": 3,
    }
    tiny_workdir(tmp_path, flat)
    run_dir = run_federation(FlakyGrid(), RunConfig.from_flat(flat))
    zero, one = _records(run_dir)
    assert (one["aggregated"], one["train_replies"], one["train_failures"], one["train_loss"]) == (False, 2, 2, None)
    assert one["heldout_wer"] == zero["heldout_wer"]  # round 1 scored the unchanged model
    initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
    kept = load_checkpoint(run_dir / "checkpoints" / "global.pt")
    assert kept.meta["round"] == 1 and all(torch.equal(initial[k], kept.state_dict[k]) for k in initial)
    assert kept.meta["strategy"]["state"] == {}  # Adam's moments never saw the partial round

    # The next round, with every device answering, aggregates as usual.
    run_federation(FlakyGrid(), RunConfig.from_flat({**flat, "num-server-rounds": 2}), resume=True)
    two = _records(run_dir)[2]
    assert (two["aggregated"], two["train_replies"], two["train_failures"]) == (True, 4, 0)
    after = load_checkpoint(run_dir / "checkpoints" / "global.pt")
    assert set(after.meta["strategy"]["state"]) == {"m_t", "v_t"}
    assert "| 1 |" in (run_dir / "report.md").read_text()
