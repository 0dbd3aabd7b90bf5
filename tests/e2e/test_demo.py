"""The demo config through the real CLI entry point, on real data from the PyPI packages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mixray.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def test_demo_runs_end_to_end_then_skips(tmp_path, ray_session, capsys):
    run_dir = tmp_path / "demo"
    # the demo's data plane and QDIT selection on 20 examples (training has its own tests)
    small = [f"run_dir={run_dir}", "stages=[ingest,embed,score,select]", "ingest.sources.0.limit=8",
             "ingest.sources.1.limit=8", "ingest.sources.2.limit=4", "score.max_length=128",
             "score.batch_size=8", "select.k=6"]
    assert main(["run", str(DEMO), *small]) == 0
    ingest = json.loads((run_dir / "ingest" / "manifest.json").read_text())["counts"]
    assert ingest["in"] == 20 == ingest["kept"] + ingest["rejected"]
    assert set(ingest["sources"]) == {"sharegpt", "gsm8k", "humaneval"}
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet")
    emb = pq.read_table(run_dir / "embed" / "embeddings.parquet")
    q = pq.read_table(run_dir / "score" / "quality.parquet").to_pandas()
    assert emb["id"].to_pylist() == ex["id"].to_pylist()
    assert emb.schema.field("embedding").type.list_size == 384
    assert q["id"].tolist() == ex["id"].to_pylist() and (q["backend"] == "ifd").all()
    assert np.isfinite(q["raw"]).all() and (q["raw"] > 0).all()
    assert (run_dir / "config.yaml").read_text().count("limit: 8") == 2
    sel = pq.read_table(run_dir / "select" / "selection.parquet").to_pandas()
    assert sel["rank"].tolist() == list(range(1, 7)) and set(sel["id"]) <= set(q["id"])
    chosen = [json.loads(line) for line in (run_dir / "select" / "selected.jsonl").open()]
    assert [c["id"] for c in chosen] == sel["id"].tolist()
    sweep = [line.split(",")[0] for line in (run_dir / "select" / "alpha_sweep.csv").open()]
    assert sweep == ["alpha", "0.7", "0.0", "0.05", "0.1", "0.2", "1.0", "random"] and (run_dir / "select" / "alpha_sweep.png").stat().st_size > 0
    stages = ("ingest", "embed", "score", "select")
    before = {s: (run_dir / s / "manifest.json").stat().st_mtime_ns for s in stages}
    # unchanged config and inputs: every stage is skipped (its manifest is not rewritten)
    assert main(["run", str(DEMO), *small]) == 0
    assert {s: (run_dir / s / "manifest.json").stat().st_mtime_ns for s in stages} == before


def test_cli_error_is_a_message_not_a_traceback(tmp_path, capsys):
    code = main(["run", str(DEMO), f"run_dir={tmp_path}", "ingest.sources.1.path=/nonexistent.jsonl"])
    err = capsys.readouterr().err
    assert code == 2
    assert "ingest.sources[gsm8k].path: /nonexistent.jsonl does not exist" in err
    assert "Traceback" not in err


# The demo script with the data and the models' work shrunk (same stages, same two runs, same report).
SMALL_DEMO = [
    "ingest.sources.0.limit=12", "ingest.sources.1.limit=12", "ingest.sources.2.limit=6",
    "score.max_length=128", "score.batch_size=8", "select.k=8", "train.epochs=1", "train.max_length=128",
    "evaluate.heldout_limit=3", "evaluate.max_new_tokens=12", "evaluate.max_length=512",
    "evaluate.benchmarks.0.shots=1", "evaluate.benchmarks.0.limit=2", "evaluate.benchmarks.1.limit=3",
    "evaluate.benchmarks.2.limit=2",
]


def test_demo_script_compares_qdit_with_random_and_prints_the_table(tmp_path):
    """scripts/demo.sh (what `make demo` runs): QDIT run, random run of the same K, the report."""
    import os
    import re
    import subprocess
    import sys

    env = os.environ | {"MIXRAY": f"{sys.executable} -m mixray.cli", "RUNS": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), *SMALL_DEMO], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the comparison table: the base model, then the QDIT run and the random run with deltas
    assert re.search(r"^benchmark\s+metric\s+n\s+base\s+demo\s+demo-random\s*$", out, re.M), out
    for bench, metric in (("heldout", "loss ↓"), ("heldout", "perplexity ↓"), ("gsm8k", "exact_match ↑"),
                          ("arc_easy", "accuracy ↑"), ("arc_challenge", "accuracy_norm ↑")):
        assert re.search(rf"^{bench}\s+{re.escape(metric)}\s+\d+\s+\S+\s+\S+ \([+-]\S+\)\s+\S+ \([+-]\S+\)",
                         out, re.M), (bench, metric, out)
    report = tmp_path / "demo-report" / "report.html"
    assert f"report: {report}" in out and report.stat().st_size > 10_000
    sel = {name: pq.read_table(tmp_path / name / "select" / "selection.parquet")["id"].to_pylist()
           for name in ("demo", "demo-random")}
    assert len(sel["demo"]) == len(sel["demo-random"]) == 8 and sel["demo"] != sel["demo-random"]
    # the random run reused the QDIT run's data plane (skipped) and did not re-evaluate the base
    random_eval = json.loads((tmp_path / "demo-random" / "evaluate" / "summary.json").read_text())
    assert set(random_eval["models"]) == {"trained"}
    assert "embed: inputs and config unchanged, skipped" in proc.stderr
    held = set(pq.read_table(tmp_path / "demo" / "ingest" / "heldout.parquet")["id"].to_pylist())
    trained_on = set(pq.read_table(tmp_path / "demo" / "train" / "rows.parquet")["id"].to_pylist())
    assert held and not held & trained_on
