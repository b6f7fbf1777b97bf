"""A small on-device speaker-embedding extractor (x-vector style TDNN), trained with AAM-softmax.

Chorus needs speaker embeddings for two things that must run on a device: automatic cohorts (k-means on
speaker embeddings, Dheram et al. 2022: ``shared/fairness/cohorts.py``) and the adversary's input in
adversarial reweighting (``shared/fairness/arw.py``). The extractor is trained centrally on the public
speakers only and shipped to devices; embeddings never leave a device.

Architecture (Snyder et al. 2018's x-vector, shrunk for a device): frame-level TDNN layers (dilated 1-D
convolutions, ReLU, BatchNorm), a 1x1 expansion, attentive statistics pooling (Okabe et al. 2018: attention
weights over frames, then the weighted mean and standard deviation; ``attention_dim=0`` gives plain
statistics pooling) and one linear layer whose output is the embedding. Training uses additive angular
margin softmax (AAM-softmax, ArcFace; Deng et al. 2019), the standard loss of modern speaker verification.

Legend of tensor symbols:
    B   utterances in a batch
    T   feature frames (10 ms);  F  feature dimension (``input_dim``, 80 log-mel bins)
    C   TDNN channels;  P  channels pooled (``pooled_channels``)
    E   embedding dimension
    S   training speakers (classes of the AAM-softmax head)

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> offsets = rng.normal(size=(4, 16))
    >>> feats = [rng.normal(size=(120, 16)).astype(np.float32) + offsets[i % 4] for i in range(32)]
    >>> labels = [f"spk{i % 4}" for i in range(32)]
    >>> config = SpeakerEmbeddingConfig(input_dim=16, channels=32, pooled_channels=64, embedding_dim=16)
    >>> model = train_speaker_embedding(feats, labels, config=config, steps=30, batch_size=16, crop_frames=80)
    >>> vector = model.embed(feats[0])
    >>> vector.shape, round(float(vector.norm()), 4)
    (torch.Size([16]), 1.0)
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.data.corpora import Utterance
from shared.data.dataset import FeatureCache
from shared.data.features import GlobalCMVN
from shared.files import torch_save_atomic

__all__ = [
    "AAMSoftmax",
    "SpeakerEmbedder",
    "SpeakerEmbeddingConfig",
    "SpeakerEmbeddingError",
    "Verifier",
    "aam_softmax_loss",
    "collect_features",
    "crop",
    "load_speaker_embedder",
    "load_verifier",
    "save_speaker_embedder",
    "shipped_verifier",
    "train_speaker_embedding",
]

_FORMAT = "chorus-speaker-embedder-v1"


class SpeakerEmbeddingError(ValueError):
    """Bad training data, a bad config, or a file that is not a speaker-embedder checkpoint."""


@dataclass(frozen=True)
class SpeakerEmbeddingConfig:
    """Sizes of ``SpeakerEmbedder``. The defaults give 0.27 M parameters and about 0.2 M multiply-adds per
    10 ms frame (40 MFLOP per second of audio), small next to the ASR encoder."""

    input_dim: int = 80  # the Chorus front end: 80 log-mel bins, CMVN-normalized
    channels: int = 128  # x-vector uses 512; tens to hundreds of speakers need far less
    kernel_sizes: tuple[int, ...] = (5, 3, 3)  # x-vector's frame layers 1-3
    dilations: tuple[int, ...] = (1, 2, 3)  # receptive field 1 + 4 + 4 + 6 = 15 frames (150 ms)
    pooled_channels: int = 256  # x-vector's 1x1 "frame5" expansion (1500 there) before pooling
    attention_dim: int = 64  # hidden size of attentive statistics pooling; 0 = plain statistics pooling
    embedding_dim: int = 128  # the embedding (x-vector's "segment6" affine output)

    def __post_init__(self) -> None:
        for name in ("input_dim", "channels", "pooled_channels", "embedding_dim"):
            if getattr(self, name) < 1:
                raise SpeakerEmbeddingError(f"{name} must be positive, got {getattr(self, name)}")
        if self.attention_dim < 0:
            raise SpeakerEmbeddingError(f"attention_dim must be >= 0, got {self.attention_dim}")
        if len(self.kernel_sizes) != len(self.dilations) or not self.kernel_sizes:
            raise SpeakerEmbeddingError(
                f"kernel_sizes {self.kernel_sizes} and dilations {self.dilations} must be non-empty and of equal length"
            )
        bad = [k for k in self.kernel_sizes if k < 1 or k % 2 == 0]
        if bad or any(d < 1 for d in self.dilations):
            raise SpeakerEmbeddingError(
                f"kernel sizes must be odd and positive, dilations positive; got "
                f"kernel_sizes={self.kernel_sizes}, dilations={self.dilations}"
            )


class _TDNNLayer(nn.Module):
    """Dilated Conv1d ("same" length) -> ReLU -> BatchNorm1d, on (B, C_in, T) -> (B, C_out, T)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, dilation=dilation, padding=dilation * (kernel_size - 1) // 2
        )
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.relu(self.conv(x)))


