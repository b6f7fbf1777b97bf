"""SecAgg+ (``strategy.secure-aggregation``): the server gets the FedAvg aggregate of the devices' updates, up to
quantization, and never one update; a device that drops out after sharing its keys does not stop the round.

Fast tests run Flower's ``SecAggPlusWorkflow`` (server/secagg.py) against our real ClientApp (``secaggplus_mod``,
the audit, the real local training) in this process, through a Grid that calls each device with its own
persistent Context, as a SuperNode does. The slow test runs the same through Flower's Ray simulation engine.

The tolerance, from the quantization (``server/secagg.py``): each device rounds its weighted parameters to a grid
of step ``quantization_step``; the mean divides the sum of N such roundings by the sum of the quantized weights
num-examples / max-weight, so every parameter lies within N x step / sum(weights) of the float FedAvg.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import client.client_app as client_app
from client.data import node_data
from client.train import fine_tune
from server.secagg import quantization_step, secure_train_round
from server.workflow import make_strategy
from shared.config import ConfigError, RunConfig
from shared.data.prepare import prepare
from shared.models.checkpoint import initial_model, load_checkpoint
from shared.privacy.audit import PrivacyViolation
from shared.privacy.secagg_audit import SecAggRequest, audit_secagg_reply
from simulations import harness
from tests.conftest import TINY_RUN, needs_espeak, with_run_config
from tests.test_privacy_invariant import leaks, sensitive_strings
from tests.test_resume import run_marked

pytestmark = pytest.mark.usefixtures("task_identity")

DEVICES = 4


class InProcessGrid(harness.InProcessGrid):
    """The harness's Grid over our real ClientApp, on the wire, for ``DEVICES`` devices. A device in ``drop_at``
    (node id -> SecAgg+ stage) stops answering from that stage on, as a device that lost its link."""

    def __init__(self, cfg: RunConfig, drop_at: dict[int, str] | None = None) -> None:
        super().__init__(client_app.app, DEVICES, cfg.to_flat(), on_wire=True)
        self.drop_at = drop_at or {}
        self.dropped: set[int] = set()

    @staticmethod
    def stage(msg: Message) -> str:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        return str(configs[Key.STAGE]) if configs is not None else "plain"

    def answers(self, msg: Message) -> bool:
        node = msg.metadata.dst_node_id
        if self.drop_at.get(node) == self.stage(msg):
            self.dropped.add(node)
        return node not in self.dropped

    @property
    def replies(self) -> list[tuple[str, Message]]:
        """(stage, reply) as each left its device."""
        return [(self.stage(msg), reply) for msg, reply in self.exchanges]


def _cfg(workdir: Path, **extra: Any) -> RunConfig:
    return RunConfig.from_flat({**TINY_RUN, "workdir": str(workdir), **extra})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secagg")
    prepare(_cfg(path), progress=False)
    return path


def _plain_fedavg(cfg: RunConfig, arrays: ArrayRecord,
                  nodes: Iterable[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The float FedAvg of the same devices' round-1 updates, trained here by the same device code, and their
    weights (training utterances)."""
    updates, weights = [], []
    for node in nodes:
        update = fine_tune(cfg, arrays.to_torch_state_dict(), node_data(cfg, {"partition-id": node - 1,
                                                                                "num-partitions": DEVICES}),
                           server_round=1, partition_id=node - 1)
        updates.append(update.state_dict)
        weights.append(update.num_examples)
    mean = {k: sum(w * u[k].double() for w, u in zip(weights, updates)) / sum(weights) for k in updates[0]}
    return mean, weights


def _tolerance(cfg: RunConfig, weights: list[int]) -> float:
    """The quantization bound (module docstring), plus float32 rounding of the stored model."""
    return len(weights) * quantization_step(cfg.secagg) / sum(w / cfg.secagg.max_weight for w in weights) + 1e-6


def _max_error(secure: ArrayRecord, plain: dict[str, torch.Tensor]) -> float:
    got = secure.to_torch_state_dict()
    return max(float((got[k].double() - plain[k]).abs().max()) for k in plain)


