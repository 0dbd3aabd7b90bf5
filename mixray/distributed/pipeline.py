"""The one place that knows actor-pool knobs: concurrency, batch size, CPUs/GPUs per actor.

``map_with_actors`` runs a batch callable (``mixray.models.callables``) over a
Ray Data dataset in a pool of actors, each loading its model once. GPU actors
when the cluster has GPUs (``num_gpus: auto``), CPU actors otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from mixray.config import ActorPoolConfig
from mixray.distributed.runtime import gpus_per_actor
from mixray.errors import InputError

log = logging.getLogger("mixray.pipeline")


def map_with_actors(ds, fn_cls: type, fn_kwargs: dict[str, Any], pool: ActorPoolConfig,
                    setting: str):
    """``ds.map_batches`` with ``fn_cls(**fn_kwargs)`` in a pool of ``pool.concurrency`` actors."""
    import ray

    num_gpus = gpus_per_actor(pool.num_gpus, where=f"{setting}.num_gpus")
    kwargs = dict(fn_kwargs)
    if num_gpus == 0:
        kwargs["threads"] = pool.threads or max(1, int(pool.num_cpus))
    have_cpus = ray.cluster_resources().get("CPU", 0)
    if pool.concurrency * pool.num_cpus > have_cpus:
        log.warning("%s: %d actors x %s CPUs exceed the cluster's %s CPUs now; the pool waits "
                    "for the autoscaler (lower %s.concurrency or %s.num_cpus on a fixed cluster)",
                    setting, pool.concurrency, pool.num_cpus, have_cpus, setting, setting)
    log.info("%s: %d %s actor(s), %s CPU(s) each, batch %d", setting, pool.concurrency,
             "GPU" if num_gpus else "CPU", pool.num_cpus, pool.batch_size)
    return ds.map_batches(
        fn_cls,
        fn_constructor_kwargs=kwargs,
        batch_size=pool.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.concurrency),
        num_cpus=pool.num_cpus,
        num_gpus=num_gpus,
    )


def read_examples(path: str, columns: list[str], rows_per_block: int, rows=None):
    """The ingested examples as a Ray Data dataset of ``rows_per_block``-row blocks, in file order.

    Blocks are put into the object store from the driver, one slice at a time
    (``ray.data.from_arrow_refs``), instead of ``ray.data.read_parquet``: Ray Data
    starts actor pools before read tasks, so a pool that takes every CPU of the
    cluster would starve the read and hang (ray-project/ray#44687; on a 2-core
    laptop that is any pool of 2 one-CPU actors). The examples hold text only,
    so the driver streams them through a bounded buffer. ``rows`` (sorted row
    indices) selects a subset, e.g. a seeded sample.
    """
    import pyarrow.parquet as pq
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # outputs in input order: reproducible files
    pf = pq.ParquetFile(path)
    refs, offset = [], 0
    for batch in pf.iter_batches(batch_size=max(rows_per_block, 8192), columns=columns):
        table, n = pa.Table.from_batches([batch]), batch.num_rows
        if rows is not None:
            lo, hi = np.searchsorted(rows, [offset, offset + n])
            table = table.take(rows[lo:hi] - offset)
        offset += n
        for start in range(0, len(table), rows_per_block):
            refs.append(ray.put(table.slice(start, rows_per_block)))
    if not refs:
        raise InputError(f"{path} has no rows")
    return ray.data.from_arrow_refs(refs)


def from_table(table: pa.Table, rows_per_block: int):
    """A Ray Data dataset of ``table``'s rows in order, put into the object store from the driver in
    ``rows_per_block``-row blocks (see :func:`read_examples` for why not a read task)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    if table.num_rows == 0:
        raise InputError("nothing to process: the table has no rows")
    refs = [ray.put(table.slice(s, rows_per_block)) for s in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow_refs(refs)
