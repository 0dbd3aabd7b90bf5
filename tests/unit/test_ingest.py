"""Ingestion: every format, every reject reason, in == kept + rejected, stable ids, skip/resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from packaged_data import pkg_source, records
from stage_runs import run

from mixray.config import IngestConfig
from mixray.errors import InputError

EXAMPLES, REJECTS = "examples.parquet", "rejects.parquet"


def run_ingest(cfg: IngestConfig, run_dir: Path, force: bool = False) -> dict:
    return run("ingest", run_dir, force=force, ingest=cfg)


def _ingest(tmp_path: Path, sources: list[dict], **kw) -> tuple[dict, pa.Table, pa.Table]:
    cfg = IngestConfig.model_validate({"sources": sources, **kw})
    m = run_ingest(cfg, tmp_path / "run")
    d = tmp_path / "run" / "ingest"
    return m, pq.read_table(d / EXAMPLES), pq.read_table(d / REJECTS)


@pytest.fixture
def corrupted_jsonl(tmp_path: Path) -> Path:
    """One good record and one of each kind of bad record, with a known line for each."""
    lines = [
        json.dumps({"id": "a", "instruction": "Name a colour.", "output": "Red."}),            # 1 ok
        b'{"id": "b", "instruction": "cut off mid-way", "outp',                               # 2 unparseable
        json.dumps({"id": "c", "instruction": 42, "output": "x"}),                            # 3 wrong type
        json.dumps({"id": "d", "instruction": "Say nothing.", "output": ""}),                 # 4 empty
        b'{"id": "e", "instruction": "caf\xe9 latin-1", "output": "x"}',                      # 5 invalid utf-8
        json.dumps({"id": "a", "instruction": "Another.", "output": "Dup id."}),              # 6 duplicate id
        json.dumps(["not", "an", "object"]),                                                  # 7 not an object
        b"",                                                                                  # 8 blank: skipped
        json.dumps({"id": "f", "output": "no instruction"}),                                  # 9 missing
        json.dumps({"id": "g", "instruction": "Name a fruit.", "output": "Apple."}),          # 10 ok
    ]
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return p


def test_corrupted_jsonl_every_reason_nothing_lost(tmp_path, corrupted_jsonl):
    m, ex, rj = _ingest(tmp_path, [{"name": "bad", "path": str(corrupted_jsonl),
                                    "fields": {"id": "id"}}])
    src = m["counts"]["sources"]["bad"]
    assert src["in"] == 9 == src["kept"] + src["rejected"]
    assert ex.column("id").to_pylist() == ["bad/a", "bad/g"]
    by_line = {r["line"]: r for r in rj.to_pylist()}
    assert {k: v["reason"] for k, v in by_line.items()} == {
        2: "unparseable", 3: "wrong_type", 4: "empty_field", 5: "invalid_utf8",
        6: "duplicate_id", 7: "not_an_object", 9: "missing_field"}
    assert all(r["file"] == str(corrupted_jsonl) and r["source"] == "bad" for r in by_line.values())
    assert "already used by record 1" in by_line[6]["detail"]
    assert "cut off" in by_line[2]["raw"]
    assert src["reasons"] == {"duplicate_id": 1, "empty_field": 1, "invalid_utf8": 1,
                              "missing_field": 1, "not_an_object": 1, "unparseable": 1,
                              "wrong_type": 1}


def test_missing_file_is_named(tmp_path):
    cfg = IngestConfig.model_validate({"sources": [
        {"name": "gone", "path": str(tmp_path / "nope.jsonl")},
        {"name": "gone2", "path": "pkg://no_such_package_xyz/data.json"}]})
    with pytest.raises(InputError) as e:
        run_ingest(cfg, tmp_path / "run")
    assert "ingest.sources[gone].path" in str(e.value) and "nope.jsonl" in str(e.value)
    assert "no_such_package_xyz" in str(e.value)


def test_json_list_cut_off_keeps_complete_elements(tmp_path):
    p = tmp_path / "cut.json"
    good = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    p.write_text(json.dumps(good)[:-1] + ', {"instruction": "q3", "outp')
    m, ex, rj = _ingest(tmp_path, [{"name": "cut", "path": str(p)}])
    assert ex.column("instruction").to_pylist() == ["q0", "q1", "q2"]
    assert rj.column("reason").to_pylist() == ["unparseable"]
    assert m["counts"]["in"] == 4


def test_csv_parquet_and_hf_dir(tmp_path):
    import datasets

    csv_p = tmp_path / "d.csv"
    csv_p.write_text('question,answer\n"1+1?","2"\n"2+2?","4",extra\n"3+3?",""\n')
    pq_p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b", None], "input": ["", "x", ""],
                             "output": ["A", "B", "C"]}), pq_p)
    hf_p = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"prompt": ["p1", "p2"], "completion": ["c1", "c2"]})}).save_to_disk(str(hf_p))
    m, ex, rj = _ingest(tmp_path, [
        {"name": "csv", "path": str(csv_p), "fields": {"instruction": "question", "input": None,
                                                       "output": "answer"}},
        {"name": "pq", "path": str(pq_p)},
        {"name": "hf", "path": str(hf_p), "fields": {"instruction": "prompt", "input": None,
                                                     "output": "completion"}},
    ])
    s = m["counts"]["sources"]
    assert (s["csv"]["kept"], s["csv"]["rejected"]) == (1, 2)
    assert (s["pq"]["kept"], s["pq"]["rejected"]) == (2, 1)
    assert (s["hf"]["kept"], s["hf"]["rejected"]) == (2, 0)
    got = {(r["source"], r["reason"], r["line"], r["row"]) for r in rj.to_pylist()}
    assert got == {("csv", "unparseable", 3, 2), ("csv", "empty_field", 4, 3),
                   ("pq", "missing_field", None, 3)}
    assert ex.filter(pa.compute.equal(ex["source"], "pq"))["input"].to_pylist() == ["", "x"]


def test_ids_stable_across_runs_and_independent_of_other_records(tmp_path):
    p1 = tmp_path / "one.jsonl"
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    p1.write_text("\n".join(json.dumps(r) for r in recs))
    p2 = tmp_path / "two.jsonl"  # same records, reversed, plus one more in front
    p2.write_text("\n".join(json.dumps(r) for r in [{"instruction": "new", "output": "x"}] + recs[::-1]))
    _, ex1, _ = _ingest(tmp_path / "r1", [{"name": "s", "path": str(p1)}])
    _, ex2, _ = _ingest(tmp_path / "r2", [{"name": "s", "path": str(p2)}])
    ids1 = dict(zip(ex1["instruction"].to_pylist(), ex1["id"].to_pylist(), strict=True))
    ids2 = dict(zip(ex2["instruction"].to_pylist(), ex2["id"].to_pylist(), strict=True))
    assert all(ids1[k] == ids2[k] for k in ids1)


def test_exact_duplicates_reported_and_dropped_only_when_asked(tmp_path):
    p = tmp_path / "d.jsonl"
    r = {"instruction": "same", "output": "same"}
    p.write_text("\n".join(json.dumps(x) for x in [r, {"instruction": "o", "output": "o"}, r]))
    m, ex, rj = _ingest(tmp_path / "keep", [{"name": "s", "path": str(p)}])
    assert len(ex) == 3 and m["counts"]["duplicates"] == 1 and len(rj) == 0
    dup = pq.read_table(tmp_path / "keep" / "run" / "ingest" / "duplicates.parquet").to_pylist()
    assert dup == [{"id": ex["id"][2].as_py(), "duplicate_of": ex["id"][0].as_py()}]
    m, ex, rj = _ingest(tmp_path / "drop", [{"name": "s", "path": str(p)}], drop_duplicates=True)
    assert len(ex) == 2 and rj.column("reason").to_pylist() == ["exact_duplicate"]
    assert m["counts"]["in"] == m["counts"]["kept"] + m["counts"]["rejected"]


def test_skip_when_unchanged_recompute_when_input_or_config_changes(tmp_path, corrupted_jsonl):
    src = [{"name": "bad", "path": str(corrupted_jsonl), "fields": {"id": "id"}}]
    cfg = IngestConfig.model_validate({"sources": src})
    run = tmp_path / "run"
    assert run_ingest(cfg, run)["skipped"] is False
    assert run_ingest(cfg, run)["skipped"] is True
    assert run_ingest(IngestConfig.model_validate({"sources": src, "drop_duplicates": True}),
                      run)["skipped"] is False
    with open(corrupted_jsonl, "a") as f:
        f.write(json.dumps({"id": "z", "instruction": "new", "output": "new"}) + "\n")
    m = run_ingest(IngestConfig.model_validate({"sources": src, "drop_duplicates": True}), run)
    assert m["skipped"] is False and m["counts"]["kept"] == 3


def test_real_mdit_tasks(tmp_path):
    """The three MDIT tasks from the data-carrying packages load through pkg:// with their field maps."""
    m, ex, rj = _ingest(tmp_path, [pkg_source("general", "sharegpt", limit=2000),
                                   pkg_source("math", "gsm8k"), pkg_source("code", "humaneval")])
    s = m["counts"]["sources"]
    assert (s["sharegpt"]["in"], s["gsm8k"]["in"], s["humaneval"]["in"]) == (2000, 1319, 164)
    assert (s["gsm8k"]["kept"], s["humaneval"]["kept"]) == (1319, 164)
    for c in s.values():
        assert c["in"] == c["kept"] + c["rejected"]
    assert len(ex) + len(rj) == 2000 + 1319 + 164
    assert set(rj["reason"].to_pylist()) == {"bad_conversation"}  # no human turn + reply
    assert len(set(ex["id"].to_pylist())) == len(ex)
    assert set(ex["task"].to_pylist()) == {"general", "math", "code"}
    # the same records as an independent reader of the packaged files, in file order
    by_source = {k: ex.filter(pc.equal(ex["source"], k)) for k in ("sharegpt", "gsm8k", "humaneval")}
    for source, task in (("sharegpt", "general"), ("gsm8k", "math"), ("humaneval", "code")):
        t = by_source[source]
        want = records(task, t.num_rows)
        assert t["instruction"].to_pylist() == [r["instruction"] for r in want]
        assert t["output"].to_pylist() == [r["output"] for r in want]
    assert by_source["humaneval"]["id"][0].as_py() == "humaneval/HumanEval/0"