@needs_espeak
@pytest.mark.parametrize("drop", [None, Stage.COLLECT_MASKED_VECTORS], ids=["all-answer", "one-drops-out"])
def test_secure_aggregate_equals_plain_fedavg(workdir: Path, drop: str | None) -> None:
    cfg = _cfg(workdir, **{"strategy.secure-aggregation": True})
    torch.manual_seed(0)
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    grid = InProcessGrid(cfg, drop_at={2: drop} if drop else None)
    result = secure_train_round(grid, make_strategy(cfg.strategy), 1, arrays, cfg.secagg, timeout=60.0,
                                min_contributors=2)
    survivors = [n for n in grid.get_node_ids() if n not in grid.dropped]
    assert (result.contributed, result.failed) == (len(survivors), DEVICES - len(survivors))
    assert result.arrays is not None and result.metrics is not None

    plain, weights = _plain_fedavg(cfg, arrays, survivors)
    sent = [int(reply.content["fitres.num_examples"]["num_examples"]) for stage, reply in grid.replies
            if stage == Stage.COLLECT_MASKED_VECTORS]
    assert sent == weights and max(weights) <= cfg.secagg.max_weight
    largest = max(float(v.abs().max()) for v in plain.values())
    assert largest < cfg.secagg.clipping_range  # nothing was clipped by the quantizer
    error, bound = _max_error(result.arrays, plain), _tolerance(cfg, weights)
    print(f"SecAgg+ vs FedAvg ({len(survivors)} devices): max |difference| {error:.3g}, bound {bound:.3g}")
    assert error <= bound
    # ... and it is an aggregate of trained updates, not the global model sent back
    assert max(float((plain[k] - arrays.to_torch_state_dict()[k].double()).abs().max()) for k in plain) > 10 * bound

    # What left the devices: the protocol's records only; no plain update, no float array, no named array, and
    # no transcript, utterance id, speaker id or speakers.tsv value anywhere in the serialized replies.
    stages = [stage for stage, _ in grid.replies]
    assert stages.count(Stage.SETUP) == DEVICES and stages.count(Stage.UNMASK) == len(survivors)
    sensitive = sensitive_strings(cfg)
    for stage, reply in grid.replies:
        assert not reply.has_error(), (stage, reply.error.reason)
        assert all(len(record) == 0 for record in reply.content.array_records.values()), stage
        assert "arrays" not in reply.content
        names = [n for name, record in reply.content.items() for n in (name, *record.keys())]
        wire = message_to_proto(reply).SerializeToString()
        assert not leaks(wire, names, sensitive), (stage, leaks(wire, names, sensitive))


@needs_espeak
def test_too_many_dropouts_keep_the_global_model(workdir: Path) -> None:
    """Below the reconstruction threshold the masks cannot be removed: nothing is aggregated."""
    cfg = _cfg(workdir, **{"strategy.secure-aggregation": True, "secagg.reconstruction-threshold": 1.0})
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    grid = InProcessGrid(cfg, drop_at={2: Stage.COLLECT_MASKED_VECTORS})
    result = secure_train_round(grid, make_strategy(cfg.strategy), 1, arrays, cfg.secagg, timeout=60.0,
                                min_contributors=2)
    assert (result.arrays, result.contributed, result.failed) == (None, 0, DEVICES)


@needs_espeak
def test_a_device_that_requires_secagg_refuses_a_plain_instruction(workdir: Path) -> None:
    cfg = _cfg(workdir, **{"strategy.secure-aggregation": True})
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    grid = InProcessGrid(cfg)
    strategy = make_strategy(RunConfig().strategy)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
    assert replies and all(r.has_error() and "SecureAggregationRequired" in r.error.reason for r in replies)


def test_config_refuses_what_secagg_cannot_do() -> None:
    with pytest.raises(ConfigError, match="central-dp"):
        RunConfig.from_flat({"strategy.secure-aggregation": True, "strategy.central-dp": "server"})
    with pytest.raises(ConfigError, match="fedmedian"):
        RunConfig.from_flat({"strategy.secure-aggregation": True, "strategy.name": "fedmedian"})
    with pytest.raises(ConfigError, match="reconstruction-threshold"):
        RunConfig.from_flat({"secagg.reconstruction-threshold": 0.0})


# --- the audit of SecAgg+ replies ---------------------------------------------------------------------------

def _collect_request() -> SecAggRequest:
    arrays = ArrayRecord({"w": torch.zeros(2, 3)})
    return SecAggRequest(Stage.COLLECT_MASKED_VECTORS, {Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}, arrays)


def _collect_reply(**override: Any) -> RecordDict:
    import numpy as np
    from flwr.common import ndarray_to_bytes

    masked = [ndarray_to_bytes(np.array([5], dtype=np.int64)), ndarray_to_bytes(np.full((2, 3), 7, dtype=np.int64))]
    content = {RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: masked}),
               "fitres.parameters": ArrayRecord(),
               "fitres.num_examples": MetricRecord({"num_examples": 5}),
               "fitres.metrics": ConfigRecord({"train-loss": 1.5, "num-examples": 5}),
               "fitres.status": ConfigRecord({"code": 0, "message": ""})}
    content.update(override)
    return RecordDict(content)


