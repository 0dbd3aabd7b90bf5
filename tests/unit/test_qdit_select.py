"""QDIT selection (mixray.algorithms.facility / qdit): golden tests on real embeddings.

The embeddings are 480 real instructions (ShareGPT first turns, HumanEval prompts, GSM8K
questions from the data-carrying packages, tests/packaged_data.py) embedded with the offline all-MiniLM-L6-v2 and committed as
tests/data/qdit_minilm.npz (regenerate with tests/data/make_qdit_embeddings.py);
the stand-in quality is log(length of the reference answer).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mixray.algorithms import facility as fl
from mixray.algorithms.facility import Pool, greedi, local_shards
from mixray.algorithms.facility import kernels as fk
from mixray.algorithms.qdit import (
    QDITSelector,
    check_embeddings,
    evaluate_ranking,
    minmax,
    quality_order,
    select_cluster,
    select_threshold,
)
from mixray.errors import SelectionInputError

DATA = Path(__file__).resolve().parents[1] / "data" / "qdit_minilm.npz"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def real() -> tuple[np.ndarray, np.ndarray]:
    z = np.load(DATA)
    x = z["embeddings"].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.log1p(z["output_chars"].astype(np.float64))


def _pool(x: np.ndarray, q: np.ndarray | None = None) -> Pool:
    """The pool exactly as the facade prepares it (same normalisation bits)."""
    return Pool.build(check_embeddings(x), minmax(q) if q is not None else np.zeros(len(x)),
                      torch.device("cpu"))


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.ranking_, b.ranking_)
    np.testing.assert_array_equal(a.gains_, b.gains_)
    np.testing.assert_array_equal(a.scores_, b.scores_)


# -- kernels --------------------------------------------------------------------------------------


def test_gains_match_float64_reference(real):
    """Quantised exact sums equal Σ max(0, sim − cur) computed naively in float64."""
    x, _ = real
    pool = _pool(x)
    rng = np.random.default_rng(0)
    cur = np.maximum(0, x[rng.choice(len(x), 3)] @ x.T).max(0)  # running max of 3 picks
    cur_s = torch.from_numpy(np.floor(cur * 2.0 ** fl.SCALE_EXP).astype(np.float32))
    got = fl.dense_gains(pool.xs[:50], pool.xs, cur_s).numpy() * fl.UNIT
    ref = np.maximum(0, x[:50].astype(np.float64) @ x.T.astype(np.float64) - cur).sum(1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_gains_do_not_depend_on_blocking(real, monkeypatch):
    x, _ = real
    pool = _pool(x)
    cur = torch.zeros(len(x))
    a = fl.dense_gains(pool.xs, pool.xs, cur)
    monkeypatch.setattr(fk, "ROW_BLOCK", 48)
    monkeypatch.setattr(fk, "COL_BLOCK", 100)
    b = fl.dense_gains(pool.xs[torch.arange(len(x) - 1, -1, -1)], pool.xs, cur).flip(0)
    assert torch.equal(a, b)


# -- exactness: naive == lazy (every cache regime) == in-process shards ----------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_naive_equals_lazy_bit_for_bit(real, alpha):
    x, q = real
    naive = QDITSelector(60, alpha, optimizer="naive").fit(x, q)
    pool = _pool(x, q)
    assert fl.dense_bytes(len(x), len(x)) <= 64 << 20  # 64 MB: the dense shard
    for budget_mb in (0, 0.25, 64):  # no cache, partly cached, the whole matrix (DenseShard)
        _same(naive, QDITSelector(60, alpha, memory_budget_mb=budget_mb).fit(x, q))
    cached = fl.LocalShards([fl.ColumnShard(pool.xs, None, 64 << 20)])  # matrix-free, fully cached
    _same(naive, QDITSelector(60, alpha).fit(x, q, shards=cached))
    for budget in (int(0.25 * (1 << 20)), 64 << 20):  # the sharded greedy in-process, both kinds
        three = local_shards(pool, 3, budget)
        kinds = {type(s) for s in three.shards}
        assert kinds == ({fl.DenseShard} if budget == 64 << 20 else {fl.ColumnShard})
        _same(naive, QDITSelector(60, alpha).fit(x, q, shards=three))
    assert naive.objective_ == pytest.approx(
        (1 - alpha) * naive.diversity_ + alpha * naive.quality_mean_)


def test_compact_uncovered_copy_is_bit_exact(real):
    """Late and stochastic steps evaluate over a compact copy of the uncovered columns,
    gathered again as they shrink: the same bits as the naive greedy and the dense shard."""
    x, q = real
    naive = QDITSelector(120, 0.3, optimizer="naive").fit(x, q)
    lazy = QDITSelector(120, 0.3, memory_budget_mb=0.25).fit(x, q)
    assert lazy.stats_["view_gathers"] >= 3
    _same(naive, lazy)
    stochastic = {"optimizer": "stochastic", "random_state": 1}
    st = QDITSelector(120, 0.3, memory_budget_mb=0.25, **stochastic).fit(x, q)
    assert st.stats_["view_gathers"] >= 3
    dense = QDITSelector(120, 0.3, memory_budget_mb=64, **stochastic).fit(x, q)
    assert "view_gathers" not in dense.stats_  # the whole matrix: no columns to gather
    _same(dense, st)


@pytest.mark.parametrize("short_size", [1, 16])
def test_lazy_with_a_tiny_shortlist_equals_naive(real, short_size):
    """The O(shortlist) rounds (rebuilt whenever the outside bound may win) change nothing."""
    x, q = real
    pool = _pool(x[:300], q[:300])
    ref = fl.naive_greedy(pool.xs, pool.q, 0.5, 40)
    theta = fl.choose_threshold(pool.xs, pool.xs, 300, (1 << 20) // 8)
    shards = fl.LocalShards([fl.ColumnShard(pool.xs, None, 1 << 20)])
    res = fl.lazy_greedy(shards, pool.q, 0.5, 40, n_pool=300, theta=theta, short_size=short_size)
    np.testing.assert_array_equal(res.ranking, ref.ranking)
    np.testing.assert_array_equal(res.gains, ref.gains)
    qt = torch.round(pool.q * 4) / 4  # heavy ties in f: the lower index must still win
    ref = fl.naive_greedy(pool.xs, qt, 0.9, 40)
    shards = fl.LocalShards([fl.ColumnShard(pool.xs, None, 1 << 20)])
    res = fl.lazy_greedy(shards, qt, 0.9, 40, n_pool=300, theta=theta, short_size=short_size)
    np.testing.assert_array_equal(res.ranking, ref.ranking)


def test_ties_broken_by_lower_index(real):
    """Duplicated points have identical gains; greedy must take the lower index, like naive."""
    x, q = real
    xd = np.concatenate([x[:200], x[:200]])  # point i and i + 200 are identical
    qd = np.concatenate([q[:200], q[:200]])
    for alpha in (0.0, 0.5):
        lazy = QDITSelector(30, alpha).fit(xd, qd)
        _same(QDITSelector(30, alpha, optimizer="naive").fit(xd, qd), lazy)
        pos = {int(a): t for t, a in enumerate(lazy.ranking_)}
        for a, t in pos.items():
            if a >= 200:  # a twin may be taken (for its quality) only after the lower index
                assert pos.get(a - 200, t) < t
        if alpha == 0.0:
            assert (lazy.ranking_ < 200).all(), "a twin adds no diversity"


def test_greedy_reports_gains_and_objective(real):
    x, q = real
    sel = QDITSelector(40, 0.5).fit(x, q)
    ev = evaluate_ranking(x, sel.ranking_, q, 0.5)
    np.testing.assert_allclose(ev.gains, sel.gains_, rtol=1e-6)
    np.testing.assert_allclose(ev.scores, sel.scores_, rtol=1e-6)
    assert ev.objective == pytest.approx(sel.objective_, rel=1e-9)
    div = QDITSelector(40, 0.0).fit(x)
    assert np.all(np.diff(div.gains_) <= 1e-6), "pure facility-location gains are non-increasing"
    cos = x.astype(np.float64) @ x[div.ranking_].T.astype(np.float64)
    assert div.diversity_ == pytest.approx(np.maximum(0, cos.max(1)).mean(), rel=1e-6)


# -- approximation guarantee vs brute force -------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_greedy_within_1_minus_1_over_e_of_optimum(real, alpha):
    """N = 12 real points (4 per source), K = 4: greedy ≥ (1 − 1/e)·OPT of F(A) = (1−α)d(A)/N + αΣq."""
    x_all, q_all = real
    idx = np.r_[0:4, 160:164, 320:324]
    x = x_all[idx].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = minmax(q_all[idx])
    n, k = len(idx), 4
    sim = np.maximum(0, x @ x.T)

    def objective(subset) -> float:
        s = list(subset)
        return (1 - alpha) * sim[:, s].max(1).sum() / n + alpha * q[s].sum()

    opt = max(objective(c) for c in itertools.combinations(range(n), k))
    sel = QDITSelector(k, alpha).fit(x_all[idx], q_all[idx])
    _same(sel, QDITSelector(k, alpha, optimizer="naive").fit(x_all[idx], q_all[idx]))
    got = objective(sel.ranking_)
    assert got >= (1 - 1 / math.e) * opt
    assert got <= opt + 1e-9
    # the greedy scores f are exactly the increments of F
    assert sum(sel.scores_) == pytest.approx(got, rel=1e-6)


# -- alpha = 1, stochastic, resume, GreeDi ---------------------------------------------------------


def test_alpha_one_is_top_k_by_quality(real):
    x, q = real
    qt = np.round(q, 1)  # many ties: lower index first
    sel = QDITSelector(50, 1.0).fit(x, qt)
    np.testing.assert_array_equal(sel.ranking_, quality_order(qt)[:50])
    order = np.argsort(-qt, kind="stable")[:50]
    np.testing.assert_array_equal(sel.ranking_, order)
    naive = QDITSelector(50, 1.0, optimizer="naive").fit(x, qt)
    np.testing.assert_array_equal(naive.ranking_, sel.ranking_)
    np.testing.assert_array_equal(sel.scores_, minmax(qt)[order])


def test_stochastic_close_to_lazy_and_seeded(real):
    x, q = real
    for alpha in (0.0, 0.7):
        lazy = QDITSelector(48, alpha).fit(x, q)
        st = QDITSelector(48, alpha, optimizer="stochastic", epsilon=0.01, random_state=1).fit(x, q)
        assert st.objective_ >= 0.97 * lazy.objective_
        again = QDITSelector(48, alpha, optimizer="stochastic", epsilon=0.01, random_state=1).fit(x, q)
        _same(st, again)
        assert len(set(st.ranking_.tolist())) == 48
    other = QDITSelector(48, 0.0, optimizer="stochastic", epsilon=0.5, random_state=2).fit(x)
    assert not np.array_equal(other.ranking_, lazy.ranking_ if alpha == 0.0 else st.ranking_)
    assert fl.stochastic_sample_size(480, 48, 0.01) == math.ceil(10 * math.log(100))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["lazy", "naive", "stochastic"])
def test_resume_gives_the_identical_result(real, optimizer):
    x, q = real
    full = QDITSelector(40, 0.7, optimizer=optimizer, random_state=3).fit(x, q)
    saved = []

    def kill_at_25(state):
        saved.append(state)
        if state.step >= 25:
            raise _Killed

    with pytest.raises(_Killed):
        QDITSelector(40, 0.7, optimizer=optimizer, random_state=3, checkpoint_every=5,
                     callback=kill_at_25).fit(x, q)
    assert [s.step for s in saved] == [5, 10, 15, 20, 25]
    last = saved[-1]
    np.testing.assert_array_equal(last.selected, full.ranking_[:25])
    resumed = QDITSelector(40, 0.7, optimizer=optimizer, random_state=3).fit(x, q, initial_state=last)
    _same(full, resumed)
    assert resumed.objective_ == full.objective_


def test_greedi_one_partition_equals_greedy_and_many_are_close(real):
    x, q = real
    qn = minmax(q)
    exact = QDITSelector(40, 0.5).fit(x, q)
    pool = _pool(x, q)
    xn = check_embeddings(x)
    res, picks = greedi(pool, xn, qn, 40, 0.5, "lazy", 1, 0, 64 << 20, 0.01)
    np.testing.assert_array_equal(res.ranking, exact.ranking_)
    np.testing.assert_array_equal(res.gains, exact.gains_)
    res4, picks4 = greedi(pool, xn, qn, 40, 0.5, "lazy", 4, 0, 64 << 20, 0.01)
    assert len(picks4) == 4 and len(set(res4.ranking.tolist())) == 40
    assert set(res4.ranking.tolist()) <= set(np.concatenate(picks4).tolist())
    ev = evaluate_ranking(x, res4.ranking, q, 0.5)
    assert 0.95 * exact.objective_ <= ev.objective <= exact.objective_ + 1e-12


# -- baselines and paper variants -------------------------------------------------------------------


def test_baselines(real):
    x, q = real
    r1 = QDITSelector(30, 0.7, method="random", random_state=5).fit(x, q)
    r2 = QDITSelector(30, 0.7, method="random", random_state=5).fit(x, q)
    np.testing.assert_array_equal(r1.ranking_, r2.ranking_)
    assert len(set(r1.ranking_.tolist())) == 30
    top = QDITSelector(30, 0.7, method="quality").fit(x, q)
    np.testing.assert_array_equal(top.ranking_, quality_order(q)[:30])
    qdit = QDITSelector(30, 0.7).fit(x, q)
    assert qdit.objective_ >= max(r1.objective_, top.objective_)
    # with a smaller alpha diversity matters: more diverse than top-K, less quality
    qdit = QDITSelector(30, 0.2).fit(x, q)
    assert qdit.diversity_ > top.diversity_ and top.quality_mean_ > qdit.quality_mean_


def test_threshold_variant(real):
    x, q = real
    tau = 0.4
    r = select_threshold(x, q, 60, tau, block=64)
    assert len(r) == 60
    cos = x[r] @ x[r].T
    np.fill_diagonal(cos, -1)
    assert cos.max() <= tau + 1e-6
    ranks = np.argsort(quality_order(q))  # position of each point in quality order
    assert np.all(np.diff(ranks[r]) > 0), "kept in quality order"
    skipped = [i for i in quality_order(q)[:ranks[r[-1]]] if i not in set(r.tolist())]
    assert all((x[i] @ x[r].T).max() > tau for i in skipped), "only near-duplicates are skipped"
    few = QDITSelector(400, 0.5, method="threshold", tau=0.1).fit(x, q)
    assert 0 < len(few.ranking_) < 400  # the pool runs out: fewer than k, with a warning


def test_cluster_variant(real):
    x, q = real
    r, labels = select_cluster(x, q, 40, 8, seed=0)
    counts = np.bincount(labels[r], minlength=8)
    sizes = np.bincount(labels, minlength=8)
    assert counts.sum() == 40 and len(set(r.tolist())) == 40
    full = counts[sizes >= 5]
    assert full.max() - full.min() <= 1, "equal share per cluster"
    for c in range(8):
        members = r[labels[r] == c]
        best = quality_order(np.where(labels == c, q, -np.inf))[:len(members)]
        np.testing.assert_array_equal(np.sort(members), np.sort(best))


# -- bad input fails at the boundary ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs, data, match", [
    ({"k": 500}, None, r"k=500 is larger than the pool \(N=480"),
    ({"k": 0}, None, "k must be >= 1, got k=0"),
    ({"k": -3}, None, "k must be >= 1, got k=-3"),
    ({"k": 2.5}, None, "k must be an integer"),
    ({"k": 5, "alpha": 1.5}, None, r"alpha must be in \[0, 1\], got alpha=1.5"),
    ({"k": 5, "alpha": -0.1}, None, r"alpha must be in \[0, 1\], got alpha=-0.1"),
    ({"k": 5, "alpha": float("nan")}, None, r"alpha must be in \[0, 1\]"),
    ({"k": 5, "optimizer": "lazzy"}, None, r"optimizer must be one of \['lazy', 'naive', 'stochastic'\], got 'lazzy'"),
    ({"k": 5, "method": "kmeans"}, None, "method must be one of"),
    ({"k": 5, "epsilon": 0.0}, None, r"epsilon must be in \(0, 1\)"),
    ({"k": 5}, "nan", r"NaN/inf values in 1 row\(s\), first rows \[7\]"),
    ({"k": 5}, "inf", r"NaN/inf values in 1 row\(s\), first rows \[3\]"),
    ({"k": 5}, "zero", r"1 zero-norm row\(s\), first rows \[11\]"),
    ({"k": 5}, "1d", r"must be a 2-D array \[N, d\], got shape \(480,\)"),
    ({"k": 5}, "qlen", r"quality has 479 values but the embeddings have N=480 rows"),
    ({"k": 5}, "qnan", r"quality has 1 NaN/inf value\(s\), first at \[2\]"),
    ({"k": 5, "alpha": 0.5}, "qnone", "quality is required"),
])
def test_bad_input_raises_named_error(real, kwargs, data, match):
    x, q = real
    x, q = x.copy(), q.copy()
    if data == "nan":
        x[7, 3] = np.nan
    elif data == "inf":
        x[3, 0] = np.inf
    elif data == "zero":
        x[11] = 0
    elif data == "1d":
        x = x[:, 0]
    elif data == "qlen":
        q = q[:-1]
    elif data == "qnan":
        q[2] = np.nan
    elif data == "qnone":
        q = None
    with pytest.raises(SelectionInputError, match=match):
        QDITSelector(**kwargs).fit(x, q)


def test_bad_resume_state_is_rejected(real):
    x, q = real
    st = QDITSelector(10, 0.5).fit(x[:100], q[:100]).state_
    with pytest.raises(SelectionInputError, match="initial_state is for a pool of 100 points, but N=480"):
        QDITSelector(10, 0.5).fit(x, q, initial_state=st)
    with pytest.raises(SelectionInputError, match="initial_state has 10 selections but k=5"):
        QDITSelector(5, 0.5).fit(x[:100], q[:100], initial_state=st)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_extreme_magnitudes_normalise_instead_of_vanishing(real, scale):
    """Rows ~1e±200 (float64): their squares over/underflow, so the norm is taken after scaling."""
    x, q = real
    x64 = x[:60].astype(np.float64)
    mixed = x64.copy()
    mixed[::2] *= scale  # every other row is extreme; the rest keep their ordinary path
    got = check_embeddings(mixed)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got, check_embeddings(x64), rtol=0, atol=1e-6)
    a = QDITSelector(10, 0.5).fit(mixed, q[:60])
    b = QDITSelector(10, 0.5).fit(x64, q[:60])
    np.testing.assert_array_equal(a.ranking_, b.ranking_)


def test_sklearn_estimator_protocol(real):
    """get_params/set_params/clone work, and fit never writes the constructor parameters."""
    from sklearn.base import clone

    x, q = real
    sel = QDITSelector(20, alpha=1, optimizer="stochastic", random_state=np.int64(4), epsilon=0.2)
    before = sel.get_params()
    sel.fit(x, q)
    after = sel.get_params()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert type(sel.alpha) is int and sel.alpha == 1  # not rewritten to float
    twin = clone(sel)
    assert not hasattr(twin, "ranking_") and twin.get_params()["epsilon"] == 0.2
    twin.set_params(alpha=0.5, random_state=4)
    np.testing.assert_array_equal(twin.fit(x, q).ranking_,
                                  QDITSelector(20, 0.5, optimizer="stochastic", epsilon=0.2,
                                               random_state=4).fit(x, q).ranking_)
    with pytest.raises(TypeError):
        QDITSelector(5, seed=1)  # the Python API says random_state


def test_selection_errors_are_one_family(real):
    from mixray.errors import MixrayError

    x, _ = real
    with pytest.raises(SelectionInputError) as e:
        QDITSelector(5, 0.0, device="gpu").fit(x)
    assert isinstance(e.value, MixrayError) and isinstance(e.value, ValueError)
    assert "device must be one of ['auto', 'cpu', 'cuda'], got 'gpu'" in str(e.value)


def test_closed_choices_come_from_mixray_choices():
    from mixray import choices

    rules = QDITSelector._constraints
    assert rules["optimizer"].values is choices.SELECT_OPTIMIZERS
    assert rules["method"].values is choices.SELECT_METHODS
    assert rules["device"].values is choices.DEVICES
