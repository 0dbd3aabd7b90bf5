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

- ``"k-means||"`` (Bahmani et al. 2012): one uniform centre, then ``rounds``
  rounds in which every shard keeps each of its points with probability
  ``min(1, ℓ·D(x)²/φ)`` (``ℓ = oversampling·k``, ``φ = Σ D(x)²`` reduced over the
  shards); the candidates are weighted by the number of points nearest to them
  and reduced to k centres by weighted k-means++ on the driver.
- ``"k-means++"``: k-means++ on a uniform sample of ``init_sample`` points
  gathered from the shards.
- ``"random"``: k distinct points drawn uniformly (the same points as
  ``KMeans(init="random", seed)`` picks from the same data).
- an array ``[k, d]``.

Actors are GPU actors when ``num_gpus > 0`` (the caller resolves "auto" from the
cluster's resources at run time); CPU actors run ``threads`` torch threads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from mixray.algorithms.kmeans import (
    DEFAULT_CENTRE_BLOCK,
    LocalShards,
    as_matrix,
    assign,
    check_k,
    check_params,
    farthest,
    kmeans_plusplus,
    random_indices,
    run_lloyd,
    squared_norms,
    tolerance,
)

log = logging.getLogger("mixray.kmeans")

DIST_INIT_NAMES: tuple[str, ...] = ("k-means||", "k-means++", "random")


class KMeansShard:
    """One shard of the points and the per-shard half of every KMeans step.

    Plain Python (no Ray): ``DistributedKMeans`` runs it as a Ray actor; tests can
    call it directly. Methods take and return numpy arrays (what crosses the wire).
    """

    def __init__(self, shard_id: int, threads: int | None = None,
                 centre_block: int = DEFAULT_CENTRE_BLOCK, use_gpu: bool = False):
        if use_gpu and torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            self.device = torch.device("cpu")
            if threads:
                torch.set_num_threads(threads)
        self.shard_id, self.centre_block = shard_id, centre_block
        self.local: LocalShards | None = None

    # -- loading -------------------------------------------------------------------
    def load(self, points: np.ndarray, dtype: str) -> tuple[int, np.ndarray] | str:
        """Keep ``points`` as ``dtype``; return ``(n, Σ x [d] float64)`` or an error text."""
        try:
            X = as_matrix(points, f"shard {self.shard_id}", self.device)
        except ValueError as e:
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


