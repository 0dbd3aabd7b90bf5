"""One mixray process per run directory: an advisory lock that names its holder.

``<run_dir>/.mixray.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking)
for as long as a command works on the run directory, and holds a JSON record of
the holder: pid, host, command, since when. A second invocation fails at once
with a :class:`~mixray.errors.RunDirLockedError` naming that holder. The kernel
drops a flock when its process dies, however it dies, so a lock left by a killed
run is free: the next run takes it over and logs whose it was.

Locks are re-entrant within one process (``run`` holding it while a stage runs).
On network file systems without ``flock`` support the lock is best effort.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mixray.errors import ConfigError, RunDirLockedError

log = logging.getLogger("mixray.lock")

LOCK_NAME = ".mixray.lock"
_held: dict[Path, int] = {}  # run dir -> depth, for this process


def _holder_text(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('since', '?')} ({info.get('command', '?')})")


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16).decode("utf-8", "replace")
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _write_info(fd: int, command: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)


def _open(run_dir: Path) -> int:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} exists and is not a directory", where="run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot use {run_dir} as the run directory: {e.strerror}",
                          where="run_dir") from None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, command: str | None = None) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body; raise RunDirLockedError if another process has it."""
    run_dir = Path(run_dir).resolve()
    if _held.get(run_dir):
        _held[run_dir] += 1
        try:
            yield
        finally:
            _held[run_dir] -= 1
        return
    fd = _open(run_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLockedError(
                f"{run_dir} is in use by another mixray: {_holder_text(_read_info(fd))}; wait for it "
                "or use another run_dir", where="run_dir") from None
        previous = _read_info(fd)
        if previous.get("pid"):
            log.warning("run dir %s: taking over the lock of %s, which ended without releasing it",
                        run_dir, _holder_text(previous))
        _write_info(fd, command or " ".join(["mixray", *sys.argv[1:]]))
        _held[run_dir] = 1
        try:
            yield
        finally:
            _held.pop(run_dir, None)
            os.ftruncate(fd, 0)  # released cleanly: nothing to take over
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
