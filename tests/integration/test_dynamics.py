"""The dynamics stage (SFTMix's training dynamics) on the local Ray: per-checkpoint perplexities, the
split, the outputs, reuse and skip, a reference run through the training package, and a run killed
mid-scoring that rescores only what it had not scored.

The examples are real (tests/packaged_data.py): 17 GSM8K problems (one exchange) and 8 ShareGPT
conversations with 2-4 replies each (every reply is a response); 25 in all, an odd number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from packaged_data import conversations, records
from stage_runs import run
from train_data import write_stage_output

from mixray.config import TrainConfig
from mixray.contracts import CONFIDENCE, SPLITS
from mixray.models.sft import encode_example, load_tokenizer
from mixray.schema import EXAMPLE_SCHEMA
from mixray.stages.train import plan_job

N_MATH, N_CHAT, MAX_LEN = 17, 8, 96


def _examples() -> pa.Table:
    rows = [{"id": f"gsm8k/{i}", "source": "gsm8k", "task": "math", **r, "messages": None}
            for i, r in enumerate(records("math", N_MATH))]
    rows += [{"id": f"sharegpt/{i}", "source": "sharegpt", "task": "general", **r}
             for i, r in enumerate(conversations(N_CHAT))]
    for r in rows:
        r["quality"] = None
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def _run_dir(root: Path) -> Path:
    run_dir = root / "run"
    write_stage_output(run_dir, "ingest", "examples.parquet", _examples())
    return run_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_lm_dir) -> list[Path]:
    """Three 'checkpoints': the tiny Llama and two copies with perturbed weights (with the tokenizer)."""
    from transformers import AutoModelForCausalLM

    out = [tiny_lm_dir]
    tok = load_tokenizer(str(tiny_lm_dir))
    for k in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
        torch.manual_seed(100 + k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * k * torch.randn_like(p))
        d = tmp_path_factory.mktemp(f"ckpt{k}")
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return out


def _sections(model: Path, **dynamics) -> dict:
    return {"dynamics": {"concurrency": 2, "threads": 1, "batch_size": 8, "micro_batch": 3} | dynamics,
            "train": {"model": str(model), "data": "all", "max_length": MAX_LEN, "num_workers": 2,
                      "micro_batch_size": 2, "threads": 1, "lr": 3e-3, "warmup_ratio": 0.0,
                      "resources_per_worker": {"CPU": 1}}}


def _direct_perp(ckpt: Path, examples: pa.Table, max_length: int) -> np.ndarray:
    """Each example's mean response NLL, one unpadded sequence at a time: −mean log p(y_n | ...)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    for r in examples.to_pylist():
        ids, spans, _ = encode_example(tok, r["instruction"], r["input"], r["output"], max_length, r["messages"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        resp = [p for s, e in zip(spans[::2], spans[1::2], strict=True) for p in range(s, e)]
        out.append(-float(np.mean([logp[p - 1, ids[p]].item() for p in resp])))
    return np.asarray(out)


def _confidence(run_dir: Path) -> pa.Table:
    return pq.read_table(CONFIDENCE.path(run_dir))


def test_given_checkpoints_perplexity_split_outputs_and_skip(ray_session, tmp_path, checkpoints, tiny_lm_dir):
    run_dir = _run_dir(tmp_path)
    given = [str(p) for p in checkpoints[:2]]
    m = run("dynamics", run_dir, **_sections(tiny_lm_dir, checkpoints=given))
    assert m["counts"] == {"examples": 25, "checkpoints": 2, "confident": 12, "unconfident": 13,
                           "scored_checkpoints": 2, "resumed_checkpoints": 0, "reference_trained": False}
    t = _confidence(run_dir)
    assert t.column_names == ["id", "perp_1", "perp_2", "conf", "variability", "split"]
    examples = pq.read_table(run_dir / "ingest" / "examples.parquet")
    assert t.column("id").to_pylist() == examples.column("id").to_pylist()
    perp = np.stack([t.column(f"perp_{c}").to_numpy() for c in (1, 2)], axis=1)
    for c, ckpt in enumerate(checkpoints[:2]):  # the Ray Data pool == one sequence at a time
        np.testing.assert_allclose(perp[:, c], _direct_perp(ckpt, examples, MAX_LEN), rtol=1e-4)
    np.testing.assert_allclose(t.column("conf").to_numpy(), -perp.mean(1), rtol=1e-12)
    np.testing.assert_allclose(t.column("variability").to_numpy(), perp.std(1), rtol=1e-12)
    # the median split: the 12 most confident of 25 are confident, the extra (odd N) is unconfident
    split = np.asarray(t.column("split").to_pylist())
    conf = t.column("conf").to_numpy()
    assert set(split) == set(SPLITS) and (split == "confident").sum() == 12
    assert conf[split == "confident"].min() >= conf[split == "unconfident"].max()
    for png in ("data_map.png", "confidence_hist.png"):
        assert (run_dir / "dynamics" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / "dynamics" / "scores").exists()  # resume state is gone once complete
    # train.loss=sftmix reads the split by default, example by example
    job = plan_job(TrainConfig.model_validate({"model": str(tiny_lm_dir), "loss": "sftmix", "data": "all",
                                               "num_workers": 1}), run_dir)
    assert job.counts["confident"] == 12 and "confidence" in job.inputs
    by_id = dict(zip(t.column("id").to_pylist(), split, strict=True))
    groups = job.rows.column("group").to_numpy()
    assert [by_id[i] for i in job.rows.column("id").to_pylist()] == [
        "confident" if g == 1 else "unconfident" for g in groups]
    # unchanged: skipped; another scoring setting: rescored, the same numbers
    assert run("dynamics", run_dir, **_sections(tiny_lm_dir, checkpoints=given))["skipped"] is True
    m = run("dynamics", run_dir, **_sections(tiny_lm_dir, checkpoints=given, concurrency=1, micro_batch=5))
    assert m["skipped"] is False and m["counts"]["scored_checkpoints"] == 2
    np.testing.assert_allclose(_confidence(run_dir).column("perp_2").to_numpy(), perp[:, 1], rtol=1e-5)


def test_reference_run_checkpoints_reuse_and_sftmix_training(ray_session, tmp_path, tiny_lm_dir):
    """The reference run trains through the training package and keeps C=3 checkpoints at evenly spaced
    steps; a change of a scoring setting reuses them; `mixray run` then trains sftmix on the split."""
    from safetensors.torch import load_file

    from mixray.cli import main

    run_dir = _run_dir(tmp_path)
    sections = _sections(tiny_lm_dir, num_checkpoints=3, train={"max_steps": 6})
    m = run("dynamics", run_dir, **sections)
    # 25 rows on 2 workers: 12 each, micro-batch 2 -> 6 steps per epoch; 3 checkpoints at steps 2, 4, 6
    assert m["steps"] == [2, 4, 6] and m["counts"]["reference_trained"] is True
    ref = run_dir / "dynamics" / "reference"
    weights = [load_file(ref / f"step-{s}" / "model.safetensors") for s in (2, 4, 6)]
    assert all(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    record = json.loads((ref / "reference.json").read_text())
    assert record["steps"] == [2, 4, 6] and not (run_dir / "dynamics" / "ray").exists()
    t = _confidence(run_dir)
    means = [float(np.mean(t.column(f"perp_{c}").to_numpy())) for c in (1, 2, 3)]
    assert means[2] < means[0]  # the reference model learns the examples: perplexity falls
    stamps = {p.name: p.stat().st_mtime_ns for p in ref.iterdir()}
    m = run("dynamics", run_dir, **_sections(tiny_lm_dir, num_checkpoints=3, train={"max_steps": 6},
                                             batch_size=5))
    assert m["counts"]["reference_trained"] is False and m["counts"]["scored_checkpoints"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in ref.iterdir()} == stamps  # reused, not retrained
    np.testing.assert_allclose(_confidence(run_dir).column("perp_3").to_numpy(), t.column("perp_3").to_numpy(),
                               rtol=1e-5)
    config = tmp_path / "sftmix.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "stages": ["dynamics", "train"],
        "ingest": {"sources": [{"name": "unused", "path": "unused.jsonl"}]},
        "dynamics": sections["dynamics"] | {"batch_size": 5},
        "train": sections["train"] | {"loss": "sftmix", "max_steps": 2}}))
    assert main(["run", str(config)]) == 0  # dynamics skipped, train reads dynamics/confidence.parquet
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["counts"]["confident"] == 12 and manifest["counts"]["unconfident"] == 13
    assert manifest["inputs"]["confidence"] == json.loads(
        (run_dir / "dynamics" / "manifest.json").read_text())["outputs"]["confidence.parquet"]


