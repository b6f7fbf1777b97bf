"""Federated k-means equals centralized Lloyd / scikit-learn; metadata cohorts and Trinh's tree partition."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from shared.fairness.cohorts import (
    assign,
    client_kmeans_stats,
    federated_kmeans,
    init_centroids,
    server_update,
    undersized_cluster,
)
from shared.metrics import ErrorCounts
from simulations.metadata_cohorts import attribute_cohorts, cohort_counts_by_speaker, tree_cohorts


def _blobs(seed: int = 0, per_blob: int = 40, centers: int = 4, dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(centers, dim))
    return np.concatenate([m + rng.normal(size=(per_blob, dim)) for m in means])


def _lloyd(points: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    """Centralized Lloyd iterations, written independently of the module (empty cluster keeps its centroid)."""
    for _ in range(iterations):
        distances = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
        labels = distances.argmin(1)
        centroids = np.stack(
            [points[labels == k].mean(0) if (labels == k).any() else centroids[k] for k in range(len(centroids))]
        )
    return centroids


def _split(points: np.ndarray, devices: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into ``devices`` parts, most of them holding a single embedding (one speaker)."""
    order = np.random.default_rng(seed).permutation(len(points))
    return [points[part] for part in np.array_split(order, devices)]


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_federated_kmeans_equals_centralized_lloyd_and_sklearn(iterations: int) -> None:
    points = _blobs()
    initial = init_centroids(points[::7], 4, seed=0)  # "public" subset seeds the centroids
    federated = federated_kmeans(_split(points, devices=120, seed=1), initial, iterations=iterations)
    np.testing.assert_allclose(federated, _lloyd(points, initial, iterations), rtol=1e-10, atol=1e-10)
    reference = KMeans(4, init=initial, n_init=1, max_iter=iterations, tol=0.0, algorithm="lloyd").fit(points)
    np.testing.assert_allclose(federated, reference.cluster_centers_, rtol=1e-8, atol=1e-8)


def test_a_cluster_under_the_floor_is_merged_into_its_neighbours() -> None:
    points = np.concatenate([_blobs(per_blob=20), _blobs(seed=5, per_blob=3, centers=1) + 9.0])  # 4 blobs and 3 strays
    initial = np.concatenate([init_centroids(points[:80:7], 4, seed=0), points[-1:]])  # one centroid on the strays
    plain = federated_kmeans(_split(points, devices=83, seed=1), initial, iterations=5)
    assert sorted(np.bincount(assign(points, plain), minlength=5).tolist())[0] == 3
    floored = federated_kmeans(_split(points, devices=83, seed=1), initial, iterations=5, min_devices=5)
    sizes = np.bincount(assign(points, floored), minlength=len(floored))
    assert len(floored) == 4 and sizes.min() >= 5 and sizes.sum() == 83
    # What merging does: the strays' centroid is dropped, then one Lloyd update re-centres the other four.
    expected = _lloyd(points, np.delete(plain, int(np.argmin(np.bincount(assign(points, plain), minlength=5))), 0), 1)
    np.testing.assert_allclose(floored, expected, atol=1e-10)
    # 0 keeps every cluster, an empty one too; the last cluster is never merged away.
    assert undersized_cluster(np.array([0.0, 9.0]), 0) is None and undersized_cluster(np.array([0.0, 9.0]), 1) == 0
    assert undersized_cluster(np.array([4.0, 4.0]), 5) == 0 and undersized_cluster(np.array([3.0]), 5) is None


def test_client_stats_are_dense_and_sum_to_the_central_stats() -> None:
    points = _blobs(seed=2)
    centroids = points[[0, 50, 100, 150]]
    one = client_kmeans_stats(points[3], centroids)  # a device with a single speaker embedding
    assert one.sums.shape == (4, 8) and one.counts.shape == (4,)
    assert one.counts.tolist() == [1.0, 0.0, 0.0, 0.0] and np.count_nonzero(one.sums[1:]) == 0
    parts = [client_kmeans_stats(part, centroids) for part in _split(points, devices=30, seed=0)]
    labels = assign(points, centroids)
    np.testing.assert_allclose(sum(p.sums for p in parts), np.stack([points[labels == k].sum(0) for k in range(4)]))
    np.testing.assert_array_equal(sum(p.counts for p in parts), np.bincount(labels, minlength=4))


