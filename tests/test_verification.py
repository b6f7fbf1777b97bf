"""Speaker verification: detection metrics, pairwise ARW, trials, the shipped verifier on unseen synthetic speakers,
enrollment and verification on the device, federated fine-tuning on one-speaker devices (what leaves them, and
what it does), and `chorus eval verification --quick`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from client.verification import Enrollment, VerificationError, enroll, verify
from shared.data.corpora import load_corpus
from shared.data.synth import synthesize
from shared.federated_verification import DeviceRecipe, device_pair_loss
from shared.fairness.pairwise_arw import (
    PairwiseRecipe,
    cluster_ids,
    pair_losses,
    pair_weights,
    same_speaker,
    train_pairwise,
    weighted_pair_loss,
)
from shared.metrics import equal_error_rate, min_dcf, threshold_at_far
from shared.models.checkpoint import shipped_manifest
from shared.models.speaker_embedding import SpeakerEmbedder, SpeakerEmbeddingConfig, SpeakerEmbeddingError
from shared.models.speaker_embedding import load_verifier, shipped_verifier, train_speaker_embedding
from shared.privacy.audit import audit_reply
from simulations.cli import app
from simulations.eval_verification import (
    FULL,
    Federation,
    FederatedPlan,
    _device_dirs,
    _features,
    _public_features,
    evaluate_verification,
    federate,
    make_trials,
    score_trials,
    split_speakers,
)
from tests.conftest import needs_espeak

FEATURES = 16
TINY = SpeakerEmbeddingConfig(input_dim=FEATURES, channels=32, pooled_channels=64, attention_dim=16, embedding_dim=32)


def test_min_dcf_and_threshold_on_hand_cases() -> None:
    scores = [0.9, 0.8, 0.7, 0.4, 0.5, 0.3, 0.2, 0.1]
    same = [True] * 4 + [False] * 4
    # Accepting >= 0.7: FRR 1/4, FAR 0; cost 0.01 * 0.25 / 0.01 = 0.25, the cheapest threshold.
    assert min_dcf(scores, same, p_target=0.01) == pytest.approx(0.25)
    assert min_dcf([0.9, 0.1], [True, False]) == 0.0
    assert threshold_at_far(scores, same, 0.0) == 0.7
    assert threshold_at_far(scores, same, 0.25) == 0.4
    # The impostor scores highest: only rejecting everything keeps FAR at 0.
    strict = threshold_at_far([0.1, 0.9], [True, False], 0.0)
    assert strict > 0.9
    with pytest.raises(ValueError, match="needs both trial kinds"):
        min_dcf([0.1, 0.2], [False, False])


def test_pair_loss_with_uniform_weights_is_balanced_binary_cross_entropy() -> None:
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(6, 4), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    same = same_speaker(labels)
    losses = pair_losses(emb, same, scale=torch.tensor(10.0), bias=torch.tensor(-5.0))
    positives, negatives = [], []
    for i in range(6):
        for j in range(6):
            if i != j:
                logit = 10.0 * float(emb[i] @ emb[j]) - 5.0
                target = float(labels[i] == labels[j])
                bce = -(target * np.log(1 / (1 + np.exp(-logit))) + (1 - target) * np.log(1 - 1 / (1 + np.exp(-logit))))
                (positives if target else negatives).append(bce)
    expected = 4 * (np.mean(positives) + np.mean(negatives))  # every sample weight 2: every pair weight 4
    weights = pair_weights(torch.full((6,), 2.0))
    assert float(weighted_pair_loss(losses, same, weights)) == pytest.approx(expected, rel=1e-5)
    assert pair_weights(torch.tensor([1.0, 3.0])).tolist() == [[2.0, 4.0], [4.0, 6.0]]


def _grouped_speakers(seed: int, speakers: int = 12, utterances: int = 8) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Two groups of speakers: an easy one (large speaker offsets) and a hard one (small offsets), told apart by
    a group offset in the upper bins (an "accent"), so that k-means finds the groups without being told them."""
    rng = np.random.default_rng(seed)
    feats, labels, groups = [], [], []
    for speaker in range(speakers):
        group = speaker % 2
        offset = rng.normal(size=FEATURES // 2) * (3.0 if group == 0 else 0.6)
        for _ in range(utterances):
            x = rng.normal(size=(int(rng.integers(60, 120)), FEATURES))
            x[:, : FEATURES // 2] += offset
            x[:, FEATURES // 2 :] += 4.0 * group
            feats.append(x.astype(np.float32))
            labels.append(f"s{seed}-{speaker}")
            groups.append(group)
    return feats, labels, groups


def _eer(model: SpeakerEmbedder, feats: list[np.ndarray], labels: list[str]) -> float:
    embeddings = torch.stack([model.embed(f) for f in feats]).numpy()
    rows, cols = np.triu_indices(len(labels), k=1)
    same = np.array([labels[i] == labels[j] for i, j in zip(rows, cols)])
    return equal_error_rate((embeddings @ embeddings.T)[rows, cols], same)


@pytest.fixture(scope="module")
def pretrained() -> SpeakerEmbedder:
    feats, labels, _ = _grouped_speakers(seed=1)
    return train_speaker_embedding(feats, labels, config=TINY, steps=40, batch_size=24, crop_frames=50, seed=0)


def test_pairwise_training_separates_unseen_speakers(pretrained: SpeakerEmbedder) -> None:
    feats, labels, _ = _grouped_speakers(seed=1)
    unseen, unseen_labels, _ = _grouped_speakers(seed=2)
    recipe = PairwiseRecipe(
        steps=60, speakers_per_batch=6, utterances_per_speaker=3, crop_frames=50, lr=2e-3, clusters=2, warmup=10
    )
    before = _eer(pretrained, unseen, unseen_labels)
    model, history = train_pairwise(pretrained, feats, labels, recipe)
    assert _eer(model, unseen, unseen_labels) < before
    assert np.mean(history["loss"][-10:]) < np.mean(history["loss"][:10])
    # The starting model is left as it was (a copy is trained).
    assert _eer(pretrained, unseen, unseen_labels) == before


def test_arw_upweights_the_cluster_served_worst(pretrained: SpeakerEmbedder) -> None:
    feats, labels, groups = _grouped_speakers(seed=1)
    recipe = PairwiseRecipe(
        steps=80,
        speakers_per_batch=6,
        utterances_per_speaker=3,
        crop_frames=50,
        lr=2e-3,
        clusters=2,
        warmup=10,
        arw=True,
        adversary_lr=5e-2,
    )
    clusters = cluster_ids(pretrained, feats, clusters=2, seed=recipe.seed)
    hard_cluster = int(np.bincount(clusters[np.array(groups) == 1], minlength=2).argmax())
    assert (clusters[np.array(groups) == 1] == hard_cluster).mean() > 0.9  # k-means found the groups
    _, history = train_pairwise(pretrained, feats, labels, recipe)
    weights = history["cluster_weight"]
    assert weights[hard_cluster] > weights[1 - hard_cluster] + 0.1


def test_trials_are_balanced_and_never_test_an_enrollment_utterance() -> None:
    by_speaker = {f"spk{s}": [f"spk{s}-{u}" for u in range(3 + s)] for s in range(5)}
    trials = make_trials(by_speaker, enroll=2, seed=0)
    speaker = np.array(trials.speaker)
    for name, enrolled in trials.enrollments.items():
        rows = speaker == name
        assert trials.same[rows].sum() == (~trials.same[rows]).sum() == len(by_speaker[name]) - 2
        tested = [u for u, r in zip(trials.utterance, rows) if r]
        assert not set(enrolled) & set(tested)
        assert all(u.startswith(name + "-") == s for u, s in zip(tested, trials.same[rows]))
    with pytest.raises(ValueError, match="more than 3 utterances"):
        make_trials({"a": ["a1", "a2"], "b": ["b1"]}, enroll=3, seed=0)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic speakers of a population seed no verifier trained on (only tests marked needs_espeak use it)."""
    return synthesize(tmp_path_factory.mktemp("sv") / "corpus", speakers=16, utterances=6, seed=321, workers=2, progress=False)


@needs_espeak
def test_shipped_verifier_separates_unseen_synthetic_speakers(unseen: Path, tmp_path: Path) -> None:
    manifest = shipped_manifest()[shipped_verifier().name]
    result = evaluate_verification(unseen, {"baseline": shipped_verifier()}, FULL, tmp_path, by=("gender",))
    figures = result["arms"]["baseline"]
    assert result["speakers"] == 16 and result["target_trials"] == 16 * 3
    # 96 trials estimate the EER coarsely: within 0.05 of the manifest's figure on 120 speakers.
    assert figures["eer"] <= manifest["eval"]["eer"] + 0.05
    assert {"report.md", "trials.tsv", "det.png", "result.json"} <= {p.name for p in tmp_path.iterdir()}


@needs_espeak
def test_device_enrolls_and_verifies_its_user(unseen: Path, tmp_path: Path) -> None:
    lines = [json.loads(line) for line in (unseen / "manifest.jsonl").read_text().splitlines()]
    user = [line for line in lines if line["speaker"] == lines[0]["speaker"]]
    device = tmp_path / "device"
    device.mkdir()
    (device / "manifest.jsonl").write_text(
        "".join(json.dumps({**line, "audio": str(unseen / line["audio"])}) + "\n" for line in user[:3])
    )
    runner = CliRunner()
    done = runner.invoke(app, ["device", "enroll", "--data", str(device)])
    assert done.exit_code == 0, done.output
    enrollment = Enrollment.load(device / "enrollment.json")
    assert enrollment.utterances == 3
    own = [verify(unseen / line["audio"], enrollment, verifier_path=shipped_verifier()) for line in user[3:]]
    others = [
        verify(unseen / line["audio"], enrollment, verifier_path=shipped_verifier())
        for line in lines
        if line["speaker"] != user[0]["speaker"]
    ]
    assert min(d.score for d in own) > np.median([d.score for d in others])
    assert np.mean([d.accepted for d in others]) <= 0.1
    said = runner.invoke(
        app, ["device", "verify", str(unseen / user[4]["audio"]), "--enrollment", str(device / "enrollment.json")]
    )
    assert said.exit_code == 0 and said.output.startswith(("accept: score", "reject: score"))
    # Bad input: one line naming the culprit, exit 2.
    missing = runner.invoke(
        app, ["device", "verify", str(tmp_path / "nope.wav"), "--enrollment", str(device / "enrollment.json")]
    )
    assert missing.exit_code == 2 and "nope.wav" in missing.output and len(missing.output.strip().splitlines()) == 1
    with pytest.raises(VerificationError, match="holds 16 speakers"):
        enroll(unseen, verifier_path=shipped_verifier())


@needs_espeak
def test_scores_are_cosines_with_the_enrolled_mean(unseen: Path) -> None:
    verifier = load_verifier(shipped_verifier())
    corpus = load_corpus(unseen)
    assert verifier.cmvn is not None
    features = _features(corpus, verifier.cmvn, [u.id for u in corpus.utterances])
    by_speaker = {s: [u.id for u in utts] for s, utts in corpus.by_speaker().items()}
    trials = make_trials(by_speaker, enroll=3, seed=0)
    scores = score_trials(verifier, trials, features)
    i = 7
    enrolled = np.mean([verifier.embedder.embed(features[u]).numpy() for u in trials.enrollments[trials.speaker[i]]], axis=0)
    test = verifier.embedder.embed(features[trials.utterance[i]]).numpy()
    assert scores[i] == pytest.approx(float(enrolled @ test / np.linalg.norm(enrolled)), abs=1e-5)


def _speakers_of(corpus_dir: Path, speakers: list[str], dest: Path) -> Path:
    """A corpus folder (manifest of absolute paths) holding only ``speakers``' utterances of ``corpus_dir``."""
    dest.mkdir()
    lines = [json.loads(line) for line in (corpus_dir / "manifest.jsonl").read_text().splitlines()]
    chosen = [{**line, "audio": str(corpus_dir / line["audio"])} for line in lines if line["speaker"] in speakers]
    (dest / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in chosen))
    return dest


@needs_espeak
def test_a_centered_verifier_subtracts_its_cohort_mean_and_is_recalibrated_on_the_cohort(unseen: Path, tmp_path: Path) -> None:
    corpus = load_corpus(unseen)
    speakers = corpus.speakers()
    cohort_dir = _speakers_of(unseen, speakers[:8], tmp_path / "cohort")  # the public cohort; the rest only tested
    out = tmp_path / "centered.pt"
    done = CliRunner().invoke(app, ["model", "center-verifier", "--corpus", str(cohort_dir), "--out", str(out)])
    assert done.exit_code == 0, done.output
    record = json.loads(done.output.strip().splitlines()[-1])
    assert record["cohort_speakers"] == 8 and record["cohort_utterances"] == 48

    plain, centered = load_verifier(shipped_verifier()), load_verifier(out)
    assert plain.cmvn is not None and centered.center is not None and plain.center is None
    features = _features(corpus, plain.cmvn, [u.id for u in corpus.utterances])
    cohort_ids = [u.id for u in corpus.utterances if u.speaker in speakers[:8]]
    mean = np.mean([plain.embedder.embed(features[u]).numpy() for u in cohort_ids], axis=0)
    assert np.allclose(centered.center, mean, atol=1e-5)
    # The device scores centered: cosine of the re-normalized differences from the cohort mean.
    u, v = cohort_ids[0], [i for i in features if i not in cohort_ids][0]
    a, b = (plain.embedder.embed(features[x]).numpy() - centered.center for x in (u, v))
    expected = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert float(centered.embed(features[u]) @ centered.embed(features[v])) == pytest.approx(expected, abs=1e-5)
    # Its threshold is the cohort's own: at most the target false-acceptance rate on the cohort's trials.
    by_speaker = {s: [u.id for u in utts] for s, utts in corpus.by_speaker().items() if s in speakers[:8]}
    trials = make_trials(by_speaker, enroll=FULL.enroll, seed=FULL.seed)
    scores = score_trials(centered, trials, features)
    assert centered.threshold == pytest.approx(record["threshold"], abs=1e-4) and centered.target_far == plain.target_far
    assert np.mean(scores[~trials.same] >= centered.threshold) <= centered.target_far
    # A device enrolls and verifies with it centered too.
    user = corpus.by_speaker()[speakers[8]]
    enrollment = enroll(_speakers_of(unseen, speakers[8:9], tmp_path / "user"), verifier_path=out, max_utterances=3)
    own = centered.embed_speaker([features[x.id] for x in user[:3]])
    assert np.allclose(enrollment.embedding, own.numpy(), atol=1e-5)
    decision = verify(user[4].audio, enrollment, verifier_path=out)
    assert decision.score == pytest.approx(float(own @ centered.embed(features[user[4].id])), abs=1e-4)
    assert decision.threshold == centered.threshold
    # A cohort of one speaker cannot be centered on: one line naming the problem.
    one = _speakers_of(unseen, speakers[:1], tmp_path / "one")
    refused = CliRunner().invoke(app, ["model", "center-verifier", "--corpus", str(one), "--out", str(tmp_path / "x.pt")])
    assert refused.exit_code == 2 and "got 1" in refused.output and len(refused.output.strip().splitlines()) == 1


def test_device_recipe_travels_as_config_keys_and_unknown_keys_are_refused() -> None:
    recipe = DeviceRecipe(local_steps=3, lr=5e-4, arw=True)
    config = {**recipe.to_config(), "server-round": 2}
    assert config["sv.local-steps"] == 3 and config["sv.arw"] is True
    assert DeviceRecipe.from_config(config) == recipe
    with pytest.raises(SpeakerEmbeddingError, match="sv.local-step"):
        DeviceRecipe.from_config({"sv.local-step": 3})
    with pytest.raises(SpeakerEmbeddingError, match="not of type int"):
        DeviceRecipe.from_config({"sv.local-steps": "3"})


def test_device_loss_averages_target_and_impostor_pairs_separately() -> None:
    own = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]]), dim=-1)
    impostors = F.normalize(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), dim=-1)

    def bce(cos: float, target: bool) -> float:
        p = 1 / (1 + np.exp(-(10.0 * cos - 5.0)))
        return float(-np.log(p if target else 1 - p))

    cos = (own @ own.T).numpy()
    targets = [bce(cos[i, j], True) for i in range(3) for j in range(3) if i != j]
    against = (own @ impostors.T).numpy()
    impostor = [bce(c, False) for c in against.ravel()]
    expected = np.mean(targets) + np.mean(impostor)
    assert float(device_pair_loss(own, impostors, sample_weights=None)) == pytest.approx(expected, rel=1e-5)
    # ARL weights of 2 everywhere make every pair weigh 4: four times the plain loss.
    uniform = torch.full((5,), 2.0)
    assert float(device_pair_loss(own, impostors, sample_weights=uniform)) == pytest.approx(4 * expected, rel=1e-5)


