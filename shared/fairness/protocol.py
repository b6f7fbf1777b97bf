"""The fairness phases' message contract: the record, config and metric names that the server
(``server/fairness.py``), the devices (``client/fairness.py``) and the privacy audit
(``shared/privacy/audit.py``) share, and the small conversions both sides need.

Phases (server -> device: what is sent; device -> server: what the reply may carry):

=========================  =====================================================  ==========================================
message type               server sends                                           device replies
=========================  =====================================================  ==========================================
``query.kmeans``           ``centroids`` {"centroids": (C, E) float64},           ``kmeans-stats`` {"sums": (C, E),
                           config ``kmeans-noise``                                "counts": (C,)} (dense, float64)
``query.fisher``           ``arrays`` (the global model)                          ``fisher-sums`` (the keys, dtypes and shapes
                                                                                  of ``arrays``), metric ``fisher-batches``
``query.loss``             ``arrays`` (the global model)                          ``metrics`` {"train-loss", "num-examples"}:
                           (Power-of-Choice selection, ``server/selection.py``)   the model's loss on its training utterances
``train``                  ``arrays`` (model, plus ``arw.*`` adversary arrays     ``arrays`` (same keys) and ``metrics``;
                           with ARW), optional ``fisher`` (EWC), ``centroids``    a device outside the targeted cohorts
                           and config ``target-cohorts`` (targeted round),        returns the received arrays unchanged
                           config ``ewc-lambda``, ``arw-lr``, ``arw-frozen``,     with ``num-examples`` 0; with ARW, metrics
                           with population ARW ``arw-mean-score``,                ``arw-score``, ``arw-count``,
                           ``arw-weighted-loss``                                  ``arw-score-loss``, ``arw-weight``
``evaluate``               ``arrays``, ``centroids``                              ``metrics`` and ``cohort-eval`` {"errors",
                                                                                  "words", "speakers": (C,)} (dense)
=========================  =====================================================  ==========================================

Shapes of every reply record derive from what the server sent (C and E from ``centroids``, the model's keys
from ``arrays``), so the audit can check them exactly. The device's speaker embedding and cohort id live only
in its ``context.state`` (``EMBEDDING_STATE``, ``COHORT_STATE``); neither ever appears in a reply.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from flwr.app import ConfigRecord
from torch import Tensor

from shared.fairness.arw import Adversary

__all__ = [
    "ADVERSARY_PREFIX",
    "ARW_FROZEN",
    "ARW_LR",
    "ARW_MEAN_SCORE",
    "ARW_METRICS",
    "ARW_WEIGHT",
    "ARW_WEIGHTED_LOSS",
    "CENTROIDS",
    "COHORT_EVAL",
    "COHORT_EVAL_KEYS",
    "COHORT_STATE",
    "EMBEDDING_STATE",
    "EVAL_STATE",
    "EWC_LAMBDA",
    "FISHER",
    "FISHER_BATCHES",
    "FISHER_PEAKS",
    "FISHER_QUERY",
    "FISHER_SCALE",
    "FISHER_SUMS",
    "GLOBAL_MODEL",
    "KMEANS_NOISE",
    "KMEANS_QUERY",
    "KMEANS_STATS",
    "LOSS_QUERY",
    "PEAK_EXPONENTS",
    "ProtocolError",
    "SECURE_SUM",
    "TARGET_COHORTS",
    "TrainInstruction",
    "adversary_from_state",
    "centroids_digest",
    "join_adversary",
    "split_adversary",
]

# Message types of the query phases (``@app.query("kmeans")`` / ``("fisher")`` / ``("loss")`` on the device).
KMEANS_QUERY = "query.kmeans"
FISHER_QUERY = "query.fisher"
LOSS_QUERY = "query.loss"

# Records the server sends.
CENTROIDS = "centroids"  # {"centroids": (C, E) float64}
FISHER = "fisher"  # parameter name -> diagonal Fisher (normalized to mean 1), for the EWC penalty
ADVERSARY_PREFIX = "arw."  # the ARW adversary's arrays ride inside "arrays" under this prefix

# Records a device may send back (the audit derives their shapes from the records above).
KMEANS_STATS = "kmeans-stats"  # {"sums": (C, E), "counts": (C,)}
COHORT_EVAL = "cohort-eval"  # {"errors", "words", "speakers"}: (C,) each
COHORT_EVAL_KEYS = ("errors", "words", "speakers")
FISHER_SUMS = "fisher-sums"  # summed squared gradients, one array per key of the sent "arrays"
FISHER_BATCHES = "fisher-batches"  # metric: minibatches behind the Fisher sums

# Under SecAgg+ (strategy.secure-aggregation) the k-means statistics, the per-cohort counts and the Fisher sums
# are not sent as the records above: the server asks for them in a SecAgg+ round (a train message with this
# ConfigRecord, naming the sum, and "arrays" holding zeros shaped like it), and the device answers with those
# arrays, masked. The Fisher takes two such sums (server/fairness.py: federated_fisher): FISHER_PEAKS, then
# FISHER_SUMS scaled per parameter tensor by FISHER_SCALE, so that the quantized sum keeps the Fisher's precision.
SECURE_SUM = "secure-sum"  # ConfigRecord {"sum": KMEANS_STATS, COHORT_EVAL, FISHER_PEAKS or FISHER_SUMS}
# {"peaks": (K, len(PEAK_EXPONENTS)) per model key a one-hot of the power of 2 just above its largest Fisher sum,
# "batches": (1,)}: summed, a histogram from which the server reads every key's largest value within a factor 2.
FISHER_PEAKS = "fisher-peaks"
PEAK_EXPONENTS = range(-100, 33)  # 2^-100 .. 2^32: far beyond any Fisher sum's range on either side
GLOBAL_MODEL = "global-model"  # a secure Fisher sum's model (its "arrays" holds the sum's zeros)
FISHER_SCALE = "fisher-scale"  # {"scale": (K,)}: per model key, what a device multiplies its Fisher sums by

# Config keys the server sets per phase or round.
KMEANS_NOISE = "kmeans-noise"  # std of the Gaussian noise a device adds to its k-means sums and counts
EWC_LAMBDA = "ewc-lambda"
TARGET_COHORTS = "target-cohorts"  # list of cohort ids a targeted round trains
ARW_LR = "arw-lr"
ARW_FROZEN = "arw-frozen"  # True during the warm-up rounds: weights stay uniform, the adversary does not move
# Population ARW (fairness.arw-normalization=population): the federation's PopulationStats of the last round.
ARW_MEAN_SCORE = "arw-mean-score"
ARW_WEIGHTED_LOSS = "arw-weighted-loss"

# Metrics of an ARW device's train reply: its ScoreSums (three summable scalars) and its ARL weight mass,
# num-examples x the mean weight its utterances got (the aggregation weight under population ARW).
ARW_WEIGHT = "arw-weight"
ARW_METRICS = ("arw-score", "arw-count", "arw-score-loss", ARW_WEIGHT)

# What a device keeps in its own context.state (never sent).
EMBEDDING_STATE = "chorus-speaker-embedding"  # ArrayRecord {"embedding": (E,) float64}
COHORT_STATE = "chorus-cohort"  # ConfigRecord {"cohort-id": int, "centroids": digest of the centroids}
EVAL_STATE = "chorus-last-evaluation"  # ConfigRecord {"round", "errors", "words", "utterances"} (for SECURE_SUM)


_INSTRUCTION_KEYS = {
    "target_cohorts": TARGET_COHORTS,
    "ewc_lambda": EWC_LAMBDA,
    "arw_lr": ARW_LR,
    "arw_frozen": ARW_FROZEN,
    "arw_mean_score": ARW_MEAN_SCORE,
    "arw_weighted_loss": ARW_WEIGHTED_LOSS,
}


class ProtocolError(ValueError):
    """A fairness message does not have the form this module describes (the message names the record/key)."""


@dataclass(frozen=True)
class TrainInstruction:
    """The fairness part of a train message's config, typed: the server writes it (``to_config``), the device
    reads it (``from_config``). A field left None is not sent; each belongs with a record the message carries.

    Attributes:
        target_cohorts: a targeted round: only devices of these cohorts train (with ``centroids``).
        ewc_lambda: the EWC penalty's strength (with a ``fisher`` record).
        arw_lr: the ARW adversary's learning rate (with ``arw.*`` arrays); the rest of ARW's fields likewise.
        arw_frozen: warm-up: weights stay uniform and the adversary does not move.
        arw_mean_score: population ARW: the federation's mean adversary score, to normalize by.
        arw_weighted_loss: population ARW: the federation's ARL-weighted mean loss.
    """

    target_cohorts: tuple[int, ...] | None = None
    ewc_lambda: float | None = None
    arw_lr: float | None = None
    arw_frozen: bool | None = None
    arw_mean_score: float | None = None
    arw_weighted_loss: float | None = None

    def to_config(self, config: ConfigRecord) -> ConfigRecord:
        """Write the fields that are set into ``config`` (under the names of this module); returns it."""
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                config[_INSTRUCTION_KEYS[field.name]] = list(value) if isinstance(value, tuple) else value
        return config

    @classmethod
    def from_config(cls, config: ConfigRecord) -> TrainInstruction:
        """Read what ``to_config`` wrote; ProtocolError naming the key of a value of the wrong type."""
        # in the order of _INSTRUCTION_KEYS: the first wrong value is the one named
        return cls(
            target_cohorts=_cohort_ids(config, TARGET_COHORTS),
            ewc_lambda=_number(config, EWC_LAMBDA),
            arw_lr=_number(config, ARW_LR),
            arw_frozen=_flag(config, ARW_FROZEN),
            arw_mean_score=_number(config, ARW_MEAN_SCORE),
            arw_weighted_loss=_number(config, ARW_WEIGHTED_LOSS),
        )


def _cohort_ids(config: ConfigRecord, key: str) -> tuple[int, ...] | None:
    if key not in config:
        return None
    value = config[key]
    items = value if isinstance(value, list) else [value]
    ids = [i for i in items if isinstance(i, int) and not isinstance(i, bool)]
    if len(ids) != len(items):
        raise ProtocolError(f"config {key!r} must be cohort ids (integers), got {value!r}")
    return tuple(ids)


def _flag(config: ConfigRecord, key: str) -> bool | None:
    if key not in config:
        return None
    value = config[key]
    if not isinstance(value, bool):
        raise ProtocolError(f"config {key!r} must be true or false, got {value!r}")
    return value


def _number(config: ConfigRecord, key: str) -> float | None:
    if key not in config:
        return None
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"config {key!r} must be a finite number, got {value!r}")
    return float(value)


def split_adversary(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``arrays`` as sent in a round -> (model state dict, adversary state dict without the prefix)."""
    model = {k: v for k, v in state.items() if not k.startswith(ADVERSARY_PREFIX)}
    adversary = {k[len(ADVERSARY_PREFIX) :]: v for k, v in state.items() if k.startswith(ADVERSARY_PREFIX)}
    return model, adversary


