"""The Rays tests start: the session's local Ray, and a real head for job submission.

``start_session_ray``: the local Ray of the ``ray_session`` fixture (conftest.py).

``ray_head``: `ray start --head --block` on its own ports and temp dir.

The head runs the dashboard and the job server; token authentication is on with a token
of its own (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), as cluster/README.md tells a
cluster to run, so the test neither depends on nor touches ``~/.ray/auth_token``.
It is stopped by its own pid: SIGTERM to ``ray start --block`` tears down every process
it started; if that does not end within the timeout, SIGKILL to its process group (the
head is started in a session of its own). Never ``ray stop``: that would stop every Ray
on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
# every port `ray start --head` would otherwise take at its default (6379, 8265, 10001, 52365)
# or at random: several Rays share CI and developer machines
PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "ray-client-server-port", "node-manager-port", "object-manager-port",
              "metrics-export-port", "runtime-env-agent-port")


@dataclass
class Head:
    pid: int
    dashboard: str        # http://127.0.0.1:<port>: the job server's address
    temp_dir: Path
    env: dict[str, str]   # what a job client needs (token auth) on top of os.environ
    log: Path

    def client_env(self) -> dict[str, str]:
        return os.environ | self.env


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_until_up(head: Head, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{head.log.read_text()[-3000:]}")
        if "Ray runtime started" in head.log.read_text(errors="replace"):
            try:
                urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=5)
                return
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                return
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not come up in {timeout:.0f} s:\n{head.log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the head (it stops what it started); SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # stragglers of this head only: its own group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _start_head(num_cpus: int, object_store_memory: int, timeout: float
                ) -> tuple[subprocess.Popen, Head]:
    temp_dir = Path(tempfile.mkdtemp(prefix="mxh-", dir="/tmp"))  # short: Unix socket paths
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = os.environ | auth | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `mixray` command
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop now, no 30 s drain
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    args = [str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_memory}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            "--min-worker-port=0", "--max-worker-port=0"]
    args += [f"--{flag}={port}" for flag, port in ports.items()]
    log = temp_dir / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    head = Head(proc.pid, f"http://127.0.0.1:{ports['dashboard-port']}", temp_dir, auth, log)
    try:
        _wait_until_up(head, proc, timeout)
    except (RuntimeError, TimeoutError):
        stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return proc, head


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, object_store_memory: int = 500_000_000,
             timeout: float = 120, attempts: int = 2) -> Iterator[Head]:
    """Start a head with the dashboard and the job server; yield it; stop it (see the module doc).

    A second attempt on a failed start: Ray gives its raylet 30 s to register, which a busy
    shared machine does not always meet.
    """
    for attempt in range(1, attempts + 1):
        try:
            proc, head = _start_head(num_cpus, object_store_memory, timeout)
            break
        except (RuntimeError, TimeoutError):
            if attempt == attempts:
                raise
    try:
        yield head
    finally:
        stop(proc)
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def start_session_ray():
    """The session's local Ray: 2 CPUs, no dashboard, 1 GB object store (also restarted by the
    multi-node test after its cluster of its own)."""
    import ray

    # address="local": never attach to another Ray running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1_000_000_000,
             log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in (
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
                 "MIXRAY_CACHE") if k in os.environ}})


@contextlib.contextmanager
def two_node_cluster(object_store_memory: int = 300_000_000) -> Iterator[list]:
    """Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), connected as this process's Ray.

    The head offers no CPU, so every task, actor and train worker runs on one of two
    nodes of 1 CPU each; node ``i`` carries the custom resources ``node<i>: 1`` and
    ``worker_slot: 1`` (a training worker that asks for a ``worker_slot`` gets a node of
    its own). A Ray this process had (the session's) is shut down first and started
    again afterwards, so the tests after this one find it as before.
    """
    import ray
    from ray.cluster_utils import Cluster

    had_session_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": object_store_memory})
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=object_store_memory,
                                  resources={f"node{i}": 1, "worker_slot": 1}) for i in range(2)]
        cluster.wait_for_nodes()
        env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                          "TOKENIZERS_PARALLELISM", "MIXRAY_CACHE") if k in os.environ}
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_session_ray:
            start_session_ray()
