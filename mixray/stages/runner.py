"""The one stage runner: hashing, skip-if-complete, manifests, atomic outputs, timing, logging.

A stage is a subclass of :class:`Stage` that declares what it reads and writes
and holds only its work::

    class Embed(Stage):
        name = "embed"
        requires = (contracts.EXAMPLES,)          # upstream artifacts (their recorded hashes key the skip)
        outputs = (contracts.EMBEDDINGS,)         # what it may write
        summary = "{out} embeddings"              # the skip line, from the manifest's counts

        def check(self): ...                      # cheap driver-side checks, before anything runs
        def run(self, out: Outputs): ...          # the work: write out.path(artifact), set out.counts

:func:`execute` does the rest, the same way for every stage:

1. ``check()``, then the fingerprint: sha256 of the stage's config section
   (``config()``) and of its inputs' recorded hashes (``input_hashes()``);
2. skip when the stage's manifest has that fingerprint and every output it lists
   is intact (``--force`` recomputes);
3. otherwise remove stale temp files of killed runs, run the body with outputs
   under temporary names, rename them into place, write the manifest last
   (counts, hashes, wall time, versions), log the counts and time.

A Ray out-of-memory kill inside a stage becomes one :class:`~mixray.errors.ResourceError`
naming the stage and the knobs to turn. :func:`run_stages` holds the run
directory's lock (``mixray.io.lock``) around a sequence of stages.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from mixray.config import RunConfig, dump_config, section_hash
from mixray.contracts import Artifact
from mixray.errors import ConfigError, MixrayError, ResourceError
from mixray.io.lock import run_dir_lock
from mixray.io.rundir import (
    StageRun,
    fingerprint,
    is_complete,
    output_hash,
    read_manifest,
    remove_stale_temp_files,
    stage_run,
)

log = logging.getLogger("mixray.stages")


class Outputs:
    """What a stage's ``run`` writes through: declared artifacts only, under temporary names."""

    def __init__(self, run: StageRun, declared: tuple[Artifact, ...], stage: str):
        self._run, self._declared, self._stage = run, declared, stage

    def path(self, artifact: Artifact, **fields: object) -> Path:
        """A temporary path for ``artifact``; renamed into place when the stage succeeds."""
        if artifact not in self._declared:
            raise RuntimeError(f"stage {self._stage!r} writes {artifact.name}, which it does not "
                               "declare in its outputs")
        return self._run.tmp_path(artifact.filename(**fields))

    @property
    def counts(self) -> dict[str, Any]:
        return self._run.counts

    @counts.setter
    def counts(self, value: dict[str, Any]) -> None:
        self._run.counts = value

    @property
    def extra(self) -> dict[str, Any]:
        return self._run.extra

    @extra.setter
    def extra(self, value: dict[str, Any]) -> None:
        self._run.extra = value


@contextlib.contextmanager
def config_section(section: str) -> Iterator[None]:
    """Errors of a library call that name one of its parameters (``where="device"``) name
    the config key instead (``select.device``): the settings of ``section`` are its parameters."""
    try:
        yield
    except MixrayError as e:
        if e.where and "." not in e.where and "/" not in e.where:
            e.where = f"{section}.{e.where}"
        raise


class Stage:
    """Base class of every stage (see the module docstring)."""

    name: ClassVar[str]
    requires: ClassVar[tuple[Artifact, ...]] = ()
    outputs: ClassVar[tuple[Artifact, ...]] = ()
    summary: ClassVar[str] = ""
    seeded: ClassVar[bool] = False  # whether the run's seed is part of the config hash
    # actor-pool knobs that an out-of-memory kill should name, under the stage's config section
    memory_knobs: ClassVar[tuple[str, ...]] = ()
    config_path: ClassVar[str | None] = None  # the section's dotted path (None: the stage's name)

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / self.name
        self.fingerprint = ""  # set by execute(): config + inputs, what a completed run recorded

    @property
    def section(self) -> Any:
        """This stage's config section: ``cfg.<config_path>`` (dotted), else ``cfg.<name>``."""
        node = self.cfg
        for part in (self.config_path or self.name).split("."):
            node = getattr(node, part)
        return node

    def config(self) -> dict[str, Any]:
        """The settings whose change recomputes the stage (hashed)."""
        data = self.section.model_dump(mode="json")
        return data | {"seed": self.cfg.seed} if self.seeded else data

    def input_hashes(self) -> dict[str, str]:
        """Recorded hashes of the upstream artifacts (an error names a stage not yet run)."""
        return {f"{a.stage}/{a.name}": output_hash(self.run_dir / a.stage, a.name)
                for a in self.requires}

    def check(self) -> None:
        """Cheap driver-side checks that should fail before anything runs (models exist, ...)."""

    def reset(self) -> None:
        """``--force``: drop resumable state (checkpoints) so the stage starts over."""

    def finished(self) -> None:
        """After a successful run (e.g. drop checkpoints that only served a resume)."""

    def run(self, out: Outputs) -> None:
        raise NotImplementedError

    def describe(self, manifest: dict[str, Any]) -> str:
        """The one-line summary of a completed stage (``summary`` filled from its counts)."""
        try:
            return self.summary.format(**manifest.get("counts", {}))
        except (KeyError, IndexError, ValueError):
            return ""


