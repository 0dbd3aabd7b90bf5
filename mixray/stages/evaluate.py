"""evaluate: the base model and the trained one on held-out data and benchmarks, over Ray Data.

Inputs: ``ingest/examples.parquet`` (the training pool, for the contamination check),
``ingest/heldout.parquet`` (``ingest.heldout.fraction > 0``), the trained model
(``evaluate.trained: auto``: ``train/merged``, else ``train/model`` — a LoRA adapter or full
weights) and the benchmark files of ``evaluate.benchmarks``.

What is measured (``mixray.algorithms.evaluation`` has the equations):

- ``heldout``: the response loss (token mean, nats) and perplexity of the held-out examples,
  tokenized exactly as training does;
- ``gsm8k`` benchmarks: exact match of the greedy completion's final number (k-shot prompt);
- ``multiple-choice`` benchmarks: accuracy by the options' log-likelihood (``accuracy``) and
  by their log-likelihood per character (``accuracy_norm``);
- ``judge`` (``evaluate.judge.model``): a pairwise LLM judge of the trained model's answers to
  held-out prompts against the base model's, both orders (``win_rate`` of the trained model).

Code benchmarks (HumanEval, MBPP) are not run: scoring them executes model-written code, and
mixray cannot guarantee a sandbox (no network, bounded time and memory, no file system) on
every machine it runs on without privileges; see docs/evaluate.md.

Every model's requests run as one Ray Data ``map_batches`` over an actor pool
(``mixray.distributed.pipeline.map_with_actors`` with ``mixray.models.evaluation.LMEvaluator``).
Before that, every item is checked against the pool (``mixray.stages.contamination``); hits are
excluded and reported, or fail the stage (``evaluate.contamination.on_hit``).

Outputs in ``<run_dir>/evaluate/``: ``results.parquet`` (per model, benchmark, metric and item:
prediction, reference, score), ``summary.json`` (per benchmark and metric: n, value per model,
delta trained − base) and ``contamination.parquet`` (the hits).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mixray.algorithms.evaluation import (
    choose_option,
    gsm8k_answer,
    judge_verdict,
    numbers_match,
    perplexity,
)
from mixray.contracts import (
    CONTAMINATION,
    EVAL_RESULTS,
    EVAL_SUMMARY,
    EXAMPLES,
    HELDOUT,
    RESULT_SCHEMA,
    TRAIN_MERGED,
    TRAIN_MODEL,
)
from mixray.errors import ConfigError, InputError
from mixray.io.benchmarks import read_benchmark
from mixray.io.readers import resolve_path
from mixray.io.rundir import completed_output, file_sha256, output_hash, write_table
from mixray.models.evaluation import STOP_SEP
from mixray.models.registry import check_model
from mixray.models.text import instruction_text
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.evaluate")

GSM8K_STOPS = ("\n\nQuestion:", "Question:", "\n\n\n")
CODE_BENCHMARKS = ("not run: scoring HumanEval/MBPP executes model-written code, and a sandbox "
                   "(no network, time and memory limits, no file system) cannot be guaranteed on "
                   "every machine without privileges (docs/evaluate.md)")
# lower is better for these metrics; every other one (accuracies, win rate) is higher-is-better
LOWER_IS_BETTER = ("loss", "perplexity")


def heldout_items(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """The held-out examples as items: their instruction (+ input) is what the check compares."""
    t = pq.read_table(path, columns=["id", "instruction", "input", "output"])
    if limit is not None:
        t = t.slice(0, limit)
    return [{"id": r["id"], "text": instruction_text(r["instruction"], r["input"]), "reference": r["output"],
             "instruction": r["instruction"], "input": r["input"], "output": r["output"]}
            for r in t.to_pylist()]


# ----------------------------------------------------------------------------- requests

def _request(rid: str, kind: str, context: str, input_: str = "", continuation: str = "",
             stop: tuple[str, ...] = ()) -> dict[str, str]:
    return {"rid": rid, "kind": kind, "context": context, "input": input_,
            "continuation": continuation, "stop": STOP_SEP.join(stop)}


def build_requests(items: dict[str, list[dict]], kinds: dict[str, str], judge: int) -> list[dict]:
    """Every request of the models under test (``kinds``: benchmark name -> kind)."""
    reqs = []
    for name, its in items.items():
        for it in its:
            key = f"{name}|{it['id']}"
            if kinds[name] == "heldout":
                reqs.append(_request(key, "response", it["instruction"], it["input"], it["output"]))
            elif kinds[name] == "gsm8k":
                reqs.append(_request(key, "generate", it["prompt"], stop=GSM8K_STOPS))
            else:
                reqs += [_request(f"{key}|{j}", "option", it["query"], continuation=" " + c)
                         for j, c in enumerate(it["choices"])]
    for it in items.get("heldout", [])[:judge]:
        reqs.append(_request(f"judge|{it['id']}", "chat", it["instruction"], it["input"]))
    return reqs


def run_requests(requests: list[dict], model: str, cfg, label: str) -> dict[str, dict]:
    """``rid -> {logprob, tokens, greedy, text}`` of ``model`` over the evaluate actor pool."""
    from mixray.distributed.pipeline import map_with_actors, table_dataset
    from mixray.models.evaluation import LMEvaluator

    order = sorted(requests, key=lambda r: (r["kind"], len(r["context"]) + len(r["continuation"])))
    kwargs = {"model_path": model, "max_length": cfg.max_length, "max_new_tokens": cfg.max_new_tokens,
              "micro_batch": cfg.micro_batch, "trust_remote_code": cfg.trust_remote_code,
              "precision": cfg.precision}
    log.info("evaluate[%s]: %d requests on %s", label, len(order), model)
    ds = table_dataset(pa.Table.from_pylist(order), cfg.batch_size)
    out = {}
    for b in map_with_actors(ds, LMEvaluator, kwargs, cfg, "evaluate").iter_batches(
            batch_size=None, batch_format="numpy"):
        for i, rid in enumerate(b["rid"].tolist()):
            out[rid] = {"logprob": float(b["logprob"][i]), "tokens": int(b["tokens"][i]),
                        "greedy": bool(b["greedy"][i]), "text": str(b["text"][i])}
    return out


# ----------------------------------------------------------------------------- scoring

def _row(model: str, bench: str, metric: str, item_id: str, prediction: str, reference: str,
         score: float, nll: float = math.nan, tokens: int = 0) -> dict[str, Any]:
    return {"model": model, "benchmark": bench, "metric": metric, "id": item_id, "prediction": prediction,
            "reference": reference, "score": score, "nll": nll, "tokens": tokens}


def score_items(model: str, name: str, kind: str, items: list[dict], resp: dict[str, dict]) -> list[dict]:
    """Result rows of one model on one benchmark (see the module docstring for the metrics)."""
    rows = []
    for it in items:
        key = f"{name}|{it['id']}"
        if kind == "heldout":
            r = resp[key]
            nll = -r["logprob"]
            rows.append(_row(model, name, "loss", it["id"], "", it["reference"],
                             nll / max(r["tokens"], 1), nll, r["tokens"]))
        elif kind == "gsm8k":
            text = resp[key]["text"]
            rows.append(_row(model, name, "exact_match", it["id"], text, it["reference"],
                             float(numbers_match(gsm8k_answer(text), it["reference"]))))
        else:
            ll = [resp[f"{key}|{j}"]["logprob"] for j in range(len(it["choices"]))]
            raw, norm = choose_option(ll, [len(c) for c in it["choices"]])
            for metric, pick in (("accuracy", raw), ("accuracy_norm", norm)):
                rows.append(_row(model, name, metric, it["id"], it["choices"][pick], it["reference"],
                                 float(pick == it["gold"])))
    return rows


JUDGE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Answer with a single letter: A if assistant "
    "A is better, B if assistant B is better.\n\n[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]\n\nVerdict:")


def judge_requests(items: list[dict], trained: dict[str, dict], base: dict[str, dict]) -> list[dict]:
    """Four option requests per prompt: the verdict letters, trained answer as A, then as B."""
    reqs = []
    for it in items:
        t, b = trained[f"judge|{it['id']}"]["text"], base[f"judge|{it['id']}"]["text"]
        for order, (a_text, b_text) in (("first", (t, b)), ("second", (b, t))):
            ctx = JUDGE_TEMPLATE.format(question=it["text"], a=a_text, b=b_text)
            reqs += [_request(f"verdict|{it['id']}|{order}|{x}", "option", ctx, continuation=" " + x)
                     for x in ("A", "B")]
    return reqs


def score_judge(items: list[dict], verdicts: dict[str, dict], trained: dict, base: dict) -> list[dict]:
    """``win_rate`` rows of the trained model (1 win, 0.5 split by position, 0 loss)."""
    def lp(i, order):
        return [verdicts[f"verdict|{i}|{order}|{x}"]["logprob"] for x in ("A", "B")]

    wins = judge_verdict([lp(it["id"], "first") for it in items], [lp(it["id"], "second") for it in items])
    return [_row("trained", "judge", "win_rate", it["id"], trained[f"judge|{it['id']}"]["text"],
                 base[f"judge|{it['id']}"]["text"], float(w)) for it, w in zip(items, wins, strict=True)]


# ----------------------------------------------------------------------------- summary

def summarize(results: pa.Table) -> list[dict[str, Any]]:
    """Per benchmark and metric: n, the value per model and ``delta`` = trained − base."""
    df = results.to_pandas()
    out = []
    for (bench, metric), g in df.groupby(["benchmark", "metric"], sort=False):
        values, n = {}, 0
        for model, m in g.groupby("model", sort=False):
            n = len(m)
            if metric == "loss":
                values[model] = perplexity(m["nll"].to_numpy(), m["tokens"].to_numpy())[0]
            else:
                values[model] = float(m["score"].mean())
        entries = [(metric, values)]
        if metric == "loss":
            entries.append(("perplexity", {k: math.exp(v) for k, v in values.items()}))
        for name, vals in entries:
            delta = vals["trained"] - vals["base"] if {"trained", "base"} <= set(vals) else None
            out.append({"benchmark": bench, "metric": name, "n": n, "values": vals, "delta": delta,
                        "higher_is_better": name not in LOWER_IS_BETTER})
    return out


class Evaluate(Stage):
    """``evaluate``: base and trained model on held-out data and benchmarks, after a contamination check."""

    name = "evaluate"
    outputs = (EVAL_RESULTS, EVAL_SUMMARY, CONTAMINATION)
    summary = "{items} items on {models} model(s), {contaminated} contaminated"
    memory_knobs = ("concurrency", "batch_size", "micro_batch", "max_length", "num_cpus")

    def check(self) -> None:
        self.run_dir, self.stage_dir = self.run_dir.resolve(), self.stage_dir.resolve()
        cfg = self.section
        self.base = cfg.model or self.cfg.train.model
        check_model(self.base, "evaluate.model" if cfg.model else "train.model", need="model")
        self.trained = self._trained()
        self.models = {k: v for k, v in (("base", self.base if cfg.base else None),
                                         ("trained", self.trained)) if v}
        if not self.models:
            raise ConfigError("evaluate: nothing to evaluate: evaluate.base is false and there is no "
                              "trained model (run the train stage or set evaluate.trained)",
                              where="evaluate.trained")
        self.items, self.kinds = self._items()
        if cfg.judge.model:
            check_model(cfg.judge.model, "evaluate.judge.model", need="model")
        if cfg.contamination.enabled:
            check_model(cfg.contamination.model, "evaluate.contamination.model", need="sentence-transformers")

    def _trained(self) -> str | None:
        t = self.section.trained
        if t == "none":
            return None
        if t == "auto":
            found = completed_output(self.run_dir, TRAIN_MERGED) or completed_output(self.run_dir, TRAIN_MODEL)
            if found is None:
                log.info("evaluate: no trained model in %s; evaluating the base model only",
                         self.run_dir / TRAIN_MODEL.stage)
            return str(found) if found else None
        check_model(t, "evaluate.trained", need="any")
        return str(Path(t).expanduser().resolve())

    def _items(self) -> tuple[dict[str, list[dict]], dict[str, str]]:
        cfg, items, kinds = self.section, {}, {}
        held = completed_output(self.run_dir, HELDOUT)
        if cfg.heldout and held is not None:
            items["heldout"], kinds["heldout"] = heldout_items(held, cfg.heldout_limit), "heldout"
        elif cfg.heldout and not cfg.benchmarks:
            raise ConfigError("evaluate: no held-out split and no benchmark; set ingest.heldout.fraction "
                              "(e.g. 0.1) or list evaluate.benchmarks", where="evaluate.heldout")
        for b in cfg.benchmarks:
            items[b.name] = read_benchmark(b, f"evaluate.benchmarks[{b.name}]")
            kinds[b.name] = b.kind
        if cfg.judge.model and not ("heldout" in items and {"base", "trained"} <= set(self.models)):
            raise ConfigError("evaluate.judge needs held-out prompts and both models (base and trained)",
                              where="evaluate.judge.model")
        return items, kinds

    def config(self) -> dict:
        return self.section.model_dump(mode="json") | {"base_model": self.base}

    def input_hashes(self) -> dict[str, str]:
        h = {"ingest/examples.parquet": output_hash(self.run_dir / "ingest", EXAMPLES.name)}
        if "heldout" in self.items:
            h["ingest/heldout.parquet"] = output_hash(self.run_dir / "ingest", HELDOUT.name)
        if self.trained:
            p = Path(self.trained)
            inside = p.parent == self.run_dir / TRAIN_MODEL.stage
            h["trained"] = output_hash(p.parent, p.name) if inside else file_sha256(p)
        for b in self.section.benchmarks:
            h[f"benchmark/{b.name}"] = file_sha256(resolve_path(b.path))
        return h

    def run(self, out: Outputs) -> None:
        from mixray.distributed.runtime import init_ray
        from mixray.models.registry import resolve_model

        cfg = self.section
        init_ray(self.cfg.ray)
        models = {k: resolve_model(v, f"evaluate.{k}") for k, v in self.models.items()}
        hits = self._contamination()
        write_table(hits, out.path(CONTAMINATION))
        judged = cfg.judge.limit if cfg.judge.model else 0
        reqs = build_requests(self.items, self.kinds, judged)
        resp = {label: run_requests(reqs, path, cfg, label) for label, path in models.items()}
        rows = [r for label in models for name, its in self.items.items()
                for r in score_items(label, name, self.kinds[name], its, resp[label])]
        if judged:
            rows += self._judge(self.items["heldout"][:judged], resp)
        results = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
        write_table(results, out.path(EVAL_RESULTS))
        metrics = summarize(results)
        summary = {"models": models, "metrics": metrics, "code_benchmarks": CODE_BENCHMARKS,
                   "contamination": self._hit_counts(hits)}
        out.path(EVAL_SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=True))
        n_items = sum(len(v) for v in self.items.values())
        out.counts = {"items": n_items, "models": len(models), "contaminated": hits.num_rows,
                      "benchmarks": {k: len(v) for k, v in self.items.items()}}
        for m in metrics:
            log.info("evaluate: %-12s %-14s n=%-4d %s", m["benchmark"], m["metric"], m["n"],
                     "  ".join(f"{k} {v:.4f}" for k, v in m["values"].items())
                     + (f"  delta {m['delta']:+.4f}" if m["delta"] is not None else ""))

    def _contamination(self) -> pa.Table:
        """Check every item against the pool; drop the hits (or fail), return them."""
        from mixray.stages.contamination import check_items

        cfg = self.section.contamination
        if not cfg.enabled:
            return pa.Table.from_pylist([], schema=CONTAMINATION.schema)
        hits = check_items(self.items, self.section, self.run_dir)
        log.info("evaluate: contamination check: %d of %d item(s) found in the training pool "
                 "(exact or cosine >= %g)", hits.num_rows, sum(len(v) for v in self.items.values()),
                 cfg.threshold)
        if hits.num_rows and cfg.on_hit == "fail":
            first = hits.slice(0, 3).to_pylist()
            raise InputError(f"evaluate: {hits.num_rows} evaluation item(s) are in the training pool, e.g. "
                             + "; ".join(f"{h['benchmark']}/{h['id']} ~ {h['pool_id']} ({h['match']}, "
                                         f"cosine {h['cosine']:.3f})" for h in first),
                             where="evaluate.contamination.on_hit")
        bad = {(h["benchmark"], h["id"]) for h in hits.to_pylist()}
        self.items = {k: [it for it in v if (k, it["id"]) not in bad] for k, v in self.items.items()}
        empty = [k for k, v in self.items.items() if not v]
        if empty:
            raise InputError(f"evaluate: every item of {empty} is in the training pool; nothing left "
                             "to evaluate", where="evaluate.contamination")
        return hits

    def _hit_counts(self, hits: pa.Table) -> dict[str, Any]:
        match = hits.column("match").to_pylist()
        return {"enabled": self.section.contamination.enabled, "on_hit": self.section.contamination.on_hit,
                "threshold": self.section.contamination.threshold, "hits": len(match),
                "exact": match.count("exact"), "near": match.count("near"),
                "by_benchmark": {b: hits.column("benchmark").to_pylist().count(b) for b in
                                 sorted(set(hits.column("benchmark").to_pylist()))}}

    def _judge(self, items: list[dict], resp: dict[str, dict]) -> list[dict]:
        from mixray.models.registry import resolve_model

        cfg = self.section
        reqs = judge_requests(items, resp["trained"], resp["base"])
        verdicts = run_requests(reqs, resolve_model(cfg.judge.model, "evaluate.judge.model"), cfg, "judge")
        return score_judge(items, verdicts, resp["trained"], resp["base"])
