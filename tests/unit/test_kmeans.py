"""Pure KMeans: kernels against naive references, the facade against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SKKMeans

from mixray.algorithms.kmeans import (
    KMeans,
    LocalShards,
    as_matrix,
    assign,
    assign_two,
    farthest,
    inertia,
    kmeans_plusplus,
    partial_sums,
    relocate_empty,
    run_lloyd,
    update_centres,
)
from mixray.distributed.kmeans import KMeansShard, split_rows
from mixray.errors import ClusteringInputError


def blobs(n=1500, d=8, k=6, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(k, d))
    X = centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    return (X + 20.0).astype(dtype)  # an offset: the fit centres the data internally


def sk_fit(X, C0, **kw):
    return SKKMeans(len(C0), init=C0, n_init=1, algorithm="lloyd", **kw).fit(X)


def test_assign_matches_brute_force_with_centre_blocks():
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.normal(size=(300, 5)))
    C = torch.from_numpy(rng.normal(size=(70, 5)))
    naive = ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    for block in (4096, 16, 7):
        labels, min_sq = assign(X, C, centre_block=block)
        assert torch.equal(labels, naive.argmin(1))
        assert torch.allclose(min_sq, naive.min(1).values, atol=1e-10)


def test_partial_sums_of_shards_add_up():
    rng = np.random.default_rng(2)
    X = torch.from_numpy(rng.normal(size=(200, 4)))
    labels = torch.from_numpy(rng.integers(0, 5, size=200))
    s, c = partial_sums(X, labels, 5)
    s1, c1 = partial_sums(X[:80], labels[:80], 5)
    s2, c2 = partial_sums(X[80:], labels[80:], 5)
    assert torch.allclose(s, s1 + s2) and torch.equal(c, c1 + c2)
    for j in range(5):
        assert torch.allclose(s[j], X[labels == j].sum(0))
    assert int(c.sum()) == 200


def test_update_centres_keeps_an_empty_clusters_old_centre():
    sums = torch.tensor([[2.0, 4.0], [0.0, 0.0]])
    counts = torch.tensor([2, 0])
    old = torch.tensor([[9.0, 9.0], [5.0, 6.0]])
    assert torch.equal(update_centres(sums, counts, old), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))


def test_relocate_empty_moves_the_farthest_point():
    X = torch.tensor([[0.0], [1.0], [10.0], [2.0]])
    labels = torch.tensor([0, 0, 0, 1])
    min_sq = torch.tensor([9.0, 4.0, 49.0, 0.0])  # point 2 is farthest from its centre
    sums, counts = partial_sums(X, labels, 3)  # cluster 2 is empty
    idx = farthest(min_sq, 1)
    assert idx.tolist() == [2]
    moved = relocate_empty(sums, counts, X[idx], labels[idx])
    assert moved.tolist() == [2]
    assert counts.tolist() == [2, 1, 1]
    assert sums[:, 0].tolist() == [1.0, 2.0, 10.0]


def test_farthest_breaks_ties_by_lower_index():
    assert farthest(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 4).tolist() == [1, 2, 4, 3]


def test_inertia_is_the_sum_of_squared_residuals():
    X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0]])
    C = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    assert inertia(X, C, torch.tensor([0, 0, 1]), rows=2) == pytest.approx(3.0)


@pytest.mark.parametrize("block", [4096, 4])
def test_fit_matches_sklearn_lloyd_with_the_same_initial_centres(block):
    X = blobs()
    C0 = X[np.random.default_rng(3).choice(len(X), 12, replace=False)]
    ref = sk_fit(X, C0, max_iter=300, tol=1e-4)
    km = KMeans(12, init=C0, max_iter=300, tol=1e-4, centre_block=block).fit(X)
    np.testing.assert_array_equal(km.labels_, ref.labels_)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)
    assert km.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-9)
    np.testing.assert_array_equal(km.predict(X), ref.labels_)
    np.testing.assert_allclose(km.transform(X[:50]), ref.transform(X[:50]), atol=1e-6)
    own = km.transform(X)[np.arange(len(X)), km.labels_]
    np.testing.assert_allclose(km.distances_, own, atol=1e-6)


@pytest.mark.parametrize("block", [7, 4096])
def test_assign_two_gives_the_two_nearest(block):
    rng = np.random.default_rng(2)
    X = torch.from_numpy(rng.normal(size=(300, 5)))
    C = torch.from_numpy(rng.normal(size=(40, 5)))
    naive = ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1).sort(1)
    labels, m1, m2 = assign_two(X, C, centre_block=block)
    assert torch.equal(labels, naive.indices[:, 0])
    assert torch.allclose(m1, naive.values[:, 0], atol=1e-10)
    assert torch.allclose(m2, naive.values[:, 1], atol=1e-10)
    assert torch.isinf(assign_two(X, C[:1])[2]).all()  # one centre: no second


@pytest.mark.parametrize("dtype,workers,screen", [(torch.float64, 1, False), (torch.float32, 3, False),
                                                  (torch.float32, 3, True)])
def test_pruned_lloyd_is_plain_lloyd(dtype, workers, screen):
    """The Hamerly bounds (and the int8 screen) skip most distance computations and change
    nothing: the same labels at every step, the same centres, iterations and inertia."""
    rng = np.random.default_rng(3)
    X = torch.from_numpy(blobs(n=6000, d=16, k=30, seed=3)).to(dtype)
    X = X - X.mean(0)
    C0 = X[torch.from_numpy(rng.choice(len(X), 30, replace=False))].clone()
    pruned = LocalShards(X, workers=workers, screen=screen)
    plain = LocalShards(X, workers=workers, prune=False)
    assert pruned.screen == screen
    C_p, C_f = C0.clone(), C0.clone()
    for _ in range(6):  # step by step: identical labels and sums after every E-step
        s_p, n_p, ch_p = pruned.step(C_p)
        s_f, n_f, ch_f = plain.step(C_f)
        assert torch.equal(pruned.labels, plain.labels) and torch.equal(n_p, n_f) and ch_p == ch_f
        assert torch.equal(s_p, s_f)
        C_p, C_f = update_centres(s_p, n_p, C_p), update_centres(s_f, n_f, C_f)
    assert pruned.skipped > 2 * len(X) and plain.skipped == 0
    assert (pruned.screened > len(X)) == screen and plain.screened == 0
    torch.testing.assert_close(pruned.min_sq, plain.min_sq, rtol=1e-4, atol=1e-3)
    a = run_lloyd(LocalShards(X, workers=workers, screen=screen), C0.clone(), max_iter=100, tol=0.0)
    b = run_lloyd(LocalShards(X, workers=workers, prune=False), C0.clone(), max_iter=100, tol=0.0)
    assert (a.n_iter, a.converged) == (b.n_iter, b.converged) and torch.equal(a.centres, b.centres)
    assert a.inertia == pytest.approx(b.inertia, rel=1e-6)
    assert a.inertia == pytest.approx(inertia(X, a.centres, assign(X, a.centres)[0]), rel=1e-9)


def spread_blobs(n, d, k, spread, seed):
    """float32 points around ``k`` Gaussian centres of scale ``spread`` (as the KMeans benchmark
    draws them: 10 separates the clusters, 2 overlaps them), centred, and ``k`` rows as init."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * spread
    X = torch.from_numpy(centres[rng.integers(k, size=n)] + rng.standard_normal((n, d)).astype(np.float32))
    X = X - X.mean(0)
    return X, X[torch.from_numpy(rng.choice(n, size=k, replace=False))].clone()


