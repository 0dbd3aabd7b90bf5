"""The prepared pool (scaled embeddings and quality as tensors) and the dispatch to a greedy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mixray.algorithms.cores import resolve_threads
from mixray.algorithms.facility.cache import choose_threshold
from mixray.algorithms.facility.dense import make_shard
from mixray.algorithms.facility.greedy import (
    GreedyResult,
    GreedyState,
    LocalShards,
    Shards,
    StepCallback,
    lazy_greedy,
    naive_greedy,
    stochastic_sample_size,
)
from mixray.algorithms.facility.kernels import EMBED_SCALE
from mixray.algorithms.threads import gemm_threads


@dataclass
class Pool:
    """Validated, normalised inputs in the units the kernels use."""

    xs: torch.Tensor  # [N, d] float32, 2^11·x (unit rows scaled)
    q: torch.Tensor  # [N] float64 normalised quality (zeros when unused)

    @property
    def n(self) -> int:
        return self.xs.shape[0]

    @classmethod
    def build(cls, x_unit: np.ndarray, q: np.ndarray, device: torch.device,
              inplace: bool = False) -> Pool:
        """``x_unit`` [N, d] unit rows, ``q`` [N]. ``inplace=True`` scales ``x_unit`` itself
        (saves a copy of N×d; the caller gives it up)."""
        xs = torch.from_numpy(np.ascontiguousarray(x_unit, dtype=np.float32))
        if inplace and xs.device == device:
            xs.mul_(EMBED_SCALE)
        else:
            xs = xs.to(device) * EMBED_SCALE
        return cls(xs, torch.from_numpy(np.asarray(q, dtype=np.float64)))


def choose_theta(pool: Pool, budget_bytes: int, n_candidates: int | None = None) -> float:
    """The scaled cache threshold for ``budget_bytes`` (8 bytes per cached pair)."""
    return choose_threshold(pool.xs, pool.xs, n_candidates or pool.n, budget_bytes // 8)


def split_columns(n: int, parts: int) -> list[np.ndarray]:
    """Contiguous column ranges for ``parts`` shards (their cur concatenates in order)."""
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def local_shards(pool: Pool, n_shards: int, budget_bytes: int,
                 start: GreedyState | None = None, threads: int | None = None) -> LocalShards:
    """``n_shards`` in-process column shards (1 = the plain single-process run).

    More than one shard does not run faster in one process; it is the in-process
    image of the sharded greedy over Ray actors, for tests.
    """
    parts = split_columns(pool.n, n_shards)
    cur = None if start is None or start.step == 0 else torch.from_numpy(start.cur)
    step = 0 if start is None else start.step
    shards = []
    for cols in parts:
        c = None if len(parts) == 1 else torch.from_numpy(cols)
        shard_cur = None if cur is None else cur[int(cols[0]):int(cols[-1]) + 1]
        shards.append(make_shard(pool.xs, c, budget_bytes // len(parts), cur=shard_cur,
                                 step=step, threads=threads))
    return LocalShards(shards)


def run_greedy(pool: Pool, k: int, alpha: float, optimizer: str, *, shards: Shards | None = None,
               budget_bytes: int = 512 << 20, epsilon: float = 0.01, seed: int = 0,
               candidates: np.ndarray | None = None, start: GreedyState | None = None,
               callback: StepCallback | None = None, callback_every: int = 0,
               threads: int | None = None) -> GreedyResult:
    """Dispatch to the greedy variant (valid inputs assumed).

    ``threads``: torch threads for the large matrix products; everything else
    runs single-threaded (see :class:`~mixray.algorithms.threads.gemm_threads`).
    """
    cand = None if candidates is None else torch.as_tensor(np.asarray(candidates, dtype=np.int64))
    threads = resolve_threads(threads)
    if optimizer == "naive":
        with gemm_threads(threads):
            return naive_greedy(pool.xs, pool.q, alpha, k, candidates=cand, start=start,
                                callback=callback, callback_every=callback_every)
    n_cand = pool.n if cand is None else len(cand)
    if shards is None:
        shards = local_shards(pool, 1, budget_bytes, start, threads)
    theta = choose_theta(pool, budget_bytes, n_cand)
    sample = stochastic_sample_size(n_cand, k, epsilon) if optimizer == "stochastic" else None
    with gemm_threads(1):
        return lazy_greedy(shards, pool.q, alpha, k, n_pool=pool.n, theta=theta, candidates=cand,
                           start=start, sample_size=sample, seed=seed, callback=callback,
                           callback_every=callback_every)
