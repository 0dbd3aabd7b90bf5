"""Distributed KMeans: the points sharded over Ray actors, Lloyd as map/reduce.

Each actor holds one shard of the points (``O(shard·d + k·d)`` memory; no actor
ever holds all points). One Lloyd iteration::

    driver: ref = ray.put(C)                         # the centres, broadcast once
    actor s: labels_s, sums_s [k,d], counts_s [k]    # assign + partial sums (layer 1)
    driver: sums = Σ_s sums_s, counts = Σ_s counts_s, C' = sums / counts

and the loop itself is ``mixray.algorithms.kmeans.run_lloyd`` — the same loop the
single-process ``KMeans`` runs — so with the same initial centres the two agree
to float tolerance. Empty clusters are re-seeded with the globally farthest
points (each shard offers its own farthest; the driver merges).

Initialisation (``init``):

- ``"k-means||"`` (Bahmani et al. 2012): one uniform centre, then ``init_rounds``
  rounds in which every shard keeps each of its points with probability
  ``min(1, ℓ·D(x)²/φ)`` (``ℓ = oversampling·k``, ``φ = Σ D(x)²`` reduced over the
  shards); the candidates are weighted by the number of points nearest to them
  and reduced to k centres by weighted k-means++ on the driver.
- ``"k-means++"``: k-means++ on a uniform sample of ``init_sample`` points
  gathered from the shards.
- ``"random"``: k distinct points drawn uniformly (the same points as
  ``KMeans(init="random", random_state=...)`` picks from the same data).
- an array ``[k, d]``.

Actors are GPU actors when ``num_gpus > 0`` (``"auto"`` is resolved from the Ray
cluster's resources at fit time by ``mixray.distributed.runtime.gpus_per_actor``);
CPU actors run ``threads`` torch threads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from mixray.algorithms.cores import kernel_env
from mixray.algorithms.devices import resolve_device
from mixray.algorithms.kmeans import (
    DEFAULT_CENTRE_BLOCK,
    LLOYD_CONSTRAINTS,
    LocalShards,
    as_matrix,
    assign,
    check_init,
    check_k,
    farthest,
    initial_array,
    kmeans_plusplus,
    random_indices,
    run_lloyd,
    squared_norms,
    tolerance,
)
from mixray.algorithms.params import Interval, Options, validate
from mixray.choices import DISTRIBUTED_KMEANS_INITS
from mixray.errors import ClusteringInputError, MixrayError

log = logging.getLogger("mixray.kmeans")


class KMeansShard:
    """One shard of the points and the per-shard half of every KMeans step.

    Plain Python (no Ray): ``DistributedKMeans`` runs it as a Ray actor; tests can
    call it directly. Methods take and return numpy arrays (what crosses the wire).
    """

    def __init__(self, shard_id: int, threads: int | None = None,
                 centre_block: int = DEFAULT_CENTRE_BLOCK, use_gpu: bool = False):
        self.device = resolve_device("auto" if use_gpu else "cpu")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.shard_id, self.centre_block = shard_id, centre_block
        self.local: LocalShards | None = None

    # -- loading -------------------------------------------------------------------
    def load(self, points: np.ndarray, dtype: str) -> tuple[int, np.ndarray] | str:
        """Keep ``points`` as ``dtype``; return ``(n, Σ x [d] float64)`` or an error text."""
        try:
            X = as_matrix(points, f"shard {self.shard_id}", self.device)
        except MixrayError as e:  # reported by the driver (a plain message crosses the wire)
            return str(e)
        self.X = X.to(getattr(torch, dtype))
        return int(self.X.shape[0]), self.X.double().sum(0).cpu().numpy()

    def centre(self, mean: np.ndarray, offset: int) -> float:
        """Subtract the global mean (as scikit-learn does) and note this shard's first
        global row; return ``Σ ‖x − μ‖²``."""
        self.offset = offset
        self.X -= torch.as_tensor(mean, dtype=self.X.dtype, device=self.device)
        self.local = LocalShards(self.X, self.centre_block)
        return float(self.local.x_sq.double().sum())

    def rows(self, local_idx: np.ndarray) -> np.ndarray:
        return self.X[torch.as_tensor(local_idx, device=self.device)].cpu().numpy()

    # -- k-means|| -----------------------------------------------------------------
    def _min_sq_to(self, C: np.ndarray) -> torch.Tensor:
        Ct = torch.as_tensor(C, dtype=self.X.dtype, device=self.device)
        return assign(self.X, Ct, x_sq=self.local.x_sq, centre_block=self.centre_block)[1]

    def init_cost(self, C: np.ndarray, reset: bool) -> float:
        """``D(x)² = min(D(x)², min_c ‖x − c‖²)`` over new centres ``C``; return ``φ_s = Σ D(x)²``."""
        d = self._min_sq_to(C)
        self.init_d = d if reset else torch.minimum(self.init_d, d)
        return float(self.init_d.double().sum())

    def sample(self, ell: float, phi: float, seed: int, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """Keep each point with probability ``min(1, ℓ·D(x)²/φ)``: ``(global indices, points)``."""
        rng = np.random.default_rng([seed, round_, self.shard_id])
        p = (ell * self.init_d.double() / phi).clamp_max_(1.0).cpu().numpy()
        keep = np.flatnonzero(rng.random(p.shape[0]) < p)
        # a candidate is a centre: never drawn again (its float32 D(x)² may be noise, not 0)
        self.init_d[torch.as_tensor(keep, device=self.device)] = 0
        return keep + self.offset, self.rows(keep)

    def candidate_counts(self, C: np.ndarray) -> np.ndarray:
        """How many of this shard's points are nearest to each candidate: ``[m]``."""
        Ct = torch.as_tensor(C, dtype=self.X.dtype, device=self.device)
        lab = assign(self.X, Ct, x_sq=self.local.x_sq, centre_block=self.centre_block)[0]
        return torch.bincount(lab, minlength=C.shape[0]).cpu().numpy()

    # -- Lloyd ---------------------------------------------------------------------
    def step(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        Ct = torch.as_tensor(C, dtype=self.X.dtype, device=self.device)
        sums, counts, changed = self.local.step(Ct)
        return sums.cpu().numpy(), counts.cpu().numpy(), changed

    def farthest(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This shard's ``n`` farthest points: ``(min_sq, global index, points, labels)``."""
        idx = farthest(self.local.min_sq, n)
        return (self.local.min_sq[idx].double().cpu().numpy(), idx.cpu().numpy() + self.offset,
                self.X[idx].cpu().numpy(), self.local.labels[idx].cpu().numpy())

    def finish(self, C: np.ndarray, relabel: bool) -> float:
        Ct = torch.as_tensor(C, dtype=self.X.dtype, device=self.device)
        return self.local.finish(Ct, relabel)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [n_s], Euclidean distance to the own centre [n_s])``."""
        return (self.local.labels.cpu().numpy(),
                self.local.min_sq.double().sqrt().cpu().numpy())


class _RayShards:
    """``ShardSet`` over Ray actors: what ``run_lloyd`` calls on the driver."""

    def __init__(self, actors: list, dtype: torch.dtype):
        self.actors, self.dtype = actors, dtype
        self.broadcasts = 0

    def _map(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def step(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        import ray

        ref = ray.put(centres.cpu().numpy())  # the one broadcast of this iteration
        self.broadcasts += 1
        parts = self._map("step", ref)
        sums, counts = parts[0][0].copy(), parts[0][1].copy()  # writable (results are read-only)
        for s, c, _ in parts[1:]:
            sums += s
            counts += c
        return torch.from_numpy(sums), torch.from_numpy(counts), sum(p[2] for p in parts)

    def farthest(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self._map("farthest", n)
        d = np.concatenate([p[0] for p in parts])
        g = np.concatenate([p[1] for p in parts])
        order = np.lexsort((g, -d))[:n]  # largest distance first, ties by global index
        pts = np.concatenate([p[2] for p in parts])[order]
        lab = np.concatenate([p[3] for p in parts])[order]
        return torch.from_numpy(pts).to(self.dtype), torch.from_numpy(np.array(lab))

    def finish(self, centres: torch.Tensor, relabel: bool) -> float:
        import ray

        return float(sum(self._map("finish", ray.put(centres.cpu().numpy()), relabel)))


def split_rows(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges covering ``0..n`` with sizes differing by at most 1."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class DistributedKMeans(BaseEstimator):
    """KMeans over points sharded across ``concurrency`` Ray actors (sklearn-shaped).

    ``concurrency`` is the glossary's word for the number of Ray actors a component
    runs; each actor holds one contiguous shard of the points and runs ``threads``
    torch threads (default: ``num_cpus``) on ``num_cpus`` reserved CPUs and
    ``num_gpus`` GPUs (``"auto"``: one when the Ray cluster has GPUs). ``fit(data)``
    takes an array ``[N, d]`` (split into contiguous shards, each ``ray.put``
    separately) or a list of ``concurrency`` shards (arrays or ``ObjectRef`` s of
    arrays, in row order). Sets ``cluster_centers_ [k,d]``, ``labels_ [N]``,
    ``distances_ [N]`` (Euclidean distance to the own centre), ``inertia_``,
    ``n_iter_``, ``converged_``, ``n_relocated_``, ``timings_`` (seconds per phase),
    ``broadcasts_`` (centre broadcasts by the Lloyd loop: one per iteration).
    Ray must be initialised by the caller. With the same initial centres it equals
    the single-process :class:`~mixray.algorithms.kmeans.KMeans` to float tolerance.
    """

    _constraints = LLOYD_CONSTRAINTS | {
        "concurrency": Interval(int, 1, None),
        "oversampling": Interval(float, 0, None, closed="neither"),
        "init_rounds": Interval(int, 1, None),
        "init_sample": Interval(int, 1, None, none_ok=True),
        "num_cpus": Interval(float, 0, None, closed="neither"),
        "threads": Interval(int, 1, None, none_ok=True),
        "dtype": Options((None, "float32", "float64")),
    }

    def __init__(self, n_clusters: int = 8, *, concurrency: int = 2,
                 init: str | np.ndarray = "k-means||", max_iter: int = 300, tol: float = 1e-4,
                 random_state: int = 0, oversampling: float = 2.0, init_rounds: int = 5,
                 init_sample: int | None = None, num_cpus: float = 1,
                 num_gpus: float | str = 0, threads: int | None = None,
                 dtype: str | None = None, centre_block: int = DEFAULT_CENTRE_BLOCK):
        self.n_clusters = n_clusters
        self.concurrency = concurrency
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.oversampling = oversampling
        self.init_rounds = init_rounds
        self.init_sample = init_sample
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.threads = threads
        self.dtype = dtype
        self.centre_block = centre_block

    # -- setup -----------------------------------------------------------------------
    def _shards(self, data: Any) -> tuple[list, str]:
        import ray

        p = self._p
        if isinstance(data, list | tuple):
            if len(data) != p["concurrency"]:
                raise ClusteringInputError(f"got {len(data)} shards for concurrency={p['concurrency']}")
            refs = [d if isinstance(d, ray.ObjectRef) else ray.put(np.asarray(d)) for d in data]
            return refs, p["dtype"] or "float32"
        X = as_matrix(data, "X", "cpu")
        check_k(p["n_clusters"], X.shape[0])
        if X.shape[0] < p["concurrency"]:
            raise ClusteringInputError(
                f"{X.shape[0]} points cannot fill concurrency={p['concurrency']} shards")
        Xn = X.numpy()
        refs = [ray.put(Xn[a:b]) for a, b in split_rows(X.shape[0], p["concurrency"])]
        return refs, p["dtype"] or str(X.dtype).removeprefix("torch.")

    def _start(self, refs: list, dtype: str) -> None:
        """Start the actors, load the shards, centre the points on the global mean."""
        import ray

        from mixray.distributed.runtime import gpus_per_actor

        p = self._p
        gpus = gpus_per_actor(p["num_gpus"], where="num_gpus")
        actor_cls = ray.remote(KMeansShard).options(num_cpus=p["num_cpus"], num_gpus=gpus,
                                                    runtime_env={"env_vars": kernel_env()})
        threads = p["threads"] or max(1, int(p["num_cpus"]))
        self._actors = [actor_cls.remote(i, threads, p["centre_block"], gpus > 0)
                        for i in range(p["concurrency"])]
        self._dtype = getattr(torch, dtype)
        loaded = ray.get([a.load.remote(r, dtype) for a, r in zip(self._actors, refs, strict=True)])
        refs.clear()  # the object store may free the shards: the actors hold them now
        errors = [x for x in loaded if isinstance(x, str)]
        if errors:
            raise ClusteringInputError("; ".join(errors))
        widths = {x[1].shape[0] for x in loaded}
        if len(widths) != 1:
            raise ClusteringInputError(f"shards have different numbers of features: {sorted(widths)}")
        self._offsets = np.concatenate([[0], np.cumsum([x[0] for x in loaded])])
        self._n = int(self._offsets[-1])
        check_k(p["n_clusters"], self._n)
        self._mean = sum(x[1] for x in loaded) / self._n
        sq = sum(ray.get([a.centre.remote(self._mean, int(o))
                          for a, o in zip(self._actors, self._offsets[:-1], strict=True)]))
        self._tol_abs = tolerance(p["tol"], sq, self._n, self._mean.shape[0])

    def _rows(self, global_idx: np.ndarray) -> np.ndarray:
        """Gather rows (centred) by global index, in the order asked."""
        import ray

        shard = np.searchsorted(self._offsets, global_idx, side="right") - 1
        out = None
        calls = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard)]
        parts = ray.get([self._actors[s].rows.remote(global_idx[pos] - self._offsets[s])
                         for s, pos in calls])
        for (_, pos), rows in zip(calls, parts, strict=True):
            if out is None:
                out = np.empty((len(global_idx), rows.shape[1]), dtype=rows.dtype)
            out[pos] = rows
        return out

    # -- initialisation ------------------------------------------------------------------
    def _kmeans_parallel_candidates(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k-means|| rounds: ``(global ids [m], centred points [m, d])`` of the candidates."""
        import ray

        p = self._p
        ell = p["oversampling"] * p["n_clusters"]
        idx = [np.array([rng.integers(self._n)])]
        cand = [self._rows(idx[0])]
        phi = sum(ray.get([a.init_cost.remote(cand[0], True) for a in self._actors]))
        for r in range(p["init_rounds"]):
            if phi <= 0:
                break
            parts = ray.get([a.sample.remote(ell, phi, p["random_state"], r) for a in self._actors])
            new_idx = np.concatenate([x[0] for x in parts])
            if len(new_idx) == 0:
                continue
            new = np.concatenate([x[1] for x in parts])
            idx.append(new_idx)
            cand.append(new)
            phi = sum(ray.get([a.init_cost.remote(new, False) for a in self._actors]))
        log.info("kmeans||: %d candidates from %d round(s) for k=%d", sum(map(len, idx)),
                 len(idx) - 1, p["n_clusters"])
        return np.concatenate(idx), np.concatenate(cand)

    def _kmeans_parallel(self, rng: np.random.Generator) -> np.ndarray:
        """k-means||: candidates from the shards, weighted by their nearest points, reduced to
        k centres by weighted k-means++ on the driver."""
        import ray

        k = self._p["n_clusters"]
        gidx, C = self._kmeans_parallel_candidates(rng)
        if len(gidx) < k:  # too few distinct candidates: top up with uniform points
            rest = np.setdiff1d(np.arange(self._n), gidx)
            extra = rng.choice(rest, size=k - len(gidx), replace=False)
            gidx, C = np.concatenate([gidx, extra]), np.concatenate([C, self._rows(extra)])
        ref = ray.put(C)
        w = np.sum(ray.get([a.candidate_counts.remote(ref) for a in self._actors]), axis=0)
        pick = kmeans_plusplus(torch.from_numpy(C), k, rng,
                               weights=torch.from_numpy(w.astype(np.float64)))
        return C[pick.numpy()]

    def _initial(self, rng: np.random.Generator) -> np.ndarray:
        p = self._p
        k, init = p["n_clusters"], p["init"]
        if not isinstance(init, str):
            C0 = initial_array(init, k, self._mean.shape[0], "cpu", self._dtype).numpy()
            return C0 - self._mean.astype(C0.dtype)
        if init == "random":
            return self._rows(random_indices(self._n, k, rng))
        if init == "k-means++":
            m = min(self._n, p["init_sample"] or max(10 * k, 10_000))
            sample = self._rows(np.sort(random_indices(self._n, m, rng)))
            pick = kmeans_plusplus(torch.from_numpy(sample), k, rng)
            return sample[pick.numpy()]
        return self._kmeans_parallel(rng)

    # -- fit ---------------------------------------------------------------------------
    def fit(self, data: Any) -> DistributedKMeans:
        """Fit on ``data`` (an array [N, d] or a list of ``concurrency`` shards)."""
        import ray

        self._p = validate(self.get_params(deep=False), self._constraints, ClusteringInputError)
        check_init(self._p["init"], DISTRIBUTED_KMEANS_INITS)
        t0 = time.perf_counter()
        refs, dtype = self._shards(data)
        self._actors = []
        try:
            self._start(refs, dtype)
            t1 = time.perf_counter()
            rng = np.random.default_rng(self._p["random_state"])
            C0 = torch.from_numpy(np.ascontiguousarray(self._initial(rng))).to(self._dtype)
            t2 = time.perf_counter()
            shards = _RayShards(self._actors, self._dtype)
            res = run_lloyd(shards, C0, max_iter=self._p["max_iter"], tol=self._tol_abs)
            t3 = time.perf_counter()
            parts = ray.get([a.result.remote() for a in self._actors])
        finally:
            for a in self._actors:
                ray.kill(a)
            self._actors = []
        self._set_result(res, parts, shards.broadcasts, (t0, t1, t2, t3))
        return self

    def _set_result(self, res, parts: list, broadcasts: int, times: tuple) -> None:
        t0, t1, t2, t3 = times
        self.cluster_centers_ = (res.centres.double().numpy() + self._mean).astype(
            res.centres.numpy().dtype)
        self.labels_ = np.concatenate([p[0] for p in parts])
        self.distances_ = np.concatenate([p[1] for p in parts])
        self.inertia_, self.n_iter_ = res.inertia, res.n_iter
        self.converged_, self.n_relocated_ = res.converged, res.relocated
        self.timings_ = {"load": t1 - t0, "init": t2 - t1, "lloyd": t3 - t2,
                         "per_iter": (t3 - t2) / res.n_iter}
        self.broadcasts_ = broadcasts
        log.info("kmeans: N=%d k=%d on %d actor(s): %d iterations (%s), inertia %.6g, "
                 "%.3f s/iteration", self._n, self._p["n_clusters"], self._p["concurrency"],
                 res.n_iter, res.converged, res.inertia, self.timings_["per_iter"])

    def predict(self, X) -> np.ndarray:
        """Nearest centre of each row of ``X`` (computed on the driver)."""
        if not hasattr(self, "cluster_centers_"):
            raise ClusteringInputError("this DistributedKMeans is not fitted yet: call fit first")
        Xt = as_matrix(X, "X", "cpu")
        C = torch.from_numpy(self.cluster_centers_).to(Xt.dtype)
        return assign(Xt, C, x_sq=squared_norms(Xt), centre_block=self.centre_block)[0].numpy()
