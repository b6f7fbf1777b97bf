"""A device's side of the fairness phases (message contract: ``shared/fairness/protocol.py``).

Plain functions from what the server sent to the records of the reply; ``client/client_app.py`` registers them
(``@app.query("kmeans")``, ``@app.query("fisher")``) or calls them from its train and evaluate handlers. The
math is in ``shared/fairness``; this module only reads records, keeps the device's own state, and packs arrays.

What stays on the device: its speaker embedding (computed once with the public extractor from all of its own
utterances, kept in ``context.state``) and its cohort id (nearest centroid, kept in ``context.state`` with a
digest of the centroids it refers to). What leaves: dense per-cluster k-means sums and counts, dense per-cohort
error/word/speaker counts, Fisher sums with the model's shapes, and model (+ adversary) weights. Without
SecAgg+ the server sees each device's vectors, and a dense vector with one non-zero entry still names the
device's cohort: the dense form hides it only once the vectors are summed before the server reads them, which
SecAgg+ does (``strategy.secure-aggregation``: the device answers in a secure sum, :func:`secure_sum_reply`, and
refuses to send either record in plain).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from client.data import ARTIFACTS_DIR_KEY, DATA_DIR_KEY, DeviceData
from shared.config import RunConfig
from shared.data.dataset import make_batches
from shared.data.prepare import artifact_dir, speaker_embedder_path
from shared.fairness import protocol as p
from shared.fairness.arw import UTTERANCE_STATISTICS, AdversarialReweighter, PopulationStats, adversary_inputs
from shared.fairness.cohorts import assign, client_kmeans_stats, cohort_error_vectors
from shared.fairness.ewc import EWCPenalty, FisherSums, fisher_sums
from shared.metrics import ErrorCounts
from shared.models.checkpoint import build_model, load_state
from shared.models.speaker_embedding import SpeakerEmbedder, load_speaker_embedder
from shared.records import array_record, config_record, scalar

__all__ = [
    "LocalFairness",
    "cohort_eval_record",
    "cohort_id",
    "embedder_location",
    "fisher_reply",
    "idle_train_reply",
    "kmeans_reply",
    "local_fairness",
    "remember_evaluation",
    "secure_sum_reply",
    "speaker_embedding",
]


# -- the device's speaker embedding and cohort -------------------------------------------------------------


def embedder_location(cfg: RunConfig, node_config: Mapping[str, Any]) -> Path:
    """Where this device finds the public speaker-embedding extractor: ``artifacts-dir`` when deployed, the
    run's prepared artifacts in simulation (the same place as the tokenizer and CMVN)."""
    if DATA_DIR_KEY in node_config and ARTIFACTS_DIR_KEY in node_config:
        return speaker_embedder_path(Path(str(node_config[ARTIFACTS_DIR_KEY])).expanduser().resolve(), cfg)
    return speaker_embedder_path(artifact_dir(cfg), cfg)


@functools.lru_cache(maxsize=2)
def _embedder(path: Path, mtime_ns: int) -> SpeakerEmbedder:
    return load_speaker_embedder(path)


def speaker_embedding(state: RecordDict, data: DeviceData, embedder_path: Path) -> np.ndarray:
    """The device's (E,) speaker embedding: the L2-normalized mean of its utterances' embeddings (all of its own
    utterances, train and local eval), computed once and kept in ``state`` (``context.state``)."""
    cached = state.get(p.EMBEDDING_STATE)
    if isinstance(cached, ArrayRecord):
        return cached["embedding"].numpy()
    if not embedder_path.is_file():
        raise FileNotFoundError(
            f"speaker embedder {embedder_path} is missing: prepare the run with "
            f"fairness.enabled=true (`chorus data prepare --set fairness.enabled=true`) and "
            f"copy it with the other artifacts"
        )
    embedder = _embedder(embedder_path, embedder_path.stat().st_mtime_ns)
    feats = [f for u in [*data.train, *data.eval] if (f := data.features.features(u)) is not None]
    if not feats:
        raise ValueError("the device has no usable utterance to compute its speaker embedding from")
    embedding = embedder.embed_speaker(feats).numpy().astype(np.float64)
    state[p.EMBEDDING_STATE] = ArrayRecord({"embedding": Array(embedding)})
    return embedding


