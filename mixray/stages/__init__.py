"""Layer 3: stages. Each wires one config section to layer-2 code and writes Parquet.

``STAGES`` is the one registry the CLI and ``mixray run`` read: stage name ->
(``"module:function"``, one-line help). Every function has the signature
``fn(cfg: RunConfig, run_dir: Path, force: bool) -> dict`` (the stage manifest,
plus ``skipped``). Modules are imported only when their stage runs, so
``mixray --help`` stays instant.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("mixray.stages.ingest:stage", "read the sources into examples.parquet (+ rejects.parquet)"),
    "embed": ("mixray.stages.embed:stage", "embed the examples over a Ray Data actor pool"),
    "score": ("mixray.stages.score:stage", "score the examples' quality over a Ray Data actor pool"),
    "select": ("mixray.stages.select:stage", "pick K examples by quality + diversity (QDIT)"),
    "mix": ("mixray.stages.mix:stage", "MDIT: plan cross-task mixes (pairs of similar length, λ) -> mix_plan.parquet"),
    "cluster": ("mixray.stages.cluster:stage", "MDIT: KMeans on originals + mixes over Ray actors, keep the nearest -> selection.parquet"),
    "train": ("mixray.stages.train:stage", "fine-tune on Ray Train + DeepSpeed (loss ntp | mdit | sftmix)"),
}


def run_stage(name: str, cfg: Any, run_dir: Path, force: bool = False) -> dict:
    """Import stage ``name`` and run it on the resolved config."""
    module, _, fn = STAGES[name][0].partition(":")
    return getattr(importlib.import_module(module), fn)(cfg, run_dir, force)
