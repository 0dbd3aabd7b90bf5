"""The greedy drivers (shard-agnostic): exact lazy greedy, stochastic greedy, the naive reference.

They see the pool only through a :class:`Shards` object (in-process column
shards, or Ray actors holding them), so the same driver runs a single process
and the sharded greedy, with bit-identical results.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from mixray.algorithms.facility.kernels import UNIT, dense_gains
from mixray.algorithms.facility.shard import ColumnShard
from mixray.errors import SelectionInputError

log = logging.getLogger("mixray.facility")


class Shards(Protocol):
    """What the greedy driver needs from a set of column shards (local or Ray actors)."""

    def first_pass(self, cand: torch.Tensor, theta: float) -> torch.Tensor: ...
    def evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor: ...
    def select(self, a: int) -> tuple[float, float]: ...
    def cur_values(self) -> np.ndarray: ...


class LocalShards:
    """Shards in this process (one for a plain single-process run)."""

    def __init__(self, shards: list[ColumnShard]):
        self.shards = shards

    def first_pass(self, cand: torch.Tensor, theta: float) -> torch.Tensor:
        return sum(s.first_pass(cand, theta).cpu() for s in self.shards)

    def evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return sum(s.evaluate(cand, tau).cpu() for s in self.shards)

    def select(self, a: int) -> tuple[float, float]:
        parts = [s.select(a) for s in self.shards]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def cur_values(self) -> np.ndarray:
        return np.concatenate([s.cur_values().cpu().numpy() for s in self.shards])

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for k, v in s.stats.items():
                out[k] = out.get(k, 0) + v
        return out


@dataclass
class GreedyState:
    """Everything needed to continue a greedy run with the identical result.

    ``selected`` [t] int64, ``gains`` [t] (marginal diversity gain d(a|A), unscaled)
    and ``scores`` [t] (f) per step; ``cur`` the scaled running max (float32 [N],
    bit-exact; None for a ranking that was not produced by the greedy).
    """

    selected: np.ndarray
    gains: np.ndarray
    scores: np.ndarray
    cur: np.ndarray | None

    @property
    def step(self) -> int:
        return len(self.selected)


@dataclass
class GreedyResult:
    ranking: np.ndarray  # [K] selection order
    gains: np.ndarray  # [K] d(a|A) at selection, unscaled
    scores: np.ndarray  # [K] f(a|A, α) at selection
    cur: np.ndarray  # [N] final scaled running max
    stats: dict = field(default_factory=dict)

    def state(self) -> GreedyState:
        return GreedyState(self.ranking, self.gains, self.scores, self.cur)


StepCallback = Callable[[GreedyState], None]


def score(g_scaled: torch.Tensor, q: torch.Tensor, alpha: float, n: int) -> torch.Tensor:
    """f = (1−α)·(g·2^−22)/N + α·q in float64 — monotone in g, so stale gains give upper bounds."""
    return (1.0 - alpha) * (g_scaled * UNIT / n) + alpha * q


class _Trace:
    """The selections so far (resumed from a state), the callback and the progress log."""

    def __init__(self, start: GreedyState | None, n: int, k: int, callback: StepCallback | None,
                 every: int):
        if start is not None and start.step and len(start.cur) != n:
            raise SelectionInputError(f"the greedy state is for a pool of {len(start.cur)} points, "
                                      f"not N={n}")
        resumed = start is not None and start.step > 0
        self.sel = list(start.selected) if resumed else []
        self.gains = list(start.gains) if resumed else []
        self.scores = list(start.scores) if resumed else []
        self.cur = torch.from_numpy(start.cur) if resumed else None
        self.k, self.callback, self.every = k, callback, every
        self.t_start = self.last_report = time.perf_counter()
        self.report_every = max(1, k // 20)  # ≤ 20 lines, ≥ 5 s apart

    @property
    def t(self) -> int:
        return len(self.sel)

    def add(self, a: int, gain_scaled: float, f: float, cur_values: Callable[[], np.ndarray],
            n_eval: int | None = None) -> None:
        self.sel.append(a)
        self.gains.append(gain_scaled * UNIT)
        self.scores.append(f)
        t, now = self.t, time.perf_counter()
        if n_eval is not None and (t == self.k or (t % self.report_every == 0
                                                   and now - self.last_report >= 5.0)):
            self.last_report = now
            log.info("greedy: %d/%d selected, %d evaluations, %.1f s", t, self.k, n_eval,
                     now - self.t_start)
        if self.callback is not None and self.every and t % self.every == 0 and t < self.k:
            self.callback(GreedyState(*self._arrays(), cur_values()))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.asarray(self.sel, dtype=np.int64), np.asarray(self.gains, dtype=np.float64),
                np.asarray(self.scores, dtype=np.float64))

    def result(self, cur: np.ndarray, stats: dict | None = None) -> GreedyResult:
        return GreedyResult(*self._arrays(), cur, stats or {})


class _LazyBounds:
    """Per-candidate lazy state: the last exact gain ``g`` (scaled), its score ``f`` — an upper
    bound of the current f (d is submodular, q modular) — and the step ``tau`` it is exact at.

    Exact mode keeps a shortlist: the top ``short_size`` bounds (sorted ids) and the largest
    bound outside it. Bounds outside never change until the next rebuild (only shortlisted
    candidates are evaluated or selected), so a fresh best that beats ``outside`` is the
    global argmax and rounds cost O(short_size) instead of O(N).
    """

    def __init__(self, shards: Shards, q: torch.Tensor, alpha: float, n: int, max_batch: int,
                 short_size: int):
        self.shards, self.q, self.alpha, self.n = shards, q, alpha, n
        self.max_batch, self.short_size = max_batch, short_size
        self.g = torch.full((n,), -math.inf, dtype=torch.float64)
        self.active = torch.zeros(n, dtype=torch.bool)
        self.short, self.outside = None, math.inf
        self.first_chunk, self.n_eval = 16, 0

    def first_pass(self, candidates: torch.Tensor | None, selected: list[int], theta: float,
                   t: int) -> None:
        """Exact gains of every remaining candidate at step ``t`` (and the shards' sparse caches)."""
        cand = torch.arange(self.n) if candidates is None else candidates.cpu().long()
        self.active[cand] = True
        if selected:
            self.active[torch.as_tensor(selected)] = False
        remaining = cand[self.active[cand]]
        t_start = time.perf_counter()
        if len(remaining):
            self.g[remaining] = self.shards.first_pass(remaining, theta)
        log.info("greedy: first pass over %d candidates x %d points in %.1f s (theta=%.3f)",
                 len(remaining), self.n, time.perf_counter() - t_start, theta * UNIT)
        self.tau = torch.full((self.n,), t, dtype=torch.long)
        self.f = torch.where(self.active, score(self.g, self.q, self.alpha, self.n),
                             torch.tensor(-math.inf, dtype=torch.float64))

    def sample(self, size: int, seed: int, t: int) -> torch.Tensor:
        """Stochastic greedy's view at step t: ``size`` remaining candidates drawn with
        ``default_rng([seed, t])`` (reproducible and resumable), sorted."""
        pool = self.active.nonzero().flatten().numpy()
        if size < len(pool):
            pool = np.sort(np.random.default_rng([seed, t]).choice(pool, size, replace=False))
        return torch.from_numpy(pool)

    def next_best(self, t: int, view: torch.Tensor | None) -> int:
        """The argmax of f at step t over ``view`` (None: every candidate), ties to the lower id.

        Lazy rounds: a stale bound can only matter if it beats the best fresh f so far
        (or ties it with a lower index); those are evaluated, largest bound first, in
        chunks that double within a step, until the argmax is fresh.
        """
        chunk, evals = self.first_chunk, 0
        while True:
            v, outside = (view, -math.inf) if view is not None else self._shortlisted()
            fv, tv = self.f[v], self.tau[v]
            i = int(torch.argmax(fv))
            if tv[i] == t and float(fv[i]) > outside:
                self.n_eval += evals
                self.first_chunk = int(min(self.max_batch, max(8, evals // 2)))
                return int(v[i])
            idx = self._stale_candidates(v, fv, tv == t, chunk)
            if idx is None:  # everything in the shortlist is fresh but does not beat `outside`
                self.short = None
                continue
            self.g[idx] = self.shards.evaluate(idx, self.tau[idx])
            self.tau[idx] = t
            self.f[idx] = score(self.g[idx], self.q[idx], self.alpha, self.n)
            evals += len(idx)
            chunk = min(self.max_batch, 2 * chunk)

    def _shortlisted(self) -> tuple[torch.Tensor, float]:
        if self.short is None or float(self.f[self.short].max()) <= self.outside:
            self.short, self.outside = _shortlist(self.f, self.short_size)
        return self.short, self.outside

    @staticmethod
    def _stale_candidates(v: torch.Tensor, fv: torch.Tensor, fresh: torch.Tensor,
                          chunk: int) -> torch.Tensor | None:
        """Sorted ids of up to ``chunk`` stale candidates whose bound beats (or ties with a
        lower id) the best fresh f of ``v``, largest bound first; None when there are none."""
        neg_inf = torch.tensor(-math.inf, dtype=torch.float64)
        fresh_f = torch.where(fresh, fv, neg_inf)
        j = int(torch.argmax(fresh_f))
        fstar, jstar = float(fresh_f[j]), int(v[j])
        stale_f = torch.where(fresh, neg_inf, fv)
        need = (stale_f > fstar) | ((stale_f == fstar) & (v < jstar))
        n_need = int(need.sum())
        if n_need == 0:
            return None
        top = torch.topk(torch.where(need, stale_f, neg_inf), min(chunk, n_need)).indices
        return torch.sort(v[top]).values

    def take(self, a: int) -> float:
        """Remove the selected ``a``; return its f."""
        f = float(self.f[a])
        self.active[a] = False
        self.f[a] = -math.inf
        return f


def _shortlist(f: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """(ids of the ``size`` largest finite bounds, sorted; the largest bound outside them).

    Ties at the cut go into the list whole, so "outside" is strictly below every
    bound that could tie with a shortlisted one.
    """
    finite = int(torch.isfinite(f).sum())
    if finite <= size:
        return torch.isfinite(f).nonzero().flatten(), -math.inf
    cut = float(torch.topk(f, size + 1).values[-1])
    inside = f >= cut
    outside = f.masked_fill(inside, -math.inf).max()
    return inside.nonzero().flatten(), float(outside)


def lazy_greedy(shards: Shards, q: torch.Tensor, alpha: float, k: int, *, n_pool: int,
                theta: float, candidates: torch.Tensor | None = None,
                start: GreedyState | None = None, sample_size: int | None = None,
                seed: int = 0, callback: StepCallback | None = None,
                callback_every: int = 0, max_batch: int = 1024,
                short_size: int = 8192) -> GreedyResult:
    """Exact lazy greedy (``sample_size=None``) or stochastic greedy over ``shards``.

    ``q`` float64 [N] (normalised quality, zeros if unused), ``candidates`` the
    sorted global ids that may be selected (default: all), ``theta`` the scaled
    cache threshold. Stochastic greedy (``sample_size`` R) evaluates, at step t,
    a uniform sample of R remaining candidates drawn with
    ``np.random.default_rng([seed, t])`` and takes the sample's best f (lazily,
    with the same bounds). ``start`` continues a checkpointed run;
    ``callback(state)`` runs every ``callback_every`` steps. Ties are broken by
    the lower index, exactly as :func:`naive_greedy`.
    """
    trace = _Trace(start, n_pool, k, callback, callback_every)
    bounds = _LazyBounds(shards, q, alpha, n_pool, max_batch, short_size)
    bounds.first_pass(candidates, trace.sel, theta, trace.t)
    while trace.t < k:
        t = trace.t
        view = None if sample_size is None else bounds.sample(sample_size, seed, t)
        best = bounds.next_best(t, view)
        gain_s, _ = shards.select(best)
        trace.add(best, gain_s, bounds.take(best), shards.cur_values, bounds.n_eval)
    stats = {"evaluations": bounds.n_eval} | (shards.stats() if hasattr(shards, "stats") else {})
    return trace.result(shards.cur_values(), stats)


def naive_greedy(xs: torch.Tensor, q: torch.Tensor, alpha: float, k: int, *,
                 candidates: torch.Tensor | None = None, start: GreedyState | None = None,
                 callback: StepCallback | None = None, callback_every: int = 0) -> GreedyResult:
    """The textbook greedy: every step recomputes every remaining candidate's gain densely.

    O(K·N²·d) — the reference the fast optimizers are tested against. Same
    kernels and tie-breaking (lowest index among equal f) as :func:`lazy_greedy`.
    """
    n = xs.shape[0]
    shard = ColumnShard(xs, None, budget_bytes=0)
    trace = _Trace(start, n, k, callback, callback_every)
    if trace.cur is not None:
        shard.cur = trace.cur.to(xs.device).clone()
    active = torch.zeros(n, dtype=torch.bool)
    active[torch.arange(n) if candidates is None else candidates.cpu().long()] = True
    if trace.sel:
        active[torch.as_tensor(trace.sel)] = False
    qd = q.to(torch.float64)

    def cur_values() -> np.ndarray:
        return shard.cur.cpu().numpy().copy()

    while trace.t < k:
        idx = active.nonzero().flatten()
        f = score(dense_gains(xs[idx.to(xs.device)], shard.xc, shard.cur).cpu(), qd[idx], alpha, n)
        i = int(torch.argmax(f))
        best = int(idx[i])
        gain_s, _ = shard.select(best)
        active[best] = False
        trace.add(best, gain_s, float(f[i]), cur_values)
    return trace.result(cur_values())


def stochastic_sample_size(n: int, k: int, epsilon: float) -> int:
    """``⌈(N/K)·ln(1/ε)⌉`` (Mirzasoleiman et al., "Lazier than lazy greedy")."""
    return max(1, math.ceil(n / k * math.log(1.0 / epsilon)))