@pytest.mark.parametrize("spread,workers", [(2.0, 1), (10.0, 2)])
def test_int8_screen_gives_the_float32_labels_and_valid_bounds(spread, workers):
    """Step by step, the screened E-step's labels, counts and sums are the float32 E-step's;
    its Hamerly bounds hold: ``upper`` at least the distance to the own centre, ``lower`` at
    most the distance to the second nearest (float64 distances), up to the float32 E-step's
    error allowance ``τ`` (the rows left to it have its rounding)."""
    X, C = spread_blobs(4000, 96, 60, spread, seed=11)
    screened = LocalShards(X, workers=workers, screen=True)
    plain = LocalShards(X, workers=workers, prune=False)
    for _ in range(4):
        s_s, n_s, ch_s = screened.step(C)
        s_p, n_p, ch_p = plain.step(C)
        assert torch.equal(screened.labels, plain.labels) and torch.equal(n_s, n_p) and ch_s == ch_p
        assert torch.equal(s_s, s_p)
        D = (X.double()[:, None] - C.double()[None]).pow(2).sum(-1).sqrt()
        two = D.topk(2, dim=1, largest=False).values ** 2
        tau = (X.double().pow(2).sum(1) + C.double().pow(2).sum(1).max()) * screened._tau_coef
        assert (screened.upper.double() ** 2 >= D.gather(1, screened.labels[:, None])[:, 0] ** 2 - tau).all()
        assert (screened.lower.double() ** 2 <= two[:, 1] + tau).all()
        C = update_centres(s_s, n_s, C)
    assert screened.screened > 0 and plain.screened == 0


