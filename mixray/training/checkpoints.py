"""Training checkpoints that are verified before anything in them is loaded.

Every rank signs what it saved: after ``engine.save(d, ...)`` it writes
``d/mixray-record/rank<r>.json``, the sha256 of every file it wrote plus its rank,
the world size, the step and the run name, signed with the checkpoint key
(:mod:`mixray.io.checkpoints`). Ray Train merges the ranks' directories into one
checkpoint under its storage.

On resume (``resume_step``) the candidates are the run's checkpoint directories,
newest first. One is used only if, on every rank, all ``world`` records are
present and verify, name this run and the same step, every file in the
directory is recorded, and the files this rank loads (its own and rank 0's: the
model states every rank reads) hash to their recorded sha256; the ranks agree by
an all-reduce, so all of them load the same checkpoint or none. DeepSpeed's
``load_checkpoint`` unpickles (``torch.load(weights_only=False)``): nothing
reaches it that this run did not save. A checkpoint cut short (a driver killed
while Ray copied it, a full disk), altered, or of another run is reported in one
line and the next older one tried; with none left, training starts at step 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mixray.io.checkpoints import (
    CheckpointError,
    check_files,
    hash_files,
    read_record,
    write_record,
)

log = logging.getLogger("mixray.train")

RECORD_DIR = "mixray-record"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint directories: checkpoint_<time>
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints


def record_checkpoint(d: Path, rank: int, world: int, step: int, run_name: str, key: bytes) -> None:
    """Sign the sha256 of every file this rank saved in ``d`` (call right after ``engine.save``)."""
    files = {n: h for n, h in hash_files(d).items() if not n.startswith(RECORD_DIR + "/")}
    meta = {"rank": rank, "world": world, "step": step, "run_name": run_name}
    write_record(d / RECORD_DIR / f"rank{rank}.json", files, meta, key)


def verify_checkpoint(d: Path, rank: int, world: int, run_name: str, key: bytes) -> int:
    """The step of the checkpoint in ``d`` if this rank may load it; else CheckpointError."""
    records = [read_record(d / RECORD_DIR / f"rank{r}.json", key) for r in range(world)]
    for r, rec in enumerate(records):
        meta = rec["meta"]
        if meta.get("run_name") != run_name:
            raise CheckpointError(f"{d}: saved by run {meta.get('run_name')!r}, not {run_name!r}")
        if (meta.get("rank"), meta.get("world")) != (r, world):
            raise CheckpointError(f"{d}: rank{r}.json was saved by rank {meta.get('rank')} of "
                                  f"{meta.get('world')}, not rank {r} of {world}")
    steps = sorted({rec["meta"].get("step") for rec in records}, key=str)
    if len(steps) != 1 or not isinstance(steps[0], int):
        raise CheckpointError(f"{d}: the ranks saved different steps {steps}")
    listed = {n for rec in records for n in rec["files"]}
    present = {p.relative_to(d).as_posix() for p in d.rglob("*")
               if p.is_file() and p.relative_to(d).parts[0] != RECORD_DIR}
    if present - listed:
        raise CheckpointError(f"{d}: {sorted(present - listed)[0]} is not in the record")
    for r, rec in enumerate(records):
        check_files(d, rec["files"], full=r in (0, rank))
    return steps[0]


# ----------------------------------------------------------------------------- on the workers

def candidates() -> list[Any]:
    """This run's checkpoints in Ray Train's storage, newest first (``ray.train.Checkpoint``)."""
    import ray.train
    from pyarrow.fs import FileSelector, FileType

    latest = ray.train.get_checkpoint()
    try:
        storage = ray.train.get_context().get_storage()  # DeveloperAPI: the run's directory
        fs, root = storage.storage_filesystem, storage.experiment_fs_path
        infos = fs.get_file_info(FileSelector(root, allow_not_found=True))
    except (AttributeError, OSError, RuntimeError) as e:
        log.warning("train: cannot list the run's checkpoints (%s); only Ray's latest is tried", e)
        return [latest] if latest is not None else []
    paths = sorted((i.path for i in infos if i.type == FileType.Directory
                    and Path(i.path).name.startswith(CHECKPOINT_PREFIX)),
                   key=lambda p: Path(p).name, reverse=True)
    return [ray.train.Checkpoint(path=p, filesystem=fs) for p in paths]


def _all_ranks_accept(ok: bool, device) -> bool:
    """Whether every rank accepted the checkpoint (an all-reduce MIN of 0/1)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def resume_step(engine, config: dict[str, Any], rank: int, world: int, key: bytes, device) -> int:
    """Load the newest checkpoint every rank verifies; returns its step (0: none, start over)."""
    found = candidates()
    for ckpt in found:
        with ckpt.as_directory() as tmp:
            d = Path(tmp)
            try:
                verify_checkpoint(d, rank, world, config["run_name"], key)
                ok = True
            except CheckpointError as e:
                log.warning("train[rank %d]: not resuming from %s: %s", rank, Path(ckpt.path).name, e)
                ok = False
            if _all_ranks_accept(ok, device):
                return engine.load(d, rank)
    if found and rank == 0:
        log.warning("train: none of the %d checkpoint(s) of run %s is usable; starting at step 0",
                    len(found), config["run_name"])
    return 0


# ----------------------------------------------------------------------------- on the driver

def repair_snapshot(storage_path: str, name: str) -> None:
    """Drop Ray Train's checkpoint list of run ``name`` if Ray could not start from it.

    Ray writes ``checkpoint_manager_snapshot.json`` in place; a driver killed while
    writing it, or a listed checkpoint that was removed, makes every later ``fit``
    fail before training. Without the list Ray starts afresh and the loop still
    finds the checkpoints itself (:func:`candidates`), so nothing is lost.
    """
    import ray
    from pyarrow.fs import FileSystem, FileType

    fs, root = FileSystem.from_uri(storage_path)
    path = f"{root.rstrip('/')}/{name}/{SNAPSHOT}"
    if fs.get_file_info(path).type != FileType.File:
        return
    try:
        with fs.open_input_stream(path) as f:
            snap = json.loads(f.read().decode("utf-8"))
        problem = None
        if snap.get("ray_version") != ray.__version__:
            problem = f"written by Ray {snap.get('ray_version')}, this is Ray {ray.__version__}"
        for res in snap.get("checkpoint_results", []):
            ckpt = f"{root.rstrip('/')}/{name}/{res['checkpoint_dir_name']}"
            if fs.get_file_info(ckpt).type != FileType.Directory:
                problem = f"it lists {res['checkpoint_dir_name']}, which is gone"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem:
        log.warning("train: Ray Train's checkpoint list %s is unusable (%s); removed, the run's "
                    "checkpoints are found without it", path, problem)
        fs.delete_file(path)
