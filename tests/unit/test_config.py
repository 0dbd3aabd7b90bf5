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


@pytest.mark.parametrize(("override", "key"), [
    ("select.k=true", "select.k"), ("select.k=1.0", "select.k"), ("select.k='5'", "select.k"),
    ("train.lr=true", "train.lr"), ("embed.normalize=1", "embed.normalize"),
    ("embed.normalize=yes_please", "embed.normalize"), ("train.use_gpu=0", "train.use_gpu"),
    ("train.adam_betas=[true, 0.9]", "train.adam_betas"), ("seed=false", "seed"),
])
def test_config_numbers_and_booleans_are_strict(tmp_path, override, key):
    """Issue 11: select.k=true was accepted as 1."""
    p = _write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    assert key in str(e.value) and "got" in str(e.value), str(e.value)


def test_config_strictness_keeps_what_yaml_writes_naturally(tmp_path):
    p = _write(tmp_path, BASE | {"train": {"lr": 1, "adam_betas": [0.9, 1]},
                                 "mix": {"pairs": [["a", "b"]]}, "select": {"alpha": [0, 1]}})
    cfg = load_config(p, ["embed.num_gpus=1", "train.use_gpu=true"])
    assert cfg.train.lr == 1.0 and cfg.train.adam_betas == (0.9, 1.0)
    assert cfg.mix.pairs == [("a", "b")] and cfg.select.alphas == [0.0, 1.0]
    assert cfg.embed.num_gpus == 1.0 and cfg.train.use_gpu is True


def test_duplicate_yaml_keys_are_rejected_with_key_and_line(tmp_path):
    """Issue 11: duplicate keys were accepted (the last won)."""
    p = tmp_path / "d.yaml"
    p.write_text("ingest:\n  sources:\n    - name: s\n      path: x.jsonl\n"
                 "select:\n  k: 10\n  alpha: 0.5\n  k: 20\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "duplicate key 'k'" in str(e.value) and f"{p}:8" in str(e.value), str(e.value)
    p.write_text("seed: 1\nseed: 2\ningest: {sources: [{name: s, path: x.jsonl}]}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seed'.*:2"):
        load_config(p)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(_write(tmp_path, BASE), ["ingest.sources.0.fields={a: 1, a: 2}"])


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("x-pool: &pool {batch_size: 8, concurrency: 1}\n"
                 "ingest: {sources: [{name: s, path: x.jsonl}]}\n"
                 "embed:\n  <<: *pool\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match="x-pool: unknown key"):  # merge works; x-pool is unknown
        load_config(p)


def test_a_boolean_is_not_a_zero_stage(tmp_path):
    """Strict mode alone maps true onto Literal[0, 1, 2, 3]'s 1."""
    with pytest.raises(ConfigError, match=r"train.deepspeed.stage: .*boolean.*got true"):
        load_config(_write(tmp_path, BASE), ["train.deepspeed.stage=true"])
    assert load_config(_write(tmp_path, BASE), ["train.deepspeed.stage=3"]).train.deepspeed.stage == 3
