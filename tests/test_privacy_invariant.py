"""The privacy invariant: nothing but allowlisted arrays and metrics leaves a device.

1. A real federation (2 rounds, 4 devices, Flower's Ray simulation engine) with every device reply recorded as
   it leaves the device (a recording mod outermost, around our real ClientApp and its audit mod), serialized
   exactly as Flower puts it on the wire, then inspected here: record types, names and keys, arrays against
   the global model, and a scan for every transcript, utterance id, speaker id and speakers.tsv value.
2. Fast (no Ray): client handlers that try to send a transcript, token ids or a speaker id are stopped by the
   audit mod, and our real ClientApp routes its replies through it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]

import client.client_app as client_app
from client.train import LocalUpdate
from shared.config import RunConfig
from shared.models.checkpoint import initial_model
from shared.privacy.audit import ALLOWED_METRICS, audit_mod
from tests.conftest import TINY_RUN, TinyWorkdir, leaks, needs_espeak, sensitive_strings, with_run_config

TRAIN_METRICS = {"train-loss", "local-steps", "num-examples", "compute-cost", "skipped-utterances"}
DP_TRAIN_METRICS = {"epsilon", "local-steps", "num-examples"}  # DP-SGD: only what the guarantee covers
EVAL_METRICS = {"word-errors", "words", "num-examples", "wer"}
LOSS_METRICS = {"train-loss", "num-examples"}  # Power-of-Choice's loss query (strategy.selection)
TRANSCRIPT = "remind me to call doctor patel at noon"


# --- recording what leaves the devices ----------------------------------------------------------------------


class RecordReplies:
    """Client mod, outermost: writes each reply, serialized as Flower sends it, to ``out_dir`` (Ray runs the
    devices in other processes, so files are the channel back to the test)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = str(out_dir)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
        reply = call_next(msg, context)
        server_round = int(msg.content["config"]["server-round"])
        name = f"{msg.metadata.message_type}-r{server_round}-p{context.node_config['partition-id']}-{uuid4().hex[:8]}.pb"
        (Path(self.out_dir) / name).write_bytes(message_to_proto(reply).SerializeToString())
        return reply


def recorded_client_app(out_dir: Path, run_config: dict[str, bool | int | float | str]) -> ClientApp:
    """Our real ClientApp (with its own mods), inside an app whose only mod records the replies."""
    outer = ClientApp(mods=[RecordReplies(out_dir)])

    def forward(msg: Message, context: Context) -> Message:
        return client_app.app(msg, with_run_config(context, run_config))

    outer.train()(forward)
    outer.evaluate()(forward)
    outer.query("loss")(forward)
    return outer


