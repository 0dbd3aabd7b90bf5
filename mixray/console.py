"""The driver's console: mixray's own log lines, one progress bar per stage, little else.

``mixray`` (``cli.main``) calls :func:`setup` once. By default the console shows:

- mixray's INFO lines (counts, timings, results), except the per-step detail of the
  algorithms (``DETAIL_LOGGERS``), which the stage's progress bar replaces;
- one progress bar per running stage (:func:`stage_bar`): units done of the total, the rate
  and the time left, fed by what the stage consumes (Ray Data's output batches, the steps
  Ray Train's rank 0 logs, the selections of a sweep). On a terminal it is a tqdm bar
  redrawn in place; in a log file (``ray job logs``, CI) one line every 30 s instead;
- warnings and errors from everywhere.

Kept off it: Ray's INFO lines and Ray Data's own progress blocks, third-party progress bars
(transformers' "Loading weights", GGUF conversion), FutureWarnings, on the driver here and
in the workers through ``mixray.distributed.runtime``; and the few lines Ray's C++ core
writes straight to this process's stderr that say nothing a user can act on
(:data:`STDERR_NOISE`, dropped by :class:`StderrFilter`). ``mixray --verbose`` shows
everything: DEBUG lines, Ray Data's progress, all of stderr. A leaf module (standard
library and tqdm).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import select
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

VERBOSE_ENV = "MIXRAY_VERBOSE"  # "1": show everything (inherited by the Ray workers' set-up)
# Read by the libraries when they are imported: set before any of them is.
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# Per-step progress of the algorithms: on the console as the stage's bar, in full with --verbose.
DETAIL_LOGGERS = ("mixray.facility", "mixray.qdit", "mixray.kmeans", "mixray.selection")
# Notices of third-party loggers that say nothing a mixray user can act on (verbose shows them):
# a local Ray turns token authentication on by itself and says so at WARNING level.
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
# Whole lines that Ray's C++ core worker writes to this process's stderr (not through Python):
# Ray Data creates every actor-pool worker with arguments passed by reference and
# max_restarts=-1, and the core worker logs that at ERROR level once per pool
# (ray-project/ray#57733): nothing is wrong, and nothing in mixray's config changes it.
STDERR_NOISE = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor "
                           rb"arguments in the object store and max_restarts > 0"),)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_PROGRESS_EVERY_S = 30.0  # a progress line in a log file at most this often

log = logging.getLogger("mixray.progress")


def verbose() -> bool:
    """Whether the console shows everything (``mixray --verbose``)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def stream():
    """Where the console writes: the real stderr, past the :class:`StderrFilter` if one is
    installed (else the current ``sys.stderr``)."""
    return StderrFilter.active.console if StderrFilter.active is not None else sys.stderr


class _BarSafeHandler(logging.Handler):
    """Log lines to the console :func:`stream` through ``tqdm.write``, so that a progress bar
    is redrawn below them instead of being cut by them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=stream())
        except Exception:  # logging must never raise
            self.handleError(record)


def setup(verbose_: bool = False) -> None:
    """Logging, third-party quieting and the verbosity the Ray workers inherit (see the module doc)."""
    if verbose_:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        warnings.filterwarnings("ignore", category=FutureWarning)
        StderrFilter.install(STDERR_NOISE)
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BarSafeHandler)]:  # a second setup()
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose_ else logging.INFO)
    for name in DETAIL_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose_ else logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose_ else logging.ERROR)


def quiet_ray_data() -> None:
    """On the driver, after ``ray.init``: Ray Data's progress blocks and INFO lines off the
    console (they stay in Ray Data's log file), unless verbose. The stages draw their own bar."""
    if verbose():
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):  # the console one; the file keeps all
            handler.setLevel(logging.WARNING)
    # the one-time notice that the progress bars are off (we switched them off)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- progress bars

