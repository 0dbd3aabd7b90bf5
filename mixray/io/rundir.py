"""The run directory: one folder per stage, Parquet outputs, a manifest, and skip/resume.

Layout::

    <run_dir>/config.yaml                 the resolved config of the last invocation
    <run_dir>/<stage>/<outputs>.parquet   written under a temp name, renamed on success
    <run_dir>/<stage>/manifest.json       written last: a stage is complete iff it exists
                                          and every output it lists is present

The manifest records the stage's config hash, the hashes of its inputs, row
counts, wall time and library versions. A stage is skipped when its manifest's
``fingerprint`` (config hash + input hashes + mixray version) equals the one it
would compute now and its outputs are intact; otherwise it is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import mixray

MANIFEST = "manifest.json"
_VERSION_PACKAGES = ("ray", "torch", "transformers", "sentence-transformers", "pyarrow", "numpy")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(file_sha256(p).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "mixray": mixray.__version__}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def fingerprint(config_hash: str, input_hashes: dict[str, str]) -> str:
    payload = json.dumps(
        {"config": config_hash, "inputs": input_hashes, "mixray": mixray.__version__}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class StageRun:
    """Book-keeping for one stage execution; outputs go through ``tmp_path``/``commit``."""

    stage_dir: Path
    config_hash: str
    input_hashes: dict[str, str]
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _pending: list[tuple[Path, Path]] = field(default_factory=list)

    def tmp_path(self, name: str) -> Path:
        """A temp path for output ``name``; it becomes ``stage_dir/name`` on ``finish``."""
        final = self.stage_dir / name
        tmp = self.stage_dir / f".{name}.tmp-{os.getpid()}"
        if (tmp, final) not in self._pending:  # asked twice (written, then handed to workers): once
            self._pending.append((tmp, final))
        return tmp

    def output(self, name: str) -> Path:
        return self.stage_dir / name


def write_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")


_STALE = re.compile(r"^\..+\.tmp-\d+$|.+\.partial$")


def remove_stale_temp_files(stage_dir: Path) -> int:
    """Remove temp outputs (``.<name>.tmp-<pid>``, ``<name>.partial``) of interrupted runs.

    Called by the stage runner before a stage runs, under the run directory's lock, so
    no live process owns them. Looks at the stage directory and its direct
    subdirectories (e.g. ``checkpoints/``). Returns the number removed.
    """
    if not stage_dir.is_dir():
        return 0
    dirs = [stage_dir, *(p for p in stage_dir.iterdir() if p.is_dir() and not _STALE.match(p.name))]
    n = 0
    for d in dirs:
        for p in d.iterdir():
            if _STALE.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                n += 1
    return n


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    p = stage_dir / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(stage_dir: Path, fp: str) -> bool:
    m = read_manifest(stage_dir)
    if m is None or m.get("fingerprint") != fp:
        return False
    outs = m.get("outputs", {})
    return all((stage_dir / name).exists() and file_sha256(stage_dir / name) == h
               for name, h in outs.items())


def completed_output(run_dir: Path, artifact) -> Path | None:
    """The path of ``artifact`` (a ``mixray.contracts.Artifact``) when its stage completed and its
    manifest lists it, else None (a stale file of an earlier run does not count)."""
    m = read_manifest(Path(run_dir) / artifact.stage)
    path = artifact.path(run_dir)
    return path if m is not None and artifact.name in m.get("outputs", {}) and path.exists() else None


def output_hash(stage_dir: Path, name: str) -> str:
    """The recorded hash of a completed stage's output (what downstream stages key on)."""
    m = read_manifest(stage_dir)
    if m is None or name not in m.get("outputs", {}):
        from mixray.errors import InputError

        raise InputError(
            f"{stage_dir / name}: not found or incomplete; run the {stage_dir.name!r} stage first"
        )
    return m["outputs"][name]


def _fsync(path: Path) -> None:
    """Flush a file (or every file of a directory, and the directory) to stable storage."""
    paths = [path] if path.is_file() else [*sorted(p for p in path.rglob("*") if p.is_file()), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def stage_run(stage_dir: Path, config_hash: str, input_hashes: dict[str, str]) -> Iterator[StageRun]:
    """Run a stage body; on success, rename temp outputs into place and write the manifest.

    Outputs are written under temporary names, so a body that fails or is killed
    leaves the previous outputs and their manifest as they were. On success the
    old manifest is removed, every output is flushed (fsync) and renamed into
    place, and the new manifest is written last, also flushed: a crash between
    two renames leaves no manifest, never one that vouches for other bytes.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    run = StageRun(stage_dir, config_hash, input_hashes)
    t0 = time.time()
    try:
        yield run
    except BaseException:
        for tmp, _ in run._pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        raise
    (stage_dir / MANIFEST).unlink(missing_ok=True)
    outputs = {}
    for tmp, final in run._pending:
        _fsync(tmp)
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
        outputs[final.name] = file_sha256(final)
    manifest = {
        "stage": stage_dir.name,
        "fingerprint": fingerprint(config_hash, input_hashes),
        "config_hash": config_hash,
        "inputs": input_hashes,
        "outputs": outputs,
        "counts": run.counts,
        **run.extra,
        "wall_time_s": round(time.time() - t0, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
    }
    tmp_manifest = stage_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    _fsync(tmp_manifest)
    os.replace(tmp_manifest, stage_dir / MANIFEST)
    _fsync(stage_dir)