def global_model_spec(cfg: RunConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    state = initial_model(cfg.model).state_dict()
    return {k: (str(v.numpy().dtype), tuple(v.shape)) for k, v in state.items()}


@pytest.mark.slow
@needs_espeak
@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_every_reply_of_a_simulation_is_allowlisted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_workdir: TinyWorkdir, dp: bool
) -> None:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from server.workflow import run_federation

    # Without DP the server also asks every device for its loss each round (Power-of-Choice; all four then train).
    selection = "uniform" if dp else "power-of-choice"
    cfg = RunConfig.from_flat(
        {
            **TINY_RUN,
            "num-server-rounds": 2,
            "workdir": str(tmp_path / "work"),
            "run-id": "privacy",
            "dp.enabled": dp,
            "strategy.selection": selection,
        }
    )
    tiny_workdir(cfg.workdir_path)
    sensitive = sensitive_strings(cfg)
    longest = max(sensitive, key=len)  # the scan itself finds a transcript in bytes, a short value in a key
    assert leaks(b"\x00" + longest.encode() + b"\x00", [], sensitive) == [longest]
    shortest = min(sensitive, key=len)
    assert leaks(b"", [shortest], sensitive) == [shortest]
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    replies_dir = tmp_path / "replies"
    replies_dir.mkdir()

    server_app = ServerApp()
    run_dirs: list[Path] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_dirs.append(run_federation(grid, cfg))

    run_simulation(
        server_app=server_app,
        client_app=recorded_client_app(replies_dir, cfg.to_flat()),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 1, "num_gpus": 0}},
    )

    assert run_dirs, "the ServerApp did not finish"
    run_dir = run_dirs[0]
    model = global_model_spec(cfg)
    assert all(dtype.startswith("float") for dtype, _ in model.values())
    seen = set()
    for path in sorted(replies_dir.iterdir()):
        kind, server_round, partition, _ = path.stem.split("-")
        seen.add((kind, server_round, partition))
        wire = path.read_bytes()
        reply = message_from_proto(ProtoMessage.FromString(wire))
        assert not reply.has_error(), f"{path.name}: {reply.error.reason}"
        content = reply.content
        expected_records = {"arrays", "metrics"} if kind == MessageType.TRAIN else {"metrics"}
        assert set(content.keys()) == expected_records, path.name
        names = list(content.keys())
        if kind == MessageType.TRAIN:
            arrays = content["arrays"]
            assert isinstance(arrays, ArrayRecord)
            assert {k: (a.dtype, tuple(a.shape)) for k, a in arrays.items()} == model, path.name
            assert all(np.isfinite(a.numpy()).all() for a in arrays.values()), path.name
            names += list(arrays.keys())
        metrics = content["metrics"]
        assert isinstance(metrics, MetricRecord)
        expected_metrics = {MessageType.TRAIN: DP_TRAIN_METRICS if dp else TRAIN_METRICS, "query.loss": LOSS_METRICS}
        assert set(metrics.keys()) == expected_metrics.get(kind, EVAL_METRICS), path.name
        assert set(metrics.keys()) <= ALLOWED_METRICS
        for key, value in metrics.items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key
        names += list(metrics.keys())
        assert not leaks(wire, names, sensitive), f"{path.name} carries {leaks(wire, names, sensitive)}"

    expected = {(MessageType.TRAIN, f"r{r}", f"p{p}") for r in (1, 2) for p in range(4)}
    expected |= {(MessageType.EVALUATE, f"r{r}", f"p{p}") for r in (0, 1, 2) for p in range(4)}
    if not dp:
        expected |= {("query.loss", f"r{r}", f"p{p}") for r in (1, 2) for p in range(4)}
    # train from every device in both rounds (asked for its loss first), evaluate also before round 1, nothing else
    assert seen == expected
    assert len(list(replies_dir.iterdir())) == len(expected)
    # The replies recorded are the ones the server got and used (Flower may still replace a reply after the
    # ClientApp, e.g. with an error): every device answered and counted in both rounds.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert (r["train_replies"], r["train_failures"], r["eval_replies"], r["eval_failures"]) == (4, 0, 4, 0), r
        # the server logs the devices' mean epsilon under DP, and their training loss only without it
        assert (r["train_epsilon"] is not None, r["train_loss"] is not None) == (dp, not dp), r
    if dp:  # every device's ledger kept adding up across the rounds it trained in
        assert 0.0 < records[1]["train_epsilon"] < records[2]["train_epsilon"] <= cfg.dp.epsilon_budget


# --- a leaky device is stopped on the device -----------------------------------------------------------------

GLOBAL = {"encoder.w": torch.randn(4, 3), "joiner.b": torch.randn(5)}
TOKEN_IDS = np.array([17, 4, 92, 33, 8], dtype=np.int64)


