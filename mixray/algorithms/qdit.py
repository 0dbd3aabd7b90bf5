"""QDIT selection: the sklearn-shaped facade, input validation, baselines and paper variants.

``QDITSelector(k, alpha).fit(embeddings, quality)`` runs the greedy of
:mod:`mixray.algorithms.facility` (see there for the equations and the
performance design) and exposes ``ranking_``, ``gains_``, ``scores_``,
``objective_``, ``diversity_``, ``quality_mean_``.

Methods (``method=``, :data:`mixray.choices.SELECT_METHODS`), all in the same API
so the paper's comparisons can be reproduced:

- ``qdit``: greedy on ``f(a|A, α) = (1−α)·d(a|A)/N + α·q(a)`` with ``optimizer``
  (:data:`mixray.choices.SELECT_OPTIMIZERS`) ``lazy`` (exact, default), ``naive``
  (exact reference, O(K·N²·d)) or ``stochastic`` (``⌈(N/K)·ln(1/ε)⌉`` candidates
  per step, seeded by ``random_state``);
- ``random``: a seeded uniform sample;
- ``quality``: top-K by quality (ties: lower index);
- ``threshold`` (QDIT:Threshold): in quality order, keep a point unless its
  cosine similarity to an already kept point exceeds τ;
- ``cluster`` (QDIT:Cluster): k-means (scikit-learn) into ``n_clusters``, then
  an equal share per cluster, best quality first.

Every method's result is scored with the same objective (:func:`evaluate_ranking`).
Validation happens once, here, at the public boundary (errors:
:class:`~mixray.errors.SelectionInputError`); the kernels assume valid input.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator

from mixray.algorithms import facility as fl
from mixray.algorithms.devices import resolve_device
from mixray.algorithms.params import Interval, Options, validate
from mixray.algorithms.threads import gemm_threads
from mixray.choices import DEVICES, SELECT_METHODS, SELECT_OPTIMIZERS
from mixray.errors import SelectionInputError

log = logging.getLogger("mixray.qdit")

NEEDS_QUALITY = ("quality", "threshold", "cluster")  # methods that rank by quality at any alpha


# --------------------------------------------------------------------------------------------
# Validation (once, at the boundary)
# --------------------------------------------------------------------------------------------


def check_k(k: int, n: int) -> int:
    """``1 <= k <= n`` (an integer)."""
    k = Interval(int, 1, None).check("k", k, SelectionInputError)
    if k > n:
        raise SelectionInputError(f"k={k} is larger than the pool (N={n} examples); allowed: 1 <= k <= {n}")
    return k


def check_alpha(alpha: float) -> float:
    """α in [0, 1]."""
    return Interval(float, 0, 1).check("alpha", alpha, SelectionInputError)


def _unit_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[m, d]`` finite float64 rows -> (unit rows, row is zero).

    Rows whose norm over- or underflows float64 (entries ~1e±200: their squares
    do) are first scaled by their largest magnitude, so they normalise correctly
    instead of becoming zero vectors; ordinary rows are divided by their norm
    directly (the same bits as ever).
    """
    with np.errstate(over="ignore", under="ignore"):  # those rows are redone below
        norms = np.linalg.norm(block, axis=1)
    extreme = ~((norms > 1e-150) & (norms < 1e150))
    if extreme.any():
        peak = np.abs(block[extreme]).max(axis=1)
        scaled = block[extreme] / np.where(peak > 0, peak, 1.0)[:, None]
        block = block.copy()
        block[extreme] = scaled
        norms[extreme] = np.linalg.norm(scaled, axis=1)
    return block / np.where(norms > 0, norms, 1.0)[:, None], norms == 0


