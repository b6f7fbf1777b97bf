"""Adversarial reweighting (ARL, Lahoti et al. 2020; ARW for speaker verification, Jin et al. 2022).

Fairness without demographics: an adversary maps what a device knows about an utterance to a score
s_i = sigmoid(adversary(x_i)), and the utterance's loss weight is

    w_i = 1 + n * s_i / sum_j s_j          (n utterances in the batch)

The learner (the transducer) minimizes the weighted per-token loss ``sum_i w_i * loss_i / sum_i tokens_i``;
the adversary maximizes the same quantity (gradient ascent, with the learner's losses detached). Weights are
at least 1 and sum to 2n, so their mean is exactly 2: the weighted objective is the plain loss plus an
adversarially redistributed copy of it (the ``1 +`` keeps every example in play). The learner trains on half of
each weight (``LEARNER_SCALE``; mean 1), so a uniform adversary gives the usual per-token loss: Adam is invariant
to the loss's scale, but plain SGD is not, and with ARL's own scale an ARW arm under SGD took twice the steps of
the arm it is compared with. ``train_steps`` still reports the unweighted loss.

Schedule (our choice; the papers do not fix one for this setting): for the first ``warmup_steps`` calls the
adversary is frozen at uniform (all learner weights 1, i.e. plain training); after that every step alternates, on the
same batch: the learner gets the current adversary's weights (detached), then the adversary takes one ascent
step on the detached losses. Adversary: linear by default (ARL found a linear adversary best on small data),
optionally one hidden layer.

Adversary input (``adversary_inputs``): only what the device has and no demographics: per-utterance statistics
(log duration in seconds, mean and standard deviation over frames of the mean log-mel energy, after CMVN),
optionally concatenated with the speaker embedding (``shared/models/speaker_embedding.py``) or any other
device-side vector (Jin et al. feed k-means cluster ids; pass a one-hot cohort as the "embedding").

Federated caveat, and what this module offers for it: a device holds one speaker, so every utterance of its batch
shares the speaker embedding, and in-batch normalization (sum_j over the device's own batch) can only reweight
utterances *within* that speaker. To reweight *across* devices, normalize by the population instead: devices report
``ScoreSums`` (sum of scores, count, sum of score x loss: three summable scalars), the server forms
``PopulationStats`` (mean score m, score-weighted mean loss L_w) and sends them back, and with ``population`` set
ARL's weights are ``w_i = 1 + s_i / m`` (the learner gets half of each: ``LEARNER_SCALE``) and the adversary ascends
the surrogate ``sum_i s_i (loss_i - L_w) / (m * tokens)``. Its gradient, summed over devices, is exactly the
gradient of the population ARL objective (d/dtheta of sum_i s_i l_i / sum_j s_j = sum_j ds_j (l_j - L_w) / sum_j
s_j); the stats are one round stale. A device-wide factor on the learner's loss does not change an Adam update (Adam
is invariant to the loss scale), so the cross-device half of the weights has to act where updates meet: the server
weighs each device's update by its weight mass (``AdversarialReweighter.mean_weight`` x its utterances).

Legend of tensor symbols:
    B   utterances in a batch;  T  feature frames;  F  feature dimension
    E   speaker-embedding (or other per-device vector) dimension
    A   adversary input dimension = 3 (+ E)

Example:
    >>> logits = torch.tensor([0.0, 0.0, 2.0, -2.0])
    >>> weights = arl_weights(logits)
    >>> round(float(weights.mean()), 6), bool((weights >= 1).all())
    (2.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from shared.data.dataset import Batch

__all__ = [
    "Adversary",
    "AdversarialReweighter",
    "PopulationStats",
    "ScoreSums",
    "UTTERANCE_STATISTICS",
    "adversary_inputs",
    "arl_weights",
    "population_surrogate",
    "utterance_statistics",
]

UTTERANCE_STATISTICS = 3  # log duration, mean and std of frame energy
_FRAME_SECONDS = 0.01  # the fbank frame shift


class PopulationStats(NamedTuple):
    """Population normalizers of ARL, from the devices' summed ``ScoreSums``.

    Attributes:
        mean_score: m = sum of scores / number of utterances (> 0).
        weighted_loss: L_w = sum of score x loss / sum of scores.
    """

    mean_score: float
    weighted_loss: float


@dataclass(frozen=True)
class ScoreSums:
    """What a device reports for population normalization: three scalars that add across devices.

    Attributes:
        score: sum of adversary scores s_i.
        count: utterances scored.
        score_loss: sum of s_i x loss_i (utterance NLL).
    """

    score: float
    count: float
    score_loss: float

    def __add__(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums(self.score + other.score, self.count + other.count, self.score_loss + other.score_loss)

    def population(self) -> PopulationStats:
        """The ``PopulationStats`` these (summed) sums define."""
        if not (self.count > 0 and self.score > 0):
            raise ValueError(f"need a positive count and score sum, got count={self.count}, score={self.score}")
        return PopulationStats(mean_score=self.score / self.count, weighted_loss=self.score_loss / self.score)


def arl_weights(adversary_logits: Tensor, *, population: PopulationStats | None = None) -> Tensor:
    """ARL example weights from adversary logits.

    Args:
        adversary_logits: (B,) one logit per utterance.
        population: None: ARL's in-batch form ``w_i = 1 + B * s_i / sum_j s_j`` (weights >= 1, mean exactly
            2). Given: ``w_i = 1 + s_i / m`` with the population's mean score m (mean 2 over the population).

    Returns:
        (B,) weights, differentiable with respect to the logits.
    """
    if adversary_logits.dim() != 1 or adversary_logits.numel() == 0:
        raise ValueError(f"adversary_logits must be a non-empty (B,) vector, got shape {tuple(adversary_logits.shape)}")
    scores = torch.sigmoid(adversary_logits)
    if population is None:
        return 1.0 + scores.numel() * scores / scores.sum()
    if not population.mean_score > 0:
        raise ValueError(f"population mean_score must be positive, got {population.mean_score}")
    return 1.0 + scores / population.mean_score


def population_surrogate(adversary_logits: Tensor, losses: Tensor, population: PopulationStats) -> Tensor:
    """``sum_i s_i (loss_i - L_w) / m``: its gradient, summed over all devices' utterances, equals the gradient
    of the population's ``sum_i w_i loss_i`` with respect to the adversary (``losses`` are treated as fixed).

    Args:
        adversary_logits: (B,); losses: (B,) utterance losses (detached); population: m and L_w.
    """
    if losses.shape != adversary_logits.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and logits {tuple(adversary_logits.shape)} differ in shape")
    scores = torch.sigmoid(adversary_logits)
    return (scores * (losses.detach() - population.weighted_loss)).sum() / population.mean_score


def utterance_statistics(feats: Tensor, feat_lens: Tensor) -> Tensor:
    """Per-utterance statistics a device has without any label: (B, 3) [log seconds, energy mean, energy std].

    Energy is each frame's mean over the F log-mel bins (CMVN-normalized features, so about 0 on average).

    Args:
        feats: (B, T, F), zero-padded; feat_lens: (B,) valid frames (>= 1).
    """
    if feats.dim() != 3 or feat_lens.shape != (feats.shape[0],):
        raise ValueError(f"feats must be (B, T, F) and feat_lens (B,), got {tuple(feats.shape)} and {tuple(feat_lens.shape)}")
    if feats.shape[0] and int(feat_lens.min()) < 1:
        raise ValueError(f"every utterance needs a frame, got feat_lens {feat_lens.tolist()}")
    valid = (torch.arange(feats.shape[1], device=feats.device)[None, :] < feat_lens[:, None]).to(feats.dtype)
    frames = valid.sum(dim=1)
    energy = feats.mean(dim=2) * valid
    mean = energy.sum(dim=1) / frames
    std = (((energy - mean[:, None]) * valid).square().sum(dim=1) / frames).sqrt()
    return torch.stack([(frames * _FRAME_SECONDS).log(), mean, std], dim=1)


def adversary_inputs(batch: Batch, speaker_embedding: Tensor | Mapping[str, Tensor] | None = None) -> Tensor:
    """The adversary's (B, A) input: ``utterance_statistics`` (+ the speaker embedding, when given).

    Args:
        batch: the (unaugmented) batch.
        speaker_embedding: None; one (E,) vector for the whole batch (a device's own speaker); or a mapping
            utterance id -> (E,) vector (central training over many speakers).
    """
    stats = utterance_statistics(batch.feats, batch.feat_lens)
    if speaker_embedding is None:
        return stats
    if isinstance(speaker_embedding, Mapping):
        missing = [uid for uid in batch.ids if uid not in speaker_embedding]
        if missing:
            raise ValueError(f"no speaker embedding for utterances {missing[:5]}")
        vectors = torch.stack([torch.as_tensor(speaker_embedding[uid]) for uid in batch.ids])
    else:
        if speaker_embedding.dim() != 1:
            raise ValueError(f"speaker_embedding must be (E,), got shape {tuple(speaker_embedding.shape)}")
        vectors = speaker_embedding.expand(len(batch.ids), -1)
    return torch.cat([stats, vectors.to(stats)], dim=1)


class Adversary(nn.Module):
    """(B, A) inputs -> (B,) logits: linear (``hidden_dim=0``, ARL's choice for small data) or one hidden layer.

    Starts uniform: the output layer is zero-initialized, so every logit is 0 and every ARL weight 2 until it learns.
    """

    def __init__(self, input_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        if input_dim < 1 or hidden_dim < 0:
            raise ValueError(f"need input_dim >= 1 and hidden_dim >= 0, got {input_dim} and {hidden_dim}")
        output = nn.Linear(hidden_dim or input_dim, 1)
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), output) if hidden_dim else output

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs).squeeze(-1)


LEARNER_SCALE = 0.5  # the learner's weights are ARL's halved: mean 1 (``AdversarialReweighter``)


class AdversarialReweighter:
    """The ARL min-max step as a ``train_steps`` reweighter: ``(batch, losses) -> weights`` plus an ascent step.

    Each call: compute the current adversary's weights for ``batch`` and return half of them, detached, as the
    learner's weights; then, after the warm-up, take one adversary step that increases ``sum_i w_i * loss_i /
    tokens`` on the detached ``losses``. Also accumulates ``score_sums`` for population normalization.

    Why half: ARL's weights average 2 (over the batch, or over the population), so the learner's loss would be
    twice the unweighted one, and under plain SGD every step twice as long as the same recipe's without ARW.
    Halved, they average 1: ARW moves the loss between utterances and devices without rescaling it, so an ARW
    arm trains at the learning rate its comparison trains at, and its warm-up equals training without ARW.

    Attributes:
        adversary: the module mapping ``inputs(batch)`` to logits.
        population: None for in-batch normalization; else the server's ``PopulationStats`` (set per round).
        steps: calls so far.
        last_objective: the adversary's objective before its latest step (NaN until the first step).
        score_sums: ``ScoreSums`` accumulated over all calls (reset it between rounds).
        weight_sum: the learner's weights summed over all calls (utterance-steps; 1 each while frozen).
    """

    def __init__(
        self,
        adversary: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-2,
        warmup_steps: int = 0,
        inputs: Callable[[Batch], Tensor] = adversary_inputs,
        population: PopulationStats | None = None,
    ) -> None:
        """
        Args:
            adversary: e.g. ``Adversary(UTTERANCE_STATISTICS + E)``.
            optimizer: for the adversary's parameters; default Adam at ``lr``.
            lr: the default optimizer's learning rate (1e-2: a linear model of a few inputs).
            warmup_steps: calls during which the adversary stays frozen at uniform weights (1 each).
            inputs: batch -> (B, A) adversary input; e.g. ``functools.partial(adversary_inputs,
                speaker_embedding=vector)`` on a device.
            population: see the class attributes.
        """
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.adversary = adversary
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(adversary.parameters(), lr=lr)
        self.warmup_steps = warmup_steps
        self.inputs = inputs
        self.population = population
        self.steps = 0
        self.last_objective = math.nan
        self.score_sums = ScoreSums(0.0, 0.0, 0.0)
        self.weight_sum = 0.0

    def mean_weight(self) -> float:
        """The mean learner weight over all calls so far (1 before any call: the uniform weight)."""
        return self.weight_sum / self.score_sums.count if self.score_sums.count else 1.0

    def objective(self, logits: Tensor, losses: Tensor, tokens: Tensor) -> Tensor:
        """What the adversary maximizes, per token: the weighted loss (in-batch) or the population surrogate."""
        losses = losses.detach()
        if self.population is None:
            return (arl_weights(logits) * losses).sum() / tokens
        return population_surrogate(logits, losses, self.population) / tokens

    def __call__(self, batch: Batch, losses: Tensor) -> Tensor:
        """Weights (B,) for the learner, detached; then one adversary ascent step (after the warm-up).

        Args:
            batch: the batch the losses belong to (unaugmented features).
            losses: (B,) per-utterance transducer NLL (may carry gradients; they are not used).
        """
        if losses.shape != (len(batch.ids),):
            raise ValueError(f"losses must be (B={len(batch.ids)},), got shape {tuple(losses.shape)}")
        device = next(self.adversary.parameters()).device
        inputs = self.inputs(batch).to(device)
        losses = losses.detach().to(device)
        tokens = batch.target_lens.sum().clamp(min=1).to(device)
        logits = self.adversary(inputs)
        scores = torch.sigmoid(logits.detach())
        self.score_sums = self.score_sums + ScoreSums(float(scores.sum()), float(scores.numel()), float((scores * losses).sum()))
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.weight_sum += float(losses.numel())
            return torch.ones_like(losses)
        weights = LEARNER_SCALE * arl_weights(logits.detach(), population=self.population)
        self.weight_sum += float(weights.sum())
        objective = self.objective(logits, losses, tokens)
        self.optimizer.zero_grad(set_to_none=True)
        (-objective).backward()
        self.optimizer.step()
        self.last_objective = float(objective.detach())
        return weights
