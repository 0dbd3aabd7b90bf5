"""The README's cluster command, verbatim, against a real Ray head started by the test.

`ray job submit --address http://<head>:8265 --working-dir . --runtime-env
cluster/runtime_env.yaml -- mixray run configs/demo.yaml run_dir=<abs>` is read from the
README, pointed at a head this test starts (its own temp dir and ports, dashboard and job
server on, token auth on; tests/rays.py) and run through the Jobs CLI on a shrunken
demo: every stage, training included, with the tiny test model. Then the same command
again: every stage is skipped. A relative run_dir is refused. Only the head this test
started is stopped, by its pid.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rays import BIN, Head, ray_head

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "embed", "score", "select", "train")


def readme_job_command() -> list[str]:
    """The one `ray job submit ... -- mixray run ...` command of the README (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())
    (line,) = [s for s in text.splitlines() if "ray job submit" in s and "mixray run" in s]
    return shlex.split(line)


def shrunken(model: Path) -> list[str]:
    """The demo on 20 examples, scored and trained with the tiny model (2 optimizer steps)."""
    return ["ingest.sources.0.limit=8", "ingest.sources.1.limit=8", "ingest.sources.2.limit=4",
            f"score.model={model}", "score.max_length=128", "score.batch_size=8", "select.k=6",
            f"train.model={model}", "train.max_length=128", "train.micro_batch_size=1",
            "train.grad_accum=1", "train.max_steps=2", "train.checkpoint_every=0"]


def submit(head: Head, run_dir: str, overrides: list[str]) -> subprocess.CompletedProcess:
    argv = readme_job_command()
    assert argv[:3] == ["ray", "job", "submit"] and "--" in argv, argv
    placeholders = {"--address": head.dashboard}  # the documented http://<head>:8265
    argv = [placeholders.get(argv[i - 1], a) if i else str(BIN / "ray") for i, a in enumerate(argv)]
    argv = [f"run_dir={run_dir}" if a.startswith("run_dir=") else a for a in argv]
    return subprocess.run(argv + overrides, cwd=ROOT, env=head.client_env(), capture_output=True,
                          text=True, timeout=900)


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {s: (run_dir / s / "manifest.json").stat().st_mtime_ns for s in STAGES}


@pytest.fixture(scope="module")
def head():
    with ray_head(num_cpus=2) as h:
        yield h


def test_readme_job_command_runs_the_demo_then_skips_it(head, tmp_path, tiny_lm_dir):
    t0 = time.monotonic()
    run_dir = tmp_path / "demo"
    small = shrunken(tiny_lm_dir)
    first = submit(head, str(run_dir), small)
    assert first.returncode == 0 and "succeeded" in first.stdout + first.stderr, first.stdout[-6000:]
    assert "running as a Ray job driver" in first.stdout
    ingest = json.loads((run_dir / "ingest" / "manifest.json").read_text())["counts"]
    assert ingest["in"] == 20 == ingest["kept"]
    ids = pq.read_table(run_dir / "ingest" / "examples.parquet")["id"].to_pylist()
    emb = pq.read_table(run_dir / "embed" / "embeddings.parquet")
    assert emb["id"].to_pylist() == ids and emb.schema.field("embedding").type.list_size == 384
    assert pq.read_table(run_dir / "score" / "quality.parquet")["id"].to_pylist() == ids
    sel = pq.read_table(run_dir / "select" / "selection.parquet").to_pandas()
    assert sel["rank"].tolist() == list(range(1, 7)) and set(sel["id"]) <= set(ids)
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert train["counts"]["steps"] == 2 and train["counts"]["rows"] == 6
    assert (run_dir / "train" / "model" / "adapter_config.json").is_file()
    # the workers' third-party noise stays out of the job's log (mixray's quiet worker set-up)
    assert "FutureWarning" not in first.stdout and "Loading weights" not in first.stdout
    before = _mtimes(run_dir)

    again = submit(head, str(run_dir), small)
    assert again.returncode == 0, again.stdout[-6000:]
    for stage in STAGES:
        assert f"{stage}: inputs and config unchanged, skipped" in again.stdout, stage
    assert _mtimes(run_dir) == before  # no manifest rewritten
    print(f"\njob submission test: two submissions in {time.monotonic() - t0:.0f} s")


def test_a_relative_run_dir_is_refused_under_a_job(head, tmp_path):
    refused = submit(head, "runs/demo", ["stages=[ingest]"])
    assert refused.returncode != 0
    assert "run_dir='runs/demo' is relative" in refused.stdout + refused.stderr
