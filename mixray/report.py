"""``mixray report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page and a Markdown twin.

For one run or several compared side by side, from what the run directories hold (nothing is
recomputed):

- the evaluation table (``evaluate/summary.json``): each benchmark and metric, the base model's
  value and every run's trained value with its delta against the base;
- the training loss of every run on one plot (``train/metrics.csv``, smoothed);
- per run: the stages (``<stage>/manifest.json``: in / kept / rejected, wall time, when) and
  every PNG artifact the manifests list (the α sweep, the MDIT t-SNE, the SFTMix data map,
  LM-Mixup's reward curves, the loss curves, ...), in run order, with the contracts' captions.

The HTML page inlines every image (``data:image/png;base64``) and has no script, so it can be
mailed or archived as one file. The Markdown twin (``report.md``) links copies of the images in
``images/`` beside it. The CLI prints the path of both and the evaluation table.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixray import choices, contracts
from mixray.errors import InputError
from mixray.io.rundir import completed_output, read_manifest

log = logging.getLogger("mixray.report")

_IN_KEYS = ("in", "pool", "rows", "items")
_KEPT_KEYS = ("kept", "out", "scored", "selected")


@dataclass
class Figure:
    stage: str
    name: str
    path: Path
    caption: str


@dataclass
class Run:
    name: str
    path: Path
    manifests: dict[str, dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)
    summary: dict[str, Any] | None = None


def _caption(stage: str, name: str) -> str:
    for a in vars(contracts).values():
        if isinstance(a, contracts.Artifact) and a.stage == stage and a.matches(name.split("/")[0]):
            return a.doc
    return name


def _stage_order(run_dir: Path) -> list[str]:
    """Stages with a manifest: those of ``choices.STAGES`` in run order, then any other."""
    found = {p.parent.name for p in run_dir.glob("*/manifest.json")}
    return [s for s in choices.STAGES if s in found] + sorted(found - set(choices.STAGES))


def load_run(run_dir: Path) -> Run:
    """A run directory's manifests, PNG artifacts and evaluation summary."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a run directory")
    stages = _stage_order(run_dir)
    if not stages:
        raise InputError(f"{run_dir}: no stage has completed (no <stage>/manifest.json)")
    run = Run(run_dir.resolve().name, run_dir, {s: read_manifest(run_dir / s) or {} for s in stages})
    for stage in stages:
        for name in run.manifests[stage].get("outputs", {}):
            p = run_dir / stage / name
            pngs = sorted(p.rglob("*.png")) if p.is_dir() else [p] if p.suffix == ".png" else []
            run.figures += [Figure(stage, str(f.relative_to(run_dir / stage)), f, _caption(stage, name))
                            for f in pngs]
    s = completed_output(run_dir, contracts.EVAL_SUMMARY)
    run.summary = json.loads(s.read_text()) if s else None
    return run


# ----------------------------------------------------------------------------- tables

def stage_rows(run: Run) -> list[list[str]]:
    """stage, in, kept, rejected, wall time (s), summary counts."""
    rows = []
    for stage, m in run.manifests.items():
        c = m.get("counts", {})
        first = [next((c[k] for k in keys if isinstance(c.get(k), int | float)), None)
                 for keys in (_IN_KEYS, _KEPT_KEYS)]
        rej = c.get("rejected")
        other = ", ".join(f"{k} {v}" for k, v in c.items()
                          if isinstance(v, int | float | str) and k not in (*_IN_KEYS, *_KEPT_KEYS, "rejected"))
        wall = m.get("wall_time_s")
        rows.append([stage, _fmt(first[0]), _fmt(first[1]), _fmt(rej), _fmt(wall), other])
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def eval_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: benchmark, metric, n, base, then per run trained (Δ vs base)."""
    evaluated = [r for r in runs if r.summary]
    head = ["benchmark", "metric", "n", "base"] + [f"{r.name}" for r in evaluated]
    keys: dict[tuple[str, str], dict[str, Any]] = {}
    for r in evaluated:
        for m in r.summary["metrics"]:
            keys.setdefault((m["benchmark"], m["metric"]), {})[r.name] = m
    rows = []
    for (bench, metric), per_run in keys.items():
        base = next((m["values"]["base"] for m in per_run.values() if "base" in m["values"]), None)
        cells = []
        for r in evaluated:
            m = per_run.get(r.name)
            v = m["values"].get("trained") if m else None
            cells.append(_fmt(v) + (f" ({_signed(v - base)})" if v is not None and base is not None else ""))
        n = max(m["n"] for m in per_run.values())
        arrow = "↑" if next(iter(per_run.values()))["higher_is_better"] else "↓"
        rows.append([bench, f"{metric} {arrow}", str(n), _fmt(base), *cells])
    return head, rows


def _signed(v: float) -> str:
    return f"{v:+.4f}"


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """A fixed-width table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------- figures