def server_message(message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    content = RecordDict({"arrays": ArrayRecord(GLOBAL), "config": ConfigRecord({"server-round": 1})})
    return Message(metadata=metadata, content=content)


def device_context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


LEAKY_REPLIES = {
    # A MetricRecord cannot hold a string, so the transcript goes in a ConfigRecord beside the metrics.
    "transcript in a config record": (
        lambda: {
            "arrays": ArrayRecord(GLOBAL),
            "metrics": MetricRecord({"train-loss": 1.0}),
            "metrics-extra": ConfigRecord({"hypothesis": TRANSCRIPT}),
        },
        "config record 'metrics-extra'",
    ),
    "token ids as an extra int64 array record": (
        lambda: {"arrays": ArrayRecord(GLOBAL), "metrics": MetricRecord({"train-loss": 1.0}), "tokens": ArrayRecord([TOKEN_IDS])},
        "array record 'tokens' is not on the allowlist",
    ),
    "token ids beside the model weights": (
        lambda: {
            "arrays": ArrayRecord({**GLOBAL, "token-ids": torch.from_numpy(TOKEN_IDS)}),
            "metrics": MetricRecord({"train-loss": 1.0}),
        },
        "extra ['token-ids']",
    ),
    "token ids as a metric list": (
        lambda: {"arrays": ArrayRecord(GLOBAL), "metrics": MetricRecord({"train-loss": TOKEN_IDS.tolist()})},
        "metric 'train-loss' is a list",
    ),
    "a speaker id metric": (
        lambda: {"arrays": ArrayRecord(GLOBAL), "metrics": MetricRecord({"train-loss": 1.0, "speaker-id": 3})},
        "metric 'speaker-id' is not on the allowlist",
    ),
    "a transcript as a metric key": (
        lambda: {"arrays": ArrayRecord(GLOBAL), "metrics": MetricRecord({TRANSCRIPT: 1.0})},
        f"metric <redacted name of {len(TRANSCRIPT)} characters> is not on the allowlist",
    ),
}


@pytest.mark.parametrize("case", sorted(LEAKY_REPLIES))
def test_audit_mod_stops_a_leaky_handler(case: str) -> None:
    make_content, culprit = LEAKY_REPLIES[case]
    app = ClientApp(mods=[audit_mod])

    @app.train()
    def leaky_train(msg: Message, context: Context) -> Message:
        return Message(RecordDict(make_content()), reply_to=msg)

    out = app(server_message(), device_context())
    assert out.has_error() and not out.has_content()
    assert culprit in out.error.reason
    wire = message_to_proto(out).SerializeToString()
    assert TRANSCRIPT.encode() not in wire and TOKEN_IDS.tobytes() not in wire


def test_a_transcript_cannot_even_enter_a_metric_record() -> None:
    with pytest.raises(TypeError):
        MetricRecord({"hypothesis": TRANSCRIPT})  # type: ignore[dict-item]


def _stub_device(monkeypatch: pytest.MonkeyPatch, state_dict: dict[str, torch.Tensor]) -> None:
    """Our real train handler without data: _setup and fine_tune replaced, everything else as deployed."""

    def setup(msg: Message, context: Context):  # noqa: ANN202
        return RunConfig.from_flat({}), msg.content["arrays"].to_torch_state_dict(), None, 0, 1

    def fine_tune(cfg, state, data, *, server_round, partition_id, penalty, reweighter) -> LocalUpdate:  # noqa: ANN001
        assert penalty is None and reweighter is None  # a plain train message: no EWC, no ARW
        return LocalUpdate(state_dict=state_dict, loss=1.25, steps=2, num_examples=5, compute_cost=1.0, skipped=0)

    monkeypatch.setattr(client_app, "_setup", setup)
    monkeypatch.setattr(client_app, "fine_tune", fine_tune)


def test_our_client_app_replies_through_the_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub_device(monkeypatch, {k: v + 0.5 for k, v in GLOBAL.items()})
    ok = client_app.app(server_message(), device_context())
    assert not ok.has_error() and set(ok.content.keys()) == {"arrays", "metrics"}

    _stub_device(monkeypatch, {**GLOBAL, "token-ids": torch.from_numpy(TOKEN_IDS)})
    refused = client_app.app(server_message(), device_context())
    assert refused.has_error() and not refused.has_content()
    assert "privacy audit refused the device's train reply" in refused.error.reason
    assert "extra ['token-ids']" in refused.error.reason
