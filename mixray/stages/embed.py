"""embed: examples.parquet -> embeddings.parquet, over a Ray Data actor pool.

Output ``<run_dir>/embed/embeddings.parquet``: ``id`` (string) and
``embedding`` (fixed-size list of float32, width d), one row per example, in
the examples' order. The Parquet schema metadata records ``mixray.encoder``,
``mixray.model``, ``mixray.text``, ``mixray.dim`` and ``mixray.normalized``
("true" when every row has unit L2 norm).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.config import EmbedConfig, RayConfig, RunConfig, section_hash
from mixray.errors import InputError
from mixray.io.rundir import fingerprint, is_complete, output_hash, read_manifest, stage_run
from mixray.models.registry import check_model, resolve_model
from mixray.stages.ingest import EXAMPLES
from mixray.stages.ingest import STAGE as INGEST

log = logging.getLogger("mixray.embed")

STAGE = "embed"
EMBEDDINGS = "embeddings.parquet"
TEXT_COLUMNS = ["id", "instruction", "input", "output"]


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """``[B, d]`` float32 -> Arrow ``fixed_size_list<float32>[d]``."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(ids [N], embeddings [N, d] float32, metadata) from an embeddings.parquet."""
    t = pq.read_table(path)
    col = t.column("embedding").combine_chunks()
    d = col.type.list_size
    emb = col.values.to_numpy(zero_copy_only=False).reshape(-1, d)
    meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
    return np.asarray(t.column("id").to_pylist(), dtype=object), emb, meta


def encoder_kwargs(cfg: EmbedConfig) -> dict[str, Any]:
    return {"model_path": cfg.model, "text": cfg.text, "normalize": cfg.normalize,
            "max_length": cfg.max_length, "encode_batch_size": cfg.encode_batch_size}


def run_embed(cfg: EmbedConfig, ray_cfg: RayConfig, run_dir: Path, force: bool = False) -> dict:
    from mixray.distributed.pipeline import map_with_actors, read_examples
    from mixray.distributed.runtime import init_ray
    from mixray.models.callables import ENCODERS

    stage_dir = run_dir / STAGE
    examples = run_dir / INGEST / EXAMPLES
    input_hashes = {"examples": output_hash(run_dir / INGEST, EXAMPLES)}
    check_model(cfg.model, "embed.model")
    config_hash = section_hash(cfg)
    if not force and is_complete(stage_dir, fingerprint(config_hash, input_hashes)):
        m = read_manifest(stage_dir)
        log.info("embed: examples and config unchanged, skipped (%d rows)", m["counts"]["out"])
        return m | {"skipped": True}

    n_in = pq.ParquetFile(examples).metadata.num_rows
    init_ray(ray_cfg)
    resolve_model(cfg.model, "embed.model")  # build an offline alias once, on the driver's node
    with stage_run(stage_dir, config_hash, input_hashes) as run:
        ds = read_examples(str(examples), TEXT_COLUMNS, cfg.batch_size)
        out = map_with_actors(ds, ENCODERS[cfg.encoder], encoder_kwargs(cfg), cfg, "embed")
        t0 = time.time()
        tmp = run.tmp_path(EMBEDDINGS)
        writer, n_out, d = None, 0, 0
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            emb = np.asarray(batch["embedding"], dtype=np.float32)
            if not np.isfinite(emb).all():
                raise InputError("embed: the encoder produced NaN/inf values")
            if cfg.normalize and not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3):
                raise InputError("embed: normalize is on but the encoder returned non-unit rows")
            if writer is None:
                d = emb.shape[1]
                meta = {"mixray.encoder": cfg.encoder, "mixray.model": cfg.model,
                        "mixray.text": cfg.text, "mixray.dim": str(d),
                        "mixray.normalized": str(cfg.normalize).lower()}
                schema = pa.schema([("id", pa.string()),
                                    ("embedding", pa.list_(pa.float32(), d))], metadata=meta)
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            writer.write_table(pa.table({"id": pa.array(batch["id"].tolist(), pa.string()),
                                         "embedding": embedding_array(emb)}, schema=schema))
            n_out += len(emb)
        if writer is None:
            raise InputError(f"embed: {examples} has no rows")
        writer.close()
        if n_out != n_in:
            raise InputError(f"embed: {n_in} examples in but {n_out} embeddings out")
        secs = time.time() - t0
        run.counts = {"in": n_in, "out": n_out, "rejected": 0}
        run.extra = {"dim": d, "rows_per_s": round(n_out / max(secs, 1e-9), 1),
                     "normalized": cfg.normalize}
        log.info("embed: %d examples -> %d x %d embeddings in %.1f s (%.0f/s)", n_in, n_out, d,
                 secs, n_out / max(secs, 1e-9))
    return read_manifest(stage_dir) | {"skipped": False}


def stage(cfg: RunConfig, run_dir: Path, force: bool = False) -> dict:
    """The ``embed`` stage of ``mixray run`` (see ``mixray.stages.STAGES``)."""
    return run_embed(cfg.embed, cfg.ray, run_dir, force=force)
