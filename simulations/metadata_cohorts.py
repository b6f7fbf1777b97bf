"""Metadata cohorts for the fairness evaluation: partitions of speakers by their ``speakers.tsv`` attributes.

Evaluation only (devices never see ``speakers.tsv``): one cohort per combination of attribute values
(``attribute_cohorts``), or Trinh et al.'s (arXiv 2207.07850) decision-tree partition of the metadata that
maximizes WER differences between leaves (``tree_cohorts``). ``chorus eval fairness`` compares them with the
automatic cohorts of ``shared/fairness/cohorts.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.fairness.cohorts import CohortCounts, cohort_error_vectors
from shared.metrics import ErrorCounts

__all__ = ["Cohorts", "attribute_cohorts", "cohort_counts_by_speaker", "tree_cohorts"]


@dataclass(frozen=True)
class Cohorts:
    """A partition of speakers into K cohorts.

    Attributes:
        assignment: speaker id -> cohort id in [0, K).
        names: per cohort, a readable description (``accent=en-sc, gender=f`` or a tree rule).
    """

    assignment: dict[str, int]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def cohort_counts_by_speaker(cohorts: Cohorts, per_speaker: Mapping[str, ErrorCounts]) -> CohortCounts:
    """Sum speakers' error counts into dense per-cohort vectors (what the devices' vectors sum to)."""
    missing = sorted(set(per_speaker) - set(cohorts.assignment))
    if missing:
        raise ValueError(f"speakers {missing[:5]} have no cohort")
    total = CohortCounts(*(np.zeros(len(cohorts)) for _ in range(3)))
    for speaker, counts in per_speaker.items():
        total = total + cohort_error_vectors(cohorts.assignment[speaker], counts.errors, counts.words, len(cohorts))
    return total


def _columns(attributes: Mapping[str, Mapping[str, str]], columns: Sequence[str] | None) -> list[str]:
    if not attributes:
        raise ValueError("no speaker attributes (is speakers.tsv missing?)")
    available = sorted(set.intersection(*(set(row) for row in attributes.values())))
    chosen = list(available if columns is None else columns)
    unknown = [c for c in chosen if c not in available]
    if unknown or not chosen:
        raise ValueError(f"attribute columns {unknown or chosen} are not available for every speaker; available: {available}")
    return chosen


def attribute_cohorts(attributes: Mapping[str, Mapping[str, str]], columns: Sequence[str]) -> Cohorts:
    """One cohort per combination of values of ``columns`` (e.g. ``("gender", "age_group")``).

    Args:
        attributes: ``read_speakers_tsv`` output, {speaker: {column: value}}.
        columns: attribute columns to cross.

    Returns:
        ``Cohorts`` whose ids follow the sorted value combinations.
    """
    chosen = _columns(attributes, columns)
    keys = {speaker: tuple(row[c] for c in chosen) for speaker, row in attributes.items()}
    combos = sorted(set(keys.values()))
    index = {combo: i for i, combo in enumerate(combos)}
    names = tuple(", ".join(f"{c}={v}" for c, v in zip(chosen, combo, strict=True)) for combo in combos)
    return Cohorts(assignment={speaker: index[key] for speaker, key in keys.items()}, names=names)


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def tree_cohorts(
    attributes: Mapping[str, Mapping[str, str]],
    per_speaker: Mapping[str, ErrorCounts],
    *,
    columns: Sequence[str] | None = None,
    max_cohorts: int = 4,
    min_speakers: int = 2,
    seed: int = 0,
) -> Cohorts:
    """Trinh et al.'s partition: the decision tree over metadata whose leaves differ most in WER.

    A ``DecisionTreeRegressor`` (squared error, at most ``max_cohorts`` leaves, best-first growth) fits each
    speaker's WER from their metadata, each speaker weighted by their reference words. Weighted squared error
    is minimized by splitting where the between-leaf WER differences are largest, and a leaf's prediction
    (word-weighted mean of speaker WERs) is exactly its pooled WER. Trinh et al. split latitude/longitude; here
    a column whose values are all numbers (pitch, rate, SNR) is one numeric feature, any other column is
    one-hot encoded (accent, gender), so a split reads "accent=en-sc" or "snr_db<=12.5".

    Args:
        attributes: {speaker: {column: value}} (``read_speakers_tsv``).
        per_speaker: {speaker: ErrorCounts} of the model being examined; speakers without words are ignored.
        columns: attribute columns to split on (default: those every speaker has).
        max_cohorts: maximum number of leaves (cohorts), >= 2.
        min_speakers: minimum speakers per leaf.
        seed: the tree's random_state (ties between equally good splits).

    Returns:
        ``Cohorts`` over the speakers with words, cohort 0 the worst leaf (highest pooled WER), names are
        the leaf's rule path.
    """
    from sklearn.tree import DecisionTreeRegressor  # here, not at import: scikit-learn takes seconds to load

    if max_cohorts < 2 or min_speakers < 1:
        raise ValueError(f"need max_cohorts >= 2 and min_speakers >= 1, got {max_cohorts} and {min_speakers}")
    missing = sorted(set(per_speaker) - set(attributes))
    if missing:
        raise ValueError(f"speakers {missing[:5]} have error counts but no attributes")
    speakers = sorted(s for s, counts in per_speaker.items() if counts.words > 0)
    if len(speakers) < 2 * min_speakers:
        raise ValueError(f"{len(speakers)} speakers with words cannot form 2 leaves of min_speakers={min_speakers}")
    chosen = _columns({s: attributes[s] for s in speakers}, columns)

    feature_names: list[tuple[str, str | None]] = []  # (column, one-hot value or None for numeric)
    for column in chosen:
        values = sorted({attributes[s][column] for s in speakers})
        if all(_is_number(v) for v in values):
            feature_names.append((column, None))
        else:
            feature_names.extend((column, v) for v in values)
    x = np.array(
        [[float(attributes[s][c]) if v is None else float(attributes[s][c] == v) for c, v in feature_names] for s in speakers]
    )
    wer = np.array([per_speaker[s].wer for s in speakers])
    weight = np.array([float(per_speaker[s].words) for s in speakers])
    tree = DecisionTreeRegressor(max_leaf_nodes=max_cohorts, min_samples_leaf=min_speakers, random_state=seed)
    tree.fit(x, wer, sample_weight=weight)

    structure = tree.tree_
    rules: dict[int, list[str]] = {0: []}
    for node in range(structure.node_count):  # parents come before children in sklearn's node order
        left, right = structure.children_left[node], structure.children_right[node]
        if left < 0:
            continue
        column, value = feature_names[structure.feature[node]]
        threshold = structure.threshold[node]
        if value is None:
            rules[left] = rules[node] + [f"{column}<={threshold:g}"]
            rules[right] = rules[node] + [f"{column}>{threshold:g}"]
        else:
            rules[left] = rules[node] + [f"{column}!={value}"]
            rules[right] = rules[node] + [f"{column}={value}"]
    leaves = tree.apply(x)
    leaf_ids = sorted(set(leaves.tolist()), key=lambda leaf: (-float(structure.value[leaf].ravel()[0]), leaf))
    index = {leaf: i for i, leaf in enumerate(leaf_ids)}
    names = tuple(" & ".join(rules[leaf]) or "all" for leaf in leaf_ids)
    return Cohorts(assignment={s: index[int(leaf)] for s, leaf in zip(speakers, leaves, strict=True)}, names=names)
