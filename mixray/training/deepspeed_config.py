"""The DeepSpeed config, built from mixray's training settings (pure: dicts in, dict out).

``build_deepspeed_config(cfg)`` takes the plain dict the training loop gets
(keys below) and returns the JSON-able dict ``deepspeed.initialize`` reads:

    zero_stage 0|1|2|3, offload_optimizer, offload_params, precision fp32|bf16|fp16,
    micro_batch_size, grad_accum, world_size, max_grad_norm,
    lr, weight_decay, adam_betas, adam_eps, on_gpu, template (dict | None)

A ``template`` (a file of ``configs/deepspeed/``) is merged over the generated
config: its values win, except the string ``"auto"``, which takes the
generated value. The batch-size keys must agree with mixray's own settings
(DeepSpeed would assert later with a less helpful message). Settings that
cannot work together raise ``TrainingConfigError`` (a ``ValueError``), whose
message names the setting.

The optimizer: without offload the training loop passes a torch ``AdamW``
(no DeepSpeed op to compile); with an offloaded optimizer (from the settings
or the template) the config names ``AdamW`` so DeepSpeed uses its CPU Adam
(compiled on first use, cached in ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mixray.errors import TrainingConfigError

_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def build_deepspeed_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """mixray training settings -> DeepSpeed config dict (see the module docstring for keys)."""
    stage = int(cfg["zero_stage"])
    if stage not in (0, 1, 2, 3):
        raise TrainingConfigError(f"zero_stage must be 0, 1, 2 or 3, got {stage}")
    if cfg.get("offload_params") and stage != 3:
        raise TrainingConfigError(f"offload_params needs ZeRO stage 3, got {stage}")
    if cfg.get("offload_optimizer") and stage == 0:
        raise TrainingConfigError("offload_optimizer needs ZeRO stage 1, 2 or 3")
    precision = cfg.get("precision", "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise TrainingConfigError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and not cfg.get("on_gpu"):
        raise TrainingConfigError("fp16 training needs a GPU (DeepSpeed's fp16 loss scaling is CUDA-only); use bf16 or fp32")
    micro, gas, world = int(cfg["micro_batch_size"]), int(cfg["grad_accum"]), int(cfg["world_size"])
    pin = bool(cfg.get("on_gpu"))

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero |= {"contiguous_gradients": True, "overlap_comm": pin, "reduce_scatter": True,
                 "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": True,
                 "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5}
    if cfg.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.get("offload_params"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": float(cfg.get("max_grad_norm", 1.0)),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # a torch AdamW passed by the loop
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    template = cfg.get("template")
    if template:
        ds = _merge_template(ds, template)
    if "offload_optimizer" in ds["zero_optimization"] and "optimizer" not in ds:
        # offloaded optimizer states: DeepSpeed builds its CPU AdamW from these settings
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": float(cfg["lr"]), "weight_decay": float(cfg.get("weight_decay", 0.0)),
            "betas": list(cfg.get("adam_betas", (0.9, 0.999))), "eps": float(cfg.get("adam_eps", 1e-8))}}
    return ds


def _merge_template(generated: dict[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(generated)
    for key in _BATCH_KEYS:
        if key in template and template[key] != "auto" and template[key] != generated[key]:
            raise TrainingConfigError(
                f"DeepSpeed template sets {key}={template[key]!r}, but the training settings give "
                f"{generated[key]}; use \"auto\" or change train.micro_batch_size / grad_accum / num_workers")
    stage = template.get("zero_optimization", {}).get("stage", "auto")
    if stage != "auto" and stage != generated["zero_optimization"]["stage"]:
        raise TrainingConfigError(f"DeepSpeed template sets zero_optimization.stage={stage}, but "
                         f"train.deepspeed.stage is {generated['zero_optimization']['stage']}")
    _merge(out, template)
    return out


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if v == "auto":
            continue
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
