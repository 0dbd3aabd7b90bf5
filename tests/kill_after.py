"""Run the `mixray` CLI and SIGKILL it right after the n-th call of a function returns.

    python tests/kill_after.py MODULE:ATTR[.ATTR] N -- <mixray arguments>

e.g. ``kill_after.py mixray.io.rundir:_fsync 2 -- score run.yaml`` dies after the second
output of a stage is flushed and before it is renamed into place. The signal is a real
SIGKILL to this process: no ``finally``, no ``atexit``, no flush; the kernel drops the
run directory's lock and Ray's fate sharing ends what this driver started. A test
(tests/integration/test_faults.py) then checks what the rerun makes of what is left.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys

KILLED_AT = "kill_after: SIGKILL now"


def arm(target: str, n: int) -> None:
    """Wrap ``target`` so that the process kills itself after its n-th call returns."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real = getattr(owner, name)
    calls = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            print(KILLED_AT, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    target, n = argv[:sep]
    arm(target, int(n))
    from mixray.cli import main as mixray_main

    return mixray_main(argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
