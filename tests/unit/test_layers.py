"""The layering rule of DESIGN.md, checked in a fresh interpreter."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import mixray.algorithms


def test_algorithms_are_pure():
    """Every module of mixray.algorithms imports without pulling in ray or mixray's upper layers."""
    mods = [f"mixray.algorithms.{m.name}" for m in pkgutil.iter_modules(mixray.algorithms.__path__)]
    assert mods, "no algorithm modules found"
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')"
        " or m.startswith(('mixray.distributed', 'mixray.stages', 'mixray.cli', 'mixray.io')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"algorithms import upper layers: {out.stdout}"


def test_help_is_light():
    """`mixray --help` imports neither ray nor torch (heavy imports live in subcommands)."""
    code = (
        "import sys\nfrom mixray.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY=' + ','.join(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="
