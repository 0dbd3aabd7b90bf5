"""select: embeddings + quality -> a QDIT selection of K examples (and an alpha sweep).

Inputs: ``<run_dir>/embed/embeddings.parquet``, ``<run_dir>/score/quality.parquet``
(its ``score`` column, min-max normalised over the pool) and
``<run_dir>/ingest/examples.parquet``. Every embedded example must have a
quality score and vice versa; otherwise the stage fails and names the ids.

Outputs under ``<run_dir>/select/``:

- ``selection.parquet`` — ``id, rank (1 = picked first), gain (d(a|A) at
  selection), score (f(a|A, α)), quality (normalised q)``, in rank order, for the
  main α (the first of ``select.alpha`` when it is a list).
- ``selected.jsonl`` — the selected examples in the example schema, in rank
  order, ready to train on.
- with an α sweep (``alpha: [0.0, 0.5, ...]``): ``selection_alpha<α>.parquet``
  per α (e.g. ``selection_alpha0.7.parquet``), ``alpha_sweep.csv`` (α,
  objective, diversity d(A)/N, mean quality, seconds; plus a ``random`` row)
  and ``alpha_sweep.png`` (mean quality vs diversity: the QDIT paper's Figure 2).
- ``manifest.json`` — objective, diversity, mean quality, time and α per
  selection, under ``summary``.

Resume: the greedy state is checkpointed every ``select.checkpoint_every``
steps into ``select/checkpoints/`` (``alpha<α>-step<s>.npz``, written atomically
and flushed, the newest two per α) with a signed record of their sha256
(``record.json``, :mod:`mixray.io.checkpoints`); a run killed mid-way continues
from the last intact checkpoint (same config and inputs) and gives the same
ranking as an uninterrupted run. A corrupt, truncated, zero-length or unrecorded
checkpoint is reported in one line and skipped (the previous one is used, or the
selection starts over). Checkpoints are deleted when the stage completes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.config import SelectConfig
from mixray.console import stage_bar
from mixray.contracts import (
    EMBEDDINGS,
    EXAMPLES,
    QUALITY,
    SELECTED,
    SELECTION,
    SELECTION_SCHEMA,
    SWEEP_PLOT,
    SWEEP_SELECTION,
    SWEEP_TABLE,
)
from mixray.errors import ConfigError, InputError
from mixray.io.checkpoints import (
    CheckpointError,
    atomic_write_bytes,
    check_files,
    checkpoint_key,
    read_record,
    write_record,
)
from mixray.io.embeddings import read_embeddings
from mixray.io.rundir import write_table
from mixray.stages.runner import Outputs, Stage, config_section

log = logging.getLogger("mixray.select")

CHECKPOINTS = "checkpoints"
RECORD = "record.json"  # the signed record of the checkpoints (mixray.io.checkpoints)
KEEP = 2  # checkpoints kept per alpha: the newest and the one before it


def sweep_name(alpha: float) -> str:
    """``selection_alpha0.7.parquet`` (shortest float repr: 0.0, 0.5, 1.0, 0.75)."""
    return SWEEP_SELECTION.filename(alpha=repr(float(alpha)))


def _preview(ids) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:5])) + (" ..." if len(ids) > 5 else "")


def read_pool(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [N] object, embeddings [N, d] float32, raw quality [N] float64), aligned by id.

    The pool is the embeddings' order. Raises InputError naming the ids that are
    in one file but not the other, or duplicated.
    """
    emb_path = EMBEDDINGS.path(run_dir)
    q_path = QUALITY.path(run_dir)
    ids, x, _ = read_embeddings(emb_path)
    qt = pq.read_table(q_path, columns=["id", "score"])
    q_ids = np.asarray(qt.column("id").to_pylist(), dtype=object)
    for name, arr, path in (("embeddings", ids, emb_path), ("quality", q_ids, q_path)):
        uniq, counts = np.unique(arr.astype(str), return_counts=True)
        if (counts > 1).any():
            raise InputError(f"{path}: {int((counts > 1).sum())} duplicated id(s) in {name}: "
                             f"{_preview(uniq[counts > 1])}")
    e_set, q_set = set(ids.tolist()), set(q_ids.tolist())
    only_e = [i for i in ids.tolist() if i not in q_set]
    only_q = [i for i in q_ids.tolist() if i not in e_set]
    if only_e or only_q:
        parts = []
        if only_e:
            parts.append(f"{len(only_e)} id(s) in {emb_path} have no quality score in {q_path} "
                         f"(first: {_preview(only_e)}; see score/rejects.parquet, and score.sample "
                         "must be null for selection)")
        if only_q:
            parts.append(f"{len(only_q)} id(s) in {q_path} have no embedding in {emb_path} "
                         f"(first: {_preview(only_q)})")
        raise InputError("select: embeddings and quality must cover the same examples: "
                         + "; ".join(parts))
    pos = {v: i for i, v in enumerate(q_ids.tolist())}
    order = np.fromiter((pos[i] for i in ids.tolist()), dtype=np.int64, count=len(ids))
    q = qt.column("score").to_numpy(zero_copy_only=False).astype(np.float64)[order]
    return ids, x, q


