"""The server trusts no device: every reply is validated before a strategy sees it (server/exchange.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from typer.testing import CliRunner

from server.exchange import InvalidReply, exchange, update_norm, validate_reply
from server.workflow import run_federation
from shared.config import ConfigError, RunConfig, StrategyConfig
from shared.models.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from simulations.cli import app
from tests.conftest import TINY_RUN, TinyWorkdir, needs_espeak
from tests.conftest import ScriptedGrid

pytestmark = pytest.mark.usefixtures("task_identity")

NAN_DEVICE, SCALED_DEVICE, LYING_DEVICE = 1, 2, 3


class AttackedGrid(ScriptedGrid):
    """Device 1 sends its update times NaN, device 2 its model times 1e6, device 3 a negative word count."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            node, content = reply.metadata.src_node_id, reply.content
            if "arrays" in content and node in (NAN_DEVICE, SCALED_DEVICE):
                factor = float("nan") if node == NAN_DEVICE else 1e6
                content["arrays"] = ArrayRecord({k: v * factor for k, v in content["arrays"].to_torch_state_dict().items()})
            elif "arrays" not in content and node == LYING_DEVICE:
                content["metrics"]["words"] = -10
        return replies


def _records(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@needs_espeak
def test_nan_and_scaled_updates_are_rejected_and_the_model_equals_a_run_without_them(
    tmp_path: Path, tiny_workdir: TinyWorkdir
) -> None:
    flat = {
        **TINY_RUN,
        "num-server-rounds": 2,
        "workdir": str(tmp_path),
        "model.init-checkpoint": "",
        "strategy.min-train-nodes": 2,
    }
    tiny_workdir(tmp_path, flat)
    attacked = run_federation(AttackedGrid(), RunConfig.from_flat({**flat, "run-id": "attacked"}))
    # The same devices' honest updates, with the two attackers absent (and device 3 evaluating honestly).
    absent = run_federation(ScriptedGrid(silent=(NAN_DEVICE, SCALED_DEVICE)), RunConfig.from_flat({**flat, "run-id": "absent"}))
    attacked_ckpt, absent_ckpt = (load_checkpoint(d / "checkpoints" / "global.pt") for d in (attacked, absent))
    for key, value in attacked_ckpt.state_dict.items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(value, absent_ckpt.state_dict[key], rtol=1e-6, atol=1e-7)
    for record in _records(attacked)[1:]:
        assert (record["aggregated"], record["train_replies"], record["rejected_updates"]) == (True, 2, 2), record
        assert (record["eval_replies"], record["rejected_evaluations"]) == (3, 1), record
    for record in _records(absent)[1:]:
        assert (record["train_replies"], record["train_failures"], record["rejected_updates"]) == (2, 2, 0)


# -- validate_reply, one rule at a time --------------------------------------------------------------------


def _train_pair(**metrics: object) -> tuple[Message, Message, ArrayRecord]:
    sent_arrays = ArrayRecord({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    request = Message(
        RecordDict({"arrays": sent_arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type="train"
    )
    reply_arrays = ArrayRecord({"w": torch.full((2, 3), 0.1), "b": torch.zeros(3)})
    reply = Message(
        RecordDict({"arrays": reply_arrays, "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.5, **metrics})}),
        reply_to=request,
    )
    return request, reply, sent_arrays


def test_a_well_formed_update_passes_and_its_norm_is_the_change() -> None:
    request, reply, sent = _train_pair()
    validate_reply(reply, request, StrategyConfig())
    assert update_norm(reply.content["arrays"], sent) == pytest.approx(0.1 * 6**0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c.__setitem__("arrays", ArrayRecord({"w": torch.zeros(2, 3)})), "missing"),
        (lambda c: c.__setitem__("arrays", ArrayRecord({"w": torch.zeros(3, 2), "b": torch.zeros(3)})), "global model"),
        (
            lambda c: c.__setitem__("arrays", ArrayRecord({"w": torch.full((2, 3), float("inf")), "b": torch.zeros(3)})),
            "not finite",
        ),
        (lambda c: c["metrics"].__setitem__("num-examples", 10**9), "strategy.max-examples"),
        (lambda c: c["metrics"].__setitem__("num-examples", 2.5), "whole number"),
        (lambda c: c["metrics"].__setitem__("speaker", 3), "allowlist"),
        (lambda c: c.__delitem__("arrays"), "without the model"),
    ],
)
def test_each_malformed_train_reply_is_rejected_with_its_reason(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    request, reply, _ = _train_pair()
    change(reply.content)
    with pytest.raises(InvalidReply, match=reason):
        validate_reply(reply, request, StrategyConfig())


class UnavailableGrid:
    """Flower's SuperLink answering for a device whose heartbeats stopped: an error reply ("Node Unavailable")
    from the SuperLink's own node id, to the message the device never took. The other device answers."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grid does when it sends
            if msg.metadata.dst_node_id == 7:
                reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink wrote it, not device 7
            else:
                reply = Message(
                    RecordDict({"metrics": MetricRecord({"word-errors": 1, "words": 4, "num-examples": 1, "wer": 0.25})}),
                    reply_to=msg,
                )
            replies.append(reply)
        return replies


def test_a_device_the_superlink_answers_for_counts_as_one_failure() -> None:
    """Seen in `chorus bench faults`: a killed device counted twice (an error reply and a missing one)."""
    messages = [
        Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in (7, 8)
    ]
    result = exchange(UnavailableGrid(), messages, phase="evaluate", strategy=StrategyConfig())  # type: ignore[arg-type]
    assert (len(result.ok), result.failed, result.rejected) == (1, 1, 0)


def test_a_non_finite_checkpoint_is_neither_written_nor_loaded(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat(TINY_RUN).model
    model = build_model(cfg)
    save_checkpoint(tmp_path / "ok.pt", model, cfg)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "bad.pt", model, cfg)
    assert not (tmp_path / "bad.pt").exists()
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    next(iter(payload["state_dict"].values())).fill_(float("inf"))
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="tampered.pt is unusable"):
        load_checkpoint(tmp_path / "tampered.pt")


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("model.name", "foo", "model.name='foo'"),
        ("strategy.name", "fedfoo", "strategy.name='fedfoo'"),
        ("strategy.update-norm-factor", -1.0, "strategy.update-norm-factor"),
    ],
)
def test_bad_config_values_fail_when_parsed_naming_the_key(key: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("'", "'")):
        RunConfig.from_flat({**TINY_RUN, key: value})


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--clients", "3", "--rounds", "1", "--set", "model.name=foo"],
        ["train", "--steps", "1", "--set", "strategy.name=fedfoo"],
        ["simulate", "--set", "strategy.max-examples=0"],
    ],
)
def test_the_cli_refuses_a_bad_config_in_one_line_before_starting_anything(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [*args, "--set", f"workdir={tmp_path}"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and args[-1].split("=")[0] in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing prepared, no SuperLink state, no run directory
