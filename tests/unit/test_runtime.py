"""The local-Ray set-up: what init_ray asks Ray for, and the worker log filter it installs."""

from __future__ import annotations

import importlib
import json
import logging
import warnings

import pytest

from mixray import console
from mixray.config import RayConfig
from mixray.distributed import runtime, worker_setup


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(runtime.JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(runtime, "quiet_ray_data", lambda: None)  # tested in test_console.py
    return calls


def _hook(kw: dict):
    module, fn = kw["runtime_env"]["worker_process_setup_hook"].rsplit(".", 1)
    return getattr(importlib.import_module(module), fn)


def test_local_ray_is_fresh_and_its_workers_quiet(fake_ray):
    assert runtime.init_ray(RayConfig(num_cpus=2, object_store_memory=100_000_000)) == "local"
    (kw,) = fake_ray
    assert kw["address"] == "local"  # never attach to another Ray running on this machine
    assert (kw["num_cpus"], kw["object_store_memory"], kw["include_dashboard"]) == (2, 100_000_000, False)
    assert _hook(kw) is worker_setup.setup_quiet
    assert kw["runtime_env"]["env_vars"].items() >= runtime.QUIET_WORKER_ENV.items()
    assert kw["logging_level"] == logging.WARNING  # Ray's own INFO lines only under --verbose


def test_verbose_shows_everything(fake_ray, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    runtime.init_ray(RayConfig(address="ray://head:10001"))
    (kw,) = fake_ray
    assert kw["address"] == "ray://head:10001"
    assert _hook(kw) is worker_setup.setup  # only the State API filter
    assert not set(runtime.QUIET_WORKER_ENV) & set(kw["runtime_env"].get("env_vars", {}))
    assert kw["logging_level"] == logging.INFO


def test_job_driver_sends_only_what_the_job_leaves_unset(fake_ray, monkeypatch):
    """Inside `ray job submit` the job's runtime env is in force: no env var or field it sets is
    sent again (Ray would refuse to merge them), no resources, no address."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    job_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "0"}}
    monkeypatch.setenv(runtime.JOB_CONFIG_ENV, json.dumps({"runtime_env": job_env}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MIXRAY_CACHE", "/tmp/cache")
    assert runtime.init_ray(RayConfig(num_cpus=4, address="ray://elsewhere:10001")) == "job"
    (kw,) = fake_ray
    assert set(kw) == {"runtime_env", "log_to_driver", "logging_level"}
    assert kw["runtime_env"]["env_vars"] == {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    assert _hook(kw) is worker_setup.setup_quiet
    from ray.runtime_env.runtime_env import _merge_runtime_env

    assert _merge_runtime_env(job_env, kw["runtime_env"]) is not None  # no conflict
    # a job that brings its own hook keeps it
    fake_ray.clear()
    job_env["worker_process_setup_hook"] = "mypkg.setup"
    monkeypatch.setenv(runtime.JOB_CONFIG_ENV, json.dumps({"runtime_env": job_env}))
    runtime.init_ray(RayConfig())
    assert "worker_process_setup_hook" not in fake_ray[0]["runtime_env"]


def test_cluster_mode_forwards_env_and_names_an_unreachable_address(fake_ray, monkeypatch):
    import ray

    from mixray.errors import ResourceError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert runtime.init_ray(RayConfig(address="10.0.0.1:6379")) == "cluster"
    assert fake_ray[0]["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert "num_cpus" not in fake_ray[0]

    def refuse(**kw):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ResourceError, match="cannot reach the Ray cluster at '10.0.0.2:6379'"):
        runtime.init_ray(RayConfig(address="10.0.0.2:6379"))


@pytest.fixture
def worker_process(monkeypatch):
    """What setup_quiet() changes in a worker process, given back to this test process after."""
    import threading

    names = ("mixray", *worker_setup.RAY_DATA_CHATTER)
    levels = {n: logging.getLogger(n).level for n in names}
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def test_quiet_worker_setup_ignores_deprecation_notices_only(worker_process):
    worker_setup.setup_quiet()
    assert logging.getLogger("mixray").level == logging.WARNING  # in a worker: the driver says it
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("old api", FutureWarning, stacklevel=1)
        warnings.warn("old ray api", DeprecationWarning, stacklevel=1)
        warnings.warn("check this", UserWarning, stacklevel=1)
    assert [type(w.message) for w in seen] == [UserWarning]


def test_worker_setup_drops_only_the_state_api_warning(caplog):
    worker_setup.setup()
    worker_setup.setup()  # idempotent: one filter
    logger = logging.getLogger(worker_setup.PG_CLEANER_LOGGER)
    assert sum(isinstance(f, worker_setup.DropNoStateApiWarning) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=worker_setup.PG_CLEANER_LOGGER):
        logger.warning("Failed to query Ray Train Controller actor state. State API may be "
                       "temporarily unavailable. Continuing to monitor.")
        logger.warning("Failed to query placement group table: boom. Assuming not removed.")
    assert [r.getMessage()[:40] for r in caplog.records] == ["Failed to query placement group table: b"]


def test_quiet_worker_setup_drops_only_the_pg_cleaner_connection_crash(worker_process, monkeypatch):
    import threading

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.thread.name))
    worker_setup.setup_quiet()
    worker_setup.setup_quiet()  # idempotent: one wrapper

    def fail(exc):
        raise exc

    for name, exc in ((worker_setup.PG_CLEANER_THREAD, ConnectionError("Found multiple active Ray")),
                      (worker_setup.PG_CLEANER_THREAD, ValueError("a real bug")),
                      ("other", ConnectionError("elsewhere"))):
        t = threading.Thread(target=fail, args=(exc,), name=name)
        t.start()
        t.join()
    assert seen == [worker_setup.PG_CLEANER_THREAD, "other"]  # only the cleaner's ConnectionError dropped