def loss_overlay(runs: list[Run], out: Path) -> Path | None:
    """Every run's training loss (smoothed, raw as faint markers) on one plot; None without any."""
    from mixray.training.metrics import epoch_starts, read_metrics, smooth

    found = [(r.name, completed_output(r.path, contracts.TRAIN_METRICS)) for r in runs]
    curves = [(n, read_metrics(p)) for n, p in found if p is not None]
    curves = [(n, m) for n, m in curves if m]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (name, m) in enumerate(curves):
        steps, loss = [r["step"] for r in m], [r["loss"] for r in m]
        ax.plot(steps, loss, "o", ms=3, alpha=0.35, color=f"C{i}")
        ax.plot(steps, smooth(loss), lw=2, color=f"C{i}", label=name)
        for x in epoch_starts(m):
            ax.axvline(x, color=f"C{i}", ls=":", lw=1)
    ax.set_xlabel("optimizer step (dotted: epoch boundaries)")
    ax.set_ylabel("training loss (token mean)")
    ax.set_title("training loss per run (markers: per step; line: smoothed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _run_facts(run: Run) -> list[list[str]]:
    """A few settings that tell runs apart, from the resolved config.yaml."""
    import yaml

    p = run.path / "config.yaml"
    cfg = yaml.safe_load(p.read_text()) if p.is_file() else {}
    sel, train = cfg.get("select", {}), cfg.get("train", {})
    facts = [["run directory", str(run.path)], ["stages", ", ".join(run.manifests)]]
    if "select" in run.manifests:
        facts.append(["selection", f"{sel.get('method')} k={sel.get('k')} alpha={sel.get('alpha')}"])
    if "train" in run.manifests:
        facts.append(["training", f"{train.get('model')} loss={train.get('loss')} epochs={train.get('epochs')}"
                      f" lora={train.get('lora', {}).get('enabled')}"])
    if run.summary:
        c = run.summary.get("contamination", {})
        facts.append(["contamination check", f"{c.get('hits', 0)} hit(s) ({c.get('exact', 0)} exact, "
                      f"{c.get('near', 0)} near; on_hit={c.get('on_hit')}), cosine >= {c.get('threshold')}"])
        facts.append(["code benchmarks", run.summary.get("code_benchmarks", "")])
    return facts


# ----------------------------------------------------------------------------- the page

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:left;font-size:14px}th{background:#f3f3f3}figure{display:inline-block;margin:0 1em 1em 0;
vertical-align:top;max-width:520px}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:13px;
color:#555}h2{border-bottom:2px solid #eee;padding-bottom:4px}.note{color:#555;font-size:14px}"""


def _sections(runs: list[Run], overlay: Path | None) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The report as (heading, [(kind, content)]) with kind table | figure | text."""
    head, rows = eval_rows(runs)
    parts: list[tuple[str, list[tuple[str, Any]]]] = []
    top: list[tuple[str, Any]] = []
    if rows:
        top += [("text", "Trained model per run, with its change against the base model in "
                 "parentheses (↑ higher is better, ↓ lower is better). Evaluated on data no run trained on."),
                ("table", (head, rows))]
    else:
        top.append(("text", "No run has an evaluate stage yet (evaluate/summary.json)."))
    parts.append(("Evaluation", top))
    if overlay is not None:
        parts.append(("Training loss", [("figure", Figure("train", "loss_overlay.png", overlay,
                                                          "training loss of every run"))]))
    for run in runs:
        body = [("table", (["setting", "value"], _run_facts(run))),
                ("table", (["stage", "in", "kept", "rejected", "wall time (s)", "counts"], stage_rows(run)))]
        body += [("figure", f) for f in run.figures]
        parts.append((f"Run {run.name}", body))
    return parts


def render_html(title: str, parts: list[tuple[str, list[tuple[str, Any]]]]) -> str:
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
           f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p class=\"note\">generated {time.strftime('%Y-%m-%d %H:%M:%S')} by mixray report</p>"]
    for heading, body in parts:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for kind, content in body:
            if kind == "table":
                out.append(_html_table(*content))
            elif kind == "figure":
                cap = f"{content.stage}/{content.name}: {content.caption}"
                out.append(f"<figure><img src=\"{_data_uri(content.path)}\" alt=\"{html.escape(cap)}\">"
                           f"<figcaption>{html.escape(cap)}</figcaption></figure>")
            else:
                out.append(f"<p class=\"note\">{html.escape(content)}</p>")
    return "\n".join(out) + "\n</body></html>\n"


def render_markdown(title: str, parts: list[tuple[str, list[tuple[str, Any]]]], images: Path) -> str:
    """The Markdown twin; images are copied to ``images/`` and linked relatively."""
    images.mkdir(parents=True, exist_ok=True)
    out = [f"# {title}", ""]
    for heading, body in parts:
        out += [f"## {heading}", ""]
        for kind, content in body:
            if kind == "table":
                out += [_md_table(*content), ""]
            elif kind == "figure":
                name = f"{len(list(images.iterdir())):02d}-{content.stage}-{Path(content.name).name}"
                shutil.copyfile(content.path, images / name)
                out += [f"![{content.stage}/{content.name}: {content.caption}]({images.name}/{name})", ""]
            else:
                out += [content, ""]
    return "\n".join(out)


def default_out_dir(run_dirs: list[Path]) -> Path:
    """One run: ``<run>/report``; several: ``<parent of the first>/report-<a>-vs-<b>...``."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path(run_dirs[0]).resolve().parent / ("report-" + "-vs-".join(Path(r).resolve().name for r in run_dirs))


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> tuple[Path, Path, str]:
    """Write ``report.html`` and ``report.md`` into ``out_dir``; returns both paths and the
    evaluation table as text (empty when no run was evaluated)."""
    runs = [load_run(Path(p)) for p in run_dirs]
    out_dir = Path(out_dir) if out_dir else default_out_dir([Path(p) for p in run_dirs])
    if out_dir.exists():
        shutil.rmtree(out_dir / "images", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay = loss_overlay(runs, out_dir / "loss_overlay.png")
    title = "mixray report: " + (" vs ".join(r.name for r in runs))
    parts = _sections(runs, overlay)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(render_html(title, parts), encoding="utf-8")
    md_path.write_text(render_markdown(title, parts, out_dir / "images"), encoding="utf-8")
    head, rows = eval_rows(runs)
    return html_path, md_path, text_table(head, rows) if rows else ""
