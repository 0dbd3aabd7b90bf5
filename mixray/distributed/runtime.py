"""Connect to Ray (a cluster by address, or a local Ray sized to this machine); GPUs per actor."""

from __future__ import annotations

import logging
import os

from mixray.algorithms.devices import gpus_to_use
from mixray.config import RayConfig

log = logging.getLogger("mixray.runtime")

# Environment that workers must share with the driver (offline flags, model cache).
_PROPAGATE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MIXRAY_CACHE",
              "HF_HUB_DISABLE_TELEMETRY")
_MAX_LOCAL_OBJECT_STORE = 2 * 1024**3
WORKER_SETUP_HOOK = "mixray.distributed.worker_setup.setup"


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3


def init_ray(cfg: RayConfig) -> None:
    """Start or connect to Ray once per process.

    - ``ray.address`` set, or ``RAY_ADDRESS`` in the environment (``ray job
      submit`` sets it): connect to that cluster.
    - otherwise: start a local Ray with ``num_cpus`` (default: all cores), no
      dashboard, and an object store of ``object_store_memory`` (default 30%
      of RAM, at most 2 GB).
    """
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _PROPAGATE if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("ray: connecting to %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    store = cfg.object_store_memory or min(_MAX_LOCAL_OBJECT_STORE, int(0.3 * _total_memory()))
    num_cpus = cfg.num_cpus or os.cpu_count() or 1
    log.info("ray: starting a local Ray (%d CPUs, object store %.1f GB, dashboard %s)",
             num_cpus, store / 1e9, "on" if cfg.include_dashboard else "off")
    if not cfg.include_dashboard:  # no State API: silence Ray Train's per-second warning about it
        runtime_env = (runtime_env or {}) | {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    ray.init(
        num_cpus=num_cpus,
        num_gpus=cfg.num_gpus,
        object_store_memory=store,
        include_dashboard=cfg.include_dashboard,
        runtime_env=runtime_env,
        log_to_driver=True,
    )


def gpus_per_actor(num_gpus: float | str, *, device: str = "auto", where: str | None = None) -> float:
    """GPUs for each Ray actor/task of a component, by the one rule of
    :func:`mixray.algorithms.devices.gpus_to_use` over the Ray cluster's GPUs.

    ``num_gpus``: ``"auto"`` (1 when the cluster has a GPU, else 0) or a number the
    cluster must have; ``device="cpu"`` forces 0. ``where`` names the config key in
    the :class:`~mixray.errors.ResourceError` raised when the cluster has too few.
    """
    import ray

    have = float(ray.cluster_resources().get("GPU", 0))
    return gpus_to_use(num_gpus, have, device=device, where=where)
