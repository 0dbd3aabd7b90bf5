"""MDIT (Li et al.): cross-task mix planning, mixed vectors, nearest-to-centroid selection.

Pure numpy; the stages ``mix`` and ``cluster`` wire these to files.

**Plan.** For every task pair (A, B) (default: all pairs of distinct tasks) and
``T = mixes_per_pair`` rounds, examples of A are matched one-to-one with examples
of B by input token length: lengths fall into buckets of ``bucket_width`` tokens
(``bucket = length // bucket_width``), a partner comes from the *same* bucket when
one is free, else from the *nearest* bucket that has one (at most
``max_bucket_gap`` buckets away, when set). Each round matches every example of
the smaller side once; an example of the larger side is used at most once per
round, the least-used first. So every example takes part in at most T mixes per
partner task, and no (a, b) pair repeats. Each mix gets ``λ ~ Beta(α, α)`` and
means ``(a, b, λ)``: input ``λ·E(x_a) + (1−λ)·E(x_b)``, target mixed the same way
(methods.md §2). Examples longer than ``max_length`` tokens are not mixed.
Deterministic under ``seed``; a pair's plan depends only on the seed, the pair's
two task names and their examples, not on the other pairs.

**Vectors.** A mix's fixed vector is ``λ·v_a + (1−λ)·v_b`` (``mix_vectors``).

**Selection.** After KMeans on originals ∪ mixes, keep per cluster the points
nearest their centroid, ``per_cluster`` (default ``⌊budget/m⌋``) each, then fill
the rest of the budget with the remaining points in global distance order
(``select_nearest``).
"""

from __future__ import annotations

import bisect
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from mixray.errors import MixInputError

LAMBDA_EPS = 1e-12  # λ is clipped to [ε, 1−ε]: a Beta draw can round to exactly 0 or 1


@dataclass
class MixPlan:
    """The planned mixes, one entry per mix (all arrays of length M)."""

    a: np.ndarray  # int64 index of the first example (weight λ)
    b: np.ndarray  # int64 index of the second example (weight 1 − λ)
    lam: np.ndarray  # float64 λ ∈ (0, 1)
    pair: np.ndarray  # int64 index into ``pairs``
    round: np.ndarray  # int64 0 … T−1
    bucket_a: np.ndarray  # int64 length bucket of a
    bucket_b: np.ndarray  # int64 length bucket of b
    pairs: list[tuple[str, str]]  # the task pairs (task_a, task_b)

    def __len__(self) -> int:
        return len(self.a)


def default_pairs(tasks: Sequence[str]) -> list[tuple[str, str]]:
    """All pairs of distinct tasks, in sorted order: [(A, B), (A, C), (B, C), …]."""
    return list(combinations(sorted(set(tasks)), 2))


def check_plan_inputs(tasks: np.ndarray, lengths: np.ndarray, pairs: list[tuple[str, str]] | None,
                      alpha: float, mixes_per_pair: int, bucket_width: int,
                      max_length: int | None, max_bucket_gap: int | None) -> list[tuple[str, str]]:
    """Validate at the boundary; return the task pairs to mix. Raises MixInputError naming the problem."""
    if not alpha > 0:
        raise MixInputError(f"alpha must be > 0 (λ ~ Beta(alpha, alpha)), got {alpha}")
    if mixes_per_pair < 1:
        raise MixInputError(f"mixes_per_pair (T) must be >= 1, got {mixes_per_pair}")
    if bucket_width < 1:
        raise MixInputError(f"bucket_width must be >= 1 token, got {bucket_width}")
    if max_bucket_gap is not None and max_bucket_gap < 0:
        raise MixInputError(f"max_bucket_gap must be >= 0, got {max_bucket_gap}")
    if max_length is not None and max_length < 1:
        raise MixInputError(f"max_length must be >= 1, got {max_length}")
    if tasks.shape != lengths.shape or tasks.ndim != 1:
        raise MixInputError(f"tasks and lengths must be 1-D of equal length, got {tasks.shape} "
                         f"and {lengths.shape}")
    if len(lengths) and lengths.min() < 0:
        raise MixInputError("token lengths must be >= 0")
    present = sorted(set(tasks.tolist()))
    if pairs is None:
        if len(present) < 2:
            raise MixInputError(f"MDIT mixes examples of different tasks, but the data has "
                             f"{len(present)} task(s): {present}")
        pairs = default_pairs(present)
    seen: set[frozenset] = set()
    for a, b in pairs:
        for t in (a, b):
            if t not in present:
                raise MixInputError(f"task pair ({a}, {b}): task {t!r} is not in the data "
                                 f"(tasks: {', '.join(present)})")
        if a == b:
            raise MixInputError(f"task pair ({a}, {b}): MDIT mixes two different tasks")
        if frozenset((a, b)) in seen:
            raise MixInputError(f"task pair ({a}, {b}) is listed twice")
        seen.add(frozenset((a, b)))
    usable = usable_examples(lengths, max_length)
    for t in sorted({t for p in pairs for t in p}):
        if not usable[tasks == t].any():
            raise MixInputError(f"task {t!r} has no examples in any usable bucket: all "
                             f"{int((tasks == t).sum())} are longer than max_length={max_length} tokens")
    return [tuple(p) for p in pairs]


