"""Per-process set-up of the Ray workers of a local Ray that mixray starts.

``init_ray`` installs :func:`setup` as the job's ``worker_process_setup_hook`` (by
module path, so Ray imports this module in every worker process before any task or
actor code). Keep it to the standard library: every worker pays for its imports.
"""

from __future__ import annotations

import logging

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
    """The ``worker_process_setup_hook`` of a local Ray started without the dashboard."""
    logger = logging.getLogger(PG_CLEANER_LOGGER)
    if not any(isinstance(f, DropNoStateApiWarning) for f in logger.filters):
        logger.addFilter(DropNoStateApiWarning())
