"""The stage runner (declared outputs, skip, recompute, stale temp files), the run-dir lock,
and the CLI's one-line user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from stage_runs import run_config

from mixray.cli import main
from mixray.contracts import EXAMPLES, Artifact
from mixray.errors import InputError, ResourceError, RunDirLockedError
from mixray.io.lock import LOCK_NAME, run_dir_lock
from mixray.io.rundir import read_manifest, stage_run, write_table
from mixray.stages.runner import Stage, execute

OUT = Artifact("toy", "out.parquet")
UNDECLARED = Artifact("toy", "other.parquet")


class Toy(Stage):
    """Doubles the number of examples into a one-column table; counts its runs."""

    name = "toy"
    requires = (EXAMPLES,)
    outputs = (OUT,)
    summary = "{out} rows"
    runs = 0

    def config(self) -> dict:
        return {"factor": self.factor}

    factor = 2

    def run(self, out) -> None:
        Toy.runs += 1
        n = pq.ParquetFile(EXAMPLES.path(self.run_dir)).metadata.num_rows
        write_table(pa.table({"x": list(range(n * self.factor))}), out.path(OUT))
        out.counts = {"in": n, "out": n * self.factor}


class Sloppy(Toy):
    def run(self, out) -> None:
        write_table(pa.table({"x": [1]}), out.path(UNDECLARED))


def _upstream(run_dir: Path, n: int = 3) -> None:
    with stage_run(run_dir / "ingest", "fixture", {}) as run:
        write_table(pa.table({"id": [str(i) for i in range(n)]}), run.tmp_path(EXAMPLES.name))


def test_runner_runs_skips_and_recomputes_on_config_or_input_change(tmp_path):
    cfg = run_config()
    _upstream(tmp_path)
    Toy.runs = 0
    m = execute(Toy(cfg, tmp_path))
    assert m["skipped"] is False and m["counts"] == {"in": 3, "out": 6}
    assert pq.read_table(OUT.path(tmp_path)).num_rows == 6
    assert list(m["inputs"]) == ["ingest/examples.parquet"]
    assert execute(Toy(cfg, tmp_path))["skipped"] is True and Toy.runs == 1
    assert execute(Toy(cfg, tmp_path), force=True)["skipped"] is False and Toy.runs == 2
    other = Toy(cfg, tmp_path)
    other.factor = 3  # a config change
    assert execute(other)["counts"]["out"] == 9 and Toy.runs == 3
    _upstream(tmp_path, n=4)  # an input change
    assert execute(other)["counts"] == {"in": 4, "out": 12} and Toy.runs == 4


def test_runner_names_a_missing_upstream_stage(tmp_path):
    with pytest.raises(InputError, match="run the 'ingest' stage first"):
        execute(Toy(run_config(), tmp_path))


def test_runner_refuses_undeclared_outputs_and_leaves_no_manifest(tmp_path):
    _upstream(tmp_path)
    with pytest.raises(RuntimeError, match="does not declare"):
        execute(Sloppy(run_config(), tmp_path))
    assert read_manifest(tmp_path / "toy") is None


def test_runner_removes_temp_files_of_a_killed_run(tmp_path):
    _upstream(tmp_path)
    stale = [tmp_path / "toy" / ".out.parquet.tmp-999999", tmp_path / "toy" / "checkpoints" / ".a.npz.tmp-1",
             tmp_path / "toy" / "model.partial"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    keep = tmp_path / "toy" / "checkpoints" / "a.npz"
    keep.write_bytes(b"ok")
    execute(Toy(run_config(), tmp_path))
    assert not any(p.exists() for p in stale) and keep.exists()


# ----------------------------------------------------------------------------- the lock

_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mixray.io.lock import run_dir_lock
    with run_dir_lock(Path(sys.argv[1]), command="mixray run holder.yaml"):
        print("locked", flush=True)
        time.sleep(120)
""")


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_names_its_holder_and_is_taken_over_after_a_kill(tmp_path, caplog):
    holder = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirLockedError) as e, run_dir_lock(tmp_path):
            pass
        assert time.monotonic() - t0 < 2  # at once, no waiting
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "mixray run holder.yaml" in msg and "since 20" in msg
        assert os.uname().nodename in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level("WARNING", logger="mixray.lock"), run_dir_lock(tmp_path):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
        with run_dir_lock(tmp_path):  # re-entrant in one process
            pass
    assert f"pid {holder.pid}" in caplog.text and "taking over" in caplog.text
    with run_dir_lock(tmp_path):  # released cleanly: nothing to take over
        pass


def _config(tmp_path: Path, **extra) -> Path:
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": ["ingest"],
                                 "ingest": {"sources": [{"name": "s", "path": str(src)}]}} | extra))
    return p


