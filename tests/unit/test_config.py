"""Typed config: unknown keys named, overrides, every problem reported at once, validate CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mixray.cli import main
from mixray.config import apply_overrides, load_config
from mixray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {"ingest": {"sources": [{"name": "s", "path": "x.jsonl"}]}}


def test_unknown_keys_are_named_all_at_once(tmp_path):
    p = _write(tmp_path, BASE | {"embed": {"batchsize": 3, "concurrency": 0}, "colour": "red"})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "embed.batchsize: unknown key" in msg
    assert "colour: unknown key" in msg
    assert "embed.concurrency" in msg


def test_overrides_are_typed_and_validated(tmp_path):
    p = _write(tmp_path, BASE)
    cfg = load_config(p, ["embed.batch_size=512", "ingest.sources.0.limit=10", "ray.address=null",
                          "embed.num_gpus=0.5"])
    assert cfg.embed.batch_size == 512 and cfg.ingest.sources[0].limit == 10
    assert cfg.ray.address is None and cfg.embed.num_gpus == 0.5
    with pytest.raises(ConfigError, match="embed.batch_size"):
        load_config(p, ["embed.batch_size=many"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(p, ["embed.batch_size"])
    with pytest.raises(ConfigError, match="not a valid index"):
        load_config(p, ["ingest.sources.5.limit=1"])


def test_apply_overrides_creates_sections():
    raw = apply_overrides({}, ["a.b.c=[1, 2]", "a.d=true"])
    assert raw == {"a": {"b": {"c": [1, 2]}, "d": True}}


def test_stage_order_and_unique_source_names(tmp_path):
    p = _write(tmp_path, {"stages": ["embed", "ingest"], "ingest": {"sources": [
        {"name": "s", "path": "a"}, {"name": "s", "path": "b"}]}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "stages must be unique and in the order" in str(e.value)
    assert "source names must be unique" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_validate_cli_reports_problems_and_exit_codes(tmp_path, capsys):
    p = _write(tmp_path, BASE)
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "ingest.sources[s].path: x.jsonl does not exist" in err
    assert main(["validate", str(p), "embed.nope=1"]) == 2
    assert "embed.nope: unknown key" in capsys.readouterr().err


def test_shipped_configs_validate(capsys):
    """Every YAML in configs/ is a valid config (files and models exist on this machine)."""
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        assert main(["validate", str(c)]) == 0, capsys.readouterr().err
