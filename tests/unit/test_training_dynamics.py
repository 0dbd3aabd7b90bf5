"""SFTMix's training dynamics as pure functions: checkpoint steps, confidence, variability, the split;
and the dynamics config (the reference run's settings, given checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from mixray.algorithms.dynamics import checkpoint_steps, training_dynamics
from mixray.config import RunConfig
from mixray.errors import InputError, TrainingConfigError

INGEST = {"sources": [{"name": "x", "path": "x.jsonl"}]}


def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert checkpoint_steps(10, 5) == [2, 4, 6, 8, 10]
    assert checkpoint_steps(7, 5) == [1, 2, 4, 5, 7]
    assert checkpoint_steps(5, 5) == [1, 2, 3, 4, 5]
    assert checkpoint_steps(1000, 1) == [1000]
    for total, c in ((13, 4), (100, 7), (6, 6)):
        steps = checkpoint_steps(total, c)
        assert len(set(steps)) == c and steps[-1] == total and steps == sorted(steps)
    with pytest.raises(TrainingConfigError, match="fewer than the 5 checkpoints"):
        checkpoint_steps(4, 5)


def test_confidence_is_minus_the_mean_perplexity_and_variability_its_spread():
    perp = np.array([[2.0, 1.0, 0.5],    # learnt: low mean
                     [3.0, 3.0, 3.0],    # never learnt, no variability
                     [4.0, 2.0, 1.0],
                     [1.0, 1.0, 1.0],
                     [5.0, 6.0, 4.0]])
    conf, var, confident = training_dynamics(perp)
    np.testing.assert_allclose(conf, [-7 / 6, -3.0, -7 / 3, -1.0, -5.0])
    np.testing.assert_allclose(var, [np.std([2, 1, 0.5]), 0.0, np.std([4, 2, 1]), 0.0, np.std([5, 6, 4])])
    # odd N = 5: the 2 most confident are confident, the extra example is unconfident
    assert confident.tolist() == [True, False, False, True, False]


def test_split_halves_even_n_and_ties_and_rejects_bad_input():
    conf, _, confident = training_dynamics(np.array([[1.0], [1.0], [1.0], [1.0]]))
    assert confident.tolist() == [True, True, False, False]  # ties: the lower index first
    rng = np.random.default_rng(0)
    perp = rng.gamma(2.0, 1.0, size=(101, 5))
    conf, _, confident = training_dynamics(perp)
    assert confident.sum() == 50 and conf[confident].min() >= conf[~confident].max()
    with pytest.raises(InputError, match="non-finite"):
        training_dynamics(np.array([[1.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(InputError, match=r"\[N, C\]"):
        training_dynamics(np.array([1.0, 2.0]))


def test_the_reference_run_is_the_train_section_with_ntp_and_the_overrides():
    cfg = RunConfig.model_validate({
        "ingest": INGEST,
        "train": {"preset": "sftmix", "model": "SmolLM2-135M-Instruct", "lora": {"enabled": True, "r": 4},
                  "sftmix": {"mu": 0.5}, "max_length": 384},
        "dynamics": {"model": "other-model", "train": {"lr": 1e-4, "lora": {"r": 8}}}})
    ref = cfg.reference_train()
    assert ref.loss == "ntp" and ref.model == "other-model" and ref.lr == 1e-4
    assert ref.lora.enabled and ref.lora.r == 8  # nested keys merge over the train section
    assert (ref.weight_decay, ref.micro_batch_size, ref.grad_accum, ref.epochs, ref.max_length) == (
        0.1, 8, 4, 3, 384)  # the preset's settings carry over, the loss does not
    assert ref.sftmix.mu == 0.2 and cfg.train.sftmix.mu == 0.5  # loss settings do not carry over
    assert RunConfig.model_validate({"ingest": INGEST}).reference_train().model == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("dynamics, match", [
    ({"train": {"loss": "sftmix"}}, "cannot be set for the reference run"),
    ({"train": {"lrr": 1e-4}}, "lrr: unknown key"),
    ({"train": {"micro_batch_size": 0}}, "micro_batch_size"),
    ({"checkpoints": ["a"], "reference_run": "b"}, "not both"),
    ({"checkpoints": ["a"], "num_checkpoints": 3}, "num_checkpoints applies only"),
    ({"reference_run": "b", "train": {"lr": 1e-4}}, "train applies only"),
    ({"checkpoints": []}, "at least 1"),
])
def test_dynamics_settings_that_cannot_work_are_rejected(dynamics, match):
    with pytest.raises(ValidationError, match=match):
        RunConfig.model_validate({"ingest": INGEST, "dynamics": dynamics})


def test_given_checkpoints_must_be_models_with_tokenizers(tmp_path):
    from mixray.stages.dynamics import given_checkpoints

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no tokenizer files.*dynamics.checkpoints.0"):
        given_checkpoints([str(tmp_path / "m")], None)
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(InputError, match="not a model.*dynamics.checkpoints.1"):
        given_checkpoints([str(tmp_path / "m"), str(tmp_path)], None)
    assert given_checkpoints([str(tmp_path / "m")], None) == [tmp_path / "m"]
    for step in (10, 2, 5):  # a reference run: step-<n> directories in step order (not name order)
        d = tmp_path / "run" / f"step-{step}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
    (tmp_path / "run" / "logs").mkdir()
    assert [p.name for p in given_checkpoints(None, str(tmp_path / "run"))] == ["step-2", "step-5", "step-10"]
    with pytest.raises(InputError, match="dynamics.reference_run"):
        given_checkpoints(None, str(tmp_path / "m"))
