"""QDIT selection over Ray actors: sharded exact greedy and GreeDi.

*Sharded exact greedy* (:func:`sharded_select`): the pool's points (columns) are
split into ``concurrency`` contiguous shards, one per Ray actor. Each actor
holds its shard's running max and sparse high-similarity cache (a
:class:`~mixray.algorithms.facility.ColumnShard`) over the read-only embeddings
in the object store; the driver runs the same lazy greedy as a single process
and, each round, sends a batch of candidate ids; the actors return their
partial gains and the driver sums them. Partial gains are exact integer-valued
float64 sums, so the result is identical to the single-process greedy. Memory
per actor is O((N/P)·d + budget/P) plus the shared embeddings.

*GreeDi* (:func:`greedi_select`, Mirzasoleiman et al. 2013): greedy per
partition in ``partitions`` parallel Ray tasks, then greedy over the union of
their picks on the driver (full pool as ground set).

Knobs (the glossary of README.md): ``concurrency`` Ray actors, ``partitions``
GreeDi partitions (an algorithm parameter: one Ray task each), ``num_cpus`` /
``num_gpus`` per actor or task (``num_gpus="auto"``: one GPU each when the
cluster has GPUs), ``threads`` torch threads per actor or task (default:
``num_cpus``). This module only distributes layer-1 functions; it does no file I/O.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from mixray.algorithms import facility as fl
from mixray.algorithms import qdit
from mixray.algorithms.cores import kernel_env
from mixray.algorithms.devices import resolve_device
from mixray.algorithms.params import Interval, Options, validate
from mixray.choices import SELECT_OPTIMIZERS
from mixray.distributed.runtime import gpus_per_actor
from mixray.errors import SelectionInputError

log = logging.getLogger("mixray.selection")


class _ShardActor:
    """One column shard in a Ray actor (wrapped with ``ray.remote`` at run time)."""

    def __init__(self, xs: np.ndarray, lo: int, hi: int, budget_bytes: int,
                 cur: np.ndarray | None, step: int, use_gpu: bool, threads: int | None):
        import torch

        torch.set_num_threads(1)  # small ops single-threaded; matrix products get ``threads``
        device = resolve_device("auto" if use_gpu else "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the object-store array is read-only; we never write it
            xs_t = torch.from_numpy(xs).to(device)
        n = xs.shape[0]
        cols = None if (lo == 0 and hi == n) else torch.arange(lo, hi, device=device)
        self.shard = fl.make_shard(xs_t, cols, budget_bytes,
                                   cur=None if cur is None else torch.from_numpy(cur), step=step,
                                   threads=threads)

    def first_pass(self, cand: np.ndarray, theta: float) -> np.ndarray:
        import torch

        return self.shard.first_pass(torch.from_numpy(cand), theta).cpu().numpy()

    def evaluate(self, cand: np.ndarray, tau: np.ndarray) -> np.ndarray:
        import torch

        return self.shard.evaluate(torch.from_numpy(cand), torch.from_numpy(tau)).cpu().numpy()

    def select(self, a: int) -> tuple[float, float]:
        return self.shard.select(a)

    def cur_values(self) -> np.ndarray:
        return self.shard.cur_values().cpu().numpy()

    def stats(self) -> dict[str, int]:
        return dict(self.shard.stats)


class RayShards:
    """The :class:`~mixray.algorithms.facility.Shards` protocol over ``concurrency`` Ray actors
    (sums the parts)."""

    def __init__(self, pool: fl.Pool, concurrency: int, budget_bytes: int, *,
                 start: fl.GreedyState | None = None, num_gpus: float | str = "auto",
                 num_cpus: float = 1, threads: int | None = None, device: str = "auto"):
        import ray
        import torch

        gpus = gpus_per_actor(num_gpus, device=device, where="num_gpus")
        xs_ref = ray.put(pool.xs.cpu().numpy())
        parts = fl.split_columns(pool.n, concurrency)
        step = 0 if start is None else start.step
        actor_cls = ray.remote(_ShardActor).options(num_cpus=num_cpus, num_gpus=gpus,
                                                    runtime_env={"env_vars": kernel_env()})
        self.actors = []
        for cols in parts:
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            cur = None if start is None or start.step == 0 else np.ascontiguousarray(start.cur[lo:hi])
            self.actors.append(actor_cls.remote(xs_ref, lo, hi, budget_bytes // len(parts), cur,
                                                step, gpus > 0, threads or max(1, int(num_cpus))))
        log.info("select: %d %s shard actor(s) over N=%d points", len(self.actors),
                 "GPU" if gpus else "CPU", pool.n)
        self._torch = torch

    def _sum(self, refs: list[Any]) -> Any:
        import ray

        return self._torch.from_numpy(np.sum(ray.get(refs), axis=0))

    def first_pass(self, cand, theta: float):
        c = cand.numpy()
        return self._sum([a.first_pass.remote(c, theta) for a in self.actors])

    def evaluate(self, cand, tau):
        c, t = cand.numpy(), tau.numpy()
        return self._sum([a.evaluate.remote(c, t) for a in self.actors])

    def select(self, a: int) -> tuple[float, float]:
        import ray

        parts = ray.get([actor.select.remote(a) for actor in self.actors])
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def cur_values(self) -> np.ndarray:
        import ray

        return np.concatenate(ray.get([a.cur_values.remote() for a in self.actors]))

    def stats(self) -> dict[str, int]:
        import ray

        out: dict[str, int] = {}
        for st in ray.get([a.stats.remote() for a in self.actors]):
            for k, v in st.items():
                out[k] = out.get(k, 0) + v
        return out

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def sharded_select(selector: qdit.QDITSelector, embeddings, quality=None, *, concurrency: int = 2,
                   initial_state: fl.GreedyState | None = None, num_gpus: float | str = "auto",
                   num_cpus: float = 1, threads: int | None = None) -> qdit.QDITSelector:
    """``selector.fit`` with the pool's points sharded over ``concurrency`` Ray actors (same result).

    Each actor reserves ``num_cpus`` CPUs and ``num_gpus`` GPUs and runs ``threads``
    torch threads (default ``num_cpus``). Ray must be initialised by the caller.
    """
    concurrency = Interval(int, 1, None).check("concurrency", concurrency, SelectionInputError)
    p = validate(selector.get_params(deep=False), selector._constraints, SelectionInputError)
    x = qdit.check_embeddings(embeddings)
    q = qdit.prepare_quality(quality, len(x), p["normalize_quality"])
    pool = fl.Pool.build(x, q, resolve_device("cpu"), inplace=True)
    budget = int(p["memory_budget_mb"] * (1 << 20))
    shards = RayShards(pool, concurrency, budget, start=initial_state, num_gpus=num_gpus,
                       num_cpus=num_cpus, threads=threads, device=p["device"])
    try:
        return selector.fit(embeddings, quality, initial_state=initial_state, shards=shards)
    finally:
        shards.shutdown()


def _round1_task(x_unit: np.ndarray, q: np.ndarray, part: np.ndarray, k: int, alpha: float,
                 optimizer: str, budget_bytes: int, epsilon: float, seed: int, device: str,
                 threads: int | None) -> np.ndarray:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return fl.greedi_round1(x_unit, q, part, k, alpha, optimizer, budget_bytes, epsilon, seed,
                            device=device)


def greedi_select(embeddings, quality, k: int, alpha: float, *, partitions: int,
                  optimizer: str = "lazy", random_state: int = 0, memory_budget_mb: float = 512,
                  epsilon: float = 0.01, normalize_quality: bool = True,
                  num_gpus: float | str = "auto", num_cpus: float = 1, threads: int | None = None,
                  device: str = "auto") -> tuple[fl.GreedyResult, list[np.ndarray], fl.Pool]:
    """GreeDi with round 1 in ``partitions`` parallel Ray tasks and round 2 on the driver.

    ``random_state`` seeds the partitions (and stochastic greedy); each task reserves
    ``num_cpus``/``num_gpus`` and runs ``threads`` torch threads. Returns (round-2
    result, round-1 picks per partition, the prepared pool).
    """
    import ray

    x = qdit.check_embeddings(embeddings)
    n = len(x)
    k, alpha = qdit.check_k(k, n), qdit.check_alpha(alpha)
    partitions, random_state, memory_budget_mb, epsilon = (
        rule.check(name, value, SelectionInputError) for name, value, rule in (
            ("partitions", partitions, Interval(int, 1, None)),
            ("random_state", random_state, Interval(int, 0, None)),
            ("memory_budget_mb", memory_budget_mb, Interval(float, 0, None)),
            ("epsilon", epsilon, Interval(float, 0, 1, closed="neither"))))
    Options(SELECT_OPTIMIZERS).check("optimizer", optimizer, SelectionInputError)
    q = qdit.prepare_quality(quality, n, normalize_quality)
    gpus = gpus_per_actor(num_gpus, device=device, where="num_gpus")
    budget = int(memory_budget_mb * (1 << 20))
    x_ref, q_ref = ray.put(x), ray.put(q)
    task = ray.remote(_round1_task).options(num_cpus=num_cpus, num_gpus=gpus,
                                            runtime_env={"env_vars": kernel_env()})
    part_device = "cuda" if gpus > 0 else "cpu"

    def run_partitions(parts: list[np.ndarray]) -> list[np.ndarray]:
        refs = [task.remote(x_ref, q_ref, p, k, alpha, optimizer, budget // len(parts), epsilon,
                            random_state, part_device, threads or max(1, int(num_cpus)))
                for p in parts]
        return ray.get(refs)

    pool = fl.Pool.build(x, q, resolve_device(device, where="device"), inplace=True)
    res, picks = fl.greedi(pool, x, q, k, alpha, optimizer, partitions, random_state, budget,
                           epsilon, run_partitions=run_partitions)
    return res, picks, pool
