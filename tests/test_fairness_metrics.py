"""Disaggregated WER (per-cohort vectors, cohort_report definitions) and the equal error rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from shared.fairness.cohorts import CohortCounts, cohort_error_vectors, cohort_report
from shared.metrics import equal_error_rate, error_counts, pooled_wer

# (cohort, reference, hypothesis) per utterance; one device = one speaker = one cohort here.
DEVICES = {
    "alice": (0, [("turn on the lights", "turn on the lights"), ("set a timer", "set the timer")]),
    "bob": (1, [("play some jazz", "play jazz"), ("what is the weather", "what is weather today")]),
    "carol": (1, [("call mom", "call tom"), ("add milk to the list", "add milk to list")]),
    "dave": (2, [("stop", "stop")]),
    "erin": (0, [("turn off the alarm", "turn off alarm")]),
}


def test_pooled_cohort_wer_equals_overall_wer() -> None:
    total = CohortCounts(np.zeros(4), np.zeros(4), np.zeros(4))
    for cohort, pairs in DEVICES.values():
        counts = error_counts([r for r, _ in pairs], [h for _, h in pairs])
        vectors = cohort_error_vectors(cohort, counts.errors, counts.words, num_cohorts=4)
        assert np.count_nonzero(vectors.words) == 1  # dense, one non-zero entry
        total = total + vectors
    report = cohort_report(total.errors, total.words, speakers_per_cohort=total.speakers)
    every = [pair for _, pairs in DEVICES.values() for pair in pairs]
    overall = error_counts([r for r, _ in every], [h for _, h in every])
    assert report.overall_wer == pytest.approx(overall.wer)
    assert report.overall_wer == pytest.approx(
        pooled_wer(error_counts([r for r, _ in pairs], [h for _, h in pairs]) for _, pairs in DEVICES.values())
    )
    for cohort in range(3):
        pairs = [pair for c, ps in DEVICES.values() if c == cohort for pair in ps]
        assert report.wer[cohort] == pytest.approx(error_counts([r for r, _ in pairs], [h for _, h in pairs]).wer)
    assert math.isnan(report.wer[3]) and report.eligible == (0, 1, 2)  # cohort 3 has nobody
    assert report.speakers.tolist() == [2.0, 2.0, 1.0, 0.0]


def test_report_definitions_on_hand_numbers() -> None:
    errors = np.array([10.0, 30.0, 5.0, 0.0, 1.0])
    words = np.array([100.0, 100.0, 100.0, 0.0, 2.0])
    speakers = np.array([5.0, 3.0, 10.0, 0.0, 2.0])
    report = cohort_report(errors, words, speakers_per_cohort=speakers, min_words=10, margin=0.1)
    assert report.eligible == (0, 1, 2)  # cohort 4 has 2 words < min_words, cohort 3 none
    assert report.overall_wer == pytest.approx(46 / 302)
    assert (report.best_cohort, report.worst_cohort) == (2, 1)
    assert (report.best_wer, report.worst_wer) == (0.05, 0.30)
    assert report.wer_gap == pytest.approx((0.30 - 0.05) / 0.05)
    assert report.wer_variance == pytest.approx(np.var([0.10, 0.30, 0.05]))
    assert report.bottom_cohort_share == pytest.approx(100 / 302)
    assert report.bottom_cohort_speaker_share == pytest.approx(3 / 20)
    # Overall 0.152; 1.1 x overall = 0.168: only cohort 1 (0.30) is clearly worse than average.
    assert report.disadvantaged_share == pytest.approx(100 / 302)
    assert report.disadvantaged_speaker_share == pytest.approx(3 / 20)
    metrics = report.metrics()
    assert metrics["cohort-wer-gap"] == pytest.approx(5.0) and metrics["cohort-ranked"] == 3.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_report_edge_cases_and_errors() -> None:
    perfect = cohort_report(np.array([0.0, 2.0]), np.array([10.0, 10.0]))
    assert perfect.wer_gap == math.inf and perfect.speakers is None and perfect.bottom_cohort_speaker_share is None
    assert cohort_report(np.array([0.0, 0.0]), np.array([10.0, 10.0])).wer_gap == 0.0
    with pytest.raises(ValueError, match="no cohort has min_words=50"):
        cohort_report(np.array([1.0]), np.array([10.0]), min_words=50)
    with pytest.raises(ValueError, match=r"got errors \(2,\), words \(3,\)"):
        cohort_report(np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match=r"cohort_id must lie in \[0, 3\), got 3"):
        cohort_error_vectors(3, 1, 2, num_cohorts=3)


def test_equal_error_rate_on_hand_cases() -> None:
    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 0.0
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 1.0
    # One impostor above one target of two each: FAR and FRR both 0.5 at the crossing.
    assert equal_error_rate([0.9, 0.5, 0.6, 0.1], [True, True, False, False]) == pytest.approx(0.5)
    # 4 targets, 4 impostors, one impostor above one target: EER 1/4.
    assert equal_error_rate([0.9, 0.8, 0.7, 0.4, 0.5, 0.3, 0.2, 0.1], [True] * 4 + [False] * 4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="needs both trial kinds"):
        equal_error_rate([0.1, 0.2], [True, True])


def test_equal_error_rate_lies_at_the_roc_crossing() -> None:
    rng = np.random.default_rng(0)
    same = rng.random(400) < 0.3
    scores = rng.normal(size=400) + 1.5 * same
    eer = equal_error_rate(scores, same)
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    fnr = 1 - tpr
    crossing = np.flatnonzero(fnr <= fpr)[0]
    # Between the two ROC points that bracket FAR = FRR (sklearn's curve), and about the usual approximation.
    assert fpr[crossing - 1] <= eer <= fpr[crossing]
    assert fnr[crossing] <= eer <= fnr[crossing - 1]
    index = np.argmin(np.abs(fnr - fpr))
    assert eer == pytest.approx((fpr[index] + fnr[index]) / 2, abs=0.01)
