"""Speaker cohorts and disaggregated WER: federated k-means, per-cohort error counts, fairness summaries.

Two parts, each plain numpy:

* **Automatic cohorts** (Dheram et al. 2022, arXiv 2207.11345: k-means on speaker embeddings). Federated
  Lloyd iterations: the server holds C centroids; a device assigns its own speaker embedding(s) to the nearest
  centroid and returns DENSE per-cluster sums and counts (``client_kmeans_stats``; zeros for clusters it has
  nothing in, so the shapes reveal nothing and SecAgg+ can sum them); the server divides summed sums by summed
  counts (``server_update``). One round equals one centralized Lloyd iteration over all devices' embeddings.
  Initial centroids come from k-means++ on the public speakers' embeddings (``init_centroids``).
* **Disaggregated evaluation**: a device turns its held-out word errors into dense per-cohort vectors
  (``cohort_error_vectors``); the server sums them and summarizes (``cohort_report``: per-cohort WER, pooled
  overall WER, gap, bottom-cohort share, variance).

Metadata cohorts, which read ``speakers.tsv`` (devices never see it), are the evaluation's: ``simulations/
metadata_cohorts.py``.

Legend of array symbols:
    N   embeddings (speakers) on one device or in one set
    E   embedding dimension
    C   clusters (k-means centroids)
    K   cohorts in an evaluation (C for automatic cohorts)

Example (two devices, one speaker embedding each, two clusters)::

    >>> centroids = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> a = client_kmeans_stats(np.array([[0.9, 0.1]]), centroids)
    >>> b = client_kmeans_stats(np.array([[0.7, 0.3]]), centroids)
    >>> server_update(centroids, a.sums + b.sums, a.counts + b.counts).tolist()
    [[0.8, 0.2], [0.0, 1.0]]
    >>> report = cohort_report(np.array([3.0, 1.0]), np.array([10.0, 10.0]))
    >>> round(report.overall_wer, 3), report.worst_cohort, round(report.wer_gap, 3)
    (0.2, 0, 2.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


__all__ = [
    "ClusterStats",
    "CohortCounts",
    "CohortReport",
    "assign",
    "client_kmeans_stats",
    "cohort_error_vectors",
    "cohort_report",
    "federated_kmeans",
    "init_centroids",
    "server_update",
    "undersized_cluster",
]


def _matrix(name: str, value: np.ndarray, width: int | None = None) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 1 and width is not None and array.shape[0] == width:
        array = array[None, :]
    if array.ndim != 2 or (width is not None and array.shape[1] != width):
        raise ValueError(f"{name} must be a 2-D array (rows, {width if width is not None else 'E'}), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values")
    return array


# ---------------------------------------------------------------------------------------------------------
# Federated k-means
# ---------------------------------------------------------------------------------------------------------


class ClusterStats(NamedTuple):
    """What a device returns for one k-means round (dense over all C clusters).

    Attributes:
        sums: (C, E) sum of the device's embeddings assigned to each cluster (zero rows elsewhere).
        counts: (C,) how many of its embeddings each cluster got.
    """

    sums: np.ndarray
    counts: np.ndarray


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (squared Euclidean distance; ties go to the lower index) of each embedding.

    Args:
        embeddings: (N, E), or one (E,) embedding.
        centroids: (C, E).

    Returns:
        (N,) int64 cluster ids. For L2-normalized embeddings, nearest in Euclidean distance is nearest in
        cosine similarity.
    """
    centroids = _matrix("centroids", centroids)
    points = _matrix("embeddings", embeddings, centroids.shape[1])
    distances = (points**2).sum(1)[:, None] - 2.0 * points @ centroids.T + (centroids**2).sum(1)[None, :]
    return distances.argmin(axis=1).astype(np.int64)


def client_kmeans_stats(
    embeddings: np.ndarray, centroids: np.ndarray, *, noise_std: float = 0.0, rng: np.random.Generator | None = None
) -> ClusterStats:
    """A device's contribution to one Lloyd iteration: dense per-cluster sums and counts.

    Args:
        embeddings: (N, E) or (E,) the device's speaker embedding(s).
        centroids: (C, E) the server's current centroids.
        noise_std: standard deviation of Gaussian noise added to every entry of ``sums`` and ``counts``
            (0 = exact). For unit-norm embeddings one speaker changes ``sums`` by at most 1 and ``counts`` by
            1 in L2 norm; turning this noise into a privacy guarantee (and splitting it across devices so the
            summed noise has the intended scale) is the caller's accounting.
        rng: source of the noise (required when ``noise_std > 0``).

    Returns:
        ``ClusterStats`` of float64 arrays (float so that noise and SecAgg+ quantization fit).
    """
    centroids = _matrix("centroids", centroids)
    points = _matrix("embeddings", embeddings, centroids.shape[1])
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    labels = assign(points, centroids)
    num_clusters = centroids.shape[0]
    sums = np.zeros_like(centroids)
    np.add.at(sums, labels, points)
    counts = np.bincount(labels, minlength=num_clusters).astype(np.float64)
    if noise_std > 0:
        if rng is None:
            raise ValueError("noise_std > 0 needs an rng (np.random.Generator)")
        sums = sums + rng.normal(scale=noise_std, size=sums.shape)
        counts = counts + rng.normal(scale=noise_std, size=counts.shape)
    return ClusterStats(sums=sums, counts=counts)


