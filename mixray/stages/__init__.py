"""Layer 3: stages. Each declares its inputs and outputs and holds only its work.

``STAGES`` is the one registry the CLI and ``mixray run`` read: stage name ->
(``"module:Class"``, one-line help), keyed by ``mixray.choices.STAGES`` in run
order. Each class subclasses :class:`mixray.stages.runner.Stage`; the runner
(``mixray.stages.runner.execute``) owns hashing, skipping, manifests, atomic
outputs and logging. Modules are imported only when their stage runs, so
``mixray --help`` stays instant.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("mixray.stages.ingest:Ingest", "read the sources into examples.parquet (+ rejects.parquet)"),
    "embed": ("mixray.stages.embed:Embed", "embed the examples over a Ray Data actor pool"),
    "score": ("mixray.stages.score:Score", "score the examples' quality over a Ray Data actor pool"),
    "imperfect": ("mixray.stages.imperfect:Imperfect", "LM-Mixup: quality classes + capacity-constrained clusters of the low-quality examples"),
    "mixture": ("mixray.stages.mixture:Mixture", "LM-Mixup: the distiller's training pairs (MIXTURE files and/or degraded high-quality examples)"),
    "distill_sft": ("mixray.stages.distill_sft:DistillSFT", "LM-Mixup: SFT of the distiller on Ray Train + DeepSpeed (prompt masked)"),
    "distill_grpo": ("mixray.stages.distill_grpo:DistillGRPO", "LM-Mixup: GRPO of the distiller (TRL) on Ray Train + DeepSpeed, quality/alignment/format rewards"),
    "distill": ("mixray.stages.distill:Distill", "LM-Mixup: distil every low-quality cluster (Ray Data), re-score, rank, merge -> merged.parquet"),
    "select": ("mixray.stages.select:Select", "pick K examples by quality + diversity (QDIT)"),
    "mix": ("mixray.stages.mix:Mix", "MDIT: plan cross-task mixes (pairs of similar length, λ) -> mix_plan.parquet"),
    "cluster": ("mixray.stages.cluster:Cluster", "MDIT: KMeans on originals + mixes over Ray actors, keep the nearest -> selection.parquet"),
    "dynamics": ("mixray.stages.dynamics:Dynamics", "SFTMix: train a reference model, score every example at C checkpoints -> confident/unconfident split"),
    "train": ("mixray.stages.train:Train", "fine-tune on Ray Train + DeepSpeed (loss ntp | mdit | sftmix)"),
    "evaluate": ("mixray.stages.evaluate:Evaluate", "base vs trained model: held-out loss, GSM8K, multiple choice (Ray Data), after a contamination check"),
}


def stage_class(name: str) -> type:
    """The Stage subclass registered as ``name`` (imported on first use)."""
    module, _, cls = STAGES[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def run_stage(name: str, cfg: Any, run_dir: Path, force: bool = False) -> dict:
    """Run (or skip) stage ``name`` on the resolved config; returns its manifest (+ ``skipped``)."""
    from mixray.io.lock import run_dir_lock
    from mixray.stages.runner import execute

    with run_dir_lock(Path(run_dir)):
        return execute(stage_class(name)(cfg, Path(run_dir)), force)
