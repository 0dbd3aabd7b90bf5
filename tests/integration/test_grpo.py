"""LM-Mixup's GRPO: TRL's GRPOTrainer in 2 Ray Train workers under DeepSpeed ZeRO-2, tiny model.

The tiny random Llama is first taught (a few plain torch steps, in this process) to emit
two distillations of the required format, one per prompt, so sampling at temperature 1
gives a mix of well- and ill-formed completions: the rewards vary within a group, the
advantages are not all zero, and a GRPO step must move the weights.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from lmmixup_data import CLUSTERS, TARGETS, taught_distiller
from safetensors.torch import load_file

from mixray.algorithms.lmmixup import distill_messages
from mixray.algorithms.lmmixup_rewards import transition_matrix
from mixray.training.grpo import GRPO_COLUMNS, grpo_deepspeed_config, grpo_loop_per_worker
from mixray.training.loop import fit


@pytest.mark.parametrize("workers, zero", [(2, 2), (2, 3), (1, None)], ids=["zero2", "zero3", "one-worker"])
def test_grpo_step(ray_session, tiny_lm_dir, tmp_path, workers, zero):
    """2 workers under ZeRO-2 (the recipe) or ZeRO-3, or one worker without DeepSpeed (which
    runs undistributed: ``_single_process``)."""
    from mixray.models.registry import resolve_model

    model_dir = taught_distiller(tiny_lm_dir, tmp_path / "distiller")
    rng = np.random.default_rng(0)
    lib = rng.normal(size=(40, 384)).astype(np.float32)
    lib /= np.linalg.norm(lib, axis=1, keepdims=True)
    classes = rng.integers(0, 6, size=40)
    np.savez(tmp_path / "library.npz", embeddings=lib, classes=classes, T=transition_matrix(lib, classes, 4))
    prompts = [{"prompt": distill_messages(m), "reference": f"Q: {q}\nA: {a}"}
               for m, (q, a) in zip(CLUSTERS, TARGETS, strict=True)] * 4
    config = {
        "model_path": str(model_dir), "encoder_path": resolve_model("all-MiniLM-L6-v2"),
        "library_path": str(tmp_path / "library.npz"), "output_dir": str(tmp_path / "out"),
        "export_dir": str(tmp_path / "model"), "log_dir": str(tmp_path / "logs"), "seed": 0,
        "num_generations": 4, "per_device_batch_size": 8 // workers, "grad_accum": 1, "max_steps": 2,
        "lr": 1e-3, "beta": 0.01, "epsilon": 0.2, "epsilon_high": 0.3, "temperature": 0.7,
        "max_completion_length": 48, "aggregation": "sum_then_normalize",
        "reward_weights": [0.5, 0.4, 0.1], "loss_type": "dapo", "save_steps": 1,
        "deepspeed": grpo_deepspeed_config(zero) if zero else None, "threads": 1, "knn_k": 4, "good_class": 4,
        "alignment_threshold": 0.8, "task": "qa", "reward_model": None, "reward_threshold": 0.0,
        "warmup_ratio": 0.0, "max_grad_norm": 1.0, "repetition_penalty": 1.0,
    }
    import ray

    ds = ray.data.from_arrow(pa.Table.from_pylist(prompts))
    fit(config, {"grpo": ds}, num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1},
        storage_path=str(tmp_path / "ray"), name="grpo-test", max_failures=0, keep_checkpoints=1,
        train_loop=grpo_loop_per_worker)

    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] and tuple(rows[0]) == GRPO_COLUMNS
    for r in rows:
        for k in ("quality", "alignment", "format"):
            assert 0.0 <= float(r[k]) <= 1.0
        assert math.isfinite(float(r["loss"])) and math.isfinite(float(r["kl"]))
    # the taught model gets the format right some of the time, not always: the rewards vary
    assert 0.0 < max(float(r["format"]) for r in rows)
    assert max(float(r["advantage_std"]) for r in rows) > 0.0
    before = load_file(model_dir / "model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged: {sorted(set(before) - set(changed))[:5]}"
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").glob("checkpoint-*"))
