"""Power-of-Choice device selection (``strategy.selection = "power-of-choice"``, server/selection.py).

Fast tests drive :class:`PowerOfChoice` around Flower's FedAvg over the in-process harness, with devices built
here (behind the privacy audit) that report chosen losses; one test runs a real round with our ClientApp and
checks each device's answer against the loss computed on the device's own data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import strategy as flwr_strategy

from client import client_app
from client.data import device_data
from client.train import training_loss
from server.exchange import InvalidReply, validate_reply
from server.selection import PowerOfChoice
from server.workflow import run_federation
from shared.config import ConfigError, RunConfig, StrategyConfig
from shared.fairness.protocol import LOSS_QUERY
from shared.models.checkpoint import load_checkpoint
from shared.privacy.audit import audit_mod
from simulations.harness import InProcessGrid
from tests.conftest import TINY_RUN, TinyWorkdir, needs_espeak

pytestmark = pytest.mark.usefixtures("task_identity")

# Device (node id) -> the loss it reports: node 6 is served worst, then 3, 8, 1, ...
LOSSES = {1: 2.0, 2: 0.5, 3: 4.0, 4: 0.1, 5: 1.0, 6: 9.0, 7: 0.3, 8: 3.0}
ARRAYS = ArrayRecord({"w": Array(np.zeros(3, np.float32))})


def _devices() -> ClientApp:
    """Devices that answer the loss query with their entry of ``LOSSES`` and train by sending the model back."""
    app = ClientApp(mods=[audit_mod])

    @app.query("loss")
    def loss(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict({"metrics": MetricRecord({"train-loss": LOSSES[context.node_id], "num-examples": 5})}), reply_to=msg
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"train-loss": LOSSES[context.node_id], "num-examples": 5})
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)

    return app


class SilentGrid(InProcessGrid):
    """The harness's grid over :func:`_devices`; the devices in ``silent`` do not answer loss queries."""

    def __init__(self, silent: frozenset[int] = frozenset()) -> None:
        super().__init__(_devices(), {node: RecordDict() for node in LOSSES}, {})
        self.silent = silent

    def answers(self, msg: Message) -> bool:
        return not (msg.metadata.message_type == LOSS_QUERY and msg.metadata.dst_node_id in self.silent)

    def asked(self) -> list[int]:
        return [m.metadata.dst_node_id for m, _ in self.exchanges if m.metadata.message_type == LOSS_QUERY]


def _selection(candidates: int, seed: int = 0) -> PowerOfChoice:
    """FedAvg training 2 of the 8 devices a round (a quarter), with Power-of-Choice among ``candidates``."""
    fedavg = flwr_strategy.FedAvg(fraction_train=0.25, min_train_nodes=2, min_available_nodes=2)
    return PowerOfChoice(fedavg, StrategyConfig(selection="power-of-choice", candidates=candidates), seed=seed)


def test_the_candidates_with_the_highest_loss_train() -> None:
    grid = SilentGrid()
    selection = _selection(candidates=4)
    messages = selection.configure_train(1, ARRAYS, ConfigRecord(), grid)
    asked = grid.asked()
    assert len(asked) == len(set(asked)) == 4  # the candidates: 4 distinct devices drawn from 8
    top = sorted(asked, key=lambda node: -LOSSES[node])[:2]
    assert [m.metadata.dst_node_id for m in messages] == top
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    fields = selection.round_fields(1)
    assert fields["selection_candidates"] == 4 and fields["selection_answered"] == 4
    assert fields["selected_loss_mean"] == pytest.approx(np.mean([LOSSES[n] for n in top]))
    assert fields["selection_loss_mean"] == pytest.approx(np.mean([LOSSES[n] for n in asked]))
    # The draw is seeded by train.seed and the round: the same round draws the same candidates again.
    again = SilentGrid()
    _selection(candidates=4).configure_train(1, ARRAYS, ConfigRecord(), again)
    assert again.asked() == asked


def test_every_device_is_a_candidate_by_default_and_the_worst_served_train() -> None:
    grid = SilentGrid()
    messages = _selection(candidates=0).configure_train(1, ARRAYS, ConfigRecord(), grid)
    assert sorted(grid.asked()) == sorted(LOSSES)
    assert [m.metadata.dst_node_id for m in messages] == [6, 3]


