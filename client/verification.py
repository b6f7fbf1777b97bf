"""Speaker verification on the device: enroll the device's user, then verify a recording against them.

Enrollment embeds a few of the user's recordings with the shipped verifier (``shared/models/speaker_embedding.py``:
the x-vector extractor, its CMVN and its threshold) and keeps their normalized mean embedding in a file on the
device; nothing is sent anywhere. Verification scores a recording by the cosine of its embedding with the
enrolled one and accepts at the verifier's threshold, which was chosen on public speakers' trials for a target
false-acceptance rate (``chorus model train-verifier``). An enrollment remembers which verifier made it:
embeddings of another model are not comparable, so verifying with it is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.data.audio import SAMPLE_RATE, AudioError, load_audio
from shared.data.corpora import CorpusError, load_corpus
from shared.data.dataset import FeatureCache
from shared.data.features import FeatureError, compute_fbank
from shared.files import write_text_atomic
from shared.models.checkpoint import sha256_of
from shared.models.speaker_embedding import SpeakerEmbeddingError, Verifier, load_verifier

__all__ = ["Decision", "Enrollment", "VerificationError", "enroll", "verify"]

_FORMAT = "chorus-enrollment-v1"


class VerificationError(ValueError):
    """Enrollment or verification cannot run as asked; the message names the file or directory."""


@dataclass(frozen=True)
class Enrollment:
    """The enrolled user: the normalized mean embedding of ``utterances`` recordings, and the verifier's sha256."""

    embedding: np.ndarray  # (E,)
    utterances: int
    verifier_sha256: str

    def save(self, path: Path) -> Path:
        return write_text_atomic(path, json.dumps({"format": _FORMAT, "verifier_sha256": self.verifier_sha256,
                                                   "utterances": self.utterances,
                                                   "embedding": self.embedding.tolist()}) + "\n")

    @classmethod
    def load(cls, path: Path) -> Enrollment:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise VerificationError(f"enrollment {path} is unreadable: {err} (run `chorus device enroll`)") from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise VerificationError(f"{path} is not a {_FORMAT} file")
        return cls(np.asarray(payload["embedding"], dtype=np.float32), int(payload["utterances"]),
                   str(payload["verifier_sha256"]))


@dataclass(frozen=True)
class Decision:
    """A verification: cosine score, the threshold, and whether the recording is accepted as the enrolled user."""

    score: float
    threshold: float
    target_far: float | None
    accepted: bool


def _verifier(path: Path) -> Verifier:
    try:
        verifier = load_verifier(path)
    except SpeakerEmbeddingError as err:
        raise VerificationError(str(err)) from err
    if verifier.cmvn is None or verifier.threshold is None:
        raise VerificationError(f"{path} is a speaker embedder without CMVN and threshold, not a verifier "
                                f"(`chorus model train-verifier` writes verifiers)")
    return verifier


def enroll(data: Path, *, verifier_path: Path, max_utterances: int = 10) -> Enrollment:
    """Enroll the one speaker of the recordings in ``data`` (any layout ``load_corpus`` reads), with at most
    ``max_utterances`` of them; unusable files are skipped (the count is in the error when none is usable)."""
    verifier = _verifier(verifier_path)
    assert verifier.cmvn is not None
    try:
        corpus = load_corpus(data)
    except CorpusError as err:
        raise VerificationError(str(err)) from err
    speakers = corpus.speakers()
    if len(speakers) != 1:
        raise VerificationError(f"{data} holds {len(speakers)} speakers ({', '.join(speakers[:5])}); a device "
                                f"enrolls exactly one")
    cache = FeatureCache(corpus, verifier.cmvn, max_items=0)
    feats = [f for f in (cache.features(u) for u in corpus.utterances[:max_utterances]) if f is not None]
    if not feats:
        raise VerificationError(f"{data}: none of {min(len(corpus.utterances), max_utterances)} recordings is usable "
                                f"({len(corpus.skipped) + len(cache.skipped)} skipped)")
    embedding = verifier.embedder.embed_speaker(feats).numpy()
    return Enrollment(embedding=embedding, utterances=len(feats), verifier_sha256=sha256_of(verifier_path))


def verify(audio: Path, enrollment: Enrollment, *, verifier_path: Path) -> Decision:
    """Score ``audio`` against the enrolled user and decide at the verifier's threshold."""
    if sha256_of(verifier_path) != enrollment.verifier_sha256:
        raise VerificationError(f"the enrollment was made with another verifier than {verifier_path}: enroll again")
    verifier = _verifier(verifier_path)
    assert verifier.cmvn is not None and verifier.threshold is not None
    try:
        feats = verifier.cmvn.apply(compute_fbank(load_audio(audio, sample_rate=SAMPLE_RATE, resample=True)))
    except (AudioError, FeatureError) as err:
        raise VerificationError(str(err)) from err
    test = verifier.embedder.embed(feats)
    score = float(F.normalize(torch.from_numpy(enrollment.embedding), dim=0) @ test)
    return Decision(score=score, threshold=verifier.threshold, target_far=verifier.target_far,
                    accepted=score >= verifier.threshold)
