"""Embedding tables: ``id`` + ``embedding`` (``fixed_size_list<float32>[d]``) in Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """``[B, d]`` float32 -> Arrow ``fixed_size_list<float32>[d]``."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def embedding_schema(d: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), d))],
                     metadata=metadata)


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(ids [N], embeddings [N, d] float32, metadata) from an embeddings.parquet."""
    t = pq.read_table(path)
    col = t.column("embedding").combine_chunks()
    d = col.type.list_size
    emb = col.values.to_numpy(zero_copy_only=False).reshape(-1, d)
    meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
    return np.asarray(t.column("id").to_pylist(), dtype=object), emb, meta
