"""The configs that ship inside the package (``mixray/configs/``) and ``mixray init``.

A recipe is ``mixray/configs/<name>.yaml`` (``mixray.choices.RECIPES``); the DeepSpeed
templates a config may name in ``train.deepspeed.config_file`` are in
``mixray/configs/deepspeed/``. A checkout's top-level ``configs`` is a link to that
directory, so ``mixray run configs/demo.yaml`` works there; an installed mixray
(``pip install mixray``) has no checkout: ``mixray init demo`` copies the recipe and the
templates out, next to each other, as they are in the package (relative paths inside a
config resolve against the config file's directory).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from mixray.choices import RECIPES
from mixray.errors import ConfigError, InputError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

TEMPLATES = "deepspeed"  # sub-directory of the DeepSpeed JSON templates


def configs_dir() -> Traversable:
    """``mixray/configs`` of the installed package (a wheel, an editable install or a checkout)."""
    return resources.files("mixray") / "configs"


def recipe_files(name: str) -> dict[str, Traversable]:
    """The files of recipe ``name``, by their path relative to the configs directory."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; the shipped recipes are {', '.join(RECIPES)}",
                          where="mixray init")
    root = configs_dir()
    files = {f"{name}.yaml": root / f"{name}.yaml"}
    files |= {f"{TEMPLATES}/{t.name}": t for t in sorted((root / TEMPLATES).iterdir(), key=lambda t: t.name)
              if t.name.endswith(".json")}
    missing = [rel for rel, f in files.items() if not f.is_file()]
    if missing:  # a broken install, not a user error the user could fix by a setting
        raise RuntimeError(f"the installed mixray lacks {missing} under {root}; reinstall it")
    return files


def init_recipe(name: str, dest: str | Path = ".", force: bool = False) -> list[Path]:
    """Copy recipe ``name`` (``<dest>/<name>.yaml``) and the DeepSpeed templates
    (``<dest>/deepspeed/*.json``) into ``dest``; returns the files written.

    Existing files are an error naming them, unless ``force``.
    """
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest} exists and is not a directory", where="mixray init")
    files = {dest / rel: src for rel, src in recipe_files(name).items()}
    clash = [str(p) for p in files if p.exists()]
    if clash and not force:
        raise InputError(f"{len(clash)} file(s) would be overwritten ({', '.join(clash[:3])}"
                         f"{', ...' if len(clash) > 3 else ''}); pass --force to overwrite them",
                         where="mixray init")
    for out, src in files.items():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())
    return list(files)
