"""The train stage's driver side: which rows it trains on, and every user error, before Ray starts."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from train_data import make_run_dir, write_stage_output

from mixray.algorithms.sampling import CONFIDENT, UNCONFIDENT, UNPAIRED
from mixray.config import TrainConfig
from mixray.errors import ConfigError, InputError
from mixray.stages.train import (
    build_training_rows,
    check_lora_targets,
    plan_job,
)
from mixray.training.metrics import plot_loss_curves, read_metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("train-unit"))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.model_validate({"model": "SmolLM2-135M-Instruct", "num_workers": 2, **kw})


def test_auto_picks_the_latest_selection_and_sources_resolve(run_dir):
    t, inputs, counts = build_training_rows(_cfg(data="auto", loss="mdit"), run_dir)
    assert counts == {"source": "cluster", "rows": 28, "originals": 18, "mixes": 10}
    assert set(inputs) == {"examples", "selection"}
    mixes = t.filter(t.column("is_mix"))
    assert mixes.column("id").to_pylist()[:2] == ["mix/0", "mix/1"]
    assert mixes.column("b_id").to_pylist()[0] == "gsm8k/0"
    assert mixes.column("output_b").to_pylist()[0].endswith("#### 18")  # the real GSM8K answer
    t, _, counts = build_training_rows(_cfg(data="select"), run_dir)
    sel = pq.read_table(run_dir / "select" / "selection.parquet").sort_by("rank")
    assert t.column("id").to_pylist() == sel.column("id").to_pylist()  # in rank order
    assert (t.column("group").to_numpy() == UNPAIRED).all() and counts["mixes"] == 0
    t, _, counts = build_training_rows(_cfg(data="all"), run_dir)
    assert counts["rows"] == 48


def test_mdit_on_all_or_select_takes_plan_mixes_whose_ends_are_in_the_set(run_dir):
    _, inputs, counts = build_training_rows(_cfg(data="all", loss="mdit"), run_dir)
    assert counts["mixes"] == 14 and "mix_plan" in inputs
    t, _, counts = build_training_rows(_cfg(data="select", loss="mdit"), run_dir)
    have = set(t.filter(pa.compute.invert(t.column("is_mix"))).column("id").to_pylist())
    m = t.filter(t.column("is_mix"))
    assert 0 < m.num_rows < 14
    assert all(a in have and b in have for a, b in zip(m.column("a_id").to_pylist(), m.column("b_id").to_pylist(),
                                                        strict=True))


def test_sftmix_split_from_file_column_and_split_strings(run_dir, tmp_path):
    conf = run_dir.parent / "confidence.parquet"
    t, inputs, counts = build_training_rows(_cfg(loss="sftmix", data="all", sftmix={"confidence": str(conf)}),
                                            run_dir)
    assert counts["confident"] == 24 and counts["unconfident"] == 24 and "confidence" in inputs
    c = pq.read_table(conf)
    by_id = dict(zip(c.column("id").to_pylist(), c.column("confidence").to_pylist(), strict=True))
    g = t.column("group").to_numpy()
    vals = np.array([by_id[i] for i in t.column("id").to_pylist()])
    assert vals[g == CONFIDENT].min() >= vals[g == UNCONFIDENT].max()  # the median split
    # a numeric column of the examples, split at the median of the training rows (odd: extra unconfident)
    t, _, counts = build_training_rows(_cfg(loss="sftmix", data="select", sftmix={"confidence": "quality"}), run_dir)
    assert counts["confident"] == 12 and counts["unconfident"] == 12
    # an explicit split file
    ids = pq.read_table(run_dir / "ingest" / "examples.parquet", columns=["id"]).column("id").to_pylist()
    split = tmp_path / "split.parquet"
    pq.write_table(pa.table({"id": ids, "split": ["confident" if i % 3 == 0 else "unconfident"
                                                  for i in range(len(ids))]}), split)
    _, _, counts = build_training_rows(_cfg(loss="sftmix", data="all", sftmix={"confidence": str(split)}), run_dir)
    assert counts["confident"] == 16 and counts["unconfident"] == 32
    pq.write_table(pa.table({"id": ids, "split": ["sure"] * len(ids)}), split)
    with pytest.raises(InputError, match="'confident' or 'unconfident'"):
        build_training_rows(_cfg(loss="sftmix", data="all", sftmix={"confidence": str(split)}), run_dir)


def test_sftmix_without_a_split_is_a_clear_error(run_dir):
    with pytest.raises(InputError, match="sftmix needs a confident/unconfident split"):
        plan_job(_cfg(loss="sftmix", data="all"), run_dir)
    with pytest.raises(InputError, match="neither a column"):
        plan_job(_cfg(loss="sftmix", data="all", sftmix={"confidence": "nope"}), run_dir)


def test_mdit_without_a_mix_plan_is_a_clear_error(run_dir, tmp_path):
    bare = make_run_dir(tmp_path)
    (bare / "mix" / "manifest.json").unlink()
    with pytest.raises(InputError, match="mdit needs a mix plan"):
        plan_job(_cfg(loss="mdit", data="select"), bare)
    with pytest.raises(InputError, match="mix_plan: .* not found"):
        plan_job(_cfg(loss="mdit", data="all", mdit={"mix_plan": str(tmp_path / "none.parquet")}), run_dir)


def test_cluster_mixes_need_the_mdit_loss(run_dir):
    with pytest.raises(ConfigError, match="10 mixed samples.*only train.loss=mdit"):
        plan_job(_cfg(loss="ntp", data="cluster"), run_dir)


def test_empty_or_too_small_training_set(run_dir, tmp_path):
    empty = make_run_dir(tmp_path)
    write_stage_output(empty, "select", "selection.parquet",
                       pa.table({"id": pa.array([], pa.string()), "rank": pa.array([], pa.int64())}))
    with pytest.raises(InputError, match="training set is empty"):
        plan_job(_cfg(data="select"), empty)
    with pytest.raises(InputError, match="too few for one optimizer step"):
        plan_job(_cfg(data="select", micro_batch_size=8, grad_accum=2), run_dir)


def test_unknown_selection_ids_name_the_file(run_dir, tmp_path):
    bad = make_run_dir(tmp_path)
    write_stage_output(bad, "select", "selection.parquet", pa.table({"id": ["sharegpt/0", "ghost/1"], "rank": [0, 1]}))
    with pytest.raises(InputError, match=r"select/selection.parquet: 1 id\(s\) are not in"):
        plan_job(_cfg(data="select"), bad)


def test_missing_model_path(run_dir, tmp_path):
    with pytest.raises(InputError, match="train.model: .* not an existing directory"):
        plan_job(_cfg(model=str(tmp_path / "no-model")), run_dir)


def test_workers_get_the_alias_not_the_drivers_cache_path(run_dir, tiny_lm_dir, tmp_path, monkeypatch):
    """An offline alias travels as written (each worker resolves it on its own node); a model
    directory travels as an absolute path (workers do not share the driver's cwd)."""
    job = plan_job(_cfg(data="all"), run_dir)
    job.model_path = "/driver/cache/models/SmolLM2-135M-Instruct.v2"  # what resolve_job would set
    assert job.loop_config(tmp_path, tmp_path)["model_path"] == "SmolLM2-135M-Instruct"
    monkeypatch.chdir(tiny_lm_dir.parent)
    job = plan_job(_cfg(model=tiny_lm_dir.name, data="all"), run_dir)
    assert job.loop_config(tmp_path, tmp_path)["model_path"] == str(tiny_lm_dir.resolve())


def test_lora_target_the_model_lacks(tiny_lm_dir):
    check_lora_targets(str(tiny_lm_dir), ["q_proj", "v_proj", "down_proj"])
    with pytest.raises(ConfigError, match=r"\['c_attn'\] are not modules.*linear layers are \[.*'q_proj'"):
        check_lora_targets(str(tiny_lm_dir), ["q_proj", "c_attn"])


def test_batch_sizes_that_do_not_divide():
    with pytest.raises(ValidationError, match="must be even"):
        _cfg(loss="sftmix", micro_batch_size=3)
    with pytest.raises(ValidationError, match="not a multiple of micro_batch_size × num_workers"):
        _cfg(micro_batch_size=4, global_batch_size=20)
    with pytest.raises(ValidationError, match="offload_params needs stage 3"):
        _cfg(deepspeed={"stage": 2, "offload_params": True})


def test_presets_fill_only_unset_keys():
    c = TrainConfig(preset="sftmix")
    assert (c.loss, c.lr, c.weight_decay, c.warmup_ratio, c.micro_batch_size, c.accumulation, c.epochs,
            c.sftmix.mu, c.sftmix.alpha) == ("sftmix", 2e-6, 0.1, 0.1, 8, 4, 3, 0.2, 0.5)
    c = TrainConfig(preset="mdit", lr=1e-4, num_workers=2, micro_batch_size=4)
    assert (c.loss, c.lr, c.epochs, c.global_batch_size, c.accumulation) == ("mdit", 1e-4, 3, 16, 2)


def test_metrics_curve_keeps_the_last_attempt_and_plots(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("step,attempt,epoch,loss,ntp,mix,lr,grad_norm,tokens,tokens_per_s,step_time_s,examples,time\n"
                 "1,0,0,3.0,3.0,0,1e-3,1,10,5,1,4,0\n2,0,0,2.5,2.5,0,1e-3,1,10,5,1,4,0\n3,0,0,2.2,2.2,0,1e-3,1,10,5,1,4,0\n"
                 "3,1,0,2.1,2.1,0,1e-3,1,10,5,1,4,0\n4,1,0,2.0,2.0,0,1e-3,1,10,5,1,4,0\n")
    m = read_metrics(p)
    assert [r["step"] for r in m] == [1, 2, 3, 4] and [r["loss"] for r in m] == [3.0, 2.5, 2.1, 2.0]
    out = tmp_path / "loss.png"
    plot_loss_curves(m, out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(m[-1]["tokens"])


def test_loss_plot_smooths_marks_epochs_and_shows_a_single_step(tmp_path):
    from PIL import Image

    from mixray.training.metrics import epoch_starts, smooth

    assert smooth([2.0, 4.0], 0.5) == pytest.approx([2.0, (0.5 * 1.0 + 2.0) / 0.75])
    rows = [{"step": s, "epoch": e} for s, e in ((1, 0), (2, 0), (3, 1), (4, 1), (5, 2))]
    assert epoch_starts(rows) == [2.5, 4.5]
    one = [{"step": 1.0, "epoch": 0.0, "loss": 2.0, "ntp": 2.0, "mix": 0.0, "lr": 1e-3}]
    out = tmp_path / "one.png"
    plot_loss_curves(one, out, "1 step")
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # the loss marker (matplotlib's C0 blue) is drawn in the middle of the loss axes (the single
    # point is centred), not only in the legend
    blue = (img[..., 2] - img[..., 0] > 60) & (img[..., 2] > 150)
    h, w = blue.shape
    assert blue[int(0.25 * h):int(0.45 * h), int(0.45 * w):int(0.6 * w)].sum() > 10


def test_worker_resources_and_precision_name_the_section_they_read(monkeypatch):
    """One rule for train and the LM-Mixup GRPO stage: auto precision and GPUs, placement on a
    local Ray checked at once, and the error names the section's own keys."""
    import ray

    from mixray.config import LMGRPOSettings, RayConfig
    from mixray.stages.train import resolve_precision, worker_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    grpo = LMGRPOSettings(num_workers=2)
    assert worker_resources(grpo, RayConfig(), "lmmixup.grpo") == (False, {"CPU": 1.0})
    assert resolve_precision("auto", False, "lmmixup.grpo") == "fp32"
    assert resolve_precision("auto", True) == "bf16" and resolve_precision("bf16", False) == "bf16"
    with pytest.raises(ConfigError, match=r"lmmixup\.grpo: 3 workers × CPU=1.0 need 3 CPU.*lower lmmixup\.grpo\.num_workers"):
        worker_resources(LMGRPOSettings(num_workers=3), RayConfig(), "lmmixup.grpo")
    with pytest.raises(ConfigError, match=r"^train\.resources_per_worker asks for GPUs but train\.use_gpu is false"):
        worker_resources(TrainConfig(use_gpu=False, resources_per_worker={"CPU": 1, "GPU": 1}), RayConfig())
    with pytest.raises(ConfigError, match=r"^train\.precision=fp16 needs GPUs"):
        resolve_precision("fp16", False)
    assert worker_resources(grpo, RayConfig(address="auto"), "lmmixup.grpo")[1] == {"CPU": 1.0}  # a cluster may scale
