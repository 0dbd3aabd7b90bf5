"""cluster: embeddings + mix plan -> selection.parquet, MDIT's diversity-based selection.

The pool is ``D_total = originals ∪ mixes``: an original's vector is its row of
``<run_dir>/embed/embeddings.parquet`` (MDIT: ``embed.encoder: lm-embedding``, the
mean of the model's input-embedding vectors over the tokens); a mix's vector is
computed, not re-encoded: ``λ·v_a + (1−λ)·v_b``. ``D_total`` is clustered into m
clusters by the distributed KMeans (``mixray.distributed.kmeans``: shards on Ray
actors), then ``select_nearest`` keeps the points nearest their centroid.

Output ``<run_dir>/cluster/selection.parquet``, one row per kept point, by rank:

    id       str      the example id, or the mix_id for a mix
    rank     int64    0 … budget−1 (round-robin over clusters, then global fill)
    cluster  int64    KMeans cluster
    dist     float64  Euclidean distance to the cluster's centroid
    is_mix   bool
    a_id     str      the mix's two examples (null for originals)
    b_id     str
    lam      float64  the mix's λ (null for originals)
    task     str      the example's task; "task_a×task_b" for a mix
    within   int64    position by distance inside its cluster (0 = nearest)

``<run_dir>/cluster/centroids.parquet`` (``cluster``, ``size`` = points assigned,
``centroid`` fixed-size float32 list), and ``<run_dir>/cluster/originals_vs_mixes.png``: a t-SNE (or PCA) map of a
sample of originals (red) and mixes (blue), as in the paper's Figure 2.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.algorithms.mdit import mix_vectors, select_nearest
from mixray.config import ClusterConfig, RayConfig
from mixray.contracts import (
    CENTROIDS,
    CLUSTER_PLOT,
    CLUSTER_SELECTION,
    CLUSTER_SELECTION_SCHEMA,
    EMBEDDINGS,
    EXAMPLES,
    MIX_PLAN,
    pair_name,
)
from mixray.errors import InputError
from mixray.io.embeddings import embedding_array, read_embeddings
from mixray.io.rundir import write_table
from mixray.stages.runner import Outputs, Stage, config_section

log = logging.getLogger("mixray.cluster")

# init "auto": k-means|| up to this m, uniform random above (the weighted k-means++ that ends
# k-means|| costs O(m · M · log m · d) on the driver, M ≈ rounds · oversampling · m candidates)
AUTO_KMEANS_PARALLEL_MAX_K = 1024


class Pool:
    """``D_total`` without materialising it: rows ``0..N-1`` are originals, ``N..N+M-1`` mixes."""

    def __init__(self, V: np.ndarray, a: np.ndarray, b: np.ndarray, lam: np.ndarray):
        self.V, self.a, self.b, self.lam = V, a, b, lam
        self.n_orig, self.n_mix = V.shape[0], len(a)

    def __len__(self) -> int:
        return self.n_orig + self.n_mix

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Vectors of pool rows ``start..stop-1`` ``[stop-start, d]``."""
        parts = []
        if start < self.n_orig:
            parts.append(self.V[start : min(stop, self.n_orig)])
        if stop > self.n_orig:
            s, e = max(start, self.n_orig) - self.n_orig, stop - self.n_orig
            parts.append(mix_vectors(self.V, self.a[s:e], self.b[s:e], self.lam[s:e]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, idx: np.ndarray) -> np.ndarray:
        orig = idx < self.n_orig
        out = np.empty((len(idx), self.V.shape[1]), dtype=self.V.dtype)
        out[orig] = self.V[idx[orig]]
        m = idx[~orig] - self.n_orig
        out[~orig] = mix_vectors(self.V, self.a[m], self.b[m], self.lam[m])
        return out


def resolve_init(init: str, k: int) -> str:
    if init != "auto":
        return init
    return "k-means||" if k <= AUTO_KMEANS_PARALLEL_MAX_K else "random"


def load_pool(run_dir: Path) -> tuple[Pool, np.ndarray, pa.Table, np.ndarray, dict]:
    """(pool, original ids, mix plan table, task per original, embedding metadata)."""
    ids, V, meta = read_embeddings(EMBEDDINGS.path(run_dir))
    plan = pq.read_table(MIX_PLAN.path(run_dir), columns=["mix_id", "a_id", "b_id", "task_a",
                                                             "task_b", "lam"])
    ex = pq.read_table(EXAMPLES.path(run_dir), columns=["id", "task"])
    task_of = dict(zip(ex.column("id").to_pylist(), ex.column("task").to_pylist(), strict=True))
    missing = [i for i in ids if i not in task_of]
    if missing:
        raise InputError(f"cluster: embeddings hold ids that are not in {EXAMPLES} (e.g. "
                         f"{missing[0]!r}); re-run embed")
    tasks = np.asarray([task_of.get(i, "") for i in ids], dtype=object)
    row = {i: r for r, i in enumerate(ids.tolist())}
    a_ids, b_ids = plan.column("a_id").to_pylist(), plan.column("b_id").to_pylist()
    absent = sorted({x for x in a_ids + b_ids if x not in row})
    if absent:
        raise InputError(f"cluster: {len(absent)} example(s) of the mix plan have no embedding "
                         f"(e.g. {absent[0]!r}); re-run embed and mix on the same examples")
    a = np.fromiter((row[x] for x in a_ids), dtype=np.int64, count=len(a_ids))
    b = np.fromiter((row[x] for x in b_ids), dtype=np.int64, count=len(b_ids))
    lam = plan.column("lam").to_numpy()
    return Pool(V, a, b, lam), ids, plan, tasks, meta


def check_sizes(cfg: ClusterConfig, pool: Pool) -> int:
    """The number of clusters m; errors when the budget or m exceed the pool."""
    n = len(pool)
    if cfg.budget > n:
        raise InputError(f"cluster.budget={cfg.budget} > pool size {n} "
                         f"({pool.n_orig} originals + {pool.n_mix} mixes)")
    m = cfg.n_clusters or cfg.budget
    if m > n:
        raise InputError(f"cluster.n_clusters={m} > number of points {n} "
                         f"({pool.n_orig} originals + {pool.n_mix} mixes)")
    return m


def fit_kmeans(cfg: ClusterConfig, ray_cfg: RayConfig, pool: Pool, m: int, seed: int):
    """KMeans over Ray actors; each actor receives only its rows of the pool."""
    import ray

    from mixray.distributed.kmeans import DistributedKMeans, split_rows
    from mixray.distributed.runtime import gpus_per_actor, init_ray

    init_ray(ray_cfg)
    concurrency = min(cfg.concurrency, len(pool))
    refs = [ray.put(pool.rows(a, b)) for a, b in split_rows(len(pool), concurrency)]
    km = DistributedKMeans(
        m, concurrency=concurrency, init=resolve_init(cfg.init, m), max_iter=cfg.max_iter,
        tol=cfg.tol, random_state=seed, oversampling=cfg.oversampling, init_rounds=cfg.init_rounds,
        num_cpus=cfg.num_cpus, num_gpus=gpus_per_actor(cfg.num_gpus, where="cluster.num_gpus"),
        threads=cfg.threads, centre_block=cfg.centre_block, dtype="float32")
    return km.fit(refs)


def write_plot(path: Path, pool: Pool, method: str, sample: int, seed: int) -> dict:
    """2-D map (t-SNE after PCA to 50 dims, or PCA) of a uniform sample: originals red, mixes blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(pool), size=min(sample, len(pool)), replace=False))
    X = pool.take(idx).astype(np.float64)
    t0 = time.time()
    if method == "tsne" and len(idx) >= 5:
        from sklearn.manifold import TSNE

        if X.shape[1] > 50:
            X = PCA(n_components=min(50, len(idx)), random_state=seed).fit_transform(X)
        Y = TSNE(n_components=2, init="pca", random_state=seed,
                 perplexity=min(30.0, (len(idx) - 1) / 3)).fit_transform(X)
    else:
        method = "pca"
        Y = PCA(n_components=2, random_state=seed).fit_transform(X)
    is_mix = idx >= pool.n_orig
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    ax.scatter(Y[~is_mix, 0], Y[~is_mix, 1], s=4, c="tab:red", alpha=0.6,
               label=f"original ({int((~is_mix).sum())})")
    ax.scatter(Y[is_mix, 0], Y[is_mix, 1], s=4, c="tab:blue", alpha=0.6,
               label=f"MDIT mix ({int(is_mix.sum())})")
    ax.set_title(f"Originals vs mixes ({'t-SNE' if method == 'tsne' else 'PCA'})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return {"method": method, "points": len(idx), "seconds": round(time.time() - t0, 2)}


def selection_table(chosen: np.ndarray, within: np.ndarray, km, pool: Pool, ids: np.ndarray,
                    plan: pa.Table, tasks: np.ndarray) -> pa.Table:
    n = pool.n_orig
    is_mix = chosen >= n
    mi = chosen[is_mix] - n
    mix_ids = np.asarray(plan.column("mix_id").to_pylist(), dtype=object)
    id_col = np.empty(len(chosen), dtype=object)
    id_col[~is_mix] = ids[chosen[~is_mix]]
    id_col[is_mix] = mix_ids[mi]
    task = np.empty(len(chosen), dtype=object)
    task[~is_mix] = tasks[chosen[~is_mix]]
    ta, tb = plan.column("task_a").to_pylist(), plan.column("task_b").to_pylist()
    task[is_mix] = [pair_name(ta[j], tb[j]) for j in mi]
    a_col = np.full(len(chosen), None, dtype=object)
    b_col = np.full(len(chosen), None, dtype=object)
    lam_col = np.full(len(chosen), np.nan)
    a_col[is_mix] = np.asarray(plan.column("a_id").to_pylist(), dtype=object)[mi]
    b_col[is_mix] = np.asarray(plan.column("b_id").to_pylist(), dtype=object)[mi]
    lam_col[is_mix] = pool.lam[mi]
    return pa.table({
        "id": pa.array(id_col.tolist(), pa.string()),
        "rank": pa.array(np.arange(len(chosen)), pa.int64()),
        "cluster": pa.array(km.labels_[chosen].astype(np.int64), pa.int64()),
        "dist": pa.array(km.distances_[chosen].astype(np.float64), pa.float64()),
        "is_mix": pa.array(is_mix, pa.bool_()),
        "a_id": pa.array(a_col.tolist(), pa.string()),
        "b_id": pa.array(b_col.tolist(), pa.string()),
        "lam": pa.array(lam_col, pa.float64(), mask=~is_mix),
        "task": pa.array(task.tolist(), pa.string()),
        "within": pa.array(within.astype(np.int64), pa.int64()),
    }, schema=CLUSTER_SELECTION_SCHEMA)


def kmeans_summary(km, m: int, init: str) -> dict:
    return {"n_clusters": m, "init": init, "concurrency": km.concurrency, "n_iter": km.n_iter_,
            "converged": km.converged_, "inertia": km.inertia_, "relocated": km.n_relocated_,
            "broadcasts": km.broadcasts_,
            "seconds": {k: round(float(v), 3) for k, v in km.timings_.items()}}


class Cluster(Stage):
    """``cluster``: KMeans on originals ∪ mixes over Ray actors, keep the points nearest a centroid."""

    name = "cluster"
    requires = (EXAMPLES, EMBEDDINGS, MIX_PLAN)
    outputs = (CLUSTER_SELECTION, CENTROIDS, CLUSTER_PLOT)
    summary = "{kept} kept"
    seeded = True
    memory_knobs = ("concurrency", "centre_block", "num_cpus")

    def run(self, out: Outputs) -> None:
        cfg, seed = self.section, self.cfg.seed
        pool, ids, plan, tasks, meta = load_pool(self.run_dir)
        if meta.get("mixray.encoder") != "lm-embedding":
            log.warning("cluster: embeddings come from encoder %r, not 'lm-embedding' (MDIT's mean of "
                        "the embedding-layer vectors); mixing them linearly anyway",
                        meta.get("mixray.encoder"))
        m = check_sizes(cfg, pool)
        t0 = time.time()
        with config_section("cluster"):
            km = fit_kmeans(cfg, self.cfg.ray, pool, m, seed)
        chosen, within = select_nearest(km.labels_, km.distances_, cfg.budget, m, cfg.per_cluster)
        table = selection_table(chosen, within, km, pool, ids, plan, tasks)
        write_table(table, out.path(CLUSTER_SELECTION))
        write_table(pa.table({
            "cluster": pa.array(np.arange(m), pa.int64()),
            "size": pa.array(np.bincount(km.labels_, minlength=m), pa.int64()),
            "centroid": embedding_array(km.cluster_centers_),
        }), out.path(CENTROIDS))
        plot = None
        if cfg.plot != "none":
            plot = write_plot(out.path(CLUSTER_PLOT), pool, cfg.plot, cfg.plot_sample, seed)
        kept_mix = int(np.sum(chosen >= pool.n_orig))
        task_col = table.column("task").to_pylist()
        out.counts = {"originals": pool.n_orig, "mixes": pool.n_mix, "pool": len(pool),
                      "kept": len(chosen), "kept_originals": len(chosen) - kept_mix,
                      "kept_mixes": kept_mix}
        out.extra = {
            "encoder": meta.get("mixray.encoder"), "dim": int(pool.V.shape[1]),
            "kmeans": kmeans_summary(km, m, resolve_init(cfg.init, m)),
            "per_cluster": cfg.per_cluster if cfg.per_cluster is not None else cfg.budget // m,
            "kept_by_task": {t: task_col.count(t) for t in sorted(set(task_col))},
            "plot": plot,
        }
        log.info("cluster: %d originals + %d mixes -> %d clusters (%d iterations, %s) -> kept %d "
                 "(%d mixes) in %.1f s", pool.n_orig, pool.n_mix, m, km.n_iter_, km.converged_,
                 len(chosen), kept_mix, time.time() - t0)
