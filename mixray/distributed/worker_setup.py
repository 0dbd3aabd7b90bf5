"""Per-process set-up of the Ray workers of every Ray mixray starts or joins.

``init_ray`` installs :func:`setup_quiet` (or :func:`setup` under ``mixray --verbose``)
as the job's ``worker_process_setup_hook``, by module path, so Ray imports this module
in every worker process before any task or actor code. Keep it to the standard
library: every worker pays for its imports.

What a worker prints, Ray streams to the driver's console. The quiet set-up drops
what says nothing to a mixray user: FutureWarnings of third-party libraries (one per
worker and library), and Ray Train's per-second complaint when the State API is
missing. Progress bars inside workers are switched off by environment variables
(``runtime.QUIET_WORKER_ENV``), which must be set before the libraries are imported.
"""

from __future__ import annotations

import logging
import warnings

# Ray Train's detached placement-group cleaner polls the State API every second; without
# the dashboard (mixray's local default) that API does not exist and every poll logs this
# warning, which Ray streams to the driver: ~1 line per second of training, nothing lost.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
NO_STATE_API = "Failed to query Ray Train Controller actor state"


class DropNoStateApiWarning(logging.Filter):
    """Drop the cleaner's 'State API unavailable' warning; keep every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NO_STATE_API)


def setup() -> None:
    """The ``worker_process_setup_hook`` under ``--verbose``: only the State API filter."""
    logger = logging.getLogger(PG_CLEANER_LOGGER)
    if not any(isinstance(f, DropNoStateApiWarning) for f in logger.filters):
        logger.addFilter(DropNoStateApiWarning())


def setup_quiet() -> None:
    """The default ``worker_process_setup_hook``: :func:`setup` + no third-party FutureWarnings."""
    setup()
    # Deprecation notices of libraries to their callers (transformers, torch, peft, ...):
    # the user cannot act on them, and every worker would print each once.
    warnings.filterwarnings("ignore", category=FutureWarning)
