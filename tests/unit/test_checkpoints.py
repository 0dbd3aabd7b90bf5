"""mixray.io.checkpoints: the signed record of checkpoint files, the key, flushed atomic writes."""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from mixray.errors import ResourceError
from mixray.io.checkpoints import (
    CheckpointError,
    atomic_write_bytes,
    check_files,
    checkpoint_key,
    hash_files,
    key_path,
    read_record,
    write_record,
)
from mixray.io.rundir import remove_stale_temp_files


def test_key_is_made_once_private_and_shared_by_racing_writers(tmp_path):
    path = tmp_path / "cache" / "checkpoint.key"
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: checkpoint_key(path), range(16)))
    assert len(keys) == 1 and len(next(iter(keys))) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.key"]  # no temp left
    assert checkpoint_key(path) == keys.pop()


def test_key_lives_in_the_mixray_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXRAY_CACHE", str(tmp_path / "c"))
    assert key_path() == tmp_path / "c" / "checkpoint.key"


def test_a_key_others_can_write_or_of_the_wrong_size_is_refused(tmp_path):
    path = tmp_path / "checkpoint.key"
    checkpoint_key(path)
    os.chmod(path, 0o666)
    with pytest.raises(ResourceError, match=r"writable by others.*chmod 600") as e:
        checkpoint_key(path)
    assert e.value.where == str(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(ResourceError, match="holds 5 bytes, not 32"):
        checkpoint_key(path)


def test_record_round_trip_and_every_way_it_fails(tmp_path):
    key, other = b"a" * 32, b"b" * 32
    ck = tmp_path / "ck"
    (ck / "sub").mkdir(parents=True)
    (ck / "model.pt").write_bytes(b"weights" * 100)
    (ck / "sub" / "state.json").write_text("{}")
    files = hash_files(ck)
    assert set(files) == {"model.pt", "sub/state.json"}
    write_record(tmp_path / "record.json", files, {"step": 4}, key)
    rec = read_record(tmp_path / "record.json", key)
    assert rec["meta"] == {"step": 4}
    check_files(ck, rec["files"])
    with pytest.raises(CheckpointError, match="signature does not verify"):
        read_record(tmp_path / "record.json", other)
    edited = json.loads((tmp_path / "record.json").read_text())
    edited["meta"]["step"] = 8
    (tmp_path / "forged.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="signature does not verify"):
        read_record(tmp_path / "forged.json", key)
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unreadable checkpoint record"):
        read_record(tmp_path / "empty.json", key)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a checkpoint record"):
        read_record(tmp_path / "list.json", key)
    with pytest.raises(CheckpointError, match="no checkpoint record"):
        read_record(tmp_path / "none.json", key)
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        check_files(ck, {"../record.json": "0"})
    (ck / "model.pt").write_bytes((ck / "model.pt").read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"model.pt: its sha256 differs"):
        check_files(ck, rec["files"])
    check_files(ck, rec["files"], full=False)  # presence only
    (ck / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.pt: zero-length"):
        check_files(ck, rec["files"])
    (ck / "sub" / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state.json: missing"):
        check_files(ck, {"sub/state.json": rec["files"]["sub/state.json"]}, full=False)


def test_atomic_write_leaves_only_what_the_runner_cleans(tmp_path):
    target = tmp_path / "stage" / "checkpoints" / "x.bin"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    # a kill between write and rename leaves a temp file that the stage runner removes
    (target.parent / ".x.bin.tmp-12345").write_bytes(b"half")
    assert remove_stale_temp_files(tmp_path / "stage") == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]


# -- training checkpoints (mixray.training.checkpoints), as Ray Train merges the ranks' directories --


def _rank_dir(root, rank: int, files: dict[str, bytes], step: int = 4, run: str = "run-a",
              key: bytes = b"k" * 32):
    from mixray.training.checkpoints import record_checkpoint

    d = root / f"rank{rank}"
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    record_checkpoint(d, rank, 2, step, run, key)
    return d


def _merged(tmp_path, **kw):
    """checkpoint_x/: what Ray Train stores after both ranks reported (their directories merged)."""
    import shutil

    r0 = _rank_dir(tmp_path, 0, {"state/model_states.pt": b"M" * 64, "state/optim_0.pt": b"a" * 32,
                                 "rng/rank0.pt": b"r0", "trainer_state.json": b'{"step": 4}'},
                   **kw.get("r0", {}))
    r1 = _rank_dir(tmp_path, 1, {"state/optim_1.pt": b"b" * 32, "rng/rank1.pt": b"r1"},
                   **kw.get("r1", {}))
    d = tmp_path / "checkpoint_x"
    for r in (r0, r1):
        shutil.copytree(r, d, dirs_exist_ok=True)
    return d


def test_a_training_checkpoint_verifies_on_every_rank(tmp_path):
    from mixray.training.checkpoints import verify_checkpoint

    d = _merged(tmp_path)
    assert verify_checkpoint(d, 0, 2, "run-a", b"k" * 32) == 4
    assert verify_checkpoint(d, 1, 2, "run-a", b"k" * 32) == 4


@pytest.mark.parametrize("spoil, rank, reason", [
    (lambda d: (d / "mixray-record" / "rank1.json").unlink(), 0, "rank1.json: no checkpoint record"),
    (lambda d: (d / "state" / "model_states.pt").write_bytes(b"M" * 10), 1,
     "model_states.pt: its sha256 differs"),  # rank 0's files: every rank loads them
    (lambda d: (d / "state" / "optim_1.pt").write_bytes(b""), 1, "optim_1.pt: zero-length"),
    (lambda d: (d / "state" / "optim_0.pt").unlink(), 1, "optim_0.pt: missing"),
    (lambda d: (d / "state" / "extra.pt").write_bytes(b"pickle"), 0, "state/extra.pt is not in the record"),
])
def test_a_spoilt_training_checkpoint_is_refused_with_the_reason(tmp_path, spoil, rank, reason):
    from mixray.training.checkpoints import verify_checkpoint

    d = _merged(tmp_path)
    spoil(d)
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(d, rank, 2, "run-a", b"k" * 32)


def test_a_rank_hashes_its_own_and_rank_zeros_files_and_the_ranks_agree_by_all_reduce(tmp_path):
    from mixray.training.checkpoints import verify_checkpoint

    d = _merged(tmp_path)
    (d / "state" / "optim_1.pt").write_bytes(b"c" * 32)  # rank 1's own file, altered
    assert verify_checkpoint(d, 0, 2, "run-a", b"k" * 32) == 4  # rank 0 only checks it is there
    with pytest.raises(CheckpointError, match="optim_1.pt: its sha256 differs"):
        verify_checkpoint(d, 1, 2, "run-a", b"k" * 32)


def test_a_training_checkpoint_of_another_run_key_world_or_step_is_refused(tmp_path):
    from mixray.training.checkpoints import verify_checkpoint

    d = _merged(tmp_path / "a")
    with pytest.raises(CheckpointError, match="saved by run 'run-a', not 'run-b'"):
        verify_checkpoint(d, 0, 2, "run-b", b"k" * 32)
    with pytest.raises(CheckpointError, match="signature does not verify"):
        verify_checkpoint(d, 0, 2, "run-a", b"x" * 32)
    with pytest.raises(CheckpointError, match="saved by rank 0 of 2, not rank 0 of 1"):
        verify_checkpoint(d, 0, 1, "run-a", b"k" * 32)
    d = _merged(tmp_path / "b", r1={"step": 6})
    with pytest.raises(CheckpointError, match=r"the ranks saved different steps \[4, 6\]"):
        verify_checkpoint(d, 0, 2, "run-a", b"k" * 32)


def _snapshot(run, dirs, version=None):
    import ray

    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in dirs]
    return json.dumps({"ray_version": version or ray.__version__, "checkpoint_results": results,
                       "checkpoint_report_indices": list(range(len(dirs)))})


@pytest.mark.parametrize("content, dropped", [
    (lambda: _snapshot("r", ["checkpoint_1"]), None),
    (lambda: _snapshot("r", ["checkpoint_1"])[:40], "unreadable"),
    (lambda: "", "unreadable"),
    (lambda: _snapshot("r", ["checkpoint_1", "checkpoint_0"]), "it lists checkpoint_0, which is gone"),
    (lambda: _snapshot("r", ["checkpoint_1"], version="2.9.0"), "written by Ray 2.9.0"),
])
def test_a_ray_checkpoint_list_ray_cannot_start_from_is_dropped(tmp_path, caplog, content, dropped):
    from mixray.training.checkpoints import SNAPSHOT, repair_snapshot

    (tmp_path / "run" / "checkpoint_1").mkdir(parents=True)
    (tmp_path / "run" / SNAPSHOT).write_text(content())
    repair_snapshot(str(tmp_path), "run")
    assert (tmp_path / "run" / SNAPSHOT).exists() is (dropped is None)
    if dropped:
        assert dropped in caplog.text and "\n" not in caplog.records[0].getMessage()
    repair_snapshot(str(tmp_path), "never-ran")  # nothing there: nothing to do