def test_a_killed_run_rescores_only_the_checkpoints_not_yet_scored(ray_session, tmp_path, checkpoints,
                                                                  tiny_lm_dir):
    """`mixray dynamics` in a child process is killed (SIGKILL, with its Ray) once a checkpoint is scored;
    the re-run keeps that checkpoint's scores untouched and scores only the others."""
    run_dir = _run_dir(tmp_path)
    sections = _sections(tiny_lm_dir, checkpoints=[str(p) for p in checkpoints], concurrency=1)
    config = tmp_path / "dyn.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "ingest": {"sources": [{"name": "unused", "path": "unused.jsonl"}]},
        "ray": {"num_cpus": 2, "object_store_memory": 200_000_000}, **sections}))
    scores = run_dir / "dynamics" / "scores"
    child = subprocess.Popen([sys.executable, "-m", "mixray.cli", "dynamics", str(config)],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"})
    deadline = time.monotonic() + 600
    try:
        while not (scores.is_dir() and any(p.name.endswith(".parquet") for p in scores.iterdir())):
            assert child.poll() is None, f"mixray dynamics ended before it was killed: {child.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint was scored within 10 minutes"
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGKILL)  # the child and the local Ray it started
    finally:
        child.wait(timeout=60)
    done = sorted(p.name for p in scores.iterdir() if p.name.endswith(".parquet"))
    assert 1 <= len(done) < 3 and not (run_dir / "dynamics" / "manifest.json").exists()
    assert done[0].endswith("-checkpoint-1.parquet")
    m = run("dynamics", run_dir, **sections)
    assert m["counts"]["resumed_checkpoints"] == len(done)
    assert m["counts"]["scored_checkpoints"] == 3 - len(done)
    t = _confidence(run_dir)
    examples = pq.read_table(run_dir / "ingest" / "examples.parquet")
    np.testing.assert_allclose(t.column("perp_3").to_numpy(), _direct_perp(checkpoints[2], examples, MAX_LEN),
                               rtol=1e-4)
    np.testing.assert_allclose(t.column("perp_1").to_numpy(), _direct_perp(checkpoints[0], examples, MAX_LEN),
                               rtol=1e-4)
