"""Fairness phases as Flower messages: federated k-means, disaggregated evaluation, targeted rounds, EWC and ARW,
with the privacy audit on every reply.

Fast tests drive ``server/fairness.py`` against in-process devices (``client/fairness.py`` behind ``audit_mod``)
over a stand-in grid. The slow test runs a whole federation with every phase on through Flower's simulation
engine (Ray) with our real ServerApp workflow and ClientApp, records every reply as it leaves a device, and
checks it against the audit, the reference k-means and the pooled device WER.
"""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]
from flwr.serverapp import strategy as flwr_strategy

from client.fairness import cohort_eval_record, idle_train_reply, kmeans_reply, local_fairness
from server.fairness import FairnessRounds, discover_cohorts, normalized_fisher, sum_cohort_eval, worst_cohorts
from shared.config import ConfigError, RunConfig
from shared.fairness import protocol as p
from shared.fairness.arw import UTTERANCE_STATISTICS, Adversary, PopulationStats
from shared.fairness.cohorts import assign, cohort_report, federated_kmeans, init_centroids
from shared.fairness.ewc import FisherSums
from shared.metrics import ErrorCounts
from simulations.harness import InProcessGrid
from shared.privacy.audit import ALLOWED_ARRAY_RECORDS, ALLOWED_METRICS, PrivacyViolation, audit_mod, audit_reply
from tests.conftest import TINY_RUN, TinyWorkdir, leaks, needs_espeak, sensitive_strings, with_run_config

E = 8  # embedding dimension of the fast tests
UNUSED = Path("/nonexistent/speaker-embedder.pt")  # devices here hold their embedding in state already


pytestmark = pytest.mark.usefixtures("task_identity")