def test_audit_allows_a_masked_update_and_nothing_more() -> None:
    audit_secagg_reply(_collect_reply(), _collect_request())
    leaks = {
        "plain update": {"arrays": ArrayRecord({"w": torch.ones(2, 3)})},
        "transcript metric": {"fitres.metrics": ConfigRecord({"remind me to call": 1.0})},
        "string metric": {"fitres.metrics": ConfigRecord({"train-loss": "remind me to call"})},
        "status text": {"fitres.status": ConfigRecord({"code": 0, "message": "speaker f12"})},
        "unmasked float": {RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [b"x"]})},
        "kept parameters": {"fitres.parameters": ArrayRecord({"w": torch.ones(2, 3)})},
    }
    for case, override in leaks.items():
        with pytest.raises(PrivacyViolation):
            audit_secagg_reply(_collect_reply(**override), _collect_request())
            pytest.fail(f"{case} passed the audit")


def test_audit_checks_keys_and_share_destinations() -> None:
    setup = SecAggRequest(Stage.SETUP, {}, None)
    with pytest.raises(PrivacyViolation, match="public key"):
        audit_secagg_reply(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.PUBLIC_KEY_1: b"remind me to call", Key.PUBLIC_KEY_2: b"x"})}), setup)
    share = SecAggRequest(Stage.SHARE_KEYS, {"3": [b"a", b"b"], "5": [b"c", b"d"]}, None)
    audit_secagg_reply(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
        {Key.DESTINATION_LIST: [3, 5], Key.CIPHERTEXT_LIST: [b"1" * 64, b"2" * 64]})}), share)
    with pytest.raises(PrivacyViolation, match="neighbours"):
        audit_secagg_reply(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.DESTINATION_LIST: [3, 9], Key.CIPHERTEXT_LIST: [b"1" * 64, b"2" * 64]})}), share)
    with pytest.raises(PrivacyViolation, match="unequal"):
        audit_secagg_reply(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.DESTINATION_LIST: [3, 5], Key.CIPHERTEXT_LIST: [b"1" * 64, b"2" * 65]})}), share)


# --- the Ray simulation -----------------------------------------------------------------------------------------

DROPOUT = 2  # partition id of the device that drops out after sharing its keys (before its masked update)


def _device_app(flat: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Our real ClientApp (all its mods), with the run config (``run_simulation`` gives devices none), and one
    device that fails in the masked-vector stage of round 1: it has shared its keys, its update never comes."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def forward(msg: Message, context: Context) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (int(context.node_config["partition-id"]) == DROPOUT and configs is not None
                and configs[Key.STAGE] == Stage.COLLECT_MASKED_VECTORS):
            raise ConnectionError("simulated dropout after the key exchange")
        return client_app.app(msg, with_run_config(context, flat))

    app.train()(forward)
    app.evaluate()(forward)
    return app


def simulate_secagg(flat: dict[str, Any]) -> None:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from server.workflow import run_federation

    cfg = RunConfig.from_flat(flat)
    prepare(cfg, progress=False)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg)

    run_simulation(server_app=server_app, client_app=_device_app(flat), num_supernodes=DEVICES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0}})


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_espeak
def test_secagg_round_with_a_dropout_in_the_ray_simulation(tmp_path: Path) -> None:
    flat = {**TINY_RUN, "num-server-rounds": 1, "workdir": str(tmp_path), "run-id": "secagg",
            "strategy.secure-aggregation": True, "strategy.min-train-nodes": 3}
    code = f"from tests.test_secagg import simulate_secagg; simulate_secagg({flat!r})"
    returncode, output, _ = run_marked(code, name="secagg", env={"FLWR_HOME": str(tmp_path / ".flwr")})
    assert returncode == 0, output[-5000:]

    run_dir = tmp_path / "runs" / "secagg"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    one = records[1]
    assert (one["aggregated"], one["train_replies"], one["train_failures"]) == (True, DEVICES - 1, 1), one
    assert "Secure aggregation completed." in output  # Flower's SecAgg+ workflow, all four stages

    # The dropped device's pairwise masks were removed with its neighbours' shares: the global model is the
    # FedAvg of the three survivors' updates (the same device code, deterministic, run here).
    cfg = RunConfig.from_flat(flat)
    initial = ArrayRecord(load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict)
    plain, weights = _plain_fedavg(cfg, initial, [p + 1 for p in range(DEVICES) if p != DROPOUT])
    secure = ArrayRecord(load_checkpoint(run_dir / "checkpoints" / "global.pt").state_dict)
    error, bound = _max_error(secure, plain), _tolerance(cfg, weights)
    print(f"Ray SecAgg+ vs FedAvg of the survivors: max |difference| {error:.3g}, bound {bound:.3g}")
    assert error <= bound

