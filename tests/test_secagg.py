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
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import client.client_app as client_app
from client.data import node_data
from client.train import fine_tune
import client.fairness as client_fairness
from server.fairness import FairnessRounds, federated_fisher, normalized_fisher, public_embeddings
from server.secagg import quantization_step, secure_train_round
from simulations.harness import InProcessGrid
from server.workflow import make_strategy, run_federation
from shared.config import ConfigError, RunConfig
from shared.data.dataset import FeatureCache
from shared.data.prepare import artifact_dir, prepare, speaker_embedder_path
from shared.fairness import protocol as p
from shared.fairness.cohorts import assign, federated_kmeans, init_centroids
from shared.fairness.ewc import FisherSums, add_fisher_sums
from shared.models.speaker_embedding import load_speaker_embedder
from shared.models.checkpoint import initial_model, load_checkpoint
from shared.privacy.audit import PrivacyViolation
from shared.privacy.secagg_audit import SecAggRequest, audit_secagg_reply
from shared.privacy.secure_reply import train_metrics
from tests.conftest import (
    SECAGG_DEVICES,
    TINY_RUN,
    SecAggGrid,
    TinyWorkdir,
    leaks,
    needs_espeak,
    run_marked,
    sensitive_strings,
    with_run_config,
)

pytestmark = pytest.mark.usefixtures("task_identity")

DEVICES = SECAGG_DEVICES


def _cfg(workdir: Path, **extra: Any) -> RunConfig:
    return RunConfig.from_flat({**TINY_RUN, "workdir": str(workdir), **extra})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: TinyWorkdir) -> Path:
    return tiny_workdir(tmp_path_factory.mktemp("secagg"))


def _plain_fedavg(
    cfg: RunConfig, arrays: ArrayRecord, nodes: Iterable[int]
) -> tuple[dict[str, torch.Tensor], list[int], list[float]]:
    """The float FedAvg of the same devices' round-1 updates, trained here by the same device code, their
    weights (training utterances) and their training losses."""
    updates, weights, losses = [], [], []
    for node in nodes:
        update = fine_tune(
            cfg,
            arrays.to_torch_state_dict(),
            node_data(cfg, {"partition-id": node - 1, "num-partitions": DEVICES}),
            server_round=1,
            partition_id=node - 1,
        )
        updates.append(update.state_dict)
        weights.append(update.num_examples)
        losses.append(update.loss)
    mean = {k: sum(w * u[k].double() for w, u in zip(weights, updates)) / sum(weights) for k in updates[0]}
    return mean, weights, losses


def _tolerance(cfg: RunConfig, weights: list[int]) -> float:
    """The quantization bound (module docstring), plus float32 rounding of the stored model."""
    return len(weights) * quantization_step(cfg.secagg) / sum(w / cfg.secagg.max_weight for w in weights) + 1e-6


def _max_error(secure: ArrayRecord, plain: dict[str, torch.Tensor]) -> float:
    got = secure.to_torch_state_dict()
    return max(float((got[k].double() - plain[k]).abs().max()) for k in plain)