def test_under_sgd_a_device_the_adversary_upweights_moves_further_and_under_adam_it_does_not() -> None:
    """A device's ARL weight (its own cluster scored high or low against the impostors' clusters) scales its
    whole loss; plain SGD (``sv.optimizer=sgd``) turns that into a longer step, Adam normalizes it away. A uniform
    adversary leaves the step as long as without ARW: ARW moves the loss, it does not rescale it."""
    from shared.fairness.arw import Adversary
    from shared.federated_verification import fine_tune_speaker

    rng = np.random.default_rng(0)
    config = SpeakerEmbeddingConfig(input_dim=16, channels=16, pooled_channels=32, attention_dim=8, embedding_dim=8)
    torch.manual_seed(0)
    init = SpeakerEmbedder(config).eval()
    features = [rng.normal(size=(60, 16)).astype(np.float32) for _ in range(6)]
    impostors = F.normalize(torch.randn(20, 8), dim=-1)

    def step_length(optimizer: str, own_logit: float | None) -> float:
        adversary = Adversary(2)
        with torch.no_grad():  # cluster 0 (the device's) scored own_logit, cluster 1 (the impostors') 0
            adversary.net.weight.copy_(torch.tensor([[own_logit or 0.0, 0.0]]))
        arw = own_logit is not None  # None: no ARW
        recipe = DeviceRecipe(
            local_steps=1, utterances_per_step=4, crop_frames=40, lr=1e-3, optimizer=optimizer, arw=arw, arw_frozen=arw
        )
        update = fine_tune_speaker(
            init,
            features,
            impostors,
            recipe,
            seed=0,
            adversary=adversary if arw else None,
            own_clusters=np.zeros(6, dtype=np.int64) if arw else None,
            impostor_clusters=np.ones(20, dtype=np.int64) if arw else None,
        )
        return float(sum(((a - b) ** 2).sum() for a, b in zip(update.embedder.parameters(), init.parameters())) ** 0.5)

    assert step_length("sgd", 4.0) > 1.3 * step_length("sgd", -4.0)
    assert step_length("sgd", 0.0) == pytest.approx(step_length("sgd", None), rel=1e-4)
    assert step_length("adam", 4.0) == pytest.approx(step_length("adam", -4.0), rel=0.05)
    with pytest.raises(SpeakerEmbeddingError, match="sv.optimizer"):
        DeviceRecipe(optimizer="rmsprop")


