"""QDIT selection: the sklearn-shaped facade, input validation, baselines and paper variants.

``QDITSelector(k, alpha).fit(embeddings, quality)`` runs the greedy of
``mixray.algorithms.facility`` (see there for the equations and the
performance design) and exposes ``ranking_``, ``gains_``, ``scores_``,
``objective_``, ``diversity_``, ``quality_mean_``.

Methods (``method=``), all in the same API so the paper's comparisons can be reproduced:

- ``qdit``: greedy on ``f(a|A, α) = (1−α)·d(a|A)/N + α·q(a)`` with
  ``optimizer`` ``lazy`` (exact, default), ``naive`` (exact reference,
  O(K·N²·d)) or ``stochastic`` (``⌈(N/K)·ln(1/ε)⌉`` candidates per step, seeded);
- ``random``: a seeded uniform sample;
- ``quality``: top-K by quality (ties: lower index);
- ``threshold`` (QDIT:Threshold): in quality order, keep a point unless its
  cosine similarity to an already kept point exceeds τ;
- ``cluster`` (QDIT:Cluster): k-means (scikit-learn) into ``n_clusters``, then
  an equal share per cluster, best quality first.

Every method's result is scored with the same objective (:func:`evaluate_ranking`).
Validation happens once, here, at the public boundary; the kernels assume valid input.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mixray.algorithms import facility as fl
from mixray.errors import SelectionInputError

log = logging.getLogger("mixray.qdit")

Optimizer = Literal["lazy", "naive", "stochastic"]
Method = Literal["qdit", "random", "quality", "threshold", "cluster"]
OPTIMIZERS: tuple[str, ...] = ("lazy", "naive", "stochastic")
METHODS: tuple[str, ...] = ("qdit", "random", "quality", "threshold", "cluster")




# --------------------------------------------------------------------------------------------
# Validation (once, at the boundary)
# --------------------------------------------------------------------------------------------


def check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise SelectionInputError(f"k must be an integer, got {type(k).__name__} {k!r}")
    if k <= 0:
        raise SelectionInputError(f"k must be >= 1, got k={k}")
    if k > n:
        raise SelectionInputError(f"k={k} is larger than the pool (N={n} examples); allowed: 1 <= k <= {n}")
    return int(k)


def check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise SelectionInputError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise SelectionInputError(f"alpha must be in [0, 1], got alpha={alpha}")
    return a


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
        norms = np.linalg.norm(np.where(finite[:, None], block, 0.0), axis=1)
        zero.extend((i0 + np.nonzero(finite & (norms == 0))[0]).tolist())
        out[i0:i0 + chunk] = block / np.where(norms > 0, norms, 1.0)[:, None]
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SelectionInputError("device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda"):
        raise SelectionInputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# Prepared pool: scaled embeddings and quality as tensors
# --------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Validated, normalised inputs in the units the kernels use."""

    xs: torch.Tensor  # [N, d] float32, 2^(e/2)·x (unit rows scaled)
    q: torch.Tensor  # [N] float64 normalised quality (zeros when unused)
    scale_exp: int

    @property
    def n(self) -> int:
        return self.xs.shape[0]

    @classmethod
    def build(cls, x_unit: np.ndarray, q: np.ndarray, device: torch.device,
              inplace: bool = False) -> Pool:
        """``inplace=True`` scales ``x_unit`` itself (saves a copy of N×d; the caller gives it up)."""
        e = fl.scale_exponent(len(x_unit))
        scale = float(2.0 ** (e // 2))  # a power of two: exact in float32
        xs = torch.from_numpy(np.ascontiguousarray(x_unit, dtype=np.float32))
        if inplace and xs.device == device:
            xs.mul_(scale)
        else:
            xs = xs.to(device) * scale
        return cls(xs, torch.from_numpy(np.asarray(q, dtype=np.float64)), e)


def choose_theta(pool: Pool, budget_bytes: int, n_candidates: int | None = None) -> float:
    return fl.choose_threshold(pool.xs, pool.xs, n_candidates or pool.n, budget_bytes // 8)


def split_columns(n: int, parts: int) -> list[np.ndarray]:
    """Contiguous column ranges for ``parts`` shards (their cur concatenates in order)."""
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def local_shards(pool: Pool, n_shards: int, budget_bytes: int,
                 start: fl.GreedyState | None = None, threads: int | None = None) -> fl.LocalShards:
    """``n_shards`` in-process column shards (1 = the plain single-process run)."""
    parts = split_columns(pool.n, n_shards)
    cur = None if start is None or start.step == 0 else torch.from_numpy(start.cur)
    step = 0 if start is None else start.step
    shards = []
    for cols in parts:
        c = None if len(parts) == 1 else torch.from_numpy(cols)
        shard_cur = None if cur is None else cur[int(cols[0]):int(cols[-1]) + 1]
        shards.append(fl.ColumnShard(pool.xs, c, pool.scale_exp, budget_bytes // len(parts),
                                     cur=shard_cur, step=step, threads=threads))
    return fl.LocalShards(shards)


def run_greedy(pool: Pool, k: int, alpha: float, optimizer: str, *, shards: fl.Shards | None = None,
               budget_bytes: int = 512 << 20, epsilon: float = 0.01, seed: int = 0,
               candidates: np.ndarray | None = None, start: fl.GreedyState | None = None,
               callback: fl.StepCallback | None = None, callback_every: int = 0,
               n_shards: int = 1, threads: int | None = None) -> fl.GreedyResult:
    """Dispatch to the greedy variant (valid inputs assumed).

    ``threads``: torch threads for the large matrix products; everything else
    runs single-threaded (see :class:`~mixray.algorithms.facility.gemm_threads`).
    """
    cand = None if candidates is None else torch.as_tensor(np.asarray(candidates, dtype=np.int64))
    threads = threads or torch.get_num_threads()
    if optimizer == "naive":
        with fl.gemm_threads(threads):
            return fl.naive_greedy(pool.xs, pool.q, alpha, k, scale_exp=pool.scale_exp,
                                   candidates=cand, start=start, callback=callback,
                                   callback_every=callback_every)
    n_cand = pool.n if cand is None else len(cand)
    if shards is None:
        shards = local_shards(pool, n_shards, budget_bytes, start, threads)
    theta = choose_theta(pool, budget_bytes, n_cand)
    sample = (fl.stochastic_sample_size(n_cand, k, epsilon) if optimizer == "stochastic" else None)
    with fl.gemm_threads(1):
        return fl.lazy_greedy(shards, pool.q, alpha, k, n_pool=pool.n, scale_exp=pool.scale_exp,
                              theta=theta, candidates=cand, start=start, sample_size=sample,
                              seed=seed, callback=callback, callback_every=callback_every)


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


def score_from_cur(cur_scaled: np.ndarray, scale_exp: int, q_sel: np.ndarray, alpha: float,
                   ) -> tuple[float, float, float]:
    """(objective, diversity, mean quality) from the final running max."""
    div = fl.diversity_from_cur(cur_scaled, scale_exp)
    qm = float(np.mean(q_sel)) if len(q_sel) else 0.0
    return (1.0 - alpha) * div + alpha * qm, div, qm


def evaluate_ranking(embeddings, ranking, quality=None, alpha: float = 0.0,
                     device: str = "auto", normalize_quality: bool = True) -> RankingScore:
    """Score any ranking with the QDIT objective (the one function every method is compared with).

    ``embeddings`` [N, d], ``ranking`` [K] distinct indices, ``quality`` [N]
    (min-max normalised here unless ``normalize_quality=False``).
    """
    x = check_embeddings(embeddings)
    n = len(x)
    alpha = check_alpha(alpha)
    r = np.asarray(ranking, dtype=np.int64)
    if r.ndim != 1 or (len(r) and (r.min() < 0 or r.max() >= n)) or len(np.unique(r)) != len(r):
        raise SelectionInputError(f"ranking must be distinct indices in [0, {n}), got {len(r)} values")
    q = np.zeros(n) if quality is None else check_quality(quality, n)
    if normalize_quality and quality is not None:
        q = minmax(q)
    pool = Pool.build(x, q, resolve_device(device), inplace=True)
    gains, cur = fl.ranking_gains(pool.xs, r, pool.scale_exp)
    scores = (1.0 - alpha) * gains / n + alpha * q[r]
    obj, div, qm = score_from_cur(cur, pool.scale_exp, q[r], alpha)
    return RankingScore(gains, scores, obj, div, qm)


# --------------------------------------------------------------------------------------------
# GreeDi, single process (the distributed version runs round 1 in Ray actors)
# --------------------------------------------------------------------------------------------


def greedi_round1(x_unit: np.ndarray, q: np.ndarray, part: np.ndarray, k: int, alpha: float,
                  optimizer: str, budget_bytes: int, epsilon: float, seed: int,
                  device: str = "cpu") -> np.ndarray:
    """Greedy on one partition (its own pool: d over the partition, /N_part). Global indices."""
    kk = min(k, len(part))
    pool = Pool.build(x_unit[part], q[part], resolve_device(device))
    res = run_greedy(pool, kk, alpha, optimizer, budget_bytes=budget_bytes, epsilon=epsilon, seed=seed)
    return part[res.ranking]


def greedi(pool: Pool, x_unit: np.ndarray, q: np.ndarray, k: int, alpha: float, optimizer: str,
           partitions: int, seed: int, budget_bytes: int, epsilon: float,
           run_partitions: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
           **round2) -> tuple[fl.GreedyResult, list[np.ndarray]]:
    """GreeDi: greedy per partition, then greedy over the union of the picks.

    Round 1 runs :func:`greedi_round1` on each of ``partitions`` seeded random
    parts (``run_partitions(parts) -> picks`` may run them in parallel, e.g. in
    Ray tasks; default: one after the other). Round 2 uses the full pool as the
    ground set V (gains exact over all N points) and the union as candidates.
    With one partition, round 2 reproduces round 1's ranking.
    """
    parts = fl.greedi_partitions(pool.n, partitions, seed)
    if run_partitions is None:
        share = budget_bytes // len(parts)
        picks = [greedi_round1(x_unit, q, p, k, alpha, optimizer, share, epsilon, seed)
                 for p in parts]
    else:
        picks = run_partitions(parts)
    union = fl.greedi_union(picks)
    res = run_greedy(pool, min(k, len(union)), alpha, optimizer, budget_bytes=budget_bytes,
                     epsilon=epsilon, seed=seed, candidates=union, **round2)
    return res, picks


# --------------------------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------------------------


class QDITSelector:
    """Select K of N examples by quality and facility-location diversity (sklearn-shaped).

    Parameters
    ----------
    k : number of examples to select (1 ≤ k ≤ N).
    alpha : trade-off α ∈ [0, 1]; 0 = pure facility location, 1 = top-K by quality.
    optimizer : ``lazy`` (exact, default), ``naive`` (exact reference) or ``stochastic``.
    method : ``qdit`` (default) or a baseline/paper variant (module docstring).
    epsilon : stochastic greedy's ε (sample ``⌈(N/K)·ln(1/ε)⌉`` per step).
    seed : for ``stochastic``, ``random``, ``cluster`` and GreeDi partitions.
    device : ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    memory_budget_mb : bytes the sparse high-similarity cache may use (total over shards);
        0 keeps every column dense (slowest, smallest).
    n_shards : column shards in this process (the Ray version puts one per actor).
    tau, n_clusters : parameters of ``threshold`` and ``cluster``.
    normalize_quality : min-max normalise ``quality`` over the pool (methods.md); set
        False if it is already in [0, 1].
    checkpoint_every, callback : ``callback(state)`` every n greedy steps (a
        :class:`~mixray.algorithms.facility.GreedyState` to persist); pass the
        state back to ``fit(initial_state=...)`` to continue with the identical result.
    threads : torch threads for the large matrix products (default: torch's current
        setting); the greedy's small sparse/elementwise ops always run single-threaded.
        On a busy shared machine ``threads=1`` is fastest.

    Attributes (after ``fit``)
    --------------------------
    ranking_ [K] indices in selection order; gains_ [K] d(a|A) at selection;
    scores_ [K] f(a|A, α) at selection; objective_ ``(1−α)·d(A)/N + α·mean q(A)``;
    diversity_ ``d(A)/N``; quality_mean_ ``mean q(A)``; quality_ [N] normalised
    quality; state_ the final greedy state (``qdit`` only); stats_ counters; fit_time_ s.
    """

    def __init__(self, k: int, alpha: float = 0.7, optimizer: Optimizer = "lazy",
                 method: Method = "qdit", epsilon: float = 0.01, seed: int = 0,
                 device: str = "auto", memory_budget_mb: float = 512, n_shards: int = 1,
                 tau: float = 0.5, n_clusters: int = 100, normalize_quality: bool = True,
                 checkpoint_every: int = 0, callback: fl.StepCallback | None = None,
                 threads: int | None = None):
        self.k = k
        self.alpha = alpha
        self.optimizer = optimizer
        self.method = method
        self.epsilon = epsilon
        self.seed = seed
        self.device = device
        self.memory_budget_mb = memory_budget_mb
        self.n_shards = n_shards
        self.tau = tau
        self.n_clusters = n_clusters
        self.normalize_quality = normalize_quality
        self.checkpoint_every = checkpoint_every
        self.callback = callback
        self.threads = threads

    def _check_params(self, n: int) -> None:
        check_k(self.k, n)
        self.alpha = check_alpha(self.alpha)
        if self.optimizer not in OPTIMIZERS:
            raise SelectionInputError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.method not in METHODS:
            raise SelectionInputError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if not (0.0 < float(self.epsilon) < 1.0):
            raise SelectionInputError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.memory_budget_mb < 0:
            raise SelectionInputError(f"memory_budget_mb must be >= 0, got {self.memory_budget_mb}")
        if int(self.n_shards) < 1:
            raise SelectionInputError(f"n_shards must be >= 1, got {self.n_shards}")
        if not (-1.0 <= float(self.tau) <= 1.0):
            raise SelectionInputError(f"tau must be a cosine similarity in [-1, 1], got {self.tau}")
        if self.threads is not None and int(self.threads) < 1:
            raise SelectionInputError(f"threads must be >= 1 or None, got {self.threads}")
        if int(self.n_clusters) < 1:
            raise SelectionInputError(f"n_clusters must be >= 1, got {self.n_clusters}")

    def fit(self, embeddings, quality=None, initial_state: fl.GreedyState | None = None,
            shards: fl.Shards | None = None) -> QDITSelector:
        """Select. ``embeddings`` [N, d] (any scale; rows are L2-normalised), ``quality`` [N].

        ``quality`` is required when α > 0 or for ``quality``/``threshold``/``cluster``.
        ``shards`` (advanced): an external set of column shards, e.g. Ray actors
        built by ``mixray.distributed.selection``.
        """
        t0 = time.perf_counter()
        x = check_embeddings(embeddings)
        n = len(x)
        self._check_params(n)
        needs_q = self.alpha > 0 or self.method in ("quality", "threshold", "cluster")
        if quality is None:
            if needs_q:
                raise SelectionInputError(
                    f"quality is required for method={self.method!r} with alpha={self.alpha}")
            q = np.zeros(n)
        else:
            q = check_quality(quality, n)
            if self.normalize_quality:
                q = minmax(q)
        if initial_state is not None:
            self._check_state(initial_state, n)
        dev = resolve_device(self.device)
        self._fit(x, q, dev, initial_state, shards)
        self.quality_ = q
        self.fit_time_ = time.perf_counter() - t0
        return self

    def _check_state(self, state: fl.GreedyState, n: int) -> None:
        if len(state.cur) != n:
            raise SelectionInputError(
                f"initial_state is for a pool of {len(state.cur)} points, but N={n}")
        if state.step > self.k:
            raise SelectionInputError(f"initial_state has {state.step} selections but k={self.k}")
        sel = np.asarray(state.selected)
        if len(sel) and (sel.min() < 0 or sel.max() >= n or len(np.unique(sel)) != len(sel)):
            raise SelectionInputError("initial_state.selected must be distinct indices of the pool")

    def _fit(self, x, q, dev, initial_state, shards) -> None:
        k, alpha = int(self.k), float(self.alpha)
        budget = int(self.memory_budget_mb * (1 << 20))
        self.state_ = None
        self.stats_: dict = {}
        if self.method == "qdit" and alpha < 1.0:
            pool = Pool.build(x, q, dev, inplace=True)  # x is our own normalised copy
            res = run_greedy(pool, k, alpha, self.optimizer, shards=shards, budget_bytes=budget,
                             epsilon=self.epsilon, seed=self.seed, start=initial_state,
                             callback=self.callback, callback_every=self.checkpoint_every,
                             n_shards=int(self.n_shards), threads=self.threads)
            self.ranking_, self.gains_, self.scores_ = res.ranking, res.gains, res.scores
            self.state_ = res.state()
            self.stats_ = res.stats
            cur = res.cur
        else:
            if self.method in ("qdit", "quality"):
                ranking = select_quality(q, k)  # α = 1: greedy on f = q is the quality order
            elif self.method == "random":
                ranking = select_random(len(x), k, self.seed)
            elif self.method == "threshold":
                ranking = select_threshold(x, q, k, float(self.tau))
                if len(ranking) < k:
                    log.warning("threshold: only %d of k=%d points have pairwise cosine <= tau=%s; "
                                "raise tau to select more", len(ranking), k, self.tau)
            else:
                ranking, self.labels_ = select_cluster(x, q, k, int(self.n_clusters), self.seed)
            pool = Pool.build(x, q, dev, inplace=True)
            with fl.gemm_threads(self.threads):
                gains, cur = fl.ranking_gains(pool.xs, ranking, pool.scale_exp)
            self.ranking_, self.gains_ = ranking, gains
            self.scores_ = (1.0 - alpha) * gains / len(x) + alpha * q[ranking]
        self.objective_, self.diversity_, self.quality_mean_ = score_from_cur(
            cur, pool.scale_exp, q[self.ranking_], alpha)