def join_adversary(model: Mapping[str, Tensor], adversary: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The inverse of :func:`split_adversary`: one state dict for one ArrayRecord (Flower's strategies aggregate
    exactly one ArrayRecord per reply, so the adversary is averaged with the model, weighted the same way)."""
    clash = [k for k in model if k.startswith(ADVERSARY_PREFIX)]
    if clash:
        raise ProtocolError(f"model parameters {clash[:3]} use the adversary prefix {ADVERSARY_PREFIX!r}")
    return {**model, **{ADVERSARY_PREFIX + k: v for k, v in (adversary or {}).items()}}


def adversary_from_state(state: Mapping[str, Tensor]) -> Adversary:
    """Rebuild an :class:`Adversary` from its state dict alone (linear, or one hidden layer), float32."""
    if set(state) == {"net.weight", "net.bias"}:
        model = Adversary(int(state["net.weight"].shape[1]))
    elif set(state) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}:
        hidden, inputs = state["net.0.weight"].shape
        model = Adversary(int(inputs), hidden_dim=int(hidden))
    else:
        raise ProtocolError(f"adversary arrays {sorted(state)} are neither a linear nor a one-hidden-layer Adversary")
    try:
        model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in state.items()})
    except RuntimeError as err:
        raise ProtocolError(f"adversary arrays do not fit an Adversary: {err}") from err
    return model


def centroids_digest(centroids: np.ndarray) -> str:
    """A short fingerprint of a centroid matrix: a device's stored cohort id is valid for these centroids only."""
    array = np.ascontiguousarray(centroids, dtype=np.float64)
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()[:16]
