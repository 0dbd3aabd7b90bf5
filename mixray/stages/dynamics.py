"""dynamics: SFTMix's training dynamics -> the confident/unconfident split (docs/sftmix.md).

1. **Reference run**: the examples the train stage will use (``train.data``, the
   train stage's own row building) fine-tuned with NTP through the training package,
   with ``RunConfig.reference_train()`` (the ``train`` section, ``dynamics.model`` and
   ``dynamics.train`` over it). C checkpoints (``dynamics.num_checkpoints``) are
   exported at evenly spaced optimizer steps (the loop's ``export_steps``) into
   ``dynamics/reference/step-<n>/``, each a Hugging Face model or LoRA adapter that
   loads on its own. ``reference/reference.json`` records the run's fingerprint
   (settings, examples, seed): a re-run with the same one reuses the checkpoints
   instead of retraining (e.g. after a change of the scoring settings), and a killed
   reference run resumes from its Ray Train checkpoint (``dynamics/ray/``).
   ``dynamics.checkpoints`` (a list of model directories) or
   ``dynamics.reference_run`` (a directory of ``step-<n>/`` exports) are scored as
   they are: nothing is trained.
2. **Scoring**: every example at every checkpoint, on a Ray Data actor pool
   (``ResponseLossScorer``: one model per actor, a GPU per actor when present):
   ``Perp_c`` = the mean NLL of its response tokens (every assistant turn), the same
   code as the IFD scorer's losses, on the sequences the reference run trained on.
   Each checkpoint's scores go to ``dynamics/scores/<fingerprint>-checkpoint-<c>.parquet``
   as soon as they are complete: a run killed mid-way rescores only the checkpoints
   not yet scored. They are removed when the stage completes.
3. ``Conf = −mean_c Perp_c``, ``variability = std_c Perp_c``, the median split (odd N:
   the extra example is unconfident) -> ``confidence.parquet`` (``id, perp_1..perp_C,
   conf, variability, split``), which ``train.loss=sftmix`` reads by default;
   ``data_map.png`` (confidence vs variability, coloured by split) and
   ``confidence_hist.png`` (Conf by split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.algorithms.dynamics import checkpoint_steps, training_dynamics
from mixray.contracts import CONFIDENCE, CONFIDENCE_HIST, DATA_MAP, SPLITS, confidence_schema
from mixray.errors import InputError
from mixray.io.rundir import write_table
from mixray.models.registry import check_model
from mixray.stages.runner import Outputs, Stage
from mixray.stages.train import build_training_rows, plan_job

log = logging.getLogger("mixray.dynamics")

REFERENCE, SCORES, RAY = "reference", "scores", "ray"
RECORD = "reference.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_MODEL_FILES = ("config.json", "adapter_config.json")


def _is_model_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in _MODEL_FILES)


def _dir_signature(path: Path) -> str:
    """A cheap content signature of a checkpoint directory: names, sizes, modification times."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def step_dirs(run: Path) -> list[Path]:
    """The ``step-<n>`` model directories of a reference run, in step order."""
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if _is_model_dir(p)]


def given_checkpoints(checkpoints: list[str] | None, reference_run: str | None) -> list[Path]:
    """The checkpoints a user gave (``dynamics.checkpoints`` or ``dynamics.reference_run``), checked."""
    if reference_run is not None:
        run = Path(reference_run).expanduser()
        found = step_dirs(run) if run.is_dir() else []
        if not found:
            raise InputError(f"{run} holds no step-<n>/ model or adapter directory",
                             where="dynamics.reference_run")
        return found
    out = []
    for i, c in enumerate(checkpoints or []):
        p = Path(c).expanduser()
        if not p.is_dir() or not _is_model_dir(p):
            raise InputError(f"{p} is not a model or LoRA adapter directory (no config.json or "
                             "adapter_config.json)", where=f"dynamics.checkpoints.{i}")
        if not any(p.glob("tokenizer*")):
            raise InputError(f"{p} has no tokenizer files; save the tokenizer beside the weights",
                             where=f"dynamics.checkpoints.{i}")
        out.append(p)
    return out


