"""Word error rate, kept as counts so that it pools exactly across devices and cohorts.

WER over a set of utterances is (substitutions + deletions + insertions) / reference words, summed over the
set — not the mean of per-utterance WERs. Devices therefore report the two counts, and the server divides
sums; ``pooled_wer`` of several ``ErrorCounts`` equals the WER of all their utterances together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import jiwer
import numpy as np

__all__ = ["ErrorCounts", "equal_error_rate", "error_counts", "pooled_wer"]


@dataclass(frozen=True)
class ErrorCounts:
    errors: int  # word substitutions + deletions + insertions
    words: int  # reference words
    utterances: int

    @property
    def wer(self) -> float:
        if self.words == 0:
            raise ValueError("WER is undefined with zero reference words")
        return self.errors / self.words

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(self.errors + other.errors, self.words + other.words,
                           self.utterances + other.utterances)


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """Word-level edit counts of hypotheses against references (jiwer's alignment)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        return ErrorCounts(0, 0, 0)
    if any(not ref.strip() for ref in references):
        raise ValueError("a reference transcript is empty: WER needs at least one reference word")
    out = jiwer.process_words(list(references), list(hypotheses))
    errors = out.substitutions + out.deletions + out.insertions
    words = out.substitutions + out.deletions + out.hits
    return ErrorCounts(errors, words, len(references))


def pooled_wer(counts: Iterable[ErrorCounts]) -> float:
    total = ErrorCounts(0, 0, 0)
    for c in counts:
        total = total + c
    return total.wer


def equal_error_rate(scores: Sequence[float] | np.ndarray, same: Sequence[bool] | np.ndarray) -> float:
    """Equal error rate of a verification score (higher = more likely the same speaker).

    Sweeping the decision threshold from high to low traces false-acceptance rate FAR (different-speaker
    pairs accepted) up and false-rejection rate FRR (same-speaker pairs rejected) down; the EER is where they
    meet, linearly interpolated between the two thresholds that bracket the crossing. Tied scores move
    together (one ROC point per distinct score).

    Args:
        scores: (P,) one score per trial (e.g. cosine similarity of two embeddings).
        same: (P,) True for same-speaker trials; both kinds must occur.

    Returns:
        EER in [0, 1]: 0 when every same-speaker score exceeds every different-speaker score.
    """
    values = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(same, dtype=bool)
    if values.ndim != 1 or labels.shape != values.shape:
        raise ValueError(f"scores and same must be 1-D of one length, got shapes {values.shape} and {labels.shape}")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"EER needs both trial kinds, got {positives} same and {negatives} different")
    order = np.argsort(-values, kind="stable")
    values, labels = values[order], labels[order]
    last_of_tie = np.r_[values[1:] != values[:-1], True]
    accepted_same = np.cumsum(labels)[last_of_tie]
    accepted_different = np.cumsum(~labels)[last_of_tie]
    far = np.r_[0.0, accepted_different / negatives]
    frr = np.r_[1.0, 1.0 - accepted_same / positives]
    crossing = int(np.flatnonzero(frr <= far)[0])  # exists: the last point has far = 1 >= frr = 0
    if crossing == 0:
        return 0.0
    before = frr[crossing - 1] - far[crossing - 1]  # > 0
    after = frr[crossing] - far[crossing]  # <= 0
    t = before / (before - after)
    return float(far[crossing - 1] + t * (far[crossing] - far[crossing - 1]))
