"""ingest: sources (jsonl/json/parquet/csv/HF dir) -> examples.parquet + rejects.parquet.

Outputs under ``<run_dir>/ingest/``:

- ``examples.parquet`` — the schema of ``mixray.schema.EXAMPLE_SCHEMA``, in source order.
- ``rejects.parquet`` — every record that could not be used: source, file,
  line, row, reason (``mixray.schema.RejectReason``), detail, raw text.
- ``duplicates.parquet`` — exact duplicates (same instruction, input, output,
  messages): ``id, duplicate_of``. They stay in ``examples`` unless
  ``ingest.drop_duplicates: true``, in which case they are rejected with
  reason ``exact_duplicate``.
- ``heldout.parquet`` — the evaluation split (``ingest.heldout.fraction``): the examples whose
  id hashes below the fraction (``mixray.contracts.in_eval_split``), in the example schema.
  With ``ingest.heldout.exclude: true`` (the default) they are not in ``examples.parquet``, so
  no later stage selects or trains on them; ``evaluate`` measures the response loss on them.
- ``manifest.json`` — per source ``in == kept + rejected`` (``kept`` counts the held-out
  examples too, ``heldout`` how many of them there are) and counts by reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mixray.config import HeldoutConfig, IngestConfig, SourceConfig
from mixray.console import stage_bar
from mixray.contracts import DUPLICATES, EXAMPLES, HELDOUT, REJECTS, in_eval_split
from mixray.errors import InputError
from mixray.io.readers import read_source, resolve_path
from mixray.io.rundir import file_sha256
from mixray.schema import Rejected, RejectReason, derived_id, map_record
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.ingest")

_FLUSH = 8192


def source_problems(cfg: IngestConfig) -> tuple[dict[str, Path], list[str]]:
    """Resolve every source path: (paths of the usable ones, one problem per unusable one)."""
    paths, problems = {}, []
    for src in cfg.sources:
        try:
            p = resolve_path(src.path)
        except InputError as e:
            problems.append(f"ingest.sources[{src.name}].path: {e}")
            continue
        if not p.exists():
            problems.append(f"ingest.sources[{src.name}].path: {src.path} does not exist")
            continue
        paths[src.name] = p
    return paths, problems


def source_paths(cfg: IngestConfig) -> dict[str, Path]:
    """Resolve every source path; raise one error naming every missing one."""
    paths, problems = source_problems(cfg)
    if problems:
        raise InputError("; ".join(problems))
    return paths


class _Writer:
    """Buffered Parquet writer for a fixed schema."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.schema, self.rows, self.n = schema, [], 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.n += len(self.rows)
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _Split:
    """Where a kept example goes: examples.parquet, heldout.parquet (the evaluation split) or both."""

    def __init__(self, examples: _Writer, heldout: _Writer, cfg: HeldoutConfig):
        self.examples, self.heldout, self.cfg = examples, heldout, cfg
        self.n_heldout = 0

    def add(self, row: dict[str, Any]) -> None:
        held = self.cfg.fraction > 0 and in_eval_split(row["id"], self.cfg.fraction)
        if held:
            self.heldout.add(row)
            self.n_heldout += 1
        if not (held and self.cfg.exclude):
            self.examples.add(row)


def _assign_id(source: str, own: str | None, key: str, row: int, own_ids: dict[str, int],
               occurrences: Counter) -> tuple[str | None, str | None]:
    """``(id, None)``: the record's own id under its source, or one derived from its content
    and occurrence; ``(None, why)`` when its own id was already used in this source."""
    if own is None:
        occurrences[(source, key)] += 1
        return derived_id(source, key, occurrences[(source, key)]), None
    if own in own_ids:
        return None, f"id {own!r} already used by record {own_ids[own]}"
    own_ids[own] = row
    return f"{source}/{own}", None


