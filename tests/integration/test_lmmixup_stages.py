"""LM-Mixup's data stages on real data (ShareGPT, GSM8K, HumanEval from their packages), local Ray:
ingest -> embed (MiniLM, instruction + response) -> score (IFD on the tiny Llama) -> imperfect ->
mixture -> distill (generation over a Ray Data actor pool with a tiny taught distiller) -> the
merged set that train reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lmmixup_data import taught_distiller
from packaged_data import pkg_source
from train_data import write_stage_output

from mixray.algorithms.lmmixup import MERGE_INSTRUCTION, REJECT_REASONS, parse_output
from mixray.config import RunConfig, TrainConfig
from mixray.errors import InputError
from mixray.io.embeddings import embedding_array, embedding_schema
from mixray.stages import run_stage
from mixray.stages.imperfect import check_lmmixup_embeddings

LIMIT = 20  # per source: 60 examples


def _cfg(run_dir: Path, tiny: Path, distiller: Path | None = None, **lm) -> RunConfig:
    lmmixup = {"clusters": {"max_member_chars": 200},
               "mixture": {"targets": 6, "max_target_chars": 5000, "files": lm.pop("files", [])},
               "generate": {"distiller": "base", "base_model": str(distiller or tiny), "threads": 1,
                            "batch_size": 8, "max_new_tokens": 48}}
    for k, v in lm.items():
        lmmixup[k] = lmmixup.get(k, {}) | v
    return RunConfig.model_validate({
        "run_dir": str(run_dir), "seed": 0,
        "ingest": {"sources": [pkg_source(t, limit=LIMIT) for t in ("general", "math", "code")]},
        "embed": {"text": "full", "threads": 1, "batch_size": 64},
        "score": {"backend": "ifd", "model": str(tiny), "max_length": 64, "threads": 1},
        "lmmixup": lmmixup})


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session, tiny_lm_dir):
    run_dir = tmp_path_factory.mktemp("lmmixup")
    cfg = _cfg(run_dir, tiny_lm_dir)
    for stage in ("ingest", "embed", "score", "imperfect"):
        run_stage(stage, cfg, run_dir)
    return cfg, run_dir


def test_imperfect_classes_and_capacity_clusters(run):
    cfg, run_dir = run
    classes = pq.read_table(run_dir / "imperfect" / "classes.parquet").to_pandas()
    assert len(classes) == 3 * LIMIT
    q = pq.read_table(run_dir / "score" / "quality.parquet").to_pandas().set_index("id")
    assert (classes["score"].to_numpy() == q.loc[classes["id"], "score"].to_numpy()).all()
    # quantile classes: monotone in the score; a score on a cut point goes up (ties share a class)
    cuts = np.quantile(classes["score"], np.arange(1, 6) / 6)
    assert (classes["class"] == np.searchsorted(cuts, classes["score"], side="right")).all()
    by_score = classes.sort_values("score")
    assert by_score["class"].is_monotonic_increasing and classes["class"].max() <= 5
    assert classes["low"].tolist() == (classes["class"] < 4).tolist()
    clusters = pq.read_table(run_dir / "imperfect" / "clusters.parquet").to_pandas()
    members = [m for ms in clusters["member_ids"] for m in ms]
    assert sorted(members) == sorted(classes.loc[classes["low"], "id"])  # every low example once
    assert clusters["size"].between(2, 5).all() and (clusters["size"] == clusters["member_ids"].map(len)).all()
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet").to_pandas().set_index("id")
    for _, c in clusters.iterrows():
        assert c["prompt"].startswith(MERGE_INSTRUCTION + "\n\nQ: ")
        assert c["prompt"].count("\n\nQ: ") == c["size"]
        assert ex.loc[c["member_ids"][0], "instruction"].strip()[:30] in c["prompt"]
    assert (run_dir / "imperfect" / "cluster_sizes.png").stat().st_size > 1000


def test_imperfect_needs_instruction_and_response_embeddings(tmp_path):
    schema = embedding_schema(2, {"mixray.encoder": "sentence-transformers", "mixray.text": "instruction"})
    p = write_stage_output(tmp_path, "embed", "embeddings.parquet", pa.table(
        {"id": ["a"], "embedding": embedding_array(np.ones((1, 2), np.float32))}, schema=schema))
    with pytest.raises(InputError, match="embed.text: full"):
        check_lmmixup_embeddings(p)


def test_mixture_from_degraded_examples_and_a_mixture_file(run, tmp_path):
    cfg, run_dir = run
    f = tmp_path / "mix.jsonl"
    f.write_text(json.dumps({"instruction": MERGE_INSTRUCTION, "input": "Q: a\n A: b\n\nQ: a?\n A: b!",
                             "output": "Q: a?\nA: b"}) + "\n" + json.dumps({"output": "nothing"}) + "\n")
    cfg2 = _cfg(run_dir, Path(cfg.score.model), files=[str(f)])
    m = run_stage("mixture", cfg2, run_dir)
    assert m["counts"] == {"pairs": 7, "from_files": 1, "degraded": 6, "file_rejected": 1}
    pairs = pq.read_table(run_dir / "mixture" / "pairs.parquet").to_pandas()
    classes = pq.read_table(run_dir / "imperfect" / "classes.parquet").to_pandas().set_index("id")
    deg = pairs[pairs["origin"] == "degraded"]
    assert (classes.loc[deg["target_id"], "class"] >= 4).all()  # targets are high quality
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet").to_pandas().set_index("id")
    for _, p in deg.iterrows():
        parsed = parse_output(p["target"])
        assert parsed.ok and parsed.answer == ex.loc[p["target_id"], "output"].strip()
        assert p["prompt"].count("\n\nQ: ") == p["members"] and 2 <= p["members"] <= 5
    assert run_stage("mixture", cfg2, run_dir)["skipped"]  # unchanged: skipped


def test_distill_generates_parses_rescores_and_merges(run, tmp_path, tiny_lm_dir):
    cfg, run_dir = run
    prompts = pq.read_table(run_dir / "imperfect" / "clusters.parquet").column("prompt").to_pylist()
    distiller = taught_distiller(tiny_lm_dir, tmp_path / "distiller", steps=15, prompts=prompts)
    cfg2 = _cfg(run_dir, tiny_lm_dir, distiller, generate={"concurrency": 2})
    m = run_stage("distill", cfg2, run_dir)
    c = m["counts"]
    n_clusters = pq.read_metadata(run_dir / "imperfect" / "clusters.parquet").num_rows
    assert c["clusters"] == n_clusters == c["parsed"] + c["rejected"] == c["kept"] + c["not_kept"] + c["rejected"]
    assert c["parsed"] > 0  # the taught distiller writes the format
    d = pq.read_table(run_dir / "distill" / "distilled.parquet").to_pandas()
    assert d["raw"].map(lambda t: parse_output(t).ok).all()
    assert (d["kept"] == (d["expected_class"] >= 4)).all()
    kept = d[d["kept"]].sort_values("rank")
    assert kept["rank"].tolist() == list(range(1, len(kept) + 1))
    assert kept["long_tail"].is_monotonic_decreasing
    rejects = pq.read_table(run_dir / "distill" / "rejects.parquet").to_pandas()
    assert set(rejects["reason"]) <= set(REJECT_REASONS)
    merged = pq.read_table(run_dir / "distill" / "merged.parquet").to_pandas()
    n_high = int((pq.read_table(run_dir / "imperfect" / "classes.parquet").to_pandas()["class"] >= 4).sum())
    assert len(merged) == c["merged_distilled"] + n_high == c["merged"]
    assert (merged["source"] == "lmmixup").sum() == min(c["kept"], 5000)

    from mixray.stages.train import build_training_rows

    table, inputs, counts = build_training_rows(TrainConfig(data="distilled"), run_dir)
    assert counts["source"] == "distilled" and table.num_rows == len(merged) and "merged" in inputs
    assert build_training_rows(TrainConfig(data="auto"), run_dir)[2]["source"] == "distilled"

    # cut off at 8 new tokens: no generation is complete, every one is rejected with its reason
    short = _cfg(run_dir, tiny_lm_dir, distiller, generate={"max_new_tokens": 8})
    c = run_stage("distill", short, run_dir)["counts"]
    rejects = pq.read_table(run_dir / "distill" / "rejects.parquet").to_pandas()
    assert c["rejected"] == c["clusters"] == len(rejects) and c["merged"] == n_high
    assert set(rejects["reason"]) == {"no_answer_tag"} and rejects["raw"].str.len().gt(0).all()