def test_empty_cluster_keeps_its_centroid_and_noise_is_added() -> None:
    centroids = np.array([[0.0, 0.0], [100.0, 100.0]])
    stats = client_kmeans_stats(np.array([[1.0, 1.0], [3.0, 1.0]]), centroids)
    np.testing.assert_allclose(server_update(centroids, stats.sums, stats.counts), [[2.0, 1.0], [100.0, 100.0]])
    noisy = client_kmeans_stats(np.array([[1.0, 1.0]]), centroids, noise_std=0.1, rng=np.random.default_rng(0))
    assert np.count_nonzero(noisy.sums) == 4 and not np.allclose(noisy.counts, [1.0, 0.0])
    with pytest.raises(ValueError, match="needs an rng"):
        client_kmeans_stats(np.array([[1.0, 1.0]]), centroids, noise_std=0.1)
    with pytest.raises(ValueError, match=r"embeddings must be a 2-D array \(rows, 2\), got shape \(1, 3\)"):
        assign(np.ones((1, 3)), centroids)
    with pytest.raises(ValueError, match=r"num_clusters must lie in \[1, 2\]"):
        init_centroids(centroids, 3)


def test_attribute_cohorts_cross_the_chosen_columns() -> None:
    attributes = {
        "a": {"gender": "f", "accent": "x"},
        "b": {"gender": "m", "accent": "x"},
        "c": {"gender": "f", "accent": "y"},
        "d": {"gender": "f", "accent": "x"},
    }
    cohorts = attribute_cohorts(attributes, ["accent", "gender"])
    assert cohorts.names == ("accent=x, gender=f", "accent=x, gender=m", "accent=y, gender=f")
    assert cohorts.assignment == {"a": 0, "b": 1, "c": 2, "d": 0}
    with pytest.raises(ValueError, match=r"columns \['age'\] are not available"):
        attribute_cohorts(attributes, ["age"])


def _planted_population() -> tuple[dict[str, dict[str, str]], dict[str, ErrorCounts], dict[str, str]]:
    """48 speakers; accent c is bad (WER 0.4), other accents' women are middling (0.25), everyone else 0.1."""
    rng = np.random.default_rng(0)
    attributes, counts, truth = {}, {}, {}
    for i in range(48):
        accent, gender = "abcd"[i % 4], "fm"[(i // 4) % 2]
        speaker = f"s{i:02d}"
        attributes[speaker] = {"accent": accent, "gender": gender, "snr_db": f"{rng.uniform(5, 30):.1f}"}
        words = int(rng.integers(20, 200))
        if accent == "c":
            wer, truth[speaker] = 0.4, "bad"
        elif gender == "f":
            wer, truth[speaker] = 0.25, "middling"
        else:
            wer, truth[speaker] = 0.1, "good"
        counts[speaker] = ErrorCounts(errors=round(wer * words), words=words, utterances=10)
    return attributes, counts, truth


def test_tree_cohorts_recover_a_planted_partition() -> None:
    attributes, counts, truth = _planted_population()
    cohorts = tree_cohorts(attributes, counts, max_cohorts=3, min_speakers=2)
    assert len(cohorts) == 3
    assert cohorts.names[0] == "accent=c"  # cohort 0 is the worst leaf
    groups = {label: {cohorts.assignment[s] for s, t in truth.items() if t == label} for label in set(truth.values())}
    assert groups == {"bad": {0}, "middling": {1}, "good": {2}}
    assert cohorts.names[1:] == ("accent!=c & gender=f", "accent!=c & gender!=f")
    # A leaf's pooled WER is what the tree predicts: summing the devices' vectors gives the planted WERs.
    pooled = cohort_counts_by_speaker(cohorts, counts)
    np.testing.assert_allclose(pooled.errors / pooled.words, [0.4, 0.25, 0.1], atol=0.01)
    assert pooled.speakers.tolist() == [12.0, 18.0, 18.0]


def test_tree_cohorts_split_numeric_columns_by_threshold() -> None:
    attributes, counts, _ = _planted_population()
    noisy = {
        s: ErrorCounts(round((0.5 if float(attributes[s]["snr_db"]) < 12 else 0.1) * c.words), c.words, 1)
        for s, c in counts.items()
    }
    cohorts = tree_cohorts(attributes, noisy, columns=["snr_db", "gender"], max_cohorts=2)
    assert cohorts.names[0].startswith("snr_db<=") and cohorts.names[1].startswith("snr_db>")
    low = {s for s in attributes if float(attributes[s]["snr_db"]) < 12}
    assert {s for s, k in cohorts.assignment.items() if k == 0} == low
    with pytest.raises(ValueError, match=r"speakers \['zz'\] have error counts but no attributes"):
        tree_cohorts(attributes, {**counts, "zz": ErrorCounts(1, 2, 1)})
