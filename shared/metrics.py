"""Word error rate, kept as counts so that it pools exactly across devices and cohorts.

WER over a set of utterances is (substitutions + deletions + insertions) / reference words, summed over the
set — not the mean of per-utterance WERs. Devices therefore report the two counts, and the server divides
sums; ``pooled_wer`` of several ``ErrorCounts`` equals the WER of all their utterances together.

Speaker verification is scored on trials (a score per pair, and whether the pair is one speaker): equal error
rate, NIST's normalized minimum detection cost, and the threshold at a target false-acceptance rate, all read
off scikit-learn's ROC curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import jiwer
import numpy as np

__all__ = ["ErrorCounts", "equal_error_rate", "error_counts", "min_dcf", "pooled_wer", "threshold_at_far"]


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
        return ErrorCounts(self.errors + other.errors, self.words + other.words, self.utterances + other.utterances)


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


def _roc(scores: Sequence[float] | np.ndarray, same: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ROC of a verification score, as (FAR, FRR, thresholds), one point per distinct score
    from the highest threshold down (tied scores move together), with the all-rejecting point first."""
    values = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(same, dtype=bool)
    if values.ndim != 1 or labels.shape != values.shape:
        raise ValueError(f"scores and same must be 1-D of one length, got shapes {values.shape} and {labels.shape}")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"a verification metric needs both trial kinds, got {positives} same and {negatives} different")
    if not np.isfinite(values).all():
        raise ValueError("verification scores must be finite")
    from sklearn.metrics import roc_curve  # here, not at the top: only verification needs scikit-learn's import

    far, tpr, thresholds = roc_curve(labels, values, drop_intermediate=False)
    return far, 1.0 - tpr, thresholds


def equal_error_rate(scores: Sequence[float] | np.ndarray, same: Sequence[bool] | np.ndarray) -> float:
    """Equal error rate of a verification score (higher = more likely the same speaker).

    Sweeping the decision threshold from high to low traces false-acceptance rate FAR (different-speaker
    pairs accepted) up and false-rejection rate FRR (same-speaker pairs rejected) down (scikit-learn's
    ``roc_curve``); the EER is where they meet, linearly interpolated between the two ROC points that bracket
    the crossing.

    Args:
        scores: (P,) one score per trial (e.g. cosine similarity of two embeddings).
        same: (P,) True for same-speaker trials; both kinds must occur.

    Returns:
        EER in [0, 1]: 0 when every same-speaker score exceeds every different-speaker score.
    """
    far, frr, _ = _roc(scores, same)
    crossing = int(np.flatnonzero(frr <= far)[0])  # exists: the last point has far = 1 >= frr = 0
    if crossing == 0:
        return 0.0
    before = frr[crossing - 1] - far[crossing - 1]  # > 0
    after = frr[crossing] - far[crossing]  # <= 0
    t = before / (before - after)
    return float(far[crossing - 1] + t * (far[crossing] - far[crossing - 1]))


def min_dcf(
    scores: Sequence[float] | np.ndarray,
    same: Sequence[bool] | np.ndarray,
    *,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> float:
    """Normalized minimum detection cost (NIST SRE): min over thresholds of
    ``(c_miss * p_target * FRR + c_fa * (1 - p_target) * FAR) / min(c_miss * p_target, c_fa * (1 - p_target))``.

    1.0 is the cost of always accepting or always rejecting, whichever is cheaper; 0 is a perfect score.
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must lie in (0, 1), got {p_target}")
    far, frr, _ = _roc(scores, same)
    cost = c_miss * p_target * frr + c_fa * (1.0 - p_target) * far
    return float(cost.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


def threshold_at_far(scores: Sequence[float] | np.ndarray, same: Sequence[bool] | np.ndarray, far: float) -> float:
    """The lowest decision threshold (accept when score >= it) whose false-acceptance rate on these trials is
    at most ``far``: the operating point a device is shipped with."""
    if not 0.0 <= far < 1.0:
        raise ValueError(f"target false-acceptance rate must lie in [0, 1), got {far}")
    rates, _, thresholds = _roc(scores, same)
    allowed = np.flatnonzero(rates <= far)
    return float(thresholds[allowed[-1]]) if allowed[-1] > 0 else float(np.nextafter(thresholds[1], np.inf))
