"""The layering rule of DESIGN.md, checked over the AST of every module of mixray.

Every ``import`` and ``from ... import`` counts, at module level or inside a
function (the lazy imports that keep ``mixray --help`` light are imports too).
The rules:

- ``mixray.algorithms`` imports only the standard library, numpy, scipy, torch,
  scikit-learn, numba, ``mixray.algorithms``, ``mixray.errors`` and ``mixray.choices``;
- ``mixray.errors`` and ``mixray.choices`` are leaves (import nothing of mixray);
- ``mixray.models`` never imports ray, nor the layers above it;
- ``mixray.distributed`` and ``mixray.training`` never import ``mixray.stages``;
- nothing imports ``mixray.cli`` (the entry point is the top).

Plus: no function in ``mixray/`` is longer than 60 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "mixray"
MAX_FUNCTION_LINES = 60
ALGORITHM_DEPS = {"numpy", "scipy", "torch", "sklearn", "numba"}  # numba: the fused gain kernels
ALGORITHM_MIXRAY = ("mixray.algorithms", "mixray.errors", "mixray.choices")
UPPER_THAN_MODELS = ("mixray.distributed", "mixray.training", "mixray.stages", "mixray.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(module: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """``(dotted target, line)`` for every import in ``source``, anywhere in the tree.

    ``from a.b import c`` yields ``a.b.c`` (c may be a module or a name in a.b: both
    start with ``a.b``); relative imports are resolved against ``module``.
    """
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno)
                    for alias in node.names]
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The layer rules broken by ``module`` (empty when it is clean)."""
    bad = []
    for target, line in imported_names(module, source, is_package):
        top = target.split(".")[0]
        rule = None
        if module.startswith("mixray.algorithms"):
            ok = (top in sys.stdlib_module_names or top in ALGORITHM_DEPS
                  or target.startswith(ALGORITHM_MIXRAY))
            rule = None if ok else "algorithms import only stdlib/numpy/scipy/torch/sklearn/numba/" \
                                   "mixray.algorithms/errors/choices"
        elif module in ("mixray.errors", "mixray.choices") and top == "mixray":
            rule = "errors and choices are leaves"
        elif module.startswith("mixray.models") and (top == "ray" or target.startswith(UPPER_THAN_MODELS)):
            rule = "models never import ray or the layers above them"
        elif module.startswith(("mixray.distributed", "mixray.training")) and \
                target.startswith("mixray.stages"):
            rule = "distributed and training never import stages"
        if rule is None and target.startswith("mixray.cli") and module != "mixray.cli":
            rule = "nothing imports the CLI"
        if rule:
            bad.append(f"{module}:{line} imports {target}: {rule}")
    return bad


def all_modules() -> list[tuple[str, Path]]:
    return [(module_name(p), p) for p in sorted(ROOT.rglob("*.py"))]


def test_every_module_keeps_the_layer_rules():
    modules = all_modules()
    assert any(m == "mixray.algorithms.qdit" for m, _ in modules)
    bad = [v for m, p in modules
           for v in violations(m, p.read_text(encoding="utf-8"), p.name == "__init__.py")]
    assert not bad, "layer rules broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, broken", [
    ("mixray.algorithms.x", "def f():\n    import ray\n", "algorithms import only"),
    ("mixray.algorithms.x", "from mixray.io.rundir import write_table\n", "algorithms import only"),
    ("mixray.algorithms.x", "from mixray import config\n", "algorithms import only"),
    ("mixray.algorithms.facility.x", "from ..qdit import QDITSelector\nfrom ...stages import s\n",
     "algorithms import only"),
    ("mixray.models.x", "def load():\n    from ray import data\n", "models never import ray"),
    ("mixray.distributed.x", "def f():\n    from mixray.stages.select import SELECTION\n",
     "never import stages"),
    ("mixray.training.x", "from mixray.stages import train\n", "never import stages"),
    ("mixray.stages.x", "from mixray.cli import main\n", "nothing imports the CLI"),
    ("mixray.errors", "from mixray.choices import STAGES\n", "leaves"),
])
def test_the_checker_catches_each_kind_of_violation(module, source, broken):
    found = violations(module, source)
    assert len(found) >= 1 and broken in found[0]
    if module.startswith("mixray.algorithms.facility"):  # relative: ..qdit is fine, ...stages is not
        assert len(found) == 1 and "mixray.stages.s" in found[0]


def test_clean_imports_pass():
    src = ("from __future__ import annotations\nimport math\nimport numpy as np\n"
           "from sklearn.base import BaseEstimator\nfrom mixray.errors import InputError\n"
           "from . import kernels\nfrom .cache import SparseRows\n")
    assert violations("mixray.algorithms.facility.shard", src) == []


def function_lengths() -> list[tuple[int, str]]:
    """(lines, where) of every function and method in mixray, ``def`` line to last line."""
    out = []
    for module, path in all_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((node.end_lineno - node.lineno + 1, f"{module}:{node.lineno} {node.name}"))
    return out


def test_no_function_is_longer_than_60_lines():
    long = sorted((f for f in function_lengths() if f[0] > MAX_FUNCTION_LINES), reverse=True)
    assert not long, "functions over 60 lines:\n" + "\n".join(f"{n} {w}" for n, w in long)


def test_no_algorithm_or_selection_kmeans_function_is_longer_than_60_lines():
    scope = ("mixray.algorithms", "mixray.distributed.selection", "mixray.distributed.kmeans")
    long = [f for f in function_lengths() if f[0] > MAX_FUNCTION_LINES and f[1].startswith(scope)]
    assert not long, "functions over 60 lines:\n" + "\n".join(f"{n} {w}" for n, w in long)


def test_help_is_light():
    """`mixray --help` imports neither ray nor torch (heavy imports live in subcommands)."""
    code = (
        "import sys\nfrom mixray.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY=' + ','.join(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


def test_public_api_is_lazy():
    """`import mixray` is light; `mixray.QDITSelector` & co. import their module on first use."""
    code = (
        "import sys, mixray\n"
        "light = not any(m in sys.modules for m in ('torch', 'ray', 'sklearn'))\n"
        "from mixray import QDITSelector, KMeans, DistributedKMeans, evaluate_ranking, plan_mixes\n"
        "from mixray.algorithms.qdit import QDITSelector as Q\n"
        "print(light, QDITSelector is Q, 'ray' in sys.modules, 'QDITSelector' in dir(mixray))\n"
        "try:\n    mixray.NoSuchThing\nexcept AttributeError as e:\n    print('AttributeError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "True True False True"  # DistributedKMeans imports ray only when it fits
    assert lines[1] == "AttributeError module 'mixray' has no attribute 'NoSuchThing'"