def usable_examples(lengths: np.ndarray, max_length: int | None) -> np.ndarray:
    """``[N]`` bool: the examples that may be mixed (input no longer than ``max_length``)."""
    return lengths <= max_length if max_length is not None else np.ones(len(lengths), bool)


def _pair_rng(seed: int, a: str, b: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(a.encode()), zlib.crc32(b.encode())])


def _take(queue: deque, avoid: set) -> int | None:
    """Pop the first element of ``queue`` not in ``avoid`` (None if there is none)."""
    for i, x in enumerate(queue):
        if x not in avoid:
            del queue[i]
            return x
    return None


def _match_round(small: np.ndarray, small_bucket: np.ndarray, large: np.ndarray,
                 large_bucket: np.ndarray, usage: np.ndarray, partners: dict[int, set],
                 max_gap: int | None, rng: np.random.Generator) -> list[tuple[int, int]]:
    """One round: each ``small`` example gets at most one ``large`` partner, each ``large``
    example is used at most once; same bucket first, then the nearest bucket.

    ``usage[j]`` counts earlier uses of ``large[j]`` (least used are taken first);
    ``partners[i]`` holds the large positions already paired with ``small[i]``.
    Returns (small position, large position) pairs.
    """
    order = np.lexsort((rng.random(len(large)), usage))  # least used first, random among equals
    queues: dict[int, deque] = {}
    for j in order:
        queues.setdefault(int(large_bucket[j]), deque()).append(int(j))
    nonempty = sorted(queues)
    out: list[tuple[int, int]] = []

    def take_from(bucket: int, i: int) -> bool:
        j = _take(queues[bucket], partners[i])
        if j is None:
            return False
        out.append((i, j))
        if not queues[bucket]:
            nonempty.remove(bucket)
        return True

    deferred = []
    for i in rng.permutation(len(small)):  # pass 1: the same bucket
        b = int(small_bucket[i])
        if not (queues.get(b) and take_from(b, int(i))):
            deferred.append(int(i))
    for i in deferred:  # pass 2: the nearest bucket with a free partner
        b = int(small_bucket[i])
        pos = bisect.bisect_left(nonempty, b)
        lo, hi = pos - 1, pos
        while lo >= 0 or hi < len(nonempty):
            use_lo = hi >= len(nonempty) or (lo >= 0 and b - nonempty[lo] <= nonempty[hi] - b)
            cand = nonempty[lo] if use_lo else nonempty[hi]
            if max_gap is not None and abs(cand - b) > max_gap:
                break
            if take_from(cand, i):
                break
            # every free example of that bucket is already a partner: look one further out
            if use_lo:
                lo -= 1
            else:
                hi += 1
    return out


