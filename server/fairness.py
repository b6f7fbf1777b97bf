"""The server's side of fairness without demographics: the phases before round 1 and the hooks of each round.

``server/workflow.py`` calls :meth:`FairnessRounds.start` when ``fairness.enabled`` is set and then drives its
rounds through :meth:`FairnessRounds.wrap` (the run's Flower strategy with the fairness additions: the round
loop stays the same); the math lives in ``shared/fairness`` (cohorts, EWC, ARW) and the message contract in
``shared/fairness/protocol.py``. All phases use Flower's Message API through the server's one send/receive path
(``server/exchange.py``: the ``strategy.max-in-flight`` window, and every reply validated) with ``query.kmeans`` /
``query.fisher`` messages, and extra records on the strategy's train / evaluate messages.

Before round 1 (:meth:`FairnessRounds.start`):
    1. **Initial centroids**: the public speaker-embedding extractor (trained by ``prepare`` on the public
       speakers) embeds each public speaker; k-means++ on those embeddings picks ``fairness.num-cohorts``
       centroids. Nothing federated is involved.
    2. **Federated k-means** (``query.kmeans``, every connected device): ``fairness.kmeans-iterations`` Lloyd
       iterations, each one round trip: the server sends the centroids, each device returns dense per-cluster
       sums and counts of its own embedding (optionally noised), the server divides summed sums by summed
       counts (``cohorts.server_update``). A last pass sends the final centroids: devices store their cohort id
       in ``context.state`` and the summed counts give the cohort sizes. A cluster under
       ``fairness.min-cohort-devices`` is merged into its neighbours (its centroid dropped, the rest re-centred
       once), so a cohort's figures are never a few devices' own.
    3. **Fisher** for EWC (``fairness.ewc-lambda`` > 0): ``fisher=federated`` asks every device for Fisher sums
       on its training utterances (``query.fisher``) and divides the summed sums by the summed minibatch count;
       ``fisher=public`` computes the same estimator on public speakers' utterances on the server. Either way the
       Fisher is normalized to mean 1 over all parameters, so ``ewc-lambda`` means the same for every model size.
    4. **Adversary** for ARW (``fairness.arw``): a zero-initialized (uniform) ``Adversary`` over 3 utterance
       statistics + the embedding.

Each round:
    * **train** (:meth:`configure_train`): the strategy's messages, plus the Fisher (EWC; the anchor theta* is the
      round's global model, which the device has anyway), the adversary's arrays inside ``arrays``
      (``arw.*``), and in a **targeted round** (the last ``fairness.targeted-rounds`` rounds) the centroids and
      the ids of the ``fairness.target-cohorts`` worst cohorts of the latest disaggregated evaluation. A device
      decides locally whether its cohort is targeted; one that is not returns the global arrays unchanged with
      ``num-examples`` 0.
    * **aggregate** (:meth:`aggregate_train`): replies with weight 0 are left out (FedAvg would give them no say
      anyway; a median would count them), the strategy aggregates the rest, and the adversary's arrays are split
      off the model's. A round where no device trained keeps the global model.
    * **evaluate** (:meth:`configure_evaluate` / :meth:`evaluated`): the centroids go with the model; each device
      adds dense per-cohort (errors, words, speakers) vectors to its error counts; the server sums them and
      reports per-cohort WER, pooled WER, WER gap, bottom-cohort share and variance (``cohorts.cohort_report``).

ARW schedule: the adversary is frozen at uniform weights for the first ``fairness.arw-warmup`` rounds; after
that, on every local step of every training device, the learner takes its step with the current adversary's
weights and then the adversary takes one ascent step on the same batch (``arw.AdversarialReweighter``); the
adversary's arrays are averaged with the model's (same FedAvg weights) and sent back next round. With
``fairness.arw-normalization=batch`` weights are normalized within each device's batch (ARL's in-batch form):
with one speaker per device, this reweights a speaker's utterances (long, noisy, hard ones up), not speakers
against each other. With ``population``, every ARW reply carries its ``ScoreSums`` (summed adversary scores,
utterance-steps, score x loss); the server sums them into ``PopulationStats`` (mean score m, score-weighted loss
L_w) and sends them with the next round, where a device weighs utterance i by ``(1 + s_i / m) / 2`` (Lahoti's form
normalized over the federation, halved to mean 1 so that ARW does not rescale the loss: ``arw.LEARNER_SCALE``) and
its adversary ascends the population surrogate (``arw.population_surrogate``).
Adam's invariance to a constant loss scale would erase a device-wide factor, so the server also hands the
strategy each update weighted by its ARL weight mass (the reply's ``arw-weight``, num-examples x the device's mean
weight) instead of its utterance count: a device the adversary scores high pulls the average toward its update.

Under SecAgg+ (``strategy.secure-aggregation``) each k-means iteration, each round's per-cohort counts and the
federated Fisher (two sums: :func:`_secure_fisher`) are secure sums (``server/secagg.py``: the SecAgg+ protocol on
a train message carrying ``protocol.SECURE_SUM``); the server learns only the totals, and a device refuses to send
any of them in plain. In the train phase a device's weight (0 outside a targeted round's cohorts, the ARL weight
mass under population ARW) and its metrics (ARW's ``ScoreSums`` among them) ride in the masked update
(``shared/privacy/secure_reply.py``): the server reads weighted means, from which ``PopulationStats`` follow
exactly, and never learns which devices trained.

What the server learns without SecAgg+:
    * k-means: each device's reply has one non-zero row, so the server learns each device's cluster
      (its cohort) and its embedding, unless ``fairness.kmeans-noise`` is large; with noise it learns a noised
      embedding. With SecAgg+ it learns only per-cluster totals.
    * disaggregated evaluation: each device's vectors are non-zero at its cohort id only: without SecAgg+
      the server learns every evaluating device's cohort and its WER (which it already learns from the metrics).
    * targeted rounds: a reply with ``num-examples`` 0 (and unchanged arrays) tells the server the device is not
      in a targeted cohort; a positive weight tells it the device is in one of them.
    * Fisher sums: squared gradients on the device's data (model-shaped, like an update).
    * ARW: the adversary's update (inside ``arrays``) and four scalars: summed scores, utterance-steps, summed
      score x loss and the weight mass; a device's scores are a projection of its inputs that the adversary's
      update already carries. All are summable: SecAgg+ leaves the server only their weighted means.
    * The speaker embedding itself, utterance statistics, transcripts and cohort ids as such never leave a device.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import math
import operator
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from torch import Tensor, nn

from server.exchange import exchange
from server.secagg import secure_sum
from shared.config import ConfigError, RunConfig, SecAggConfig, StrategyConfig
from shared.data.corpora import Utterance
from shared.data.dataset import FeatureCache, make_batches
from shared.data.prepare import Prepared, speaker_embedder_path
from shared.data.tokenizer import Tokenizer
from shared.fairness import protocol as p
from shared.fairness.arw import UTTERANCE_STATISTICS, Adversary, PopulationStats, ScoreSums
from shared.fairness.cohorts import CohortCounts, CohortReport, cohort_report, init_centroids, server_update, undersized_cluster
from shared.fairness.ewc import FisherSums, add_fisher_sums, fisher_sums
from shared.files import torch_save_atomic, write_bytes_atomic, write_text_atomic
from shared.models.checkpoint import sha256_of
from shared.models.speaker_embedding import SpeakerEmbedder, load_speaker_embedder
from shared.records import metric_record, scalar

__all__ = [
    "FairStrategy",
    "FairnessRounds",
    "discover_cohorts",
    "federated_fisher",
    "normalized_fisher",
    "public_embeddings",
    "public_fisher",
    "stored_public_embeddings",
    "sum_cohort_eval",
    "worst_cohorts",
]

log = logging.getLogger("chorus.server.fairness")

_PUBLIC_FISHER_UTTERANCES = 256  # enough minibatches for a stable diagonal; a pass costs about one local round
_ADVERSARY_FILE = "adversary.pt"
_LOG_FILE = "fairness-log.json"  # the evaluations so far, committed with each round's checkpoint
_POPULATION_FILE = "arw-population.json"  # population ARW's normalizers for the next round, beside the adversary


# -- Flower plumbing -------------------------------------------------------------------------------------------


def _wait_for_nodes(grid: Grid, minimum: int, *, poll: float = 1.0) -> list[int]:
    """Every connected device, once at least ``minimum`` are connected (as Flower's strategies wait)."""
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        log.info("waiting for devices: %d connected, %d needed", len(nodes), minimum)
        time.sleep(poll)
    return nodes


def _centroid_record(centroids: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"centroids": Array(np.ascontiguousarray(centroids, dtype=np.float64))})


