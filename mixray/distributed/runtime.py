"""Connect to Ray in one of three driver modes.

- **job driver** — the process is the entrypoint of ``ray job submit`` or a
  KubeRay ``RayJob`` (Ray sets ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and ``RAY_ADDRESS``):
  join the job's cluster with ``ray.init()`` and nothing else. The job's runtime
  env (``--runtime-env cluster/runtime_env.yaml``) is already in force; sending env
  vars or resources again makes Ray refuse to merge them.
- **cluster** — ``ray.address`` in the config, or ``RAY_ADDRESS`` in the environment:
  connect, forwarding the offline flags and the model cache location to the
  workers (``runtime_env.env_vars``). No resources are passed: the cluster has its own.
- **local** — no address: always start a fresh local Ray (``address="local"``) sized
  to this machine, never attaching silently to another Ray running here.

An address that cannot be reached is one :class:`~mixray.errors.ResourceError` naming it.
:func:`gpus_per_actor` resolves a component's ``num_gpus`` against the cluster's GPUs.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Literal

from mixray.algorithms.devices import gpus_to_use
from mixray.config import RayConfig
from mixray.errors import ResourceError

log = logging.getLogger("mixray.runtime")

# Environment that workers must share with the driver (offline flags, model cache).
PROPAGATE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MIXRAY_CACHE",
             "HF_HUB_DISABLE_TELEMETRY")
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a job's entrypoint
_MAX_LOCAL_OBJECT_STORE = 2 * 1024**3
WORKER_SETUP_HOOK = "mixray.distributed.worker_setup.setup"

DriverMode = Literal["job", "cluster", "local"]


def driver_mode(cfg: RayConfig) -> DriverMode:
    if os.environ.get(JOB_CONFIG_ENV):
        return "job"
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return "cluster"
    return "local"


def in_job() -> bool:
    """Whether this process is a Ray job's entrypoint (``ray job submit``, KubeRay RayJob)."""
    return bool(os.environ.get(JOB_CONFIG_ENV))


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3


def _forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in PROPAGATE if k in os.environ}


def _job_env_vars() -> dict[str, str]:
    try:
        cfg = json.loads(os.environ.get(JOB_CONFIG_ENV, "{}"))
        return dict((cfg.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def _init_job() -> None:
    import ray

    missing = sorted(k for k in _forwarded_env() if k not in _job_env_vars())
    if missing:
        log.warning("ray job: the job's runtime env does not set %s; workers will not see them "
                    "(add them to env_vars of --runtime-env, e.g. cluster/runtime_env.yaml)",
                    ", ".join(missing))
    log.info("ray: running as a Ray job driver; joining the job's cluster")
    ray.init(log_to_driver=True)


def _init_cluster(address: str) -> None:
    import ray

    env = _forwarded_env()
    log.info("ray: connecting to %s", address)
    try:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    except ConnectionError as e:
        raise ResourceError(f"cannot reach the Ray cluster at {address!r}: {e}",
                            where="ray.address or RAY_ADDRESS") from None


def _init_local(cfg: RayConfig) -> None:
    import ray

    env = _forwarded_env()
    runtime_env: dict = {"env_vars": env} if env else {}
    store = cfg.object_store_memory or min(_MAX_LOCAL_OBJECT_STORE, int(0.3 * _total_memory()))
    num_cpus = cfg.num_cpus or os.cpu_count() or 1
    log.info("ray: starting a local Ray (%d CPUs, object store %.1f GB, dashboard %s)",
             num_cpus, store / 1e9, "on" if cfg.include_dashboard else "off")
    if not cfg.include_dashboard:  # no State API: silence Ray Train's per-second warning about it
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    ray.init(
        address="local",  # always a fresh local Ray: never attach to one running on this machine
        num_cpus=num_cpus,
        num_gpus=cfg.num_gpus,
        object_store_memory=store,
        include_dashboard=cfg.include_dashboard,
        runtime_env=runtime_env or None,
        log_to_driver=True,
    )


def init_ray(cfg: RayConfig) -> DriverMode:
    """Start or connect to Ray once per process (see the module docstring); returns the mode."""
    import ray

    mode = driver_mode(cfg)
    if ray.is_initialized():
        return mode
    if mode == "job":
        if cfg.address:
            log.warning("ray.address=%s is ignored: a Ray job runs on the cluster it was submitted "
                        "to", cfg.address)
        _init_job()
    elif mode == "cluster":
        _init_cluster(cfg.address or os.environ["RAY_ADDRESS"])
    else:
        _init_local(cfg)
    return mode


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