def plan_mixes(tasks: Sequence[str], lengths: Sequence[int], *,
               pairs: list[tuple[str, str]] | None = None, alpha: float = 8.0,
               mixes_per_pair: int = 1, bucket_width: int = 32, max_length: int | None = None,
               max_bucket_gap: int | None = None, seed: int = 0) -> MixPlan:
    """Plan MDIT's cross-task mixes (see the module docstring).

    ``tasks [N]`` task name per example, ``lengths [N]`` input token length per
    example -> ``MixPlan`` of M mixes, sorted by (pair, round, a).
    """
    tasks = np.asarray(tasks, dtype=object)
    lengths = np.asarray(lengths, dtype=np.int64)
    pairs = check_plan_inputs(tasks, lengths, pairs, alpha, mixes_per_pair, bucket_width,
                              max_length, max_bucket_gap)
    bucket = lengths // bucket_width
    usable = usable_examples(lengths, max_length)
    cols: dict[str, list] = {k: [] for k in ("a", "b", "lam", "pair", "round")}
    for p, (ta, tb) in enumerate(pairs):
        rng = _pair_rng(seed, ta, tb)
        ia = np.flatnonzero((tasks == ta) & usable)
        ib = np.flatnonzero((tasks == tb) & usable)
        a_small = len(ia) <= len(ib)
        small, large = (ia, ib) if a_small else (ib, ia)
        usage = np.zeros(len(large), dtype=np.int64)
        partners: dict[int, set] = {i: set() for i in range(len(small))}
        for r in range(mixes_per_pair):
            matched = _match_round(small, bucket[small], large, bucket[large], usage, partners,
                                   max_bucket_gap, rng)
            if not matched:
                continue
            si = np.array([m[0] for m in matched])
            li = np.array([m[1] for m in matched])
            usage[li] += 1
            for i, j in matched:
                partners[i].add(j)
            ex_a, ex_b = (small[si], large[li]) if a_small else (large[li], small[si])
            keep = np.argsort(ex_a, kind="stable")
            cols["a"].append(ex_a[keep])
            cols["b"].append(ex_b[keep])
            cols["pair"].append(np.full(len(keep), p))
            cols["round"].append(np.full(len(keep), r))
            cols["lam"].append(rng.beta(alpha, alpha, size=len(keep)))
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    a, b = cat["a"].astype(np.int64), cat["b"].astype(np.int64)
    return MixPlan(a=a, b=b, lam=np.clip(cat["lam"].astype(np.float64), LAMBDA_EPS, 1 - LAMBDA_EPS),
                   pair=cat["pair"].astype(np.int64), round=cat["round"].astype(np.int64),
                   bucket_a=bucket[a], bucket_b=bucket[b], pairs=pairs)


def mix_vectors(V: np.ndarray, a: np.ndarray, b: np.ndarray, lam: np.ndarray,
                rows: int = 1 << 14) -> np.ndarray:
    """Vectors of the mixed samples: ``out[m] = λ_m·V[a_m] + (1 − λ_m)·V[b_m]``.

    ``V [N, d]``, ``a, b [M]`` row indices, ``lam [M]`` -> ``[M, d]`` in ``V``'s dtype
    (computed in float64, ``rows`` mixes at a time).
    """
    out = np.empty((len(a), V.shape[1]), dtype=V.dtype)
    for s in range(0, len(a), rows):
        la = np.asarray(lam[s : s + rows], dtype=np.float64)[:, None]
        out[s : s + rows] = la * V[a[s : s + rows]] + (1.0 - la) * V[b[s : s + rows]]
    return out


def select_nearest(labels: np.ndarray, dist: np.ndarray, budget: int, n_clusters: int,
                   per_cluster: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-to-centroid selection: ``(indices [budget], position in own cluster [budget])``.

    ``labels [N]`` cluster of each point, ``dist [N]`` its distance to the centroid.
    1. Per cluster, the ``q = per_cluster`` (default ``⌊budget/m⌋``) points nearest
       the centroid (all of a smaller cluster).
    2. The rest of the budget: the remaining points by distance, globally.
    The returned order is the rank: step-1 points round-robin over clusters (every
    cluster's nearest, then every cluster's second nearest, …; by distance within a
    round), then the step-2 points by distance; ties by lower index. So any prefix
    of length ``j·m`` (``j ≤ q``) holds the ``j`` nearest of every cluster.
    """
    labels, dist = np.asarray(labels), np.asarray(dist, dtype=np.float64)
    n = len(labels)
    if not 1 <= budget <= n:
        raise MixInputError(f"budget={budget} must be between 1 and the pool size {n}")
    q = budget // n_clusters if per_cluster is None else per_cluster
    if q < 0:
        raise MixInputError(f"per_cluster must be >= 0, got {per_cluster}")
    idx = np.arange(n)
    by_cluster = np.lexsort((idx, dist, labels))  # cluster, then distance, then index
    pos = np.empty(n, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, labels[by_cluster][1:] != labels[by_cluster][:-1]])
    sizes = np.diff(np.r_[starts, n])
    pos[by_cluster] = np.arange(n) - np.repeat(starts, sizes)
    first = np.flatnonzero(pos < q)
    first = first[np.lexsort((first, dist[first], pos[first]))][:budget]
    rest_mask = np.ones(n, dtype=bool)
    rest_mask[first] = False
    rest = np.flatnonzero(rest_mask)
    rest = rest[np.lexsort((rest, dist[rest]))][: budget - len(first)]
    chosen = np.concatenate([first, rest])
    return chosen, pos[chosen]