def _centroids(content: RecordDict) -> np.ndarray:
    record = content.get(p.CENTROIDS)
    if not isinstance(record, ArrayRecord) or set(record.keys()) != {"centroids"}:
        raise p.ProtocolError(f"the message has no {p.CENTROIDS!r} ArrayRecord holding one array 'centroids'")
    centroids = record["centroids"].numpy()
    if centroids.ndim != 2 or centroids.dtype != np.float64:
        raise p.ProtocolError(f"centroids must be a (C, E) float64 array, got {centroids.dtype}{list(centroids.shape)}")
    return centroids


def cohort_id(state: RecordDict, embedding: np.ndarray, centroids: np.ndarray) -> int:
    """The device's cohort for ``centroids``: kept in ``state`` while the centroids stay the same, else the
    nearest centroid of its embedding (then kept)."""
    digest = p.centroids_digest(centroids)
    kept = state.get(p.COHORT_STATE)
    if isinstance(kept, ConfigRecord) and kept.get("centroids") == digest:
        return int(scalar(kept, "cohort-id"))
    if embedding.shape != (centroids.shape[1],):
        raise p.ProtocolError(
            f"centroids are {list(centroids.shape)} but the device's speaker embedding has "
            f"{embedding.shape[0]} dimensions: the server and the device use different extractors"
        )
    cohort = int(assign(embedding, centroids)[0])
    state[p.COHORT_STATE] = ConfigRecord({"cohort-id": cohort, "centroids": digest})
    return cohort


# -- phases --------------------------------------------------------------------------------------------------


def kmeans_reply(content: RecordDict, state: RecordDict, data: DeviceData, embedder_path: Path) -> RecordDict:
    """One federated Lloyd iteration on the device: dense per-cluster sums and counts of its embedding.

    Also keeps the nearest centroid as the device's cohort id: after the server's last (assignment-only) pass,
    that is the cohort of the final centroids.
    """
    centroids = _centroids(content)
    embedding = speaker_embedding(state, data, embedder_path)
    cohort_id(state, embedding, centroids)
    config = config_record(content, "config") if "config" in content else ConfigRecord()
    noise = float(scalar(config, p.KMEANS_NOISE)) if p.KMEANS_NOISE in config else 0.0
    # Fresh OS entropy: noise the server could predict would be no noise.
    stats = client_kmeans_stats(embedding, centroids, noise_std=noise, rng=np.random.default_rng() if noise > 0 else None)
    return RecordDict({p.KMEANS_STATS: ArrayRecord({"sums": Array(stats.sums), "counts": Array(stats.counts)})})


def cohort_eval_record(
    content: RecordDict, state: RecordDict, data: DeviceData, embedder_path: Path, counts: ErrorCounts
) -> ArrayRecord:
    """The device's evaluation counts as dense per-cohort vectors (its counts at its cohort id, zeros elsewhere)."""
    centroids = _centroids(content)
    cohort = cohort_id(state, speaker_embedding(state, data, embedder_path), centroids)
    vectors = cohort_error_vectors(cohort, counts.errors, counts.words, centroids.shape[0], speakers=1 if counts.words else 0)
    return ArrayRecord(
        {key: Array(np.asarray(value, dtype=np.float64)) for key, value in zip(p.COHORT_EVAL_KEYS, vectors, strict=True)}
    )