def _summed(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of one or more arrays, in order."""
    return functools.reduce(operator.add, arrays)


def _reply_array(reply: Message, record: str, key: str) -> np.ndarray:
    content = reply.content.get(record)
    if not isinstance(content, ArrayRecord) or key not in content:
        raise p.ProtocolError(f"device {reply.metadata.src_node_id}'s reply has no {record!r}/{key!r} array")
    return content[key].numpy()


# -- phases before round 1 --------------------------------------------------------------------------------------


def public_embeddings(
    embedder: SpeakerEmbedder, speakers: Sequence[str], by_speaker: dict[str, list[Utterance]], features: FeatureCache
) -> np.ndarray:
    """(N, E) one embedding per public speaker with usable audio, as a device computes its own (the normalized
    mean of the embeddings of all its utterances)."""
    rows = []
    for speaker in speakers:
        feats = [f for u in by_speaker.get(speaker, []) if (f := features.features(u)) is not None]
        if feats:
            rows.append(embedder.embed_speaker(feats).numpy().astype(np.float64))
    if not rows:
        raise ValueError("no public speaker has usable audio to embed")
    return np.stack(rows)


def stored_public_embeddings(
    embedder: SpeakerEmbedder, embedder_path: Path, prepared: Prepared, features: FeatureCache
) -> np.ndarray:
    """``public_embeddings`` of the run's public speakers, computed once and kept beside the extractor (named by
    its digest): every run on these artifacts, e.g. each arm of an evaluation, seeds its centroids from them."""
    stored = embedder_path.with_name(f"public-embeddings-{sha256_of(embedder_path)[:16]}.npy")
    if stored.is_file():
        return np.load(stored)
    public = public_embeddings(embedder, prepared.split.public, prepared.corpus.by_speaker(), features)
    buffer = io.BytesIO()
    np.save(buffer, public)
    write_bytes_atomic(stored, buffer.getvalue())
    return public


def _secure_sum(
    grid: Grid,
    nodes: Sequence[int],
    content: RecordDict,
    record: str,
    shapes: dict[str, tuple[int, ...]],
    *,
    secagg: SecAggConfig,
    strategy: StrategyConfig,
    phase: str,
) -> tuple[dict[str, np.ndarray], int]:
    """The devices' ``record`` arrays (k-means statistics, per-cohort counts, Fisher norms or sums) summed over
    ``nodes`` under SecAgg+, and how many devices are in the sum: the server learns only the totals
    (``server/secagg.py``)."""
    content = RecordDict(dict(content.items()))
    content[p.SECURE_SUM] = ConfigRecord({"sum": record})
    content["arrays"] = ArrayRecord({key: Array(np.zeros(shape)) for key, shape in shapes.items()})
    result = secure_sum(grid, nodes, content, secagg, timeout=strategy.timeout, phase=phase)
    if result.sums is None:
        raise RuntimeError(
            f"{phase}: SecAgg+ summed nothing ({result.failed} of {len(nodes)} devices failed or the protocol halted)"
        )
    return result.sums, result.contributed


def discover_cohorts(
    grid: Grid,
    node_ids: Sequence[int],
    centroids: np.ndarray,
    *,
    iterations: int,
    noise_std: float = 0.0,
    min_devices: int = 0,
    strategy: StrategyConfig = StrategyConfig(),
    secagg: SecAggConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Federated k-means over the devices ``node_ids`` (``query.kmeans``, or with ``secagg`` a secure sum of
    the same statistics: the server sees only the per-cluster totals).

    ``iterations`` Lloyd updates, then one assignment-only pass with the final centroids (devices keep their
    cohort id; the summed counts are the cohort sizes). While a cluster counts fewer than ``min_devices``
    (``fairness.min-cohort-devices``), the smallest is dropped and the others re-centred once (two more passes):
    its devices join their nearest remaining cohort. The same as ``cohorts.federated_kmeans`` over the devices'
    embeddings when every device answers and ``noise_std`` is 0 (under SecAgg+, up to quantization).

    Returns:
        (C', E) final centroids (C' <= C), (C',) summed counts of the last pass, the centroid shift (L2 norm)
        of every update.
    """
    if iterations < 0:
        raise ValueError(f"fairness.kmeans-iterations must be >= 0, got {iterations}")
    current = np.asarray(centroids, dtype=np.float64)
    # Summed noise has std noise_std * sqrt(devices): a cluster needs a clearly positive count to move.
    min_count = max(0.5, 3.0 * noise_std * math.sqrt(len(node_ids)))
    shifts: list[float] = []
    updates_left, iteration = iterations, 0
    while True:
        content = RecordDict(
            {
                p.CENTROIDS: _centroid_record(current),
                "config": ConfigRecord({"server-round": 0, "iteration": iteration, p.KMEANS_NOISE: float(noise_std)}),
            }
        )
        phase = f"k-means iteration {iteration}"
        if secagg is not None:
            total, _ = _secure_sum(
                grid,
                node_ids,
                content,
                p.KMEANS_STATS,
                {"sums": current.shape, "counts": current.shape[:1]},
                secagg=secagg,
                strategy=strategy,
                phase=phase,
            )
            sums, counts = total["sums"], total["counts"]
        else:
            messages = [Message(content=content, dst_node_id=node, message_type=p.KMEANS_QUERY) for node in node_ids]
            replies = exchange(grid, messages, phase=phase, strategy=strategy).ok
            if not replies:
                raise RuntimeError(f"no device answered k-means iteration {iteration}")
            sums = _summed(_reply_array(r, p.KMEANS_STATS, "sums") for r in replies)
            counts = _summed(_reply_array(r, p.KMEANS_STATS, "counts") for r in replies)
        iteration += 1
        if updates_left > 0:
            updated = server_update(current, sums, counts, min_count=min_count)
            shifts.append(float(np.linalg.norm(updated - current)))
            current, updates_left = updated, updates_left - 1
            continue
        small = undersized_cluster(counts, min_devices)
        if small is None:
            return current, np.asarray(counts, dtype=np.float64), shifts
        current, updates_left = np.delete(current, small, axis=0), 1


