"""Word error rate, kept as counts so that it pools exactly across devices and cohorts.

WER over a set of utterances is (substitutions + deletions + insertions) / reference words, summed over the
set — not the mean of per-utterance WERs. Devices therefore report the two counts, and the server divides
sums; ``pooled_wer`` of several ``ErrorCounts`` equals the WER of all their utterances together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import jiwer

__all__ = ["ErrorCounts", "error_counts", "pooled_wer"]


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