def test_int8_screen_leaves_near_ties_to_float32():
    """Two identical centres tie for every point near them: the screen cannot certify
    either, the float32 E-step decides (the lower index, as ``assign``), and one centre
    (k = 1) is certified everywhere with an infinite lower bound."""
    X, C = spread_blobs(2000, 32, 20, 10.0, seed=12)
    C[5] = C[4]
    screened = LocalShards(X, workers=1, screen=True)
    screened.step(C)
    assert torch.equal(screened.labels, assign(X, C)[0]) and not (screened.labels == 5).any()
    assert screened.rechecked >= int((screened.labels == 4).sum()) > 0
    one = LocalShards(X, workers=1, screen=True)
    one.step(C[:1])
    assert (one.labels == 0).all() and one.rechecked == 0 and torch.isinf(one.lower).all()


def test_threaded_shard_equals_one_thread():
    X = torch.from_numpy(blobs(n=3000, seed=12))
    C = X[:40].clone()
    threads = torch.get_num_threads()
    one, two = LocalShards(X, workers=1), LocalShards(X, workers=3)
    s1, c1, ch1 = one.step(C)
    s2, c2, ch2 = two.step(C)
    assert torch.equal(one.labels, two.labels) and torch.equal(c1, c2) and ch1 == ch2 == 3000
    assert torch.allclose(s1, s2, rtol=1e-12, atol=1e-9)
    assert torch.get_num_threads() == threads  # the workers' single-thread setting is undone


def test_float32_matches_sklearn_float32():
    X = blobs(dtype=np.float32, seed=5)
    C0 = X[:10].copy()
    ref = sk_fit(X, C0, max_iter=100, tol=1e-4)
    km = KMeans(10, init=C0, max_iter=100, tol=1e-4).fit(X)
    assert km.cluster_centers_.dtype == np.float32
    assert (km.labels_ == ref.labels_).mean() > 0.999
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-5)
    exact = inertia(torch.from_numpy(X).double(), torch.from_numpy(km.cluster_centers_).double(),
                    torch.from_numpy(km.labels_))
    assert km.inertia_ == pytest.approx(exact, rel=1e-6)


def test_empty_cluster_is_reseeded_like_sklearn():
    X = blobs(n=600, d=4, k=4, seed=7)
    C0 = X[:5].copy()
    C0[4] = 1e3  # no point is ever nearest to it: empty after the first assignment
    ref = sk_fit(X, C0, max_iter=300, tol=1e-4)
    km = KMeans(5, init=C0).fit(X)
    assert km.n_relocated_ >= 1
    np.testing.assert_array_equal(km.labels_, ref.labels_)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)
    assert np.bincount(km.labels_, minlength=5).min() > 0
    assert np.abs(km.cluster_centers_).max() < 1e2  # the far centre was moved into the data


def test_stops_at_max_iter_or_when_no_label_changes():
    X = blobs(n=400, seed=9)
    km = KMeans(6, init="random", max_iter=1, random_state=0).fit(X)
    assert km.n_iter_ == 1 and km.converged_ == "max_iter"
    km = KMeans(6, init="k-means++", max_iter=500, tol=0.0, random_state=0).fit(X)
    assert km.converged_ == "strict"
    np.testing.assert_array_equal(km.predict(X), km.labels_)