class StageBar:
    """One stage's progress: ``n`` of ``total`` units, the rate and the time left.

    A tqdm bar when stderr is a terminal; otherwise (a log file) an INFO line of
    ``mixray.progress`` at most every ``LOG_PROGRESS_EVERY_S`` seconds.
    """

    def __init__(self, stage: str, total: int | None, unit: str):
        self.stage, self.total, self.unit, self.n = stage, total, unit, 0
        self._t0 = self._last = time.monotonic()
        self._bar = None
        out = stream()
        if out.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit=f" {unit}", file=out,
                             dynamic_ncols=True, mininterval=0.5, disable=False, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last >= LOG_PROGRESS_EVERY_S and self.n != self.total:
            self._last = time.monotonic()  # (done: the stage's own summary line says it)
            log.info("%s", self.line())

    def reach(self, done: int) -> None:
        """Move to ``done`` units (a counter read from elsewhere, e.g. training steps)."""
        if done > self.n:
            self.update(done - self.n)

    def line(self) -> str:
        """``embed: 120/170 rows, 12.3 rows/s, about 4 s left`` (the log-file form)."""
        secs = max(time.monotonic() - self._t0, 1e-9)
        rate = self.n / secs
        text = f"{self.stage}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}, "
        text += f"{rate:.3g} {self.unit}/s"
        if self.total and rate > 0:
            text += f", about {max(self.total - self.n, 0) / rate:.0f} s left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def stage_bar(stage: str, total: int | None, unit: str = "rows") -> Iterator[StageBar]:
    """``with stage_bar("embed", n_rows) as bar: ... bar.update(len(batch))``."""
    bar = StageBar(stage, total, unit)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def follow(bar: StageBar, done: Callable[[], int], every_s: float = 1.0) -> Iterator[StageBar]:
    """Move ``bar`` to ``done()`` every ``every_s`` seconds while the block runs (work that
    reports its progress elsewhere, e.g. the training steps rank 0 writes to its metrics file)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a half-written file: next time
                bar.reach(done())

    thread = threading.Thread(target=poll, name="mixray-progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            bar.reach(done())


# ----------------------------------------------------------------------------- stderr filter

class StderrFilter:
    """Drop whole lines matching ``patterns`` from everything written to stderr but the console.

    File descriptor 2 becomes a pipe; a thread copies every line from it to the real stderr
    except the matching ones (a partial line goes out after 0.2 s of silence). What C/C++
    code writes goes there, and so does ``sys.stderr``, where Ray prints the lines its
    workers log. The console itself (mixray's log lines, the bars) writes to ``console``, a
    duplicate of the real stderr, unfiltered and undelayed. Installed only when this process
    writes to its own stderr (not under pytest's capture), on POSIX; :meth:`close`, at exit,
    puts the real stderr back.
    """

    active: StderrFilter | None = None

    def __init__(self, patterns: tuple[re.Pattern[bytes], ...]):
        self.patterns = patterns
        self.original = os.dup(2)
        self.console = open(os.dup(self.original), "w", buffering=1,  # lives as long as the process
                            encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                            errors="backslashreplace")
        read_end, write_end = os.pipe()
        self.read_end = read_end
        sys.stderr.flush()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, name="mixray-stderr", daemon=True)
        self.thread.start()

    @classmethod
    def install(cls, patterns: tuple[re.Pattern[bytes], ...]) -> None:
        if cls.active is not None or os.name != "posix" or sys.stderr is not sys.__stderr__:
            return
        try:
            if sys.stderr.fileno() != 2:
                return
        except (AttributeError, OSError, ValueError):
            return
        cls.active = cls(patterns)
        atexit.register(cls.active.close)

    def _keep(self, line: bytes) -> bool:
        return not any(p.search(line) for p in self.patterns)

    def _pump(self) -> None:
        buf = b""
        try:
            while True:
                ready, _, _ = select.select([self.read_end], [], [], 0.2)
                if not ready:  # silence: let a partial line out
                    if buf:
                        os.write(self.original, buf)
                        buf = b""
                    continue
                chunk = os.read(self.read_end, 1 << 16)
                if not chunk:
                    break
                *lines, buf = (buf + chunk).split(b"\n")
                kept = [line + b"\n" for line in lines if self._keep(line)]
                if kept:
                    os.write(self.original, b"".join(kept))
        except OSError:
            pass
        if buf:
            with contextlib.suppress(OSError):
                os.write(self.original, buf)

    def close(self) -> None:
        """Put the real stderr back on descriptor 2 and let the pump copy what is left."""
        for f in (sys.stderr, self.console):
            with contextlib.suppress(Exception):
                f.flush()
        os.dup2(self.original, 2)  # closes the pipe's write end: the pump reads to its end
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self.read_end)
        StderrFilter.active = None