def test_devices_that_do_not_answer_leave_their_places_to_the_strategys_sample() -> None:
    grid = SilentGrid(silent=frozenset(LOSSES) - {4})  # only device 4, the one served best, answers
    selection = _selection(candidates=0)
    nodes = [m.metadata.dst_node_id for m in selection.configure_train(1, ARRAYS, ConfigRecord(), grid)]
    assert nodes[0] == 4 and len(nodes) == len(set(nodes)) == 2 and set(nodes) <= set(LOSSES)
    assert selection.round_fields(1)["selection_answered"] == 1


def _loss_reply(metrics: MetricRecord | None) -> tuple[Message, Message]:
    request = Message(RecordDict({"arrays": ARRAYS, "config": ConfigRecord({"server-round": 1})}), 3, LOSS_QUERY)
    content = RecordDict({} if metrics is None else {"metrics": metrics})
    return Message(content, reply_to=request), request


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        (MetricRecord({"train-loss": -1.0, "num-examples": 5}), "train-loss=-1.0"),
        (MetricRecord({"num-examples": 5}), "train-loss=None"),
        (None, "query.loss reply without its 'metrics'"),
        (MetricRecord({"train-loss": float("nan"), "num-examples": 5}), "outside the allowlist"),
    ],
)
def test_the_server_rejects_a_malformed_loss_reply(metrics: MetricRecord | None, reason: str) -> None:
    reply, request = _loss_reply(metrics)
    with pytest.raises(InvalidReply, match=reason.replace("(", r"\(")):
        validate_reply(reply, request, StrategyConfig())
    validate_reply(*_loss_reply(MetricRecord({"train-loss": 2.5, "num-examples": 5})), StrategyConfig())


@pytest.mark.parametrize(
    ("flat", "named"),
    [
        ({"strategy.selection": "loss"}, "strategy.selection must be one of uniform, power-of-choice, got 'loss'"),
        ({"strategy.candidates": -2}, "strategy.candidates must be >= 0"),
        ({"strategy.selection": "power-of-choice", "dp.enabled": True}, "lies outside DP-SGD's guarantee"),
        ({"strategy.selection": "power-of-choice", "strategy.secure-aggregation": True}, "keeps to sums"),
    ],
)
def test_config_refuses_what_power_of_choice_cannot_do(flat: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        RunConfig.from_flat({**TINY_RUN, **flat})


@needs_espeak
def test_a_round_trains_the_devices_our_client_app_reports_worst_served(tmp_path: Path, tiny_workdir: TinyWorkdir) -> None:
    cfg = RunConfig.from_flat(
        {
            **TINY_RUN,
            "workdir": str(tiny_workdir(tmp_path)),
            "run-id": "power-of-choice",
            "num-server-rounds": 1,
            "strategy.fraction-train": 0.5,
            "strategy.min-train-nodes": 2,
            "strategy.selection": "power-of-choice",
        }
    )
    grid = InProcessGrid(client_app.app, 4, cfg.to_flat(), on_wire=True)
    run_dir = run_federation(grid, cfg)
    initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
    reported = {
        msg.metadata.dst_node_id: float(reply.content["metrics"]["train-loss"])
        for msg, reply in grid.exchanges
        if msg.metadata.message_type == LOSS_QUERY
    }
    assert sorted(reported) == [1, 2, 3, 4]
    for node, loss in reported.items():  # each device's own loss of the global model on its training utterances
        expected, utterances = training_loss(cfg, initial, device_data(cfg, node - 1))
        assert loss == pytest.approx(expected, rel=1e-6) and utterances > 0
    trained = sorted(msg.metadata.dst_node_id for msg, _ in grid.exchanges if msg.metadata.message_type == MessageType.TRAIN)
    assert trained == sorted(sorted(reported, key=lambda n: -reported[n])[:2])
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert record["train_replies"] == 2 and record["selection_answered"] == 4
    assert record["selected_loss_mean"] > record["selection_loss_mean"]
