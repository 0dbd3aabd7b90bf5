"""Property-based fuzz of every reader through the ingest stage (issue 11, item 7).

For each format a valid file of instruction records is built, corrupted at random
(truncation, flipped bytes, garbage lines/elements, a BOM, CRLF line ends, huge
fields, invalid UTF-8 in the instruction, id or quality field), and ingested. Each
example asserts:

- no exception escapes (an unreadable file may only be a named ``InputError``);
- every intact record of the original is kept, with its content;
- ``in == kept + rejected``, and ``in`` equals the records an oracle in this file
  counts independently of the readers (lines, CSV rows by a quote-aware state
  machine, list elements by the units the test wrote, Parquet rows by the writer).

"Structure-preserving" damage (which never creates or destroys a quote, bracket,
comma or line break in JSON, nor a quote in CSV) gets the exact oracle; arbitrary
damage (any byte anywhere) gets the weaker one (no escape, intact records away
from the damage kept, in = kept + rejected). Totals over a run are printed at the
end of the module (``pytest -s``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage_runs import run

from mixray.config import IngestConfig
from mixray.errors import InputError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOTALS: Counter = Counter()
BOM = b"\xef\xbb\xbf"
HUGE = 200_000  # over csv's default 131,072-character field limit
JSON_STRUCTURAL = set(b'{}[]",\\\r\n')
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)

EXAMPLES, REJECTS = "examples.parquet", "rejects.parquet"


def run_ingest(cfg, run_dir: Path, force: bool = False) -> dict:
    return run("ingest", run_dir, force=force, ingest=cfg)


@dataclass
class Unit:
    """One record's bytes in the file (or a garbage unit), and whether it is untouched."""

    data: bytes
    key: tuple[str, str] | None  # (instruction, output) of an original record
    intact: bool = True
    bad_utf8_only: bool = False


@pytest.fixture(scope="module", autouse=True)
def _print_totals():
    yield
    print(f"\nfuzz totals: {dict(sorted(TOTALS.items()))}")


# --- building and damaging files ---------------------------------------------------------------

@st.composite
def records(draw) -> list[dict]:
    texts = draw(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=8))
    huge = draw(st.none() | st.integers(0, len(texts) - 1))
    out = []
    for i, (a, b) in enumerate(texts):
        output = f"a{i} {b}" + ("x" * HUGE if i == huge else "")
        out.append({"id": f"r{i}", "instruction": f"q{i} {a}", "output": output,
                    "score": draw(st.integers(0, 1000)) / 8})
    return out


FIELDS = {"id": "id", "quality": "score"}


def _csv_line(cells: list[str], crlf: bool) -> bytes:
    # "\r\n" as the writer's terminator makes it quote every cell holding a CR or LF
    b = io.StringIO()
    csv.writer(b, lineterminator="\r\n").writerow(cells)
    return b.getvalue().encode() if crlf else b.getvalue().encode()[:-2] + b"\n"


def _encode(fmt: str, recs: list[dict], draw) -> tuple[bytes, list[Unit], bytes]:
    """(head, units, tail) of a valid file of ``fmt``."""
    keys = [(r["instruction"], r["output"]) for r in recs]
    if fmt == "csv":
        crlf = draw(st.booleans())
        rows = [_csv_line([r["id"], r["instruction"], r["output"], str(r["score"])], crlf) for r in recs]
        head = _csv_line(["id", "instruction", "output", "score"], crlf)
        return head, [Unit(d, k) for d, k in zip(rows, keys, strict=True)], b""
    ascii_ = draw(st.booleans())
    lines = [json.dumps(r, ensure_ascii=ascii_).encode() for r in recs]
    if fmt == "jsonl":
        return b"", [Unit(d + b"\n", k) for d, k in zip(lines, keys, strict=True)], b""
    sep = draw(st.sampled_from([b",\n ", b", ", b","]))
    units = [Unit(d + sep, k) for d, k in zip(lines, keys, strict=True)]
    units[-1].data = units[-1].data[: -len(sep)]
    return b"[" + sep[1:], units, b"\n]\n"


def _garbage(fmt: str, structural: bool, draw) -> bytes:
    if structural:
        junk = draw(st.binary(min_size=1, max_size=40))
    elif fmt == "json":
        junk = draw(st.sampled_from([b"nonsense 12", b"42", b"null", b'"a string"', b'{"x": 1}',
                                     b"{'single': 'quotes'}", b'{"instruction": 7, "output": []}',
                                     b"\xff\xfe garbage"]))
    else:
        junk = draw(st.binary(min_size=1, max_size=40).map(
            lambda b: bytes(c for c in b if c not in b'"\r\n') or b"junk"))
    if fmt == "json":
        return junk + b",\n "
    return junk.replace(b"\n", b" ") + b"\n" if not structural else junk + b"\n"


