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
