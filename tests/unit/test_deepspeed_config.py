"""build_deepspeed_config: the stage/offload/precision/batch keys DeepSpeed reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixray.errors import TrainingConfigError
from mixray.training.deepspeed_config import build_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]


def _s(**kw):
    base = {"zero_stage": 2, "micro_batch_size": 4, "grad_accum": 8, "world_size": 2, "precision": "fp32",
            "max_grad_norm": 1.0, "lr": 2e-5, "weight_decay": 0.1, "adam_betas": [0.9, 0.95],
            "adam_eps": 1e-8, "on_gpu": False}
    return base | kw


def test_batch_keys_clipping_and_precision():
    ds = build_deepspeed_config(_s())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 8, 64)
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": False} and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2 and "optimizer" not in ds  # the loop passes torch AdamW
    assert build_deepspeed_config(_s(precision="bf16"))["bf16"] == {"enabled": True}
    assert build_deepspeed_config(_s(precision="fp16", on_gpu=True))["fp16"]["enabled"] is True
    with pytest.raises(TrainingConfigError, match="fp16 training needs a GPU"):
        build_deepspeed_config(_s(precision="fp16"))


def test_stages_and_offload():
    assert build_deepspeed_config(_s(zero_stage=0))["zero_optimization"] == {"stage": 0}
    z3 = build_deepspeed_config(_s(zero_stage=3, offload_optimizer=True, offload_params=True))
    zo = z3["zero_optimization"]
    assert zo["stage"] == 3 and zo["stage3_gather_16bit_weights_on_model_save"] is True
    assert zo["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zo["offload_param"] == {"device": "cpu", "pin_memory": False}
    # offloaded optimizer states: DeepSpeed builds its CPU AdamW from these settings
    assert z3["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.1,
                                                           "betas": [0.9, 0.95], "eps": 1e-8}}
    assert build_deepspeed_config(_s(offload_optimizer=True, on_gpu=True))["zero_optimization"][
        "offload_optimizer"]["pin_memory"] is True
    with pytest.raises(TrainingConfigError, match="offload_params needs ZeRO stage 3"):
        build_deepspeed_config(_s(offload_params=True))
    with pytest.raises(TrainingConfigError, match="offload_optimizer needs ZeRO stage 1, 2 or 3"):
        build_deepspeed_config(_s(zero_stage=0, offload_optimizer=True))
    with pytest.raises(TrainingConfigError, match="zero_stage must be"):
        build_deepspeed_config(_s(zero_stage=4))


def test_templates_merge_with_auto_and_reject_conflicting_batches():
    tmpl = {"train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": "auto", "overlap_comm": True, "reduce_bucket_size": 1e7},
            "bf16": {"enabled": "auto"}, "activation_checkpointing": {"partition_activations": True}}
    ds = build_deepspeed_config(_s(template=tmpl))
    assert ds["zero_optimization"]["stage"] == 2  # "auto" keeps the generated value
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["reduce_bucket_size"] == 1e7
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["train_batch_size"] == 64
    with pytest.raises(TrainingConfigError, match="train_batch_size=32, but the training settings give 64"):
        build_deepspeed_config(_s(template={"train_batch_size": 32}))


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"])
def test_shipped_templates_build(name):
    tmpl = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
    stage = tmpl["zero_optimization"]["stage"]
    ds = build_deepspeed_config(_s(zero_stage=stage, template=tmpl,
                                   offload_optimizer="offload" in name, offload_params="zero3_offload" in name))
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 64


def test_template_stage_must_agree_and_template_offload_gets_an_optimizer():
    with pytest.raises(TrainingConfigError, match="zero_optimization.stage=3, but train.deepspeed.stage is 2"):
        build_deepspeed_config(_s(template={"zero_optimization": {"stage": 3}}))
    ds = build_deepspeed_config(_s(template={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    assert ds["optimizer"]["type"] == "AdamW"
