"""score: examples.parquet -> quality.parquet (+ rejects.parquet), one quality per example.

Backends (``score.backend``):

- ``reward-model``: any ``AutoModelForSequenceClassification`` on (instruction, response);
  ``raw = score = logit[label_index]``.
- ``ifd``: instruction-following difficulty from a causal LM (SmolLM2-135M offline);
  ``raw = L(y|x)/L(y)``, ``score = raw if raw < 1 else 0`` — a *proxy* for a reward model.
  ``y`` is the response as training sees it: every assistant turn of a multi-turn example.
- ``column``: an existing numeric column of the examples (``score.column``, e.g. the
  ``quality`` field mapped at ingest); ``raw = score = the value``.

Output ``<run_dir>/score/quality.parquet``: ``id, raw, score, backend`` (``score``:
higher is better; selection min-max normalises it over the pool). An example
whose score is undefined (null column value, NaN) goes to ``rejects.parquet``
with its reason: ``in == scored + rejected``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mixray.config import RayConfig, ScoreConfig
from mixray.console import stage_bar
from mixray.contracts import EXAMPLES, QUALITY, SCORE_REJECT_SCHEMA, SCORE_REJECTS
from mixray.errors import ConfigError, InputError
from mixray.io.rundir import write_table
from mixray.models.registry import check_model
from mixray.models.text import CONVERSATION_COLUMNS, TEXT_COLUMNS
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.score")


def _check_reward_model(cfg: ScoreConfig) -> None:
    """Driver-side: the reward model's head must have ``label_index``."""
    from pathlib import Path as _P

    if not _P(cfg.model).is_dir():
        return
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.label_index >= mc.num_labels:
        raise ConfigError(
            f"score.label_index={cfg.label_index}, but {cfg.model} has num_labels={mc.num_labels}"
        )


def _column_scores(cfg: ScoreConfig, examples: Path) -> pa.Table:
    names = pq.ParquetFile(examples).schema_arrow.names
    if cfg.column not in names:
        raise ConfigError(f"score.column={cfg.column!r} is not a column of {examples} (has {names})")
    t = pq.read_table(examples, columns=["id", cfg.column])
    col = t.column(cfg.column)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise ConfigError(f"score.column={cfg.column!r} has type {col.type}; expected a number")
    values = col.cast(pa.float64())
    return pa.table({"id": t.column("id"), "raw": values, "score": values})


def _model_scores(cfg: ScoreConfig, ray_cfg: RayConfig, examples: Path, seed: int) -> pa.Table:

    from mixray.distributed.pipeline import map_with_actors, read_examples
    from mixray.distributed.runtime import init_ray
    from mixray.models.callables import SCORERS
    from mixray.models.registry import resolve_model

    init_ray(ray_cfg)
    resolve_model(cfg.model, "score.model")
    rows = None
    if cfg.sample is not None:
        n = pq.ParquetFile(examples).metadata.num_rows
        rows = np.sort(np.random.default_rng(seed).choice(n, min(cfg.sample, n), replace=False))
    columns = CONVERSATION_COLUMNS if cfg.backend == "ifd" else TEXT_COLUMNS  # IFD: every turn's response
    ds = read_examples(str(examples), list(columns), cfg.batch_size, rows=rows)
    kwargs = {"model_path": cfg.model, "max_length": cfg.max_length,
              "trust_remote_code": cfg.trust_remote_code, "precision": cfg.precision}
    if cfg.backend == "reward-model":
        kwargs["label_index"] = cfg.label_index
    out = map_with_actors(ds, SCORERS[cfg.backend], kwargs, cfg, "score")
    parts = []
    total = len(rows) if rows is not None else pq.ParquetFile(examples).metadata.num_rows
    with stage_bar("score", total) as bar:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            cols = {"id": pa.array(batch["id"].tolist(), pa.string())}
            cols |= {k: pa.array(np.asarray(v, dtype=np.float64)) for k, v in batch.items() if k != "id"}
            parts.append(pa.table(cols))
            bar.update(len(batch["id"]))
    if not parts:
        raise InputError(f"score: {examples} has no rows")
    return pa.concat_tables(parts)


def _split_defined(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(rows with a finite score, rejects: id + reason for the others)."""
    bad = pc.fill_null(pc.or_kleene(pc.is_null(table["score"]), pc.invert(pc.is_finite(table["score"]))),
                       True)
    rejected = table.filter(bad)
    reasons = ["score is null (no value in the column)" if r is None else f"score is not finite ({r})"
               for r in rejected.column("raw").to_pylist()]
    rejects = pa.table({"id": rejected["id"], "reason": pa.array(reasons, pa.string())},
                       schema=SCORE_REJECT_SCHEMA)
    return table.filter(pc.invert(bad)), rejects


class Score(Stage):
    """``score``: examples -> quality (+ rejects), by a model over Ray Data or a column."""

    name = "score"
    requires = (EXAMPLES,)
    outputs = (QUALITY, SCORE_REJECTS)
    summary = "{scored} scored"
    seeded = True
    memory_knobs = ("concurrency", "batch_size", "max_length", "num_cpus")

    def check(self) -> None:
        cfg = self.section
        if cfg.backend != "column":
            check_model(cfg.model, "score.model", need="model")
            if cfg.backend == "reward-model":
                _check_reward_model(cfg)

    def run(self, out: Outputs) -> None:
        cfg, examples = self.section, EXAMPLES.path(self.run_dir)
        t0 = time.time()
        if cfg.backend == "column":
            table = _column_scores(cfg, examples)
        else:
            table = _model_scores(cfg, self.cfg.ray, examples, self.cfg.seed)
        kept, rejects = _split_defined(table)
        write_table(rejects, out.path(SCORE_REJECTS))
        kept = kept.append_column("backend", pa.array([cfg.backend] * len(kept), pa.string()))
        write_table(kept, out.path(QUALITY))
        out.counts = {"in": len(table), "scored": len(kept), "rejected": len(rejects)}
        scores = kept.column("score").to_numpy()
        out.extra = {"backend": cfg.backend, "proxy": cfg.backend == "ifd",
                     "score_mean": float(scores.mean()) if len(scores) else None}
        log.info("score[%s]: in=%d = scored %d + rejected %d in %.1f s%s", cfg.backend, len(table),
                 len(kept), len(rejects), time.time() - t0,
                 " (IFD is a model-based proxy, not a reward model)" if cfg.backend == "ifd" else "")
