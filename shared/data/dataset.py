"""From utterances to padded training batches for the transducer.

:class:`FeatureCache` turns an :class:`~shared.data.corpora.Utterance` into CMVN-normalized filterbanks
(memoized, bounded), skipping and recording utterances whose audio cannot be used; :func:`make_batches`
groups utterances of similar length into batches whose padded size stays under a frame budget;
:func:`concatenate_neighbours` joins utterances of a batch in pairs (a training augmentation).

Legend: ``B`` utterances per batch, ``T`` frames of the longest utterance, ``F = 80`` mel bins, ``U``
tokens of the longest transcript.

Example (``tokenizer`` from :meth:`Tokenizer.load`)::

    >>> corpus = load_corpus("../shared/data/fsdd")
    >>> raw = FeatureCache(corpus, None, max_items=0)
    >>> cmvn = GlobalCMVN.fit(feats for utt in corpus.utterances if (feats := raw.features(utt)) is not None)
    >>> cache = FeatureCache(corpus, cmvn)
    >>> batches = make_batches(corpus.utterances, features=cache, tokenizer=tokenizer, shuffle=True, seed=0)
    >>> batch = batches[0]
    >>> batch.feats.shape[0] * batch.feats.shape[1] <= 6000
    True
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared.data.audio import AudioError
from shared.data.corpora import Corpus, Utterance
from shared.data.features import N_MELS, FeatureError, GlobalCMVN, compute_fbank, noise_floor
from shared.data.tokenizer import Tokenizer, TokenizerError

__all__ = ["Batch", "DatasetError", "FeatureCache", "concatenate_neighbours", "make_batches"]

_logger = logging.getLogger("chorus.data")

# Utterances are shuffled, then sorted by length within pools of this many: large enough that neighbours
# in a pool have similar lengths (little padding), small enough that every epoch's batches differ.
_POOL_SIZE = 256


class DatasetError(ValueError):
    """Batching parameters that cannot work."""


@dataclass
class Batch:
    """A padded batch of utterances.

    Attributes:
        feats: ``(B, T, F)`` float32, CMVN-normalized, zero-padded (0 is the mean after CMVN).
        feat_lens: ``(B,)`` int64 valid frames per utterance.
        targets: ``(B, U)`` int64 token ids, padded with 0.
        target_lens: ``(B,)`` int64 valid tokens per utterance.
        ids: the utterance ids, in batch order.
    """

    feats: torch.Tensor
    feat_lens: torch.Tensor
    targets: torch.Tensor
    target_lens: torch.Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""
        return Batch(
            feats=self.feats.to(device),
            feat_lens=self.feat_lens.to(device),
            targets=self.targets.to(device),
            target_lens=self.target_lens.to(device),
            ids=list(self.ids),
        )


class FeatureCache:
    """CMVN-normalized filterbanks per utterance, memoized in memory for the most recent ``max_items``.

    An utterance whose audio cannot be loaded or featurized is recorded in :attr:`skipped` (id -> reason),
    logged once and returns None from then on; it never raises.

    Attributes:
        skipped: ``{utterance id: reason}`` for every utterance left out, by this cache or by
            :func:`make_batches` using it.
    """

    def __init__(self, corpus: Corpus, cmvn: GlobalCMVN | None, *, max_items: int = 2048) -> None:
        """
        Args:
            corpus: reads the audio (and resamples it to 16 kHz).
            cmvn: normalization statistics; None returns raw filterbanks (to fit the statistics with the
                same skipping of bad files).
            max_items: utterances kept in memory (about 32 KB per second of audio each); 0 disables memoizing.
        """
        if max_items < 0:
            raise DatasetError(f"max_items must be >= 0, got {max_items}")
        self._corpus = corpus
        self._cmvn = cmvn
        self._max_items = max_items
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        """Number of utterances memoized now."""
        return len(self._memo)

    def features(self, utt: Utterance) -> np.ndarray | None:
        """``(T, F)`` float32 features of ``utt``, or None if its audio is unusable (see :attr:`skipped`).

        The array is shared with the cache and therefore read-only: copy it before modifying it.
        """
        if utt.id in self.skipped:
            return None
        memoized = self._memo.get(utt.id)
        if memoized is not None:
            self._memo.move_to_end(utt.id)
            return memoized
        result = _featurize(self._corpus, self._cmvn, utt)
        if isinstance(result, str):
            self.skip(utt.id, result)
            return None
        self._keep(utt.id, result)
        return result

    def _keep(self, utterance_id: str, feats: np.ndarray) -> None:
        feats.flags.writeable = False
        if self._max_items > 0:
            self._memo[utterance_id] = feats
            if len(self._memo) > self._max_items:
                self._memo.popitem(last=False)

    def warm(self, utterances: Sequence[Utterance], *, workers: int | None = None) -> None:
        """Featurize ``utterances`` now, in ``workers`` processes (default: one per core), and memoize them.

        Central training reads every utterance in its first epoch; one process featurizing tens of thousands of
        utterances would leave the other cores (and a GPU) idle for minutes. Skips are recorded as by
        :meth:`features`. Only as many as the cache holds are kept (the most recent ``max_items``).
        """
        todo = [utt for utt in utterances if utt.id not in self._memo and utt.id not in self.skipped]
        workers = min(os.cpu_count() or 1, len(todo) // 64 + 1) if workers is None else workers
        if workers < 1:
            raise DatasetError(f"workers must be >= 1, got {workers}")
        if self._max_items == 0:  # nothing would be kept
            return
        if workers == 1:
            for utt in todo:
                self.features(utt)
            return
        # forkserver, as `chorus data synth`: the caller may hold threads (torch's pools) that fork would copy.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with context.Pool(workers, initializer=_start_worker, initargs=(self._corpus, self._cmvn)) as pool:
            for utt, result in zip(todo, pool.imap(_worker_featurize, todo, chunksize=32)):
                if isinstance(result, str):
                    self.skip(utt.id, result)
                else:
                    self._keep(utt.id, result)

    def skip(self, utterance_id: str, reason: str) -> None:
        """Record an utterance as unusable (first reason wins) and log it once."""
        if utterance_id not in self.skipped:
            self.skipped[utterance_id] = reason
            _logger.warning("skipping utterance %s: %s", utterance_id, reason)


def _featurize(corpus: Corpus, cmvn: GlobalCMVN | None, utt: Utterance) -> np.ndarray | str:
    """``(T, F)`` features of ``utt`` (CMVN-normalized with ``cmvn``), or the reason it cannot be used."""
    try:
        feats = compute_fbank(corpus.load_audio(utt))
    except (AudioError, FeatureError) as error:
        return str(error)
    return cmvn.apply(feats) if cmvn is not None else feats


_worker_source: tuple[Corpus, GlobalCMVN | None] | None = None  # a warm() worker's corpus and CMVN


def _start_worker(corpus: Corpus, cmvn: GlobalCMVN | None) -> None:
    global _worker_source
    _worker_source = (corpus, cmvn)


def _worker_featurize(utt: Utterance) -> np.ndarray | str:
    assert _worker_source is not None, "called outside a FeatureCache.warm worker"
    return _featurize(*_worker_source, utt)


def make_batches(
    utterances: Sequence[Utterance],
    *,
    features: FeatureCache,
    tokenizer: Tokenizer,
    max_frames: int = 6000,
    shuffle: bool,
    seed: int,
) -> list[Batch]:
    """Group utterances into padded batches of at most ``max_frames`` padded frames (``B * T <= max_frames``).

    Without shuffling, utterances are sorted by length and cut into batches in that order. With shuffling,
    utterances are shuffled, sorted by length within pools of 256, cut into batches, and the batches are
    shuffled; the same ``seed`` gives the same batches. Utterances whose audio or transcript cannot be
    used, or that alone exceed ``max_frames``, are left out and recorded in ``features.skipped``.

    Args:
        utterances: the utterances to batch (ids unique).
        features: source of CMVN-normalized features, and ledger of skipped utterances.
        tokenizer: encodes the transcripts into targets.
        max_frames: padded-frame budget per batch (6000 frames = 60 s of audio).
        shuffle: randomize which utterances share a batch, and the batch order.
        seed: seeds the shuffling (ignored without it).

    Returns:
        The batches; every usable utterance appears in exactly one.

    Raises:
        DatasetError: ``max_frames`` is not positive.
    """
    if max_frames <= 0:
        raise DatasetError(f"max_frames must be positive, got {max_frames}")
    # Kept here rather than re-read from the cache: a cache smaller than the utterance list would otherwise
    # recompute evicted features when the batches are assembled.
    examples: list[tuple[Utterance, np.ndarray, list[int]]] = []
    for utt in utterances:
        feats = features.features(utt)
        if feats is None:
            continue
        if feats.shape[0] > max_frames:
            features.skip(utt.id, f"{feats.shape[0]} frames exceed max_frames={max_frames}")
            continue
        try:
            targets = tokenizer.encode(utt.text)
        except TokenizerError as error:
            features.skip(utt.id, str(error))
            continue
        examples.append((utt, feats, targets))

    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(examples)
        pools = [examples[start : start + _POOL_SIZE] for start in range(0, len(examples), _POOL_SIZE)]
    else:
        pools = [examples]
    groups: list[list[tuple[Utterance, np.ndarray, list[int]]]] = []
    for pool in pools:
        # Ties broken by id so that the order never depends on the input order beyond the shuffle.
        pool = sorted(pool, key=lambda example: (example[1].shape[0], example[0].id))
        groups.extend(_cut_by_budget(pool, max_frames))
    if shuffle:
        rng.shuffle(groups)
    return [_collate(group) for group in groups]


def _cut_by_budget(
    sorted_examples: list[tuple[Utterance, np.ndarray, list[int]]], max_frames: int
) -> list[list[tuple[Utterance, np.ndarray, list[int]]]]:
    """Consecutive groups of length-sorted examples, each with ``len(group) * longest <= max_frames``."""
    groups: list[list[tuple[Utterance, np.ndarray, list[int]]]] = []
    current: list[tuple[Utterance, np.ndarray, list[int]]] = []
    longest = 0
    for example in sorted_examples:
        frames = example[1].shape[0]
        if current and (len(current) + 1) * max(longest, frames) > max_frames:
            groups.append(current)
            current, longest = [], 0
        current.append(example)
        longest = max(longest, frames)
    if current:
        groups.append(current)
    return groups


def _collate(group: list[tuple[Utterance, np.ndarray, list[int]]]) -> Batch:
    feat_lens = [feats.shape[0] for _, feats, _ in group]
    target_lens = [len(targets) for _, _, targets in group]
    padded_feats = np.zeros((len(group), max(feat_lens), N_MELS), dtype=np.float32)
    padded_targets = np.zeros((len(group), max(target_lens)), dtype=np.int64)
    for row, (_, feats, targets) in enumerate(group):
        padded_feats[row, : feats.shape[0]] = feats
        padded_targets[row, : len(targets)] = targets
    return Batch(
        feats=torch.from_numpy(padded_feats),
        feat_lens=torch.tensor(feat_lens, dtype=torch.int64),
        targets=torch.from_numpy(padded_targets),
        target_lens=torch.tensor(target_lens, dtype=torch.int64),
        ids=[utt.id for utt, _, _ in group],
    )


def concatenate_neighbours(batch: Batch, *, prob: float, max_pause: int, generator: torch.Generator) -> Batch:
    """``batch`` with each utterance, with probability ``prob``, followed by the next one of the batch (the last by
    the first) after a pause of U{10..``max_pause``} frames of its noise floor; targets joined in the same order.

    A corpus of one command per recording teaches a transducer that nothing follows a sentence's end (its predictor
    sees the last tokens of a finished command, its encoder silence after speech), and the model then drops every
    sentence after the first of a longer recording: a second command, a second talker's turn. Rows keep their
    ids and order; a batch of one utterance is returned as it is.
    """
    if not 0.0 <= prob <= 1.0 or max_pause < 10:
        raise DatasetError(f"concatenation needs prob in [0, 1] and max_pause >= 10 frames, got {prob} and {max_pause}")
    size = len(batch)
    if size < 2 or prob == 0.0:
        return batch
    joined = (torch.rand(size, generator=generator) < prob).tolist()
    pauses = torch.randint(10, max_pause + 1, (size,), generator=generator).tolist()
    feats, targets = [], []
    for b in range(size):
        n, u = int(batch.feat_lens[b]), int(batch.target_lens[b])
        rows, tokens = [batch.feats[b, :n]], [batch.targets[b, :u]]
        if joined[b] and n > 0:
            nxt = (b + 1) % size
            rows += [noise_floor(rows[0], pauses[b], generator=generator), batch.feats[nxt, : int(batch.feat_lens[nxt])]]
            tokens.append(batch.targets[nxt, : int(batch.target_lens[nxt])])
        feats.append(torch.cat(rows))
        targets.append(torch.cat(tokens))
    return Batch(
        feats=torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
        feat_lens=torch.tensor([len(f) for f in feats], dtype=torch.int64),
        targets=torch.nn.utils.rnn.pad_sequence(targets, batch_first=True),
        target_lens=torch.tensor([len(t) for t in targets], dtype=torch.int64),
        ids=list(batch.ids),
    )
