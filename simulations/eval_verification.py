"""On-device speaker verification (SV): `chorus model train-verifier` and `chorus eval verification`.

Training (``train_verifiers``), on public speakers only: the x-vector extractor of
``shared/models/speaker_embedding.py`` is pre-trained with AAM-softmax, then fine-tuned twice from that same
start on the same batches with the pairwise loss of ``shared/fairness/pairwise_arw.py``: plainly (``baseline``)
and with pairwise ARW (``arw``). Each is calibrated on trials of public speakers it did not train on: its
threshold is the lowest whose false-acceptance rate there is at most ``target_far``. Features use the shipped
ASR base's CMVN, so a device has one front end.

Evaluation (``evaluate_verification``), on unseen speakers, as a device verifies: each speaker enrolls with its
first ``enroll`` utterances (the normalized mean embedding: what ``chorus device enroll`` keeps); each of its
other utterances is a target trial, and as many utterances of other speakers, drawn at random, are impostor
trials. So every speaker has as many target as impostor trials, and a cohort's figures are those of its
enrolled speakers' trials. Reported per arm: EER (scikit-learn's ROC) with a 95% bootstrap interval over
speakers, minDCF (p_target 0.01), the error rates at the shipped threshold; per ``speakers.tsv`` attribute
(gender, age group, accent, ...) each cohort's EER, the gap (worst - best) / best and the spread (standard
deviation) across cohorts. ``trials.tsv``, ``det.png`` and ``report.md`` go to the output directory.

Federated arms (``evaluate_verification(..., public=P)``; ``shared/federated_verification.py`` has the math):
the evaluated corpus' speakers are split, seeded and stratified by their ``speakers.tsv`` attributes, into a
federated half and a test half (``split_speakers``). Each federated speaker is one device holding all its
recordings (a one-speaker folder under ``<out>/devices``); the baseline verifier is fine-tuned on them for
``plan.federated.rounds`` rounds (``federate``): every device is a call of the real ClientApp
(``client.verification.sv_app``, its privacy audit mod included) through ``simulations/harness.py``'s
``InProcessGrid``; the server side is Flower's FedAvg (``server.workflow.make_strategy``) and the server's one
send/receive path, which validates every reply (``server/exchange.py``). Each round the server embeds the public
speakers (the first ``public_speakers`` of ``public``: the verifier's own public training pool) with the current
model and sends their centroids as the devices' impostors. ``federated`` fine-tunes plainly, ``federated+arw``
with pairwise ARW on the devices; both start from the baseline verifier, so ``federated+arw`` vs ``federated``
isolates on-device ARW. All arms are then scored on the test half's trials only (trial speakers never trained
on), and, as a check of the fit, on trials of the federated speakers themselves (``seen_eer``: utterances the
devices trained on). A federated model is not calibrated: it reports no threshold.

In-domain public speech (``public_share``, ``--public-share``): a share of the evaluated corpus' own speakers is
taken first as the public pool, public speech of the devices' domain: the federated arms' impostors (instead of a
public corpus' synthetic speakers) and the centering cohort; the rest is split into federated and test halves.

Central tuning (``tune``, ``--tune``, with ``public_share``): the baseline fine-tuned with the pairwise loss on the
in-domain public pool, plainly (``tuned``) and with pairwise ARW (``tuned+arw``), from the same start on the same
batches: ARW's comparison on public speech of the devices' domain, where the synthetic training pool has none.

Centering (``center_verifier``; ``--center`` adds ``<arm>+center`` for every arm): a verifier adapted to a speech
domain by a public cohort of it, its mean embedding subtracted before scoring and its threshold recalibrated on
the cohort's trials. The cohort is the in-domain public pool, or without one the federated half (never in a
trial either); ``chorus model center-verifier`` (``center_on_corpus``) adapts a verifier file on a whole corpus.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.data.corpora import Corpus, CorpusError, load_corpus, read_speakers_tsv
from shared.data.dataset import FeatureCache
from shared.data.features import GlobalCMVN
from shared.fairness.arw import Adversary, arl_weights
from shared.fairness.pairwise_arw import PairwiseRecipe, train_pairwise
from shared.federated_verification import (
    ADVERSARY_PREFIX,
    IMPOSTORS,
    DeviceRecipe,
    adversary_state,
    embedder_state,
    impostor_centroids,
    public_clusters,
)
from shared.files import write_text_atomic
from shared.metrics import equal_error_rate, min_dcf, threshold_at_far
from shared.models.checkpoint import checkpoint_frontend
from shared.models.speaker_embedding import (
    SpeakerEmbedder,
    SpeakerEmbeddingConfig,
    SpeakerEmbeddingError,
    Verifier,
    load_verifier,
    save_speaker_embedder,
    save_verifier,
    train_speaker_embedding,
)

__all__ = [
    "ARMS",
    "FEDERATED_ARMS",
    "FULL",
    "QUICK",
    "Federation",
    "FederatedPlan",
    "Trials",
    "VerifierPlan",
    "VerificationError",
    "evaluate_verification",
    "federate",
    "make_trials",
    "split_speakers",
    "train_verifiers",
]

ARMS = ("baseline", "arw")  # trained centrally on public speakers (`chorus model train-verifier`)
FEDERATED_ARMS = ("federated", "federated+arw")  # the baseline, fine-tuned on devices (`federate`)
TUNED_ARMS = ("tuned", "tuned+arw")  # the baseline, fine-tuned centrally on the in-domain public pool (``tune``)
BY = ("gender", "age_group", "accent")
P_TARGET = 0.01


class VerificationError(ValueError):
    """A corpus or model that cannot be used for verification; the message names it."""


@dataclass(frozen=True)
class FederatedPlan:
    """Federated fine-tuning of the baseline verifier: the arms ``federated`` and ``federated+arw``."""

    rounds: int = 6
    device: DeviceRecipe = field(default_factory=DeviceRecipe)  # each device's local steps (sv.* config keys)
    public_speakers: int = 64  # impostor centroids: the public corpus' first speakers
    public_utterances: int = 4  # per public speaker (its first ones)
    clusters: int = 8  # ARW's pseudo-labels: k-means of the public centroids under the starting model
    arw_warmup: int = 1  # rounds whose adversary stays uniform (learner only)
    share: float = 0.5  # of the evaluated corpus' speakers federated (one device each); the rest are tested

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.public_speakers < 1 or self.public_utterances < 1 or self.arw_warmup < 0:
            raise VerificationError(f"need rounds, public_speakers, public_utterances >= 1 and arw_warmup >= 0 in {self}")
        if not 0 < self.share < 1:
            raise VerificationError(f"share must lie in (0, 1), got {self.share}")


@dataclass(frozen=True)
class VerifierPlan:
    """How the verifiers are trained and evaluated."""

    train_speakers: int  # public speakers the extractor trains on (the first ones of the corpus)
    calibration_speakers: int  # further public speakers whose trials set the threshold
    utterances: int  # per training speaker (the first ones)
    pretrain_steps: int  # AAM-softmax
    recipe: PairwiseRecipe = field(default_factory=PairwiseRecipe)
    config: SpeakerEmbeddingConfig = field(default_factory=SpeakerEmbeddingConfig)
    target_far: float = 0.01
    enroll: int = 3  # utterances a device enrolls with
    bootstrap: int = 200  # resamples of speakers for the EER interval
    seed: int = 0  # trials, bootstrap, the federated / test split
    federated: FederatedPlan = field(default_factory=FederatedPlan)
    # ``tune``: the baseline's pairwise fine-tuning on the in-domain public pool (speakers per batch capped at its size)
    tune: PairwiseRecipe = field(default_factory=lambda: PairwiseRecipe(steps=300, warmup=30))


FULL = VerifierPlan(
    train_speakers=400, calibration_speakers=50, utterances=8, pretrain_steps=1000, recipe=PairwiseRecipe(steps=600, warmup=60)
)
# CI-sized: tiny extractor and corpus; its numbers prove the pipeline only.
QUICK = VerifierPlan(
    train_speakers=24,
    calibration_speakers=6,
    utterances=6,
    pretrain_steps=60,
    recipe=PairwiseRecipe(steps=40, speakers_per_batch=8, utterances_per_speaker=3, crop_frames=100, clusters=4, warmup=10),
    config=SpeakerEmbeddingConfig(channels=32, pooled_channels=64, attention_dim=16, embedding_dim=32),
    bootstrap=50,
    tune=PairwiseRecipe(steps=8, speakers_per_batch=4, utterances_per_speaker=2, crop_frames=100, clusters=2, warmup=2),
    federated=FederatedPlan(
        rounds=3,
        public_speakers=24,
        public_utterances=3,
        clusters=4,
        device=DeviceRecipe(local_steps=4, utterances_per_step=4, crop_frames=100, lr=1e-3),
    ),
)


def _open(path: Path) -> Corpus:
    try:
        corpus = load_corpus(path)
    except CorpusError as err:
        raise VerificationError(str(err)) from err
    if not corpus.utterances:
        raise VerificationError(f"corpus {path} has no readable utterance ({len(corpus.skipped)} files skipped)")
    return corpus


def _features(corpus: Corpus, cmvn: GlobalCMVN, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Features of the named utterances whose audio is usable (the rest are skipped and logged by the cache)."""
    wanted = set(ids)
    cache = FeatureCache(corpus, cmvn, max_items=0)
    found = {u.id: cache.features(u) for u in corpus.utterances if u.id in wanted}
    return {u: f for u, f in found.items() if f is not None}