def _embeddings(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 3 directions: speaker embeddings with 3 clear groups."""
    rng = np.random.default_rng(seed)
    centers = np.eye(E)[:3] * 3.0
    points = centers[np.arange(n) % 3] + rng.normal(scale=0.5, size=(n, E))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def _device_state(embedding: np.ndarray) -> RecordDict:
    return RecordDict({p.EMBEDDING_STATE: ArrayRecord({"embedding": Array(np.asarray(embedding, np.float64))})})


def LocalGrid(app: ClientApp, states: dict[int, RecordDict]) -> InProcessGrid:  # noqa: N802 - reads as a class
    """The harness's Grid: in-process devices with the given ``context.state``s and an empty run config."""
    return InProcessGrid(app, states, {})


def _device_app(device_counts: dict[int, ErrorCounts] | None = None) -> ClientApp:
    """Devices running client/fairness.py's phases behind the privacy audit, as client/client_app.py does."""
    app = ClientApp(mods=[audit_mod])

    @app.query("kmeans")
    def kmeans(msg: Message, context: Context) -> Message:
        return Message(kmeans_reply(msg.content, context.state, None, UNUSED), reply_to=msg)  # type: ignore[arg-type]

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        counts = (device_counts or {})[context.node_id]
        metrics = MetricRecord(
            {
                "word-errors": counts.errors,
                "words": counts.words,
                "num-examples": counts.utterances,
                "wer": counts.wer if counts.words else 0.0,
            }
        )
        cohort = cohort_eval_record(msg.content, context.state, None, UNUSED, counts)  # type: ignore[arg-type]
        return Message(RecordDict({"metrics": metrics, p.COHORT_EVAL: cohort}), reply_to=msg)

    return app


def _audited(grid: LocalGrid) -> None:
    for sent, reply in grid.exchanges:
        assert not reply.has_error(), reply.error.reason
        audit_reply(reply.content, sent.content)  # the mod already did; the test checks it independently


# -- cohort discovery --------------------------------------------------------------------------------------


def test_kmeans_phase_equals_the_reference_and_devices_keep_their_cohort() -> None:
    embeddings = _embeddings(12)
    states = {node: _device_state(e) for node, e in enumerate(embeddings, start=1)}
    grid = LocalGrid(_device_app(), states)
    initial = init_centroids(_embeddings(6, seed=9), 3, seed=0)  # "public" speakers seed the centroids

    centroids, sizes, shifts = discover_cohorts(grid, grid.get_node_ids(), initial, iterations=4)

    np.testing.assert_allclose(centroids, federated_kmeans(list(embeddings), initial, iterations=4), atol=1e-12)
    labels = assign(embeddings, centroids)
    assert sizes.tolist() == np.bincount(labels, minlength=3).astype(float).tolist()
    assert len(shifts) == 4 and shifts[-1] <= shifts[0]
    for node, state in states.items():  # each device knows its own cohort, for the final centroids
        kept = state[p.COHORT_STATE]
        assert kept["cohort-id"] == labels[node - 1] and kept["centroids"] == p.centroids_digest(centroids)
    assert len(grid.exchanges) == 12 * 5  # 4 Lloyd iterations + the assignment pass
    _audited(grid)
    for _, reply in grid.exchanges:  # dense: every cluster's row, whatever the device's cluster
        stats = reply.content[p.KMEANS_STATS]
        assert set(reply.content.keys()) == {p.KMEANS_STATS}
        assert stats["sums"].shape == (3, E) and stats["counts"].shape == (3,)
        assert stats["counts"].numpy().sum() == 1.0


def test_kmeans_phase_merges_cohorts_under_the_floor_as_the_reference_does() -> None:
    embeddings = np.concatenate([_embeddings(12), _embeddings(2, seed=4)[:, ::-1].copy()])  # 3 groups + 2 strays
    states = {node: _device_state(e) for node, e in enumerate(embeddings, start=1)}
    grid = LocalGrid(_device_app(), states)
    initial = np.concatenate([init_centroids(_embeddings(6, seed=9), 3, seed=0), embeddings[-1:]])

    centroids, sizes, _ = discover_cohorts(grid, grid.get_node_ids(), initial, iterations=2, min_devices=3)

    np.testing.assert_allclose(centroids, federated_kmeans(list(embeddings), initial, iterations=2, min_devices=3), atol=1e-12)
    labels = assign(embeddings, centroids)
    assert len(centroids) == 3 and sizes.tolist() == np.bincount(labels, minlength=3).astype(float).tolist()
    assert sizes.min() >= 3 and sizes.sum() == 14
    for node, state in states.items():  # the devices' kept cohort ids are those of the final, merged centroids
        assert state[p.COHORT_STATE]["cohort-id"] == labels[node - 1]
    assert len(grid.exchanges) == 14 * (3 + 2)  # 2 updates + a pass that finds the strays, re-centring, final pass
    _audited(grid)


def test_noisy_kmeans_hides_the_embedding_bytes() -> None:
    embeddings = _embeddings(6)
    grid = LocalGrid(_device_app(), {n: _device_state(e) for n, e in enumerate(embeddings, start=1)})
    discover_cohorts(grid, grid.get_node_ids(), embeddings[:3].copy(), iterations=1, noise_std=0.05)
    _audited(grid)
    for _, reply in grid.exchanges:
        wire = message_to_proto(reply).SerializeToString()
        counts = reply.content[p.KMEANS_STATS]["counts"].numpy()
        assert np.count_nonzero(counts) == 3 and not np.allclose(counts, np.round(counts))
        assert not any(e.tobytes() in wire for e in embeddings)
    # Without noise a device whose cluster holds only its own embedding returns that embedding as the sum:
    # exactly what SecAgg+ (or noise) must hide, and what the docs say the server learns otherwise.
    exact = LocalGrid(_device_app(), {1: _device_state(embeddings[0])})
    discover_cohorts(exact, [1], embeddings[:3].copy(), iterations=0)
    assert embeddings[0].tobytes() in message_to_proto(exact.exchanges[0][1]).SerializeToString()


# -- disaggregated evaluation ---------------------------------------------------------------------------------


def test_per_cohort_counts_pool_to_the_overall_device_wer() -> None:
    embeddings = _embeddings(9, seed=3)
    counts = {node: ErrorCounts(errors=node % 4 + 1, words=10 + node, utterances=2) for node in range(1, 10)}
    states = {node: _device_state(e) for node, e in enumerate(embeddings, start=1)}
    grid = LocalGrid(_device_app(counts), states)
    centroids = init_centroids(embeddings, 3, seed=1)
    messages = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.zeros(2)}),
                    "config": ConfigRecord({"server-round": 1}),
                    p.CENTROIDS: ArrayRecord({"centroids": Array(centroids)}),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages)
    _audited(grid)

    total = sum_cohort_eval(replies, 3)
    assert total.errors.sum() == sum(c.errors for c in counts.values())
    assert total.words.sum() == sum(c.words for c in counts.values()) and total.speakers.sum() == 9
    labels = assign(embeddings, centroids)
    for k in range(3):  # per cohort: exactly its devices' counts
        assert total.words[k] == sum(c.words for n, c in counts.items() if labels[n - 1] == k)
    report = cohort_report(total.errors, total.words, speakers_per_cohort=total.speakers)
    pooled = sum(c.errors for c in counts.values()) / sum(c.words for c in counts.values())
    assert report.overall_wer == pytest.approx(pooled)
    for reply in replies:  # dense vectors with the device's counts at one cohort
        words = reply.content[p.COHORT_EVAL]["words"].numpy()
        assert words.shape == (3,) and np.count_nonzero(words) == 1


# -- the audit of the new records ----------------------------------------------------------------------------


def _kmeans_sent(c: int = 3) -> RecordDict:
    return RecordDict(
        {p.CENTROIDS: ArrayRecord({"centroids": Array(np.zeros((c, E)))}), "config": ConfigRecord({"server-round": 0})}
    )


