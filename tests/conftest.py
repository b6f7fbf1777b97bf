"""Shared fixtures: locations of the real corpora beside the checkout, a tiny run config, the server's task
identity, and a federation of scripted devices."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from simulations.harness import InProcessGrid

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def real_corpus(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real corpus {path} is absent (it ships only beside the developers' checkout)")
    return path


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (sudo apt-get install espeak-ng)")

def with_run_config(context: Context, run_config: dict[str, bool | int | float | str]) -> Context:
    """The device's context with the run's config added. run_simulation's Python API gives devices no run config
    (`flwr run` would); a copy, since Flower refuses a device context whose run_config changed (and turns the
    reply into an error)."""
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config={**context.run_config, **run_config})


# A federation small enough for CI: 4 devices, 2 public and 2 held-out speakers, a 2-layer model.
TINY_RUN = {
    "synth.speakers": 8, "synth.utterances": 6, "synth.seed": 3,
    "split.public-speakers": 2, "split.heldout-speakers": 2,
    "model.d-model": 64, "model.num-layers": 2, "model.num-heads": 2, "model.ffn-dim": 128,
    "model.vocab-size": 128, "model.init-checkpoint": "",
    "train.local-steps": 2, "train.batch-frames": 3000,
    "eval.heldout-utterances": 6,
    "strategy.min-train-nodes": 4, "strategy.min-evaluate-nodes": 4, "strategy.min-available-nodes": 4,
}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # Tests run many small ops: one thread is faster than two fighting over a 2-core CI machine.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Play the server: outside a Flower process nobody sets the task identity every new instruction records."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class ScriptedGrid(InProcessGrid):
    """The harness's Grid over scripted devices: training adds a fixed pseudo-random step to the global model
    (seeded by round and node), so a run is exactly reproducible; evaluation reports fixed counts. ``failing``
    devices reply with an error, ``silent`` ones never reply; ``crash_at`` raises in that round, as a killed
    server would."""

    def __init__(self, nodes: int = 4, *, failing: Iterable[int] = (), silent: Iterable[int] = (),
                 crash_at: int | None = None) -> None:
        super().__init__(self._device, nodes, {})
        self.failing, self.silent, self.crash_at = set(failing), set(silent), crash_at

    def answers(self, msg: Message) -> bool:
        if int(msg.content["config"]["server-round"]) == self.crash_at:
            raise KeyboardInterrupt(f"server killed in round {self.crash_at}")
        return msg.metadata.dst_node_id not in self.silent

    def _device(self, msg: Message, context: Context) -> Message:
        node, server_round = context.node_id, int(msg.content["config"]["server-round"])
        if node in self.failing:
            return Message(Error(code=0, reason="scripted device fault"), reply_to=msg)
        if msg.metadata.message_type == "train":
            step = torch.Generator().manual_seed(1000 * server_round + node)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=step)
                     for k, v in msg.content["arrays"].to_torch_state_dict().items()}
            return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(
                {"train-loss": 1.0 / server_round, "num-examples": 2 + node})}), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord(
            {"word-errors": node, "words": 10, "num-examples": 3, "wer": node / 10})}), reply_to=msg)
