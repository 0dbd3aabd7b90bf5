"""Distributed KMeans (2 Ray actors) equals the single-process KMeans."""

from __future__ import annotations

import numpy as np
import pytest

from mixray.algorithms.kmeans import KMeans
from mixray.distributed.kmeans import DistributedKMeans, split_rows


def blobs(n=3000, d=8, k=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(k, d))
    return centres[rng.integers(k, size=n)] + rng.normal(size=(n, d)) + 3.0


def test_two_actors_equal_single_process_with_the_same_initial_centres(ray_session):
    X = blobs()
    C0 = X[np.random.default_rng(1).choice(len(X), 16, replace=False)].copy()
    C0[15] = 500.0  # an empty cluster: exercises the distributed farthest-point re-seeding
    single = KMeans(16, init=C0, tol=1e-4).fit(X)
    dist = DistributedKMeans(16, concurrency=2, init=C0, tol=1e-4).fit(X)
    assert single.n_relocated_ >= 1 and dist.n_relocated_ == single.n_relocated_
    np.testing.assert_array_equal(dist.labels_, single.labels_)
    assert dist.n_iter_ == single.n_iter_
    assert dist.inertia_ == pytest.approx(single.inertia_, rel=1e-9)
    np.testing.assert_allclose(dist.cluster_centers_, single.cluster_centers_, atol=1e-9)
    np.testing.assert_allclose(dist.distances_, single.distances_, atol=1e-9)
    # one broadcast of the centres per Lloyd iteration
    assert dist.broadcasts_ == dist.n_iter_
    np.testing.assert_array_equal(dist.predict(X[:100]), single.labels_[:100])


def test_random_init_picks_the_same_points_and_k_means_parallel_is_sound(ray_session):
    X = blobs(n=2000, seed=2)
    single = KMeans(8, init="random", random_state=4).fit(X)
    dist = DistributedKMeans(8, concurrency=2, init="random", random_state=4).fit(X)
    np.testing.assert_array_equal(dist.labels_, single.labels_)
    # k-means|| over shards given ObjectRefs: every cluster used, as good as k-means++
    refs = [ray_session.put(X[a:b]) for a, b in split_rows(len(X), 2)]
    par = DistributedKMeans(8, concurrency=2, init="k-means||", random_state=0).fit(refs)
    pp = KMeans(8, init="k-means++", random_state=0).fit(X)
    assert par.labels_.shape == (2000,) and np.bincount(par.labels_, minlength=8).min() > 0
    assert par.inertia_ <= 1.1 * pp.inertia_
    assert par.cluster_centers_.dtype == np.float32  # shards given as refs: float32 by default


def test_bad_shards_are_reported(ray_session):
    X = blobs(n=100)
    X[70, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DistributedKMeans(4, concurrency=2, init="random").fit([X[:50], X[50:]])
    with pytest.raises(ValueError, match=r"n_clusters=101 > number of points 100"):
        DistributedKMeans(101, concurrency=2).fit(blobs(n=100))
    with pytest.raises(ValueError, match="allowed: k-means"):
        DistributedKMeans(4, init="kmeans").fit(blobs(n=100))