@pytest.mark.parametrize(
    "case, content, match",
    [
        (
            "an extra cluster row",
            lambda: {p.KMEANS_STATS: ArrayRecord({"sums": Array(np.zeros((4, E))), "counts": Array(np.zeros(3))})},
            r"'kmeans-stats'/'sums' is float64\[4, 8\], expected float64\[3, 8\]",
        ),
        (
            "an extra key",
            lambda: {
                p.KMEANS_STATS: ArrayRecord(
                    {"sums": Array(np.zeros((3, E))), "counts": Array(np.zeros(3)), "embedding": Array(np.zeros(E))}
                )
            },
            r"extra \['embedding'\]",
        ),
        (
            "int counts",
            lambda: {
                p.KMEANS_STATS: ArrayRecord({"sums": Array(np.zeros((3, E))), "counts": Array(np.zeros(3, dtype=np.int64))})
            },
            "dtype int64",
        ),
        (
            "the embedding as a record",
            lambda: {"embedding": ArrayRecord({"embedding": Array(np.zeros(E))})},
            "array record 'embedding' is not on the allowlist",
        ),
        (
            "cohort vectors of the wrong length",
            lambda: {p.COHORT_EVAL: ArrayRecord({k: Array(np.zeros(5)) for k in p.COHORT_EVAL_KEYS})},
            r"expected float64\[3\]",
        ),
    ],
)
def test_audit_derives_the_shapes_of_fairness_replies_from_what_was_sent(case: str, content, match: str) -> None:  # noqa: ANN001
    with pytest.raises(PrivacyViolation, match=match):
        audit_reply(RecordDict(content()), _kmeans_sent())


def test_the_audit_allowlist_names_the_protocol_records() -> None:
    assert {p.KMEANS_STATS, p.COHORT_EVAL, p.FISHER_SUMS} <= ALLOWED_ARRAY_RECORDS
    assert p.FISHER_BATCHES in ALLOWED_METRICS


def test_audit_refuses_fairness_replies_the_server_did_not_ask_for() -> None:
    no_centroids = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}), "config": ConfigRecord({"server-round": 1})})
    stats = {p.KMEANS_STATS: ArrayRecord({"sums": Array(np.zeros((3, E))), "counts": Array(np.zeros(3))})}
    with pytest.raises(PrivacyViolation, match="the server sent no 'centroids'"):
        audit_reply(RecordDict(stats), no_centroids)
    fisher = ArrayRecord({"w": torch.zeros(2), "extra": torch.zeros(3)})
    with pytest.raises(PrivacyViolation, match=r"extra \['extra'\]"):
        audit_reply(RecordDict({p.FISHER_SUMS: fisher}), no_centroids)
    audit_reply(
        RecordDict({p.FISHER_SUMS: ArrayRecord({"w": torch.ones(2)}), "metrics": MetricRecord({p.FISHER_BATCHES: 3})}),
        no_centroids,
    )


# -- targeted rounds, EWC and ARW on the device --------------------------------------------------------------

GLOBAL = {"encoder.w": torch.randn(4, 3), "joiner.b": torch.randn(5)}


def _train_content(
    *,
    targets: list[int] | None = None,
    fisher: bool = False,
    adversary: Adversary | None = None,
    frozen: bool = False,
    centroids: np.ndarray | None = None,
) -> RecordDict:
    config = ConfigRecord({"server-round": 2})
    content = RecordDict(
        {"arrays": ArrayRecord(p.join_adversary(GLOBAL, None if adversary is None else adversary.state_dict())), "config": config}
    )
    if targets is not None:
        config[p.TARGET_COHORTS] = targets
        content[p.CENTROIDS] = ArrayRecord({"centroids": Array(centroids)})  # type: ignore[arg-type]
    if fisher:
        config[p.EWC_LAMBDA] = 5.0
        content[p.FISHER] = ArrayRecord({k: torch.ones_like(v) for k, v in GLOBAL.items()})
    if adversary is not None:
        config[p.ARW_LR] = 0.05
        config[p.ARW_FROZEN] = frozen
    return content


def test_a_targeted_round_trains_only_the_targeted_cohorts() -> None:
    embeddings = _embeddings(6)
    centroids = init_centroids(embeddings, 3, seed=0)
    labels = assign(embeddings, centroids)
    content = _train_content(targets=[int(labels[0])], centroids=centroids)
    for embedding, label in zip(embeddings, labels, strict=True):
        state = _device_state(embedding)
        local = local_fairness(
            content,
            state,
            None,
            UNUSED,  # type: ignore[arg-type]
            global_state=content["arrays"].to_torch_state_dict(),
            local_steps=2,
        )
        assert local.takes_part == (label == labels[0])
        assert state[p.COHORT_STATE]["cohort-id"] == label  # decided and kept on the device
    idle = idle_train_reply(content, skipped=0)
    audit_reply(idle, content)
    assert idle["metrics"]["num-examples"] == 0 and idle["arrays"] is content["arrays"]


