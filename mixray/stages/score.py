"""score: examples.parquet -> quality.parquet (+ rejects.parquet), one quality per example.

Backends (``score.backend``):

- ``reward-model``: any ``AutoModelForSequenceClassification`` on (instruction, response);
  ``raw = score = logit[label_index]``.
- ``ifd``: instruction-following difficulty from a causal LM (SmolLM2-135M offline);
  ``raw = L(y|x)/L(y)``, ``score = raw if raw < 1 else 0`` — a *proxy* for a reward model.
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

from mixray.config import RayConfig, RunConfig, ScoreConfig, section_hash
from mixray.errors import ConfigError, InputError
from mixray.io.rundir import (
    fingerprint,
    is_complete,
    output_hash,
    read_manifest,
    stage_run,
    write_table,
)
from mixray.models.registry import check_model
from mixray.stages.embed import TEXT_COLUMNS
from mixray.stages.ingest import EXAMPLES
from mixray.stages.ingest import STAGE as INGEST

log = logging.getLogger("mixray.score")

STAGE = "score"
QUALITY = "quality.parquet"
REJECTS = "rejects.parquet"
REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string())])


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
    ds = read_examples(str(examples), TEXT_COLUMNS, cfg.batch_size, rows=rows)
    kwargs = {"model_path": cfg.model, "max_length": cfg.max_length, "label_index": cfg.label_index,
              "trust_remote_code": cfg.trust_remote_code}
    out = map_with_actors(ds, SCORERS[cfg.backend], kwargs, cfg, "score")
    parts = []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        cols = {"id": pa.array(batch["id"].tolist(), pa.string())}
        cols |= {k: pa.array(np.asarray(v, dtype=np.float64)) for k, v in batch.items() if k != "id"}
        parts.append(pa.table(cols))
    if not parts:
        raise InputError(f"score: {examples} has no rows")
    return pa.concat_tables(parts)


def run_score(cfg: ScoreConfig, ray_cfg: RayConfig, run_dir: Path, seed: int = 0,
              force: bool = False) -> dict:
    stage_dir = run_dir / STAGE
    examples = run_dir / INGEST / EXAMPLES
    input_hashes = {"examples": output_hash(run_dir / INGEST, EXAMPLES)}
    if cfg.backend != "column":
        check_model(cfg.model, "score.model")
        if cfg.backend == "reward-model":
            _check_reward_model(cfg)
    config_hash = section_hash(cfg.model_dump() | {"seed": seed})
    if not force and is_complete(stage_dir, fingerprint(config_hash, input_hashes)):
        m = read_manifest(stage_dir)
        log.info("score: examples and config unchanged, skipped (%d scored)", m["counts"]["scored"])
        return m | {"skipped": True}

    t0 = time.time()
    with stage_run(stage_dir, config_hash, input_hashes) as run:
        if cfg.backend == "column":
            table = _column_scores(cfg, examples)
        else:
            table = _model_scores(cfg, ray_cfg, examples, seed)
        n_in = len(table)
        bad = pc.or_kleene(pc.is_null(table["score"]), pc.invert(pc.is_finite(table["score"])))
        bad = pc.fill_null(bad, True)
        rejected = table.filter(bad)
        reasons = [
            "score is null (no value in the column)" if r is None else f"score is not finite ({r})"
            for r in rejected.column("raw").to_pylist()
        ]
        write_table(pa.table({"id": rejected["id"], "reason": pa.array(reasons, pa.string())},
                             schema=REJECT_SCHEMA), run.tmp_path(REJECTS))
        kept = table.filter(pc.invert(bad))
        kept = kept.append_column("backend", pa.array([cfg.backend] * len(kept), pa.string()))
        write_table(kept, run.tmp_path(QUALITY))
        run.counts = {"in": n_in, "scored": len(kept), "rejected": len(rejected)}
        scores = kept.column("score").to_numpy()
        run.extra = {"backend": cfg.backend, "proxy": cfg.backend == "ifd",
                     "score_mean": float(scores.mean()) if len(scores) else None}
        log.info("score[%s]: in=%d = scored %d + rejected %d in %.1f s%s", cfg.backend, n_in,
                 len(kept), len(rejected), time.time() - t0,
                 " (IFD is a model-based proxy, not a reward model)" if cfg.backend == "ifd" else "")
    return read_manifest(stage_dir) | {"skipped": False}


def stage(cfg: RunConfig, run_dir: Path, force: bool = False) -> dict:
    """The ``score`` stage of ``mixray run`` (see ``mixray.stages.STAGES``)."""
    return run_score(cfg.score, cfg.ray, run_dir, seed=cfg.seed, force=force)
