"""Fault injection (issue 11 item 8): SIGKILL during embed, score, select, cluster and train.

Every case kills a real process at a chosen point and reruns the stage on what the kill
left; the rerun's outputs must equal those of an uninterrupted run (the module's
reference run directory): exactly for embed, score, select and cluster, and for
training to the tolerance of the resume test in test_train.py (each step's loss to
rel 1e-6; the exported weights too).

- The four data stages run as a subprocess ``mixray <stage>`` (tests/kill_after.py)
  that SIGKILLs itself right after the n-th call of a chosen function returns, so the
  kill lands at the same point every time: embed while its output is half streamed,
  score between renaming its two outputs into place, select right after its second
  checkpoint, cluster after the first Lloyd iteration on the KMeans actors.
- The training driver (a subprocess ``mixray train``) is SIGKILLed once Ray Train has
  registered two checkpoints; before the rerun the newest checkpoint is spoilt and
  Ray's checkpoint list cut short, as a kill during its write would leave it: the
  rerun must fall back to the older checkpoint.
- A training worker (a ``RayTrainWorker`` process of this test's Ray) is SIGKILLed once
  the first checkpoint is registered; Ray restarts the group, which resumes.

Drivers connect to the session's Ray (``ray.address``), as a driver on a cluster
does: killing one ends its actors and workers, the cluster stays.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from packaged_data import pkg_source
from safetensors.torch import load_file

from mixray.config import RunConfig
from mixray.io.rundir import read_manifest
from mixray.stages import run_stage
from mixray.training.metrics import read_metrics

KILL_AFTER = Path(__file__).resolve().parents[1] / "kill_after.py"
STAGES = ["ingest", "embed", "score", "select", "mix", "cluster", "train"]
STEPS, EVERY = 8, 2  # optimizer steps of the training run, checkpoint every 2 steps

# stage -> (function whose n-th return is followed by the kill, n)
DRIVER_KILLS = {
    "embed": ("pyarrow.parquet:ParquetWriter.write_table", 2),  # 2 of 5 batches in the temp file
    "score": ("mixray.io.rundir:_fsync", 2),  # rejects.parquet renamed into place, quality not yet
    "select": ("mixray.stages.select:save_checkpoint", 2),  # after the step-8 checkpoint
    "cluster": ("mixray.distributed.kmeans:_RayShards.step", 1),  # after the first Lloyd iteration
}
# what the rerun must reproduce exactly (tables) beside the manifest's counts
COMPARED = {"embed": ["embeddings.parquet"], "score": ["quality.parquet", "rejects.parquet"],
            "select": ["selection.parquet", "selected.jsonl"],
            "cluster": ["selection.parquet", "centroids.parquet"]}


def raw_config(run_dir: Path, model: Path) -> dict:
    return {
        "run_dir": str(run_dir), "seed": 0, "stages": STAGES,
        "ingest": {"sources": [pkg_source(t, limit=24) for t in ("general", "math", "code")]},
        "embed": {"encoder": "lm-embedding", "model": str(model), "normalize": False,
                  "batch_size": 16, "threads": 1},
        "score": {"backend": "ifd", "model": str(model), "max_length": 128, "batch_size": 16,
                  "threads": 1},
        "select": {"k": 32, "alpha": 0.5, "checkpoint_every": 4},
        "mix": {"model": str(model), "bucket_width": 16},
        "cluster": {"budget": 30, "n_clusters": 6, "plot": "none"},
        "train": {"model": str(model), "data": "select", "max_length": 64, "micro_batch_size": 2,
                  "num_workers": 2, "threads": 1, "lr": 3e-3, "warmup_ratio": 0.0,
                  "checkpoint_every": EVERY, "max_failures": 1, "deepspeed": {"stage": 2}},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm_dir, ray_session):
    """An uninterrupted run of every stage: (its directory, the raw config, the Ray address)."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    raw = raw_config(run_dir, tiny_lm_dir)
    cfg = RunConfig.model_validate(raw)
    for stage in STAGES:
        run_stage(stage, cfg, run_dir)
    assert read_manifest(run_dir / "train")["counts"]["steps"] == STEPS
    return run_dir, raw, ray_session.get_runtime_context().gcs_address


def _fault_dir(reference, tmp_path: Path, stage: str) -> tuple[Path, dict, Path]:
    """A copy of the reference without ``stage``'s directory; (run dir, raw config, CLI config)."""
    ref_dir, raw, address = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=lambda d, names: [stage] if Path(d) == ref_dir else [])
    raw = raw | {"run_dir": str(run_dir)}
    cli = tmp_path / "run.yaml"
    cli.write_text(yaml.safe_dump(raw | {"ray": {"address": address}}))
    return run_dir, raw, cli


def _rerun(stage: str, raw: dict, run_dir: Path, caplog) -> dict:
    caplog.clear()
    with caplog.at_level("INFO", logger="mixray"):
        return run_stage(stage, RunConfig.model_validate(raw), run_dir)


def _same_outputs(stage: str, run_dir: Path, ref_dir: Path) -> None:
    for name in COMPARED[stage]:
        got, want = run_dir / stage / name, ref_dir / stage / name
        if name.endswith(".parquet"):
            assert pq.read_table(got).equals(pq.read_table(want)), name
        else:
            assert got.read_bytes() == want.read_bytes(), name
    assert read_manifest(run_dir / stage)["counts"] == read_manifest(ref_dir / stage)["counts"]