class _StatisticsPooling(nn.Module):
    """(Attentive) statistics pooling: (B, P, T) frames and a (B, T) validity mask -> (B, 2P) [mean, std].

    With ``attention_dim > 0``, frame t gets weight alpha_t = softmax_t(v^T tanh(W h_t + b)) over the valid
    frames (Okabe et al. 2018); otherwise every valid frame weighs the same.
    """

    def __init__(self, channels: int, attention_dim: int) -> None:
        super().__init__()
        self.attention = (
            nn.Sequential(nn.Conv1d(channels, attention_dim, 1), nn.Tanh(), nn.Conv1d(attention_dim, 1, 1))
            if attention_dim > 0
            else None
        )

    def forward(self, frames: Tensor, valid: Tensor) -> Tensor:
        if self.attention is not None:
            scores = self.attention(frames).squeeze(1)  # (B, T)
        else:
            scores = torch.zeros_like(frames[:, 0])
        alpha = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1).unsqueeze(1)  # (B, 1, T)
        mean = (alpha * frames).sum(dim=-1)
        variance = (alpha * frames.square()).sum(dim=-1) - mean.square()
        return torch.cat([mean, variance.clamp(min=1e-5).sqrt()], dim=-1)


class SpeakerEmbedder(nn.Module):
    """TDNN frames -> 1x1 expansion -> (attentive) statistics pooling -> linear embedding.

    ``forward`` gives raw embeddings (for training); ``embed`` / ``embed_batch`` / ``embed_speaker`` give
    L2-normalized ones in eval mode (what cohorts and the adversary use). Padded frames are masked after every
    layer, so an utterance embeds the same alone or in a padded batch.
    """

    def __init__(self, config: SpeakerEmbeddingConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.input_dim] + [config.channels] * len(config.kernel_sizes)
        layers = [
            _TDNNLayer(c_in, c_out, k, d)
            for c_in, c_out, k, d in zip(widths[:-1], widths[1:], config.kernel_sizes, config.dilations, strict=True)
        ]
        layers.append(_TDNNLayer(config.channels, config.pooled_channels, 1, 1))
        self.frame_layers = nn.ModuleList(layers)
        self.pooling = _StatisticsPooling(config.pooled_channels, config.attention_dim)
        self.embedding = nn.Linear(2 * config.pooled_channels, config.embedding_dim)

    def forward(self, feats: Tensor, feat_lens: Tensor | None = None) -> Tensor:
        """Raw (unnormalized) embeddings.

        Args:
            feats: (B, T, F) features, zero-padded beyond ``feat_lens``.
            feat_lens: (B,) valid frames, each >= 1; None means all T frames are valid.

        Returns:
            (B, E).
        """
        if feats.dim() != 3 or feats.shape[-1] != self.config.input_dim:
            raise SpeakerEmbeddingError(f"feats must be (B, T, F={self.config.input_dim}), got {tuple(feats.shape)}")
        batch, frames = feats.shape[:2]
        if feat_lens is None:
            feat_lens = torch.full((batch,), frames, dtype=torch.long)
        if feat_lens.shape != (batch,) or (batch > 0 and (int(feat_lens.min()) < 1 or int(feat_lens.max()) > frames)):
            raise SpeakerEmbeddingError(f"feat_lens must be (B={batch},) in [1, T={frames}], got {feat_lens.tolist()}")
        valid = torch.arange(frames, device=feats.device)[None, :] < feat_lens.to(feats.device)[:, None]  # (B, T)
        mask = valid.unsqueeze(1).to(feats.dtype)
        x = feats.transpose(1, 2) * mask
        for layer in self.frame_layers:
            x = layer(x) * mask
        return self.embedding(self.pooling(x, valid))

    @torch.no_grad()
    def embed_batch(self, feats: Tensor, feat_lens: Tensor | None = None) -> Tensor:
        """(B, T, F) features, (B,) lengths -> (B, E) L2-normalized embeddings, computed in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return F.normalize(self(feats, feat_lens), dim=-1)
        finally:
            self.train(was_training)

    def embed(self, features: np.ndarray | Tensor) -> Tensor:
        """One utterance's (T, F) features -> its (E,) L2-normalized embedding."""
        # A copy: FeatureCache hands out read-only arrays, which torch will not wrap without warning.
        feats = torch.tensor(features, dtype=torch.float32) if isinstance(features, np.ndarray) else features.float()
        if feats.dim() != 2:
            raise SpeakerEmbeddingError(f"features must be one utterance's (T, F), got shape {tuple(feats.shape)}")
        device = next(self.parameters()).device
        return self.embed_batch(feats.unsqueeze(0).to(device))[0]

    def embed_speaker(self, utterances: Sequence[np.ndarray | Tensor]) -> Tensor:
        """A speaker's (E,) embedding from several utterances: the L2-normalized mean of their embeddings.

        This is what a device computes from its own speech for cohort assignment.
        """
        if not utterances:
            raise SpeakerEmbeddingError("embed_speaker needs at least one utterance")
        return F.normalize(torch.stack([self.embed(u) for u in utterances]).mean(dim=0), dim=0)


