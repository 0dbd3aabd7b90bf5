"""Training objectives: one module per loss, one registry keyed by ``mixray.choices.LOSSES``.

Adding a loss: a module with an ``Objective`` subclass (``base.py`` describes the
interface), one line in ``OBJECTIVES``, and its name in ``mixray.choices.LOSSES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixray.choices import LOSSES
from mixray.errors import TrainingConfigError
from mixray.training.objectives.base import Objective, to_device
from mixray.training.objectives.mdit import MDITObjective
from mixray.training.objectives.ntp import NTPObjective
from mixray.training.objectives.sftmix import SFTMixObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "ntp": NTPObjective,
    "mdit": MDITObjective,
    "sftmix": SFTMixObjective,
}

__all__ = ["OBJECTIVES", "MDITObjective", "NTPObjective", "Objective", "SFTMixObjective",
           "make_objective", "to_device"]


def make_objective(config: Mapping[str, Any]) -> Objective:
    """The objective of ``config["loss"]``, built from the loop config."""
    cls = OBJECTIVES.get(config["loss"])
    if cls is None:
        raise TrainingConfigError(f"unknown loss {config['loss']!r}; the losses are {list(LOSSES)}",
                                  where="loss")
    return cls(config)