def check_embeddings(embeddings, name: str = "embeddings", chunk: int = 1 << 16) -> np.ndarray:
    """[N, d] finite, no zero rows -> a new L2-normalised float32 array.

    Norms are computed in float64, ``chunk`` rows at a time (no full float64 copy).
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise SelectionInputError(f"{name} must be a 2-D array [N, d], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise SelectionInputError(f"{name} is empty (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise SelectionInputError(f"{name} must be real numbers, got dtype {x.dtype}")
    out = np.empty(x.shape, dtype=np.float32)
    bad, zero = [], []
    for i0 in range(0, len(x), chunk):
        block = x[i0:i0 + chunk].astype(np.float64)
        finite = np.isfinite(block).all(axis=1)
        bad.extend((i0 + np.nonzero(~finite)[0]).tolist())
        unit, is_zero = _unit_rows(np.where(finite[:, None], block, 0.0))
        zero.extend((i0 + np.nonzero(finite & is_zero)[0]).tolist())
        out[i0:i0 + chunk] = unit
    if bad:
        raise SelectionInputError(
            f"{name} has NaN/inf values in {len(bad)} row(s), first rows {bad[:5]}; "
            "every value must be finite")
    if zero:
        raise SelectionInputError(
            f"{name} has {len(zero)} zero-norm row(s), first rows {zero[:5]}; "
            "cosine similarity needs a non-zero vector per example")
    return out


def check_quality(quality, n: int, name: str = "quality") -> np.ndarray:
    """[N] finite numbers -> float64 (a copy)."""
    q = np.asarray(quality)
    if q.ndim != 1:
        raise SelectionInputError(f"{name} must be a 1-D array [N], got shape {q.shape}")
    if len(q) != n:
        raise SelectionInputError(
            f"{name} has {len(q)} values but the embeddings have N={n} rows; they must match")
    if not np.issubdtype(q.dtype, np.number) or np.iscomplexobj(q):
        raise SelectionInputError(f"{name} must be real numbers, got dtype {q.dtype}")
    q = q.astype(np.float64)
    bad = ~np.isfinite(q)
    if bad.any():
        rows = np.nonzero(bad)[0]
        raise SelectionInputError(
            f"{name} has {len(rows)} NaN/inf value(s), first at {rows[:5].tolist()}; must be finite")
    return q


def minmax(q: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0, 1] over the pool (all zeros when q is constant)."""
    q = np.asarray(q, dtype=np.float64)
    lo, hi = float(q.min()), float(q.max())
    if hi == lo:
        return np.zeros_like(q)
    return (q - lo) / (hi - lo)


def prepare_quality(quality, n: int, normalize: bool) -> np.ndarray:
    """``quality`` [N] checked (and min-max normalised when ``normalize``); zeros when None."""
    if quality is None:
        return np.zeros(n)
    q = check_quality(quality, n)
    return minmax(q) if normalize else q


# --------------------------------------------------------------------------------------------
# Baselines and paper variants (rankings only; scored by evaluate_ranking)
# --------------------------------------------------------------------------------------------


def quality_order(q: np.ndarray) -> np.ndarray:
    """Indices by quality, best first, ties by lower index (what greedy with α=1 does)."""
    return np.lexsort((np.arange(len(q)), -np.asarray(q, dtype=np.float64)))


def select_random(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)[:k].astype(np.int64)


def select_quality(q: np.ndarray, k: int) -> np.ndarray:
    return quality_order(q)[:k].astype(np.int64)


def select_threshold(x_unit: np.ndarray, q: np.ndarray, k: int, tau: float,
                     block: int = 256) -> np.ndarray:
    """QDIT:Threshold — quality order; keep a point iff cos(point, every kept point) ≤ τ.

    Returns at most k indices (fewer when the pool runs out; the caller warns).
    """
    order = quality_order(q)
    x = torch.from_numpy(np.ascontiguousarray(x_unit))
    kept: list[int] = []
    kept_x = torch.empty(0, x.shape[1])
    for b0 in range(0, len(order), block):
        idx = order[b0:b0 + block]
        xb = x[torch.from_numpy(idx)]
        ok = ((xb @ kept_x.T).max(1).values <= tau if len(kept) else torch.ones(len(idx), dtype=torch.bool))
        inner = xb @ xb.T
        taken: list[int] = []
        for i in range(len(idx)):
            if not bool(ok[i]):
                continue
            if taken and bool((inner[i, taken] > tau).any()):
                continue
            taken.append(i)
            kept.append(int(idx[i]))
            if len(kept) == k:
                return np.asarray(kept, dtype=np.int64)
        if taken:
            kept_x = torch.cat([kept_x, xb[taken]])
    return np.asarray(kept, dtype=np.int64)


