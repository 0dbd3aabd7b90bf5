"""The evaluate stage's contamination check: evaluation items vs the training pool.

An item is *contaminated* when its text (a benchmark question, a held-out instruction)

- equals a pool example's instruction (+ input) after ``normalize_text`` (``match = exact``), or
- has an embedding whose cosine to some pool example's is at least
  ``evaluate.contamination.threshold`` (``match = near``), both embedded by the sentence
  encoder ``evaluate.contamination.model``.

The pool is ``ingest/examples.parquet``: everything selection and training could have used
(a superset of what was trained on). Its embeddings are those of the embed stage when it used
the same sentence encoder on the same text; otherwise they are computed here, on the same
Ray Data actor pool as everything else. ``check_items`` returns one row per hit
(``mixray.contracts.CONTAMINATION_SCHEMA``); the stage excludes them or fails
(``evaluate.contamination.on_hit``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.algorithms.evaluation import max_cosine, normalize_text
from mixray.config import EvaluateConfig
from mixray.contracts import CONTAMINATION_SCHEMA, EMBEDDINGS, EXAMPLES
from mixray.io.rundir import completed_output
from mixray.models.text import instruction_text

log = logging.getLogger("mixray.evaluate")


def pool_texts(run_dir: Path) -> tuple[list[str], list[str]]:
    """(ids, instruction + input) of every example of the pool."""
    t = pq.read_table(EXAMPLES.path(run_dir), columns=["id", "instruction", "input"])
    texts = [instruction_text(i, x) for i, x in zip(t.column("instruction").to_pylist(),
                                                    t.column("input").to_pylist(), strict=True)]
    return t.column("id").to_pylist(), texts


def embed_texts(texts: list[str], cfg: EvaluateConfig) -> np.ndarray:
    """``[n, d]`` unit-norm sentence embeddings of ``texts``, over the evaluate actor pool."""
    from mixray.distributed.pipeline import map_with_actors, table_dataset
    from mixray.models.callables import SentenceEncoder

    n = len(texts)
    table = pa.table({"id": [str(i) for i in range(n)], "instruction": texts, "input": [""] * n,
                      "output": [""] * n})
    kwargs = {"model_path": cfg.contamination.model, "text": "instruction", "normalize": True,
              "max_length": 256}
    out = map_with_actors(table_dataset(table, cfg.batch_size), SentenceEncoder, kwargs, cfg, "evaluate")
    emb: np.ndarray | None = None
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows = np.asarray(batch["id"], dtype=np.int64)
        vecs = np.asarray(batch["embedding"], dtype=np.float32)
        emb = np.zeros((n, vecs.shape[1]), np.float32) if emb is None else emb
        emb[rows] = vecs
    return emb if emb is not None else np.zeros((0, 1), np.float32)


def _embed_stage_vectors(run_dir: Path, cfg: EvaluateConfig, ids: list[str]) -> np.ndarray | None:
    """The embed stage's vectors when they are what the check needs (same encoder, model, text)."""
    from mixray.io.embeddings import read_embeddings

    if completed_output(run_dir, EMBEDDINGS) is None:
        return None
    meta = pq.read_schema(EMBEDDINGS.path(run_dir)).metadata or {}
    want = {b"mixray.encoder": b"sentence-transformers", b"mixray.text": b"instruction",
            b"mixray.model": cfg.contamination.model.encode()}
    if any(meta.get(k) != v for k, v in want.items()):
        return None
    e_ids, x, _ = read_embeddings(EMBEDDINGS.path(run_dir))
    if e_ids.tolist() != ids:
        return None
    log.info("evaluate: contamination check reuses %s", EMBEDDINGS.path(run_dir))
    return x


def check_items(items: dict[str, list[dict[str, Any]]], cfg: EvaluateConfig, run_dir: Path) -> pa.Table:
    """One row per contaminated item: benchmark, id, match (exact | near), pool_id, cosine, text."""
    ids, texts = pool_texts(run_dir)
    exact = {}
    for pid, text in zip(ids, texts, strict=True):
        exact.setdefault(normalize_text(text), pid)
    flat = [(name, it) for name, its in items.items() for it in its]
    pool = _embed_stage_vectors(run_dir, cfg, ids)
    asked = [it["text"] for _, it in flat]
    if pool is None:  # one pass over the actor pool for both
        both = embed_texts(texts + asked, cfg)
        pool, queries = both[: len(texts)], both[len(texts):]
    else:
        queries = embed_texts(asked, cfg)
    best, at = max_cosine(queries, pool) if len(flat) and len(ids) else (np.zeros(0), np.zeros(0, int))
    rows = []
    for k, (name, it) in enumerate(flat):
        hit = exact.get(normalize_text(it["text"]))
        if hit is None and best[k] < cfg.contamination.threshold:
            continue
        rows.append({"benchmark": name, "id": it["id"], "match": "exact" if hit else "near",
                     "pool_id": hit or ids[int(at[k])], "cosine": float(best[k]), "text": it["text"][:500]})
    return pa.Table.from_pylist(rows, schema=CONTAMINATION_SCHEMA)
