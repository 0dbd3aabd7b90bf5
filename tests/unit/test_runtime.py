"""The local-Ray set-up: what init_ray asks Ray for, and the worker log filter it installs."""

from __future__ import annotations

import importlib
import logging

import pytest

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
    return calls


def test_local_ray_without_dashboard_installs_the_worker_hook(fake_ray):
    assert runtime.init_ray(RayConfig(num_cpus=2, object_store_memory=100_000_000)) == "local"
    (kw,) = fake_ray
    assert kw["address"] == "local"  # never attach to another Ray running on this machine
    assert (kw["num_cpus"], kw["object_store_memory"], kw["include_dashboard"]) == (2, 100_000_000, False)
    hook = kw["runtime_env"]["worker_process_setup_hook"]
    module, fn = hook.rsplit(".", 1)
    assert getattr(importlib.import_module(module), fn) is worker_setup.setup


def test_dashboard_on_or_a_cluster_keeps_ray_defaults(fake_ray):
    runtime.init_ray(RayConfig(include_dashboard=True))
    runtime.init_ray(RayConfig(address="ray://head:10001"))
    assert all("worker_process_setup_hook" not in (kw.get("runtime_env") or {}) for kw in fake_ray)
    assert fake_ray[1]["address"] == "ray://head:10001"


def test_job_driver_sends_no_runtime_env_and_no_resources(fake_ray, monkeypatch, caplog):
    """Inside `ray job submit` the job's runtime env is in force: ray.init() gets nothing more."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv(runtime.JOB_CONFIG_ENV, '{"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MIXRAY_CACHE", "/tmp/cache")
    with caplog.at_level("WARNING", logger="mixray.runtime"):
        assert runtime.init_ray(RayConfig(num_cpus=4, address="ray://elsewhere:10001")) == "job"
    (kw,) = fake_ray
    assert set(kw) == {"log_to_driver"}
    assert "MIXRAY_CACHE" in caplog.text and "ray.address" in caplog.text


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
