"""Model settings are checked on the driver before any actor starts (issue 11)."""

from __future__ import annotations

import json

import pytest

from mixray.errors import InputError
from mixray.models.registry import check_model


def test_an_empty_directory_is_not_a_model(tmp_path):
    """Issue 11: an empty directory passed validation, then ~200 lines of actor tracebacks."""
    with pytest.raises(InputError) as e:
        check_model(str(tmp_path), "embed.model")
    msg = str(e.value)
    assert "embed.model" in msg and str(tmp_path) in msg and "config.json" in msg


def _dir(tmp_path, name, files: dict[str, str]):
    d = tmp_path / name
    d.mkdir()
    for f, text in files.items():
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_text(text)
    return d


def test_what_each_use_of_a_model_directory_needs(tmp_path):
    hf = _dir(tmp_path, "hf", {"config.json": "{}", "model.safetensors": "", "tokenizer.json": "{}"})
    sharded = _dir(tmp_path, "sharded", {"config.json": "{}", "model.safetensors.index.json": "{}",
                                         "tokenizer_config.json": "{}"})
    st = _dir(tmp_path, "st", {"modules.json": json.dumps([{"path": ""}]), "config.json": "{}",
                               "model.safetensors": "", "vocab.txt": ""})
    tok = _dir(tmp_path, "tok", {"tokenizer_config.json": "{}", "tokenizer.json": "{}"})
    no_weights = _dir(tmp_path, "nw", {"config.json": "{}", "tokenizer.json": "{}"})
    no_tok = _dir(tmp_path, "nt", {"config.json": "{}", "pytorch_model.bin": ""})
    for d in (hf, sharded, st, tok, no_weights, no_tok):
        check_model(str(d), "x.model", need="any")
    for d in (hf, sharded, st):
        check_model(str(d), "train.model", need="model")
        check_model(str(d), "mix.model", need="tokenizer")
    check_model(str(st), "embed.model", need="sentence-transformers")
    check_model(str(hf), "embed.model", need="sentence-transformers")  # wrapped with mean pooling
    check_model(str(tok), "mix.model", need="tokenizer")
    for d, need, needle in ((tok, "model", "config.json"), (no_weights, "model", "weights"),
                            (no_tok, "model", "tokenizer"), (no_tok, "tokenizer", "tokenizer"),
                            (tok, "sentence-transformers", "modules.json")):
        with pytest.raises(InputError, match=needle):
            check_model(str(d), "s.model", need=need)
