"""One source for every closed choice: the config's Literals and the registries agree with
mixray.choices, and settings that do not apply are rejected instead of swallowed."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from mixray import choices
from mixray.config import (
    TRAIN_PRESETS,
    BenchmarkConfig,
    ClusterConfig,
    ContaminationConfig,
    EmbedConfig,
    ScoreConfig,
    SelectConfig,
    SourceConfig,
    TrainConfig,
)


def _literal(model, field: str) -> tuple:
    return typing.get_args(model.model_fields[field].annotation)


@pytest.mark.parametrize("model, field, values", [
    (SourceConfig, "format", choices.SOURCE_FORMATS),
    (EmbedConfig, "encoder", choices.ENCODERS),
    (EmbedConfig, "text", choices.EMBED_TEXTS),
    (ScoreConfig, "backend", choices.SCORE_BACKENDS),
    (SelectConfig, "method", choices.SELECT_METHODS),
    (SelectConfig, "optimizer", choices.SELECT_OPTIMIZERS),
    (SelectConfig, "distributed", choices.SELECT_DISTRIBUTED),
    (SelectConfig, "device", choices.DEVICES),
    (ClusterConfig, "init", choices.CLUSTER_INITS),
    (ClusterConfig, "plot", choices.CLUSTER_PLOTS),
    (TrainConfig, "loss", choices.LOSSES),
    (TrainConfig, "data", choices.TRAIN_DATA),
    (TrainConfig, "precision", choices.PRECISIONS),
    (TrainConfig, "preset", choices.TRAIN_PRESETS),
    (BenchmarkConfig, "kind", choices.BENCHMARK_KINDS),
    (ContaminationConfig, "on_hit", choices.CONTAMINATION_ACTIONS),
])
def test_config_literals_come_from_choices(model, field, values):
    assert _literal(model, field) == values


def test_registries_have_exactly_the_choices():
    from mixray.models.callables import ENCODERS, SCORERS
    from mixray.stages import STAGES
    from mixray.training.objectives import OBJECTIVES

    assert tuple(STAGES) == choices.STAGES  # in run order
    assert set(OBJECTIVES) == set(choices.LOSSES)
    assert set(ENCODERS) == set(choices.ENCODERS)
    assert set(SCORERS) == set(choices.MODEL_SCORERS) == set(choices.SCORE_BACKENDS) - {"column"}
    assert set(TRAIN_PRESETS) == set(choices.TRAIN_PRESETS)
    from mixray.io.benchmarks import READERS
    from mixray.stages.select import QUALITY_AXIS

    assert set(READERS) == set(choices.BENCHMARK_KINDS)
    assert set(QUALITY_AXIS) == set(choices.SCORE_BACKENDS)


@pytest.mark.parametrize("model, data, key", [
    (EmbedConfig, {"encoder": "lm-embedding", "encode_batch_size": 8}, "encode_batch_size"),
    (ScoreConfig, {"backend": "ifd", "label_index": 1}, "label_index"),
    (ScoreConfig, {"backend": "ifd", "column": "q"}, "column"),
    (ScoreConfig, {"backend": "column", "precision": "bf16"}, "precision"),
    (BenchmarkConfig, {"name": "arc", "kind": "multiple-choice", "path": "x", "shots": 2}, "shots"),
])
def test_settings_that_do_not_apply_are_rejected(model, data, key):
    with pytest.raises(ValidationError, match=f"{key} applies only with"):
        model.model_validate(data)


def test_constructors_take_only_what_they_use():
    from mixray.models.callables import IFDScorer, LMEmbeddingEncoder

    for cls, kw in ((IFDScorer, {"label_index": 0}), (LMEmbeddingEncoder, {"encode_batch_size": 8})):
        with pytest.raises(TypeError, match="unexpected keyword"):
            cls("unused-model", **kw)