def test_fedavg_ignores_a_weight_zero_reply_and_the_server_drops_it() -> None:
    def reply(scale: float, weight: int) -> Message:
        sent = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
        state = {k: v * scale for k, v in GLOBAL.items()}
        metrics = {"train-loss": 1.0, "local-steps": 2, "num-examples": weight, "compute-cost": 1.0, "skipped-utterances": 0}
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=sent)

    trained, other, idle = reply(2.0, 3), reply(3.0, 1), reply(1.0, 0)
    fedavg = flwr_strategy.FedAvg()
    with_idle, _ = fedavg.aggregate_train(1, [trained, other, idle])
    without, _ = fedavg.aggregate_train(1, [trained, other])
    for key in GLOBAL:
        np.testing.assert_allclose(with_idle[key].numpy(), without[key].numpy())  # type: ignore[index]
        np.testing.assert_allclose(without[key].numpy(), GLOBAL[key].numpy() * 2.25, rtol=1e-6)  # type: ignore[index]
    with pytest.raises(ZeroDivisionError):  # all weights 0: Flower's FedAvg divides by zero ...
        fedavg.aggregate_train(1, [idle])
    rounds = FairnessRounds(
        cfg=RunConfig.from_flat({"fairness.enabled": True}), centroids=np.zeros((3, E)), cohort_sizes=np.zeros(3)
    )
    assert rounds.aggregate_train(fedavg, 1, [idle]) == (None, None)  # ... so the server keeps the model
    arrays, _ = rounds.aggregate_train(flwr_strategy.FedMedian(), 1, [trained, idle])
    np.testing.assert_allclose(arrays["joiner.b"].numpy(), GLOBAL["joiner.b"].numpy() * 2, rtol=1e-6)  # type: ignore[index]


def test_ewc_and_arw_come_from_the_message() -> None:
    torch.manual_seed(0)
    adversary = Adversary(UTTERANCE_STATISTICS + E)
    with torch.no_grad():
        adversary.net.weight.normal_()  # type: ignore[union-attr]
    content = _train_content(fisher=True, adversary=adversary, frozen=True)
    local = local_fairness(
        content,
        _device_state(_embeddings(1)[0]),
        None,
        UNUSED,  # type: ignore[arg-type]
        global_state=content["arrays"].to_torch_state_dict(),
        local_steps=3,
    )
    assert local.takes_part and set(local.model_state) == set(GLOBAL)
    assert local.penalty is not None and local.penalty.lam == 5.0
    assert local.reweighter is not None and local.reweighter.warmup_steps == 3  # frozen for the whole round
    torch.testing.assert_close(local.reweighter.adversary.state_dict()["net.weight"], adversary.net.weight)  # type: ignore[union-attr]
    reply = local.reply_arrays({k: v + 1 for k, v in local.model_state.items()})
    assert set(reply.keys()) == set(content["arrays"].keys())  # model + adversary, nothing else
    audit_reply(RecordDict({"arrays": reply}), content)
    # A device whose extractor disagrees with the adversary's input size says so.
    with pytest.raises(p.ProtocolError, match="takes 11 inputs, the device has 3 utterance statistics \\+ a 4-dimensional"):
        local_fairness(
            content,
            _device_state(np.ones(4) / 2),
            None,
            UNUSED,  # type: ignore[arg-type]
            global_state=content["arrays"].to_torch_state_dict(),
            local_steps=3,
        )


def test_adversary_arrays_round_trip_and_are_split_off_the_aggregate() -> None:
    for hidden in (0, 5):
        adversary = Adversary(7, hidden_dim=hidden)
        model, rest = p.split_adversary(p.join_adversary(GLOBAL, adversary.state_dict()))
        assert set(model) == set(GLOBAL)
        rebuilt = p.adversary_from_state(rest)
        for key, value in adversary.state_dict().items():
            torch.testing.assert_close(rebuilt.state_dict()[key], value)
    with pytest.raises(p.ProtocolError, match="neither a linear nor"):
        p.adversary_from_state({"net.weight": torch.zeros(1, 3)})

    cfg = RunConfig.from_flat({"fairness.enabled": True, "fairness.arw": True})
    rounds = FairnessRounds(cfg=cfg, centroids=np.zeros((3, E)), cohort_sizes=np.zeros(3), adversary=Adversary(7))
    sent = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    replies = []
    for weight, value in ((1, 1.0), (3, 3.0)):
        adversary = Adversary(7)
        with torch.no_grad():
            adversary.net.bias.fill_(value)  # type: ignore[union-attr]
        arrays = ArrayRecord(p.join_adversary(GLOBAL, adversary.state_dict()))
        replies.append(_arw_reply(arrays, weight, score=0.5 * weight, score_loss=weight, weight_mass=1.0 * weight))
    arrays, _ = rounds.aggregate_train(flwr_strategy.FedAvg(), 1, replies)
    assert arrays is not None and set(arrays.keys()) == set(GLOBAL)
    assert float(rounds.adversary.net.bias.detach()) == pytest.approx(2.5)  # type: ignore[union-attr]
    bare = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=sent)
    with pytest.raises(p.ProtocolError, match=r"lacks the metrics \['arw-score', 'arw-count'"):
        rounds.aggregate_train(flwr_strategy.FedAvg(), 2, [bare])


