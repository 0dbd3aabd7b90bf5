"""The objective interface: what one loss needs from the training loop, and nothing else.

An objective turns rows of a worker's shard into a micro-batch, says how many
tokens that micro-batch adds to each normaliser, and runs the step (forward +
loss) on an engine. The math lives in ``mixray.algorithms.losses`` and
``mixray.algorithms.batching``; an objective only calls it::

    obj = make_objective(config)                      # OBJECTIVES[config["loss"]](config)
    mb = obj.batch(shard, rows, lam)                  # CPU tensors + "tokens", "examples"
    counts = obj.normalizer_counts(mb)                # (float, ...) summed over the window, all ranks
    loss, parts = obj.step(engine, to(mb, device), norms)   # parts: {component: detached scalar}

The loop sums ``normalizer_counts`` over the accumulation window's micro-batches,
all-reduces them and divides by the world size (the engine averages gradients
over ranks), so every loss is a token mean over the whole window on all ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class Objective:
    """Base class of the training objectives (one per ``train.loss``; registry: ``OBJECTIVES``).

    Class attributes a subclass sets:

    - ``name``: its ``mixray.choices.LOSSES`` key;
    - ``columns``: the shard columns ``batch`` reads (besides ``row`` and ``group``);
    - ``components``: the named parts of the loss that ``step`` returns (metrics columns);
    - ``paired``: micro-batches are b confident rows then b unconfident rows (the
      sampler's paired mode, one λ ~ Beta(α, α) per pair).
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    components: ClassVar[tuple[str, ...]] = ("ntp", "mix")
    paired: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any]):
        self.pad_id = int(config["pad_id"])
        self.chunk_rows = config.get("chunk_rows")

    def batch(self, shard: Mapping[str, Sequence], rows: Sequence[int], lam=None) -> dict[str, Any]:
        """Rows ``rows`` of the shard -> a micro-batch: CPU tensors, ``tokens`` (int), ``examples`` (int).

        ``lam``: the pairs' λ ``[b]`` when ``paired``, else None.
        """
        raise NotImplementedError

    def normalizer_counts(self, mb: Mapping[str, Any]) -> tuple[float, ...]:
        """What this micro-batch adds to each of the loss's normalisers (token counts or masses)."""
        raise NotImplementedError

    def step(self, engine, mb: Mapping[str, Any], norms: Sequence[float]):
        """Forward + loss -> ``(loss, {component: detached scalar})``; ``norms``: the window's normalisers."""
        raise NotImplementedError


def to_device(mb: Mapping[str, Any], device) -> dict[str, Any]:
    """The micro-batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in mb.items()}