def remember_evaluation(state: RecordDict, server_round: int, counts: ErrorCounts) -> None:
    """Keep the device's latest evaluation counts in ``state``: under SecAgg+ the server asks for them per
    cohort afterwards, in a secure sum (:func:`secure_sum_reply`)."""
    state[p.EVAL_STATE] = ConfigRecord(
        {"round": server_round, "errors": counts.errors, "words": counts.words, "utterances": counts.utterances}
    )


def secure_sum_reply(cfg: RunConfig, content: RecordDict, state: RecordDict, data: DeviceData, embedder_path: Path) -> RecordDict:
    """A fairness phase under SecAgg+ (``protocol.SECURE_SUM``): this device's part of the named sum (its k-means
    statistics, its last evaluation's per-cohort counts, or its Fisher's peaks or scaled sums), as a train reply
    of weight 1 for ``secaggplus_mod`` to mask. Each value must lie within +-``SecAggConfig.sum_bound``, or the
    sum would be clipped."""
    bound = cfg.secagg.sum_bound
    request = content.get(p.SECURE_SUM)
    which = request.get("sum") if isinstance(request, ConfigRecord) else None
    if which == p.KMEANS_STATS:
        arrays = kmeans_reply(content, state, data, embedder_path)[p.KMEANS_STATS]
    elif which == p.COHORT_EVAL:
        server_round = content["config"]["server-round"] if isinstance(content.get("config"), ConfigRecord) else None
        kept = state.get(p.EVAL_STATE)
        if not isinstance(kept, ConfigRecord) or kept.get("round") != server_round:
            raise p.ProtocolError(
                f"{p.SECURE_SUM!r} asks for the per-cohort counts of round {server_round!r}, which this device did not evaluate"
            )
        counts = ErrorCounts(int(scalar(kept, "errors")), int(scalar(kept, "words")), int(scalar(kept, "utterances")))
        arrays = cohort_eval_record(content, state, data, embedder_path, counts)
    elif which == p.FISHER_PEAKS:
        arrays = _fisher_peaks(*_device_fisher(cfg, array_record(content, p.GLOBAL_MODEL).to_torch_state_dict(), data))
    elif which == p.FISHER_SUMS:
        global_state = array_record(content, p.GLOBAL_MODEL).to_torch_state_dict()
        scale = array_record(content, p.FISHER_SCALE)["scale"].numpy()
        arrays = _scaled_fisher(*_device_fisher(cfg, global_state, data), scale, bound=bound)
    else:
        raise p.ProtocolError(
            f"{p.SECURE_SUM!r} must name the sum {p.KMEANS_STATS!r}, {p.COHORT_EVAL!r}, {p.FISHER_PEAKS!r} or "
            f"{p.FISHER_SUMS!r}, got {which!r}"
        )
    assert isinstance(arrays, ArrayRecord)
    template = content.get("arrays")
    expected = {k: tuple(v.shape) for k, v in template.items()} if isinstance(template, ArrayRecord) else None
    if expected != {k: tuple(v.shape) for k, v in arrays.items()}:
        raise p.ProtocolError(f"{p.SECURE_SUM!r} {which!r}: 'arrays' must be zeros shaped like the sum, got {expected}")
    peak = max(float(np.abs(v.numpy()).max(initial=0.0)) for v in arrays.values())
    if peak > bound:
        raise p.ProtocolError(
            f"{p.SECURE_SUM!r} {which!r}: a value of {peak:g} exceeds the SecAgg+ bound {bound:g} "
            f"(secagg.clipping-range x secagg.max-weight)"
        )
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})


def _device_fisher(cfg: RunConfig, global_state: dict[str, Tensor], data: DeviceData) -> tuple[dict[str, Tensor], FisherSums]:
    """The Fisher sums of the global model on the device's training utterances (deterministic: eval mode, batches
    in order), as one array per key of the global model (zeros for buffers), and the sums themselves."""
    model = build_model(cfg.model)
    load_state(model, global_state, source="global model from the server")
    batches = make_batches(
        data.train, features=data.features, tokenizer=data.tokenizer, max_frames=cfg.train.batch_frames, shuffle=False, seed=0
    )
    if not batches:
        raise ValueError("no usable training utterance for the Fisher sums")
    sums = fisher_sums(model, batches)
    arrays = {k: sums.sums[k].to(v.dtype) if k in sums.sums else torch.zeros_like(v) for k, v in global_state.items()}
    return arrays, sums