def execute(stage: Stage, force: bool = False) -> dict[str, Any]:
    """Run ``stage`` or skip it when its config and inputs are unchanged; returns its manifest."""
    stage.check()
    inputs = stage.input_hashes()
    config_hash = section_hash(stage.config())
    fp = stage.fingerprint = fingerprint(config_hash, inputs)
    if not force and is_complete(stage.stage_dir, fp):
        m = read_manifest(stage.stage_dir)
        log.info("%s: inputs and config unchanged, skipped (%s)", stage.name, stage.describe(m))
        return m | {"skipped": True}
    if force:
        stage.reset()
    removed = remove_stale_temp_files(stage.stage_dir)
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", stage.name, removed)
    t0 = time.time()
    try:
        with stage_run(stage.stage_dir, config_hash, inputs) as run:
            stage.run(Outputs(run, stage.outputs, stage.name))
    except Exception as e:
        _raise_out_of_memory(stage, e)
        raise
    stage.finished()
    m = read_manifest(stage.stage_dir)
    log.info("%s: done in %.1f s (%s)", stage.name, time.time() - t0, stage.describe(m))
    return m | {"skipped": False}


def _wrapped(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception it wraps: ``__cause__``, Ray's ``cause`` (a task's error),
    Ray Train's ``controller_failure`` and ``worker_failures`` (rank -> error)."""
    seen, stack = set(), [e]
    while stack:
        c = stack.pop()
        if not isinstance(c, BaseException) or id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        failures = getattr(c, "worker_failures", None)
        stack += [c.__cause__, getattr(c, "cause", None), getattr(c, "controller_failure", None),
                  *(failures.values() if isinstance(failures, dict) else ())]


def _raise_out_of_memory(stage: Stage, e: BaseException) -> None:
    """A Ray OOM kill (however deep Ray Data or Ray Train wrapped it) -> one ResourceError
    naming the stage and its knobs."""
    if "ray" not in sys.modules:
        return
    from ray.exceptions import OutOfMemoryError

    if not any(isinstance(c, OutOfMemoryError) for c in _wrapped(e)):
        return
    section = stage.config_path or stage.name
    knobs = ", ".join([f"{section}.{k}" for k in stage.memory_knobs] or ["ray.num_cpus"])
    raise ResourceError(
        f"{stage.name}: Ray killed a worker that ran out of memory; lower {knobs}, or give the "
        "node more memory", where=stage.name) from None


def run_stages(cfg: RunConfig, names: list[str], force: bool = False) -> dict[str, dict]:
    """Run ``names`` in order on ``cfg`` while holding the run directory's lock."""
    from mixray.distributed.runtime import in_job
    from mixray.stages import stage_class

    if in_job() and not Path(cfg.run_dir).expanduser().is_absolute():
        raise ConfigError(
            f"run_dir={cfg.run_dir!r} is relative, but under `ray job submit` the working directory "
            "is a temporary package folder that changes with every code change; give an absolute "
            "path on storage every node sees, e.g. run_dir=/mnt/shared/runs/demo", where="run_dir")
    run_dir = Path(cfg.run_dir).expanduser().resolve()  # workers do not share the driver's cwd
    with run_dir_lock(run_dir):
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        results = {name: execute(stage_class(name)(cfg, run_dir), force) for name in names}
    log.info("done: %s -> %s", ", ".join(names), run_dir)
    return results