def federated_fisher(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    *,
    strategy: StrategyConfig = StrategyConfig(),
    secagg: SecAggConfig | None = None,
) -> FisherSums:
    """The devices' summed Fisher sums of the global model ``arrays`` (``query.fisher``), or with ``secagg`` the
    same sums out of two secure sums (:func:`_secure_fisher`): the server sees only totals."""
    if secagg is not None:
        return _secure_fisher(grid, node_ids, arrays, strategy=strategy, secagg=secagg)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 0})})
    messages = [Message(content=content, dst_node_id=node, message_type=p.FISHER_QUERY) for node in node_ids]
    replies = exchange(grid, messages, phase="Fisher", strategy=strategy).ok
    if not replies:
        raise RuntimeError("no device answered the Fisher phase")
    parts = []
    for reply in replies:
        record = reply.content.get(p.FISHER_SUMS)
        if not isinstance(record, ArrayRecord):
            raise p.ProtocolError(f"device {reply.metadata.src_node_id}'s Fisher reply has no {p.FISHER_SUMS!r}")
        parts.append(
            FisherSums(
                sums={k: v.float() for k, v in record.to_torch_state_dict().items()},
                count=int(scalar(metric_record(reply.content, "metrics"), p.FISHER_BATCHES)),
            )
        )
    return add_fisher_sums(parts)