def _fisher_peaks(arrays: dict[str, Tensor], sums: FisherSums) -> ArrayRecord:
    """The first secure Fisher sum: per model key, a one-hot of the power of 2 just above its largest Fisher sum
    (``protocol.PEAK_EXPONENTS``; all zeros for a key with none), and the minibatch count."""
    exponents = p.PEAK_EXPONENTS
    peaks = np.zeros((len(arrays), len(exponents)))
    for row, value in enumerate(arrays.values()):
        peak = float(value.double().max()) if value.numel() else 0.0
        if peak > 0:
            exponent = min(max(math.ceil(math.log2(peak)), exponents.start), exponents.stop - 1)
            peaks[row, exponent - exponents.start] = 1.0
    return ArrayRecord({"peaks": Array(peaks), "batches": Array(np.array([float(sums.count)]))})


def _scaled_fisher(arrays: dict[str, Tensor], sums: FisherSums, scale: np.ndarray, *, bound: float) -> ArrayRecord:
    """The second secure Fisher sum: each model key's Fisher sums times its scale (which the server chose so that
    no device's largest entry exceeds ``bound``; the cap only guards against a scale that is not), and the
    minibatch count."""
    if scale.shape != (len(arrays),):
        raise p.ProtocolError(f"{p.FISHER_SCALE!r} must hold one scale per model key ({len(arrays)}), got {scale.shape}")
    scaled = {
        k: Array(np.minimum(v.double().numpy() * factor, bound)) for (k, v), factor in zip(arrays.items(), scale, strict=True)
    }
    return ArrayRecord({**scaled, p.FISHER_BATCHES: Array(np.array([float(sums.count)]))})


def fisher_reply(cfg: RunConfig, global_state: dict[str, Tensor], data: DeviceData) -> RecordDict:
    """Summed squared minibatch gradients of the global model on the device's training utterances, one array per
    key of the global model (zeros for buffers), and how many minibatches they cover."""
    arrays, sums = _device_fisher(cfg, global_state, data)
    return RecordDict({p.FISHER_SUMS: ArrayRecord(arrays), "metrics": MetricRecord({p.FISHER_BATCHES: sums.count})})


@dataclass
class LocalFairness:
    """What a train message asks of this device beyond plain fine-tuning.

    Attributes:
        takes_part: False in a targeted round when the device's cohort is not targeted (it then replies with
            :func:`idle_train_reply`).
        model_state: the global model (without adversary arrays): what fine-tuning starts from.
        penalty: EWC penalty anchored at the global model, or None.
        reweighter: the ARW min-max step (its adversary is updated in place), or None.
    """

    takes_part: bool
    model_state: dict[str, Tensor]
    penalty: EWCPenalty | None = None
    reweighter: AdversarialReweighter | None = None

    def reply_metrics(self, num_examples: int) -> dict[str, float]:
        """ARW's reply metrics (none without ARW): the round's ``ScoreSums`` and the ARL weight mass
        ``num_examples x mean weight`` (what the server weighs this update by under population ARW)."""
        if self.reweighter is None:
            return {}
        sums = self.reweighter.score_sums
        return dict(zip(p.ARW_METRICS, (sums.score, sums.count, sums.score_loss, num_examples * self.reweighter.mean_weight())))

    def reply_arrays(self, trained: Mapping[str, Tensor]) -> ArrayRecord:
        """The reply's single ArrayRecord: the fine-tuned model and, with ARW, the adversary after its steps."""
        adversary = None if self.reweighter is None else self.reweighter.adversary.state_dict()
        return ArrayRecord(p.join_adversary(trained, adversary))


