"""A fresh clone with nothing beside it: no test or shipped config reads outside the repository,
and the default tiers never skip (missing data or tools fail instead)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what would reach beside the repository, and what would turn a missing input into a skip
OUTSIDE = re.compile(r"\.\./shared|parents\[2\]\s*/\s*[\"']shared|\.parent\s*/\s*[\"']shared[\"']")
SKIP = re.compile(r"pytest\.skip\(|importorskip\(|mark\.skipif|mark\.skip\b")


def _files() -> list[Path]:
    files = [p for p in (ROOT / "tests").rglob("*.py") if p != Path(__file__).resolve()]
    files += sorted((ROOT / "configs").rglob("*.yaml")) + [ROOT / "Makefile"]
    return files


@pytest.mark.parametrize("pattern, what", [(OUTSIDE, "reads beside the repository"),
                                           (SKIP, "skips instead of failing")],
                         ids=["outside", "skips"])
def test_nothing_reads_beside_the_repository_or_skips(pattern, what):
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
                 for p in _files() if p.suffix in (".py", ".yaml") or p.name == "Makefile"
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line) and (pattern is OUTSIDE or p.suffix == ".py")]
    assert not offenders, f"{what}:\n" + "\n".join(offenders)


def test_the_data_packages_are_what_make_installs():
    """tests/packaged_data.py reads only packages pinned in requirements/offline-models.txt."""
    from packaged_data import FILES

    pinned = {line.split("==")[0].strip().lower()
              for line in (ROOT / "requirements" / "offline-models.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert {dist for dist, _ in FILES.values()} <= pinned