def _secure_fisher(
    grid: Grid, node_ids: Sequence[int], arrays: ArrayRecord, *, strategy: StrategyConfig, secagg: SecAggConfig
) -> FisherSums:
    """The Fisher sums under SecAgg+, in two secure sums.

    Squared gradients span many orders of magnitude, and a secure sum quantizes each summand to a fixed step
    (``quantization_step x max-weight``) within +-``SecAggConfig.sum_bound``: summed as they are, most entries
    would round to noise or be clipped. So first each device sends, per model key, a one-hot of the power of 2
    just above its largest Fisher sum, and its minibatch count: summed, a histogram whose top bucket bounds every
    device's largest entry within a factor 2. The server scales each key so that this bound becomes ``sum_bound``
    (the most precision that cannot clip), the second secure sum returns sum over devices of (Fisher sums x
    scale), and the server divides by the scale again: the plain protocol's sums, up to ``devices x step / scale``
    per entry."""
    config = ConfigRecord({"server-round": 0})
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    exponents = p.PEAK_EXPONENTS
    histogram, _ = _secure_sum(
        grid,
        node_ids,
        RecordDict({p.GLOBAL_MODEL: arrays, "config": config}),
        p.FISHER_PEAKS,
        {"peaks": (len(shapes), len(exponents)), "batches": (1,)},
        secagg=secagg,
        strategy=strategy,
        phase="Fisher peaks",
    )
    scale = np.zeros(len(shapes))
    for row, counts in enumerate(histogram["peaks"]):
        present = np.flatnonzero(counts > 0.5)  # counts are whole numbers; the quantization moves them by << 0.5
        if present.size:  # else no device has a non-zero entry: the key's Fisher is 0, whatever the scale
            scale[row] = secagg.sum_bound / 2.0 ** (exponents.start + int(present[-1]))
    sums, _ = _secure_sum(
        grid,
        node_ids,
        RecordDict({p.GLOBAL_MODEL: arrays, p.FISHER_SCALE: ArrayRecord({"scale": Array(scale)}), "config": config}),
        p.FISHER_SUMS,
        {**shapes, p.FISHER_BATCHES: (1,)},
        secagg=secagg,
        strategy=strategy,
        phase="Fisher sums",
    )
    fisher = {
        k: torch.from_numpy(sums[k] / factor if factor > 0 else np.zeros(shape)).float()
        for (k, shape), factor in zip(shapes.items(), scale, strict=True)
    }
    return FisherSums(sums=fisher, count=round(float(sums[p.FISHER_BATCHES][0])))