def test_kmeans_plusplus_picks_one_point_per_well_separated_blob():
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    X = torch.from_numpy(np.repeat(centres, 50, axis=0) + rng.normal(scale=0.1, size=(200, 2)))
    idx = kmeans_plusplus(X, 4, np.random.default_rng(0))
    assert sorted((idx // 50).tolist()) == [0, 1, 2, 3]
    # weights: a point of weight 0 is never drawn
    w = torch.ones(200, dtype=torch.float64)
    w[:50] = 0
    idx = kmeans_plusplus(X, 3, np.random.default_rng(1), weights=w)
    assert sorted((idx // 50).tolist()) == [1, 2, 3]


def test_kmeans_plusplus_with_duplicate_points_still_returns_k_distinct_rows():
    X = torch.zeros((10, 3), dtype=torch.float64)
    X[0] = 1.0
    idx = kmeans_plusplus(X, 4, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 4


def test_seeded_inits_are_reproducible():
    X = blobs(n=500, seed=11)
    a = KMeans(5, init="k-means++", random_state=3).fit(X)
    b = KMeans(5, init="k-means++", random_state=3).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


@pytest.mark.parametrize(
    ("X", "kw", "match"),
    [
        (np.zeros((5, 2)), {"n_clusters": 6}, r"n_clusters=6 > number of points 5"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), {"n_clusters": 1}, "NaN or infinite"),
        (np.zeros(5), {"n_clusters": 1}, "must be 2-D"),
        (np.array([["a", "b"]]), {"n_clusters": 1}, "must be numeric"),
        (np.zeros((5, 2)), {"n_clusters": 2, "init": np.zeros((3, 2))}, r"init has shape \(3, 2\)"),
        (np.zeros((5, 2)), {"n_clusters": 2, "init": "kmeans"}, "allowed: k-means"),
        (np.zeros((5, 2)), {"n_clusters": 0}, r"n_clusters must be >= 1, got n_clusters=0"),
        (np.zeros((5, 2)), {"n_clusters": 2, "max_iter": 0}, "max_iter"),
    ],
)
def test_bad_input_is_rejected_at_the_boundary(X, kw, match):
    with pytest.raises(ClusteringInputError, match=match) as e:
        KMeans(**kw).fit(X)
    assert isinstance(e.value, ValueError)  # one family, and still the built-in


def test_large_finite_values_pass_the_fast_finiteness_check():
    X = np.full((3, 2), 3e38, dtype=np.float32)  # the float32 sum overflows; the values are fine
    assert as_matrix(X).shape == (3, 2)
    X[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        as_matrix(X)


def test_predict_checks_the_width():
    km = KMeans(2, init="random").fit(blobs(n=50, d=3))
    with pytest.raises(ValueError, match="3"):
        km.predict(np.zeros((2, 4)))


def test_shard_kernel_without_ray():
    """The Ray actor body is plain Python: k-means|| sampling keeps points with p = min(1, ℓ·D²/φ)."""
    X = np.array([[0.0], [1.0], [10.0]])
    shard = KMeansShard(0)
    assert shard.load(X, "float64")[0] == 3
    shard.centre(np.zeros(1), offset=100)
    phi = shard.init_cost(np.array([[0.0]]), reset=True)
    assert phi == pytest.approx(101.0)
    idx, pts = shard.sample(ell=1000.0, phi=phi, seed=0, round_=0)
    assert idx.tolist() == [101, 102]  # D(x)=0 is never sampled; global row indices
    assert shard.sample(ell=1000.0, phi=phi, seed=0, round_=1)[0].tolist() == []  # nor twice
    assert shard.candidate_counts(np.array([[0.0], [10.0]])).tolist() == [2, 1]


def test_split_rows_covers_every_row_once():
    assert split_rows(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert split_rows(2, 2) == [(0, 1), (1, 2)]


def test_sklearn_estimator_protocol():
    """clone/get_params/set_params; fit leaves the parameters as given."""
    from sklearn.base import clone

    X = blobs(n=300, seed=13)
    km = KMeans(np.int64(4), init="random", tol=0, random_state=2)
    params = km.get_params()
    km.fit(X)
    assert all(km.get_params()[k] is v for k, v in params.items())
    twin = clone(km).set_params(random_state=2)
    np.testing.assert_array_equal(twin.fit(X).labels_, km.labels_)
    assert "random_state" in params and "seed" not in params


def test_inits_come_from_the_one_list_of_choices():
    from mixray import choices
    from mixray.distributed.kmeans import DistributedKMeans

    with pytest.raises(ClusteringInputError, match=r"allowed: k-means\+\+, random or an array"):
        KMeans(2, init="k-means||").fit(np.zeros((5, 2)))
    assert choices.KMEANS_INITS == ("k-means++", "random")
    assert "k-means||" in choices.DISTRIBUTED_KMEANS_INITS
    assert DistributedKMeans().get_params()["init"] in choices.DISTRIBUTED_KMEANS_INITS