def aam_softmax_loss(cosines: Tensor, labels: Tensor, *, margin: float, scale: float) -> Tensor:
    """Additive angular margin softmax (ArcFace) loss, averaged over the batch.

    With theta_j the angle between an embedding and class j's weight vector and y the true class, the logits
    are ``s * cos(theta_y + m)`` for the true class and ``s * cos(theta_j)`` for the others, and the loss is
    their cross-entropy. Where ``theta_y + m`` would exceed pi (so that cos would no longer fall with the
    angle), the target logit is ``s * (cos(theta_y) - m * sin(m))`` instead, as in ArcFace's reference code.

    Args:
        cosines: (B, S) cosine similarities in [-1, 1].
        labels: (B,) class ids in [0, S).
        margin: m in radians (>= 0).
        scale: s (> 0).

    Returns:
        Scalar loss.
    """
    if cosines.dim() != 2 or labels.shape != (cosines.shape[0],):
        raise SpeakerEmbeddingError(
            f"cosines must be (B, S) and labels (B,), got {tuple(cosines.shape)} and {tuple(labels.shape)}"
        )
    if margin < 0 or scale <= 0:
        raise SpeakerEmbeddingError(f"need margin >= 0 and scale > 0, got margin={margin}, scale={scale}")
    cosines = cosines.clamp(-1.0, 1.0)
    target = cosines.gather(1, labels[:, None]).squeeze(1)
    sine = (1.0 - target.square()).clamp(min=1e-7).sqrt()
    shifted = target * math.cos(margin) - sine * math.sin(margin)  # cos(theta + m)
    shifted = torch.where(target > math.cos(math.pi - margin), shifted, target - margin * math.sin(margin))
    logits = cosines.scatter(1, labels[:, None], shifted[:, None]) * scale
    return F.cross_entropy(logits, labels)


