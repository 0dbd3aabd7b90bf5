"""Golden rankings, gains and objectives of every optimizer and method, and KMeans (tests/golden.py)."""

from __future__ import annotations

import pytest
import torch
from golden import (
    GREEDI_PICKS,
    K,
    assert_golden,
    assert_kmeans_golden,
    golden_blobs,
    golden_pool,
)

from mixray.algorithms.facility import Pool, greedi
from mixray.algorithms.kmeans import KMeans
from mixray.algorithms.qdit import QDITSelector, check_embeddings, evaluate_ranking, minmax

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool():
    return golden_pool()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("optimizer, budget_mb", [("lazy", 512), ("lazy", 0.0005), ("lazy", 0),
                                                  ("naive", 512)])
def test_exact_optimizers(pool, alpha, optimizer, budget_mb):
    """lazy (fully cached, partly cached, dense) and naive: the same literals."""
    x, q = pool
    sel = QDITSelector(K, alpha, optimizer=optimizer, memory_budget_mb=budget_mb).fit(x, q)
    assert_golden(f"lazy-{alpha}", sel.ranking_, sel.gains_, sel.objective_)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_stochastic(pool, alpha):
    x, q = pool
    sel = QDITSelector(K, alpha, optimizer="stochastic", epsilon=0.3, random_state=7).fit(x, q)
    assert_golden(f"stochastic-{alpha}", sel.ranking_, sel.gains_, sel.objective_)


@pytest.mark.parametrize("method, params", [("random", {"random_state": 3}), ("quality", {}),
                                            ("threshold", {"tau": 0.8}),
                                            ("cluster", {"n_clusters": 4, "random_state": 0})])
def test_methods(pool, method, params):
    x, q = pool
    sel = QDITSelector(K, 0.5, method=method, **params).fit(x, q)
    assert_golden(method, sel.ranking_, sel.gains_, sel.objective_)


def test_greedi(pool):
    x, q = pool
    xn, qn = check_embeddings(x), minmax(q)
    res, picks = greedi(Pool.build(xn, qn, torch.device("cpu")), xn, qn, K, 0.5, "lazy", 3, 0,
                        64 << 20, 0.01)
    assert [p.tolist() for p in picks] == GREEDI_PICKS
    assert_golden("greedi-3", res.ranking, res.gains,
                  evaluate_ranking(x, res.ranking, q, 0.5).objective)


@pytest.mark.parametrize("init", ["fixed", "k-means++", "random"])
def test_kmeans(init):
    X = golden_blobs()
    km = KMeans(5, init=X[:5].copy() if init == "fixed" else init, random_state=0).fit(X)
    assert_kmeans_golden(init, km)
