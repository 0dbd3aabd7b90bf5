"""Thread counts follow the CPUs a process may actually use (issue 15): affinity, the cgroup
quota (v1 and v2, the tightest over the cgroup and its ancestors), OMP_NUM_THREADS; and
importing mixray makes OpenMP threads wait passively unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixray.algorithms.cores import available_cores, cgroup_cpu_limit, resolve_threads

HOST = len(os.sched_getaffinity(0))


def _v2(root: Path, cgroup: str, limits: dict[str, str]) -> Path:
    """A fake root: /proc/self/cgroup naming ``cgroup`` (v2) and ``cpu.max`` files per level."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(f"0::{cgroup}\n")
    for level, value in limits.items():
        d = root / "sys/fs/cgroup" / level.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(value + "\n")
    return root


def test_cgroup_v2_quota_is_read_and_the_tightest_ancestor_wins(tmp_path):
    root = _v2(tmp_path, "/kubepods/pod1/ctr", {"/kubepods": "400000 100000",
                                                  "/kubepods/pod1/ctr": "150000 100000"})
    assert cgroup_cpu_limit(root) == 1.5
    assert available_cores(root=root, environ={}) == min(HOST, 2)  # 1.5 CPUs -> 2 threads


def test_cgroup_v2_without_a_limit(tmp_path):
    root = _v2(tmp_path, "/user.slice", {"/user.slice": "max 100000"})
    assert cgroup_cpu_limit(root) is None
    assert available_cores(root=root, environ={}) == HOST


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    d = tmp_path / "sys/fs/cgroup/cpu,cpuacct/docker/abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("100000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.0
    assert available_cores(root=tmp_path, environ={}) == 1
    (d / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cgroup_cpu_limit(tmp_path) is None


def test_unreadable_or_garbled_cgroup_files_mean_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None  # no /proc at all
    root = _v2(tmp_path, "/x", {"/x": "garbage"})
    assert cgroup_cpu_limit(root) is None


def test_omp_num_threads_and_explicit_threads(tmp_path):
    assert available_cores(root=tmp_path, environ={"OMP_NUM_THREADS": "1"}) == 1
    assert available_cores(root=tmp_path, environ={"OMP_NUM_THREADS": "999"}) == HOST
    assert available_cores(root=tmp_path, environ={"OMP_NUM_THREADS": "junk"}) == HOST
    assert available_cores(omp=False, root=tmp_path, environ={"OMP_NUM_THREADS": "1"}) == HOST  # local Ray
    assert resolve_threads(3) == 3


def test_affinity_mask_is_followed():
    """A process pinned to one CPU (taskset) uses one thread, whatever the host has."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from mixray.algorithms.cores import available_cores; print(available_cores(environ={}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_process_waits_passively_unless_the_user_chose(given, want):
    """Selection and KMeans run in the CLI process: its OpenMP threads must not spin on a
    shared node (benchmarks/README.md, "busy machine"); a user's policy is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys; from mixray.cli import main; rc = main(['validate', 'missing.yaml']); "
            "print(rc, 'torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["2", "False", want]  # set before torch could load OpenMP


def test_importing_mixray_leaves_the_wait_policy_alone():
    """Model forwards lose ~10% with passive waits: a library import must not change it."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import mixray, mixray.algorithms.qdit, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "None"
