"""A small run directory in the data contracts the train stage consumes, built from real data
(the data-carrying packages, tests/packaged_data.py).

Other stages produce these files in a real run; the tests build them here (same
schemas, same manifests) so training is tested on its own:

    ingest/examples.parquet     id, source, task, instruction, input, output, messages, quality
    select/selection.parquet    id, rank, gain, score, quality                  (QDIT)
    mix/mix_plan.parquet        mix_id, a_id, b_id, task_a, task_b, lam          (MDIT)
    cluster/selection.parquet   id, rank, cluster, dist, is_mix, a_id, b_id, lam (MDIT)
    confidence.parquet          id, confidence                                   (SFTMix split)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from packaged_data import records

from mixray.io.rundir import stage_run, write_table
from mixray.schema import EXAMPLE_SCHEMA


def write_stage_output(run_dir: Path, stage: str, name: str, table: pa.Table) -> Path:
    """Write ``table`` as a completed stage's output (with its manifest)."""
    with stage_run(run_dir / stage, "fixture", {}) as run:
        write_table(table, run.tmp_path(name))
    return run_dir / stage / name


def _records() -> list[dict]:
    """20 general (ShareGPT), 14 code (HumanEval), 14 math (GSM8K) examples from the packages."""
    out = []
    for source, task, n in (("sharegpt", "general", 20), ("humaneval", "code", 14), ("gsm8k", "math", 14)):
        out += [{"id": f"{source}/{i}", "source": source, "task": task, **r}
                for i, r in enumerate(records(task, n))]
    return out


def make_run_dir(root: Path) -> Path:
    """48 real examples over three tasks + a QDIT selection, an MDIT plan and selection, a split."""
    run_dir = root / "run"
    recs = _records()
    rng = np.random.default_rng(0)
    n = len(recs)
    examples = pa.table({
        "id": [r["id"] for r in recs], "source": [r["source"] for r in recs],
        "task": [r["task"] for r in recs], "instruction": [r["instruction"] for r in recs],
        "input": [r.get("input", "") for r in recs], "output": [r["output"] for r in recs],
        "messages": pa.nulls(n, EXAMPLE_SCHEMA.field("messages").type),
        "quality": rng.uniform(0, 1, n),
    }, schema=EXAMPLE_SCHEMA)
    write_stage_output(run_dir, "ingest", "examples.parquet", examples)
    ids = examples.column("id").to_pylist()
    tasks = examples.column("task").to_pylist()

    sel = ids[::2]  # 24 examples, in a rank order that is not the file order
    order = rng.permutation(len(sel))
    write_stage_output(run_dir, "select", "selection.parquet", pa.table({
        "id": [sel[i] for i in order], "rank": np.arange(len(sel)), "gain": rng.uniform(0, 1, len(sel)),
        "score": rng.uniform(0, 1, len(sel)), "quality": rng.uniform(0, 1, len(sel))}))

    # mixes pair examples of different tasks; λ ~ Beta(8, 8) as in the MDIT paper
    a_ids = [f"sharegpt/{i}" for i in range(8)] + [f"humaneval/{i}" for i in range(6)]
    b_ids = [f"gsm8k/{i}" for i in range(8)] + [f"gsm8k/{i + 8}" for i in range(6)]
    task = dict(zip(ids, tasks, strict=True))
    plan = pa.table({
        "mix_id": [f"mix/{i}" for i in range(len(a_ids))], "a_id": a_ids, "b_id": b_ids,
        "task_a": [task[a] for a in a_ids], "task_b": [task[b] for b in b_ids],
        "lam": rng.beta(8, 8, len(a_ids))})
    write_stage_output(run_dir, "mix", "mix_plan.parquet", plan)

    orig = ids[1::2][:18]
    mixes = plan.slice(0, 10)
    write_stage_output(run_dir, "cluster", "selection.parquet", pa.table({
        "id": orig + mixes.column("mix_id").to_pylist(),
        "rank": np.arange(len(orig) + mixes.num_rows),
        "cluster": np.arange(len(orig) + mixes.num_rows) % 4,
        "dist": rng.uniform(0, 1, len(orig) + mixes.num_rows),
        "is_mix": [False] * len(orig) + [True] * mixes.num_rows,
        "a_id": pa.array([None] * len(orig) + mixes.column("a_id").to_pylist(), pa.string()),
        "b_id": pa.array([None] * len(orig) + mixes.column("b_id").to_pylist(), pa.string()),
        "lam": pa.array([None] * len(orig) + mixes.column("lam").to_pylist(), pa.float64()),
    }))

    pq.write_table(pa.table({"id": ids, "confidence": rng.normal(-2.0, 0.5, n)}),
                           root / "confidence.parquet")
    return run_dir
