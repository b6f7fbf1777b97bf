"""Pairwise adversarial reweighting (ARW) for speaker verification (Jin et al., Interspeech 2022).

Verification is learned from pairs: for a batch of P speakers x K utterances, every pair (i, j), i != j, is a
same-speaker or a different-speaker example, and its loss is the binary cross-entropy of a calibrated cosine
score ``w * cos(e_i, e_j) + b`` (``w`` and ``b`` learned, GE2E's scoring). Same-speaker and different-speaker
pairs are averaged separately and summed, so the P*K*(K-1) positives count as much as the far more numerous
negatives.

ARW (Lahoti et al.'s ARL, reformulated for pairs by Jin et al.: their "pairwise weighting") makes each pair's
loss count by how badly the model serves its two samples: an adversary scores each sample,
s_i = sigmoid(adversary(x_i)), the sample weight is w_i = 1 + n * s_i / sum_j s_j over the batch's n samples
(``shared/fairness/arw.py``), and the pair's weight is w_i + w_j. The learner minimizes the weighted pair loss;
the adversary maximizes it. The adversary's input is the sample's k-means cluster id (one-hot), clusters found
on the starting model's embeddings of the training utterances: no demographics anywhere (Jin et al.'s
pseudo-labels). With a uniform adversary every pair weighs 4, which Adam does not see: plain pairwise training.

Schedule: for ``warmup`` steps the adversary stays uniform; then, on every batch, the learner steps with the
current (detached) weights and the adversary takes one ascent step on the detached pair losses.

Legend of tensor symbols:
    B   utterances in a batch (P speakers x K utterances);  T  frames;  F  feature dimension
    E   embedding dimension;  C  k-means clusters (the adversary's input width)

Example:
    >>> emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [1.0, 0.1]]), dim=-1)
    >>> same = same_speaker(torch.tensor([0, 0, 1]))
    >>> losses = pair_losses(emb, same, scale=torch.tensor(10.0), bias=torch.tensor(-5.0))
    >>> round(float(losses[0, 1]), 3), round(float(losses[0, 2]), 3)  # a target pair; an impostor close by
    (0.049, 4.957)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor

from shared.fairness.arw import Adversary, arl_weights
from shared.models.speaker_embedding import SpeakerEmbedder, SpeakerEmbeddingError, crop

__all__ = ["PairwiseRecipe", "cluster_ids", "pair_losses", "pair_weights", "same_speaker", "train_pairwise", "weighted_pair_loss"]


@dataclass(frozen=True)
class PairwiseRecipe:
    """Pairwise fine-tuning of a speaker embedder, with or without ARW."""

    steps: int = 1500
    speakers_per_batch: int = 16  # P
    utterances_per_speaker: int = 4  # K
    crop_frames: int = 200  # 2 s windows, as in AAM-softmax pre-training
    lr: float = 5e-4
    arw: bool = False
    clusters: int = 8  # k-means pseudo-labels: the adversary's input
    adversary_lr: float = 1e-2
    warmup: int = 100  # steps with a uniform adversary
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "speakers_per_batch", "crop_frames", "clusters"):
            if getattr(self, name) < 1:
                raise SpeakerEmbeddingError(f"{name} must be positive, got {getattr(self, name)}")
        if self.speakers_per_batch < 2 or self.utterances_per_speaker < 2:
            raise SpeakerEmbeddingError(
                f"a batch needs >= 2 speakers x >= 2 utterances for both pair kinds, got "
                f"{self.speakers_per_batch} x {self.utterances_per_speaker}"
            )
        if self.lr <= 0 or self.adversary_lr <= 0 or self.warmup < 0:
            raise SpeakerEmbeddingError(
                f"need lr > 0, adversary_lr > 0, warmup >= 0; got {self.lr}, {self.adversary_lr}, {self.warmup}"
            )


def same_speaker(labels: Tensor) -> Tensor:
    """(B,) speaker labels -> (B, B) bool, True where two different samples share a speaker."""
    same = labels[:, None] == labels[None, :]
    return same & ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)


def pair_losses(embeddings: Tensor, same: Tensor, *, scale: Tensor, bias: Tensor) -> Tensor:
    """(B, E) unit embeddings, (B, B) same-speaker mask -> (B, B) binary cross-entropy of each pair's score
    ``scale * cos + bias`` against "same speaker" (the diagonal is meaningless; ``weighted_pair_loss`` skips it)."""
    logits = scale * embeddings @ embeddings.T + bias
    return F.binary_cross_entropy_with_logits(logits, same.to(logits.dtype), reduction="none")


def pair_weights(sample_weights: Tensor) -> Tensor:
    """(B,) sample weights -> (B, B) pair weights w_i + w_j (Jin et al.'s pairwise weighting)."""
    return sample_weights[:, None] + sample_weights[None, :]


def weighted_pair_loss(losses: Tensor, same: Tensor, weights: Tensor) -> Tensor:
    """Mean weighted loss over same-speaker pairs plus mean weighted loss over different-speaker pairs."""
    different = ~same & ~torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    weighted = weights * losses
    return weighted[same].mean() + weighted[different].mean()


def cluster_ids(embedder: SpeakerEmbedder, features: Sequence[np.ndarray], *, clusters: int, seed: int) -> np.ndarray:
    """(N,) k-means cluster of each utterance's embedding under ``embedder`` (scikit-learn's KMeans)."""
    if len(features) < clusters:
        raise SpeakerEmbeddingError(f"{len(features)} utterances cannot form {clusters} clusters")
    embeddings = torch.stack([embedder.embed(f) for f in features]).numpy()
    return KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit_predict(embeddings).astype(np.int64)


def _batch(by_speaker: list[np.ndarray], recipe: PairwiseRecipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(B,) utterance indices and (B,) speaker labels: P random speakers, K random utterances of each."""
    chosen = rng.choice(len(by_speaker), size=recipe.speakers_per_batch, replace=False)
    rows = [
        rng.choice(by_speaker[s], size=recipe.utterances_per_speaker, replace=len(by_speaker[s]) < recipe.utterances_per_speaker)
        for s in chosen
    ]
    return np.concatenate(rows), np.repeat(np.arange(len(chosen)), recipe.utterances_per_speaker)


def train_pairwise(
    init: SpeakerEmbedder, features: Sequence[np.ndarray], speakers: Sequence[str], recipe: PairwiseRecipe
) -> tuple[SpeakerEmbedder, dict[str, list[float]]]:
    """Fine-tune a copy of ``init`` on labelled utterances with the pairwise loss, ARW when ``recipe.arw``.

    Returns the fine-tuned embedder (eval mode) and its history: per step the plain (unweighted) pair loss and,
    with ARW, the adversary's mean weight per cluster at the end (``cluster_weight``).
    """
    if len(features) != len(speakers):
        raise SpeakerEmbeddingError(f"{len(features)} feature arrays but {len(speakers)} speaker labels")
    names = sorted(set(speakers))
    if len(names) < recipe.speakers_per_batch:
        raise SpeakerEmbeddingError(f"{len(names)} speakers, fewer than a batch's {recipe.speakers_per_batch}")
    index = {name: i for i, name in enumerate(names)}
    by_speaker = [np.flatnonzero(np.array([index[s] for s in speakers]) == i) for i in range(len(names))]
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model = copy.deepcopy(init).train()
    scale, bias = torch.nn.Parameter(torch.tensor(10.0)), torch.nn.Parameter(torch.tensor(-5.0))
    optimizer = torch.optim.Adam([*model.parameters(), scale, bias], lr=recipe.lr)
    onehot: Tensor | None = None
    adversary: Adversary | None = None
    adversary_optimizer: torch.optim.Optimizer | None = None
    if recipe.arw:
        onehot = F.one_hot(
            torch.from_numpy(cluster_ids(init, features, clusters=recipe.clusters, seed=recipe.seed)), recipe.clusters
        ).float()  # (N, C)
        adversary = Adversary(recipe.clusters)
        adversary_optimizer = torch.optim.Adam(adversary.parameters(), lr=recipe.adversary_lr)
    history: dict[str, list[float]] = {"loss": []}
    for step in range(recipe.steps):
        rows, labels = _batch(by_speaker, recipe, rng)
        feats = torch.from_numpy(np.stack([crop(features[i], recipe.crop_frames, rng) for i in rows]))
        same = same_speaker(torch.from_numpy(labels))
        losses = pair_losses(F.normalize(model(feats), dim=-1), same, scale=scale.clamp(min=0.1), bias=bias)
        uniform = torch.full((len(rows),), 2.0)
        if adversary is not None and adversary_optimizer is not None and onehot is not None and step >= recipe.warmup:
            weights = arl_weights(adversary(onehot[rows]))
            learner = weighted_pair_loss(losses, same, pair_weights(weights.detach()))
            optimizer.zero_grad(set_to_none=True)
            learner.backward()
            optimizer.step()
            ascent = -weighted_pair_loss(losses.detach(), same, pair_weights(weights))
            adversary_optimizer.zero_grad(set_to_none=True)
            ascent.backward()
            adversary_optimizer.step()
        else:
            learner = weighted_pair_loss(losses, same, pair_weights(uniform))
            optimizer.zero_grad(set_to_none=True)
            learner.backward()
            optimizer.step()
        history["loss"].append(float(weighted_pair_loss(losses.detach(), same, pair_weights(uniform))) / 4)
    if adversary is not None:
        with torch.no_grad():
            history["cluster_weight"] = arl_weights(adversary(torch.eye(recipe.clusters))).tolist()
    return model.eval(), history
