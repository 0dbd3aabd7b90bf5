"""The paper-scale recipes in configs/paper/ are validated (not run): schema, the submit command they
open with, the papers' settings, and the benchmark files they name. They need a GPU cluster and the
papers' data on shared storage, so they are not held to "everything ships offline" (configs/*.yaml)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mixray.config import load_config
from mixray.io.readers import resolve_path

ROOT = Path(__file__).resolve().parents[2]


def _submit_command(path: Path) -> str:
    lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    return next(ln for ln in lines if ln.startswith("ray job submit"))


@pytest.mark.parametrize("name", ["qdit", "mdit"])
def test_recipe_opens_with_its_ray_job_submit_command_and_validates(name):
    path = ROOT / "configs" / "paper" / f"{name}.yaml"
    cmd = _submit_command(path)
    m = re.fullmatch(r"ray job submit --address http://<head>:8265 --working-dir \. --runtime-env "
                     r"(\S+) -- mixray run (\S+) run_dir=(\S+)", cmd)
    assert m, cmd
    runtime_env, config, run_dir = m.groups()
    assert (ROOT / runtime_env).is_file() and config == f"configs/paper/{name}.yaml"
    cfg = load_config(path)
    assert run_dir == cfg.run_dir and Path(run_dir).is_absolute() and cfg.ray.address == "auto"
    assert cfg.stages[-1] == "evaluate" and cfg.ingest.heldout.fraction > 0
    for b in cfg.evaluate.benchmarks:
        assert resolve_path(b.path).is_file(), b.path  # shipped by the offline data packages
    assert cfg.evaluate.contamination.enabled


def test_qdit_recipe_has_the_papers_settings():
    cfg = load_config(ROOT / "configs" / "paper" / "qdit.yaml")
    assert (cfg.embed.model, cfg.score.backend) == ("all-mpnet-base-v2", "reward-model")
    assert cfg.select.k == 10_000 and cfg.select.alphas[0] == 0.7 and cfg.select.distributed == "sharded"
    assert cfg.train.lora.enabled and "7b" in cfg.train.model.lower() and cfg.train.data == "select"
    assert cfg.train.accumulation * cfg.train.micro_batch_size * cfg.train.num_workers == 128


def test_mdit_recipe_has_the_papers_settings():
    cfg = load_config(ROOT / "configs" / "paper" / "mdit.yaml")
    assert {s.task_name for s in cfg.ingest.sources} == {"general", "math", "code"}
    assert (cfg.mix.alpha, cfg.mix.mixes_per_pair) == (8.0, 1)
    assert cfg.train.loss == "mdit" and cfg.train.data == "cluster" and not cfg.train.lora.enabled
    assert "1.3b" in cfg.train.model.lower() and (cfg.train.lr, cfg.train.epochs) == (2e-5, 3)
    assert cfg.train.global_batch_size == 16 and cfg.train.deepspeed.stage == 3
    assert cfg.embed.model == cfg.mix.model == cfg.train.model


def test_validate_names_a_missing_benchmark_file(tmp_path, capsys):
    from mixray.cli import main

    demo = ROOT / "configs" / "demo.yaml"
    assert main(["validate", str(demo), "evaluate.benchmarks.1.path=/nonexistent.jsonl.gz"]) == 2
    assert "evaluate.benchmarks[arc_easy].path: /nonexistent.jsonl.gz does not exist" in capsys.readouterr().err
