"""Speaker-embedding extractor: AAM-softmax formula, learned speaker discrimination, batching, save/load."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import TINY_RUN
from shared.metrics import equal_error_rate
from shared.models.speaker_embedding import (
    SpeakerEmbedder,
    SpeakerEmbeddingConfig,
    SpeakerEmbeddingError,
    aam_softmax_loss,
    load_speaker_embedder,
    save_speaker_embedder,
    train_speaker_embedding,
)
from tests.conftest import needs_espeak

FEATURES = 16
TINY = SpeakerEmbeddingConfig(input_dim=FEATURES, channels=32, pooled_channels=64, attention_dim=16, embedding_dim=32)


def _synthetic_speakers(speakers: int, utterances: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Noise frames + a speaker offset in the first 8 bins + a per-utterance "channel" offset in the last 8.

    The channel offset is as large as the speaker offset, so an untrained network confuses them; a trained
    one must learn to ignore the channel bins.
    """
    rng = np.random.default_rng(seed)
    offsets = rng.normal(size=(speakers, FEATURES // 2))
    feats, labels = [], []
    for speaker in range(speakers):
        for _ in range(utterances):
            x = rng.normal(size=(int(rng.integers(60, 140)), FEATURES))
            x[:, : FEATURES // 2] += offsets[speaker]
            x[:, FEATURES // 2 :] += rng.normal(size=FEATURES // 2)
            feats.append(x.astype(np.float32))
            labels.append(f"seed{seed}-spk{speaker}")
    return feats, labels


def _eer(model: SpeakerEmbedder, feats: list[np.ndarray], labels: list[str]) -> float:
    embeddings = torch.stack([model.embed(f) for f in feats]).numpy()
    rows, cols = np.triu_indices(len(labels), k=1)
    scores = (embeddings @ embeddings.T)[rows, cols]
    same = np.array([labels[i] == labels[j] for i, j in zip(rows, cols)])
    return equal_error_rate(scores, same)


@pytest.fixture(scope="module")
def trained() -> SpeakerEmbedder:
    feats, labels = _synthetic_speakers(speakers=16, utterances=10, seed=1)
    return train_speaker_embedding(feats, labels, config=TINY, steps=100, batch_size=24, crop_frames=50, seed=0)


def test_aam_softmax_matches_the_formula() -> None:
    margin, scale, angle = 0.3, 10.0, 0.4
    # Embedding at angle 0.4 from class 0's weight and at pi/2 - 0.4 from class 1's; true class 0.
    cosines = torch.tensor([[math.cos(angle), math.sin(angle)]])
    loss = aam_softmax_loss(cosines, torch.tensor([0]), margin=margin, scale=scale)
    target, other = scale * math.cos(angle + margin), scale * math.sin(angle)
    expected = -target + math.log(math.exp(target) + math.exp(other))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Without margin it is plain softmax cross-entropy of the scaled cosines.
    plain = aam_softmax_loss(cosines, torch.tensor([1]), margin=0.0, scale=scale)
    assert float(plain) == pytest.approx(float(torch.nn.functional.cross_entropy(scale * cosines, torch.tensor([1]))))


def test_aam_softmax_beyond_pi_stays_monotonic() -> None:
    # theta + m > pi: ArcFace's fallback cos(theta) - m sin(m) keeps the target logit below cos(theta).
    cosines = torch.tensor([[-0.99, 0.0]])
    loss = aam_softmax_loss(cosines, torch.tensor([0]), margin=0.5, scale=1.0)
    fallback = -0.99 - 0.5 * math.sin(0.5)
    assert float(loss) == pytest.approx(-fallback + math.log(math.exp(fallback) + 1.0), rel=1e-5)
    with pytest.raises(SpeakerEmbeddingError, match="margin=-0.1"):
        aam_softmax_loss(cosines, torch.tensor([0]), margin=-0.1, scale=1.0)


def test_trained_embeddings_separate_unseen_speakers(trained: SpeakerEmbedder) -> None:
    feats, labels = _synthetic_speakers(speakers=8, utterances=6, seed=2)  # speakers never trained on
    torch.manual_seed(0)
    untrained = _eer(SpeakerEmbedder(TINY).eval(), feats, labels)
    eer = _eer(trained, feats, labels)
    assert eer < 0.12, f"EER {eer:.3f} on unseen speakers (untrained: {untrained:.3f})"
    assert eer < 0.5 * untrained


def test_embeddings_are_unit_norm_and_batching_is_exact(trained: SpeakerEmbedder) -> None:
    feats, _ = _synthetic_speakers(speakers=2, utterances=2, seed=3)
    lengths = torch.tensor([f.shape[0] for f in feats])
    padded = torch.zeros(len(feats), int(lengths.max()), FEATURES)
    for row, f in enumerate(feats):
        padded[row, : f.shape[0]] = torch.from_numpy(f)
    batched = trained.embed_batch(padded, lengths)
    single = torch.stack([trained.embed(f) for f in feats])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(feats)))
    speaker = trained.embed_speaker(feats[:2])
    assert speaker.shape == (TINY.embedding_dim,) and float(speaker.norm()) == pytest.approx(1.0)


def test_save_and_load_round_trip(trained: SpeakerEmbedder, tmp_path: Path) -> None:
    path = save_speaker_embedder(tmp_path / "spk.pt", trained)
    loaded = load_speaker_embedder(path)
    assert loaded.config == trained.config and not loaded.training
    x = np.random.default_rng(0).normal(size=(50, FEATURES)).astype(np.float32)
    torch.testing.assert_close(loaded.embed(x), trained.embed(x))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SpeakerEmbeddingError, match="junk.pt is corrupt"):
        load_speaker_embedder(tmp_path / "junk.pt")
    with pytest.raises(SpeakerEmbeddingError, match="does not exist"):
        load_speaker_embedder(tmp_path / "missing.pt")


def test_bad_inputs_are_named() -> None:
    feats, labels = _synthetic_speakers(speakers=2, utterances=2, seed=4)
    with pytest.raises(SpeakerEmbeddingError, match="at least 2 speakers"):
        train_speaker_embedding(feats, ["one"] * len(feats), config=TINY, steps=1)
    with pytest.raises(SpeakerEmbeddingError, match="4 feature arrays but 3 speaker labels"):
        train_speaker_embedding(feats, labels[:3], config=TINY, steps=1)
    with pytest.raises(SpeakerEmbeddingError, match=r"F=16"):
        train_speaker_embedding([f[:, :8] for f in feats], labels, config=TINY, steps=1)
    with pytest.raises(SpeakerEmbeddingError, match="kernel sizes must be odd"):
        SpeakerEmbeddingConfig(kernel_sizes=(4,), dilations=(1,))


@needs_espeak
def test_runs_from_the_shipped_base_take_the_shipped_verifier_as_their_cohort_embedder(tmp_path: Path) -> None:
    from shared.config import RunConfig
    from shared.data.prepare import SHIPPED_EMBEDDER, prepare, speaker_embedder_path
    from shared.models.speaker_embedding import shipped_verifier

    default_model = {k: v for k, v in TINY_RUN.items() if not k.startswith("model.")}  # the shipped base
    flat = {**default_model, "fairness.enabled": True, "fairness.embedder-steps": 2}
    auto = RunConfig.from_flat({**flat, "workdir": str(tmp_path / "auto")})
    path = speaker_embedder_path(prepare(auto, progress=False).artifacts, auto)
    assert path.name == SHIPPED_EMBEDDER and path.read_bytes() == shipped_verifier().read_bytes()

    train = RunConfig.from_flat({**flat, "fairness.embedder": "train", "workdir": str(tmp_path / "train")})
    artifacts = prepare(train, progress=False).artifacts
    assert speaker_embedder_path(artifacts, train).name == "speaker-embedder-2.pt"
    assert load_speaker_embedder(artifacts / "speaker-embedder-2.pt").config.embedding_dim > 0
    assert not (artifacts / SHIPPED_EMBEDDER).exists()

    # From random weights the run fits a CMVN of its own, which the verifier was not trained with: one is trained.
    own = RunConfig.from_flat(
        {**TINY_RUN, "fairness.enabled": True, "fairness.embedder-steps": 2, "workdir": str(tmp_path / "own")}
    )
    assert speaker_embedder_path(prepare(own, progress=False).artifacts, own).name == "speaker-embedder-2.pt"