@needs_espeak
@pytest.mark.parametrize(
    "drop",
    [None, Stage.COLLECT_MASKED_VECTORS, Stage.SETUP],
    ids=["all-answer", "one-drops-out", "one-drops-before-sharing-keys"],
)
def test_secure_aggregate_equals_plain_fedavg(workdir: Path, drop: str | None) -> None:
    cfg = _cfg(workdir, **{"strategy.secure-aggregation": True})
    torch.manual_seed(0)
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    grid = SecAggGrid(cfg, drop_at={2: drop} if drop else None)
    result = secure_train_round(
        grid, make_strategy(cfg.strategy), 1, arrays, cfg.secagg, timeout=60.0, min_contributors=2, metric_keys=train_metrics(cfg)
    )
    survivors = [n for n in grid.get_node_ids() if n not in grid.dropped]
    assert (result.contributed, result.failed) == (len(survivors), DEVICES - len(survivors))
    assert result.arrays is not None and result.metrics is not None

    plain, weights, losses = _plain_fedavg(cfg, arrays, survivors)
    assert max(weights) <= cfg.secagg.max_weight
    # In plain every device sends the same weight and no metric: they rode in the masked vector.
    collected = [reply.content for stage, reply in grid.replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert [dict(c["fitres.num_examples"]) for c in collected] == [{"num_examples": 1}] * len(survivors)
    assert all(len(c["fitres.metrics"]) == 0 for c in collected)
    largest = max(float(v.abs().max()) for v in plain.values())
    assert largest < cfg.secagg.clipping_range  # nothing was clipped by the quantizer
    error, bound = _max_error(result.arrays, plain), _tolerance(cfg, weights)
    print(f"SecAgg+ vs FedAvg ({len(survivors)} devices): max |difference| {error:.3g}, bound {bound:.3g}")
    assert error <= bound
    # The train loss is the weighted mean that Flower's FedAvg reports for plain replies.
    plain_loss = sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)
    assert float(result.metrics["train-loss"]) == pytest.approx(plain_loss, abs=bound)
    assert set(result.metrics) == set(train_metrics(cfg))
    # ... and it is an aggregate of trained updates, not the global model sent back
    assert max(float((plain[k] - arrays.to_torch_state_dict()[k].double()).abs().max()) for k in plain) > 10 * bound

    # What left the devices: the protocol's records only; no plain update, no float array, no named array, and
    # no transcript, utterance id, speaker id or speakers.tsv value anywhere in the serialized replies.
    stages = [stage for stage, _ in grid.replies]
    assert stages.count(Stage.SETUP) == DEVICES - (drop == Stage.SETUP)
    assert stages.count(Stage.UNMASK) == len(survivors)
    sensitive = sensitive_strings(cfg)
    for stage, reply in grid.replies:
        assert not reply.has_error(), (stage, reply.error.reason)
        assert all(len(record) == 0 for record in reply.content.array_records.values()), stage
        assert "arrays" not in reply.content
        names = [n for name, record in reply.content.items() for n in (name, *record.keys())]
        wire = message_to_proto(reply).SerializeToString()
        assert not leaks(wire, names, sensitive), (stage, leaks(wire, names, sensitive))