def public_fisher(
    model: nn.Module, utterances: Sequence[Utterance], *, features: FeatureCache, tokenizer: Tokenizer, batch_frames: int
) -> FisherSums:
    """The same estimator on public speakers' utterances, on the server (an even spread of at most 256)."""
    chosen = list(utterances)[:: max(1, len(utterances) // _PUBLIC_FISHER_UTTERANCES)][:_PUBLIC_FISHER_UTTERANCES]
    batches = make_batches(chosen, features=features, tokenizer=tokenizer, max_frames=batch_frames, shuffle=False, seed=0)
    return fisher_sums(model, batches)


def normalized_fisher(sums: FisherSums, parameter_names: Iterable[str]) -> dict[str, Tensor]:
    """The diagonal empirical Fisher (sums / minibatches) of the named parameters, scaled to mean 1 over all
    their entries: the penalty ``lambda * sum F (theta - theta*)^2`` then has the same meaning for any model
    (``lambda`` weighs an average parameter's squared drift), and only the Fisher's shape across parameters
    matters, which is what EWC uses it for."""
    names = list(parameter_names)
    missing = [n for n in names if n not in sums.sums]
    if missing:
        raise ValueError(f"Fisher sums lack parameters {missing[:5]}")
    if sums.count <= 0:
        raise ValueError(f"Fisher sums cover {sums.count} minibatches")
    fisher = {n: sums.sums[n].float().clamp(min=0) / sums.count for n in names}
    mean = float(sum(f.sum() for f in fisher.values()) / max(1, sum(f.numel() for f in fisher.values())))
    if not mean > 0:
        raise ValueError("the Fisher is zero everywhere: the loss has no gradient at the global model")
    return {n: f / mean for n, f in fisher.items()}


# -- per round -----------------------------------------------------------------------------------------------


def sum_cohort_eval(replies: Iterable[Message], num_cohorts: int) -> CohortCounts:
    """Sum the devices' dense per-cohort (errors, words, speakers) vectors (what SecAgg+ would hand over)."""
    total = CohortCounts(*(np.zeros(num_cohorts) for _ in p.COHORT_EVAL_KEYS))
    for reply in replies:
        vectors = [_reply_array(reply, p.COHORT_EVAL, key) for key in p.COHORT_EVAL_KEYS]
        if any(v.shape != (num_cohorts,) for v in vectors):
            raise p.ProtocolError(f"device {reply.metadata.src_node_id}'s {p.COHORT_EVAL!r} vectors are not ({num_cohorts},)")
        total = total + CohortCounts(*vectors)
    return total


def worst_cohorts(report: CohortReport, count: int) -> list[int]:
    """The ``count`` ranked cohorts with the highest WER (highest first; lower id first on ties)."""
    if count < 1:
        raise ValueError(f"fairness.target-cohorts must be >= 1, got {count}")
    ranked = sorted(report.eligible, key=lambda k: (-float(report.wer[k]), k))
    return ranked[:count]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _report_fields(report: CohortReport | None, counts: CohortCounts) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "cohort_words": counts.words.tolist(),
        "cohort_speakers": counts.speakers.tolist(),
        "cohort_errors": counts.errors.tolist(),
    }
    if report is None:
        return fields
    fields.update(
        {
            "cohort_wer": [_finite(w) for w in report.wer],
            "cohort_overall_wer": report.overall_wer,
            "cohort_worst": report.worst_cohort,
            "cohort_worst_wer": report.worst_wer,
            "cohort_best_wer": report.best_wer,
            "cohort_wer_gap": _finite(report.wer_gap),
            "cohort_bottom_share": report.bottom_cohort_share,
            "cohort_wer_variance": report.wer_variance,
        }
    )
    return fields


def _validate(cfg: RunConfig) -> None:
    """What ``FairnessConfig`` cannot check alone (it checks its own keys)."""
    f = cfg.fairness
    if f.targeted_rounds > cfg.num_server_rounds:
        raise ConfigError(f"fairness.targeted-rounds={f.targeted_rounds} exceeds num-server-rounds={cfg.num_server_rounds}")
    if cfg.dp.enabled and (f.ewc_lambda > 0 or f.arw or f.targeted_rounds > 0):
        raise ConfigError(
            "dp.enabled: EWC (fairness.ewc-lambda), ARW (fairness.arw) and targeted rounds "
            "(fairness.targeted-rounds) are not DP-SGD rounds; use them without DP (cohort discovery "
            "and disaggregated evaluation work with DP, outside its guarantee)"
        )


@dataclass
class FairnessRounds:
    """The fairness state of one federated run, and the hooks the round loop calls.

    Attributes:
        cfg: the run config.
        centroids: (C, E) the automatic cohorts' centroids after federated k-means.
        cohort_sizes: (C,) devices per cohort in the last k-means pass.
        fisher: parameter name -> normalized Fisher (EWC), or None.
        adversary: the federated ARW adversary, or None.
        population: population ARW's normalizers from the last round's replies (None before the first).
        last_report: the latest disaggregated evaluation (what targeted rounds target).
        log: JSON-ready records: discovery, then one per evaluated round.
        grid: where the per-cohort counts are summed under SecAgg+ (``strategy.secure-aggregation``).
    """

    cfg: RunConfig
    centroids: np.ndarray
    cohort_sizes: np.ndarray
    fisher: dict[str, Tensor] | None = None
    adversary: Adversary | None = None
    population: PopulationStats | None = None
    last_report: CohortReport | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    grid: Grid | None = None
    _round_notes: dict[int, dict[str, Any]] = field(default_factory=dict)

    # -- before round 1 ----------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        grid: Grid,
        cfg: RunConfig,
        *,
        prepared: Prepared,
        model: nn.Module,
        run_dir: Path | None = None,
        resume: bool = False,
    ) -> FairnessRounds:
        """Cohort discovery, the Fisher (with EWC) and the adversary (with ARW); see the module docstring."""
        _validate(cfg)
        f = cfg.fairness
        path = speaker_embedder_path(prepared.artifacts, cfg)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: prepare the run with fairness.enabled=true first")
        embedder = load_speaker_embedder(path)
        features = FeatureCache(prepared.corpus, prepared.cmvn)
        by_speaker = prepared.corpus.by_speaker()
        public = stored_public_embeddings(embedder, path, prepared, features)
        if public.shape[0] < f.num_cohorts:
            raise ConfigError(
                f"fairness.num-cohorts={f.num_cohorts} exceeds the {public.shape[0]} public speakers "
                f"that seed the centroids (split.public-speakers)"
            )
        initial = init_centroids(public, f.num_cohorts, seed=cfg.train.seed)
        nodes = _wait_for_nodes(grid, cfg.strategy.min_available_nodes)
        start = time.monotonic()
        secagg = cfg.secagg if cfg.strategy.secure_aggregation else None
        centroids, sizes, shifts = discover_cohorts(
            grid,
            nodes,
            initial,
            iterations=f.kmeans_iterations,
            noise_std=f.kmeans_noise,
            min_devices=f.min_cohort_devices,
            strategy=cfg.strategy,
            secagg=secagg,
        )
        state = cls(cfg=cfg, centroids=centroids, cohort_sizes=sizes, grid=grid)
        state.log.append(
            {
                "phase": "kmeans",
                "devices": len(nodes),
                "iterations": f.kmeans_iterations,
                "secure": secagg is not None,
                "noise": f.kmeans_noise,
                "merged": f.num_cohorts - len(sizes),  # clusters under fairness.min-cohort-devices
                "cohort_sizes": sizes.tolist(),
                "shifts": shifts,
                "seconds": round(time.monotonic() - start, 3),
            }
        )
        print(
            f"cohort discovery: {len(nodes)} devices, {f.kmeans_iterations} k-means iterations, cohort sizes "
            f"{[round(float(s), 2) for s in sizes]}",
            flush=True,
        )
        if f.ewc_lambda > 0:
            start = time.monotonic()
            if f.fisher == "federated":
                sums = federated_fisher(grid, nodes, ArrayRecord(model.state_dict()), strategy=cfg.strategy, secagg=secagg)
            else:
                public_utts = [u for s in prepared.split.public for u in by_speaker.get(s, [])]
                sums = public_fisher(
                    model, public_utts, features=features, tokenizer=prepared.tokenizer, batch_frames=cfg.train.batch_frames
                )
            state.fisher = normalized_fisher(sums, [n for n, _ in model.named_parameters()])
            state.log.append(
                {"phase": "fisher", "source": f.fisher, "minibatches": sums.count, "seconds": round(time.monotonic() - start, 3)}
            )
        if resume and run_dir is not None:
            state.restore_log(run_dir)
        if f.arw:
            torch.manual_seed(cfg.train.seed)
            state.adversary = Adversary(UTTERANCE_STATISTICS + embedder.config.embedding_dim, hidden_dim=f.arw_hidden)
            saved = None if run_dir is None else run_dir / "checkpoints" / _ADVERSARY_FILE
            if resume and saved is not None and saved.is_file():
                state.adversary.load_state_dict(torch.load(saved, weights_only=True))
        return state

    # -- hooks of each round -------------------------------------------------------------------------------------

    def is_targeted(self, server_round: int) -> bool:
        return server_round > self.cfg.num_server_rounds - self.cfg.fairness.targeted_rounds

    def configure_train(
        self, strategy: flwr_strategy.Strategy, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> list[Message]:
        """The strategy's train messages plus what EWC, ARW and a targeted round need."""
        f = self.cfg.fairness
        instruction = p.TrainInstruction()
        notes = self._round_notes.setdefault(server_round, {})
        if self.is_targeted(server_round):
            if self.last_report is None:  # the first round is targeted: rank cohorts on the current model
                self._evaluate_before(strategy, server_round, arrays, grid)
            if self.last_report is None:
                raise RuntimeError(f"round {server_round} is targeted but no device evaluation has any words")
            targets = worst_cohorts(self.last_report, f.target_cohorts)
            instruction = replace(instruction, target_cohorts=tuple(targets))
            notes["targeted_cohorts"] = targets
        if self.fisher is not None:
            instruction = replace(instruction, ewc_lambda=float(f.ewc_lambda))
        if self.adversary is not None:
            instruction = replace(instruction, arw_lr=float(f.arw_lr), arw_frozen=server_round <= f.arw_warmup)
            if f.arw_normalization == "population" and self.population is not None:
                instruction = replace(
                    instruction, arw_mean_score=self.population.mean_score, arw_weighted_loss=self.population.weighted_loss
                )
                notes.update(arw_mean_score=self.population.mean_score, arw_weighted_loss=self.population.weighted_loss)
            arrays = ArrayRecord(p.join_adversary(arrays.to_torch_state_dict(), self.adversary.state_dict()))
        messages = list(strategy.configure_train(server_round, arrays, instruction.to_config(ConfigRecord()), grid))
        extra = RecordDict()
        if self.fisher is not None:
            extra[p.FISHER] = ArrayRecord(self.fisher)
        if instruction.target_cohorts is not None:
            extra[p.CENTROIDS] = _centroid_record(self.centroids)
        for message in messages:
            for name, record in extra.items():
                message.content[name] = record
        return messages

    def aggregate_train(
        self, strategy: flwr_strategy.Strategy, server_round: int, replies: Sequence[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies of devices that trained (weight > 0); split the adversary off the model."""
        contributing = [m for m in replies if float(scalar(metric_record(m.content, "metrics"), "num-examples")) > 0]
        # Under SecAgg+ a device's weight is masked: how many of them trained is not known to the server.
        known = not self.cfg.strategy.secure_aggregation
        self._round_notes.setdefault(server_round, {})["train_contributors"] = len(contributing) if known else None
        if not contributing:
            log.warning(
                "round %d: no device trained (none in the targeted cohorts answered): the global model is kept", server_round
            )
            return None, None
        if self.adversary is not None:
            contributing = self._population_round(server_round, contributing)
        arrays, metrics = strategy.aggregate_train(server_round, contributing)
        if arrays is None:
            return None, metrics
        model_state, adversary_state = p.split_adversary(arrays.to_torch_state_dict())
        if self.adversary is not None:
            self.adversary.load_state_dict({k: v.float() for k, v in adversary_state.items()})
        elif adversary_state:
            raise p.ProtocolError(f"replies carry adversary arrays {sorted(adversary_state)[:3]} but ARW is off")
        return ArrayRecord(model_state), metrics

    def _population_round(self, server_round: int, replies: list[Message]) -> list[Message]:
        """ARW: the next round's ``PopulationStats`` from the replies' summed ``ScoreSums``; under population
        normalization, the replies as the strategy should weigh them (``num-examples`` := ``arw-weight``). Notes
        the round's range of device mean weights (``arw_weight_min`` / ``arw_weight_max``) when they are in the clear.

        Under SecAgg+ every reply carries the same masked slots, (sum over devices) / (summed weight), and the
        devices weighed their own updates: the ratios that make ``PopulationStats`` are the same."""
        secure = self.cfg.strategy.secure_aggregation
        needed = p.ARW_METRICS[:3] if secure else p.ARW_METRICS
        totals = ScoreSums(0.0, 0.0, 0.0)
        for reply in replies:
            metrics = metric_record(reply.content, "metrics")
            missing = [k for k in needed if k not in metrics]
            if missing:
                raise p.ProtocolError(f"an ARW train reply from node {reply.metadata.src_node_id} lacks the metrics {missing}")
            score, count, score_loss = (float(scalar(metrics, k)) for k in p.ARW_METRICS[:3])
            totals = totals + ScoreSums(score, count, score_loss)
        if totals.count > 0 and totals.score > 0:
            self.population = totals.population()
        if secure:
            return replies
        # How far ARW reweighs devices against each other: each device's mean ARL weight (2 for every device
        # under in-batch normalization, whose weights sum to 2n on each device; population ARW spreads them).
        means = [
            float(scalar(m, p.ARW_WEIGHT)) / float(scalar(m, "num-examples"))
            for m in (metric_record(reply.content, "metrics") for reply in replies)
        ]
        self._round_notes.setdefault(server_round, {}).update(arw_weight_min=min(means), arw_weight_max=max(means))
        if self.cfg.fairness.arw_normalization != "population":
            return replies
        weighted = []  # copies: the strategy weighs by num-examples, and here that is the ARL weight mass
        for reply in replies:
            metrics = metric_record(reply.content, "metrics")
            content = RecordDict(
                {**reply.content, "metrics": MetricRecord({**metrics, "num-examples": float(scalar(metrics, p.ARW_WEIGHT))})}
            )
            weighted.append(make_message(copy.deepcopy(reply.metadata), content))
        return weighted

    def configure_evaluate(
        self, strategy: flwr_strategy.Strategy, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> list[Message]:
        """The strategy's evaluate messages, with the centroids (the device's cohort is the nearest one). Under
        SecAgg+ the centroids go in the secure sum that follows instead (:meth:`cohort_counts`)."""
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        if not self.cfg.strategy.secure_aggregation:
            for message in messages:
                message.content[p.CENTROIDS] = _centroid_record(self.centroids)
        return messages

    def cohort_counts(self, server_round: int, replies: Sequence[Message]) -> CohortCounts:
        """The evaluating devices' per-cohort (errors, words, speakers), summed: from their replies, or under
        SecAgg+ in a secure sum over the devices that answered (each kept its counts of ``server_round``)."""
        num_cohorts = self.centroids.shape[0]
        if not self.cfg.strategy.secure_aggregation:
            return sum_cohort_eval(replies, num_cohorts)
        if self.grid is None:
            raise RuntimeError("a secure per-cohort sum needs the grid FairnessRounds.start was given")
        content = RecordDict(
            {p.CENTROIDS: _centroid_record(self.centroids), "config": ConfigRecord({"server-round": server_round})}
        )
        sums, _ = _secure_sum(
            self.grid,
            [r.metadata.src_node_id for r in replies],
            content,
            p.COHORT_EVAL,
            {key: (num_cohorts,) for key in p.COHORT_EVAL_KEYS},
            secagg=self.cfg.secagg,
            strategy=self.cfg.strategy,
            phase=f"round {server_round} per-cohort counts",
        )
        return CohortCounts(*(np.rint(sums[key]) for key in p.COHORT_EVAL_KEYS))  # counts: whole numbers

    def evaluated(self, server_round: int, replies: Sequence[Message]) -> dict[str, Any]:
        """Sum the devices' per-cohort vectors; the fields for the round's metrics.jsonl line."""
        counts = self.cohort_counts(server_round, replies)
        self.last_report = _ranked(counts)
        fields = {**_report_fields(self.last_report, counts), **self._round_notes.pop(server_round, {})}
        self.log.append({"phase": "evaluate", "round": server_round, **fields})
        return fields

    def wrap(self, strategy: flwr_strategy.Strategy) -> FairStrategy:
        """The run's strategy as the round loop calls it, with this run's fairness hooks."""
        return FairStrategy(self, strategy)

    def round_fields(self, server_round: int) -> dict[str, Any]:
        """The fairness fields of round ``server_round``'s metrics.jsonl line (empty before it evaluated)."""
        entries = [e for e in self.log if e["phase"] == "evaluate" and e["round"] == server_round]
        return {k: v for k, v in entries[-1].items() if k not in ("phase", "round")} if entries else {}

    def restore_log(self, run_dir: Path) -> None:
        """A resumed run: the evaluations of the rounds the checkpoint committed (saved with it), so
        ``fairness.json`` covers the whole run and a targeted round ranks cohorts as the crashed run would, and
        population ARW's normalizers."""
        population = run_dir / "checkpoints" / _POPULATION_FILE
        if population.is_file():
            self.population = PopulationStats(**json.loads(population.read_text()))
        saved = run_dir / "checkpoints" / _LOG_FILE
        if not saved.is_file():
            return
        evaluations = [e for e in json.loads(saved.read_text()) if e["phase"] == "evaluate"]
        self.log.extend(evaluations)
        if evaluations:
            last = evaluations[-1]
            self.last_report = _ranked(
                CohortCounts(*(np.asarray(last[f"cohort_{k}"], dtype=np.float64) for k in ("errors", "words", "speakers")))
            )

    def save(self, run_dir: Path) -> None:
        """Keep the adversary and the log beside the round's checkpoint (a resumed run continues with them)."""
        write_text_atomic(run_dir / "checkpoints" / _LOG_FILE, json.dumps(self.log))
        if self.adversary is not None:
            path = run_dir / "checkpoints" / _ADVERSARY_FILE
            torch_save_atomic(path, self.adversary.state_dict())
            if self.population is not None:
                write_text_atomic(path.with_name(_POPULATION_FILE), json.dumps(self.population._asdict()))

    def finish(self, run_dir: Path) -> Path:
        """``fairness.json`` (centroids, cohort sizes, every evaluation) and a section of ``report.md``."""
        out = run_dir / "fairness.json"
        payload = {
            "centroids": self.centroids.tolist(),
            "cohort_sizes": self.cohort_sizes.tolist(),
            "config": {k: v for k, v in self.cfg.to_flat().items() if k.startswith("fairness.")},
            "log": self.log,
        }
        out.write_text(json.dumps(payload, indent=1) + "\n")
        report = run_dir / "report.md"
        if report.exists():
            report.write_text(report.read_text().rstrip("\n") + "\n\n" + "\n".join(self.report_lines()) + "\n")
        return out

    def report_lines(self) -> list[str]:
        lines = [
            "## Fairness: automatic cohorts (federated k-means on device speaker embeddings)",
            "",
            f"Cohort sizes (devices): {[round(float(s), 2) for s in self.cohort_sizes]}. Per-cohort WER from the "
            "devices' dense per-cohort counts (without SecAgg+ the server sees each device's cohort).",
            "",
            "| round | overall WER | worst cohort | worst WER | gap | bottom share | variance | targeted |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for entry in self.log:
            if entry["phase"] != "evaluate" or "cohort_wer" not in entry:
                continue
            gap = entry["cohort_wer_gap"]
            lines.append(
                f"| {entry['round']} | {entry['cohort_overall_wer']:.3f} | {entry['cohort_worst']} | "
                f"{entry['cohort_worst_wer']:.3f} | {'inf' if gap is None else format(gap, '.3f')} | "
                f"{entry['cohort_bottom_share']:.3f} | {entry['cohort_wer_variance']:.4f} | "
                f"{entry.get('targeted_cohorts', '–')} |"
            )
        return lines

    def _evaluate_before(self, strategy: flwr_strategy.Strategy, server_round: int, arrays: ArrayRecord, grid: Grid) -> None:
        """A disaggregated evaluation of the current model before a targeted first round (recorded as round-1
        "before"): the strategy samples devices as for any evaluation."""
        messages = self.configure_evaluate(strategy, server_round - 1, arrays, grid)
        replies = exchange(grid, messages, phase=f"round {server_round} pre-targeting evaluation", strategy=self.cfg.strategy).ok
        counts = self.cohort_counts(server_round - 1, replies)
        self.last_report = _ranked(counts)
        self.log.append({"phase": "evaluate", "round": server_round - 1, **_report_fields(self.last_report, counts)})


def _ranked(counts: CohortCounts) -> CohortReport | None:
    """The report that ranks cohorts (what a targeted round targets); None when no device evaluated any words."""
    return cohort_report(counts.errors, counts.words, speakers_per_cohort=counts.speakers) if counts.words.sum() > 0 else None


class FairStrategy:
    """A Flower strategy's four round methods, with the fairness additions of :class:`FairnessRounds`.

    ``server/workflow.py`` calls these exactly as it calls the strategy itself; the strategy keeps doing the
    sampling and the aggregation (and keeps its own state for checkpoints).
    """

    def __init__(self, rounds: FairnessRounds, strategy: flwr_strategy.Strategy) -> None:
        self.rounds, self.strategy = rounds, strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        if len(config):
            raise ValueError(f"FairStrategy.configure_train sets its own config, got {dict(config)}")
        return self.rounds.configure_train(self.strategy, server_round, arrays, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.rounds.aggregate_train(self.strategy, server_round, list(replies))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        if len(config):
            raise ValueError(f"FairStrategy.configure_evaluate sets its own config, got {dict(config)}")
        return self.rounds.configure_evaluate(self.strategy, server_round, arrays, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        aggregated = self.strategy.aggregate_evaluate(server_round, replies)
        self.rounds.evaluated(server_round, replies)
        return aggregated
