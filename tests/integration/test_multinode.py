"""Two Ray nodes on one machine (ray.cluster_utils.Cluster, tests/rays.py): the distributed stages
give the single-node results.

The head offers no CPU and each node one, so a pool of two 1-CPU actors (embed, the sharded
exact selection, distributed KMeans) has one actor on each node; the two training workers ask for
``worker_slot: 1``, a custom resource each node offers once, so they are on different nodes.
Single-node references: the encoder called in this process, the selection without Ray, KMeans
in one process, and the losses of the same training run on one node (2 workers), pinned.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from rays import two_node_cluster
from stage_runs import run
from test_select_stage import make_run_dir as make_select_run_dir
from train_data import make_run_dir as make_train_run_dir

from mixray.algorithms.kmeans import KMeans
from mixray.config import SelectConfig, TrainConfig
from mixray.distributed.kmeans import DistributedKMeans
from mixray.models.callables import SentenceEncoder
from mixray.training.metrics import read_metrics

# The first 3 losses of the training below (ZeRO-2, full fine-tuning, 2 workers × micro-batch 4,
# seed 0, the tiny Llama, tests/train_data.py) run on one node: the session's local Ray, 2 CPUs.
SINGLE_NODE_LOSSES = [10.815691947937012, 10.762673377990723, 10.622063636779785]


@pytest.fixture(scope="module")
def nodes():
    with two_node_cluster() as n:
        yield n


def test_the_cluster_has_two_worker_nodes(nodes):
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3
    workers = sorted((n["Resources"].get("CPU"), n["Resources"].get("worker_slot")) for n in alive
                     if n["Resources"].get("CPU"))
    assert workers == [(1.0, 1.0), (1.0, 1.0)]  # the head has no CPU


def test_embed_over_two_nodes_equals_one_process(nodes, tmp_path):
    run_dir = make_train_run_dir(tmp_path)  # 48 real examples
    m = run("embed", run_dir, embed={"model": "all-MiniLM-L6-v2", "concurrency": 2, "num_cpus": 1,
                                     "threads": 1, "batch_size": 8})
    assert m["counts"]["out"] == 48
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet").to_pandas()
    emb = pq.read_table(run_dir / "embed" / "embeddings.parquet")
    assert emb["id"].to_pylist() == ex["id"].tolist()
    batch = {c: ex[c].to_numpy() for c in ("id", "instruction", "input", "output")}
    single = SentenceEncoder("all-MiniLM-L6-v2", threads=1)(batch)["embedding"]
    np.testing.assert_allclose(np.stack(emb["embedding"].to_numpy(zero_copy_only=False)), single,
                               atol=1e-5)


def test_sharded_selection_over_two_nodes_equals_no_ray(nodes, tmp_path_factory):
    local, sharded = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("sharded")
    make_select_run_dir(local)
    make_select_run_dir(sharded)
    base = {"k": 25, "alpha": 0.5, "memory_budget_mb": 1, "checkpoint_every": 0}
    run("select", local, select=SelectConfig.model_validate(base))  # no Ray
    m = run("select", sharded, select=SelectConfig.model_validate(
        base | {"distributed": "sharded", "concurrency": 2, "num_gpus": 0}))
    assert m["distributed"] == "sharded"
    assert pq.read_table(sharded / "select" / "selection.parquet").equals(
        pq.read_table(local / "select" / "selection.parquet"))


def test_distributed_kmeans_over_two_nodes_equals_one_process(nodes):
    rng = np.random.default_rng(0)
    X = rng.normal(scale=5.0, size=(8, 8))[rng.integers(8, size=2000)] + rng.normal(size=(2000, 8))
    C0 = X[rng.choice(len(X), 12, replace=False)].copy()
    single = KMeans(12, init=C0, tol=1e-4).fit(X)
    dist = DistributedKMeans(12, concurrency=2, init=C0, tol=1e-4).fit(X)
    np.testing.assert_array_equal(dist.labels_, single.labels_)
    assert dist.n_iter_ == single.n_iter_
    np.testing.assert_allclose(dist.cluster_centers_, single.cluster_centers_, atol=1e-9)


def test_two_training_workers_on_two_nodes_give_the_single_node_losses(nodes, tmp_path, tiny_lm_dir):
    """One training worker per node: the same losses as both workers on one node."""
    run_dir = make_train_run_dir(tmp_path)
    cfg = TrainConfig.model_validate({
        "model": str(tiny_lm_dir), "max_length": 96, "micro_batch_size": 4, "grad_accum": 1,
        "num_workers": 2, "lr": 3e-3, "warmup_ratio": 0.0, "max_steps": 3, "checkpoint_every": 2,
        "threads": 1, "data": "all", "deepspeed": {"stage": 2},
        "resources_per_worker": {"CPU": 1, "worker_slot": 1}})  # one worker per node
    m = run("train", run_dir, train=cfg)
    assert m["counts"]["steps"] == 3
    metrics = read_metrics(run_dir / "train" / "metrics.csv")
    assert [r["loss"] for r in metrics] == pytest.approx(SINGLE_NODE_LOSSES, rel=1e-6)
    assert (run_dir / "train" / "model" / "model.safetensors").is_file()