@needs_espeak
def test_dp_sgd_updates_go_through_secagg(workdir: Path) -> None:
    """DP-SGD and SecAgg+ together: every device trains with Opacus (its accountant advances), its masked update
    weighs 1 (a DP reply carries no utterance count), and the unmasked mean is a finite model that moved."""
    cfg = _cfg(
        workdir,
        **{
            "strategy.secure-aggregation": True,
            "dp.enabled": True,
            "dp.noise-multiplier": 1.0,
            "dp.epsilon-budget": 1e9,
            "secagg.max-weight": 2.0,
        },
    )  # just above the weights
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    grid = SecAggGrid(cfg)
    result = secure_train_round(
        grid, make_strategy(cfg.strategy), 1, arrays, cfg.secagg, timeout=60.0, min_contributors=2, metric_keys=train_metrics(cfg)
    )
    assert (result.contributed, result.failed) == (DEVICES, 0) and result.arrays is not None
    collected = [reply.content for stage, reply in grid.replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert [int(c["fitres.num_examples"]["num_examples"]) for c in collected] == [1] * DEVICES
    # epsilon (the same on every device: same steps, same accountant) reaches the server as a masked mean
    assert result.metrics is not None and set(result.metrics) == {"epsilon", "local-steps"}
    assert 0 < float(result.metrics["epsilon"]) < 1e9
    sent, got = arrays.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    assert max(float((got[k].double() - sent[k].double()).abs().max()) for k in sent) > 10 * _tolerance(cfg, [1] * DEVICES)


@needs_espeak
def test_too_many_dropouts_keep_the_global_model(workdir: Path) -> None:
    """Below the reconstruction threshold the masks cannot be removed: nothing is aggregated."""
    cfg = _cfg(workdir, **{"strategy.secure-aggregation": True, "secagg.reconstruction-threshold": 1.0})
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    grid = SecAggGrid(cfg, drop_at={2: Stage.COLLECT_MASKED_VECTORS})
    result = secure_train_round(grid, make_strategy(cfg.strategy), 1, arrays, cfg.secagg, timeout=60.0, min_contributors=2)
    assert (result.arrays, result.contributed, result.failed) == (None, 0, DEVICES)


@needs_espeak
def test_a_device_that_requires_secagg_refuses_a_plain_instruction(workdir: Path) -> None:
    cfg = _cfg(workdir, **{"strategy.secure-aggregation": True})
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    grid = SecAggGrid(cfg)
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


# --- the fairness phases under SecAgg+ ---------------------------------------------------------------------

SECURE_FAIRNESS = {
    "strategy.secure-aggregation": True,
    "fairness.enabled": True,
    "fairness.num-cohorts": 2,
    "fairness.kmeans-iterations": 2,
    "fairness.embedder-steps": 8,
}


@pytest.fixture(scope="module")
def fair_workdir(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: TinyWorkdir) -> Path:
    # also trains the public speaker embedder
    return tiny_workdir(tmp_path_factory.mktemp("secagg-fairness"), {**TINY_RUN, **SECURE_FAIRNESS})


def _device_embedding(cfg: RunConfig, node: int) -> np.ndarray:
    """What device ``node`` computes for itself (the public extractor over all of its utterances)."""
    data = node_data(cfg, {"partition-id": node - 1, "num-partitions": DEVICES})
    return client_fairness.speaker_embedding(RecordDict(), data, speaker_embedder_path(artifact_dir(cfg), cfg))


@needs_espeak
def test_fairness_phases_under_secagg_sum_what_the_plain_phases_sum(fair_workdir: Path) -> None:
    """Cohort discovery and the per-cohort evaluation counts as SecAgg+ sums, with a device that drops out in
    the first k-means iteration: the centroids, cohort sizes and per-cohort counts equal those of the plain
    protocol over the devices that stayed (up to quantization), and no device sends its vectors in plain."""
    cfg = _cfg(fair_workdir, **SECURE_FAIRNESS)
    model = initial_model(cfg.model)
    grid = SecAggGrid(cfg, drop_at={3: Stage.COLLECT_MASKED_VECTORS})
    rounds = FairnessRounds.start(grid, cfg, prepared=prepare(cfg, progress=False), model=model)
    survivors = [n for n in grid.get_node_ids() if n not in grid.dropped]
    assert survivors == [1, 2, 4]

    # The reference: the plain protocol's math over the survivors' embeddings, from the same initial centroids.
    prepared = prepare(cfg, progress=False)
    embedder = load_speaker_embedder(speaker_embedder_path(prepared.artifacts, cfg))
    public = public_embeddings(
        embedder, prepared.split.public, prepared.corpus.by_speaker(), FeatureCache(prepared.corpus, prepared.cmvn)
    )
    embeddings = np.stack([_device_embedding(cfg, n) for n in survivors])
    expected = federated_kmeans(list(embeddings), init_centroids(public, 2, seed=cfg.train.seed), iterations=2)
    step = quantization_step(cfg.secagg) * cfg.secagg.max_weight  # one summand's quantization step
    np.testing.assert_allclose(rounds.centroids, expected, atol=len(survivors) * step)
    labels = assign(embeddings, expected)
    np.testing.assert_allclose(rounds.cohort_sizes, np.bincount(labels, minlength=2), atol=len(survivors) * step)

    # Evaluation: plain per-device counts (allowlisted metrics), then the per-cohort vectors as a secure sum.
    strategy = make_strategy(cfg.strategy)
    messages = rounds.configure_evaluate(strategy, 1, ArrayRecord(model.state_dict()), grid)
    assert messages and all(p.CENTROIDS not in m.content for m in messages)  # the centroids go in the sum only
    replies = grid.send_and_receive(messages)
    assert all(not r.has_error() and p.COHORT_EVAL not in r.content for r in replies)
    counts = rounds.cohort_counts(1, replies)
    by_node = {r.metadata.src_node_id: r.content["metrics"] for r in replies}
    for cohort in range(2):
        members = [n for n, label in zip(survivors, labels, strict=True) if label == cohort]
        assert counts.errors[cohort] == sum(by_node[n]["word-errors"] for n in members)
        assert counts.words[cohort] == sum(by_node[n]["words"] for n in members)
        assert counts.speakers[cohort] == sum(1 for n in members if by_node[n]["words"])
    assert counts.words.sum() > 0

    # Nothing of the fairness phases left a device in plain: protocol records only, no embedding bytes.
    for msg, reply in grid.exchanges:
        assert not reply.has_error(), reply.error.reason
        assert p.KMEANS_STATS not in reply.content and p.COHORT_EVAL not in reply.content
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        wire = message_to_proto(reply).SerializeToString()
        assert not any(e.tobytes() in wire or e.astype(np.float32).tobytes() in wire for e in embeddings)


@needs_espeak
def test_federated_rounds_with_every_fairness_method_under_secagg(fair_workdir: Path) -> None:
    """The whole round loop (server/workflow.py) under SecAgg+ with every fairness method: cohort discovery, EWC
    with the federated Fisher, population ARW (its scalars and weight masked) and a targeted last round (a device
    outside the targeted cohort trains nothing, and the server cannot tell which). Against the same run without
    SecAgg+: the same cohorts, targets, ARW population statistics and training losses, up to the quantization;
    per-cohort counts pool to the devices' own; nothing of any device leaves it in plain."""
    fair = {
        **SECURE_FAIRNESS,
        "num-server-rounds": 2,
        "fairness.ewc-lambda": 1.0,
        "fairness.fisher": "federated",
        "fairness.arw": True,
        "fairness.arw-normalization": "population",
        "fairness.targeted-rounds": 1,
    }
    cfg = _cfg(fair_workdir, **fair, **{"run-id": "secure-fairness"})
    grid = SecAggGrid(cfg)
    run_dir = run_federation(grid, cfg)
    plain_cfg = _cfg(fair_workdir, **{**fair, "run-id": "plain-fairness", "strategy.secure-aggregation": False})
    plain_dir = run_federation(InProcessGrid(client_app.app, DEVICES, plain_cfg.to_flat(), on_wire=True), plain_cfg)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plain_records = [json.loads(line) for line in (plain_dir / "metrics.jsonl").read_text().splitlines()]
    for secure_round, plain_round in zip(records[1:], plain_records[1:], strict=True):
        assert (secure_round["train_replies"], secure_round["eval_replies"]) == (DEVICES, DEVICES)
        assert secure_round["train_contributors"] is None  # a device's weight is masked
        assert secure_round["train_loss"] == pytest.approx(plain_round["train_loss"], rel=1e-3)
        assert secure_round.get("targeted_cohorts") == plain_round.get("targeted_cohorts")
        assert sum(secure_round["cohort_words"]) == secure_round["device_words"] > 0
        assert sum(secure_round["cohort_errors"]) / sum(secure_round["cohort_words"]) == pytest.approx(secure_round["device_wer"])
    assert records[2]["targeted_cohorts"] and plain_records[2]["train_contributors"] < DEVICES  # some devices idled
    population, plain_population = (
        json.loads((d / "checkpoints" / "arw-population.json").read_text()) for d in (run_dir, plain_dir)
    )
    # each slot's mean lies within N x step / (summed weight) of the plain one: 1e-3 relative here, a ratio of two
    assert population == pytest.approx(plain_population, rel=5e-3)
    # (The models themselves are not compared entry by entry: AdamW's first steps move a parameter by about lr
    # whatever its gradient's size, so a gradient near 0 flips sign with the quantization's differences.)
    secure_model = load_checkpoint(run_dir / "checkpoints" / "global.pt").state_dict
    initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
    assert all(bool(torch.isfinite(v).all()) for v in secure_model.values())
    assert max(float((secure_model[k].double() - initial[k].double()).abs().max()) for k in initial) > 0

    for _, reply in grid.exchanges:
        assert not reply.has_error(), reply.error.reason
        assert not {p.KMEANS_STATS, p.COHORT_EVAL, p.FISHER_SUMS, "arrays"} & set(reply.content.keys())
        if "fitres.metrics" in reply.content:  # a masked update: the same plain part on every device
            assert len(reply.content["fitres.metrics"]) == 0
            assert dict(reply.content["fitres.num_examples"]) == {"num_examples": 1}


@needs_espeak
def test_a_targeted_round_in_which_no_device_trains_keeps_the_model(fair_workdir: Path) -> None:
    """Under SecAgg+ a device outside the targeted cohorts masks a weight of 0 and its plain reply looks like any
    other; when no device of the targeted cohort answers, the summed weight is 0 and the model is kept."""
    cfg = _cfg(fair_workdir, **SECURE_FAIRNESS)
    dims = _device_embedding(cfg, 1).shape[0]
    # cohort 1 lies far from every (normalized) embedding: every device is in cohort 0, and cohort 1 is targeted
    centroids = ArrayRecord({"centroids": Array(np.stack([np.zeros(dims), np.full(dims, 1e6)]))})
    strategy = make_strategy(cfg.strategy)

    class Targeting:
        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> list[Message]:
            instruction = p.TrainInstruction(target_cohorts=(1,)).to_config(ConfigRecord())
            messages = list(strategy.configure_train(server_round, arrays, instruction, grid))
            for message in messages:
                message.content[p.CENTROIDS] = centroids
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            return strategy.aggregate_train(server_round, replies)

    grid = SecAggGrid(cfg)
    arrays = ArrayRecord(initial_model(cfg.model).state_dict())
    result = secure_train_round(
        grid,
        Targeting(),
        1,
        arrays,
        cfg.secagg,
        timeout=60.0,
        min_contributors=2,
        metric_keys=train_metrics(cfg),  # type: ignore[arg-type]
    )
    assert (result.arrays, result.contributed, result.failed) == (None, DEVICES, 0)
    collected = [reply.content for stage, reply in grid.replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(collected) == DEVICES
    assert all(dict(c["fitres.num_examples"]) == {"num_examples": 1} and len(c["fitres.metrics"]) == 0 for c in collected)


@needs_espeak
def test_federated_fisher_under_secagg_equals_the_plain_sums(fair_workdir: Path) -> None:
    """EWC's federated Fisher as two SecAgg+ sums (a histogram of each parameter tensor's peak, then the sums
    scaled per tensor): the plain Fisher sums up to the quantization, and no device's sums leave it in plain.

    The bound: the server scales a tensor by sum_bound / 2^e, 2^e the power of 2 just above the devices' largest
    entry of it, so each of the N summands of an entry is off by less than one step x 2^e / sum_bound."""
    cfg = _cfg(fair_workdir, **SECURE_FAIRNESS)
    model = initial_model(cfg.model)
    arrays = ArrayRecord(model.state_dict())
    grid = SecAggGrid(cfg)
    nodes = grid.get_node_ids()
    secure = federated_fisher(grid, nodes, arrays, strategy=cfg.strategy, secagg=cfg.secagg)
    devices = [
        client_fairness.fisher_reply(
            cfg, arrays.to_torch_state_dict(), node_data(cfg, {"partition-id": n - 1, "num-partitions": DEVICES})
        )
        for n in nodes
    ]
    parts = [
        FisherSums(
            {k: v.double() for k, v in d[p.FISHER_SUMS].to_torch_state_dict().items()}, int(d["metrics"][p.FISHER_BATCHES])
        )
        for d in devices
    ]
    plain = add_fisher_sums(parts)
    assert secure.count == plain.count > 0
    step = quantization_step(cfg.secagg) * cfg.secagg.max_weight
    worst = 0.0
    for key, expected in plain.sums.items():
        peak = max(float(part.sums[key].max()) for part in parts)
        if peak == 0:
            assert float(secure.sums[key].abs().max()) == 0.0, key
            continue
        bound = len(nodes) * step * 2.0 ** math.ceil(math.log2(peak)) / cfg.secagg.sum_bound + 1e-6 * peak
        error = float((secure.sums[key].double() - expected).abs().max())
        worst = max(worst, error / bound)
        assert error <= bound, (key, error, bound)
    names = [n for n, _ in model.named_parameters()]
    got, want = normalized_fisher(secure, names), normalized_fisher(plain, names)
    print(
        f"secure vs plain Fisher: worst error {worst:.2f} of its bound; normalized (mean 1): max |difference| "
        f"{max(float((got[n] - want[n].float()).abs().max()) for n in names):.3g}"
    )
    for _, reply in grid.exchanges:
        assert not reply.has_error(), reply.error.reason
        assert p.FISHER_SUMS not in reply.content and all(len(r) == 0 for r in reply.content.array_records.values())


@needs_espeak
def test_a_device_that_requires_secagg_refuses_plain_fairness_vectors(fair_workdir: Path) -> None:
    cfg = _cfg(fair_workdir, **SECURE_FAIRNESS)
    grid = SecAggGrid(cfg)
    centroids = ArrayRecord({"centroids": Array(np.zeros((2, 8)))})
    kmeans = [
        Message(
            RecordDict({p.CENTROIDS: centroids, "config": ConfigRecord({"server-round": 0})}),
            dst_node_id=node,
            message_type=p.KMEANS_QUERY,
        )
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(kmeans)
    assert replies and all(r.has_error() and "SecureAggregationRequired" in r.error.reason for r in replies)


# --- the audit of SecAgg+ replies ---------------------------------------------------------------------------


def _collect_request() -> SecAggRequest:
    arrays = ArrayRecord({"w": torch.zeros(2, 3)})
    return SecAggRequest(Stage.COLLECT_MASKED_VECTORS, {Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}, arrays)


def _collect_reply(**override: Any) -> RecordDict:
    import numpy as np
    from flwr.common import ndarray_to_bytes

    masked = [ndarray_to_bytes(np.array([5], dtype=np.int64)), ndarray_to_bytes(np.full((2, 3), 7, dtype=np.int64))]
    content = {
        RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: masked}),
        "fitres.parameters": ArrayRecord(),
        "fitres.num_examples": MetricRecord({"num_examples": 1}),
        "fitres.metrics": ConfigRecord(),
        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
    }
    content.update(override)
    return RecordDict(content)


def test_audit_allows_a_masked_update_and_nothing_more() -> None:
    audit_secagg_reply(_collect_reply(), _collect_request())
    leaks = {
        "plain update": {"arrays": ArrayRecord({"w": torch.ones(2, 3)})},
        "transcript metric": {"fitres.metrics": ConfigRecord({"remind me to call": 1.0})},
        "string metric": {"fitres.metrics": ConfigRecord({"train-loss": "remind me to call"})},
        "plain metric": {"fitres.metrics": ConfigRecord({"train-loss": 1.5})},
        "plain weight": {"fitres.num_examples": MetricRecord({"num_examples": 0})},
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
        audit_secagg_reply(
            RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.PUBLIC_KEY_1: b"remind me to call", Key.PUBLIC_KEY_2: b"x"})}),
            setup,
        )
    share = SecAggRequest(Stage.SHARE_KEYS, {"3": [b"a", b"b"], "5": [b"c", b"d"]}, None)
    audit_secagg_reply(
        RecordDict(
            {RECORD_KEY_CONFIGS: ConfigRecord({Key.DESTINATION_LIST: [3, 5], Key.CIPHERTEXT_LIST: [b"1" * 64, b"2" * 64]})}
        ),
        share,
    )
    with pytest.raises(PrivacyViolation, match="neighbours"):
        audit_secagg_reply(
            RecordDict(
                {RECORD_KEY_CONFIGS: ConfigRecord({Key.DESTINATION_LIST: [3, 9], Key.CIPHERTEXT_LIST: [b"1" * 64, b"2" * 64]})}
            ),
            share,
        )
    with pytest.raises(PrivacyViolation, match="unequal"):
        audit_secagg_reply(
            RecordDict(
                {RECORD_KEY_CONFIGS: ConfigRecord({Key.DESTINATION_LIST: [3, 5], Key.CIPHERTEXT_LIST: [b"1" * 64, b"2" * 65]})}
            ),
            share,
        )


