"""How many CPUs this process may use: the default of every ``threads`` setting.

``threads`` in mixray's glossary is the number of torch threads of one process
(the driver, a Ray actor or a Ray Train worker). Its default is :func:`available_cores`:
the CPUs this process may actually use, i.e. the smallest of

- the CPU affinity mask (``taskset``, cpusets; ``os.sched_getaffinity``),
- the cgroup CPU quota (containers, Kubernetes limits: cgroup v2 ``cpu.max`` or v1
  ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up, over the process's cgroup and
  its ancestors) — which neither ``os.cpu_count()`` nor torch's default sees,
- ``OMP_NUM_THREADS`` when set (Ray sets it to the ``num_cpus`` of each task and actor).

Standard library only (no torch): the driver's Ray start-up uses it too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path


def _quota(quota: str, period: str) -> float | None:
    """CPUs of a cgroup quota (``"max"`` or a negative quota: no limit -> None)."""
    if quota.strip() == "max":
        return None
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None


def _cgroup_paths(root: Path) -> list[tuple[str, str]]:
    """``(version, path)`` of this process's cgroups that can carry a CPU limit."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            out.append(("v2", path))
        elif "cpu" in controllers.split(","):
            out.append(("v1", path))
    return out


def _limit_files(root: Path, version: str, path: str) -> list[tuple[Path, Path | None]]:
    """The quota files of cgroup ``path`` and its ancestors (each as (quota, period) files)."""
    rel = Path(path.lstrip("/"))
    levels = [rel, *rel.parents]
    if version == "v2":
        mounts = [root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"]
        return [(m / lvl / "cpu.max", None) for m in mounts for lvl in levels]
    mounts = [root / "sys/fs/cgroup/cpu", root / "sys/fs/cgroup/cpu,cpuacct"]
    return [(m / lvl / "cpu.cfs_quota_us", m / lvl / "cpu.cfs_period_us")
            for m in mounts for lvl in levels]


def cgroup_cpu_limit(root: str | Path = "/") -> float | None:
    """The tightest cgroup CPU quota over this process's cgroups and their ancestors
    (in CPUs, e.g. 1.5), or None when there is none. ``root`` is for tests."""
    root = Path(root)
    best: float | None = None
    for version, path in _cgroup_paths(root):
        for quota_file, period_file in _limit_files(root, version, path):
            try:
                if period_file is None:
                    limit = _quota(*quota_file.read_text().split()[:2])
                else:
                    limit = _quota(quota_file.read_text(), period_file.read_text())
            except (OSError, ValueError, TypeError):
                continue
            if limit is not None and (best is None or limit < best):
                best = limit
    return best


def available_cores(*, omp: bool = True, root: str | Path = "/",
                    environ: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may use (module docstring): min(affinity, cgroup quota rounded
    up, ``OMP_NUM_THREADS``), at least 1. ``omp=False`` leaves ``OMP_NUM_THREADS`` out (for
    the CPUs a local Ray may schedule on: a shell's ``OMP_NUM_THREADS=1`` limits threads,
    not processes). ``root``/``environ`` are for tests."""
    env = os.environ if environ is None else environ
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    omp_threads = env.get("OMP_NUM_THREADS", "").strip() if omp else ""
    if omp_threads.isdigit() and int(omp_threads) > 0:
        cores = min(cores, int(omp_threads))
    return max(1, cores)


def resolve_threads(threads: int | None) -> int:
    """``threads`` when given, else :func:`available_cores`."""
    return int(threads) if threads else available_cores()


def kernel_env() -> dict[str, str]:
    """Environment for a process that runs the CPU kernels (QDIT selection, KMeans):
    ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy.

    Torch's OpenMP threads spin at every barrier before they sleep. The greedy runs many
    short parallel regions; on cores shared with other processes (a node running several
    actors) each barrier then waits for a descheduled thread while its partner burns the CPU
    it needs: 10K/1K selection under 8 CPU hogs on 2 cores slowed 10.4x spinning, 4.4x
    passive (apricot 4.5x; benchmarks/README.md). Where it is set: the ``mixray`` CLI
    process (before torch loads OpenMP), hence every worker of the local Ray it starts (they
    inherit its environment, and on a laptop they all share its cores: the busy case), and
    the selection and KMeans actors on any cluster (their runtime env). Not on ``import
    mixray``, and not for model actors on a cluster: alone on a quiet core set, a model
    forward loses ~10% passive (SmolLM2-135M generation 7.2 s spinning vs 8.0 s passive).
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