def _arw_reply(arrays: ArrayRecord, num_examples: int, *, score: float, score_loss: float, weight_mass: float) -> Message:
    sent = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    metrics = MetricRecord(
        {
            "train-loss": 1.0,
            "num-examples": num_examples,
            **dict(zip(p.ARW_METRICS, (score, float(num_examples), score_loss, weight_mass))),
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=sent)


def test_population_arw_normalizes_over_the_federation_and_weighs_updates_by_weight_mass() -> None:
    cfg = RunConfig.from_flat({"fairness.enabled": True, "fairness.arw": True, "fairness.arw-normalization": "population"})
    rounds = FairnessRounds(
        cfg=cfg, centroids=np.zeros((3, E)), cohort_sizes=np.zeros(3), adversary=Adversary(UTTERANCE_STATISTICS + E)
    )
    adversary = rounds.adversary.state_dict()  # type: ignore[union-attr]
    # Two devices with 4 utterances each; the adversary scored the second one's utterances higher.
    easy = _arw_reply(
        ArrayRecord(p.join_adversary({k: v * 0 for k, v in GLOBAL.items()}, adversary)),
        4,
        score=0.8,
        score_loss=0.8,
        weight_mass=4 * 0.7,
    )
    hard = _arw_reply(
        ArrayRecord(p.join_adversary({k: v * 0 + 1 for k, v in GLOBAL.items()}, adversary)),
        4,
        score=2.4,
        score_loss=7.2,
        weight_mass=4 * 1.3,
    )
    arrays, _ = rounds.aggregate_train(flwr_strategy.FedAvg(), 2, [easy, hard])
    # The population's mean score m = 3.2 / 8 and score-weighted loss L_w = 8 / 3.2, for the next round ...
    assert rounds.population == pytest.approx((0.4, 2.5))
    # ... and FedAvg weighed the updates 2.8 : 5.2 (their ARL weight mass), not 4 : 4 (their utterances).
    np.testing.assert_allclose(arrays["joiner.b"].numpy(), np.full(5, 5.2 / 8.0), rtol=1e-6)  # type: ignore[index]
    # The round notes how far apart the devices' mean weights were: 0.7 and 1.3.
    notes = rounds._round_notes[2]
    assert (notes["arw_weight_min"], notes["arw_weight_max"]) == pytest.approx((0.7, 1.3))

    # The next round's message carries the normalizers; the device's reweighter uses them.
    content = _train_content(adversary=Adversary(UTTERANCE_STATISTICS + E))
    content["config"][p.ARW_MEAN_SCORE], content["config"][p.ARW_WEIGHTED_LOSS] = rounds.population  # type: ignore[index]
    local = local_fairness(
        content,
        _device_state(_embeddings(1)[0]),
        None,
        UNUSED,  # type: ignore[arg-type]
        global_state=content["arrays"].to_torch_state_dict(),
        local_steps=3,
    )
    assert local.reweighter is not None and local.reweighter.population == pytest.approx((0.4, 2.5))
    metrics = local.reply_metrics(num_examples=5)
    assert list(metrics) == list(p.ARW_METRICS) and metrics[p.ARW_WEIGHT] == 5.0  # no step yet: weight 1 each
    audit_reply(RecordDict({"metrics": MetricRecord(metrics)}), content)

    # Batch normalization keeps the strategy's utterance weights.
    rounds = FairnessRounds(
        cfg=RunConfig.from_flat({"fairness.enabled": True, "fairness.arw": True, "fairness.arw-normalization": "batch"}),
        centroids=np.zeros((3, E)),
        cohort_sizes=np.zeros(3),
        adversary=Adversary(UTTERANCE_STATISTICS + E),
    )
    arrays, _ = rounds.aggregate_train(flwr_strategy.FedAvg(), 2, [easy, hard])
    np.testing.assert_allclose(arrays["joiner.b"].numpy(), np.full(5, 0.5), rtol=1e-6)  # type: ignore[index]


# -- server-side pieces ----------------------------------------------------------------------------------------


def test_a_resumed_run_keeps_the_committed_evaluations_and_population_stats(tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({"fairness.enabled": True, "fairness.arw": True, "fairness.arw-normalization": "population"})
    crashed = FairnessRounds(
        cfg=cfg,
        centroids=np.zeros((2, E)),
        cohort_sizes=np.ones(2),
        adversary=Adversary(11),
        population=PopulationStats(0.4, 2.5),
    )
    crashed.log += [
        {"phase": "kmeans", "devices": 2},
        {
            "phase": "evaluate",
            "round": 1,
            "cohort_errors": [1.0, 6.0],
            "cohort_words": [10.0, 10.0],
            "cohort_speakers": [1.0, 1.0],
        },
    ]
    crashed.save(tmp_path)  # with round 1's checkpoint
    crashed.log.append(
        {
            "phase": "evaluate",
            "round": 2,
            "cohort_errors": [9.0, 0.0],
            "cohort_words": [10.0, 10.0],
            "cohort_speakers": [1.0, 1.0],
        }
    )  # round 2 evaluated, then the crash: not committed
    resumed = FairnessRounds(cfg=cfg, centroids=np.zeros((2, E)), cohort_sizes=np.ones(2))
    resumed.restore_log(tmp_path)
    assert [e["round"] for e in resumed.log if e["phase"] == "evaluate"] == [1]
    assert resumed.last_report is not None and resumed.last_report.worst_cohort == 1  # what round 2 targets
    assert resumed.population == PopulationStats(0.4, 2.5)
    # nothing saved: nothing restored
    FairnessRounds(cfg=cfg, centroids=np.zeros((2, E)), cohort_sizes=np.ones(2)).restore_log(tmp_path / "new")


def test_normalized_fisher_and_worst_cohorts() -> None:
    sums = FisherSums(sums={"a": torch.tensor([2.0, 6.0]), "b": torch.tensor([4.0]), "buffer": torch.zeros(1)}, count=2)
    fisher = normalized_fisher(sums, ["a", "b"])
    assert set(fisher) == {"a", "b"}
    torch.testing.assert_close(torch.cat([fisher["a"], fisher["b"]]), torch.tensor([0.5, 1.5, 1.0]))
    with pytest.raises(ValueError, match="zero everywhere"):
        normalized_fisher(FisherSums(sums={"a": torch.zeros(2)}, count=1), ["a"])
    report = cohort_report(np.array([1.0, 5.0, 3.0, 0.0]), np.array([10.0, 10.0, 10.0, 0.0]))
    assert worst_cohorts(report, 2) == [1, 2]  # cohort 3 has no words: never targeted


def test_fairness_config_names_the_bad_value() -> None:
    with pytest.raises(ConfigError, match="fairness.fisher='secret': choose federated or public"):
        RunConfig.from_flat({"fairness.fisher": "secret"})
    with pytest.raises(ConfigError, match="fairness.target-cohorts=5 exceeds fairness.num-cohorts=4"):
        RunConfig.from_flat({"fairness.target-cohorts": 5})
    with pytest.raises(ConfigError, match="fairness.kmeans-noise must be >= 0, got -1.0"):
        RunConfig.from_flat({"fairness.kmeans-noise": -1.0})
    with pytest.raises(ConfigError, match="fairness.arw-normalization='speaker': choose batch or population"):
        RunConfig.from_flat({"fairness.arw-normalization": "speaker"})
    with pytest.raises(ConfigError, match="population needs fairness.arw-warmup >= 1"):
        RunConfig.from_flat({"fairness.arw-normalization": "population", "fairness.arw-warmup": 0})


# -- the whole federation through Flower's simulation engine (Ray) ------------------------------------------

FAIR_RUN = {
    **TINY_RUN,
    "synth.speakers": 10,
    "split.public-speakers": 4,
    "num-server-rounds": 2,
    "fairness.enabled": True,
    "fairness.num-cohorts": 2,
    "fairness.kmeans-iterations": 2,
    "fairness.embedder-steps": 8,
    "fairness.ewc-lambda": 1.0,
    "fairness.fisher": "federated",
    "fairness.targeted-rounds": 1,
    "fairness.arw": True,
    "fairness.arw-warmup": 1,
    "fairness.arw-normalization": "population",
}
EXPECTED_RECORDS = {
    p.KMEANS_QUERY: {p.KMEANS_STATS},
    p.FISHER_QUERY: {p.FISHER_SUMS, "metrics"},
    MessageType.TRAIN: {"arrays", "metrics"},
    MessageType.EVALUATE: {"metrics", p.COHORT_EVAL},
}


class RecordExchanges:
    """Client mod, outermost: writes each message a device gets and the reply that leaves it, serialized as
    Flower sends them (Ray runs devices in other processes: files are the channel back to the test)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = str(out_dir)

    def __call__(self, msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
        reply = call_next(msg, context)
        stem = (
            f"{self.out_dir}/{msg.metadata.message_type}-r{msg.content['config']['server-round']}"
            f"-p{context.node_config['partition-id']}-{uuid4().hex[:8]}"
        )
        Path(stem + ".sent").write_bytes(message_to_proto(msg).SerializeToString())
        Path(stem + ".reply").write_bytes(message_to_proto(reply).SerializeToString())
        return reply


def _device_embeddings(cfg: RunConfig, devices: int) -> np.ndarray:
    """What each simulated device computes for itself (same extractor, same utterances)."""
    from client.data import device_data
    from shared.data.prepare import open_prepared, speaker_embedder_path
    from shared.models.speaker_embedding import load_speaker_embedder

    embedder = load_speaker_embedder(speaker_embedder_path(open_prepared(cfg).artifacts, cfg))
    rows = []
    for pid in range(devices):
        data = device_data(cfg, pid)
        rows.append(
            embedder.embed_speaker([data.features.features(u) for u in [*data.train, *data.eval]]).numpy().astype(np.float64)
        )
    return np.stack(rows)


@needs_espeak
def test_public_embeddings_are_computed_once_per_extractor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_workdir: TinyWorkdir
) -> None:
    """Every run on one set of artifacts (each arm of `chorus eval fairness`) seeds its centroids from the same
    public embeddings: the first computes and stores them, the next read them; a changed extractor does not."""
    import server.fairness
    from shared.data.dataset import FeatureCache
    from shared.data.prepare import open_prepared, speaker_embedder_path
    from shared.models.speaker_embedding import load_speaker_embedder, save_speaker_embedder

    cfg = RunConfig.from_flat({**FAIR_RUN, "workdir": str(tiny_workdir(tmp_path, FAIR_RUN))})
    prepared = open_prepared(cfg)
    path = speaker_embedder_path(prepared.artifacts, cfg)
    embedder = load_speaker_embedder(path)
    features = FeatureCache(prepared.corpus, prepared.cmvn)
    fresh = server.fairness.public_embeddings(embedder, prepared.split.public, prepared.corpus.by_speaker(), features)
    first = server.fairness.stored_public_embeddings(embedder, path, prepared, features)
    np.testing.assert_array_equal(first, fresh)

    def no_recompute(*args: object) -> np.ndarray:
        raise AssertionError("public embeddings recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(server.fairness, "public_embeddings", no_recompute)
        np.testing.assert_array_equal(server.fairness.stored_public_embeddings(embedder, path, prepared, features), fresh)

    with torch.no_grad():
        next(embedder.parameters()).add_(0.5)  # another extractor under the same file name
    save_speaker_embedder(path, embedder)
    changed = server.fairness.stored_public_embeddings(embedder, path, prepared, features)
    assert changed.shape == fresh.shape and not np.allclose(changed, fresh)


@pytest.mark.slow
@needs_espeak
def test_fairness_phases_through_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_workdir: TinyWorkdir) -> None:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    import client.client_app as client_app
    from server.fairness import public_embeddings
    from server.workflow import run_federation
    from shared.data.dataset import FeatureCache
    from shared.data.prepare import prepare, speaker_embedder_path
    from shared.models.speaker_embedding import load_speaker_embedder

    cfg = RunConfig.from_flat({**FAIR_RUN, "workdir": str(tmp_path / "work"), "run-id": "fair"})
    tiny_workdir(cfg.workdir_path, {**FAIR_RUN, "run-id": "fair"})  # with the public speaker embedder
    sensitive = sensitive_strings(cfg)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    exchanges = tmp_path / "exchanges"
    exchanges.mkdir()

    outer = ClientApp(mods=[RecordExchanges(exchanges)])

    def forward(msg: Message, context: Context) -> Message:
        return client_app.app(msg, with_run_config(context, cfg.to_flat()))

    outer.train()(forward)
    outer.evaluate()(forward)
    outer.query("kmeans")(forward)
    outer.query("fisher")(forward)
    server_app = ServerApp()
    run_dirs: list[Path] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_dirs.append(run_federation(grid, cfg))

    run_simulation(
        server_app=server_app,
        client_app=outer,
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 1, "num_gpus": 0}},
    )
    assert run_dirs, "the ServerApp did not finish"
    run_dir = run_dirs[0]

    # 1. The k-means phase through Flower equals the reference protocol on the same embeddings.
    prepared = prepare(cfg, progress=False)
    embedder = load_speaker_embedder(speaker_embedder_path(prepared.artifacts, cfg))
    public = public_embeddings(
        embedder, prepared.split.public, prepared.corpus.by_speaker(), FeatureCache(prepared.corpus, prepared.cmvn)
    )
    initial = init_centroids(public, 2, seed=cfg.train.seed)
    devices = _device_embeddings(cfg, 4)
    fairness = json.loads((run_dir / "fairness.json").read_text())
    expected = federated_kmeans(list(devices), initial, iterations=2)
    np.testing.assert_allclose(np.asarray(fairness["centroids"]), expected, atol=1e-6)
    labels = assign(devices, expected)
    assert fairness["cohort_sizes"] == np.bincount(labels, minlength=2).astype(float).tolist()

    # 2. Per-cohort counts from the devices pool to the overall device WER, every round.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert sum(records[0]["cohort_words"]) == records[0]["device_words"] > 0  # the starting model, per cohort
    for r in records[1:]:
        assert (r["train_replies"], r["train_failures"], r["eval_replies"], r["eval_failures"]) == (4, 0, 4, 0), r
        assert sum(r["cohort_words"]) == r["device_words"] > 0
        assert sum(r["cohort_errors"]) / sum(r["cohort_words"]) == pytest.approx(r["device_wer"])
        assert r["cohort_overall_wer"] == pytest.approx(r["device_wer"])
        assert sum(r["cohort_speakers"]) == 4
    targeted = records[2]["targeted_cohorts"]  # round 2 trains only the worst cohort's devices
    assert records[1]["train_contributors"] == 4
    assert records[2]["arw_mean_score"] == pytest.approx(0.5)  # the warm-up's uniform adversary: sigmoid(0)
    assert records[2]["train_contributors"] == sum(int(labels[d] in targeted) for d in range(4)) >= 1

    # 3. Every reply passes the audit against what its device was sent, and carries nothing sensitive.
    seen: dict[str, int] = {}
    for sent_path in sorted(exchanges.glob("*.sent")):
        kind = sent_path.name.split("-r")[0]
        seen[kind] = seen.get(kind, 0) + 1
        sent = message_from_proto(ProtoMessage.FromString(sent_path.read_bytes()))
        wire = Path(str(sent_path)[: -len(".sent")] + ".reply").read_bytes()
        reply = message_from_proto(ProtoMessage.FromString(wire))
        assert not reply.has_error(), f"{sent_path.name}: {reply.error.reason}"
        assert set(reply.content.keys()) == EXPECTED_RECORDS[kind], sent_path.name
        audit_reply(reply.content, sent.content)
        names = list(reply.content.keys()) + [k for r in reply.content.values() for k in r.keys()]
        assert not leaks(wire, names, sensitive), f"{sent_path.name} carries {leaks(wire, names, sensitive)}"
        if kind != p.KMEANS_QUERY:  # (a k-means sum of one embedding is that embedding: see the docs)
            assert not any(e.tobytes() in wire or e.astype(np.float32).tobytes() in wire for e in devices)
        if kind == MessageType.TRAIN:
            arrays = reply.content["arrays"]
            assert any(k.startswith(p.ADVERSARY_PREFIX) for k in arrays.keys())
            if reply.content["metrics"]["num-examples"] == 0:  # not targeted: the global arrays, unchanged
                assert all(arrays[k].data == sent.content["arrays"][k].data for k in arrays.keys())
            # population ARW: round 1 (warm-up) measures the population, round 2 is normalized by it
            config = sent.content["config"]
            assert (p.ARW_MEAN_SCORE in config) == (config["server-round"] == 2), sent_path.name
            assert set(p.ARW_METRICS) <= set(reply.content["metrics"].keys())
    # 3 k-means passes (2 iterations + assignment), 1 Fisher, an evaluation of the starting model, and 2 rounds
    # of train + evaluate, 4 devices each
    assert seen == {p.KMEANS_QUERY: 12, p.FISHER_QUERY: 4, MessageType.TRAIN: 8, MessageType.EVALUATE: 12}
    assert "Fairness: automatic cohorts" in (run_dir / "report.md").read_text()

    # 4. fairness.fisher=public: the same estimator on the server, on public speakers' utterances.
    from server.fairness import public_fisher
    from shared.models.checkpoint import initial_model

    model = initial_model(cfg.model)
    public_utts = [u for s in prepared.split.public for u in prepared.corpus.by_speaker()[s]]
    sums = public_fisher(
        model,
        public_utts,
        features=FeatureCache(prepared.corpus, prepared.cmvn),
        tokenizer=prepared.tokenizer,
        batch_frames=cfg.train.batch_frames,
    )
    fisher = normalized_fisher(sums, [n for n, _ in model.named_parameters()])
    assert set(fisher) == {n for n, _ in model.named_parameters()} and sums.count >= 1
    values = torch.cat([f.flatten() for f in fisher.values()])
    assert bool((values >= 0).all()) and float(values.mean()) == pytest.approx(1.0, rel=1e-4)


def test_train_instruction_round_trips_through_the_config_and_names_a_bad_value() -> None:
    sent = p.TrainInstruction(
        target_cohorts=(0, 2), ewc_lambda=5.0, arw_lr=0.01, arw_frozen=False, arw_mean_score=0.5, arw_weighted_loss=1.25
    )
    config = sent.to_config(ConfigRecord({"server-round": 3}))
    assert p.TrainInstruction.from_config(config) == sent
    assert p.TrainInstruction.from_config(ConfigRecord({"server-round": 3})) == p.TrainInstruction()  # a plain round
    with pytest.raises(p.ProtocolError, match="'arw-frozen' must be true or false"):
        p.TrainInstruction.from_config(ConfigRecord({p.ARW_FROZEN: 1}))
    with pytest.raises(p.ProtocolError, match="'target-cohorts' must be cohort ids"):
        p.TrainInstruction.from_config(ConfigRecord({p.TARGET_COHORTS: [0.5]}))