class AAMSoftmax(nn.Module):
    """The training head: S class weight vectors; (B, E) embeddings, (B,) labels -> AAM-softmax loss."""

    def __init__(self, embedding_dim: int, num_speakers: int, *, margin: float = 0.2, scale: float = 30.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_speakers, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin  # 0.2 rad and s = 30: SpeechBrain's ECAPA VoxCeleb recipe (Wespeaker: s = 32)
        self.scale = scale

    def forward(self, embeddings: Tensor, labels: Tensor, *, margin: float | None = None) -> Tensor:
        cosines = F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T
        return aam_softmax_loss(cosines, labels, margin=self.margin if margin is None else margin, scale=self.scale)


def crop(features: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``frames``-long window; a shorter utterance is repeated to length (no padding in training)."""
    if features.shape[0] < frames:
        features = np.tile(features, (math.ceil(frames / features.shape[0]), 1))
    start = int(rng.integers(0, features.shape[0] - frames + 1))
    return features[start : start + frames]


def train_speaker_embedding(
    features: Sequence[np.ndarray],
    speakers: Sequence[str],
    *,
    config: SpeakerEmbeddingConfig = SpeakerEmbeddingConfig(),
    steps: int = 300,
    batch_size: int = 32,
    crop_frames: int = 200,
    lr: float = 2e-3,
    margin: float = 0.2,
    scale: float = 30.0,
    seed: int = 0,
) -> SpeakerEmbedder:
    """Train a ``SpeakerEmbedder`` on labelled utterances (the public speakers) with AAM-softmax.

    Each step draws ``batch_size`` utterances uniformly and a random ``crop_frames`` window of each (2 s by
    default: a fixed length keeps batches unpadded, and random windows augment). The margin ramps linearly
    from 0 to ``margin`` over the first quarter of the steps (margin warm-up, as in Wespeaker recipes: a full
    margin on a random network slows the start), Adam at a constant ``lr``.

    Args:
        features: per utterance, (T, F) features (CMVN-normalized fbank, e.g. from ``collect_features``).
        speakers: per utterance, its speaker id; at least two distinct speakers.
        config: the extractor's sizes; ``input_dim`` must equal F.
        steps, batch_size, crop_frames, lr, margin, scale, seed: as described above.

    Returns:
        The trained extractor, in eval mode.
    """
    if len(features) != len(speakers):
        raise SpeakerEmbeddingError(f"{len(features)} feature arrays but {len(speakers)} speaker labels")
    names = sorted(set(speakers))
    if len(names) < 2:
        raise SpeakerEmbeddingError(f"need utterances of at least 2 speakers, got {names}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("crop_frames", crop_frames)):
        if value < 1:
            raise SpeakerEmbeddingError(f"{name} must be positive, got {value}")
    arrays = [np.asarray(f, dtype=np.float32) for f in features]
    bad = [i for i, f in enumerate(arrays) if f.ndim != 2 or f.shape[1] != config.input_dim or f.shape[0] < 1]
    if bad:
        raise SpeakerEmbeddingError(
            f"features {bad[:5]} are not (T >= 1, F={config.input_dim}) arrays, e.g. shape {arrays[bad[0]].shape}"
        )
    labels = np.array([names.index(s) for s in speakers])

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SpeakerEmbedder(config)
    head = AAMSoftmax(config.embedding_dim, len(names), margin=margin, scale=scale)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=lr)
    model.train()
    warmup = max(1, steps // 4)
    for step in range(steps):
        chosen = rng.integers(0, len(arrays), size=batch_size)
        batch = torch.from_numpy(np.stack([crop(arrays[i], crop_frames, rng) for i in chosen]))
        loss = head(model(batch), torch.from_numpy(labels[chosen]), margin=margin * min(1.0, (step + 1) / warmup))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def collect_features(utterances: Sequence[Utterance], features: FeatureCache) -> tuple[list[np.ndarray], list[str]]:
    """(features, speaker ids) of the utterances whose audio is usable (the rest are in ``features.skipped``)."""
    arrays, speakers = [], []
    for utt in utterances:
        feats = features.features(utt)
        if feats is not None:
            arrays.append(feats)
            speakers.append(utt.speaker)
    return arrays, speakers


@dataclass(frozen=True)
class Verifier:
    """What a device verifies with: the extractor, the CMVN its features need, and its operating point.

    Attributes:
        embedder: the extractor, eval mode.
        cmvn: the global CMVN it was trained on (None: the run's own artifacts provide it).
        threshold: accept a trial when its cosine score is >= this (None: not calibrated).
        target_far: the false-acceptance rate ``threshold`` was chosen for, on public trials.
        meta: the rest of the file's record (training recipe, calibration trial counts).
    """

    embedder: SpeakerEmbedder
    cmvn: GlobalCMVN | None = None
    threshold: float | None = None
    target_far: float | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    center: np.ndarray | None = None  # (E,) mean embedding of a public cohort of the target domain, or None

    def embed(self, features: np.ndarray | Tensor) -> Tensor:
        """One utterance's (E,) L2-normalized embedding as the verifier scores it: with a ``center``, the
        extractor's embedding minus that mean, normalized again (domain centering: a mismatched domain, e.g. real
        speech for an extractor trained on synthetic speech, shares one offset that makes every two speakers
        look alike; the cohort's mean removes it)."""
        embedding = self.embedder.embed(features)
        if self.center is None:
            return embedding
        return F.normalize(embedding - torch.from_numpy(self.center).to(embedding), dim=0)

    def embed_speaker(self, utterances: Sequence[np.ndarray | Tensor]) -> Tensor:
        """A speaker's (E,) enrollment embedding: the L2-normalized mean of its utterances' ``embed``."""
        if not utterances:
            raise SpeakerEmbeddingError("a speaker embedding needs at least one utterance")
        return F.normalize(torch.stack([self.embed(u) for u in utterances]).mean(dim=0), dim=0)


def save_speaker_embedder(
    path: Path | str,
    model: SpeakerEmbedder,
    *,
    cmvn: GlobalCMVN | None = None,
    threshold: float | None = None,
    target_far: float | None = None,
    meta: dict[str, Any] | None = None,
    center: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Atomically write the extractor's config and weights (the AAM head is not needed to embed), and, for a
    verifier, its CMVN, operating threshold and centering vector; ``dtype=torch.float16`` halves a shipped file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}
    state = {k: v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"format": _FORMAT, "config": config, "state_dict": state, "meta": dict(meta or {})}
    if cmvn is not None:
        payload["cmvn_mean"], payload["cmvn_std"] = cmvn.mean.tolist(), cmvn.std.tolist()
    if threshold is not None:
        payload["threshold"], payload["target_far"] = float(threshold), target_far
    if center is not None:
        payload["center"] = [float(x) for x in center]
    return torch_save_atomic(path, payload)


def save_verifier(path: Path | str, verifier: Verifier, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a whole ``Verifier`` (extractor, CMVN, threshold, center, meta): what ``load_verifier`` reads back."""
    return save_speaker_embedder(
        path,
        verifier.embedder,
        cmvn=verifier.cmvn,
        threshold=verifier.threshold,
        target_far=verifier.target_far,
        meta=verifier.meta,
        center=verifier.center,
        dtype=dtype,
    )


def load_verifier(path: Path | str) -> Verifier:
    """Read a file written by ``save_speaker_embedder``: the extractor (float32, eval mode) and what came with it."""
    path = Path(path)
    if not path.is_file():
        raise SpeakerEmbeddingError(f"speaker embedder {path} does not exist")
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise SpeakerEmbeddingError(f"speaker embedder {path} is corrupt: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise SpeakerEmbeddingError(f"{path} is not a {_FORMAT} file")
    try:
        # values as read from the file: SpeakerEmbeddingConfig checks them (a wrong name is a TypeError)
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()}
        config = SpeakerEmbeddingConfig(**fields)
        model = SpeakerEmbedder(config)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    except (TypeError, RuntimeError, KeyError) as err:
        raise SpeakerEmbeddingError(f"speaker embedder {path} does not fit its config: {err}") from err
    cmvn = GlobalCMVN(np.array(payload["cmvn_mean"]), np.array(payload["cmvn_std"])) if "cmvn_mean" in payload else None
    return Verifier(
        embedder=model.eval(),
        cmvn=cmvn,
        threshold=payload.get("threshold"),
        target_far=payload.get("target_far"),
        meta=dict(payload.get("meta", {})),
        center=np.asarray(payload["center"], dtype=np.float32) if "center" in payload else None,
    )


def shipped_verifier(arm: str = "baseline") -> Path:
    """The shipped verifier of an arm of ``chorus model train-verifier`` (``baseline`` or ``arw``)."""
    from shared.models.checkpoint import SHIPPED_DIR

    return SHIPPED_DIR / ("speaker-sv.pt" if arm == "baseline" else f"speaker-sv-{arm}.pt")


def load_speaker_embedder(path: Path | str) -> SpeakerEmbedder:
    """Read an extractor written by ``save_speaker_embedder``; returned in eval mode."""
    return load_verifier(path).embedder