def _damage(fmt: str, units: list[Unit], structural: bool, draw) -> None:
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "garbage", "bad_utf8"]))
        k = draw(st.integers(0, len(units) - 1))
        u = units[k]
        if op == "garbage":
            units.insert(k, Unit(_garbage(fmt, structural, draw), None))
        elif op == "bad_utf8" and u.key is not None:
            field = draw(st.sampled_from([b"q", b"r", b"score"]))
            at = u.data.find(field)
            if fmt == "csv" and field == b"score":
                at = u.data.rstrip(b"\n").rfind(b",") + 1
            elif field == b"score":
                at = u.data.find(b":", at) + 2
            else:
                at += 1
            u.data = u.data[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80"])) + u.data[at:]
            u.bad_utf8_only, u.intact = u.intact, False
        elif op == "flip":
            body = len(u.data.rstrip(b",\n "))
            if body == 0:
                continue
            at = draw(st.integers(0, body - 1))
            new = draw(st.integers(0, 255))
            avoid = JSON_STRUCTURAL if fmt == "json" else set(b'"\r\n') if fmt == "csv" else set(b"\n")
            if not structural and (new in avoid or u.data[at] in avoid):
                continue
            if new == u.data[at]:
                continue
            u.data = u.data[:at] + bytes([new]) + u.data[at + 1:]
            u.intact = u.bad_utf8_only = False


@st.composite
def damaged_file(draw, fmt: str, structural: bool):
    recs = draw(records())
    head, units, tail = _encode(fmt, recs, draw)
    _damage(fmt, units, structural, draw)
    if fmt == "jsonl" and draw(st.booleans()):  # CRLF line ends (CSV: drawn in _encode)
        head = head.replace(b"\n", b"\r\n")
        for u in units:
            u.data = u.data.replace(b"\n", b"\r\n")
    bom = draw(st.booleans())
    data = (BOM if bom else b"") + head + b"".join(u.data for u in units) + tail
    cut = draw(st.none() | st.integers(0, len(data)))
    return recs, head, units, data, cut, bom


# --- the oracles ---------------------------------------------------------------------------

def _lines_oracle(data: bytes) -> int:
    return sum(1 for line in data.removeprefix(BOM).split(b"\n") if line.strip(b" \t\r\n"))


def _csv_oracle(data: bytes) -> tuple[int, bool]:
    """(data rows, ended inside a quoted cell): RFC 4180 rows as Python's csv reads them."""
    rows, state, seen = 0, "start", False
    for c in data.removeprefix(BOM).decode("utf-8", "surrogateescape") + "\n":
        if state == "quoted":
            state = "quote?" if c == '"' else "quoted"
            continue
        if state == "quote?" and c == '"':
            state = "quoted"
            continue
        if c in "\r\n":
            rows, seen, state = rows + seen, False, "start"
        elif c == '"' and state == "start":
            state, seen = "quoted", True
        else:
            state = "start" if c == "," else "field"
            seen = True
    return rows - 1 if rows else 0, state == "quoted"


def _intact_keys(units: list[Unit], start: int, cut: int | None, whole: bool) -> set:
    """Keys of untouched records that end before the cut (with their terminator when ``whole``)."""
    keys, at = set(), start
    for u in units:
        end = at + len(u.data) if whole else at + len(u.data.rstrip(b",\n\r "))
        if u.intact and u.key is not None and (cut is None or end <= cut):
            keys.add(u.key)
        at += len(u.data)
    return keys


# --- running ingest -------------------------------------------------------------------------

def _ingest(path: Path, **source) -> tuple[dict, list[dict], list[dict]] | InputError:
    with tempfile.TemporaryDirectory() as run:
        cfg = IngestConfig.model_validate({"sources": [{"name": "f", "path": str(path), **source}]})
        try:
            m = run_ingest(cfg, Path(run))
        except InputError as e:  # a named error (e.g. nothing usable, an unreadable file)
            return e
        d = Path(run) / "ingest"
        return m, pq.read_table(d / EXAMPLES).to_pylist(), pq.read_table(d / REJECTS).to_pylist()


def _check(got, intact: set, n_in: int | None, at_least: bool = False) -> None:
    if isinstance(got, InputError):  # nothing kept at all
        assert not intact and "no usable example" in str(got), str(got)
        TOTALS["named errors"] += 1
        return
    m, ex, rj = got
    c = m["counts"]
    assert c["in"] == c["kept"] + c["rejected"] == len(ex) + len(rj)
    kept = {(e["instruction"], e["output"]) for e in ex}
    assert intact <= kept, sorted(intact - kept)[:3]
    if n_in is not None:
        assert c["in"] >= n_in if at_least else c["in"] == n_in, (c, n_in)
    TOTALS["files"] += 1
    for k in ("in", "kept", "rejected"):
        TOTALS[k] += c[k]
    TOTALS["intact records checked"] += len(intact)


def _run_text(fmt: str, case, gz: bool, structural: bool) -> None:
    recs, head, units, data, cut, bom = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / (f"data.{fmt}" + (".gz" if gz else ""))
        if gz:
            packed = gzip.compress(data, mtime=0)
            packed = packed if cut is None else packed[: cut * len(packed) // max(len(data), 1)]
            path.write_bytes(packed)
            data, whole = zlib.decompressobj(wbits=31).decompress(packed), True
        else:
            path.write_bytes(data if cut is None else data[:cut])
            data, whole = (data if cut is None else data[:cut]), fmt == "csv"
        intact = _intact_keys(units, len(BOM) * bom + len(head), len(data), whole)
        if fmt == "jsonl":
            n_in, at_least = _lines_oracle(data), False
        elif fmt == "csv":
            n_in, at_least = _csv_oracle(data)
        else:
            n_in, at_least = _json_oracle(units, len(BOM) * bom + len(head), len(data)), False
        _check(_ingest(path, fields=FIELDS), intact, n_in if structural else None, at_least)


def _json_oracle(units: list[Unit], start: int, end: int) -> int:
    """Elements the test wrote that begin before the end of the (possibly cut) file."""
    n, at = 0, start
    for u in units:
        n += at < end and bool(u.data[: max(end - at, 0)].strip(b",\n\r "))
        at += len(u.data)
    return n


# --- the properties -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
@FUZZ
@given(data=st.data())
def test_fuzz_text_formats_structure_preserving_damage(fmt, data):
    _run_text(fmt, data.draw(damaged_file(fmt, structural=False)), gz=False, structural=True)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
@FUZZ
@given(data=st.data())
def test_fuzz_text_formats_arbitrary_damage(fmt, data):
    _run_text(fmt, data.draw(damaged_file(fmt, structural=True)), gz=False, structural=False)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@FUZZ
@given(data=st.data())
def test_fuzz_gzip_truncated_and_damaged(fmt, data):
    _run_text(fmt, data.draw(damaged_file(fmt, structural=False)), gz=True, structural=True)


@FUZZ
@given(recs=records(), bad=st.lists(st.tuples(st.integers(0, 7), st.sampled_from(
    ["instruction", "output", "id"])), max_size=3), groups=st.integers(1, 4))
def test_fuzz_parquet_invalid_utf8_and_huge_fields(recs, bad, groups):
    cols = {k: [r[k].encode() for r in recs] for k in ("id", "instruction", "output")}
    hit = set()
    for row, field in bad:
        if row < len(recs):
            cols[field][row] = b"\xff" + cols[field][row]
            hit.add(row)
    # string columns holding bytes that are not UTF-8 (pyarrow writes them unchecked)
    table = pa.table({k: pa.Array.from_buffers(pa.string(), len(v), pa.array(v, pa.binary()).buffers())
                      for k, v in cols.items()} | {"score": [r["score"] for r in recs]})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.parquet"
        pq.write_table(table, path, row_group_size=max(1, len(recs) // groups))
        got = _ingest(path, fields=FIELDS)
        intact = {(r["instruction"], r["output"]) for i, r in enumerate(recs) if i not in hit}
        _check(got, intact, len(recs))
        if not isinstance(got, InputError):
            assert {x["row"] for x in got[2]} == {i + 1 for i in hit}
            assert {x["reason"] for x in got[2]} <= {"invalid_utf8"}


@FUZZ
@given(recs=records(), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1,
                                      max_size=4))
def test_fuzz_parquet_damaged_pages(recs, flips):
    """Damage in the data pages: a named error, or every row the metadata declares is accounted for."""
    table = pa.table({k: [r[k] for r in recs] for k in ("id", "instruction", "output", "score")})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.parquet"
        pq.write_table(table, path, row_group_size=2, compression="none")
        meta = pq.ParquetFile(path).metadata
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        starts = [min(c.dictionary_page_offset or c.data_page_offset for c in
                      (g.column(i) for i in range(g.num_columns))) for g in groups]
        ends = [s + sum(g.column(i).total_compressed_size for i in range(g.num_columns))
                for s, g in zip(starts, groups, strict=True)]
        raw = bytearray(path.read_bytes())
        damaged = set()
        for where, byte in flips:
            at = 4 + int(where * (ends[-1] - 5))
            raw[at] = byte
            damaged |= {g for g, (s, e) in enumerate(zip(starts, ends, strict=True)) if s <= at < e}
        path.write_bytes(bytes(raw))
        got = _ingest(path, fields=FIELDS)
        if isinstance(got, InputError) and "Parquet" in str(got):
            TOTALS["named errors"] += 1
            return
        intact = {(r["instruction"], r["output"]) for i, r in enumerate(recs) if i // 2 not in damaged}
        _check(got, intact, len(recs))
