"""Federated fine-tuning of the speaker verifier on devices that each hold one speaker: positives only.

A device knows one speaker, its user, so it has no negatives of its own. The impostors it trains against are
public: the server embeds each of a set of public speakers (the verifier's own public training speakers) with
the current global model and sends their normalized mean embeddings, the *impostor centroids*, with the model.
They are public data, as the model is; they are recomputed every round, so a model that drifted (say, towards
mapping every voice to one point) meets centroids that drifted with it and is pulled back.

The device's loss is the pairwise loss the verifier was fine-tuned with (``shared/fairness/pairwise_arw.py``:
binary cross-entropy of ``scale * cos + bias``), on the pairs it can form: every pair of its own utterances is
a target pair, every (own utterance, impostor centroid) pair an impostor pair; the two kinds are averaged
separately and summed. The scale and bias are fixed at the pairwise recipe's starting values (10, -5: a pair
is called "same" above cosine 0.5). BatchNorm runs in eval mode: one speaker's batch would otherwise normalize
its own voice away and move the running statistics towards it; the trained embeddings are those a device
scores with. The update is FedAvg'd like the recognizer's (``server/workflow.py``: Flower's strategy).

Pairwise ARW (optional, Jin et al.): the adversary of ``pairwise_arw`` scores each sample by its k-means
cluster, here the nearest of ``C`` public cluster centres (k-means of the public centroids under the starting
model: no demographics, no federated k-means). The batch of ARL's in-batch normalization is the device's own
utterances plus the impostor centroids, so the weights shift a device's loss between its target pairs and its
impostor pairs, and between impostors of different clusters. With many impostors in the batch, the device's own
weight is close to its score over the impostors' mean score: a device-wide factor, which Adam (``sv.optimizer``
"adam", the default) normalizes away and plain SGD ("sgd") turns into a longer step, a larger share of the average.
The adversary's parameters ride in ``arrays`` under ``arw.`` and are averaged with the model.

What leaves a device: the fine-tuned float arrays (the global model's keys, dtypes and shapes: no
``num_batches_tracked`` counters, BatchNorm's running statistics unchanged), ``num-examples`` (its utterance
count, FedAvg's weight), ``train-loss`` and ``local-steps``. Never its speaker's embedding or centroid, its
features, audio, ids or cluster ids (kept in the device's ``context.state``). ``client/verification.py`` is the
ClientApp; ``simulations/eval_verification.py`` runs the federation.

Legend of tensor symbols:
    K   own utterances in a local batch;  M  impostor centroids;  C  public clusters
    T   feature frames;  F  feature dimension;  E  embedding dimension

Example:
    >>> own = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), dim=-1)
    >>> impostors = F.normalize(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    >>> round(float(device_pair_loss(own, impostors, sample_weights=None)), 4)
    0.0138
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.fairness.arw import LEARNER_SCALE, Adversary, arl_weights
from shared.fairness.pairwise_arw import pair_losses, pair_weights, same_speaker
from shared.models.speaker_embedding import SpeakerEmbedder, SpeakerEmbeddingError, crop

__all__ = [
    "ADVERSARY_PREFIX",
    "IMPOSTORS",
    "DeviceRecipe",
    "DeviceUpdate",
    "adversary_state",
    "device_pair_loss",
    "embedder_state",
    "fine_tune_speaker",
    "impostor_centroids",
    "nearest_cluster",
    "public_clusters",
]

IMPOSTORS = "impostors"  # the train message's ArrayRecord: "centroids" (M, E), with ARW "clusters" (M,), "centres" (C, E)
ADVERSARY_PREFIX = "arw."  # the adversary's arrays inside "arrays", as in the recognizer's ARW
OPTIMIZERS = ("adam", "sgd")
# A pair weighs w_i + w_j, twice a sample's weight: the learner takes half of the recognizer's learner scale (a quarter
# of Jin's pair weight, mean 1), so ARW moves the loss between pairs without lengthening a plain-SGD step.
LEARNER_PAIR_SCALE = LEARNER_SCALE / 2
SCALE, BIAS = 10.0, -5.0  # the pairwise recipe's starting calibration: "same" above cosine 0.5


@dataclass(frozen=True)
class DeviceRecipe:
    """What a device does with one train message; the server sends it in the message's config as ``sv.*`` keys."""

    local_steps: int = 10
    utterances_per_step: int = 8  # K crops of the device's own utterances per step
    crop_frames: int = 200  # 2 s, as in the verifier's training
    lr: float = 1e-4  # small: the shipped verifier is the starting point
    optimizer: str = "adam"  # fresh each round; "sgd": plain SGD, so a device's step grows with its (weighted) loss
    arw: bool = False
    adversary_lr: float = 1e-2
    arw_frozen: bool = False  # ARW's warm-up rounds: the adversary stays as sent (uniform at first)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.crop_frames < 1 or self.utterances_per_step < 2:
            raise SpeakerEmbeddingError(
                f"need local_steps >= 1, crop_frames >= 1 and utterances_per_step >= 2 "
                f"(target pairs), got {self.local_steps}, {self.crop_frames}, "
                f"{self.utterances_per_step}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise SpeakerEmbeddingError(f"sv.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0 or not self.adversary_lr > 0:
            raise SpeakerEmbeddingError(f"need lr > 0 and adversary_lr > 0, got {self.lr} and {self.adversary_lr}")

    def to_config(self) -> dict[str, bool | int | float | str]:
        """``sv.local-steps`` = ..., one key per field: a train message's ConfigRecord."""
        return {"sv." + f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> DeviceRecipe:
        """The recipe of a message's config (its ``sv.*`` keys; others, e.g. ``server-round``, are not ours)."""
        names = {"sv." + f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(k for k in config if k.startswith("sv.") and k not in names)
        if unknown:
            raise SpeakerEmbeddingError(f"unknown speaker-verification config key(s) {unknown}; known: {sorted(names)}")
        defaults, values = cls(), {}
        for key, f in names.items():
            if key not in config:
                continue
            value, kind = config[key], type(getattr(defaults, f.name))
            accepted = (kind,) if kind in (bool, str) else (int, float) if kind is float else (int,)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
                raise SpeakerEmbeddingError(f"config {key}={value!r} is not of type {kind.__name__}")
            values[f.name] = kind(value)
        return cls(**values)


# -- the server's public pieces --------------------------------------------------------------------------------


def impostor_centroids(embedder: SpeakerEmbedder, public: Sequence[Sequence[np.ndarray]]) -> Tensor:
    """(M, E): each public speaker's normalized mean embedding (``embed_speaker``) under ``embedder``."""
    if len(public) < 1:
        raise SpeakerEmbeddingError("impostor centroids need at least one public speaker")
    return torch.stack([embedder.embed_speaker(utterances) for utterances in public])


def public_clusters(centroids: Tensor, clusters: int, seed: int) -> tuple[Tensor, np.ndarray]:
    """k-means (scikit-learn) of the public centroids: (C, E) normalized centres and each centroid's (M,) cluster."""
    from sklearn.cluster import KMeans

    if len(centroids) < clusters:
        raise SpeakerEmbeddingError(f"{len(centroids)} public speakers cannot form {clusters} clusters")
    kmeans = KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit(centroids.numpy())
    return F.normalize(torch.from_numpy(kmeans.cluster_centers_).float(), dim=-1), kmeans.labels_.astype(np.int64)


def nearest_cluster(embeddings: Tensor, centres: Tensor) -> np.ndarray:
    """(N, E) unit embeddings, (C, E) unit centres -> (N,) the centre of highest cosine."""
    return (embeddings @ centres.T).argmax(dim=-1).numpy().astype(np.int64)


def embedder_state(model: SpeakerEmbedder) -> dict[str, Tensor]:
    """The floating-point state (parameters, BatchNorm running statistics): what travels. BatchNorm's integer
    ``num_batches_tracked`` stays home (only float arrays may leave a device, and eval-mode BatchNorm never
    changes it)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def adversary_state(adversary: Adversary) -> dict[str, Tensor]:
    return {ADVERSARY_PREFIX + k: v.detach().clone() for k, v in adversary.state_dict().items()}


# -- the device ------------------------------------------------------------------------------------------------


def device_pair_loss(own: Tensor, impostors: Tensor, *, sample_weights: Tensor | None) -> Tensor:
    """Mean weighted loss of the (K, K) own target pairs plus that of the (K, M) own-impostor pairs.

    Args:
        own: (K, E) unit embeddings of the device's utterances.
        impostors: (M, E) unit impostor centroids (constants).
        sample_weights: (K + M,) ARL weights of [own, impostors], or None for uniform (every pair weighs 1).
    """
    k = own.shape[0]
    batch = torch.cat([own, impostors])
    labels = torch.cat([torch.zeros(k, dtype=torch.long), torch.arange(1, len(impostors) + 1)])
    same = same_speaker(labels)
    losses = pair_losses(batch, same, scale=torch.tensor(SCALE), bias=torch.tensor(BIAS))
    weights = pair_weights(sample_weights) if sample_weights is not None else torch.ones_like(losses)
    weighted = weights * losses
    return weighted[:k, :k][same[:k, :k]].mean() + weighted[:k, k:].mean()


@dataclass(frozen=True)
class DeviceUpdate:
    """A device's round: the fine-tuned embedder (eval mode), the adversary after its steps (ARW), and the mean
    unweighted pair loss over the local steps."""

    embedder: SpeakerEmbedder
    adversary: Adversary | None
    loss: float
    steps: int


def fine_tune_speaker(
    init: SpeakerEmbedder,
    features: Sequence[np.ndarray],
    impostors: Tensor,
    recipe: DeviceRecipe,
    *,
    seed: int,
    adversary: Adversary | None = None,
    own_clusters: np.ndarray | None = None,
    impostor_clusters: np.ndarray | None = None,
) -> DeviceUpdate:
    """Fine-tune a copy of ``init`` on one speaker's utterances against the impostor centroids.

    Each of ``recipe.local_steps`` steps takes K random ``crop_frames`` windows of the speaker's utterances and
    one step of ``recipe.optimizer`` on ``device_pair_loss``. With ``recipe.arw`` (``adversary``, and the cluster of every own
    utterance and every impostor given), the learner steps with the adversary's detached ARL weights and then,
    unless ``recipe.arw_frozen``, the adversary (a copy) takes one ascent step on the detached pair losses.
    """
    if len(features) < 1:
        raise SpeakerEmbeddingError("a device needs at least one utterance to fine-tune on")
    if impostors.dim() != 2 or impostors.shape[1] != init.config.embedding_dim:
        raise SpeakerEmbeddingError(f"impostors must be (M, E={init.config.embedding_dim}), got {tuple(impostors.shape)}")
    onehot: Tensor | None = None
    if recipe.arw:
        if adversary is None or own_clusters is None or impostor_clusters is None:
            raise SpeakerEmbeddingError("ARW needs the adversary and the clusters of own utterances and impostors")
        if len(own_clusters) != len(features) or len(impostor_clusters) != len(impostors):
            raise SpeakerEmbeddingError(
                f"{len(own_clusters)} own / {len(impostor_clusters)} impostor cluster ids for "
                f"{len(features)} utterances / {len(impostors)} impostors"
            )
        width = next(m for m in adversary.modules() if isinstance(m, torch.nn.Linear)).in_features
        onehot = F.one_hot(torch.from_numpy(np.concatenate([own_clusters, impostor_clusters])), width).float()
        adversary = copy.deepcopy(adversary)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(init).eval()  # eval-mode BatchNorm: see the module docstring
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=recipe.lr)
        if recipe.optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=recipe.lr)
    )
    adversary_optimizer = (
        torch.optim.Adam(adversary.parameters(), lr=recipe.adversary_lr)
        if adversary is not None and recipe.arw and not recipe.arw_frozen
        else None
    )
    impostors = F.normalize(impostors.detach().float(), dim=-1)
    k = recipe.utterances_per_step
    losses = []
    for _ in range(recipe.local_steps):
        rows = rng.choice(len(features), size=k, replace=len(features) < k)
        feats = torch.from_numpy(
            np.stack([crop(np.asarray(features[i], dtype=np.float32), recipe.crop_frames, rng) for i in rows])
        )
        own = F.normalize(model(feats), dim=-1)
        weights: Tensor | None = None
        if adversary is not None and onehot is not None:
            batch_rows = torch.from_numpy(np.concatenate([rows, len(features) + np.arange(len(impostors))]))
            weights = arl_weights(adversary(onehot[batch_rows]))
        learner = device_pair_loss(
            own, impostors, sample_weights=None if weights is None else LEARNER_PAIR_SCALE * weights.detach()
        )
        optimizer.zero_grad(set_to_none=True)
        learner.backward()
        optimizer.step()
        if adversary_optimizer is not None and weights is not None:
            ascent = -device_pair_loss(own.detach(), impostors, sample_weights=weights)
            adversary_optimizer.zero_grad(set_to_none=True)
            ascent.backward()
            adversary_optimizer.step()
        with torch.no_grad():
            losses.append(float(device_pair_loss(own.detach(), impostors, sample_weights=None)))
    loss = float(np.mean(losses))
    if not math.isfinite(loss):
        raise SpeakerEmbeddingError(f"the local pair loss is not finite ({loss}): lower sv.lr")
    return DeviceUpdate(embedder=model.eval(), adversary=adversary, loss=loss, steps=recipe.local_steps)
