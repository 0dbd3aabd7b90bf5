"""mix: examples.parquet -> mix_plan.parquet, MDIT's cross-task mixes (pairs and λ).

Input token lengths come from the tokenizer of ``mix.model`` (the model to be
tuned) over each example's instruction (+ input), without special tokens. The
plan itself is ``mixray.algorithms.mdit.plan_mixes``.

Output ``<run_dir>/mix/mix_plan.parquet``, one row per mix:

    mix_id    str      "mix:<16 hex>", stable: derived from (a_id, b_id)
    a_id      str      the example weighted by lam
    b_id      str      the example weighted by 1 - lam
    task_a    str
    task_b    str
    lam       float64  λ ~ Beta(α, α), in (0, 1)
    round     int64    0 … T−1 (the matching round that made the pair)
    len_a     int64    input token lengths
    len_b     int64
    bucket_a  int64    length buckets (len // bucket_width)
    bucket_b  int64

The manifest adds the mixes per task pair, a λ histogram and the bucket gaps.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.algorithms.mdit import MixPlan, plan_mixes
from mixray.contracts import EXAMPLES, MIX_PLAN, MIX_SCHEMA, mix_id, pair_name
from mixray.errors import InputError
from mixray.io.rundir import write_table
from mixray.models.registry import check_model, resolve_model
from mixray.models.text import instruction_text
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.mix")

_TOKENIZE_BATCH = 4096


def input_lengths(model: str, instructions: list[str], inputs: list[str]) -> np.ndarray:
    """Token count of ``instruction (+ "\\n" + input)`` per example, no special tokens: ``[N]``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = np.empty(len(instructions), dtype=np.int64)
    for s in range(0, len(instructions), _TOKENIZE_BATCH):
        texts = [instruction_text(i, x) for i, x in zip(instructions[s : s + _TOKENIZE_BATCH],
                                                         inputs[s : s + _TOKENIZE_BATCH], strict=True)]
        ids = tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out[s : s + len(ids)] = [len(x) for x in ids]
    return out


def plan_table(plan: MixPlan, ids: np.ndarray, tasks: np.ndarray, lengths: np.ndarray) -> pa.Table:
    a_ids, b_ids = ids[plan.a].tolist(), ids[plan.b].tolist()
    return pa.table({
        "mix_id": pa.array([mix_id(a, b) for a, b in zip(a_ids, b_ids, strict=True)], pa.string()),
        "a_id": pa.array(a_ids, pa.string()), "b_id": pa.array(b_ids, pa.string()),
        "task_a": pa.array(tasks[plan.a].tolist(), pa.string()),
        "task_b": pa.array(tasks[plan.b].tolist(), pa.string()),
        "lam": pa.array(plan.lam, pa.float64()), "round": pa.array(plan.round, pa.int64()),
        "len_a": pa.array(lengths[plan.a], pa.int64()), "len_b": pa.array(lengths[plan.b], pa.int64()),
        "bucket_a": pa.array(plan.bucket_a, pa.int64()), "bucket_b": pa.array(plan.bucket_b, pa.int64()),
    }, schema=MIX_SCHEMA)


def plan_summary(plan: MixPlan, tasks: np.ndarray) -> dict:
    """Mixes per task pair, the λ histogram (10 bins on [0, 1]) and the bucket gaps."""
    counts, edges = np.histogram(plan.lam, bins=10, range=(0.0, 1.0))
    gaps = np.abs(plan.bucket_a - plan.bucket_b)
    per_pair = {}
    for p, (ta, tb) in enumerate(plan.pairs):
        per_pair[pair_name(ta, tb)] = {
            "mixes": int((plan.pair == p).sum()),
            "examples": {ta: int((tasks == ta).sum()), tb: int((tasks == tb).sum())},
        }
    return {
        "pairs": per_pair,
        "lam_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()},
        "lam_mean": float(plan.lam.mean()) if len(plan) else None,
        "lam_std": float(plan.lam.std()) if len(plan) else None,
        "bucket_gap": {str(g): int(c) for g, c in zip(*np.unique(gaps, return_counts=True), strict=True)},
    }


class Mix(Stage):
    """``mix``: examples -> MDIT's mix plan (cross-task pairs of similar input length, λ)."""

    name = "mix"
    requires = (EXAMPLES,)
    outputs = (MIX_PLAN,)
    summary = "{mixes} mixes"
    seeded = True

    def check(self) -> None:
        check_model(self.section.model, "mix.model", need="tokenizer")

    def run(self, out: Outputs) -> None:
        cfg, examples = self.section, EXAMPLES.path(self.run_dir)
        t0 = time.time()
        t = pq.read_table(examples, columns=["id", "task", "instruction", "input"])
        ids = np.asarray(t.column("id").to_pylist(), dtype=object)
        tasks = np.asarray(t.column("task").to_pylist(), dtype=object)
        lengths = input_lengths(resolve_model(cfg.model, "mix.model"),
                                t.column("instruction").to_pylist(), t.column("input").to_pylist())
        try:
            plan = plan_mixes(tasks, lengths, pairs=cfg.pairs, alpha=cfg.alpha,
                              mixes_per_pair=cfg.mixes_per_pair, bucket_width=cfg.bucket_width,
                              max_length=cfg.max_length, max_bucket_gap=cfg.max_bucket_gap,
                              seed=self.cfg.seed)
        except ValueError as e:
            raise InputError(f"mix: {e} (settings: mix.pairs, mix.alpha, mix.max_length, ...)",
                             where=str(examples)) from None
        table = plan_table(plan, ids, tasks, lengths)
        if len(set(table.column("mix_id").to_pylist())) != len(table):
            raise InputError("mix: two mixes got the same mix_id (duplicate example ids?)")
        write_table(table, out.path(MIX_PLAN))
        out.counts = {"examples": len(ids), "mixes": len(plan)}
        out.extra = plan_summary(plan, tasks) | {
            "tokenizer": cfg.model,
            "input_length": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                             "max": int(lengths.max())}}
        if not len(plan):
            log.warning("mix: no pairs could be formed (mix.max_bucket_gap=%s too small?)",
                        cfg.max_bucket_gap)
        log.info("mix: %d examples -> %d mixes over %d task pair(s) in %.1f s: %s", len(ids), len(plan),
                 len(plan.pairs), time.time() - t0,
                 ", ".join(f"{k} {v['mixes']}" for k, v in out.extra["pairs"].items()))
