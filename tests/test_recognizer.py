"""The recognizer recognizes: training and greedy streaming decoding agree, and the shipped base model decodes unseen
synthetic speakers at the WER its manifest states."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.config import ModelConfig
from shared.data.commands import sample_sentences
from shared.data.corpora import load_corpus
from shared.data.dataset import FeatureCache, concatenate_neighbours, make_batches
from shared.data.features import GlobalCMVN
from shared.data.synth import synthesize
from shared.data.tokenizer import Tokenizer
from shared.metrics import error_counts
from shared.models.checkpoint import (
    SHIPPED_DIR,
    build_model,
    init_checkpoint_path,
    initial_model,
    load_checkpoint,
    sha256_of,
    shipped_manifest,
)
from shared.training import MAX_PAUSE_FRAMES, train_steps, transcribe
from simulations.eval_wer import default_checkpoint, evaluate_wer
from tests.conftest import needs_espeak

pytestmark = needs_espeak


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 utterances of 8 speakers no model was trained on (seed 123 is used nowhere else)."""
    return synthesize(tmp_path_factory.mktemp("unseen") / "corpus", speakers=8, utterances=5, seed=123, workers=2, progress=False)


def test_greedy_streaming_decodes_what_training_fitted(unseen: Path, tmp_path: Path) -> None:
    """Trained until its loss is small on 8 utterances, the tiny model's greedy *streaming* search returns them.

    Without the auxiliary CTC loss and FastEmit the full-sum transducer loss reaches 0.007 nats/token here while
    greedy search still misses most words (emissions spread over many frames; README, "The recipe").
    """
    corpus = load_corpus(unseen)
    utterances = sorted(corpus.utterances, key=lambda u: u.id)[::5][:8]
    tokenizer = Tokenizer.train(
        [u.text for u in corpus.utterances] + sample_sentences(2000, seed=1), tmp_path / "tok.model", vocab_size=128
    )
    cmvn = GlobalCMVN.fit(f for f in (FeatureCache(corpus, None).features(u) for u in corpus.utterances) if f is not None)
    features = FeatureCache(corpus, cmvn)
    batches = make_batches(utterances, features=features, tokenizer=tokenizer, max_frames=100_000, shuffle=False, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=64, num_layers=2, num_heads=2, ffn_dim=256, vocab_size=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for lr, steps in ((1e-3, 30), (3e-3, 190), (1e-3, 20)):  # warm-up, peak, anneal
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = train_steps(
            model, batches, steps=steps, optimizer=optimizer, spec_augment_seed=None, ctc_weight=0.3, fastemit_lambda=0.01
        )
    assert stats.loss < 0.05, "the model did not fit its 8 utterances"

    model.eval()
    references, hypotheses = [], []
    for utt in utterances:
        feats = torch.from_numpy(features.features(utt))[None]
        state = model.init_stream(batch_size=1)
        for chunk in feats.split(16, dim=1):  # 160 ms chunks, as a device streams them
            state = model.stream(chunk, state)
        references.append(utt.text)
        hypotheses.append(tokenizer.decode(state.hypotheses[0]))
    wer = error_counts(references, hypotheses).wer
    assert wer <= 0.05, list(zip(references, hypotheses))


@functools.cache
def wer_alone(checkpoint: Path, corpus: Path) -> dict[str, Any]:
    """``evaluate_wer`` of a checkpoint on a corpus (by accent), once per module: several tests compare against it."""
    return evaluate_wer(checkpoint, corpus, by=("accent",))


ASR_FILES = sorted(name for name, entry in shipped_manifest().items() if "model_config" in entry)


@pytest.mark.parametrize("name", ASR_FILES)
def test_shipped_recognizer_decodes_unseen_speakers_as_its_manifest_says(name: str, unseen: Path) -> None:
    """Every shipped recognizer is the file its manifest measured, and it decodes 40 utterances of speakers none
    of them saw within 0.03 of the manifest's WER."""
    entry, path = shipped_manifest()[name], SHIPPED_DIR / name
    assert sha256_of(path) == entry["sha256"], "the shipped file is not the one the manifest measured"
    assert path.stat().st_size <= 12 * 2**20
    result = wer_alone(path, unseen)
    assert result["utterances"] == 40
    assert result["wer"] <= entry["eval"]["wer"] + 0.03, result


LATE_FILES = sorted(name for name in ASR_FILES if "wer_lead_silence" in shipped_manifest()[name]["eval"])


def test_every_recognizer_a_device_runs_states_its_wer_on_speech_that_begins_late() -> None:
    """The default base, the amortized model (the family a device runs to save compute) and ConvRNN-T are measured
    with a lead-in in their manifest (the launch base is not re-trained yet: README)."""
    assert {"dense-6.pt", "amortized-6.pt", "convrnnt-6.pt"} <= set(LATE_FILES)


@pytest.mark.parametrize("name", LATE_FILES)
def test_shipped_recognizer_decodes_speech_that_begins_late(name: str, unseen: Path) -> None:
    """A device starts listening before anyone speaks: with a second of each recording's own noise floor before it
    (``prepend_silence``), the shipped recognizer decodes the unseen speakers within 0.08 of its WER without (one
    utterance garbled is 0.03 here), and within 0.03 of the figure its manifest states for that case (README,
    "The base now hears speech that begins late")."""
    stated = shipped_manifest()[name]["eval"]["wer_lead_silence"]
    plain = wer_alone(SHIPPED_DIR / name, unseen)["wer"]
    late = evaluate_wer(SHIPPED_DIR / name, unseen, lead_silence_s=stated["seconds"])["wer"]
    assert stated["seconds"] >= 1.0
    assert late <= plain + 0.08 and late <= stated["wer"] + 0.03, (plain, late)


def test_the_default_base_goes_on_after_a_sentence_ends(unseen: Path) -> None:
    """Each of the unseen utterances followed, after a pause of up to a second, by the next one of its batch (the
    training augmentation ``concatenate_neighbours``, every row joined): the shipped default base transcribes both
    sentences, within 0.12 of its WER on the utterances alone (a model that stops after the first: about 0.5)."""
    checkpoint = load_checkpoint(default_checkpoint())
    assert checkpoint.frontend is not None
    model, tokenizer = checkpoint.build().eval(), checkpoint.frontend.tokenizer
    corpus = load_corpus(unseen)
    features = FeatureCache(corpus, checkpoint.frontend.cmvn)
    batches = make_batches(corpus.utterances, features=features, tokenizer=tokenizer, max_frames=8000, shuffle=False, seed=0)
    generator = torch.Generator().manual_seed(0)
    pairs = [concatenate_neighbours(b, prob=1.0, max_pause=MAX_PAUSE_FRAMES, generator=generator) for b in batches]
    text = {u.id: u.text for u in corpus.utterances}
    references = [
        f"{text[b.ids[i]]} {text[b.ids[(i + 1) % len(b)]]}" if len(b) > 1 else text[b.ids[i]]
        for b in batches
        for i in range(len(b))
    ]
    with torch.inference_mode():
        hypotheses = transcribe(model, pairs, tokenizer)
    joined = error_counts(references, [hypotheses[i] for b in batches for i in b.ids]).wer
    alone = wer_alone(default_checkpoint(), unseen)["wer"]
    assert sum(len(b) > 1 for b in batches) >= len(batches) - 1  # nearly every utterance has a neighbour to join
    assert joined <= alone + 0.12, (alone, joined)


def test_each_model_starts_from_its_own_shipped_base_or_the_dense_one() -> None:
    """``model.init-checkpoint = "shipped"`` gives each model its own shipped base, and the dense base where it has
    none: the sliding-window model takes the dense base's very weights (only its attention window is shorter)."""
    assert default_checkpoint().name == "dense-6.pt"
    # A launch base of the same architecture (trained without some markets) ships too, and is never the default.
    launch = [name for name, entry in shipped_manifest().items() if entry.get("withheld")]
    assert all(shipped_manifest()[name]["model_config"] == shipped_manifest()["dense-6.pt"]["model_config"] for name in launch)
    for name in ("amortized", "sliding-window"):
        path = init_checkpoint_path(ModelConfig(name=name))
        assert path is not None and shipped_manifest()[path.name]["model_config"]["name"] in (name, "transformer")
    # ConvRNN-T is another architecture: it has its own shipped base, whole.
    path = init_checkpoint_path(ModelConfig(name="convrnnt"))
    assert path is not None and shipped_manifest()[path.name]["model_config"]["name"] == "convrnnt"
    dense = load_checkpoint(default_checkpoint()).state_dict
    window = initial_model(ModelConfig(name="sliding-window")).state_dict()
    assert set(window) == set(dense)
    assert all(torch.equal(window[k], dense[k].float()) for k in dense)


def test_a_convrnnt_takes_the_dense_label_model_and_a_fresh_encoder() -> None:
    """A ConvRNN-T started from the dense base takes its predictor and joiner (the label model and joint network
    its encoder learns against: the ConvRNN-T recipe's warm start) and keeps its own encoder's initial weights."""
    dense = load_checkpoint(default_checkpoint()).state_dict
    torch.manual_seed(0)
    fresh = build_model(ModelConfig(name="convrnnt", init_checkpoint="")).state_dict()
    torch.manual_seed(0)
    warm = initial_model(ModelConfig(name="convrnnt", init_checkpoint=str(default_checkpoint()))).state_dict()
    label = [k for k in warm if k.startswith(("predictor.", "joiner."))]
    assert label and all(torch.equal(warm[k], dense[k].float()) for k in label)
    assert all(torch.equal(warm[k], fresh[k]) for k in warm if k not in label)
