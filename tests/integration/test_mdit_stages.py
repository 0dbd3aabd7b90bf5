"""MDIT end to end on three real tasks (ShareGPT, GSM8K, HumanEval from their packages):
ingest -> embed (lm-embedding) -> mix -> cluster."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from packaged_data import pkg_source

from mixray.algorithms.mdit import mix_vectors
from mixray.cli import main
from mixray.config import RunConfig, load_config
from mixray.errors import ConfigError, InputError
from mixray.io.embeddings import read_embeddings
from mixray.io.rundir import read_manifest
from mixray.stages import run_stage

LIMIT = 40  # examples per task
BUDGET, CLUSTERS = 30, 10


def raw_config(run_dir, tiny_lm_dir) -> dict:
    # task names as the sources' names: general (ShareGPT), math (GSM8K), code (HumanEval)
    return {
        "run_dir": str(run_dir), "seed": 0,
        "stages": ["ingest", "embed", "mix", "cluster"],
        "ingest": {"sources": [pkg_source(task, limit=LIMIT) for task in ("general", "math", "code")]},
        "embed": {"encoder": "lm-embedding", "model": str(tiny_lm_dir), "normalize": False,
                  "batch_size": 64, "threads": 1},
        "mix": {"model": str(tiny_lm_dir), "bucket_width": 16},
        "cluster": {"budget": BUDGET, "n_clusters": CLUSTERS, "plot_sample": 150},
    }


@pytest.fixture(scope="module")
def mdit_run(tmp_path_factory, tiny_lm_dir, ray_session):
    run_dir = tmp_path_factory.mktemp("mdit-run")
    raw = raw_config(run_dir, tiny_lm_dir)
    cfg = RunConfig.model_validate(raw)
    manifests = {s: run_stage(s, cfg, run_dir) for s in cfg.stages}
    return run_dir, raw, cfg, manifests


def test_mix_plan(mdit_run):
    run_dir, _, _, manifests = mdit_run
    plan = pq.read_table(run_dir / "mix" / "mix_plan.parquet")
    assert plan.schema.names[:6] == ["mix_id", "a_id", "b_id", "task_a", "task_b", "lam"]
    assert [plan.schema.field(n).type for n in plan.schema.names[:6]] == [pa.string()] * 5 + [pa.float64()]
    df = plan.to_pandas()
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet", columns=["id", "task"]).to_pandas()
    task = dict(zip(ex["id"], ex["task"], strict=True))
    assert (df.a_id.map(task) == df.task_a).all() and (df.b_id.map(task) == df.task_b).all()
    assert (df.task_a != df.task_b).all()
    assert set(zip(df.task_a, df.task_b, strict=True)) == {
        ("code", "general"), ("code", "math"), ("general", "math")}
    assert len(df) == 3 * LIMIT  # T = 1: each pair matches all of its (equal-sized) tasks once
    for _, g in df.groupby(["task_a", "task_b"]):
        assert g.a_id.is_unique and g.b_id.is_unique  # at most T = 1 mix per partner task
    assert ((df.lam > 0) & (df.lam < 1)).all() and df.mix_id.is_unique
    assert (df.bucket_a == df.len_a // 16).all()
    m = manifests["mix"]
    assert m["counts"] == {"examples": 3 * LIMIT, "mixes": 3 * LIMIT}
    assert sum(m["lam_histogram"]["counts"]) == len(df)
    assert {k: v["mixes"] for k, v in m["pairs"].items()} == {
        "code×general": LIMIT, "code×math": LIMIT, "general×math": LIMIT}


def test_selection_is_nearest_to_centroid_over_originals_and_mixes(mdit_run):
    run_dir, _, _, manifests = mdit_run
    sel = pq.read_table(run_dir / "cluster" / "selection.parquet")
    assert sel.schema.names[:8] == ["id", "rank", "cluster", "dist", "is_mix", "a_id", "b_id", "lam"]
    assert [sel.schema.field(n).type for n in sel.schema.names[:8]] == [
        pa.string(), pa.int64(), pa.int64(), pa.float64(), pa.bool_(), pa.string(), pa.string(),
        pa.float64()]
    s = sel.to_pandas()
    assert s["rank"].tolist() == list(range(BUDGET)) and s["id"].is_unique
    plan = pq.read_table(run_dir / "mix" / "mix_plan.parquet").to_pandas().set_index("mix_id")
    mixes, origs = s[s.is_mix], s[~s.is_mix]
    assert mixes["id"].isin(plan.index).all()
    np.testing.assert_array_equal(mixes["lam"], plan.loc[mixes["id"], "lam"])
    assert (mixes["a_id"].values == plan.loc[mixes["id"], "a_id"].values).all()
    assert origs["a_id"].isna().all() and origs["lam"].isna().all()

    # recompute every pool vector (originals + λ·v_a + (1−λ)·v_b) and check dist and cluster
    ids, V, meta = read_embeddings(run_dir / "embed" / "embeddings.parquet")
    assert meta["mixray.encoder"] == "lm-embedding"
    row = {i: r for r, i in enumerate(ids)}
    allplan = plan.reset_index()
    P = np.concatenate([V, mix_vectors(V, allplan.a_id.map(row).values, allplan.b_id.map(row).values,
                                       allplan.lam.values)]).astype(np.float64)
    pool_ids = list(ids) + allplan.mix_id.tolist()
    cent = pq.read_table(run_dir / "cluster" / "centroids.parquet")
    C = np.stack(cent.column("centroid").to_numpy(zero_copy_only=False)).astype(np.float64)
    D = np.sqrt(((P[:, None, :] - C[None, :, :]) ** 2).sum(-1))
    labels, dist = D.argmin(1), D.min(1)
    assert np.bincount(labels, minlength=CLUSTERS).tolist() == cent.column("size").to_pylist()
    pos = {i: k for k, i in enumerate(pool_ids)}
    k = np.array([pos[i] for i in s["id"]])
    np.testing.assert_array_equal(s["cluster"], labels[k])
    np.testing.assert_allclose(s["dist"], dist[k], rtol=1e-3, atol=1e-5)
    # per cluster, the kept points are that cluster's nearest
    quota = BUDGET // CLUSTERS
    for j in range(CLUSTERS):
        members = np.flatnonzero(labels == j)
        kept = set(k[s["cluster"].values == j])
        nearest = members[np.argsort(dist[members], kind="stable")][: min(quota, len(members))]
        assert set(nearest) <= kept
    c = manifests["cluster"]["counts"]
    assert c["pool"] == 6 * LIMIT and c["kept"] == BUDGET
    assert c["kept_mixes"] == int(s.is_mix.sum())
    assert (run_dir / "cluster" / "originals_vs_mixes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifests["cluster"]["plot"]["method"] == "tsne"


def test_stages_skip_when_unchanged_and_the_cli_runs_them(mdit_run, tmp_path):
    run_dir, raw, cfg, _ = mdit_run
    assert run_stage("cluster", cfg, run_dir)["skipped"] is True
    path = tmp_path / "mdit.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["mix", str(path)]) == 0
    assert main(["cluster", str(path)]) == 0
    assert read_manifest(run_dir / "cluster")["counts"]["kept"] == BUDGET


@pytest.mark.parametrize(
    ("override", "stage", "match"),
    [
        ({"mix": {"pairs": [["general", "maths"]]}}, "mix",
         r"task 'maths' is not in the data \(tasks: code, general, math\)"),
        ({"mix": {"max_length": 2}}, "mix", r"task '\w+' has no examples in any usable bucket"),
        ({"cluster": {"budget": 10_000}}, "cluster",
         r"cluster.budget=10000 > pool size 240 \(120 originals \+ 120 mixes\)"),
        ({"cluster": {"budget": 10, "n_clusters": 241}}, "cluster",
         r"cluster.n_clusters=241 > number of points 240"),
    ],
)
def test_bad_input_is_caught_at_the_boundary(mdit_run, override, stage, match):
    run_dir, raw, _, _ = mdit_run
    bad = dict(raw)
    for section, values in override.items():
        bad[section] = raw[section] | values
    before = read_manifest(run_dir / stage)
    with pytest.raises(InputError, match=match):
        run_stage(stage, RunConfig.model_validate(bad), run_dir)
    assert read_manifest(run_dir / stage) == before  # the good outputs are untouched


def test_alpha_must_be_positive(tmp_path, mdit_run):
    _, raw, _, _ = mdit_run
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="mix.alpha: Input should be greater than 0"):
        load_config(path, ["mix.alpha=0"])
    assert Counter(load_config(path, ["mix.alpha=4"]).stages) == Counter(raw["stages"])