# -- trials --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trials:
    """Verification trials: the enrolled speaker, the test utterance, and whether it is that speaker's."""

    enrollments: dict[str, tuple[str, ...]]  # speaker -> utterance ids it enrolls with
    speaker: tuple[str, ...]
    utterance: tuple[str, ...]
    same: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.speaker)

    def tsv(self) -> str:
        rows = [f"{s}\t{u}\t{'target' if t else 'impostor'}" for s, u, t in zip(self.speaker, self.utterance, self.same)]
        return "enrolled_speaker\ttest_utterance\tkind\n" + "\n".join(rows) + "\n"


def make_trials(by_speaker: dict[str, list[str]], *, enroll: int, seed: int) -> Trials:
    """Each speaker with more than ``enroll`` utterances enrolls with its first ``enroll`` (sorted ids); its
    other utterances are target trials, and as many random utterances of other speakers are impostor trials."""
    rng = np.random.default_rng(seed)
    eligible = {s: sorted(ids) for s, ids in sorted(by_speaker.items()) if len(ids) > enroll}
    if len(eligible) < 2:
        raise VerificationError(f"trials need >= 2 speakers with more than {enroll} utterances, got {len(eligible)}")
    speakers, utterances, same = [], [], []
    for name, ids in eligible.items():
        others = [u for s, o in eligible.items() if s != name for u in o[enroll:]]
        targets = ids[enroll:]
        impostors = rng.choice(len(others), size=len(targets), replace=len(others) < len(targets))
        for utterance, kind in [(u, True) for u in targets] + [(others[i], False) for i in impostors]:
            speakers.append(name)
            utterances.append(utterance)
            same.append(kind)
    return Trials(
        enrollments={s: tuple(ids[:enroll]) for s, ids in eligible.items()},
        speaker=tuple(speakers),
        utterance=tuple(utterances),
        same=np.array(same, dtype=bool),
    )