def test_cli_second_run_on_a_busy_run_dir_fails_at_once(tmp_path, capsys):
    cfg = _config(tmp_path)
    holder = _holder(tmp_path / "run")
    try:
        assert main(["run", str(cfg)]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mixray run: error: ") and f"pid {holder.pid}" in err and "(run_dir)" in err
    assert not (tmp_path / "run" / "ingest").exists()
    assert main(["run", str(cfg)]) == 0


# ----------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("args, expect", [
    (["select.alpha=[0.5"], "override value '[0.5' is not a YAML value"),
    (["select.actors=2"], "'actors' was renamed to 'concurrency'"),
    (["train.tokenize_workers=2"], "'tokenize_workers' was renamed to 'tokenize_concurrency'"),
])
def test_cli_config_errors_are_one_line(tmp_path, capsys, args, expect):
    assert main(["run", str(_config(tmp_path)), *args]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_cli_run_dir_that_is_a_file_and_non_utf8_config(tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    assert main(["run", str(_config(tmp_path))]) == 2
    assert "is not a directory (run_dir)" in capsys.readouterr().err
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"run_dir: caf\xe9\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and f"({bad})" in err and "Traceback" not in err


def test_cli_algorithm_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys,
                                                                         monkeypatch):
    """select.device=cuda on a CPU machine: the algorithm layer's ResourceError, one line."""
    import numpy as np
    import torch

    from mixray.errors import ResourceError
    from mixray.io.embeddings import embedding_array

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    run_dir = tmp_path / "run"
    ids = [f"s/{i}" for i in range(4)]
    for stage, name, table in (
        ("embed", "embeddings.parquet", pa.table({"id": ids, "embedding": embedding_array(
            np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))})),
        ("score", "quality.parquet", pa.table({"id": ids, "score": [0.1, 0.2, 0.3, 0.4]})),
        ("ingest", "examples.parquet", pa.table({"id": ids})),
    ):
        with stage_run(run_dir / stage, "fixture", {}) as run:
            write_table(table, run.tmp_path(name))
    cfg = _config(tmp_path, stages=["select"])
    assert main(["run", str(cfg), "select.k=3", "select.device=cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mixray run: error: ") and "no CUDA device" in err[-1]
    assert err[-1].endswith("(select.device)")
    assert not any("Traceback" in line for line in err)
    with pytest.raises(ResourceError):
        main(["--debug", "run", str(cfg), "select.k=3", "select.device=cuda"])


def test_relative_run_dir_is_refused_under_a_ray_job(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert main(["run", str(cfg), "run_dir=runs/demo"]) == 2
    err = capsys.readouterr().err
    assert "is relative, but under `ray job submit`" in err and "(run_dir)" in err
    assert main(["run", str(cfg)]) == 0  # absolute: fine


# -- a Ray out-of-memory kill, however Ray wraps it, is one line naming the stage's knobs -------------


def _oom() -> BaseException:
    from ray.exceptions import OutOfMemoryError

    return OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on the "
                            "node (IP: 10.0.0.1) was 22.45GB used / 23.54GB limit (0.953497)")


def _ray_data_chain() -> BaseException:
    """What Ray Data raises when a map worker was OOM-killed: a RayTaskError with the OOM as cause."""
    from ray.exceptions import RayTaskError

    err = RayTaskError("MapBatches(IFDScorer)", "traceback", _oom())
    try:
        raise RuntimeError("Ray Data pipeline failed") from err.as_instanceof_cause()
    except RuntimeError as e:
        return e


def _ray_train_controller() -> BaseException:
    """Ray Train's fit(): a ControllerError around the OOM, pickled back to the driver (no __cause__)."""
    import pickle

    from ray.train import ControllerError

    return pickle.loads(pickle.dumps(ControllerError(_oom())))


def _ray_train_workers() -> BaseException:
    import pickle

    from ray.train import WorkerGroupError

    return pickle.loads(pickle.dumps(WorkerGroupError("rank 1 died", {0: ValueError("x"), 1: _oom()})))


class Hungry(Toy):
    memory_knobs = ("concurrency", "batch_size")
    error = None

    def run(self, out) -> None:
        raise type(self).error


@pytest.mark.parametrize("make", [_oom, _ray_data_chain, _ray_train_controller, _ray_train_workers],
                         ids=["bare", "ray-data", "ray-train-controller", "ray-train-workers"])
def test_an_out_of_memory_kill_is_one_line_naming_the_knobs(tmp_path, make):
    """Issue 11: Ray's OutOfMemoryError reached the user as a raw traceback (training: a
    ControllerError/WorkerGroupError whose OOM the runner did not look into)."""
    _upstream(tmp_path)
    Hungry.error = make()
    with pytest.raises(ResourceError) as e:
        execute(Hungry(run_config(), tmp_path))
    assert str(e.value) == ("toy: Ray killed a worker that ran out of memory; lower toy.concurrency, "
                            "toy.batch_size, or give the node more memory (toy)")
    assert e.value.__cause__ is None and "\n" not in str(e.value)
    assert read_manifest(tmp_path / "toy") is None


def test_out_of_memory_knobs_are_named_by_their_config_keys():
    """A stage whose settings live in another section (LM-Mixup's under lmmixup) names those keys."""
    from ray.exceptions import OutOfMemoryError

    from mixray.stages import stage_class
    from mixray.stages.runner import _raise_out_of_memory

    for name, key in (("distill_grpo", "lmmixup.grpo.per_device_batch_size"),
                      ("distill_sft", "lmmixup.sft.micro_batch_size"), ("train", "train.micro_batch_size")):
        stage = stage_class(name).__new__(stage_class(name))
        with pytest.raises(ResourceError, match=rf"lower {key}, "):
            _raise_out_of_memory(stage, OutOfMemoryError("killed"))


def test_other_failures_of_ray_pass_through_unchanged(tmp_path):
    from ray.train import WorkerGroupError

    _upstream(tmp_path)
    Hungry.error = WorkerGroupError("rank 0 failed", {0: ZeroDivisionError("boom")})
    with pytest.raises(WorkerGroupError):
        execute(Hungry(run_config(), tmp_path))


def test_an_output_path_asked_for_twice_is_committed_once(tmp_path):
    """distill_grpo writes its rated library, then hands the same temporary path to the GRPO
    workers: the second request registered the rename again and the commit failed on it."""
    from mixray.io.rundir import read_manifest, stage_run

    with stage_run(tmp_path / "s", "h", {}) as run:
        p = run.tmp_path("library.npz")
        p.write_bytes(b"x")
        assert run.tmp_path("library.npz") == p
    assert (tmp_path / "s" / "library.npz").read_bytes() == b"x"
    assert list(read_manifest(tmp_path / "s")["outputs"]) == ["library.npz"]
