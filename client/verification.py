"""Speaker verification on the device: enroll the device's user, then verify a recording against them.

Enrollment embeds a few of the user's recordings with the shipped verifier (``shared/models/speaker_embedding.py``:
the x-vector extractor, its CMVN and its threshold) and keeps their normalized mean embedding in a file on the
device; nothing is sent anywhere. Verification scores a recording by the cosine of its embedding with the
enrolled one and accepts at the verifier's threshold, which was chosen on public speakers' trials for a target
false-acceptance rate (``chorus model train-verifier``). An enrollment remembers which verifier made it:
embeddings of another model are not comparable, so verifying with it is refused.

Federated fine-tuning of the verifier (``sv_app``, the math in ``shared/federated_verification.py``): a device
that holds one speaker's recordings fine-tunes the embedder the server sends with its own utterances as positives
and the public impostor centroids that come with the model as negatives, and replies with the updated arrays,
``num-examples``, ``train-loss`` and ``local-steps``: nothing else (the audit mod checks it).

Why a ClientApp of its own rather than a flag on the recognizer's train handler (``client/client_app.py``): that
handler is built around the run config, the transducer, its tokenized data and its SecAgg+ / central-DP mods;
verifier fine-tuning shares none of them, only the privacy audit. One Flower run runs one ClientApp, so the
verifier's federation is its own run of this app, wrapped in the same ``audit_mod``. Its device reads two
``node_config`` keys: ``data-dir`` (its recordings, any layout ``load_corpus`` reads, one speaker: the same
folder ``chorus device enroll --data`` takes) and ``verifier`` (the verifier file the device holds: the
embedder's architecture and the CMVN its features need; default: the shipped baseline verifier).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.data.audio import SAMPLE_RATE, AudioError, load_audio
from shared.data.corpora import CorpusError, load_corpus
from shared.data.dataset import FeatureCache
from shared.data.features import FeatureError, compute_fbank
from shared.fairness.arw import Adversary
from shared.federated_verification import (
    ADVERSARY_PREFIX,
    IMPOSTORS,
    DeviceRecipe,
    adversary_state,
    embedder_state,
    fine_tune_speaker,
    nearest_cluster,
)
from shared.files import write_text_atomic
from shared.models.checkpoint import sha256_of
from shared.models.speaker_embedding import SpeakerEmbedder, SpeakerEmbeddingError, Verifier, load_verifier, shipped_verifier
from shared.privacy.audit import audit_mod
from shared.records import array_record, config_record, scalar

__all__ = ["DATA_DIR_KEY", "VERIFIER_KEY", "Decision", "Enrollment", "VerificationError", "enroll", "sv_app", "verify"]

DATA_DIR_KEY = "data-dir"  # node_config: the device's own recordings (as client/data.py's deployed devices)
VERIFIER_KEY = "verifier"  # node_config: the verifier file the device holds (default: the shipped baseline)
_CLUSTERS_STATE = "sv-clusters"  # context.state: the k-means cluster of each own utterance (ARW), never sent

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
        return write_text_atomic(
            path,
            json.dumps(
                {
                    "format": _FORMAT,
                    "verifier_sha256": self.verifier_sha256,
                    "utterances": self.utterances,
                    "embedding": self.embedding.tolist(),
                }
            )
            + "\n",
        )

    @classmethod
    def load(cls, path: Path) -> Enrollment:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise VerificationError(f"enrollment {path} is unreadable: {err} (run `chorus device enroll`)") from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise VerificationError(f"{path} is not a {_FORMAT} file")
        return cls(
            np.asarray(payload["embedding"], dtype=np.float32), int(payload["utterances"]), str(payload["verifier_sha256"])
        )


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
        raise VerificationError(
            f"{path} is a speaker embedder without CMVN and threshold, not a verifier "
            f"(`chorus model train-verifier` writes verifiers)"
        )
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
        raise VerificationError(
            f"{data} holds {len(speakers)} speakers ({', '.join(speakers[:5])}); a device enrolls exactly one"
        )
    cache = FeatureCache(corpus, verifier.cmvn, max_items=0)
    feats = [f for f in (cache.features(u) for u in corpus.utterances[:max_utterances]) if f is not None]
    if not feats:
        raise VerificationError(
            f"{data}: none of {min(len(corpus.utterances), max_utterances)} recordings is usable "
            f"({len(corpus.skipped) + len(cache.skipped)} skipped)"
        )
    embedding = verifier.embed_speaker(feats).numpy()
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
    test = verifier.embed(feats)
    score = float(F.normalize(torch.from_numpy(enrollment.embedding), dim=0) @ test)
    return Decision(
        score=score, threshold=verifier.threshold, target_far=verifier.target_far, accepted=score >= verifier.threshold
    )


# -- federated fine-tuning: the device's ClientApp -------------------------------------------------------------

sv_app = ClientApp(mods=[audit_mod])  # the audit wraps every handler: mods are bound when handlers register


@functools.lru_cache(maxsize=4)
def _device_verifier(path: Path) -> Verifier:
    return _verifier(path)


@functools.lru_cache(maxsize=128)  # a simulation process plays many devices over many rounds
def _device_features(data: Path, verifier_path: Path) -> tuple[np.ndarray, ...]:
    """The CMVN-normalized features of the device's usable recordings (all of them: one speaker's)."""
    verifier = _device_verifier(verifier_path)
    assert verifier.cmvn is not None
    try:
        corpus = load_corpus(data)
    except CorpusError as err:
        raise VerificationError(str(err)) from err
    if len(corpus.speakers()) != 1:
        raise VerificationError(f"{data} holds {len(corpus.speakers())} speakers; a device fine-tunes on exactly one")
    cache = FeatureCache(corpus, verifier.cmvn, max_items=0)
    feats = tuple(f for f in (cache.features(u) for u in corpus.utterances) if f is not None)
    if not feats:
        raise VerificationError(f"{data}: none of {len(corpus.utterances)} recordings is usable")
    return feats


def _own_clusters(
    state: RecordDict, model: SpeakerEmbedder, features: tuple[np.ndarray, ...], centres: torch.Tensor
) -> np.ndarray:
    """The cluster of each own utterance under the model of the device's first ARW round (Jin et al.: clusters of
    the starting model's embeddings), kept in ``context.state``; it never leaves the device."""
    record = state.get(_CLUSTERS_STATE)
    ids = record.get("ids") if isinstance(record, ConfigRecord) else None
    if isinstance(ids, list) and len(ids) == len(features):
        return np.array(ids, dtype=np.int64)
    embeddings = torch.stack([model.embed(f) for f in features])
    found = nearest_cluster(embeddings, centres)
    state[_CLUSTERS_STATE] = ConfigRecord({"ids": [int(i) for i in found]})
    return found


