"""Small run directories with what `mixray report` reads (manifests, PNG artifacts, metrics,
an evaluation summary), written through the real stage-run bookkeeping; no model is run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mixray.io.rundir import stage_run


def _png(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.plot([0, 1, 2], [1, 0, 1], "o-")
    ax.set_title(title)
    fig.savefig(path, format="png")
    plt.close(fig)


def fake_run(root: Path, name: str, trained: dict[str, float], base: dict[str, float]) -> Path:
    """ingest, select (alpha_sweep.png), train (metrics.csv, loss.png), dynamics (a folder of PNGs),
    evaluate (summary.json) — each with a manifest listing its outputs."""
    from mixray.training.metrics import plot_loss_curves, read_metrics

    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"select": {"method": name, "k": 4, "alpha": 0.7},
                                                     "train": {"model": "tiny", "loss": "ntp", "epochs": 2}}))
    with stage_run(run / "ingest", "c", {}) as r:
        r.tmp_path("examples.parquet").write_bytes(b"x")
        r.counts = {"in": 12, "kept": 10, "rejected": 2, "heldout": 2}
    with stage_run(run / "select", "c", {}) as r:
        _png(r.tmp_path("alpha_sweep.png"), f"sweep {name}")
        r.counts = {"pool": 8, "selected": 4}
    with stage_run(run / "train", "c", {}) as r:
        csv = r.tmp_path("metrics.csv")
        csv.write_text("step,attempt,epoch,loss,ntp,mix,lr,grad_norm,tokens,tokens_per_s,step_time_s,examples,time\n"
                       + "".join(f"{s},0,{(s - 1) // 3},{3 - 0.2 * s},{3 - 0.2 * s},0,1e-3,1,10,5,1,4,0\n"
                                 for s in range(1, 7)))
        plot_loss_curves(read_metrics(csv), r.tmp_path("loss.png"), name)
        r.counts = {"rows": 4, "steps": 6}
    with stage_run(run / "dynamics", "c", {}) as r:
        d = r.tmp_path("maps")
        d.mkdir()
        _png(d / "data_map.png", "data map")
    with stage_run(run / "evaluate", "c", {}) as r:
        metrics = [{"benchmark": b, "metric": m, "n": 5, "values": {"base": base[b], "trained": trained[b]},
                    "delta": trained[b] - base[b], "higher_is_better": m != "loss"}
                   for b, m in (("heldout", "loss"), ("gsm8k", "exact_match"))]
        r.tmp_path("summary.json").write_text(json.dumps({
            "models": {"base": "b", "trained": "t"}, "metrics": metrics, "code_benchmarks": "not run",
            "contamination": {"hits": 1, "exact": 1, "near": 0, "on_hit": "exclude", "threshold": 0.9}}))
        r.counts = {"items": 10, "models": 2, "contaminated": 1}
    return run
