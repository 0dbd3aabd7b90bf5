"""The run directory: atomic outputs, manifest written last, skip keys."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixray.errors import InputError
from mixray.io.rundir import (
    fingerprint,
    is_complete,
    output_hash,
    read_manifest,
    stage_run,
    write_table,
)


def test_completed_stage_has_manifest_and_outputs(tmp_path):
    d = tmp_path / "s"
    with stage_run(d, "cfg", {"in": "h"}) as run:
        write_table(pa.table({"x": [1, 2]}), run.tmp_path("out.parquet"))
        run.counts = {"in": 2, "out": 2}
    m = read_manifest(d)
    assert m["counts"] == {"in": 2, "out": 2} and "out.parquet" in m["outputs"]
    assert m["versions"]["pyarrow"] and m["wall_time_s"] >= 0
    assert is_complete(d, fingerprint("cfg", {"in": "h"}))
    assert not is_complete(d, fingerprint("cfg2", {"in": "h"}))
    assert not is_complete(d, fingerprint("cfg", {"in": "other"}))
    assert output_hash(d, "out.parquet") == m["outputs"]["out.parquet"]
    (d / "out.parquet").write_bytes(b"tampered")
    assert not is_complete(d, fingerprint("cfg", {"in": "h"}))


def test_interrupted_stage_leaves_the_previous_outputs_as_they_were(tmp_path):
    d = tmp_path / "s"
    with stage_run(d, "cfg", {}) as run:
        write_table(pa.table({"x": [1]}), run.tmp_path("out.parquet"))
    before = read_manifest(d)
    with pytest.raises(KeyboardInterrupt), stage_run(d, "cfg2", {}) as run:
        write_table(pa.table({"x": [1, 2]}), run.tmp_path("out.parquet"))
        raise KeyboardInterrupt
    assert read_manifest(d) == before  # still vouches for the previous, intact output
    assert is_complete(d, fingerprint("cfg", {})) and not is_complete(d, fingerprint("cfg2", {}))
    assert pq.read_table(d / "out.parquet").num_rows == 1
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []


def test_a_stage_never_run_has_no_output_to_trust(tmp_path):
    d = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt), stage_run(d, "cfg", {}) as run:
        write_table(pa.table({"x": [1, 2]}), run.tmp_path("out.parquet"))
        raise KeyboardInterrupt
    assert read_manifest(d) is None and not is_complete(d, fingerprint("cfg", {}))
    with pytest.raises(InputError, match="run the 's' stage first"):
        output_hash(d, "out.parquet")