class DistributedKMeans:
    """KMeans over points sharded across ``n_actors`` Ray actors (sklearn-shaped).

    ``fit(data)`` takes an array ``[N, d]`` (split into contiguous shards, each
    ``ray.put`` separately) or a list of shards (arrays or ``ObjectRef`` s of arrays,
    one per actor, in row order). Sets ``cluster_centers_ [k,d]``, ``labels_ [N]``,
    ``distances_ [N]`` (Euclidean distance to the own centre), ``inertia_``,
    ``n_iter_``, ``converged_``, ``n_relocated_``, ``timings_`` (seconds per phase),
    ``broadcasts_`` (centre broadcasts by the Lloyd loop: one per iteration).
    Ray must be initialised by the caller.
    """

    def __init__(self, n_clusters: int, *, n_actors: int = 2, init: str | np.ndarray = "k-means||",
                 max_iter: int = 300, tol: float = 1e-4, seed: int = 0,
                 oversampling: float = 2.0, init_rounds: int = 5, init_sample: int | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, threads: int | None = None,
                 dtype: str | None = None, centre_block: int = DEFAULT_CENTRE_BLOCK):
        self.n_clusters, self.n_actors, self.init = n_clusters, n_actors, init
        self.max_iter, self.tol, self.seed = max_iter, tol, seed
        self.oversampling, self.init_rounds, self.init_sample = oversampling, init_rounds, init_sample
        self.num_cpus, self.num_gpus, self.threads = num_cpus, num_gpus, threads
        self.dtype, self.centre_block = dtype, centre_block

    # -- setup -----------------------------------------------------------------------
    def _check(self) -> None:
        if isinstance(self.init, str) and self.init not in DIST_INIT_NAMES:
            raise ValueError(f"init={self.init!r}; allowed: {', '.join(DIST_INIT_NAMES)} "
                             "or an array [k, d]")
        check_params(self.max_iter, self.tol, None)
        if self.n_actors < 1:
            raise ValueError(f"n_actors must be >= 1, got {self.n_actors}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r}; allowed: float32, float64 (default: the data's)")
        if self.oversampling <= 0 or self.init_rounds < 1:
            raise ValueError("oversampling must be > 0 and init_rounds >= 1, got "
                             f"{self.oversampling} and {self.init_rounds}")

    def _shards(self, data: Any) -> tuple[list, str]:
        import ray

        if isinstance(data, list | tuple):
            if len(data) != self.n_actors:
                raise ValueError(f"got {len(data)} shards for n_actors={self.n_actors}")
            refs = [d if isinstance(d, ray.ObjectRef) else ray.put(np.asarray(d)) for d in data]
            return refs, self.dtype or "float32"
        X = as_matrix(data, "X", "cpu")
        check_k(self.n_clusters, X.shape[0])
        if X.shape[0] < self.n_actors:
            raise ValueError(f"{X.shape[0]} points cannot fill n_actors={self.n_actors} shards")
        Xn = X.numpy()
        refs = [ray.put(Xn[a:b]) for a, b in split_rows(X.shape[0], self.n_actors)]
        return refs, self.dtype or str(X.dtype).removeprefix("torch.")

    def _start(self, refs: list, dtype: str) -> None:
        import ray

        actor_cls = ray.remote(KMeansShard).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        threads = self.threads or max(1, int(self.num_cpus))
        self.actors = [actor_cls.remote(i, threads, self.centre_block, self.num_gpus > 0)
                       for i in range(self.n_actors)]
        self.work_dtype = getattr(torch, dtype)
        loaded = ray.get([a.load.remote(r, dtype) for a, r in zip(self.actors, refs, strict=True)])
        refs.clear()  # the object store may free the shards: the actors hold them now
        errors = [x for x in loaded if isinstance(x, str)]
        if errors:
            raise ValueError("; ".join(errors))
        widths = {x[1].shape[0] for x in loaded}
        if len(widths) != 1:
            raise ValueError(f"shards have different numbers of features: {sorted(widths)}")
        self.sizes = np.array([x[0] for x in loaded])
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.offsets[-1])
        check_k(self.n_clusters, self.n)
        self.mean = sum(x[1] for x in loaded) / self.n
        sq = sum(ray.get([a.centre.remote(self.mean, int(o))
                          for a, o in zip(self.actors, self.offsets[:-1], strict=True)]))
        self.tol_abs = tolerance(self.tol, sq, self.n, self.mean.shape[0])

    def _rows(self, global_idx: np.ndarray) -> np.ndarray:
        """Gather rows (centred) by global index, in the order asked."""
        import ray

        shard = np.searchsorted(self.offsets, global_idx, side="right") - 1
        out = None
        calls = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard)]
        parts = ray.get([self.actors[s].rows.remote(global_idx[pos] - self.offsets[s])
                         for s, pos in calls])
        for (_, pos), rows in zip(calls, parts, strict=True):
            if out is None:
                out = np.empty((len(global_idx), rows.shape[1]), dtype=rows.dtype)
            out[pos] = rows
        return out

    # -- initialisation ------------------------------------------------------------------
    def _kmeans_parallel(self, rng: np.random.Generator) -> np.ndarray:
        import ray

        k = self.n_clusters
        ell = self.oversampling * k
        idx = [np.array([rng.integers(self.n)])]
        cand = [self._rows(idx[0])]
        phi = sum(ray.get([a.init_cost.remote(cand[0], True) for a in self.actors]))
        for r in range(self.init_rounds):
            if phi <= 0:
                break
            parts = ray.get([a.sample.remote(ell, phi, self.seed, r) for a in self.actors])
            new_idx = np.concatenate([p[0] for p in parts])
            if len(new_idx) == 0:
                continue
            new = np.concatenate([p[1] for p in parts])
            idx.append(new_idx)
            cand.append(new)
            phi = sum(ray.get([a.init_cost.remote(new, False) for a in self.actors]))
        gidx = np.concatenate(idx)
        C = np.concatenate(cand)
        if len(gidx) < k:  # too few distinct candidates: top up with uniform points
            rest = np.setdiff1d(np.arange(self.n), gidx)
            extra = rng.choice(rest, size=k - len(gidx), replace=False)
            gidx, C = np.concatenate([gidx, extra]), np.concatenate([C, self._rows(extra)])
        ref = ray.put(C)
        w = np.sum(ray.get([a.candidate_counts.remote(ref) for a in self.actors]), axis=0)
        log.info("kmeans||: %d candidates from %d round(s) for k=%d", len(C), len(idx) - 1, k)
        Ct = torch.from_numpy(C)
        pick = kmeans_plusplus(Ct, k, rng, weights=torch.from_numpy(w.astype(np.float64)))
        return C[pick.numpy()]

    def _initial(self, rng: np.random.Generator) -> np.ndarray:
        k = self.n_clusters
        if not isinstance(self.init, str):
            C0 = as_matrix(self.init, "init", "cpu").to(self.work_dtype).numpy()
            if C0.shape != (k, self.mean.shape[0]):
                raise ValueError(f"init has shape {C0.shape}; expected (n_clusters={k}, "
                                 f"n_features={self.mean.shape[0]})")
            return C0 - self.mean.astype(C0.dtype)
        if self.init == "random":
            return self._rows(random_indices(self.n, k, rng))
        if self.init == "k-means++":
            m = min(self.n, self.init_sample or max(10 * k, 10_000))
            sample = self._rows(np.sort(random_indices(self.n, m, rng)))
            pick = kmeans_plusplus(torch.from_numpy(sample), k, rng)
            return sample[pick.numpy()]
        return self._kmeans_parallel(rng)

    # -- fit ---------------------------------------------------------------------------
    def fit(self, data: Any) -> DistributedKMeans:
        import ray

        self._check()
        t0 = time.perf_counter()
        refs, dtype = self._shards(data)
        self.actors = []
        try:
            self._start(refs, dtype)
            t1 = time.perf_counter()
            rng = np.random.default_rng(self.seed)
            C0 = torch.from_numpy(np.ascontiguousarray(self._initial(rng))).to(self.work_dtype)
            t2 = time.perf_counter()
            shards = _RayShards(self.actors, self.work_dtype)
            res = run_lloyd(shards, C0, max_iter=self.max_iter, tol=self.tol_abs)
            t3 = time.perf_counter()
            parts = ray.get([a.result.remote() for a in self.actors])
        finally:
            for a in self.actors:
                ray.kill(a)
            self.actors = []
        self.cluster_centers_ = (res.centres.double().numpy() + self.mean).astype(
            res.centres.numpy().dtype)
        self.labels_ = np.concatenate([p[0] for p in parts])
        self.distances_ = np.concatenate([p[1] for p in parts])
        self.inertia_, self.n_iter_ = res.inertia, res.n_iter
        self.converged_, self.n_relocated_ = res.converged, res.relocated
        self.timings_ = {"load": t1 - t0, "init": t2 - t1, "lloyd": t3 - t2,
                         "per_iter": (t3 - t2) / res.n_iter}
        self.broadcasts_ = shards.broadcasts
        log.info("kmeans: N=%d k=%d on %d actor(s): %d iterations (%s), inertia %.6g, "
                 "%.3f s/iteration", self.n, self.n_clusters, self.n_actors, res.n_iter,
                 res.converged, res.inertia, self.timings_["per_iter"])
        return self

    def predict(self, X) -> np.ndarray:
        """Nearest centre of each row of ``X`` (computed on the driver)."""
        Xt = as_matrix(X, "X", "cpu")
        C = torch.from_numpy(self.cluster_centers_).to(Xt.dtype)
        return assign(Xt, C, x_sq=squared_norms(Xt), centre_block=self.centre_block)[0].numpy()