# --- the Ray simulation -----------------------------------------------------------------------------------------

DROPOUT = 2  # partition id of the device that drops out after sharing its keys (before its masked update)


def _device_app(flat: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Our real ClientApp (all its mods), with the run config (``run_simulation`` gives devices none), and one
    device that fails in the masked-vector stage of round 1: it has shared its keys, its update never comes."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def forward(msg: Message, context: Context) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (
            int(context.node_config["partition-id"]) == DROPOUT
            and configs is not None
            and configs[Key.STAGE] == Stage.COLLECT_MASKED_VECTORS
        ):
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

    run_simulation(
        server_app=server_app,
        client_app=_device_app(flat),
        num_supernodes=DEVICES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 1, "num_gpus": 0}},
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_espeak
def test_secagg_round_with_a_dropout_in_the_ray_simulation(tmp_path: Path) -> None:
    flat = {
        **TINY_RUN,
        "num-server-rounds": 1,
        "workdir": str(tmp_path),
        "run-id": "secagg",
        "strategy.secure-aggregation": True,
        "strategy.min-train-nodes": 3,
    }
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
    plain, weights, _ = _plain_fedavg(cfg, initial, [p + 1 for p in range(DEVICES) if p != DROPOUT])
    secure = ArrayRecord(load_checkpoint(run_dir / "checkpoints" / "global.pt").state_dict)
    error, bound = _max_error(secure, plain), _tolerance(cfg, weights)
    print(f"Ray SecAgg+ vs FedAvg of the survivors: max |difference| {error:.3g}, bound {bound:.3g}")
    assert error <= bound