def local_fairness(
    content: RecordDict,
    state: RecordDict,
    data: DeviceData,
    embedder_path: Path,
    *,
    global_state: dict[str, Tensor],
    local_steps: int,
) -> LocalFairness:
    """Read the fairness parts of a train message (none: plain fine-tuning).

    * ``target-cohorts`` in the config (a targeted round): take part only if this device's cohort is listed;
      the server never learns the cohort, only (from the reply's weight) whether the device trained.
    * ``fisher`` record: an EWC penalty ``ewc-lambda * sum F (theta - theta_global)^2``.
    * ``arw.*`` arrays: adversarial reweighting; the adversary sees utterance statistics and this device's
      speaker embedding, and stays frozen (uniform weights) while ``arw-frozen`` is set.
    """
    config = content.get("config")
    instruction = p.TrainInstruction.from_config(config if isinstance(config, ConfigRecord) else ConfigRecord())
    model_state, adversary_state = p.split_adversary(global_state)
    if instruction.target_cohorts is not None:
        cohort = cohort_id(state, speaker_embedding(state, data, embedder_path), _centroids(content))
        if cohort not in instruction.target_cohorts:
            return LocalFairness(takes_part=False, model_state=model_state)
    penalty = None
    if p.FISHER in content:
        fisher = content[p.FISHER]
        if not isinstance(fisher, ArrayRecord):
            raise p.ProtocolError(f"{p.FISHER!r} must be an ArrayRecord")
        penalty = EWCPenalty(model_state, fisher.to_torch_state_dict(), instruction.ewc_lambda or 0.0)
    reweighter = None
    if adversary_state:
        adversary = p.adversary_from_state(adversary_state)
        embedding = torch.from_numpy(speaker_embedding(state, data, embedder_path)).float()
        expected = UTTERANCE_STATISTICS + embedding.shape[0]
        got = int(next(adversary.parameters()).shape[1])  # the first layer's weight: (out, inputs)
        if got != expected:
            raise p.ProtocolError(
                f"the adversary takes {got} inputs, the device has {UTTERANCE_STATISTICS} utterance "
                f"statistics + a {embedding.shape[0]}-dimensional speaker embedding"
            )
        population = None
        if instruction.arw_mean_score is not None:  # population ARW: normalize by the federation's mean score
            population = PopulationStats(
                mean_score=instruction.arw_mean_score, weighted_loss=instruction.arw_weighted_loss or 0.0
            )
        reweighter = AdversarialReweighter(
            adversary,
            lr=1e-2 if instruction.arw_lr is None else instruction.arw_lr,
            warmup_steps=local_steps if instruction.arw_frozen else 0,
            population=population,
            inputs=functools.partial(adversary_inputs, speaker_embedding=embedding),
        )
    return LocalFairness(takes_part=True, model_state=model_state, penalty=penalty, reweighter=reweighter)


def idle_train_reply(content: RecordDict, *, skipped: int) -> RecordDict:
    """A device outside a targeted round's cohorts: the arrays it received, unchanged, with weight 0.

    Every metric a training device sends is here too (Flower's strategies need the same keys in every reply),
    at 0; FedAvg gives a weight-0 reply no say, and the server leaves such replies out of aggregation anyway
    (a median would count them). The upload has the same size as a real update.
    """
    metrics = MetricRecord(
        {"train-loss": 0.0, "local-steps": 0, "num-examples": 0, "compute-cost": 0.0, "skipped-utterances": skipped}
    )
    arrays = content["arrays"]
    if isinstance(arrays, ArrayRecord) and any(k.startswith(p.ADVERSARY_PREFIX) for k in arrays):
        metrics.update({key: 0.0 for key in p.ARW_METRICS})
    return RecordDict({"arrays": arrays, "metrics": metrics})
