"""mixray: data-centric instruction tuning at cluster scale, on Ray.

Layers (see DESIGN.md): ``mixray.algorithms`` (pure numpy/torch),
``mixray.models`` (model loading and batch callables, no Ray),
``mixray.distributed`` (Ray Data / Ray actors), ``mixray.stages`` (config ->
Parquet in the run directory), ``mixray.cli`` (entry point).

The Python API, sklearn-shaped (``fit`` -> attributes ending in ``_``;
``get_params``/``set_params``; seeds are ``random_state``)::

    from mixray import QDITSelector, KMeans, DistributedKMeans
    sel = QDITSelector(k=1000, alpha=0.7).fit(embeddings, quality)     # sel.ranking_
    km = KMeans(n_clusters=100, random_state=0).fit(X)                  # km.labels_

Names are imported on first use (a module-level ``__getattr__``), so
``import mixray`` and ``mixray --help`` stay light: no torch, no Ray.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    # QDIT selection
    "QDITSelector": "mixray.algorithms.qdit",
    "evaluate_ranking": "mixray.algorithms.qdit",
    "GreedyState": "mixray.algorithms.facility",
    "sharded_select": "mixray.distributed.selection",
    "greedi_select": "mixray.distributed.selection",
    # KMeans
    "KMeans": "mixray.algorithms.kmeans",
    "DistributedKMeans": "mixray.distributed.kmeans",
    # MDIT
    "plan_mixes": "mixray.algorithms.mdit",
    "mix_vectors": "mixray.algorithms.mdit",
    "select_nearest": "mixray.algorithms.mdit",
    # SFTMix
    "median_split": "mixray.algorithms.sampling",
    # the losses (tensor functions: logits [B, T, V], targets [B, T])
    "ntp_loss": "mixray.algorithms.losses",
    "mdit_loss": "mixray.algorithms.losses",
    "sftmix_loss": "mixray.algorithms.losses",
    "mixup_cross_entropy": "mixray.algorithms.losses",
    # runs: a config, one stage or a sequence (what the CLI calls)
    "load_config": "mixray.config",
    "run_stage": "mixray.stages",
    "run_stages": "mixray.stages.runner",
    # the one error family
    "MixrayError": "mixray.errors",
    "ConfigError": "mixray.errors",
    "InputError": "mixray.errors",
    "SelectionInputError": "mixray.errors",
    "ClusteringInputError": "mixray.errors",
    "MixInputError": "mixray.errors",
    "TrainingConfigError": "mixray.errors",
    "ResourceError": "mixray.errors",
    "RunDirLockedError": "mixray.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mixray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
