"""Per-process set-up of the Ray workers of every Ray mixray starts or joins.

``init_ray`` installs :func:`setup_quiet` (or :func:`setup` under ``mixray --verbose``)
as the job's ``worker_process_setup_hook``, by module path, so Ray imports this module
in every worker process before any task or actor code. Keep it to the standard
library: every worker pays for its imports.

What a worker prints, Ray streams to the driver's console. Both set-ups drop Ray
Train's per-second complaint when the State API is missing (without the dashboard).
The quiet one also drops what says nothing to a mixray user: FutureWarnings and
DeprecationWarnings of the libraries (one per worker and library), Ray Data's
per-dataset INFO lines inside training workers, the traceback of Ray Train's
placement-group cleaner when it cannot find its cluster, and mixray's own INFO lines
in workers (the driver's bar and summary say it). Progress bars inside workers are switched off by environment variables
(``runtime.QUIET_WORKER_ENV``), which must be set before the libraries are imported.
A hook that raises would make Ray kill the worker: every step here is best effort.
"""

from __future__ import annotations

import logging
import threading
import warnings

# Ray Train's detached placement-group cleaner polls the State API every second; without
# the dashboard (mixray's local default) that API does not exist and every poll logs this
# warning, which Ray streams to the driver: ~1 line per second of training, nothing lost.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
NO_STATE_API = "Failed to query Ray Train Controller actor state"
PG_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


class DropNoStateApiWarning(logging.Filter):
    """Drop the cleaner's 'State API unavailable' warning; keep every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NO_STATE_API)


# Ray Data inside a training worker: the notice that progress bars are off (the driver turns
# them off for training) and the start/finish INFO lines of every epoch's dataset.
RAY_DATA_CHATTER = {"ray.data._internal.progress": logging.ERROR,
                    "ray.data._internal.execution.streaming_executor": logging.WARNING}


def _drop_pg_cleaner_crash() -> None:
    """Ray Train's placement-group cleaner looks its cluster up through the State API; with
    ``RAY_ADDRESS`` unset and several Rays on one machine its thread dies at the first poll
    with a ConnectionError traceback ("Found multiple active Ray instances"). The cleaner only
    acts when a training controller dies ungracefully, and without the dashboard it cannot
    act at all: its death is logged at DEBUG instead. Other threads' errors are untouched."""
    previous = threading.excepthook

    def excepthook(args) -> None:
        thread = getattr(args, "thread", None)
        if (thread is not None and thread.name == PG_CLEANER_THREAD
                and issubclass(args.exc_type, ConnectionError)):
            logging.getLogger(PG_CLEANER_LOGGER).debug("placement-group cleaner stopped: %s",
                                                       args.exc_value)
            return
        previous(args)

    if not getattr(previous, "mixray", False):  # once per process
        excepthook.mixray = True
        threading.excepthook = excepthook


def setup() -> None:
    """The ``worker_process_setup_hook`` under ``--verbose``: only the State API filter."""
    logger = logging.getLogger(PG_CLEANER_LOGGER)
    if not any(isinstance(f, DropNoStateApiWarning) for f in logger.filters):
        logger.addFilter(DropNoStateApiWarning())


def setup_quiet() -> None:
    """The default ``worker_process_setup_hook``: :func:`setup` + no library deprecation notices,
    no Ray Data chatter."""
    setup()
    _drop_pg_cleaner_crash()
    # Deprecation notices of libraries to their callers (transformers, torch, peft, Ray's own):
    # the user cannot act on them, and every worker would print each once.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name, level in RAY_DATA_CHATTER.items():
        logging.getLogger(name).setLevel(level)
    # mixray's own INFO lines in workers (rank 0's step log, exports): the driver's bar and
    # summary lines say it; warnings still come through
    logging.getLogger("mixray").setLevel(logging.WARNING)