def _ingest_source(
    src: SourceConfig,
    path: Path,
    examples: _Split,
    rejects: _Writer,
    dups: _Writer,
    seen_content: dict[str, str],
    occurrences: Counter,
    drop_duplicates: bool,
) -> dict[str, Any]:
    counts: Counter = Counter()
    own_ids: dict[str, int] = {}
    n_in = kept = 0
    held_before = examples.n_heldout
    shown = str(path)

    def reject(rec, reason: RejectReason, detail: str, raw: str | None = None) -> None:
        counts[reason.value] += 1
        rejects.add({
            "source": src.name, "file": shown, "line": rec.line, "row": rec.row,
            "reason": reason.value, "detail": _utf8(detail), "raw": None if raw is None else _utf8(raw),
        })

    for rec in read_source(path, src.format, src.split):
        if src.limit is not None and n_in >= src.limit:
            break
        n_in += 1
        if rec.error is not None:
            reason = RejectReason.INVALID_UTF8 if rec.bad_utf8 or _bad_utf8(rec.raw) else RejectReason.UNPARSEABLE
            reject(rec, reason, rec.error, rec.raw)
            continue
        mapped = map_record(rec.value, src.fields, src.name, src.task_name)
        if isinstance(mapped, Rejected):
            reject(rec, mapped.reason, mapped.detail, _raw(rec.value))
            continue
        key = mapped.pop("_key")
        ex_id, clash = _assign_id(src.name, mapped.pop("_own_id"), key, rec.row, own_ids, occurrences)
        if clash:
            reject(rec, RejectReason.DUPLICATE_ID, clash, _raw(rec.value))
            continue
        first = seen_content.get(key)
        if first is not None:
            dups.add({"id": ex_id, "duplicate_of": first})
            if drop_duplicates:
                reject(rec, RejectReason.EXACT_DUPLICATE, f"exact duplicate of {first}", _raw(rec.value))
                continue
        else:
            seen_content[key] = ex_id
        mapped["id"] = ex_id
        examples.add(mapped)
        kept += 1
    rejected = sum(counts.values())
    assert n_in == kept + rejected, (n_in, kept, rejected)
    return {"in": n_in, "kept": kept, "rejected": rejected, "heldout": examples.n_heldout - held_before,
            "reasons": dict(sorted(counts.items()))}


def _bad_utf8(raw: str | None) -> bool:
    if raw is None:
        return False
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _utf8(text: str) -> str:
    """Text that Parquet can store: undecodable bytes and lone surrogates become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _raw(value: Any) -> str:
    import json

    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text[:2000]


class Ingest(Stage):
    """``ingest``: every source -> examples.parquet + rejects.parquet + duplicates.parquet."""

    name = "ingest"
    outputs = (EXAMPLES, REJECTS, DUPLICATES, HELDOUT)
    summary = "{kept} examples ({heldout} held out for evaluation)"

    def check(self) -> None:
        self.paths = source_paths(self.section)

    def config(self) -> dict:
        # where a source lies is not part of the result (its content hash is): a moved checkout
        # or a job's working-dir copy at another path does not re-ingest
        data = self.section.model_dump(mode="json")
        for src in data["sources"]:
            src.pop("path")
        return data

    def input_hashes(self) -> dict[str, str]:
        return {name: file_sha256(p) for name, p in self.paths.items()}

    def run(self, out: Outputs) -> None:
        cfg = self.section
        writers = (_Writer(out.path(EXAMPLES), EXAMPLES.schema), _Writer(out.path(REJECTS), REJECTS.schema),
                   _Writer(out.path(DUPLICATES), DUPLICATES.schema))
        held = _Writer(out.path(HELDOUT), HELDOUT.schema) if cfg.heldout.fraction > 0 else None
        split = _Split(writers[0], held, cfg.heldout)
        seen: dict[str, str] = {}
        occurrences: Counter = Counter()
        per_source = {}
        try:
            with stage_bar("ingest", len(cfg.sources), unit="sources") as bar:
                for src in cfg.sources:
                    c = _ingest_source(src, self.paths[src.name], split, *writers[1:], seen, occurrences,
                                       cfg.drop_duplicates)
                    per_source[src.name] = c
                    if c["in"] == 0:
                        log.warning("ingest: source %s (%s) has no record", src.name, self.paths[src.name])
                    log.info("ingest: %-14s in=%d = kept %d + rejected %d %s", src.name, c["in"],
                             c["kept"], c["rejected"], c["reasons"] or "")
                    bar.update()
        finally:
            for w in (*writers, held) if held else writers:
                w.close()
        total = {k: sum(c[k] for c in per_source.values()) for k in ("in", "kept", "rejected", "heldout")}
        if total["kept"] == 0:
            raise InputError("ingest: no usable example in any source (see the reasons above)")
        n_dup = writers[2].n
        out.counts = total | {"duplicates": n_dup, "sources": per_source}
        log.info("ingest: total in=%d = kept %d + rejected %d; %d exact duplicate(s)%s",
                 total["in"], total["kept"], total["rejected"], n_dup,
                 " dropped" if cfg.drop_duplicates else " kept (ingest.drop_duplicates: false)")
        if held:
            log.info("ingest: %d example(s) held out for evaluation (ingest.heldout.fraction=%g)%s",
                     total["heldout"], cfg.heldout.fraction,
                     ", not in examples.parquet" if cfg.heldout.exclude else ", also kept in the pool")
