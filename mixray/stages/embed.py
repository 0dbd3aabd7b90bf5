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

from mixray.console import StageBar, stage_bar
from mixray.contracts import EMBEDDINGS, EXAMPLES
from mixray.errors import InputError
from mixray.io.embeddings import embedding_array, embedding_schema
from mixray.models.registry import check_model, resolve_model
from mixray.models.text import TEXT_COLUMNS
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.embed")


def embed_model_need(cfg) -> str:
    """What the encoder loads from ``embed.model`` (``check_model``'s ``need``)."""
    return "sentence-transformers" if cfg.encoder == "sentence-transformers" else "model"


def encoder_kwargs(cfg) -> dict[str, Any]:
    """The settings the configured encoder uses (and only those: constructors reject others)."""
    kw = {"model_path": cfg.model, "text": cfg.text, "normalize": cfg.normalize,
          "max_length": cfg.max_length}
    if cfg.encoder == "sentence-transformers":
        kw["encode_batch_size"] = cfg.encode_batch_size
    return kw


def _checked(emb: np.ndarray, normalize: bool) -> np.ndarray:
    if not np.isfinite(emb).all():
        raise InputError("embed: the encoder produced NaN/inf values")
    if normalize and not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3):
        raise InputError("embed: normalize is on but the encoder returned non-unit rows")
    return emb


class Embed(Stage):
    """``embed``: examples -> embeddings over a Ray Data actor pool."""

    name = "embed"
    requires = (EXAMPLES,)
    outputs = (EMBEDDINGS,)
    summary = "{out} embeddings"
    memory_knobs = ("concurrency", "batch_size", "encode_batch_size", "num_cpus")

    def check(self) -> None:
        check_model(self.section.model, "embed.model", need=embed_model_need(self.section))

    def run(self, out: Outputs) -> None:
        from mixray.distributed.pipeline import map_with_actors, read_examples
        from mixray.distributed.runtime import init_ray
        from mixray.models.callables import ENCODERS

        cfg, examples = self.section, EXAMPLES.path(self.run_dir)
        n_in = pq.ParquetFile(examples).metadata.num_rows
        init_ray(self.cfg.ray)
        resolve_model(cfg.model, "embed.model")  # build an offline alias once, on the driver's node
        ds = read_examples(str(examples), list(TEXT_COLUMNS), cfg.batch_size)
        batches = map_with_actors(ds, ENCODERS[cfg.encoder], encoder_kwargs(cfg), cfg, "embed")
        t0 = time.time()
        with stage_bar("embed", n_in) as bar:
            n_out, d = self._write(batches.iter_batches(batch_size=None, batch_format="numpy"),
                                   out.path(EMBEDDINGS), bar)
        if n_out != n_in:
            raise InputError(f"embed: {n_in} examples in but {n_out} embeddings out")
        secs = max(time.time() - t0, 1e-9)
        out.counts = {"in": n_in, "out": n_out, "rejected": 0}
        out.extra = {"dim": d, "rows_per_s": round(n_out / secs, 1), "normalized": cfg.normalize}
        log.info("embed: %d examples -> %d x %d embeddings in %.1f s (%.0f/s)", n_in, n_out, d,
                 secs, n_out / secs)

    def _write(self, batches, path: Path, bar: StageBar) -> tuple[int, int]:
        """Stream the encoder's batches into ``path``; returns (rows, width)."""
        cfg = self.section
        writer, n_out, d = None, 0, 0
        for batch in batches:
            emb = _checked(np.asarray(batch["embedding"], dtype=np.float32), cfg.normalize)
            if writer is None:
                d = emb.shape[1]
                schema = embedding_schema(d, {
                    "mixray.encoder": cfg.encoder, "mixray.model": cfg.model, "mixray.text": cfg.text,
                    "mixray.dim": str(d), "mixray.normalized": str(cfg.normalize).lower()})
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            writer.write_table(pa.table({"id": pa.array(batch["id"].tolist(), pa.string()),
                                         "embedding": embedding_array(emb)}, schema=schema))
            n_out += len(emb)
            bar.update(len(emb))
        if writer is None:
            raise InputError(f"embed: {EXAMPLES.path(self.run_dir)} has no rows")
        writer.close()
        return n_out, d