def select_cluster(x_unit: np.ndarray, q: np.ndarray, k: int, n_clusters: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """QDIT:Cluster — k-means (scikit-learn) then an equal share per cluster, best quality first.

    Picks round-robin over clusters (cluster order: best member's quality,
    then cluster id); a cluster that runs out is skipped, so shares differ by
    at most one where every cluster is large enough. Returns (ranking, labels).
    """
    from sklearn.cluster import KMeans

    m = min(n_clusters, len(x_unit))
    labels = KMeans(n_clusters=m, random_state=seed, n_init=1).fit_predict(x_unit)
    order = quality_order(q)
    members = [order[labels[order] == c] for c in range(m)]
    lead = sorted(range(m), key=lambda c: (-q[members[c][0]] if len(members[c]) else math.inf, c))
    out: list[int] = []
    depth = 0
    while len(out) < k:
        for c in lead:
            if depth < len(members[c]):
                out.append(int(members[c][depth]))
                if len(out) == k:
                    break
        depth += 1
    return np.asarray(out, dtype=np.int64), labels


# --------------------------------------------------------------------------------------------
# The shared objective of a ranking
# --------------------------------------------------------------------------------------------


@dataclass
class RankingScore:
    gains: np.ndarray  # d(a_t | A_{t−1}) per position
    scores: np.ndarray  # f(a_t | A_{t−1}, α)
    objective: float  # (1−α)·d(A)/N + α·mean q(A)
    diversity: float  # d(A)/N
    quality_mean: float  # mean q(A)


def score_from_cur(cur_scaled: np.ndarray, q_sel: np.ndarray, alpha: float
                   ) -> tuple[float, float, float]:
    """(objective, diversity, mean quality) from the final scaled running max [N] and q of A [K]."""
    div = fl.diversity_from_cur(cur_scaled)
    qm = float(np.mean(q_sel)) if len(q_sel) else 0.0
    return (1.0 - alpha) * div + alpha * qm, div, qm


def check_ranking(ranking, n: int) -> np.ndarray:
    """[K] distinct indices in [0, N) -> int64."""
    r = np.asarray(ranking, dtype=np.int64)
    if r.ndim != 1 or (len(r) and (r.min() < 0 or r.max() >= n)) or len(np.unique(r)) != len(r):
        raise SelectionInputError(f"ranking must be distinct indices in [0, {n}), got {len(r)} values")
    return r


def evaluate_ranking(embeddings, ranking, quality=None, alpha: float = 0.0,
                     device: str = "auto", normalize_quality: bool = True) -> RankingScore:
    """Score any ranking with the QDIT objective (the one function every method is compared with).

    ``embeddings`` [N, d], ``ranking`` [K] distinct indices, ``quality`` [N]
    (min-max normalised here unless ``normalize_quality=False``).
    """
    x = check_embeddings(embeddings)
    n = len(x)
    alpha = check_alpha(alpha)
    r = check_ranking(ranking, n)
    q = prepare_quality(quality, n, normalize_quality)
    pool = fl.Pool.build(x, q, resolve_device(device, where="device"), inplace=True)
    gains, cur = fl.ranking_gains(pool.xs, r)
    scores = (1.0 - alpha) * gains / n + alpha * q[r]
    obj, div, qm = score_from_cur(cur, q[r], alpha)
    return RankingScore(gains, scores, obj, div, qm)


# --------------------------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------------------------


class QDITSelector(BaseEstimator):
    """Select K of N examples by quality and facility-location diversity (sklearn-shaped).

    Parameters
    ----------
    k : number of examples to select (1 ≤ k ≤ N).
    alpha : trade-off α ∈ [0, 1]; 0 = pure facility location, 1 = top-K by quality.
    optimizer : ``lazy`` (exact, default), ``naive`` (exact reference) or ``stochastic``.
    method : ``qdit`` (default) or a baseline/paper variant (module docstring).
    epsilon : stochastic greedy's ε (sample ``⌈(N/K)·ln(1/ε)⌉`` per step).
    random_state : int seed for ``stochastic``, ``random`` and ``cluster``.
    device : ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    memory_budget_mb : memory (MB) the similarity cache may use (total over the column
        shards). When the whole quantised matrix fits (4·N² bytes, on CPU) it is computed
        once and every gain is a row read (fastest); otherwise a sparse cache of the high
        similarities within the budget; 0 keeps every column matrix-free (slowest, smallest).
    tau, n_clusters : parameters of ``threshold`` and ``cluster``.
    normalize_quality : min-max normalise ``quality`` over the pool (methods.md); set
        False if it is already in [0, 1].
    checkpoint_every, callback : ``callback(state)`` every n greedy steps (a
        :class:`~mixray.algorithms.facility.GreedyState` to persist); pass the
        state back to ``fit(initial_state=...)`` to continue with the identical result.
    threads : torch threads of this process for the large matrix products (default:
        torch's current setting); the greedy's small sparse/elementwise ops always run
        single-threaded. On a busy shared machine ``threads=1`` is fastest.

    Parallelism: one process here. The same greedy over ``concurrency`` Ray actors
    (one column shard each, same result) is :func:`mixray.distributed.selection.sharded_select`;
    GreeDi over ``partitions`` is :func:`mixray.distributed.selection.greedi_select`.

    Attributes (after ``fit``)
    --------------------------
    ranking_ [K] indices in selection order; gains_ [K] d(a|A) at selection;
    scores_ [K] f(a|A, α) at selection; objective_ ``(1−α)·d(A)/N + α·mean q(A)``;
    diversity_ ``d(A)/N``; quality_mean_ ``mean q(A)``; quality_ [N] normalised
    quality; state_ the final greedy state (``qdit`` with α < 1, else None);
    labels_ [N] (``cluster`` only); stats_ counters; fit_time_ s.
    """

    _constraints = {
        "k": Interval(int, 1, None),
        "alpha": Interval(float, 0, 1),
        "optimizer": Options(SELECT_OPTIMIZERS),
        "method": Options(SELECT_METHODS),
        "epsilon": Interval(float, 0, 1, closed="neither"),
        "random_state": Interval(int, 0, None),
        "device": Options(DEVICES),
        "memory_budget_mb": Interval(float, 0, None),
        "tau": Interval(float, -1, 1),
        "n_clusters": Interval(int, 1, None),
        "normalize_quality": Options((True, False)),
        "checkpoint_every": Interval(int, 0, None),
        "threads": Interval(int, 1, None, none_ok=True),
    }

    def __init__(self, k: int, alpha: float = 0.7, *, optimizer: str = "lazy",
                 method: str = "qdit", epsilon: float = 0.01, random_state: int = 0,
                 device: str = "auto", memory_budget_mb: float = 512, tau: float = 0.5,
                 n_clusters: int = 100, normalize_quality: bool = True,
                 checkpoint_every: int = 0, callback: fl.StepCallback | None = None,
                 threads: int | None = None):
        self.k = k
        self.alpha = alpha
        self.optimizer = optimizer
        self.method = method
        self.epsilon = epsilon
        self.random_state = random_state
        self.device = device
        self.memory_budget_mb = memory_budget_mb
        self.tau = tau
        self.n_clusters = n_clusters
        self.normalize_quality = normalize_quality
        self.checkpoint_every = checkpoint_every
        self.callback = callback
        self.threads = threads

    def fit(self, embeddings, quality=None, initial_state: fl.GreedyState | None = None,
            shards: fl.Shards | None = None) -> QDITSelector:
        """Select. ``embeddings`` [N, d] (any scale; rows are L2-normalised), ``quality`` [N].

        ``quality`` is required when α > 0 or for ``quality``/``threshold``/``cluster``.
        ``shards`` (advanced): an external set of column shards, e.g. the Ray actors
        built by ``mixray.distributed.selection``. The constructor parameters are
        read, never written.
        """
        t0 = time.perf_counter()
        p = validate(self.get_params(deep=False), self._constraints, SelectionInputError)
        x = check_embeddings(embeddings)
        n = len(x)
        check_k(p["k"], n)
        if quality is None and (p["alpha"] > 0 or p["method"] in NEEDS_QUALITY):
            raise SelectionInputError(
                f"quality is required for method={p['method']!r} with alpha={p['alpha']}")
        q = prepare_quality(quality, n, p["normalize_quality"])
        if initial_state is not None:
            _check_state(initial_state, n, p["k"])
        dev = resolve_device(p["device"], where="device")
        self.state_, self.stats_ = None, {}
        self.__dict__.pop("labels_", None)  # set by method="cluster" only
        if p["method"] == "qdit" and p["alpha"] < 1.0:
            pool = fl.Pool.build(x, q, dev, inplace=True)  # x is our own normalised copy
            cur = self._fit_greedy(pool, p, initial_state, shards)
        else:
            cur = self._fit_ranking(x, q, dev, p)
        self.objective_, self.diversity_, self.quality_mean_ = score_from_cur(
            cur, q[self.ranking_], p["alpha"])
        self.quality_ = q
        self.fit_time_ = time.perf_counter() - t0
        return self

    def _fit_greedy(self, pool: fl.Pool, p: dict, initial_state, shards) -> np.ndarray:
        res = fl.run_greedy(pool, p["k"], p["alpha"], p["optimizer"], shards=shards,
                            budget_bytes=int(p["memory_budget_mb"] * (1 << 20)),
                            epsilon=p["epsilon"], seed=p["random_state"], start=initial_state,
                            callback=p["callback"], callback_every=p["checkpoint_every"],
                            threads=p["threads"])
        self.ranking_, self.gains_, self.scores_ = res.ranking, res.gains, res.scores
        self.state_, self.stats_ = res.state(), res.stats
        return res.cur

    def _fit_ranking(self, x: np.ndarray, q: np.ndarray, dev: torch.device, p: dict) -> np.ndarray:
        """A baseline or paper variant (or α = 1), scored with the shared objective."""
        k, method = p["k"], p["method"]
        if method in ("qdit", "quality"):
            ranking = select_quality(q, k)  # α = 1: greedy on f = q is the quality order
        elif method == "random":
            ranking = select_random(len(x), k, p["random_state"])
        elif method == "threshold":
            ranking = select_threshold(x, q, k, p["tau"])
            if len(ranking) < k:
                log.warning("threshold: only %d of k=%d points have pairwise cosine <= tau=%s; "
                            "raise tau to select more", len(ranking), k, p["tau"])
        else:
            ranking, self.labels_ = select_cluster(x, q, k, p["n_clusters"], p["random_state"])
        pool = fl.Pool.build(x, q, dev, inplace=True)  # x is not used after this
        with gemm_threads(p["threads"]):
            gains, cur = fl.ranking_gains(pool.xs, ranking)
        self.ranking_, self.gains_ = ranking, gains
        self.scores_ = (1.0 - p["alpha"]) * gains / len(x) + p["alpha"] * q[ranking]
        return cur


def _check_state(state: fl.GreedyState, n: int, k: int) -> None:
    if state.cur is None or len(state.cur) != n:
        got = "no running max" if state.cur is None else f"a pool of {len(state.cur)} points"
        raise SelectionInputError(f"initial_state is for {got}, but N={n}")
    if state.step > k:
        raise SelectionInputError(f"initial_state has {state.step} selections but k={k}")
    sel = np.asarray(state.selected)
    if len(sel) and (sel.min() < 0 or sel.max() >= n or len(np.unique(sel)) != len(sel)):
        raise SelectionInputError("initial_state.selected must be distinct indices of the pool")