def server_update(
    centroids: np.ndarray, summed_sums: np.ndarray, summed_counts: np.ndarray, *, min_count: float = 0.5
) -> np.ndarray:
    """New centroids from the devices' summed ``ClusterStats``: sum / count per cluster.

    A cluster whose summed count is below ``min_count`` keeps its old centroid (an empty cluster; with exact
    counts 0.5 means "no member", with noisy counts raise it so that a near-zero count cannot blow up).

    Args:
        centroids: (C, E) the centroids the devices assigned against.
        summed_sums: (C, E); summed_counts: (C,).

    Returns:
        (C, E) new centroids.
    """
    centroids = _matrix("centroids", centroids)
    sums = _matrix("summed_sums", summed_sums, centroids.shape[1])
    counts = np.asarray(summed_counts, dtype=np.float64)
    if sums.shape != centroids.shape or counts.shape != (centroids.shape[0],):
        raise ValueError(f"summed_sums {sums.shape} and summed_counts {counts.shape} do not match centroids {centroids.shape}")
    filled = counts >= min_count
    updated = centroids.copy()
    updated[filled] = sums[filled] / counts[filled, None]
    return updated


def undersized_cluster(counts: np.ndarray, min_devices: int) -> int | None:
    """The cluster to merge away: the smallest one (lowest id on ties) when its summed count is under
    ``min_devices`` and another cluster is left to take its devices, else None (always None for
    ``min_devices`` 0: every cluster is kept, an empty one too).

    A cohort of a few devices is no cohort: its WER is a handful of speakers' (noise), and a per-cohort figure of
    one device is that device's own. Dropping the centroid sends its devices to their nearest remaining one.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if min_devices < 1 or counts.shape[0] < 2 or counts.min() >= min_devices:
        return None
    return int(counts.argmin())


def federated_kmeans(
    device_embeddings: Sequence[np.ndarray],
    centroids: np.ndarray,
    *,
    iterations: int,
    noise_std: float = 0.0,
    seed: int = 0,
    min_devices: int = 0,
) -> np.ndarray:
    """Reference of the protocol, all in one process: ``iterations`` rounds of stats -> sum -> update, then
    while a cluster holds fewer than ``min_devices`` (:func:`undersized_cluster`), its centroid is dropped and
    the rest are re-centred once.

    Args:
        device_embeddings: per device, (N_d, E) or (E,) embeddings.
        centroids: (C, E) initial centroids.
        iterations: rounds (Lloyd iterations).
        noise_std, seed: per-device noise of ``client_kmeans_stats``.
        min_devices: the smallest cluster kept (0 = every cluster, an empty one too).

    Returns:
        (C', E) final centroids, C' <= C.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    rng = np.random.default_rng(seed)
    current = _matrix("centroids", centroids)
    updates_left = iterations
    while True:
        sums, counts = np.zeros_like(current), np.zeros(current.shape[0])
        for embeddings in device_embeddings:
            stats = client_kmeans_stats(embeddings, current, noise_std=noise_std, rng=rng)
            sums, counts = sums + stats.sums, counts + stats.counts
        if updates_left > 0:
            current, updates_left = server_update(current, sums, counts), updates_left - 1
            continue
        small = undersized_cluster(counts, min_devices)
        if small is None:
            return current
        current, updates_left = np.delete(current, small, axis=0), 1


def init_centroids(public_embeddings: np.ndarray, num_clusters: int, *, seed: int = 0) -> np.ndarray:
    """Initial centroids: k-means++ seeding (scikit-learn's ``kmeans_plusplus``) on public speakers' embeddings.

    Args:
        public_embeddings: (N, E) one embedding per public speaker, N >= ``num_clusters``.
        num_clusters: C.

    Returns:
        (C, E) float64 centroids (public points; nothing federated is involved).
    """
    from sklearn.cluster import kmeans_plusplus  # here, not at import: scikit-learn takes seconds to load

    points = _matrix("public_embeddings", public_embeddings)
    if not 1 <= num_clusters <= points.shape[0]:
        raise ValueError(f"num_clusters must lie in [1, {points.shape[0]}] (public embeddings), got {num_clusters}")
    centers, _ = kmeans_plusplus(points, num_clusters, random_state=seed)
    return centers


# ---------------------------------------------------------------------------------------------------------
# Disaggregated evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortCounts:
    """Dense per-cohort evaluation counts (float64, so SecAgg+ and noise fit; exact below 2**53).

    Attributes:
        errors: (K,) word errors (substitutions + deletions + insertions).
        words: (K,) reference words.
        speakers: (K,) speakers (devices) that contributed.
    """

    errors: np.ndarray
    words: np.ndarray
    speakers: np.ndarray

    def __add__(self, other: CohortCounts) -> CohortCounts:
        return CohortCounts(self.errors + other.errors, self.words + other.words, self.speakers + other.speakers)

    def __iter__(self) -> Iterator[np.ndarray]:
        """errors, words, speakers (in ``protocol.COHORT_EVAL_KEYS`` order)."""
        return iter((self.errors, self.words, self.speakers))


def cohort_error_vectors(cohort_id: int, errors: int, words: int, num_cohorts: int, *, speakers: int = 1) -> CohortCounts:
    """A device's evaluation counts as dense vectors: its counts at ``cohort_id``, zeros elsewhere.

    Args:
        cohort_id: the device's cohort, in [0, K).
        errors, words: its summed word errors and reference words (``ErrorCounts``).
        num_cohorts: K.
        speakers: speakers behind these counts (1 for a device).
    """
    if num_cohorts < 1:
        raise ValueError(f"num_cohorts must be positive, got {num_cohorts}")
    if not 0 <= cohort_id < num_cohorts:
        raise ValueError(f"cohort_id must lie in [0, {num_cohorts}), got {cohort_id}")
    if errors < 0 or words < 0 or speakers < 0:
        raise ValueError(f"counts must be >= 0, got errors={errors}, words={words}, speakers={speakers}")
    vectors = [np.zeros(num_cohorts) for _ in range(3)]
    for vector, value in zip(vectors, (errors, words, speakers), strict=True):
        vector[cohort_id] = value
    return CohortCounts(*vectors)


@dataclass(frozen=True)
class CohortReport:
    """Fairness summary of per-cohort word errors (see ``cohort_report`` for the definitions).

    Attributes:
        wer: (K,) per-cohort WER, NaN for a cohort with no words.
        words: (K,) reference words per cohort.
        speakers: (K,) speakers per cohort, or None when not given.
        eligible: cohorts with at least ``min_words`` words: the ones ranked.
        overall_wer: pooled WER of all cohorts together (sum of errors / sum of words).
        best_cohort, worst_cohort: eligible cohorts with the lowest and highest WER (lowest index on ties).
        best_wer, worst_wer: their WERs.
        wer_gap: (worst - best) / best.
        wer_variance: population variance of the eligible cohorts' WERs, each cohort weighted equally.
        bottom_cohort_share: share of all words that lie in the worst cohort.
        bottom_cohort_speaker_share: share of all speakers in the worst cohort (None without speakers).
        disadvantaged_share: share of all words in eligible cohorts with WER > (1 + margin) x overall WER.
        disadvantaged_speaker_share: the same in speakers (None without speakers).
    """

    wer: np.ndarray
    words: np.ndarray
    speakers: np.ndarray | None
    eligible: tuple[int, ...]
    overall_wer: float
    best_cohort: int
    worst_cohort: int
    best_wer: float
    worst_wer: float
    wer_gap: float
    wer_variance: float
    bottom_cohort_share: float
    bottom_cohort_speaker_share: float | None
    disadvantaged_share: float
    disadvantaged_speaker_share: float | None

    def metrics(self, prefix: str = "cohort-") -> dict[str, float]:
        """The scalar summaries as a flat dict (kebab-case keys), e.g. for a server-side metrics log."""
        values = {
            "overall-wer": self.overall_wer,
            "best-wer": self.best_wer,
            "worst-wer": self.worst_wer,
            "wer-gap": self.wer_gap,
            "wer-variance": self.wer_variance,
            "bottom-share": self.bottom_cohort_share,
            "disadvantaged-share": self.disadvantaged_share,
            "ranked": float(len(self.eligible)),
        }
        if self.bottom_cohort_speaker_share is not None and self.disadvantaged_speaker_share is not None:
            values["bottom-speaker-share"] = self.bottom_cohort_speaker_share
            values["disadvantaged-speaker-share"] = self.disadvantaged_speaker_share
        return {prefix + key: float(value) for key, value in values.items()}


def cohort_report(
    errors_per_cohort: np.ndarray,
    words_per_cohort: np.ndarray,
    *,
    speakers_per_cohort: np.ndarray | None = None,
    min_words: float = 1.0,
    margin: float = 0.1,
) -> CohortReport:
    """Per-cohort WER and the fairness summaries of one evaluation.

    Definitions (WER always pooled: a set's errors over its words, never a mean of utterance WERs):

    * **overall WER**: all cohorts' errors / all cohorts' words (equals the WER of all utterances together).
    * **ranked cohorts**: those with at least ``min_words`` words (a cohort of a handful of words has a WER
      too noisy to rank; the default 1 ranks every non-empty cohort). Best / worst = lowest / highest WER.
    * **WER gap** = (worst WER - best WER) / best WER: how much higher, relatively, the bottom cohort's WER is
      than the top cohort's. Dheram et al. report the gap between top and bottom cohorts as a relative WER
      difference; we take the top (best) cohort as the reference, the ASR convention for a relative WER change
      from a baseline, so a gap of 0.65 reads "the bottom cohort has 65% more errors per word than the top
      one". It is +inf when the best WER is 0 and the worst is not (0 when both are 0).
    * **bottom-cohort share**: the share of all words (and, given speakers, of all speakers) in the single
      worst cohort, Dheram et al.'s "how much of the population the bottom cohort covers". With many small
      cohorts this share shrinks by construction, so we also report
    * **disadvantaged share**: the share of words (speakers) in ranked cohorts whose WER exceeds the overall
      WER by more than ``margin`` (relative; default 10%): how much of the population is served clearly
      worse than average, independent of how finely cohorts are cut.
    * **WER variance**: population variance (ddof 0) of the ranked cohorts' WERs, each cohort weighted once.

    Args:
        errors_per_cohort: (K,) summed word errors.
        words_per_cohort: (K,) summed reference words.
        speakers_per_cohort: (K,) speakers per cohort, optional.
        min_words: words a cohort needs to be ranked (> 0).
        margin: relative excess over the overall WER that counts as disadvantaged (>= 0).

    Raises:
        ValueError: shapes differ, counts are negative, or no cohort has ``min_words`` words.
    """
    errors = np.asarray(errors_per_cohort, dtype=np.float64)
    words = np.asarray(words_per_cohort, dtype=np.float64)
    speakers = None if speakers_per_cohort is None else np.asarray(speakers_per_cohort, dtype=np.float64)
    if errors.ndim != 1 or words.shape != errors.shape or (speakers is not None and speakers.shape != errors.shape):
        raise ValueError(
            f"per-cohort vectors must be (K,) of one K, got errors {errors.shape}, words {words.shape}"
            + ("" if speakers is None else f", speakers {speakers.shape}")
        )
    if (errors < 0).any() or (words < 0).any() or (speakers is not None and (speakers < 0).any()):
        raise ValueError("per-cohort counts must be >= 0 (noisy sums must be post-processed before reporting)")
    if min_words <= 0 or margin < 0:
        raise ValueError(f"need min_words > 0 and margin >= 0, got min_words={min_words}, margin={margin}")
    eligible = np.flatnonzero(words >= min_words)
    if eligible.size == 0:
        raise ValueError(f"no cohort has min_words={min_words} words (words per cohort: {words.tolist()})")
    with np.errstate(divide="ignore", invalid="ignore"):
        wer = np.where(words > 0, errors / np.where(words > 0, words, 1.0), np.nan)
    overall = float(errors.sum() / words.sum())
    ranked = wer[eligible]
    best, worst = int(eligible[ranked.argmin()]), int(eligible[ranked.argmax()])
    best_wer, worst_wer = float(wer[best]), float(wer[worst])
    if best_wer > 0:
        gap = (worst_wer - best_wer) / best_wer
    else:
        gap = math.inf if worst_wer > 0 else 0.0
    disadvantaged = eligible[ranked > overall * (1.0 + margin)]
    total_speakers = float(speakers.sum()) if speakers is not None else 0.0

    def speaker_share(cohorts: np.ndarray) -> float | None:
        if speakers is None:
            return None
        return float(speakers[cohorts].sum() / total_speakers) if total_speakers > 0 else 0.0

    return CohortReport(
        wer=wer,
        words=words,
        speakers=speakers,
        eligible=tuple(int(k) for k in eligible),
        overall_wer=overall,
        best_cohort=best,
        worst_cohort=worst,
        best_wer=best_wer,
        worst_wer=worst_wer,
        wer_gap=gap,
        wer_variance=float(ranked.var()),
        bottom_cohort_share=float(words[worst] / words.sum()),
        bottom_cohort_speaker_share=speaker_share(np.array([worst])),
        disadvantaged_share=float(words[disadvantaged].sum() / words.sum()),
        disadvantaged_speaker_share=speaker_share(disadvantaged),
    )
