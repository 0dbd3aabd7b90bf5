"""SFTMix's training dynamics: per-checkpoint perplexities -> confidence, variability, split.

A reference LM is fine-tuned with NTP and C checkpoints of it are kept. For
example i and checkpoint c, ``Perp_c(i)`` is the mean NLL of i's N_i response
tokens (paper eq. 2; ``mixray.models.callables.response_losses``). From the
``[N, C]`` matrix of them:

    Conf(i)        = −(1/C)·Σ_c Perp_c(i)                      (eq. 3)
    variability(i) = sqrt((1/C)·Σ_c (Perp_c(i) − mean_c Perp_c(i))²)   (data cartography's spread)

and the split at the median of Conf (``mixray.algorithms.sampling.median_split``):
the ⌊N/2⌋ most confident examples are confident, the rest (with odd N, one more)
unconfident.
"""

from __future__ import annotations

import numpy as np

from mixray.algorithms.sampling import median_split
from mixray.errors import InputError, TrainingConfigError


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> list[int]:
    """C evenly spaced optimizer steps of a run of ``total_steps``: ``⌊c·T/C⌋`` for c = 1..C.

    The last is the final step; the steps are distinct, so T ≥ C is required.
    """
    if n_checkpoints < 1:
        raise TrainingConfigError(f"the number of checkpoints must be >= 1, got {n_checkpoints}",
                                  where="dynamics.num_checkpoints")
    if total_steps < n_checkpoints:
        raise TrainingConfigError(
            f"the reference run has {total_steps} optimizer step(s), fewer than the "
            f"{n_checkpoints} checkpoints to keep; train longer (dynamics.train.epochs) or keep fewer",
            where="dynamics.num_checkpoints")
    return [c * total_steps // n_checkpoints for c in range(1, n_checkpoints + 1)]


def training_dynamics(perp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``perp [N, C]`` -> ``(conf [N], variability [N], confident [N] bool)`` (module docstring)."""
    perp = np.asarray(perp, dtype=np.float64)
    if perp.ndim != 2 or perp.shape[1] < 1:
        raise InputError(f"per-checkpoint perplexities must be an [N, C] array, got shape {perp.shape}")
    bad = ~np.isfinite(perp).all(axis=1)
    if bad.any():
        raise InputError(f"{int(bad.sum())} example(s) have a non-finite perplexity (rows "
                         f"{np.flatnonzero(bad)[:5].tolist()}); every example needs >= 1 response token")
    conf = -perp.mean(axis=1)
    return conf, perp.std(axis=1), median_split(conf)
