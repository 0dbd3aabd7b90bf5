"""GreeDi (Mirzasoleiman et al. 2013): greedy per partition, then greedy over the union of the picks.

``partitions`` (the glossary's word for GreeDi's data partitions) seeded random
parts; round 1 may run in parallel (``mixray.distributed.selection`` runs it in
Ray tasks), round 2 uses the whole pool as ground set and the union as candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mixray.algorithms.devices import resolve_device
from mixray.algorithms.facility.greedy import GreedyResult
from mixray.algorithms.facility.pool import Pool, run_greedy


def greedi_partitions(n: int, m: int, seed: int) -> list[np.ndarray]:
    """A seeded random split of ``range(n)`` into ``m`` parts of near-equal size (each sorted)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, m) if len(p)]


def greedi_union(picks: Sequence[np.ndarray]) -> np.ndarray:
    """The sorted union of the per-partition selections (round 2's candidates)."""
    return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in picks]))


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
           **round2) -> tuple[GreedyResult, list[np.ndarray]]:
    """GreeDi: greedy per partition, then greedy over the union of the picks.

    ``pool`` the prepared full pool, ``x_unit`` [N, d] its unit rows, ``q`` [N]
    normalised quality. Round 1 runs :func:`greedi_round1` on each of
    ``partitions`` seeded random parts (``run_partitions(parts) -> picks`` may run
    them in parallel; default: one after the other). Round 2 uses the full pool
    as the ground set V (gains exact over all N points) and the union as
    candidates. With one partition, round 2 reproduces round 1's ranking.
    """
    parts = greedi_partitions(pool.n, partitions, seed)
    if run_partitions is None:
        share = budget_bytes // len(parts)
        picks = [greedi_round1(x_unit, q, p, k, alpha, optimizer, share, epsilon, seed)
                 for p in parts]
    else:
        picks = run_partitions(parts)
    union = greedi_union(picks)
    res = run_greedy(pool, min(k, len(union)), alpha, optimizer, budget_bytes=budget_bytes,
                     epsilon=epsilon, seed=seed, candidates=union, **round2)
    return res, picks