@pytest.mark.parametrize("stage", list(DRIVER_KILLS))
def test_driver_killed_during_a_stage_then_rerun_equals_an_uninterrupted_run(
        stage, reference, tmp_path, caplog):
    run_dir, raw, cli = _fault_dir(reference, tmp_path, stage)
    target, n = DRIVER_KILLS[stage]
    proc = subprocess.run([sys.executable, str(KILL_AFTER), target, str(n), "--", stage, str(cli)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = run_dir / stage
    assert read_manifest(out) is None  # the killed run vouches for nothing
    left = sorted(p.name for p in out.iterdir())
    if stage == "embed":
        assert [n for n in left if n.startswith(".embeddings.parquet.tmp-")], left
    elif stage == "score":  # one output renamed into place, the other still a temp file
        assert "rejects.parquet" in left and "quality.parquet" not in left, left
    elif stage == "select":
        assert json.loads((out / "checkpoints" / "record.json").read_text())["meta"]
    m = _rerun(stage, raw, run_dir, caplog)
    assert m["skipped"] is False and "taking over the lock" in caplog.text
    if stage in ("embed", "score"):
        assert f"{stage}: removed 1 temporary file(s) left by an interrupted run" in caplog.text
    if stage == "select":
        assert "resuming from checkpoint at step 8 of 32" in caplog.text
        assert not (out / "checkpoints").exists()
    _same_outputs(stage, run_dir, reference[0])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- training


def _ray_train_dir(run_dir: Path) -> Path | None:
    found = list((run_dir / "train" / "ray").glob("*/checkpoint_manager_snapshot.json"))
    return found[0].parent if found else None


def _registered(run_dir: Path) -> int:
    """How many checkpoints Ray Train has registered for the run (0 while none)."""
    d = _ray_train_dir(run_dir)
    try:
        return len(json.loads((d / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (TypeError, OSError, ValueError, KeyError):
        return 0


def _wait_for(cond, proc=None, timeout: float = 900) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc={proc.returncode}) before the kill")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.05)


def _same_training(run_dir: Path, ref_dir: Path) -> list[dict]:
    """Every step's loss (the last attempt's) and the exported weights equal the reference's."""
    got, want = read_metrics(run_dir / "train" / "metrics.csv"), read_metrics(ref_dir / "train" / "metrics.csv")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)
    a, b = load_file(run_dir / "train" / "model" / "model.safetensors"), \
        load_file(ref_dir / "train" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].allclose(b[k], rtol=1e-6, atol=1e-7), k
    with open(run_dir / "train" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_driver_killed_then_a_spoilt_checkpoint_falls_back(reference, tmp_path, caplog):
    run_dir, raw, cli = _fault_dir(reference, tmp_path, "train")
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 (closed below; a pipe could fill and block)
    # --verbose: rank 0's "starting/resuming at step" line is a worker's INFO, which the quiet
    # console leaves out
    proc = subprocess.Popen([sys.executable, "-m", "mixray.cli", "--verbose", "train", str(cli)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _registered(run_dir) >= 2, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        log.close()
    driver_log = (tmp_path / "driver.log").read_text()
    assert proc.returncode == -signal.SIGKILL, driver_log[-4000:]
    # issue 11 (minor): a fresh start logged "resuming at step 0"
    assert f"ntp, starting at step 0 of {STEPS}" in driver_log and "resuming at step 0" not in driver_log
    ray_dir = _ray_train_dir(run_dir)
    ckpts = sorted(p for p in ray_dir.glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) >= 2
    # the newest checkpoint loses the tail of its model states; Ray's list is cut off mid-write
    states = ckpts[-1] / "state" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    snap = ray_dir / "checkpoint_manager_snapshot.json"
    snap.write_bytes(snap.read_bytes()[:40])
    older_step = json.loads((ckpts[-2] / "trainer_state.json").read_text())["step"]
    m = _rerun("train", raw, run_dir, caplog)
    assert m["skipped"] is False and "taking over the lock" in caplog.text
    assert "checkpoint list" in caplog.text and "unusable" in caplog.text
    rows = _same_training(run_dir, reference[0])
    last = max(int(r["attempt"]) for r in rows)
    # the rerun (the last attempt) started right after the older checkpoint's step
    assert min(int(r["step"]) for r in rows if int(r["attempt"]) == last) == older_step + 1


def _train_workers() -> list[psutil.Process]:
    """This test process's Ray Train worker processes (never another session's)."""
    return [p for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(_cmdline(p))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_training_worker_killed_then_the_group_resumes(reference, tmp_path, caplog):
    run_dir, raw, _ = _fault_dir(reference, tmp_path, "train")
    killed: list[int] = []

    def kill_a_worker():
        _wait_for(lambda: _registered(run_dir) >= 1)
        workers = _train_workers()
        if workers:
            killed.append(workers[-1].pid)
            workers[-1].send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    m = _rerun("train", raw, run_dir, caplog)
    killer.join(timeout=60)
    assert killed, "no Ray Train worker to kill"
    assert m["counts"]["restarts"] == 1
    rows = _same_training(run_dir, reference[0])
    assert {int(r["attempt"]) for r in rows} == {0, 1}
    first_of_retry = min(int(r["step"]) for r in rows if r["attempt"] == "1")
    assert first_of_retry > 1 and (first_of_retry - 1) % EVERY == 0  # resumed from a checkpoint