def score_trials(verifier: Verifier, trials: Trials, features: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) cosine scores: the enrolled speaker's mean embedding against each test utterance's (as a device
    scores: ``Verifier.embed``, centered when the verifier carries a center)."""
    embedding = {
        u: verifier.embed(features[u]) for u in {*trials.utterance, *(u for ids in trials.enrollments.values() for u in ids)}
    }
    enrolled = {
        s: F.normalize(torch.stack([embedding[u] for u in ids]).mean(dim=0), dim=0) for s, ids in trials.enrollments.items()
    }
    return np.array([float(enrolled[s] @ embedding[u]) for s, u in zip(trials.speaker, trials.utterance)])


def center_on_corpus(verifier_path: Path, corpus_dir: Path, out: Path, *, plan: VerifierPlan) -> dict[str, Any]:
    """``chorus model center-verifier``: the verifier at ``verifier_path`` centered and recalibrated on every
    speaker of ``corpus_dir`` (a public corpus of the domain the devices will hear), written to ``out``."""
    try:
        verifier = load_verifier(verifier_path)
    except SpeakerEmbeddingError as err:
        raise VerificationError(str(err)) from err
    corpus = _open(corpus_dir)
    cmvn = verifier.cmvn or default_cmvn()
    features = _features(corpus, cmvn, [u.id for u in corpus.utterances])
    cohort = {s: [u.id for u in utts] for s, utts in corpus.by_speaker().items()}
    adapted, record = center_verifier(replace(verifier, cmvn=cmvn), cohort, features, plan=plan)
    record = {"corpus": str(corpus.root), "skipped": len(corpus.skipped), **record}
    save_verifier(out, replace(adapted, meta={**adapted.meta, "centered": record}))
    return {"verifier": str(out), **record}


def _usable(by_speaker: dict[str, list[str]], features: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {s: [u for u in ids if u in features] for s, ids in by_speaker.items()}


def center_verifier(
    verifier: Verifier, cohort: dict[str, list[str]], features: dict[str, np.ndarray], *, plan: VerifierPlan
) -> tuple[Verifier, dict[str, Any]]:
    """``verifier`` adapted to a domain with a public cohort of it (speaker -> utterance ids): its ``center`` is
    the mean embedding of the cohort's utterances, and its threshold is recalibrated on the cohort's own trials,
    scored centered, for the verifier's target false-acceptance rate. Returns the adapted verifier and a record
    of the cohort and the calibration."""
    usable = {s: ids for s, ids in _usable(cohort, features).items() if ids}
    if len(usable) < 2:
        raise VerificationError(f"centering needs a cohort of >= 2 speakers with usable audio, got {len(usable)}")
    ids = [u for us in usable.values() for u in us]
    center = torch.stack([verifier.embedder.embed(features[u]) for u in ids]).mean(dim=0).numpy()
    centered = replace(verifier, center=center)
    trials = make_trials(usable, enroll=plan.enroll, seed=plan.seed)
    scores = score_trials(centered, trials, features)
    far = verifier.target_far if verifier.target_far is not None else plan.target_far
    threshold = threshold_at_far(scores, trials.same, far)
    record = {
        "cohort_speakers": len(usable),
        "cohort_utterances": len(ids),
        "calibration_trials": len(trials),
        "calibration_eer": round(equal_error_rate(scores, trials.same), 4),
        "threshold": round(threshold, 4),
        "target_far": far,
    }
    return replace(centered, threshold=threshold, target_far=far, meta={**verifier.meta, "centered": record}), record


# -- training ------------------------------------------------------------------------------------------------


def default_cmvn() -> GlobalCMVN:
    """The shipped ASR base's CMVN: the device's one front end."""
    from simulations.eval_wer import default_checkpoint

    frontend = checkpoint_frontend(default_checkpoint())
    if frontend is None:
        raise VerificationError(f"{default_checkpoint()} carries no CMVN")
    return frontend.cmvn


def _pairwise_record(history: dict[str, list[float]], seconds: float) -> dict[str, Any]:
    """What a pairwise fine-tuning reports: its time, its last 50 steps' mean pair loss, ARW's cluster weights."""
    record: dict[str, Any] = {"seconds": seconds, "final_pair_loss": round(float(np.mean(history["loss"][-50:])), 4)}
    if "cluster_weight" in history:
        record["cluster_weight"] = [round(w, 3) for w in history["cluster_weight"]]
    return record


def train_verifiers(corpus_dir: Path, plan: VerifierPlan, out_dir: Path, *, log: Any = print) -> dict[str, Any]:
    """Train the baseline and ARW verifiers on ``corpus_dir``'s first speakers; write ``<out_dir>/<arm>.pt``.

    Returns the training record (speakers, steps, seconds, calibration, the adversary's cluster weights).
    """
    corpus = _open(corpus_dir)
    speakers = corpus.speakers()
    needed = plan.train_speakers + plan.calibration_speakers
    if len(speakers) < needed:
        raise VerificationError(
            f"corpus {corpus_dir} has {len(speakers)} speakers; the plan trains on "
            f"{plan.train_speakers} and calibrates on {plan.calibration_speakers}"
        )
    by_speaker = {s: [u.id for u in utts] for s, utts in corpus.by_speaker().items()}
    train = speakers[: plan.train_speakers]
    calibration = speakers[plan.train_speakers : needed]
    cmvn = default_cmvn()
    began = time.monotonic()
    train_ids = [u for s in train for u in sorted(by_speaker[s])[: plan.utterances]]
    features = _features(corpus, cmvn, train_ids + [u for s in calibration for u in by_speaker[s]])
    utterance_speaker = {u.id: u.speaker for u in corpus.utterances}
    usable = [u for u in train_ids if u in features]
    feats, labels = [features[u] for u in usable], [utterance_speaker[u] for u in usable]
    log(f"features: {len(features)} utterances in {time.monotonic() - began:.0f} s")
    started = time.monotonic()
    pretrained = train_speaker_embedding(
        feats, labels, config=plan.config, steps=plan.pretrain_steps, crop_frames=plan.recipe.crop_frames, seed=plan.seed
    )
    record: dict[str, Any] = {
        "train_speakers": len(train),
        "train_utterances": len(usable),
        "calibration_speakers": len(calibration),
        "pretrain_steps": plan.pretrain_steps,
        "pretrain_seconds": round(time.monotonic() - started, 1),
        "recipe": asdict(plan.recipe),
        "target_far": plan.target_far,
        "arms": {},
    }
    log(f"AAM-softmax pre-training: {plan.pretrain_steps} steps in {record['pretrain_seconds']} s")
    calibration_trials = make_trials(
        _usable({s: by_speaker[s] for s in calibration}, features), enroll=plan.enroll, seed=plan.seed
    )
    for arm in ARMS:
        started = time.monotonic()
        model, history = train_pairwise(pretrained, feats, labels, replace(plan.recipe, arw=arm == "arw"))
        seconds = round(time.monotonic() - started, 1)
        verifier = Verifier(embedder=model, cmvn=cmvn)
        scores = score_trials(verifier, calibration_trials, features)
        threshold = threshold_at_far(scores, calibration_trials.same, plan.target_far)
        arm_record: dict[str, Any] = {
            **_pairwise_record(history, seconds),
            "calibration_trials": len(calibration_trials),
            "calibration_eer": round(equal_error_rate(scores, calibration_trials.same), 4),
            "threshold": round(threshold, 4),
        }
        record["arms"][arm] = arm_record
        save_speaker_embedder(
            out_dir / f"{arm}.pt",
            model,
            cmvn=cmvn,
            threshold=threshold,
            target_far=plan.target_far,
            meta={"arm": arm, "training": arm_record},
            dtype=torch.float16,
        )
        log(
            f"{arm}: {plan.recipe.steps} pairwise steps in {seconds} s, calibration EER "
            f"{arm_record['calibration_eer']:.4f}, threshold {threshold:.4f}"
        )
    record["seconds"] = round(time.monotonic() - began, 1)
    write_text_atomic(out_dir / "training.json", json.dumps(record, indent=1) + "\n")
    return record


# -- federated fine-tuning -----------------------------------------------------------------------------------


def split_speakers(
    speakers: Sequence[str], attributes: dict[str, dict[str, str]], *, share: float, seed: int, by: Sequence[str] = BY
) -> tuple[list[str], list[str]]:
    """(federated, test) speakers: shuffled (seeded) within strata of equal ``by`` attributes, strata one after
    the other, then every speaker whose running share crosses a multiple of ``share`` is federated (a systematic
    sample: each stratum splits in proportion, within one speaker)."""
    rng = np.random.default_rng(seed)
    strata: dict[tuple[str, ...], list[str]] = {}
    for name in sorted(speakers):
        strata.setdefault(tuple(attributes.get(name, {}).get(a, "") for a in by), []).append(name)
    ordered = [s for key in sorted(strata) for s in rng.permutation(strata[key]).tolist()]
    federated = [s for i, s in enumerate(ordered) if math.floor((i + 1) * share) > math.floor(i * share)]
    test = [s for s in ordered if s not in set(federated)]
    if len(federated) < 2 or len(test) < 2:
        raise VerificationError(
            f"{len(speakers)} speakers split {len(federated)} federated / {len(test)} tested; each side needs at least 2"
        )
    return sorted(federated), sorted(test)


def _device_dirs(corpus: Corpus, speakers: Sequence[str], out: Path) -> list[Path]:
    """One folder per federated speaker with its recordings (a Kaldi data directory of absolute paths): what a
    device holds, the folder ``chorus device enroll --data`` would take."""
    by_speaker = corpus.by_speaker()
    dirs = []
    for i, speaker in enumerate(speakers):
        folder = out / f"device-{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        utts = by_speaker[speaker]
        write_text_atomic(folder / "text", "".join(f"{u.id} {u.text}\n" for u in utts))
        write_text_atomic(folder / "utt2spk", "".join(f"{u.id} {speaker}\n" for u in utts))
        write_text_atomic(folder / "wav.scp", "".join(f"{u.id} {u.audio.resolve()}\n" for u in utts))
        dirs.append(folder)
    return dirs


def _public_features(public: Path, cmvn: GlobalCMVN, plan: FederatedPlan) -> list[list[np.ndarray]]:
    """Features of the first ``public_utterances`` of each of the first ``public_speakers`` public speakers."""
    corpus = _open(public)
    speakers = corpus.speakers()[: plan.public_speakers]
    if len(speakers) < plan.public_speakers:
        raise VerificationError(
            f"public corpus {public} has {len(speakers)} speakers; the plan's impostors are {plan.public_speakers}"
        )
    by_speaker = {
        s: sorted(u.id for u in utts)[: plan.public_utterances] for s, utts in corpus.by_speaker().items() if s in set(speakers)
    }
    features = _features(corpus, cmvn, [u for ids in by_speaker.values() for u in ids])
    return [[features[u] for u in by_speaker[s] if u in features] for s in speakers if any(u in features for u in by_speaker[s])]


@dataclass
class Federation:
    """A federated fine-tuning run: the final embedder, one record per round, and every (message as sent, reply
    as it left the device) for audits."""

    embedder: SpeakerEmbedder
    rounds: list[dict[str, Any]]
    exchanges: list[tuple[Any, Any]]


def federate(
    init: Path, devices: Sequence[Path], public: Sequence[Sequence[np.ndarray]], plan: FederatedPlan, *, arw: bool, seed: int = 0
) -> Federation:
    """Fine-tune the verifier ``init`` on ``devices`` (one speaker's folder each) for ``plan.rounds`` FedAvg
    rounds, with ``public`` speakers' features as the impostor pool; see the module docstring."""
    from flwr.app import ArrayRecord, ConfigRecord

    from client.verification import DATA_DIR_KEY, VERIFIER_KEY, sv_app
    from server.workflow import make_strategy, train_round
    from shared.config import StrategyConfig
    from simulations.harness import InProcessGrid, server_identity

    try:
        model = load_verifier(init).embedder
    except SpeakerEmbeddingError as err:
        raise VerificationError(str(err)) from err
    limits = StrategyConfig(min_train_nodes=len(devices), min_available_nodes=len(devices))
    strategy = make_strategy(limits)  # Flower's FedAvg, as the recognizer's default
    grid = InProcessGrid(sv_app, len(devices), {}, on_wire=True)
    for node, folder in zip(grid.get_node_ids(), devices, strict=True):
        grid.contexts[node].node_config.update({DATA_DIR_KEY: str(folder), VERIFIER_KEY: str(init)})
    adversary: Adversary | None = None
    extra: dict[str, torch.Tensor] = {}
    if arw:  # pseudo-labels of the starting model, fixed for the run (Jin et al.)
        centres, labels = public_clusters(impostor_centroids(model, public), plan.clusters, seed)
        adversary = Adversary(plan.clusters)
        extra = {"centres": centres, "clusters": torch.from_numpy(labels).float()}
    rounds: list[dict[str, Any]] = []
    with server_identity():
        for server_round in range(1, plan.rounds + 1):
            started = time.monotonic()
            arrays = ArrayRecord({**embedder_state(model), **(adversary_state(adversary) if adversary else {})})
            recipe = replace(plan.device, arw=arw, arw_frozen=server_round <= plan.arw_warmup, seed=seed)
            config: dict[str, Any] = recipe.to_config()
            impostors = ArrayRecord({"centroids": impostor_centroids(model, public), **extra})
            trained = train_round(
                grid,
                strategy,
                server_round,
                arrays,
                limits,
                config=ConfigRecord(config),
                content={IMPOSTORS: impostors},
                phase=f"verifier round {server_round}",
            )
            if trained.arrays is not None:
                state = trained.arrays.to_torch_state_dict()
                model.load_state_dict({k: v for k, v in state.items() if not k.startswith(ADVERSARY_PREFIX)}, strict=False)
                if adversary is not None:
                    adversary.load_state_dict(
                        {k.removeprefix(ADVERSARY_PREFIX): v for k, v in state.items() if k.startswith(ADVERSARY_PREFIX)}
                    )
            rounds.append({"round": server_round, **trained.fields(), "seconds": round(time.monotonic() - started, 1)})
    if adversary is not None:
        with torch.no_grad():
            rounds[-1]["cluster_weight"] = [round(float(w), 3) for w in arl_weights(adversary(torch.eye(plan.clusters)))]
    return Federation(embedder=model.eval(), rounds=rounds, exchanges=list(grid.exchanges))


# -- evaluation ----------------------------------------------------------------------------------------------


def _attributes(root: Path) -> dict[str, dict[str, str]]:
    """``speakers.tsv`` rows; where a corpus gives an age in years but no age group (speechocean762), under 18
    is a child and 18 or over an adult."""
    attributes = read_speakers_tsv(root)
    for row in attributes.values():
        if "age_group" not in row and row.get("age", "").isdigit():
            row["age_group"] = "child" if int(row["age"]) < 18 else "adult"
    return attributes


def _bootstrap_eer(trials: Trials, scores: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% interval of the EER, resampling enrolled speakers with replacement."""
    rng = np.random.default_rng(seed)
    speakers = sorted(trials.enrollments)
    rows = {s: np.flatnonzero(np.array(trials.speaker) == s) for s in speakers}
    values = []
    for _ in range(resamples):
        chosen = np.concatenate([rows[speakers[i]] for i in rng.integers(0, len(speakers), len(speakers))])
        values.append(equal_error_rate(scores[chosen], trials.same[chosen]))
    low, high = np.percentile(values, [2.5, 97.5])
    return round(float(low), 4), round(float(high), 4)


def _arm_figures(
    trials: Trials,
    scores: np.ndarray,
    verifier: Verifier,
    attributes: dict[str, dict[str, str]],
    by: Sequence[str],
    plan: VerifierPlan,
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "eer": round(equal_error_rate(scores, trials.same), 4),
        "eer_ci95": _bootstrap_eer(trials, scores, plan.bootstrap, plan.seed),
        "min_dcf": round(min_dcf(scores, trials.same, p_target=P_TARGET), 4),
        # mean cosine of target and of impostor trials: a model that merely pulls everything together raises both
        "mean_score": {
            "target": round(float(scores[trials.same].mean()), 4),
            "impostor": round(float(scores[~trials.same].mean()), 4),
        },
        "by": {},
        "gap": {},
        "spread": {},
    }
    if verifier.threshold is not None:
        accepted = scores >= verifier.threshold
        figures["threshold"] = {
            "value": round(verifier.threshold, 4),
            "target_far": verifier.target_far,
            "far": round(float(accepted[~trials.same].mean()), 4),
            "frr": round(float((~accepted[trials.same]).mean()), 4),
        }
    speaker = np.array(trials.speaker)
    for attribute in by:
        cohorts: dict[str, Any] = {}
        for value in sorted({attributes.get(s, {}).get(attribute, "") for s in trials.enrollments} - {""}):
            rows = np.array([attributes.get(s, {}).get(attribute) == value for s in speaker])
            members = [s for s in trials.enrollments if attributes.get(s, {}).get(attribute) == value]
            if len(members) < 2:
                continue  # one speaker's trials say nothing about a cohort
            cohort = Trials(
                enrollments={s: trials.enrollments[s] for s in members},
                speaker=tuple(speaker[rows]),
                utterance=tuple(np.array(trials.utterance)[rows]),
                same=trials.same[rows],
            )
            cohorts[value] = {
                "eer": round(equal_error_rate(scores[rows], trials.same[rows]), 4),
                "eer_ci95": _bootstrap_eer(cohort, scores[rows], plan.bootstrap, plan.seed),
                "speakers": len(members),
                "trials": int(rows.sum()),
            }
        if len(cohorts) < 2:
            continue
        figures["by"][attribute] = cohorts
        eers = np.array([c["eer"] for c in cohorts.values()])
        best = float(eers.min())
        figures["gap"][attribute] = round((float(eers.max()) - best) / best, 4) if best > 0 else None
        figures["spread"][attribute] = round(float(eers.std()), 4)
    return figures


def evaluate_verification(
    corpus_dir: Path,
    verifiers: dict[str, Path],
    plan: VerifierPlan,
    out_dir: Path,
    *,
    by: Sequence[str] = BY,
    public: Path | None = None,
    public_share: float = 0.0,
    center: bool = False,
    tune: bool = False,
) -> dict[str, Any]:
    """Score every arm's verifier on the same trials of ``corpus_dir``; write the report; return the result.

    With ``public`` (the public corpus whose speakers are the devices' impostors), the speakers are split first
    and the federated arms are trained from ``verifiers["baseline"]`` on the federated half; every arm is then
    scored on the test half's trials (see the module docstring). Without it, every speaker makes trials.
    ``public_share`` instead takes that share of the corpus' own speakers (stratified, seeded) as the public pool:
    public speech of the devices' domain, whose speakers are neither devices nor tested; the rest is split.
    ``center`` (needs a public pool) adds ``<arm>+center`` for every arm, each centered and
    recalibrated (``center_verifier``) on a cohort never in a trial: the in-domain public pool when there is one,
    else the federated half's speakers. ``tune`` (needs ``public_share``) adds ``tuned`` and ``tuned+arw``: the
    baseline fine-tuned centrally on the in-domain public pool with the pairwise loss, plainly and with pairwise
    ARW (``plan.tune``), from the same start on the same batches: Jin et al.'s comparison on the devices' domain."""
    if public is not None and public_share:
        raise VerificationError("give the impostors as a public corpus or as a share of this one, not both")
    if not 0.0 <= public_share < 1.0:
        raise VerificationError(f"public share must lie in [0, 1), got {public_share}")
    federating = public is not None or public_share > 0
    if center and not federating:
        raise VerificationError("centering takes its cohort from the split: it needs the federated arms' public pool")
    if tune and not public_share:
        raise VerificationError("tuning trains on the in-domain public pool: it needs a public share")
    corpus = _open(corpus_dir)
    loaded = {}
    for arm, path in verifiers.items():
        try:
            loaded[arm] = load_verifier(path)
        except SpeakerEmbeddingError as err:
            raise VerificationError(str(err)) from err
    cmvns = {arm: v.cmvn for arm, v in loaded.items()}
    cmvn = next(iter(cmvns.values()), None) or default_cmvn()
    if any(c is not None and (c.mean != cmvn.mean).any() for c in cmvns.values()):
        raise VerificationError(f"the verifiers {sorted(verifiers)} were trained with different CMVN statistics")
    by_speaker = {s: [u.id for u in utts] for s, utts in corpus.by_speaker().items()}
    features = _features(corpus, cmvn, [u.id for u in corpus.utterances])
    attributes = _attributes(corpus.root)
    federated: list[str] = []
    pool: list[str] = []  # public speakers of this corpus (public_share)
    tested = by_speaker
    if federating:
        if "baseline" not in verifiers:
            raise VerificationError("the federated arms fine-tune the baseline verifier: pass one")
        rest = sorted(by_speaker)
        if public_share:
            pool, rest = split_speakers(rest, attributes, share=public_share, seed=plan.seed + 1, by=by)
        federated, test = split_speakers(rest, attributes, share=plan.federated.share, seed=plan.seed, by=by)
        tested = {s: by_speaker[s] for s in test}
    trials = make_trials(_usable(tested, features), enroll=plan.enroll, seed=plan.seed)
    result: dict[str, Any] = {
        "corpus": str(corpus.root),
        "speakers": len(trials.enrollments),
        "trials": len(trials),
        "target_trials": int(trials.same.sum()),
        "skipped": len(corpus.skipped),
        "enroll_utterances": plan.enroll,
        "p_target": P_TARGET,
        "arms": {},
    }
    if federating:
        devices = _device_dirs(corpus, federated, out_dir / "devices")
        if public is not None:
            impostors = _public_features(public, cmvn, plan.federated)
        else:  # every in-domain public speaker, its first utterances (as many as the plan takes of a public corpus)
            firsts = {s: sorted(by_speaker[s])[: plan.federated.public_utterances] for s in pool}
            impostors = [[features[u] for u in ids if u in features] for ids in firsts.values()]
        result["split"] = {"seed": plan.seed, "public": pool, "federated": federated, "test": sorted(tested)}
        result["federation"] = {
            "public": str(public) if public is not None else f"{len(pool)} speakers of {corpus.root} (share {public_share})",
            "impostors": len(impostors),
            "devices": len(devices),
            "plan": asdict(plan.federated),
            "arms": {},
        }
        for arm in FEDERATED_ARMS:
            started = time.monotonic()
            run = federate(verifiers["baseline"], devices, impostors, plan.federated, arw=arm == "federated+arw", seed=plan.seed)
            path = save_speaker_embedder(
                out_dir / "models" / f"{arm}.pt", run.embedder, cmvn=cmvn, meta={"arm": arm, "rounds": run.rounds}
            )
            verifiers = {**verifiers, arm: path}
            loaded[arm] = Verifier(embedder=run.embedder, cmvn=cmvn)
            result["federation"]["arms"][arm] = {"seconds": round(time.monotonic() - started, 1), "rounds": run.rounds}
        if tune:
            result["tuning"] = {}
            pool_ids = [u for s in pool for u in sorted(by_speaker[s]) if u in features]
            speaker_of = {u: s for s in pool for u in by_speaker[s]}
            recipe = replace(plan.tune, speakers_per_batch=min(plan.tune.speakers_per_batch, len(pool)))
            for arm in TUNED_ARMS:
                started = time.monotonic()
                try:
                    model, history = train_pairwise(
                        loaded["baseline"].embedder,
                        [features[u] for u in pool_ids],
                        [speaker_of[u] for u in pool_ids],
                        replace(recipe, arw=arm == "tuned+arw"),
                    )
                except SpeakerEmbeddingError as err:
                    raise VerificationError(f"tuning on the public pool of {len(pool)} speakers: {err}") from err
                record = _pairwise_record(history, round(time.monotonic() - started, 1))
                path = save_speaker_embedder(
                    out_dir / "models" / f"{arm}.pt", model, cmvn=cmvn, meta={"arm": arm, "tuning": record}
                )
                verifiers, loaded[arm] = {**verifiers, arm: path}, Verifier(embedder=model, cmvn=cmvn)
                result["tuning"][arm] = {"speakers": len(pool), "utterances": len(pool_ids), "recipe": asdict(recipe), **record}
        if center:
            result["centering"] = {}
            cohort = {s: by_speaker[s] for s in (pool or federated)}
            for arm in [a for a in (*ARMS, *FEDERATED_ARMS, *TUNED_ARMS) if a in loaded]:
                adapted, record = center_verifier(loaded[arm], cohort, features, plan=plan)
                name = f"{arm}+center"
                path = save_verifier(out_dir / "models" / f"{name}.pt", adapted)
                verifiers, loaded[name] = {**verifiers, name: path}, adapted
                result["centering"][name] = {**record, "cohort": "public pool" if pool else "federated half"}
    scores = {}
    for arm, verifier in loaded.items():
        scores[arm] = score_trials(verifier, trials, features)
        result["arms"][arm] = {"model": str(verifiers[arm]), **_arm_figures(trials, scores[arm], verifier, attributes, by, plan)}
    if federating:  # the fit: trials of the speakers the devices trained on (their own utterances)
        seen = make_trials(_usable({s: by_speaker[s] for s in federated}, features), enroll=plan.enroll, seed=plan.seed)
        result["seen"] = {"speakers": len(seen.enrollments), "trials": len(seen)}
        for arm, verifier in loaded.items():
            result["arms"][arm]["seen_eer"] = round(equal_error_rate(score_trials(verifier, seen, features), seen.same), 4)
    base = result["arms"].get("baseline")
    if base is not None:
        result["vs_baseline"] = {
            arm: {
                "eer": round(f["eer"] / base["eer"] - 1, 4) if base["eer"] else None,
                "gap": {
                    a: round(f["gap"][a] / base["gap"][a] - 1, 4) if base["gap"].get(a) and f["gap"].get(a) is not None else None
                    for a in base["gap"]
                    if a in f["gap"]
                },
            }
            for arm, f in result["arms"].items()
            if arm != "baseline"
        }
        if "arw" in result["vs_baseline"]:
            result["arw_vs_baseline"] = result["vs_baseline"]["arw"]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "trials.tsv", trials.tsv())
    _plot_det(trials, scores, out_dir / "det.png")
    write_text_atomic(out_dir / "result.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out_dir / "report.md", _report(result))
    return result


def _plot_det(trials: Trials, scores: dict[str, np.ndarray], path: Path) -> None:
    """DET curves (scikit-learn's ``det_curve``) on normal-deviate axes, one per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm
    from sklearn.metrics import det_curve

    ticks = [0.001, 0.01, 0.05, 0.2, 0.5]
    fig, ax = plt.subplots(figsize=(5, 5))
    for arm, values in scores.items():
        far, frr, _ = det_curve(trials.same, values)
        ax.plot(norm.ppf(np.clip(far, 1e-4, 1 - 1e-4)), norm.ppf(np.clip(frr, 1e-4, 1 - 1e-4)), label=arm)
    ax.set_xticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_yticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_xlabel("false acceptance rate (%)")
    ax.set_ylabel("false rejection rate (%)")
    ax.set_title(f"DET: {int(trials.same.sum())} target, {int((~trials.same).sum())} impostor trials")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(result: dict[str, Any]) -> str:
    split = result.get("split")
    who = (
        f"{result['speakers']} test speakers (the half of the corpus no arm trained on)"
        if split
        else f"{result['speakers']} unseen speakers"
    )
    lines = [
        f"# Speaker verification on {result['corpus']}",
        "",
        f"{who}, each enrolled with {result['enroll_utterances']} utterances; "
        f"{result['trials']} trials ({result['target_trials']} target, the rest impostor; list in trials.tsv); "
        f"{result['skipped']} files skipped. minDCF at p_target {result['p_target']}. DET curves: det.png.",
        "",
        "| arm | EER | 95% CI | minDCF | FAR / FRR at threshold | mean cosine target / impostor |"
        + (" EER on the federated speakers |" if split else ""),
        "|---|---|---|---|---|---|" + ("---|" if split else ""),
    ]
    for arm, f in result["arms"].items():
        at = f.get("threshold")
        rates = f"{at['far']:.4f} / {at['frr']:.4f} (t = {at['value']}, target FAR {at['target_far']})" if at else "-"
        lines.append(
            f"| {arm} | {f['eer']:.4f} | {f['eer_ci95'][0]:.4f}-{f['eer_ci95'][1]:.4f} | {f['min_dcf']:.4f} "
            f"| {rates} | {f['mean_score']['target']:.3f} / {f['mean_score']['impostor']:.3f} |"
            + (f" {f['seen_eer']:.4f} |" if split else "")
        )
    for attribute in next(iter(result["arms"].values()))["by"]:
        lines += [
            "",
            f"## EER by {attribute}",
            "",
            "| arm | " + " | ".join(next(iter(result["arms"].values()))["by"][attribute]) + " | gap | spread |",
            "|---" * (len(next(iter(result["arms"].values()))["by"][attribute]) + 3) + "|",
        ]
        for arm, f in result["arms"].items():
            cohorts = f["by"].get(attribute, {})
            cells = [
                f"{c['eer']:.4f} [{c['eer_ci95'][0]:.4f}-{c['eer_ci95'][1]:.4f}] ({c['speakers']} spk, {c['trials']} trials)"
                for c in cohorts.values()
            ]
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {f['gap'].get(attribute)} | {f['spread'].get(attribute)} |")
    if "vs_baseline" in result:
        lines += ["", "Relative to the baseline (EER, cohort gaps): " + json.dumps(result["vs_baseline"])]
    if split:
        federation = result["federation"]
        lines += [
            "",
            "## Federated fine-tuning",
            "",
            f"{federation['devices']} devices (one federated speaker each), FedAvg from the baseline verifier, "
            f"{federation['impostors']} public impostor speakers from {federation['public']}; plan: "
            f"{json.dumps(federation['plan'])}. The federated speakers' EER ({result['seen']['trials']} trials "
            f"of their own, trained-on utterances) shows the fit, not generalization.",
            "",
            "| arm | round | replies | failed | rejected | mean device loss | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm, record in federation["arms"].items():
            for r in record["rounds"]:
                lines.append(
                    f"| {arm} | {r['round']} | {r['replies']} | {r['failed']} | {r['rejected']} | "
                    f"{r['train_loss']} | {r['seconds']} |"
                )
        if result.get("tuning"):
            lines += [
                "",
                "## Central fine-tuning on the in-domain public pool (`tuned`, `tuned+arw`)",
                "",
                "The baseline fine-tuned with the pairwise loss on the public pool's speakers (neither devices nor "
                "tested), plainly and with pairwise ARW, same start and batches: " + json.dumps(result["tuning"]),
            ]
        if result.get("centering"):
            lines += [
                "",
                "## Centering (`<arm>+center`)",
                "",
                "Each verifier centered on the mean embedding of a cohort's utterances (the in-domain public pool, or "
                "else the federated half standing in for one; never in a trial) and its threshold recalibrated on the "
                "cohort's trials: " + json.dumps(result["centering"]),
            ]
        lines += [
            "",
            f"Split (seed {split['seed']}, stratified by speakers.tsv attributes): "
            + (f"public {', '.join(split['public'])}; " if split["public"] else "")
            + f"federated {', '.join(split['federated'])}; test {', '.join(split['test'])}.",
        ]
    return "\n".join(lines) + "\n"
