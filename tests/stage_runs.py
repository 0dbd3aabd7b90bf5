"""Run one stage from config sections, as `mixray <stage>` would (tests' shorthand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixray.config import RunConfig
from mixray.stages import run_stage

# a stage other than ingest never reads the sources: any placeholder validates
PLACEHOLDER_INGEST = {"sources": [{"name": "unused", "path": "unused.jsonl"}]}


def run_config(seed: int = 0, **sections: Any) -> RunConfig:
    """A RunConfig from sections given as models or dicts (``select=SelectConfig(k=3)``)."""
    raw: dict[str, Any] = {"seed": seed, "ingest": PLACEHOLDER_INGEST}
    for name, section in sections.items():
        raw[name] = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return RunConfig.model_validate(raw)


def run(stage: str, run_dir: Path, *, seed: int = 0, force: bool = False, **sections: Any) -> dict:
    """Run (or skip) ``stage`` on ``run_dir``; returns its manifest (+ ``skipped``)."""
    return run_stage(stage, run_config(seed, **sections), Path(run_dir), force)
