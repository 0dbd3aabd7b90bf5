"""The one family of errors a user can act on. A leaf module: it imports nothing of mixray.

Every error caused by the user's input or config is a :class:`MixrayError` *and* the
matching built-in (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so library
code that catches the built-in keeps working. Every layer raises them, the algorithm
layer included. The CLI prints one line and exits 2, without a traceback
(``--debug`` shows it)::

    mixray <command>: error: <what> (<config key or file>)

``where`` names the config key (``select.k``) or the file (``runs/x/embed/embeddings.parquet``,
``data.jsonl:12``) the problem is in; it is appended to the message in parentheses.
"""

from __future__ import annotations


class MixrayError(Exception):
    """Base class: the message says what was received and what is allowed.

    ``where``: the config key or file the problem is in (optional).
    """

    def __init__(self, message: str = "", where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.message} ({self.where})" if self.where else self.message

    def __reduce__(self):  # survive pickling across Ray workers with ``where`` intact
        return (type(self), (self.message, self.where))


class ConfigError(MixrayError, ValueError):
    """The config (or an override) is invalid; ``where`` names the key."""


class InputError(MixrayError, ValueError):
    """An input file, model or run-directory artifact is missing or unusable."""


class SelectionInputError(InputError):
    """Invalid input to a selector (embeddings, quality, k, alpha, ...)."""


class ClusteringInputError(InputError):
    """Invalid input to KMeans (points, number of clusters, initial centres, ...)."""


class MixInputError(InputError):
    """Invalid input to MDIT's mix planner or nearest-to-centroid selection."""


class TrainingConfigError(ConfigError):
    """Training settings that cannot work together (batch sizes, ZeRO stage, precision, ...)."""


class ResourceError(MixrayError, RuntimeError):
    """The machine or cluster cannot give what the config asks for (GPUs, memory, an address)."""


class RunDirLockedError(MixrayError, RuntimeError):
    """Another mixray process holds the run directory."""