def scoring_table(rows: pa.Table) -> pa.Table:
    """The training rows as the examples a scorer reads: ``id, instruction, input, output, messages``."""
    if rows.num_rows == 0:
        raise InputError("dynamics: no examples to score")
    return pa.table({"id": rows.column("id"), "instruction": rows.column("instruction_a"),
                     "input": rows.column("input_a"), "output": rows.column("output_a"),
                     "messages": rows.column("messages_a")})


def by_length(table: pa.Table) -> pa.Table:
    """The scoring rows shortest first (by characters): a Ray Data batch then holds sequences of
    similar length, so its micro-batches carry little padding. Scores are matched back by id."""
    chars = [len(i) + len(x) + len(o) + sum(len(m["content"]) for m in (msgs or ()))
             for i, x, o, msgs in zip(*(table.column(c).to_pylist()
                                        for c in ("instruction", "input", "output", "messages")), strict=True)]
    return table.take(pa.array(np.argsort(chars, kind="stable")))


def confidence_table(ids: list[str], perp: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """``id, perp_1..perp_C, conf, variability, split`` from ``perp [N, C]``; also the confident mask."""
    conf, variability, confident = training_dynamics(perp)
    cols: dict[str, Any] = {"id": ids}
    cols |= {f"perp_{c + 1}": perp[:, c] for c in range(perp.shape[1])}
    cols |= {"conf": conf, "variability": variability,
             "split": np.where(confident, SPLITS[0], SPLITS[1]).tolist()}
    return pa.table(cols, schema=confidence_schema(perp.shape[1])), confident


class Dynamics(Stage):
    """``dynamics``: a reference run, C checkpoints, Perp_c on Ray Data -> the SFTMix split."""

    name = "dynamics"
    outputs = (CONFIDENCE, DATA_MAP, CONFIDENCE_HIST)
    summary = "{confident} confident + {unconfident} unconfident, {checkpoints} checkpoints"
    seeded = True
    memory_knobs = ("concurrency", "batch_size", "micro_batch", "max_length", "num_cpus")

    def check(self) -> None:
        # paths go to Ray workers, whose working directory differs
        self.run_dir, self.stage_dir = self.run_dir.resolve(), self.stage_dir.resolve()
        sec = self.section
        self.ref = self.cfg.reference_train()
        self.given = given_checkpoints(sec.checkpoints, sec.reference_run)
        if self.given:
            self.job, self.steps = None, []
            self.rows, self.inputs, _ = build_training_rows(self.ref, self.run_dir)
            self.inputs = self.inputs | {f"checkpoint-{c}": _dir_signature(p)
                                         for c, p in enumerate(self.given, 1)}
        else:
            check_model(self.ref.model, "dynamics.model", need="model")
            self.job = plan_job(self.ref, self.run_dir, self.cfg.seed)
            self.steps = checkpoint_steps(self.job.total_steps, sec.num_checkpoints)
            self.rows, self.inputs = self.job.rows, dict(self.job.inputs)
        self.table = scoring_table(self.rows)

    def config(self) -> dict[str, Any]:
        data = {"dynamics": self.section.model_dump(mode="json"), "seed": self.cfg.seed}
        if self.job is not None:
            data["reference"] = self.ref.model_dump(mode="json")
        return data

    def input_hashes(self) -> dict[str, str]:
        return self.inputs

    def reset(self) -> None:
        for d in (SCORES, REFERENCE, RAY):
            shutil.rmtree(self.stage_dir / d, ignore_errors=True)

    def finished(self) -> None:
        shutil.rmtree(self.stage_dir / SCORES, ignore_errors=True)  # they only served a resume

    def run(self, out: Outputs) -> None:
        from mixray.distributed.runtime import init_ray

        t0 = time.time()
        init_ray(self.cfg.ray)
        checkpoints, trained = (self.given, False) if self.given else self._reference()
        perp, resumed = self._score(checkpoints)
        ids = self.table.column("id").to_pylist()
        table, confident = confidence_table(ids, perp)
        write_table(table, out.path(CONFIDENCE))
        conf, variability = table.column("conf").to_numpy(), table.column("variability").to_numpy()
        title = f"{len(ids)} examples, {len(checkpoints)} checkpoints of {self.ref.model}"
        plot_data_map(conf, variability, confident, out.path(DATA_MAP), title)
        plot_confidence_hist(conf, confident, out.path(CONFIDENCE_HIST), title)
        n_conf = int(confident.sum())
        out.counts = {"examples": len(ids), "checkpoints": len(checkpoints), "confident": n_conf,
                      "unconfident": len(ids) - n_conf, "scored_checkpoints": len(checkpoints) - resumed,
                      "resumed_checkpoints": resumed, "reference_trained": trained}
        out.extra = {"checkpoints": [str(p) for p in checkpoints], "steps": self.steps,
                     "reference_model": self.ref.model, "median_conf": float(np.median(conf))}
        log.info("dynamics: %d examples x %d checkpoints -> %d confident + %d unconfident in %.1f s "
                 "(conf median %.4f)", len(ids), len(checkpoints), n_conf, len(ids) - n_conf,
                 time.time() - t0, out.extra["median_conf"])

    # ------------------------------------------------------------------------- the reference run

    def _reference(self) -> tuple[list[Path], bool]:
        """The reference run's checkpoints (trained now, or reused) and whether it was trained now."""
        ref_dir = self.stage_dir / REFERENCE
        record = _read_record(ref_dir / RECORD)
        dirs = [ref_dir / f"step-{s}" for s in self.steps]
        if record.get("fingerprint") == self.job.fingerprint and all(_is_model_dir(d) for d in dirs):
            log.info("dynamics: reusing the reference run in %s (steps %s)", ref_dir, self.steps)
            return dirs, False
        if record:
            log.info("dynamics: the reference run in %s has other settings or examples; retraining",
                     ref_dir)
            shutil.rmtree(ref_dir, ignore_errors=True)
        self._train_reference(ref_dir)
        _write_record(ref_dir / RECORD, {"fingerprint": self.job.fingerprint, "steps": self.steps,
                                         "model": self.ref.model, "run": self.job.run_name})
        shutil.rmtree(self.stage_dir / RAY, ignore_errors=True)  # its checkpoints only served a resume
        return dirs, True

    def _train_reference(self, ref_dir: Path) -> None:
        """NTP on the examples through the training package, exporting at ``self.steps``."""
        from mixray.stages.train import fit_job, resolve_job, tokenize_rows

        job = resolve_job(self.job, self.cfg.ray)
        t0 = time.time()
        log.info("dynamics: training the reference model %s with NTP on %d examples, %d steps; "
                 "checkpoints at steps %s", self.ref.model, job.counts["rows"], job.total_steps, self.steps)
        tokens = tokenize_rows(job.rows, job.cfg, job.model_path)
        n_cut = int(np.count_nonzero(tokens.column("truncated").to_numpy()))
        if n_cut:
            log.warning("dynamics: %d of %d examples were cut to max_length=%d tokens for the reference "
                        "run", n_cut, tokens.num_rows, job.cfg.max_length)
        loop = job.loop_config(ref_dir / "logs", ref_dir / f"step-{self.steps[-1]}")
        loop |= {"export_steps": self.steps[:-1], "export_steps_dir": str(ref_dir)}
        fit_job(job, tokens, self.stage_dir / RAY, loop, stage="dynamics")
        log.info("dynamics: reference run done in %.1f s", time.time() - t0)

    # ------------------------------------------------------------------------- scoring

    def _score(self, checkpoints: list[Path]) -> tuple[np.ndarray, int]:
        """``perp [N, C]`` and how many checkpoints were read back from an interrupted run."""
        from mixray.distributed.pipeline import table_dataset

        scores = self.stage_dir / SCORES
        scores.mkdir(parents=True, exist_ok=True)
        prefix = self.fingerprint[:16]
        for p in scores.iterdir():  # another config's or input's scores: never valid here
            if not p.name.startswith(prefix):
                p.unlink(missing_ok=True)
        ids = self.table.column("id").to_pylist()
        ds, cols, resumed = None, [], 0
        for c, path in enumerate(checkpoints, 1):
            f = scores / f"{prefix}-checkpoint-{c}.parquet"
            perp = _read_scores(f, ids)
            if perp is not None:
                log.info("dynamics: checkpoint %d of %d (%s) was scored by an interrupted run; reusing it",
                         c, len(checkpoints), path.name)
                resumed += 1
            else:
                ds = ds if ds is not None else table_dataset(by_length(self.table), self.section.batch_size)
                perp = self._score_checkpoint(ds, path, ids, c, len(checkpoints))
                _write_scores(f, ids, perp)
            cols.append(perp)
        return np.stack(cols, axis=1), resumed

    def _score_checkpoint(self, ds, path: Path, ids: list[str], c: int, n: int) -> np.ndarray:
        from mixray.distributed.pipeline import map_with_actors
        from mixray.models.callables import ResponseLossScorer

        sec, t0 = self.section, time.time()
        kwargs = {"model_path": str(path), "max_length": sec.max_length or self.ref.max_length,
                  "micro_batch": sec.micro_batch, "trust_remote_code": self.ref.trust_remote_code,
                  "precision": sec.precision}
        by_id: dict[str, float] = {}
        out = map_with_actors(ds, ResponseLossScorer, kwargs, sec, "dynamics")
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            by_id.update(zip(batch["id"].tolist(), batch["perp"].tolist(), strict=True))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise RuntimeError(f"dynamics: checkpoint {path} returned no score for {len(missing)} examples")
        perp = np.asarray([by_id[i] for i in ids], dtype=np.float64)
        log.info("dynamics: checkpoint %d of %d (%s): mean Perp %.4f, %d examples in %.1f s", c, n,
                 path.name, float(np.nanmean(perp)), len(ids), time.time() - t0)
        return perp


# ----------------------------------------------------------------------------- files

def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_record(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _write_scores(path: Path, ids: list[str], perp: np.ndarray) -> None:
    """One checkpoint's scores, atomically (a killed run leaves the file whole or absent)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_table(pa.table({"id": pa.array(ids, pa.string()), "perp": pa.array(perp, pa.float64())}), tmp)
    os.replace(tmp, path)


def _read_scores(path: Path, ids: list[str]) -> np.ndarray | None:
    """A checkpoint's scores from an interrupted run, if complete for exactly ``ids``."""
    if not path.is_file():
        return None
    try:
        t = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        log.warning("dynamics: unreadable scores %s (%s); rescoring", path, e)
        return None
    if t.column("id").to_pylist() != ids:
        return None
    return t.column("perp").to_numpy().astype(np.float64)


# ----------------------------------------------------------------------------- plots

_COLOURS = {True: "#1f77b4", False: "#d62728"}  # confident, unconfident


def plot_data_map(conf: np.ndarray, variability: np.ndarray, confident: np.ndarray, out: Path,
                  title: str) -> None:
    """Data cartography's map: confidence (−mean Perp) vs variability (std of Perp), by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    for flag, name in ((True, "confident"), (False, "unconfident")):
        m = confident == flag
        ax.scatter(variability[m], conf[m], s=10, alpha=0.6, c=_COLOURS[flag], edgecolors="none",
                   label=f"{name} ({int(m.sum())})")
    if len(conf):
        ax.axhline(float(np.median(conf)), color="grey", lw=0.8, ls="--", label="median Conf")
    ax.set_xlabel("variability: std of Perp_c over the checkpoints")
    ax.set_ylabel("confidence: Conf = −mean_c Perp_c")
    ax.set_title(f"SFTMix data map · {title}", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)


def plot_confidence_hist(conf: np.ndarray, confident: np.ndarray, out: Path, title: str) -> None:
    """Histogram of Conf, confident and unconfident halves stacked on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = np.histogram_bin_edges(conf, bins=min(40, max(5, len(conf) // 5))) if len(conf) else 10
    ax.hist([conf[confident], conf[~confident]], bins=bins, stacked=True,
            color=[_COLOURS[True], _COLOURS[False]],
            label=[f"confident ({int(confident.sum())})", f"unconfident ({int((~confident).sum())})"])
    ax.set_xlabel("Conf = −mean_c Perp_c")
    ax.set_ylabel("examples")
    ax.set_title(f"Confidence by split · {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