# -- checkpoints (the only I/O of the greedy state; layer 1 only hands the state over) ---------


def _ckpt_name(alpha: float, step: int) -> str:
    return f"alpha{float(alpha)!r}-step{step}.npz"


def read_state(path: Path, fp: str):
    """The GreedyState in the npz at ``path`` if it was written for ``fp``, else None.

    Call only on a file whose recorded sha256 was checked (:func:`load_checkpoint`).
    """
    from mixray.algorithms.facility import GreedyState

    with np.load(path) as z:  # allow_pickle=False: arrays only
        if bytes(z["fingerprint"]).decode() != fp:
            return None
        return GreedyState(z["selected"].astype(np.int64), z["gains"], z["scores"],
                           z["cur"].astype(np.float32))


def _recorded(ckdir: Path, key: bytes) -> tuple[dict[str, str], dict[str, dict]]:
    """(files, meta) of the checkpoint record, or empty when there is none or it is unusable."""
    try:
        rec = read_record(ckdir / RECORD, key)
        return dict(rec["files"]), dict(rec["meta"])
    except CheckpointError:
        return {}, {}


def save_checkpoint(ckdir: Path, alpha: float, state, fp: str, key: bytes) -> Path:
    """Write a GreedyState (selected, gains, scores, scaled cur) and record it.

    The npz is written atomically and flushed; then the signed record (``record.json``)
    lists it with its sha256, step and fingerprint, keeping the newest ``KEEP``
    checkpoints of each α; files the record no longer lists are removed last. A kill
    at any point leaves the previous record, which vouches only for complete files.
    """
    buf = io.BytesIO()
    np.savez(buf, selected=state.selected, gains=state.gains, scores=state.scores, cur=state.cur,
             fingerprint=np.bytes_(fp.encode()))
    name = _ckpt_name(alpha, state.step)
    atomic_write_bytes(ckdir / name, buf.getvalue())
    files, meta = _recorded(ckdir, key)
    files[name] = hashlib.sha256(buf.getvalue()).hexdigest()
    meta[name] = {"alpha": float(alpha), "step": int(state.step), "fingerprint": fp}
    same = sorted((m["step"], n) for n, m in meta.items() if m["alpha"] == float(alpha))
    for _, old in same[:-KEEP]:
        del files[old], meta[old]
    write_record(ckdir / RECORD, files, meta, key)
    for p in ckdir.glob("*.npz"):
        if p.name not in files:
            p.unlink(missing_ok=True)
    return ckdir / name