def test_heldout_split_by_id_hash_is_stable_and_out_of_the_pool(tmp_path):
    """ingest.heldout: the evaluation split is chosen by a hash of the id (the same ids whatever the
    pool's order or size), written to heldout.parquet and, by default, kept out of examples.parquet."""
    from mixray.contracts import in_eval_split

    rows = [_alpaca(i) for i in range(400)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m, ex, _ = _ingest(tmp_path, [{"name": "a", "path": str(tmp_path / "a.jsonl")}],
                       heldout={"fraction": 0.2})
    held = pq.read_table(tmp_path / "run" / "ingest" / "heldout.parquet")
    c = m["counts"]
    assert c["kept"] == 400 == len(ex) + len(held) and c["heldout"] == len(held) == c["sources"]["a"]["heldout"]
    assert 50 < len(held) < 110  # ~ 0.2 * 400
    assert not set(held["id"].to_pylist()) & set(ex["id"].to_pylist())
    assert all(in_eval_split(i, 0.2) for i in held["id"].to_pylist())
    assert not any(in_eval_split(i, 0.2) for i in ex["id"].to_pylist())
    # the same ids go to the split when the pool is reversed and cut (ids are content-derived)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1][:300]))
    sub = tmp_path / "sub"
    sub.mkdir()
    _ingest(sub, [{"name": "a", "path": str(tmp_path / "b.jsonl")}], heldout={"fraction": 0.2})
    held2 = pq.read_table(sub / "run" / "ingest" / "heldout.parquet")["id"].to_pylist()
    assert set(held2) == set(held["id"].to_pylist()) & set(held2) and len(held2) < len(held)
    # exclude: false keeps them in the pool as well
    both = tmp_path / "both"
    both.mkdir()
    _, ex3, _ = _ingest(both, [{"name": "a", "path": str(tmp_path / "a.jsonl")}],
                        heldout={"fraction": 0.2, "exclude": False})
    assert len(ex3) == 400


# --- issue 11: readers never stop early, nothing lost, no traceback ---------------------------

def _alpaca(i: int) -> dict:
    return {"instruction": f"q{i}", "output": f"a{i}"}


def test_json_list_bad_element_mid_list_does_not_drop_the_rest(tmp_path):
    """Issue 11: one malformed element in the middle of a JSON list stopped the reader there."""
    elems = [json.dumps(_alpaca(i)) for i in range(10)]
    elems[3] = '{"instruction": "q3", "output": a3}'  # unquoted value: not JSON
    p = tmp_path / "l.json"
    p.write_text("[\n" + ",\n".join(elems) + "\n]\n")
    m, ex, rj = _ingest(tmp_path, [{"name": "l", "path": str(p)}])
    assert (m["counts"]["in"], m["counts"]["kept"], m["counts"]["rejected"]) == (10, 9, 1)
    assert ex.column("instruction").to_pylist() == [f"q{i}" for i in range(10) if i != 3]
    assert rj.to_pylist()[0] | {"detail": None} == {
        "source": "l", "file": str(p), "line": 5, "row": 4, "reason": "unparseable",
        "detail": None, "raw": '{"instruction": "q3", "output": a3}'}


def test_csv_cell_over_the_default_field_limit_is_kept_and_later_rows_read(tmp_path):
    """Issue 11: a cell over csv's 131,072-character default limit ended the loop."""
    p = tmp_path / "big.csv"
    big = "x" * 200_000
    rows = [f"q{i},a{i}" for i in range(7)]
    rows[2] = f'q2,"{big}"'
    p.write_text("instruction,output\n" + "\n".join(rows) + "\n")
    m, ex, rj = _ingest(tmp_path, [{"name": "c", "path": str(p)}])
    assert (m["counts"]["in"], m["counts"]["kept"], m["counts"]["rejected"]) == (7, 7, 0)
    assert ex.column("output").to_pylist()[2] == big


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_utf8_bom_loses_nothing(tmp_path, fmt):
    """Issue 11: a BOM cost JSONL its first record and CSV every row (header '\\ufeffinstruction')."""
    recs = [_alpaca(i) for i in range(3)]
    text = {"jsonl": "\n".join(json.dumps(r) for r in recs) + "\n",
            "json": json.dumps(recs),
            "csv": "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in recs),
            }[fmt]
    p = tmp_path / f"bom.{fmt}"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    m, ex, rj = _ingest(tmp_path, [{"name": "b", "path": str(p)}])
    assert (m["counts"]["in"], m["counts"]["kept"]) == (3, 3), rj.to_pylist()
    assert ex.column("instruction").to_pylist() == ["q0", "q1", "q2"]


def test_csv_quality_column_is_coerced_to_a_number(tmp_path):
    """Issue 11: CSV values are strings, so every row was rejected as wrong_type."""
    p = tmp_path / "q.csv"
    p.write_text("instruction,output,score\nq0,a0,0.5\nq1,a1, 2 \nq2,a2,high\nq3,a3,\nq4,a4,nan\nq5,a5,-1e-3\n")
    m, ex, rj = _ingest(tmp_path, [{"name": "q", "path": str(p), "fields": {"quality": "score"}}])
    assert ex.column("quality").to_pylist() == [0.5, 2.0, -0.001]
    assert {(r["line"], r["reason"]) for r in rj.to_pylist()} == {
        (4, "wrong_type"), (5, "missing_field"), (6, "wrong_type")}


def test_truncated_jsonl_gz_keeps_every_complete_line(tmp_path):
    """Issue 11: a truncated .jsonl.gz raised EOFError; nothing was ingested."""
    import gzip

    text = "".join(json.dumps(_alpaca(i)) + "\n" for i in range(40)).encode()
    whole = gzip.compress(text, mtime=0)
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(whole[: len(whole) * 2 // 3])
    readable = _gunzip_prefix(p.read_bytes())
    complete = readable.count(b"\n")
    assert 5 < complete < 40
    m, ex, rj = _ingest(tmp_path, [{"name": "g", "path": str(p)}])
    assert ex.column("instruction").to_pylist() == [f"q{i}" for i in range(complete)]
    assert rj.column("reason").to_pylist() == ["unparseable"]
    assert "cut off" in rj.column("detail")[0].as_py() and rj.column("line")[0].as_py() == complete + 1
    assert m["counts"]["in"] == complete + 1


def _gunzip_prefix(data: bytes) -> bytes:
    import zlib

    return zlib.decompressobj(wbits=31).decompress(data)


def test_invalid_utf8_in_the_id_field_is_a_reject_not_a_traceback(tmp_path):
    """Issue 11: invalid UTF-8 in the id field raised UnicodeEncodeError and aborted the ingest."""
    p = tmp_path / "id.jsonl"
    p.write_bytes(b'{"id": "ok", "instruction": "q", "output": "a"}\n'
                  b'{"id": "b\xff\xfe", "instruction": "q2", "output": "a2"}\n')
    m, ex, rj = _ingest(tmp_path, [{"name": "s", "path": str(p), "fields": {"id": "id"}}])
    assert ex.column("id").to_pylist() == ["s/ok"]
    assert [(r["line"], r["reason"]) for r in rj.to_pylist()] == [(2, "invalid_utf8")]
    assert "(id)" in rj.column("detail")[0].as_py()


def test_empty_source_gives_a_warning(tmp_path, caplog):
    """Issue 11: an empty source was accepted without a word."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    full = tmp_path / "full.jsonl"
    full.write_text(json.dumps(_alpaca(0)) + "\n")
    with caplog.at_level("WARNING", logger="mixray.ingest"):
        m, _, _ = _ingest(tmp_path, [{"name": "e", "path": str(empty)}, {"name": "f", "path": str(full)}])
    assert m["counts"]["sources"]["e"]["in"] == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("e" in w and str(empty) in w and "no record" in w for w in warned), warned


def test_csv_first_row_is_reported_at_its_own_line(tmp_path):
    """Issue 11: the first CSV row was reported at the header's line (1)."""
    p = tmp_path / "l.csv"
    p.write_text('instruction,output\nq0,\n"multi\nline",a1\nq2,\n')
    _, _, rj = _ingest(tmp_path, [{"name": "c", "path": str(p)}])
    assert [(r["line"], r["row"]) for r in rj.to_pylist()] == [(2, 1), (5, 3)]
