"""The one place that knows actor-pool knobs: concurrency, batch size, CPUs/GPUs per actor.

``map_with_actors`` runs a batch callable (``mixray.models.callables``) over a
Ray Data dataset in a pool of actors, each loading its model once. GPU actors
when the cluster has GPUs (``num_gpus: auto``), CPU actors otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from mixray.config import ActorPoolConfig
from mixray.errors import InputError

log = logging.getLogger("mixray.pipeline")


def gpus_per_actor(pool: ActorPoolConfig, setting: str) -> float:
    """Resolve ``num_gpus`` ("auto" -> 1 if the cluster has GPUs, else 0) and check it fits."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if pool.num_gpus == "auto":
        return 1.0 if have >= 1 else 0.0
    if pool.num_gpus > have:
        raise InputError(f"{setting}.num_gpus={pool.num_gpus}, but the Ray cluster has {have} GPU(s)")
    return float(pool.num_gpus)


def map_with_actors(ds, fn_cls: type, fn_kwargs: dict[str, Any], pool: ActorPoolConfig,
                    setting: str):
    """``ds.map_batches`` with ``fn_cls(**fn_kwargs)`` in a pool of ``pool.concurrency`` actors."""
    import ray

    num_gpus = gpus_per_actor(pool, setting)
    kwargs = dict(fn_kwargs)
    if num_gpus == 0:
        kwargs["threads"] = pool.threads or max(1, int(pool.num_cpus))
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


def read_examples(path: str, columns: list[str], rows_per_block: int):
    """The ingested examples as a Ray Data dataset, in blocks small enough to spread over actors."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # outputs in input order: reproducible files
    ds = ray.data.read_parquet(path, columns=columns, num_cpus=0.25)
    return ds.repartition(target_num_rows_per_block=rows_per_block)
