"""MDIT pure pieces: the mix planner's invariants, mixed vectors, nearest-to-centroid selection."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mixray.algorithms.mdit import mix_vectors, plan_mixes, select_nearest


def three_tasks(seed=0, n=(120, 300, 80)):
    rng = np.random.default_rng(seed)
    tasks = np.array(["alpaca"] * n[0] + ["gsm8k"] * n[1] + ["code"] * n[2], dtype=object)
    lengths = np.concatenate([rng.integers(5, 200, n[0]), rng.integers(30, 150, n[1]),
                              rng.integers(5, 100, n[2])])
    return tasks, lengths


def fields(plan):
    return {k: getattr(plan, k) for k in ("a", "b", "lam", "pair", "round", "bucket_a", "bucket_b")}


@pytest.mark.parametrize("T", [1, 2])
def test_plan_invariants(T):
    tasks, lengths = three_tasks()
    plan = plan_mixes(tasks, lengths, mixes_per_pair=T, bucket_width=16, seed=0)
    assert plan.pairs == [("alpaca", "code"), ("alpaca", "gsm8k"), ("code", "gsm8k")]
    # only cross-task pairs, and each mix belongs to its task pair in that orientation
    assert (tasks[plan.a] != tasks[plan.b]).all()
    for p, (ta, tb) in enumerate(plan.pairs):
        m = plan.pair == p
        assert (tasks[plan.a[m]] == ta).all() and (tasks[plan.b[m]] == tb).all()
        # every example in at most T mixes per partner task; no (a, b) pair twice
        assert max(Counter(plan.a[m].tolist()).values()) <= T
        assert max(Counter(plan.b[m].tolist()).values()) <= T
        assert len(set(zip(plan.a[m].tolist(), plan.b[m].tolist(), strict=True))) == m.sum()
        # unconstrained: each round matches every example of the smaller task
        assert m.sum() == T * min((tasks == ta).sum(), (tasks == tb).sum())
    assert ((plan.lam > 0) & (plan.lam < 1)).all()
    assert (plan.bucket_a == lengths[plan.a] // 16).all()
    assert set(plan.round.tolist()) == set(range(T))


def test_plan_is_deterministic_under_the_seed_and_pairs_are_independent():
    tasks, lengths = three_tasks()
    a = fields(plan_mixes(tasks, lengths, seed=5))
    b = fields(plan_mixes(tasks, lengths, seed=5))
    c = fields(plan_mixes(tasks, lengths, seed=6))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["lam"], c["lam"])
    one = plan_mixes(tasks, lengths, pairs=[("alpaca", "gsm8k")], seed=5)
    m = a["pair"] == 1  # ("alpaca", "gsm8k") in the all-pairs plan
    assert np.array_equal(one.a, a["a"][m]) and np.array_equal(one.lam, a["lam"][m])


def test_partners_come_from_the_same_bucket_when_one_is_free():
    # equal counts per bucket on both sides: every pair is within one bucket
    tasks = np.array(["x"] * 30 + ["y"] * 30, dtype=object)
    lengths = np.concatenate([np.repeat([3, 40, 90], 10), np.repeat([90, 3, 40], 10)])
    plan = plan_mixes(tasks, lengths, bucket_width=10, mixes_per_pair=1, seed=1)
    assert len(plan) == 30
    assert (plan.bucket_a == plan.bucket_b).all()


def test_same_bucket_matches_take_priority_over_nearer_cross_bucket_ones():
    # x0 (bucket 0) would grab y1 (bucket 1) if it came first; same-bucket pairs go first
    tasks = np.array(["x", "x", "y", "y"], dtype=object)
    lengths = np.array([1, 11, 12, 51])  # buckets: x 0, 1 | y 1, 5
    for seed in range(8):
        plan = plan_mixes(tasks, lengths, bucket_width=10, seed=seed)
        assert sorted(zip(plan.a.tolist(), plan.b.tolist(), strict=True)) == [(0, 3), (1, 2)]


def test_otherwise_from_the_nearest_bucket():
    # x: 2 examples in bucket 0; y: one in bucket 1, one in bucket 3, two in bucket 7
    tasks = np.array(["x", "x", "y", "y", "y", "y"], dtype=object)
    lengths = np.array([1, 2, 11, 31, 71, 72])
    plan = plan_mixes(tasks, lengths, bucket_width=10, seed=0)
    assert sorted(plan.bucket_b.tolist()) == [1, 3]
    # a second round takes the next nearest free partners (no pair repeats)
    plan = plan_mixes(tasks, lengths, bucket_width=10, mixes_per_pair=2, seed=0)
    assert sorted(plan.bucket_b[plan.round == 1].tolist()) == [1, 3]
    assert len(set(zip(plan.a.tolist(), plan.b.tolist(), strict=True))) == 4


def test_max_bucket_gap_limits_the_distance():
    tasks = np.array(["x", "x", "y", "y"], dtype=object)
    lengths = np.array([1, 55, 12, 90])  # buckets 0, 5 | 1, 9
    plan = plan_mixes(tasks, lengths, bucket_width=10, max_bucket_gap=1, seed=0)
    assert plan.a.tolist() == [0] and plan.b.tolist() == [2]
    assert (np.abs(plan.bucket_a - plan.bucket_b) <= 1).all()


def test_examples_longer_than_max_length_are_not_mixed():
    tasks, lengths = three_tasks()
    plan = plan_mixes(tasks, lengths, max_length=60, seed=0)
    assert (lengths[plan.a] <= 60).all() and (lengths[plan.b] <= 60).all()


def test_lambda_follows_beta_alpha_alpha():
    tasks = np.array(["x"] * 4000 + ["y"] * 4000, dtype=object)
    lengths = np.zeros(8000, dtype=int)
    for alpha in (8.0, 0.5):
        lam = plan_mixes(tasks, lengths, alpha=alpha, seed=0).lam
        assert lam.mean() == pytest.approx(0.5, abs=0.02)
        assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"pairs": [("alpaca", "math")]}, r"task 'math' is not in the data \(tasks: alpaca, code, gsm8k\)"),
        ({"pairs": [("code", "code")]}, "two different tasks"),
        ({"pairs": [("code", "gsm8k"), ("gsm8k", "code")]}, "listed twice"),
        ({"alpha": 0.0}, r"alpha must be > 0"),
        ({"alpha": -1.0}, r"alpha must be > 0"),
        ({"max_length": 20, "pairs": [("alpaca", "gsm8k")]},
         r"task 'gsm8k' has no examples in any usable bucket.*max_length=20"),
        ({"mixes_per_pair": 0}, "mixes_per_pair"),
        ({"bucket_width": 0}, "bucket_width"),
    ],
)
def test_bad_plan_inputs(kw, match):
    tasks, lengths = three_tasks()
    with pytest.raises(ValueError, match=match):
        plan_mixes(tasks, lengths, **kw)


def test_one_task_cannot_be_mixed():
    with pytest.raises(ValueError, match="different tasks.*1 task"):
        plan_mixes(np.array(["x", "x"], dtype=object), np.array([1, 2]))


def test_mix_vectors_arithmetic():
    V = np.array([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0], [0.0, 1.0, 1.0]], dtype=np.float32)
    a, b, lam = np.array([0, 1, 2]), np.array([1, 2, 0]), np.array([0.25, 1.0, 0.5])
    out = mix_vectors(V, a, b, lam, rows=2)  # two chunks
    expected = np.array([[2.5, 3.0, 0.5], [3.0, 4.0, 0.0], [0.5, 0.5, 1.5]], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    assert out.dtype == np.float32
    # symmetry: (a, b, λ) == (b, a, 1 − λ)
    np.testing.assert_allclose(mix_vectors(V, b, a, 1 - lam), out, atol=1e-6)


def test_select_nearest_hand_built():
    #            idx:  0    1    2    3    4    5    6    7
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    dist = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 0.5, 9.0, 0.7])
    chosen, within = select_nearest(labels, dist, budget=7, n_clusters=3)
    # quota 7 // 3 = 2 per cluster, round-robin by distance:
    #   round 0: 5 (0.5), 1 (1.0), 4 (4.0);  round 1: 7 (0.7), 2 (2.0), 3 (5.0)
    # fill 1 by global distance among the rest {0: 3.0, 6: 9.0}: 0
    assert chosen.tolist() == [5, 1, 4, 7, 2, 3, 0]
    assert within.tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_select_nearest_small_clusters_and_explicit_quota():
    labels = np.array([0, 1, 1, 1, 1])
    dist = np.array([1.0, 0.1, 0.2, 0.3, 0.4])
    # quota 2: cluster 0 has 1 point -> the budget is filled from the rest by distance
    chosen, _ = select_nearest(labels, dist, budget=4, n_clusters=2)
    assert chosen.tolist() == [1, 0, 2, 3]
    chosen, _ = select_nearest(labels, dist, budget=2, n_clusters=2, per_cluster=0)
    assert chosen.tolist() == [1, 2]  # purely global order
    with pytest.raises(ValueError, match="budget=6 must be between 1 and the pool size 5"):
        select_nearest(labels, dist, budget=6, n_clusters=2)