@sv_app.train()
def sv_train(msg: Message, context: Context) -> Message:
    """One round of verifier fine-tuning on this device's speaker; see the module docstring."""
    torch.set_num_threads(1)  # one core per simulated device, as the recognizer's app
    config = config_record(msg.content, "config")
    recipe = DeviceRecipe.from_config(config)
    if DATA_DIR_KEY not in context.node_config:
        raise VerificationError(f"node_config names no {DATA_DIR_KEY!r}: the device's own recordings")
    verifier_path = Path(str(context.node_config.get(VERIFIER_KEY, shipped_verifier()))).resolve()
    verifier = _device_verifier(verifier_path)
    features = _device_features(Path(str(context.node_config[DATA_DIR_KEY])).resolve(), verifier_path)
    sent = array_record(msg.content, "arrays").to_torch_state_dict()
    model = copy.deepcopy(verifier.embedder)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in sent.items() if not k.startswith(ADVERSARY_PREFIX)}, strict=False
    )
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise VerificationError(f"the server's arrays do not fit the device's verifier {verifier_path.name}")
    impostors = array_record(msg.content, IMPOSTORS)
    centroids = torch.from_numpy(impostors["centroids"].numpy()).float()
    adversary, own_clusters, impostor_clusters = None, None, None
    if recipe.arw:
        centres = torch.from_numpy(impostors["centres"].numpy()).float()
        adversary = Adversary(len(centres))
        adversary.load_state_dict(
            {k.removeprefix(ADVERSARY_PREFIX): v for k, v in sent.items() if k.startswith(ADVERSARY_PREFIX)}
        )
        own_clusters = _own_clusters(context.state, model, features, centres)
        impostor_clusters = impostors["clusters"].numpy().astype(np.int64)
    device = int(context.node_config.get("partition-id", context.node_id % 1_000_003))
    seed = (recipe.seed * 1_000_003 + device) * 1009 + int(scalar(config, "server-round"))
    update = fine_tune_speaker(
        model,
        features,
        centroids,
        recipe,
        seed=seed,
        adversary=adversary,
        own_clusters=own_clusters,
        impostor_clusters=impostor_clusters,
    )
    arrays = embedder_state(update.embedder)
    if update.adversary is not None:
        arrays.update(adversary_state(update.adversary))
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord({"num-examples": len(features), "train-loss": update.loss, "local-steps": update.steps}),
            }
        ),
        reply_to=msg,
    )
