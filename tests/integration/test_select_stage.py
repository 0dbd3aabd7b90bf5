"""The select stage through a run directory, resume after a kill, and selection over Ray actors.

The run directory is assembled from real data: 480 examples from the data-carrying packages
(tests/packaged_data.py: ShareGPT, HumanEval, GSM8K), their committed MiniLM embeddings
(tests/data/qdit_minilm.npz) and a quality column (log length of the reference answer), each
written with its manifest as the ingest/embed/score stages would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packaged_data import qdit_pool
from stage_runs import run as run_stage_alone

from mixray.algorithms.qdit import QDITSelector, minmax, quality_order
from mixray.config import SelectConfig, load_config
from mixray.errors import ConfigError, InputError
from mixray.io.embeddings import embedding_array
from mixray.io.rundir import read_manifest, stage_run, write_table
from mixray.schema import EXAMPLE_SCHEMA
from mixray.stages import STAGES
from mixray.stages import select as sel_stage

DATA = Path(__file__).resolve().parents[1] / "data" / "qdit_minilm.npz"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_stages_select(cfg: SelectConfig, run_dir: Path, force: bool = False) -> dict:
    return run_stage_alone("select", run_dir, force=force, select=cfg)


def _write(run_dir: Path, stage: str, name: str, table: pa.Table) -> None:
    with stage_run(run_dir / stage, "test", {}) as run:
        write_table(table, run.tmp_path(name))


def make_run_dir(run_dir: Path, drop_quality: int | None = None,
                 extra_quality: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = qdit_pool()
    ids = [r["id"] for r in rows]
    z = np.load(DATA)
    # the committed rows belong to these examples (regenerate with tests/data/make_qdit_embeddings.py)
    assert z["source"].tolist() == [r["source"] for r in rows]
    assert z["output_chars"].tolist() == [len(r["output"]) for r in rows]
    emb = z["embeddings"].astype(np.float32)
    raw = np.log1p(z["output_chars"].astype(np.float64))
    _write(run_dir, "ingest", "examples.parquet", pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA))
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), emb.shape[1]))])
    _write(run_dir, "embed", "embeddings.parquet",
           pa.table({"id": ids, "embedding": embedding_array(emb)}, schema=schema))
    q_ids, q_raw = list(ids), list(raw)
    if drop_quality is not None:
        del q_ids[drop_quality], q_raw[drop_quality]
    if extra_quality:
        q_ids.append("ghost/1")
        q_raw.append(1.0)
    _write(run_dir, "score", "quality.parquet",
           pa.table({"id": q_ids, "raw": q_raw, "score": q_raw, "backend": ["column"] * len(q_ids)}))
    return ids, emb, raw


@pytest.fixture()
def run_dir(tmp_path):
    make_run_dir(tmp_path)
    return tmp_path


def test_select_is_a_registered_stage():
    assert STAGES["select"][0] == "mixray.stages.select:Select"
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml",
                      ["select.alpha=[0.0, 0.5]", "select.k=50"])
    assert cfg.select.alphas == [0.0, 0.5] and cfg.select.k == 50


@pytest.mark.parametrize("alpha, match", [
    ("[]", "alpha list is empty"), ("[0.5, 1.2]", r"alpha values must be in \[0, 1\], got \[1.2\]"),
    ("[0.5, 0.5]", "alpha values must be distinct"), ("-0.1", r"must be in \[0, 1\]"),
])
def test_select_config_rejects_bad_alpha(alpha, match):
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    with pytest.raises(ConfigError, match=match):
        load_config(demo, [f"select.alpha={alpha}"])
    with pytest.raises(ConfigError, match="select.optimzer: unknown key"):
        load_config(demo, ["select.optimzer=lazy"])


def test_sweep_labels_merge_points_that_would_overlap():
    # the demo's sweep: four alphas end within a few thousandths of each other
    xy = [(0.6996, 0.6264), (0.6563, 0.7854), (0.6435, 0.7886), (0.6414, 0.7887), (0.6394, 0.7888),
          (0.6394, 0.7888)]
    labels = sel_stage.sweep_labels(xy, [0.0, 0.05, 0.1, 0.2, 0.7, 1.0])
    assert labels == [(0.6996, 0.6264, "α=0"), (0.6563, 0.7854, "α=0.05"),
                      (0.6435, 0.7886, "α=0.1, 0.2, 0.7, 1")]
    assert sel_stage.sweep_labels([(0.5, 0.5)], [0.7]) == [(0.5, 0.5, "α=0.7")]  # one point, no span


def test_stage_alpha_sweep_outputs(run_dir):
    cfg = SelectConfig(k=30, alpha=[0.0, 0.7, 1.0], checkpoint_every=10, memory_budget_mb=8)
    m = run_stages_select(cfg, run_dir)
    out = run_dir / "select"
    assert m["skipped"] is False and m["counts"] == {"pool": 480, "selected": 30}
    main = pq.read_table(out / "selection.parquet")
    assert main.column_names == ["id", "rank", "gain", "score", "quality"]
    assert main.column("rank").to_pylist() == list(range(1, 31))
    assert main.equals(pq.read_table(out / "selection_alpha0.0.parquet"))
    for a in ("0.7", "1.0"):
        assert (out / f"selection_alpha{a}.parquet").is_file()
    # alpha = 1: the top-30 examples by normalised quality, best first
    z = np.load(DATA)
    q = minmax(np.log1p(z["output_chars"].astype(np.float64)))
    ids = pq.read_table(run_dir / "embed" / "embeddings.parquet").column("id").to_pylist()
    top = pq.read_table(out / "selection_alpha1.0.parquet")
    assert top.column("id").to_pylist() == [ids[i] for i in quality_order(q)[:30]]
    np.testing.assert_allclose(top.column("quality").to_numpy(), np.sort(q)[::-1][:30])
    # the same selection as the library call, with gains and scores
    ref = QDITSelector(30, 0.0, memory_budget_mb=8).fit(z["embeddings"].astype(np.float32))
    assert main.column("id").to_pylist() == [ids[i] for i in ref.ranking_]
    np.testing.assert_array_equal(main.column("gain").to_numpy(), ref.gains_)
    # selected.jsonl: the examples themselves, in rank order, in the example schema
    lines = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == main.column("id").to_pylist()
    assert set(lines[0]) == set(EXAMPLE_SCHEMA.names)
    examples = {r["id"]: r for r in pq.read_table(run_dir / "ingest" / "examples.parquet").to_pylist()}
    assert all(r == examples[r["id"]] for r in lines)
    # summary, sweep table and plot
    summ = {s["alpha"]: s for s in m["summary"]}
    assert set(summ) == {0.0, 0.7, 1.0} and m["alpha_main"] == 0.0
    assert summ[0.0]["objective"] == pytest.approx(ref.objective_)
    assert summ[0.0]["diversity"] > summ[0.7]["diversity"] >= summ[1.0]["diversity"]
    assert summ[1.0]["quality_mean"] >= summ[0.7]["quality_mean"] >= summ[0.0]["quality_mean"]
    table = (out / "alpha_sweep.csv").read_text().splitlines()
    assert table[0] == "alpha,objective,diversity,quality_mean,time_s" and len(table) == 5
    assert table[-1].startswith("random,nan,")
    assert (out / "alpha_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints").exists()
    again = run_stages_select(cfg, run_dir)
    assert again["skipped"] is True


class _Killed(Exception):
    pass


KILL_CFG = SelectConfig(k=40, alpha=0.5, checkpoint_every=8, memory_budget_mb=1)


@pytest.fixture(scope="module")
def clean_selection(tmp_path_factory) -> pa.Table:
    """The uninterrupted selection of KILL_CFG."""
    clean = tmp_path_factory.mktemp("clean")
    make_run_dir(clean)
    run_stages_select(KILL_CFG, clean)
    return pq.read_table(clean / "select" / "selection.parquet")


def _kill_after(monkeypatch, step: int, cfg: SelectConfig, run_dir: Path, force: bool = False) -> list[int]:
    """Run select until the checkpoint of ``step`` is written, then die (an exception, as a kill)."""
    real_save, saves = sel_stage.save_checkpoint, []

    def save_then_die(ckdir, alpha, state, fp, key):
        real_save(ckdir, alpha, state, fp, key)
        saves.append(state.step)
        if state.step == step:
            raise _Killed  # the process dies right after a checkpoint

    with monkeypatch.context() as m:
        m.setattr(sel_stage, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            run_stages_select(cfg, run_dir, force=force)
    return saves


def test_stage_resumes_after_a_kill(run_dir, clean_selection, monkeypatch, caplog):
    assert _kill_after(monkeypatch, 24, KILL_CFG, run_dir) == [8, 16, 24]
    assert read_manifest(run_dir / "select") is None
    ckdir = run_dir / "select" / "checkpoints"
    # the newest two checkpoints are kept, both in the signed record
    assert sorted(p.name for p in ckdir.iterdir()) == [
        "alpha0.5-step16.npz", "alpha0.5-step24.npz", "record.json"]
    assert set(json.loads((ckdir / "record.json").read_text())["files"]) == {
        "alpha0.5-step16.npz", "alpha0.5-step24.npz"}
    with caplog.at_level("INFO", logger="mixray.select"):
        run_stages_select(KILL_CFG, run_dir)
    assert "resuming from checkpoint at step 24 of 40" in caplog.text
    assert pq.read_table(run_dir / "select" / "selection.parquet").equals(clean_selection)
    assert not ckdir.exists()
    # a checkpoint from another config is ignored, not resumed
    _kill_after(monkeypatch, 24, KILL_CFG, run_dir, force=True)
    caplog.clear()
    with caplog.at_level("INFO", logger="mixray.select"):
        run_stages_select(SelectConfig.model_validate(KILL_CFG.model_dump() | {"k": 41}), run_dir)
    assert "ignoring" in caplog.text and "resuming" not in caplog.text
    assert "WARNING" not in caplog.text  # another config's checkpoints are not a fault


def _zero_length(ckdir: Path) -> None:
    (ckdir / "alpha0.5-step24.npz").write_bytes(b"")


def _truncated(ckdir: Path) -> None:
    p = ckdir / "alpha0.5-step24.npz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flipped_byte(ckdir: Path) -> None:
    p = ckdir / "alpha0.5-step24.npz"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside an array: np.load would read it without complaint
    p.write_bytes(bytes(data))


def _missing(ckdir: Path) -> None:
    (ckdir / "alpha0.5-step24.npz").unlink()


def _edited_record(ckdir: Path) -> None:
    """Someone points the record at a file of theirs: the MAC no longer verifies."""
    rec = json.loads((ckdir / "record.json").read_text())
    data = (ckdir / "alpha0.5-step24.npz").read_bytes()
    (ckdir / "alpha0.5-step32.npz").write_bytes(data)
    rec["files"]["alpha0.5-step32.npz"] = rec["files"]["alpha0.5-step24.npz"]
    rec["meta"]["alpha0.5-step32.npz"] = rec["meta"]["alpha0.5-step24.npz"] | {"step": 32}
    (ckdir / "record.json").write_text(json.dumps(rec))


def _foreign_record(ckdir: Path) -> None:
    """Checkpoints and a record made by another mixray key (another user or machine)."""
    from mixray.io.checkpoints import make_record

    rec = json.loads((ckdir / "record.json").read_text())
    other = make_record(rec["files"], rec["meta"], b"k" * 32)
    (ckdir / "record.json").write_text(json.dumps(other))


def _zero_length_record(ckdir: Path) -> None:
    (ckdir / "record.json").write_bytes(b"")


def _planted_newer_file(ckdir: Path) -> None:
    """A newer-looking checkpoint that the record does not list is never opened."""
    (ckdir / "alpha0.5-step32.npz").write_bytes(b"not what the run wrote")


@pytest.mark.parametrize("spoil, resumed_at, reason", [
    (_zero_length, 16, "alpha0.5-step24.npz: zero-length"),
    (_truncated, 16, "alpha0.5-step24.npz: its sha256 differs"),
    (_flipped_byte, 16, "alpha0.5-step24.npz: its sha256 differs"),
    (_missing, 16, "alpha0.5-step24.npz: missing"),
    (_planted_newer_file, 24, None),
    (_edited_record, None, "its signature does not verify"),
    (_foreign_record, None, "its signature does not verify"),
    (_zero_length_record, None, "unreadable checkpoint record"),
])
def test_a_spoilt_checkpoint_is_reported_and_the_last_good_one_used(
        run_dir, clean_selection, monkeypatch, caplog, spoil, resumed_at, reason):
    """Issue 11: a zero-length or truncated checkpoint gave an EOFError/BadZipFile traceback and
    the stage was stuck until --force. Now: one line, then the previous checkpoint or a fresh start."""
    _kill_after(monkeypatch, 24, KILL_CFG, run_dir)
    spoil(run_dir / "select" / "checkpoints")
    with caplog.at_level("INFO", logger="mixray.select"):
        run_stages_select(KILL_CFG, run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if reason is None:
        assert warnings == []
    else:
        assert len(warnings) >= 1 and reason in warnings[0] and "\n" not in warnings[0]
    if resumed_at is None:
        assert "resuming" not in caplog.text and "starting over" in warnings[-1]
    else:
        assert f"resuming from checkpoint at step {resumed_at} of 40" in caplog.text
    assert pq.read_table(run_dir / "select" / "selection.parquet").equals(clean_selection)


def test_checkpoint_round_trip_and_the_previous_format(tmp_path):
    """A checkpoint holds selected, gains, scores and the bit-exact running max; one written
    before the facility refactor (with its constant ``scale_exp`` field) still resumes."""
    from mixray.algorithms.facility import GreedyState
    from mixray.io.checkpoints import checkpoint_key

    z = np.load(DATA)
    x = z["embeddings"].astype(np.float32)[:120]
    states = []
    QDITSelector(12, 0.0, checkpoint_every=6, callback=states.append).fit(x)
    key = checkpoint_key(tmp_path / "key")
    sel_stage.save_checkpoint(tmp_path / "ck", 0.0, states[0], "fp", key)
    back = sel_stage.load_checkpoint(tmp_path / "ck", 0.0, "fp", key)
    assert isinstance(back, GreedyState) and back.step == 6
    np.testing.assert_array_equal(back.cur, states[0].cur)
    assert sel_stage.load_checkpoint(tmp_path / "ck", 0.0, "other", key) is None
    assert sel_stage.load_checkpoint(tmp_path / "ck", 0.5, "fp", key) is None  # another alpha
    assert sel_stage.load_checkpoint(tmp_path / "ck", 0.0, "fp", b"x" * 32) is None  # another key
    old = tmp_path / "old.npz"
    np.savez(old, selected=back.selected, gains=back.gains, scores=back.scores, cur=back.cur,
             scale_exp=np.int64(22), fingerprint=np.bytes_(b"fp"))
    resumed = QDITSelector(12, 0.0).fit(x, initial_state=sel_stage.read_state(old, "fp"))
    np.testing.assert_array_equal(resumed.ranking_, QDITSelector(12, 0.0).fit(x).ranking_)


def test_stage_rejects_mismatched_ids_and_large_k(tmp_path):
    a = tmp_path / "a"
    make_run_dir(a, drop_quality=5)
    with pytest.raises(InputError, match=r"1 id\(s\) in .*embeddings.parquet have no quality score .*\(first: sharegpt/5;"):
        run_stages_select(SelectConfig(k=10), a)
    b = tmp_path / "b"
    make_run_dir(b, extra_quality=True)
    with pytest.raises(InputError, match=r"1 id\(s\) in .*quality.parquet have no embedding .*ghost/1"):
        run_stages_select(SelectConfig(k=10), b)
    c = tmp_path / "c"
    make_run_dir(c)
    with pytest.raises(ConfigError, match=r"select.k=481 is larger than the pool \(480 examples"):
        run_stages_select(SelectConfig(k=481), c)


# -- over Ray actors ----------------------------------------------------------------------------------


def test_two_actors_equal_single_process(ray_session):
    """Sharded exact greedy (2 actors) == single process, bit for bit; GreeDi(1 partition) == greedy;
    a sharded run resumes from a single-process checkpoint with the same result."""
    from mixray.distributed.selection import greedi_select, sharded_select

    z = np.load(DATA)
    x = z["embeddings"].astype(np.float32)
    q = np.log1p(z["output_chars"].astype(np.float64))
    states = []
    single = QDITSelector(50, 0.7, memory_budget_mb=0.5, checkpoint_every=20,
                          callback=states.append).fit(x, q)
    dist = sharded_select(QDITSelector(50, 0.7, memory_budget_mb=0.5), x, q, concurrency=2,
                          num_gpus=0)
    np.testing.assert_array_equal(dist.ranking_, single.ranking_)
    np.testing.assert_array_equal(dist.gains_, single.gains_)
    np.testing.assert_array_equal(dist.scores_, single.scores_)
    assert math.isclose(dist.objective_, single.objective_, rel_tol=1e-12)
    resumed = sharded_select(QDITSelector(50, 0.7, memory_budget_mb=0.5), x, q, concurrency=2,
                             initial_state=states[0], num_gpus=0)
    np.testing.assert_array_equal(resumed.ranking_, single.ranking_)
    res, picks, _ = greedi_select(x, q, 50, 0.7, partitions=1, num_gpus=0)
    assert len(picks) == 1
    np.testing.assert_array_equal(res.ranking, single.ranking_)


def test_stage_sharded_equals_local(run_dir, tmp_path_factory, ray_session):
    local = tmp_path_factory.mktemp("local")
    make_run_dir(local)
    base = SelectConfig(k=25, alpha=0.5, memory_budget_mb=1, checkpoint_every=0)
    run_stages_select(base, local)
    sharded = SelectConfig.model_validate(base.model_dump() | {"distributed": "sharded", "concurrency": 2,
                                                               "num_gpus": 0})
    m = run_stages_select(sharded, run_dir)
    assert m["distributed"] == "sharded"
    assert pq.read_table(run_dir / "select" / "selection.parquet").equals(
        pq.read_table(local / "select" / "selection.parquet"))
