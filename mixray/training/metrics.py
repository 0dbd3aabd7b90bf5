"""Training metrics: the per-step log (CSV + TensorBoard), reading a run's curve back, the loss plot.

``metrics.csv`` has one row per optimizer step and attempt (a restarted worker
group is a new attempt; its rows follow the earlier ones)::

    step, attempt, epoch, loss, <components>, lr, grad_norm, tokens, tokens_per_s,
    step_time_s, examples, time

``<components>`` are the objective's (``ntp, mix`` for the three SFT losses).
``read_metrics`` returns a run's curve: for each step, the row of the last
attempt that reached it.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("mixray.train")

COMPONENTS = ("ntp", "mix")


def metric_columns(components: tuple[str, ...] = COMPONENTS) -> tuple[str, ...]:
    """The CSV columns for an objective with these loss components."""
    return ("step", "attempt", "epoch", "loss", *components, "lr", "grad_norm", "tokens",
            "tokens_per_s", "step_time_s", "examples", "time")


METRIC_COLUMNS = metric_columns()


class MetricsLog:
    """Rank 0: one CSV row and TensorBoard scalars per optimizer step, in ``log_dir``.

    Rows of earlier attempts (before a restart) stay, tagged by ``attempt``; the
    curve of a run is the last attempt's row for each step (``read_metrics``).
    TensorBoard events after ``resumed_from`` are purged, so a resumed curve has no
    duplicate steps.
    """

    def __init__(self, log_dir: Path, resumed_from: int, components: tuple[str, ...] = COMPONENTS):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / "metrics.csv"
        self.components = tuple(components)
        self.columns = metric_columns(self.components)
        self.attempt = 0
        if self.path.is_file():
            with open(self.path, newline="") as f:
                attempts = [int(r["attempt"]) for r in csv.DictReader(f)]
            self.attempt = max(attempts, default=-1) + 1
        new = not self.path.is_file()
        self._f = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._f, fieldnames=self.columns)
        if new:
            self._csv.writeheader()
        self._tb = SummaryWriter(str(log_dir / "tensorboard"), purge_step=resumed_from + 1 if resumed_from else None)
        self.resumed_from = resumed_from

    def write(self, m: dict[str, Any]) -> None:
        """One step's metrics (keys: the columns but ``attempt``)."""
        self._csv.writerow({k: m.get(k, self.attempt if k == "attempt" else "") for k in self.columns})
        self._f.flush()
        for k in ("loss", *self.components, "lr", "grad_norm", "tokens_per_s"):
            self._tb.add_scalar(f"train/{k}", m[k], m["step"])
        if m["step"] % 10 == 0 or m["step"] == 1:
            parts = ", ".join(f"{k} {m[k]:.4f}" for k in self.components)
            log.info("step %d: loss %.4f (%s) lr %.2e, %.0f tok/s", m["step"], m["loss"], parts, m["lr"],
                     m["tokens_per_s"])

    def close(self) -> None:
        self._tb.close()
        self._f.close()


def last_step(path: Path) -> int:
    """The step of the last complete row of a metrics file (0 when it has none yet): how far a
    running training is, for the driver's progress bar. Reads the file's tail only."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").split("\n")
    except OSError:
        return 0
    for line in reversed(lines[1:-1]):  # [0] may be cut; [-1] is "" or a row still being written
        head = line.split(",", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The curve of a run: for each step, the row of the last attempt that reached it."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_step: dict[int, dict[str, float]] = {}
    for r in rows:
        vals = {k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
        s = int(vals["step"])
        if s not in by_step or vals["attempt"] >= by_step[s]["attempt"]:
            by_step[s] = vals
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): ``s_t = w·s_{t−1} + (1−w)·x_t``
    divided by ``1 − w^t``, so the first point is the first value (not pulled towards 0)."""
    out, acc = [], 0.0
    for t, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**t))
    return out


def epoch_starts(metrics: list[dict[str, float]]) -> list[float]:
    """Where a new epoch begins, between two steps (``step − 0.5``), for the plot's boundaries."""
    return [m["step"] - 0.5 for prev, m in zip(metrics, metrics[1:], strict=False)
            if m["epoch"] != prev["epoch"]]


def plot_loss_curves(metrics: list[dict[str, float]], out: Path, title: str) -> None:
    """PNG of the loss per step (markers, a smoothed line, epoch boundaries), its NTP / mix
    components when they differ from it, and the lr per step. A 1-step run shows its point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = [m["step"] for m in metrics], [m["loss"] for m in metrics]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    ax.plot(steps, loss, "o", ms=4, alpha=0.5, color="C0", label="loss (per step)")
    if len(steps) > 2:
        ax.plot(steps, smooth(loss), lw=2, color="C0", label="loss (smoothed)")
    components = any(m["mix"] != 0 for m in metrics)  # ntp alone: its only component is the loss
    for key, label, color in (("ntp", "NTP / originals", "C1"), ("mix", "mix term", "C2")):
        if components:
            ax.plot(steps, [m[key] for m in metrics], ".-", lw=1, color=color, label=label)
    for i, x in enumerate(epoch_starts(metrics)):
        for a in (ax, ax_lr):
            a.axvline(x, color="gray", ls=":", lw=1, label="epoch boundary" if i == 0 and a is ax else None)
    ax.set_ylabel("loss (token mean)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [m["lr"] for m in metrics], ".-", color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    if len(steps) == 1:  # one point: give the axis a width so the marker is not on an edge
        ax_lr.set_xlim(steps[0] - 1, steps[0] + 1)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