def test_split_is_stratified_seeded_and_disjoint() -> None:
    speakers = [f"s{i:02d}" for i in range(20)]
    attributes = {
        s: {"age_group": "child" if i < 8 else "adult", "gender": "f" if i % 2 else "m"} for i, s in enumerate(speakers)
    }
    federated, test = split_speakers(speakers, attributes, share=0.5, seed=3)
    assert sorted(federated + test) == speakers and len(federated) == 10
    children = [s for s in federated if attributes[s]["age_group"] == "child"]
    assert len(children) == 4  # half of each stratum
    assert split_speakers(speakers, attributes, share=0.5, seed=3) == (federated, test)
    assert split_speakers(speakers, attributes, share=0.5, seed=4) != (federated, test)


def _embeddings(model: SpeakerEmbedder, features: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    return torch.stack([model.embed(features[u]) for u in ids]).numpy()


@pytest.fixture(scope="module")
def federation(unseen: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Federation, Federation, Path]:
    """The shipped verifier fine-tuned on 6 one-speaker devices of the unseen corpus, with the first 8 speakers of
    that corpus as the public impostors: plainly and with ARW, 3 rounds each, through the real ClientApp."""
    corpus = load_corpus(unseen)
    devices = _device_dirs(corpus, corpus.speakers()[8:14], tmp_path_factory.mktemp("devices"))
    verifier = load_verifier(shipped_verifier())
    assert verifier.cmvn is not None
    plan = FederatedPlan(
        rounds=3,
        public_speakers=8,
        public_utterances=3,
        clusters=3,
        device=DeviceRecipe(local_steps=4, utterances_per_step=4, crop_frames=100, lr=1e-3),
    )
    public = _public_features(unseen, verifier.cmvn, plan)
    return (
        federate(shipped_verifier(), devices, public, plan, arw=False),
        federate(shipped_verifier(), devices, public, plan, arw=True),
        unseen,
    )


@needs_espeak
def test_federated_replies_carry_only_allowlisted_content(federation: tuple[Federation, Federation, Path]) -> None:
    plain, arw, _ = federation
    for run in (plain, arw):
        assert len(run.exchanges) == 3 * 6 and all(r["replies"] == 6 and r["rejected"] == 0 for r in run.rounds)
        for sent, reply in run.exchanges:
            assert not reply.has_error()
            audit_reply(reply.content, sent.content)  # raises PrivacyViolation on anything off the allowlist
            assert set(reply.content) == {"arrays", "metrics"}  # no impostors, embeddings, clusters sent back
            assert set(reply.content["metrics"]) == {"num-examples", "train-loss", "local-steps"}
            assert set(reply.content["arrays"]) == set(sent.content["arrays"])
    assert any(k.startswith("arw.") for k in arw.exchanges[0][1].content["arrays"])


@needs_espeak
def test_device_handler_errors_leave_without_their_text(unseen: Path) -> None:
    """The audit mod wraps the verifier's ClientApp: a device without data answers with the exception type only."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from client.verification import sv_app
    from shared.federated_verification import embedder_state
    from simulations.harness import server_identity

    content = RecordDict(
        {
            "arrays": ArrayRecord(embedder_state(load_verifier(shipped_verifier()).embedder)),
            "config": ConfigRecord({**DeviceRecipe().to_config(), "server-round": 1}),
        }
    )
    with server_identity():
        msg = Message(content, 1, "train")
    reply = sv_app(
        msg,
        Context(run_id=1, node_id=1, node_config={"data-dir": str(unseen / "no-such-folder")}, state=RecordDict(), run_config={}),
    )
    assert reply.has_error() and "no-such-folder" not in reply.error.reason
    assert "raised VerificationError" in reply.error.reason


@needs_espeak
def test_federated_fine_tuning_learns_the_device_speakers_without_collapsing_them(
    federation: tuple[Federation, Federation, Path],
) -> None:
    """What the devices teach the global model, measured on the 6 device speakers' utterances: their same-speaker
    cosine rises (each device's positives survive FedAvg), the devices' loss falls from round 1 to round 3 (the
    aggregate improves every device's own objective), and different device speakers stay far apart (positives
    only could collapse every speaker onto one point; the public impostors are there to prevent it). It does not
    claim that the speakers separate better: the margin (same minus different) is not asserted, see the README."""
    plain, arw, unseen = federation
    corpus = load_corpus(unseen)
    verifier = load_verifier(shipped_verifier())
    assert verifier.cmvn is not None
    speakers = corpus.speakers()[8:14]
    ids = [u.id for u in corpus.utterances if u.speaker in speakers]
    labels = np.array([u.speaker for u in corpus.utterances if u.speaker in speakers])
    features = _features(corpus, verifier.cmvn, ids)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(ids), dtype=bool)

    def cosines(model: SpeakerEmbedder) -> tuple[float, float]:
        e = _embeddings(model, features, ids)
        cos = e @ e.T
        return float(cos[same & off].mean()), float(cos[~same].mean())

    target_before, _ = cosines(verifier.embedder)
    for run in (plain, arw):
        target, impostor = cosines(run.embedder)
        print(
            f"same-speaker cosine {target_before:.3f} -> {target:.3f}, different {impostor:.3f}, "
            f"round losses {[r['train_loss'] for r in run.rounds]}"
        )
        assert target > target_before + 0.01
        assert impostor < 0.3  # far from a collapse (cosine 1)
        assert run.rounds[-1]["train_loss"] < run.rounds[0]["train_loss"]


@pytest.mark.slow
@needs_espeak
def test_eval_verification_quick(tmp_path: Path) -> None:
    args = [
        "eval",
        "verification",
        "--quick",
        "--public-share",
        "0.25",
        "--center",
        "--tune",
        "--json",
        "--workdir",
        str(tmp_path),
    ]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    result = json.loads(done.output.strip().splitlines()[-1])
    plain = {"baseline", "arw", "federated", "federated+arw", "tuned", "tuned+arw"}
    assert set(result["arms"]) == plain | {f"{arm}+center" for arm in plain}
    # 16 speakers: 4 the in-domain public pool (impostors, centering cohort), then 6 federated (one device each)
    # and 6 tested; every arm scored on the same test trials.
    split = result["split"]
    assert (len(split["public"]), len(split["federated"]), len(split["test"])) == (4, 6, 6)
    assert len(set(split["public"]) | set(split["federated"]) | set(split["test"])) == 16
    assert result["speakers"] == 6 and result["trials"] == 2 * result["target_trials"]
    assert result["federation"]["impostors"] == 4
    # Centered on the public pool, recalibrated on its trials.
    assert {(r["cohort"], r["cohort_speakers"]) for r in result["centering"].values()} == {("public pool", 4)}
    assert all(result["arms"][arm]["threshold"]["value"] == result["centering"][arm]["threshold"] for arm in result["centering"])
    for figures in result["arms"].values():
        assert figures["eer"] < 0.5  # better than chance, even tiny
        assert "gender" in figures["by"] and "seen_eer" in figures
    for arm in ("federated", "federated+arw"):
        rounds = result["federation"]["arms"][arm]["rounds"]
        assert all(r["replies"] == 6 and r["rejected"] == r["failed"] == 0 for r in rounds)
    # Tuned centrally on the 4 public speakers' utterances, plainly and with ARW (whose adversary reports weights).
    tuning = result["tuning"]
    assert {r["speakers"] for r in tuning.values()} == {4} and tuning["tuned"]["recipe"]["speakers_per_batch"] == 4
    assert "cluster_weight" in tuning["tuned+arw"] and "cluster_weight" not in tuning["tuned"]
    assert (tmp_path / "runs" / "eval-verification-quick" / "det.png").is_file()


def test_tuning_without_an_in_domain_public_pool_is_refused(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["eval", "verification", "--corpus", str(tmp_path), "--tune", "--workdir", str(tmp_path)])
    assert done.exit_code == 2 and "public share" in done.output and len(done.output.strip().splitlines()) == 1


def test_a_public_corpus_and_a_public_share_are_refused_together(tmp_path: Path) -> None:
    args = ["eval", "verification", "--corpus", str(tmp_path), "--public", str(tmp_path), "--public-share", "0.25"]
    done = CliRunner().invoke(app, [*args, "--workdir", str(tmp_path)])
    assert done.exit_code == 2 and "not both" in done.output and len(done.output.strip().splitlines()) == 1