def load_checkpoint(ckdir: Path, alpha: float, fp: str, key: bytes):
    """The newest recorded, intact checkpoint of ``alpha`` written for ``fp``, else None.

    Only files listed in the signed record with a matching sha256 are opened. A
    corrupt, truncated, zero-length or unrecorded one is reported in one line and
    the one before it is tried; with none left the selection starts over.
    """
    try:
        rec = read_record(ckdir / RECORD, key)
    except CheckpointError as e:
        if any(ckdir.glob("*.npz")):
            log.warning("select: checkpoints unusable: %s; starting over", e)
        return None
    mine = sorted(((m.get("step", -1), n) for n, m in rec["meta"].items()
                   if isinstance(m, dict) and m.get("alpha") == float(alpha)), reverse=True)
    bad = 0
    for _, name in mine:
        if rec["meta"][name].get("fingerprint") != fp:
            log.info("select: ignoring %s (written for another config or input)", ckdir / name)
            continue
        try:
            check_files(ckdir, {name: rec["files"][name]})
            state = read_state(ckdir / name, fp)
        except (CheckpointError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.warning("select: checkpoint %s is unusable (%s); trying an older one", name, e)
            bad += 1
            continue
        if state is not None:
            return state
    if bad:
        log.warning("select[alpha=%s]: no usable checkpoint left; starting over", alpha)
    return None


@dataclass
class Checkpoints:
    """Where one selection's checkpoints go, for which config/inputs, under which key."""

    dir: Path
    fingerprint: str
    key: bytes

    def save(self, alpha: float, state) -> None:
        save_checkpoint(self.dir, alpha, state, self.fingerprint, self.key)

    def load(self, alpha: float):
        return load_checkpoint(self.dir, alpha, self.fingerprint, self.key)


# -- one selection --------------------------------------------------------------------------------


def _selector(cfg: SelectConfig, alpha: float, seed: int, callback=None):
    from mixray.algorithms.qdit import QDITSelector

    return QDITSelector(cfg.k, alpha, optimizer=cfg.optimizer, method=cfg.method,
                        epsilon=cfg.epsilon, random_state=seed, device=cfg.device,
                        memory_budget_mb=cfg.memory_budget_mb, tau=cfg.tau,
                        n_clusters=cfg.n_clusters, normalize_quality=False,
                        checkpoint_every=cfg.checkpoint_every if callback else 0,
                        callback=callback, threads=cfg.threads)


def select_one(cfg: SelectConfig, alpha: float, x: np.ndarray, q: np.ndarray, seed: int,
               ckpt: Checkpoints | None) -> dict:
    """Run one selection (resuming from ``ckpt``); returns ranking, gains, scores and summary.

    Checkpoints cover the greedy (``qdit`` with α < 1, local or sharded); GreeDi
    only keeps a finished selection.
    """
    from mixray.algorithms import qdit
    from mixray.algorithms.facility import GreedyState

    t0 = time.perf_counter()
    greedy = cfg.method == "qdit" and alpha < 1.0
    use_ckpt = ckpt is not None and greedy
    state = ckpt.load(alpha) if use_ckpt else None
    if state is not None:
        log.info("select[alpha=%s]: resuming from checkpoint at step %d of %d", alpha, state.step, cfg.k)
    extra: dict = {}
    if state is not None and state.step == cfg.k:  # this alpha finished before the interruption
        final = state
    elif greedy and cfg.distributed == "greedi":
        from mixray.distributed.selection import greedi_select

        res, picks, _ = greedi_select(
            x, q, cfg.k, alpha, partitions=cfg.partitions, optimizer=cfg.optimizer,
            random_state=seed, memory_budget_mb=cfg.memory_budget_mb, epsilon=cfg.epsilon,
            normalize_quality=False,
            num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus, threads=cfg.threads, device=cfg.device)
        if len(res.ranking) < cfg.k:
            raise InputError(f"select: GreeDi found only {len(res.ranking)} < k={cfg.k} candidates")
        final = res.state()
        extra = {"greedi_partitions": len(picks), "greedi_union": int(sum(len(p) for p in picks))}
    else:
        callback = (lambda st: ckpt.save(alpha, st)) if use_ckpt else None
        sel = _selector(cfg, alpha, seed, callback)
        if greedy and cfg.distributed == "sharded":
            from mixray.distributed.selection import sharded_select

            sharded_select(sel, x, q, concurrency=cfg.concurrency, initial_state=state,
                           num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus, threads=cfg.threads)
        else:
            sel.fit(x, q, initial_state=state)
        extra = {"stats": sel.stats_} if sel.stats_ else {}
        # baselines and alpha = 1 have no greedy state: score them from the selector
        final = sel.state_ or GreedyState(sel.ranking_, sel.gains_, sel.scores_, None)
        summary = (sel.objective_, sel.diversity_, sel.quality_mean_)
    if final.cur is not None:
        if use_ckpt and cfg.checkpoint_every:
            ckpt.save(alpha, final)  # keeps a finished alpha of a sweep
        summary = qdit.score_from_cur(final.cur, q[final.selected], alpha)
    obj, div, qm = summary
    return {"ranking": final.selected, "gains": final.gains, "scores": final.scores,
            "summary": {"alpha": alpha, "objective": obj, "diversity": div, "quality_mean": qm,
                        "k": len(final.selected), "time_s": round(time.perf_counter() - t0, 3)}
            | extra}


def selection_table(ids: np.ndarray, q: np.ndarray, res: dict, meta: dict) -> pa.Table:
    r = res["ranking"]
    t = pa.table({"id": pa.array(ids[r].tolist(), pa.string()),
                  "rank": pa.array(np.arange(1, len(r) + 1), pa.int64()),
                  "gain": pa.array(res["gains"], pa.float64()),
                  "score": pa.array(res["scores"], pa.float64()),
                  "quality": pa.array(q[r], pa.float64())}, schema=SELECTION_SCHEMA)
    return t.replace_schema_metadata({f"mixray.{k}": str(v) for k, v in meta.items()})


def write_selected_jsonl(examples: Path, selected_ids: list[str], out: Path) -> int:
    """The selected examples (all example columns) as JSON lines, in rank order."""
    t = pq.read_table(examples)
    pos = {v: i for i, v in enumerate(t.column("id").to_pylist())}
    missing = [i for i in selected_ids if i not in pos]
    if missing:
        raise InputError(f"{examples}: {len(missing)} selected id(s) not found: {_preview(missing)}")
    rows = t.take(pa.array([pos[i] for i in selected_ids], pa.int64())).to_pylist()
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def sweep_labels(xy: list[tuple[float, float]], alphas: list[float],
                 near: tuple[float, float] = (0.12, 0.05)) -> list[tuple[float, float, str]]:
    """One label per cluster of plotted points, so that labels do not overprint: points
    within ``near`` of the plot's span (x: about a label's width, y: its height) of a
    cluster's first point share its label, ``α=0.1, 0.2``."""
    span = [max(v) - min(v) or 1.0 for v in zip(*xy, strict=True)] if xy else [1.0, 1.0]
    groups: list[tuple[float, float, list[str]]] = []
    for (x, y), a in zip(xy, alphas, strict=True):
        for gx, gy, names in groups:
            if abs(x - gx) <= near[0] * span[0] and abs(y - gy) <= near[1] * span[1]:
                names.append(f"{a:g}")
                break
        else:
            groups.append((x, y, [f"{a:g}"]))
    return [(x, y, "α=" + ", ".join(names)) for x, y, names in groups]  # at each first point


QUALITY_AXIS = {"ifd": "mean quality q(A): IFD (a model-based proxy)",
                "reward-model": "mean quality q(A): reward model", "column": "mean quality q(A): data column"}


def quality_backend(run_dir: Path) -> str:
    """The score backend recorded in ``score/quality.parquet`` (what the quality axis measures)."""
    t = pq.read_table(QUALITY.path(run_dir), columns=["backend"])
    return str(t.column("backend")[0]) if t.num_rows else ""


def write_sweep(rows: list[dict], table: Path, plot: Path, k: int, trained_alpha: float | None = None,
                backend: str = "") -> None:
    """alpha_sweep.csv and the quality-vs-diversity plot (matplotlib, Agg backend).

    The α that is trained on (the first of ``select.alpha``) is marked with a star; the quality
    axis names the score backend (IFD is a proxy, not a reward model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["alpha", "objective", "diversity", "quality_mean", "time_s"]
    with open(table, "w", encoding="utf-8") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("random" if (c == "alpha" and r[c] is None) else repr(r[c]) for c in cols)
                    + "\n")
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    pts = sorted((r for r in rows if r["alpha"] is not None), key=lambda r: r["alpha"])
    xy = [(r["diversity"], r["quality_mean"]) for r in pts]
    ax.plot(*zip(*xy, strict=True), "o-", color="C0", label="QDIT (by α)")
    for i, (x, y, text) in enumerate(sweep_labels(xy, [r["alpha"] for r in pts])):
        # neighbours along the curve alternate above and below it
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 5 if i % 2 else -11),
                    fontsize=8)
    main = [r for r in pts if trained_alpha is not None and r["alpha"] == trained_alpha]
    if main:
        ax.plot(main[0]["diversity"], main[0]["quality_mean"], "*", ms=16, color="C1", zorder=3,
                label=f"trained on (α={trained_alpha:g})")
    rnd = [r for r in rows if r["alpha"] is None]
    if rnd:
        ax.axhline(rnd[0]["quality_mean"], color="C3", lw=1, ls="--", label="random (quality)")
        ax.axvline(rnd[0]["diversity"], color="C3", lw=1, ls=":", label="random (diversity)")
    ax.set_xlabel("diversity d(A)/N")
    ax.set_ylabel(QUALITY_AXIS.get(backend, f"mean quality q(A): {backend}" if backend else
                                   "mean quality q(A)"), fontsize=8)
    ax.set_title(f"QDIT quality vs diversity (K={k})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot, format="png")
    plt.close(fig)


def _sweep_rows(summaries: list[dict], x: np.ndarray, q: np.ndarray, cfg: SelectConfig,
                seed: int) -> list[dict]:
    """The alpha sweep table: one row per alpha, plus a seeded random selection of the same K."""
    from mixray.algorithms.qdit import evaluate_ranking, select_random

    rnd = evaluate_ranking(x, select_random(len(x), cfg.k, seed), q, 0.0, normalize_quality=False,
                           device=cfg.device)
    rows = [{c: s[c] for c in ("alpha", "objective", "diversity", "quality_mean", "time_s")}
            for s in summaries]
    rows.append({"alpha": None, "objective": float("nan"), "diversity": rnd.diversity,
                 "quality_mean": rnd.quality_mean, "time_s": 0.0})
    return rows


class Select(Stage):
    """``select``: embeddings + quality -> QDIT selection(s), resumable from checkpoints."""

    name = "select"
    requires = (EMBEDDINGS, QUALITY, EXAMPLES)
    outputs = (SELECTION, SWEEP_SELECTION, SELECTED, SWEEP_TABLE, SWEEP_PLOT)
    summary = "{selected} selected"
    seeded = True
    memory_knobs = ("memory_budget_mb", "concurrency")

    @property
    def seed(self) -> int:
        return self.section.seed if self.section.seed is not None else self.cfg.seed

    def config(self) -> dict:
        return self.section.model_dump(mode="json") | {"seed": self.seed}

    def reset(self) -> None:
        shutil.rmtree(self.stage_dir / CHECKPOINTS, ignore_errors=True)

    finished = reset  # checkpoints only serve a resume

    def run(self, out: Outputs) -> None:
        from mixray.algorithms.qdit import minmax

        cfg, seed = self.section, self.seed
        # checkpoints of another config or input are ignored; only signed ones are read
        ckpt = (Checkpoints(self.stage_dir / CHECKPOINTS, self.fingerprint, checkpoint_key())
                if cfg.checkpoint_every else None)
        ids, x, q_raw = read_pool(self.run_dir)
        if cfg.k > len(ids):
            raise ConfigError(f"select.k={cfg.k} is larger than the pool ({len(ids)} examples with "
                              "embeddings and quality); allowed: 1 <= k <= pool size", where="select.k")
        q = minmax(q_raw)
        if cfg.distributed != "none" and cfg.method == "qdit":
            from mixray.distributed.runtime import init_ray

            init_ray(self.cfg.ray)
        log.info("select[%s/%s]: N=%d, d=%d, K=%d, alpha=%s, distributed=%s", cfg.method,
                 cfg.optimizer, len(ids), x.shape[1], cfg.k, cfg.alphas, cfg.distributed)
        summaries, main = [], None
        with stage_bar("select", len(cfg.alphas), unit="alphas") as bar:
            for alpha in cfg.alphas:
                with config_section("select"):
                    res = select_one(cfg, alpha, x, q, seed, ckpt)
                summaries.append(self._write_selection(out, ids, q, res, alpha))
                main = main or res
                bar.update()
        n_sel = write_selected_jsonl(EXAMPLES.path(self.run_dir), ids[main["ranking"]].tolist(),
                                     out.path(SELECTED))
        if len(cfg.alphas) > 1:
            write_sweep(_sweep_rows(summaries, x, q, cfg, seed), out.path(SWEEP_TABLE),
                        out.path(SWEEP_PLOT), cfg.k, cfg.alphas[0], quality_backend(self.run_dir))
        out.counts = {"pool": len(ids), "selected": n_sel}
        out.extra = {"method": cfg.method, "optimizer": cfg.optimizer, "distributed": cfg.distributed,
                     "alpha_main": cfg.alphas[0], "summary": summaries}

    def _write_selection(self, out: Outputs, ids, q, res: dict, alpha: float) -> dict:
        cfg, s = self.section, res["summary"]
        log.info("select[alpha=%s]: objective %.6f, diversity %.6f, mean quality %.4f, %.1f s",
                 alpha, s["objective"], s["diversity"], s["quality_mean"], s["time_s"])
        meta = {"alpha": alpha, "method": cfg.method, "optimizer": cfg.optimizer,
                "objective": s["objective"], "diversity": s["diversity"],
                "quality_mean": s["quality_mean"]}
        table = selection_table(ids, q, res, meta)
        if len(cfg.alphas) > 1:
            write_table(table, out.path(SWEEP_SELECTION, alpha=repr(float(alpha))))
        if alpha == cfg.alphas[0]:
            write_table(table, out.path(SELECTION))
        return s
