"""Tests for shared.data.dataset: feature caching with skips, budgeted, deterministic batching, and concatenation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from shared.data.corpora import MANIFEST_FILE, Corpus, load_corpus
from shared.data.dataset import Batch, DatasetError, FeatureCache, concatenate_neighbours, make_batches
from shared.data.features import N_MELS, NOISE_FLOOR_FRAMES, GlobalCMVN, num_frames
from shared.data.tokenizer import Tokenizer

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SENTENCES = [
    "we call it bear",
    "zero three five one",
    "tom gives up boxing",
    "the quick brown fox",
    "jumps over a lazy dog",
    "elephants like water",
    "good morning to you",
    "see you next week",
    "quiz jazz vex",
    "he can't stop now",
    "my mother's house",
    "seven eight nine",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Twelve noise-plus-tone utterances of 0.3-2.5 s, one corrupt file and one too short for a frame."""
    root = tmp_path_factory.mktemp("dataset_corpus")
    rng = np.random.default_rng(0)
    entries = []
    for index, text in enumerate(SENTENCES):
        samples = 0.05 * rng.standard_normal(int(16000 * (0.3 + 0.2 * index))).astype(np.float32)
        entries.append(
            {
                "id": f"utt{index:02d}",
                "speaker": f"spk{index % 3}",
                "audio": f"utt{index:02d}.wav",
                "text": text,
                "duration": samples.shape[0] / 16000,
                "sample_rate": 16000,
            }
        )
        soundfile.write(root / f"utt{index:02d}.wav", samples, 16000)
    (root / "corrupt.wav").write_bytes(b"RIFF but not really a wav file" * 10)
    soundfile.write(root / "short.wav", np.zeros(200, dtype=np.float32), 16000)
    for name in ("corrupt", "short"):
        entries.append(
            {"id": name, "speaker": "spk0", "audio": f"{name}.wav", "text": "hello", "duration": 0.1, "sample_rate": 16000}
        )
    (root / MANIFEST_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    # Without validation the corrupt file reaches FeatureCache, which must skip it on its own.
    return load_corpus(root, validate=False)


@pytest.fixture(scope="module")
def cmvn(corpus: Corpus) -> GlobalCMVN:
    raw = FeatureCache(corpus, None, max_items=0)
    return GlobalCMVN.fit(feats for utt in corpus.utterances if (feats := raw.features(utt)) is not None)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.train(SENTENCES * 5, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=40)


def test_feature_cache_normalizes_memoizes_and_bounds(corpus: Corpus, cmvn: GlobalCMVN) -> None:
    cache = FeatureCache(corpus, cmvn, max_items=2)
    first = cache.features(corpus.utterances[0])
    assert first is not None and first.dtype == np.float32
    assert first.shape == (num_frames(int(16000 * 0.3)), N_MELS)
    assert cache.features(corpus.utterances[0]) is first
    assert not first.flags.writeable
    for utt in corpus.utterances[1:4]:
        cache.features(utt)
    assert len(cache) == 2
    assert cache.features(corpus.utterances[0]) is not first
    np.testing.assert_array_equal(cache.features(corpus.utterances[0]), first)


def test_warm_featurizes_in_worker_processes_exactly_as_one_process_does(corpus: Corpus, cmvn: GlobalCMVN) -> None:
    warmed = FeatureCache(corpus, cmvn, max_items=len(corpus.utterances))
    warmed.warm(corpus.utterances, workers=2)
    assert set(warmed.skipped) == {"corrupt", "short"}
    assert "200 samples is too short for one frame" in warmed.skipped["short"]
    assert len(warmed) == len(corpus.utterances) - 2
    one = FeatureCache(corpus, cmvn, max_items=0)
    for utt in corpus.utterances:
        expected = one.features(utt)
        got = warmed.features(utt)
        assert (got is None) == (expected is None), utt.id
        if expected is not None:
            assert got is not None and not got.flags.writeable
            np.testing.assert_array_equal(got, expected)
    with pytest.raises(DatasetError, match="workers must be >= 1, got 0"):
        warmed.warm(corpus.utterances, workers=0)


def test_feature_cache_skips_unusable_audio(corpus: Corpus, cmvn: GlobalCMVN) -> None:
    cache = FeatureCache(corpus, cmvn)
    by_id = {utt.id: utt for utt in corpus.utterances}
    assert cache.features(by_id["corrupt"]) is None
    assert cache.features(by_id["short"]) is None
    assert cache.features(by_id["corrupt"]) is None
    assert set(cache.skipped) == {"corrupt", "short"}
    assert f"{corpus.root / 'corrupt.wav'}: unreadable audio file" in cache.skipped["corrupt"]
    assert "200 samples is too short for one frame" in cache.skipped["short"]
    with pytest.raises(DatasetError, match="max_items must be >= 0, got -1"):
        FeatureCache(corpus, cmvn, max_items=-1)


def _check_batches(batches: list[Batch], tokenizer: Tokenizer, corpus: Corpus, max_frames: int) -> None:
    texts = {utt.id: utt.text for utt in corpus.utterances}
    for batch in batches:
        size, longest, bins = batch.feats.shape
        assert bins == N_MELS and size * longest <= max_frames and len(batch) == size
        assert batch.feats.dtype == torch.float32
        assert batch.feat_lens.dtype == batch.targets.dtype == batch.target_lens.dtype == torch.int64
        assert batch.feat_lens.max() == longest and batch.target_lens.max() == batch.targets.shape[1]
        for row, utterance_id in enumerate(batch.ids):
            assert (batch.feats[row, batch.feat_lens[row] :] == 0).all()
            assert (batch.targets[row, batch.target_lens[row] :] == 0).all()
            assert tokenizer.decode(batch.targets[row, : batch.target_lens[row]].tolist()) == texts[utterance_id]


def test_make_batches_respects_budget_and_covers_every_usable_utterance(
    corpus: Corpus, cmvn: GlobalCMVN, tokenizer: Tokenizer
) -> None:
    cache = FeatureCache(corpus, cmvn)
    batches = make_batches(corpus.utterances, features=cache, tokenizer=tokenizer, max_frames=240, shuffle=True, seed=3)
    _check_batches(batches, tokenizer, corpus, max_frames=240)
    batched = [utterance_id for batch in batches for utterance_id in batch.ids]
    assert sorted(batched) == [f"utt{index:02d}" for index in range(12) if index != 11]
    assert set(cache.skipped) == {"corrupt", "short", "utt11"}
    assert cache.skipped["utt11"] == "248 frames exceed max_frames=240"


def test_make_batches_is_deterministic_per_seed(corpus: Corpus, cmvn: GlobalCMVN, tokenizer: Tokenizer) -> None:
    def batch_ids(seed: int) -> list[list[str]]:
        batches = make_batches(
            corpus.utterances, features=FeatureCache(corpus, cmvn), tokenizer=tokenizer, max_frames=800, shuffle=True, seed=seed
        )
        return [batch.ids for batch in batches]

    assert batch_ids(0) == batch_ids(0)
    assert any(batch_ids(0) != batch_ids(seed) for seed in (1, 2, 3))


def test_make_batches_without_shuffle_sorts_by_length(corpus: Corpus, cmvn: GlobalCMVN, tokenizer: Tokenizer) -> None:
    reversed_input = list(reversed(corpus.utterances))
    batches = make_batches(
        reversed_input, features=FeatureCache(corpus, cmvn), tokenizer=tokenizer, max_frames=1000, shuffle=False, seed=0
    )
    lengths = torch.cat([batch.feat_lens for batch in batches]).tolist()
    assert lengths == sorted(lengths) and len(lengths) == 12
    _check_batches(batches, tokenizer, corpus, max_frames=1000)
    with pytest.raises(DatasetError, match="max_frames must be positive, got 0"):
        make_batches(
            corpus.utterances, features=FeatureCache(corpus, cmvn), tokenizer=tokenizer, max_frames=0, shuffle=False, seed=0
        )


def test_batch_to_device_copies(corpus: Corpus, cmvn: GlobalCMVN, tokenizer: Tokenizer) -> None:
    batch = make_batches(corpus.utterances[:3], features=FeatureCache(corpus, cmvn), tokenizer=tokenizer, shuffle=False, seed=0)[
        0
    ]
    moved = batch.to("meta")
    assert moved.feats.device.type == "meta" and moved.targets.device.type == "meta"
    assert moved.ids == batch.ids and moved.ids is not batch.ids


def test_real_fsdd_batches(tmp_path: Path) -> None:
    root = REAL_DATA / "fsdd"
    if not root.is_dir():
        pytest.skip(f"real FSDD data not found at {root}")
    corpus = load_corpus(root)
    utterances = [utt for utt in corpus.utterances if utt.speaker == "lucas"][::10]
    raw = FeatureCache(corpus, None, max_items=0)
    cmvn = GlobalCMVN.fit(feats for utt in utterances if (feats := raw.features(utt)) is not None)
    tokenizer = Tokenizer.train([utt.text for utt in corpus.utterances], tmp_path / "digits.model", vocab_size=34)
    batches = make_batches(
        utterances, features=FeatureCache(corpus, cmvn), tokenizer=tokenizer, max_frames=1500, shuffle=True, seed=0
    )
    assert sum(len(batch) for batch in batches) == len(utterances) == 50
    _check_batches(batches, tokenizer, corpus, max_frames=1500)


def _three_utterances() -> Batch:
    feat_lens, target_lens = [30, 22, 17], [4, 2, 3]
    feats = torch.zeros(3, 30, N_MELS)
    targets = torch.zeros(3, 4, dtype=torch.int64)
    for b, (n, u) in enumerate(zip(feat_lens, target_lens, strict=True)):
        feats[b, :n] = torch.randn(n, N_MELS, generator=torch.Generator().manual_seed(b))
        targets[b, :u] = torch.arange(1, u + 1) + 10 * b
    return Batch(feats, torch.tensor(feat_lens), targets, torch.tensor(target_lens), ["a", "b", "c"])


def test_concatenate_neighbours_joins_each_utterance_with_the_next_after_a_pause_of_its_floor() -> None:
    batch = _three_utterances()
    joined = concatenate_neighbours(batch, prob=1.0, max_pause=40, generator=torch.Generator().manual_seed(0))
    assert joined.ids == ["a", "b", "c"]
    for b in range(3):
        nxt = (b + 1) % 3
        n, m = int(batch.feat_lens[b]), int(batch.feat_lens[nxt])
        pause = int(joined.feat_lens[b]) - n - m
        assert 10 <= pause <= 40
        torch.testing.assert_close(joined.feats[b, :n], batch.feats[b, :n])
        torch.testing.assert_close(joined.feats[b, n + pause : n + pause + m], batch.feats[nxt, :m])
        floor = batch.feats[b, :NOISE_FLOOR_FRAMES]
        assert all((frame[None] == floor).all(dim=1).any() for frame in joined.feats[b, n : n + pause])
        assert (joined.feats[b, n + pause + m :] == 0).all()
        expected = torch.cat([batch.targets[b, : batch.target_lens[b]], batch.targets[nxt, : batch.target_lens[nxt]]])
        assert joined.target_lens[b] == len(expected)
        assert joined.targets[b, : len(expected)].tolist() == expected.tolist()
    # Nothing to join: no probability, or a batch of one.
    assert concatenate_neighbours(batch, prob=0.0, max_pause=40, generator=torch.Generator()) is batch
    single = Batch(batch.feats[:1], batch.feat_lens[:1], batch.targets[:1], batch.target_lens[:1], ["a"])
    assert concatenate_neighbours(single, prob=1.0, max_pause=40, generator=torch.Generator()) is single
    with pytest.raises(DatasetError, match="prob in \\[0, 1\\]"):
        concatenate_neighbours(batch, prob=1.5, max_pause=40, generator=torch.Generator())


def test_concatenate_neighbours_joins_about_prob_of_the_rows() -> None:
    batch = _three_utterances()
    generator = torch.Generator().manual_seed(1)
    joined = sum(
        int((concatenate_neighbours(batch, prob=0.3, max_pause=20, generator=generator).target_lens > batch.target_lens).sum())
        for _ in range(200)
    )
    assert 0.22 < joined / 600 < 0.38
