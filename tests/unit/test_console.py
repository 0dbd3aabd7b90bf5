"""The driver's console: what `mixray` shows by default and with --verbose, the stage progress
lines, the stderr filter (in a subprocess: it rewires file descriptor 2), Ray Data quieting."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from mixray import console
from mixray.training.metrics import MetricsLog, last_step

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_logging(monkeypatch):
    """Give back the root logger, the loggers setup() touches and the env it sets."""
    root = logging.getLogger()
    names = (*console.DETAIL_LOGGERS, *console.QUIET_LOGGERS)
    saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in names})
    for k in (console.VERBOSE_ENV, *console.QUIET_ENV):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for n, level in saved[2].items():
        logging.getLogger(n).setLevel(level)


def test_default_console_quiets_third_parties_and_verbose_shows_all(clean_logging):
    console.setup(False)
    assert not console.verbose()
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert logging.getLogger("mixray.facility").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("mixray.select").getEffectiveLevel() == logging.INFO
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("old", FutureWarning, stacklevel=1)
    assert not seen
    console.setup(True)
    assert console.verbose() and os.environ[console.VERBOSE_ENV] == "1"
    assert logging.getLogger("mixray.facility").getEffectiveLevel() == logging.DEBUG
    assert sum(isinstance(h, console._BarSafeHandler) for h in logging.getLogger().handlers) == 1


def test_a_stage_bar_in_a_log_file_is_a_line_every_30_s(monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    bar = console.StageBar("embed", 170, "rows")  # stderr is not a terminal under pytest
    with caplog.at_level(logging.INFO, logger="mixray.progress"):
        bar.update(60)  # at once: no line
        clock[0] += 30
        bar.update(60)
        clock[0] += 10
        bar.reach(150)  # 10 s after the last line: none
    bar.close()
    assert [r.getMessage() for r in caplog.records] == ["embed: 120/170 rows, 4 rows/s, about 12 s left"]


def test_follow_moves_the_bar_to_a_counter_read_elsewhere(tmp_path):
    """The train stage's bar follows the steps rank 0 writes to metrics.csv."""
    log = MetricsLog(tmp_path, 0)
    path = tmp_path / "metrics.csv"
    assert last_step(path) == 0  # the header alone
    row = {"step": 1, "epoch": 0, "loss": 1.0, "ntp": 1.0, "mix": 0.0, "lr": 1e-3, "grad_norm": 1.0,
           "tokens": 10, "tokens_per_s": 5.0, "step_time_s": 2.0, "examples": 4, "time": 0.0}
    bar = console.StageBar("train", 3, "steps")
    with console.follow(bar, lambda: last_step(path), every_s=0.01):
        log.write(row)
        log.write(row | {"step": 2})
    log.close()
    assert last_step(path) == 2 and bar.n == 2
    assert last_step(tmp_path / "missing.csv") == 0


STDERR_SCRIPT = textwrap.dedent("""
    import logging, os, sys
    from mixray import console
    console.setup(False)
    logging.getLogger("mixray.demo").info("a mixray line")
    noise = (b"[2026-11-29 23:40:18,698 E 20956 20956] core_worker.cc:2465: Actor with class name: "
             b"'MapWorker(MapBatches(SentenceEncoder))' and ID: 'c0' has constructor arguments in the "
             b"object store and max_restarts > 0. If the arguments ... go out of scope\\n")
    os.write(2, noise)                                   # Ray's C++ core worker, in this process
    print("(TrainController pid=1) " + noise.decode(), end="", file=sys.stderr)  # a worker's, via Ray
    os.write(2, b"a native warning that stays\\n")
    print("a python line that stays", file=sys.stderr)
    os.write(2, b"a partial line")
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_the_stderr_filter_drops_only_the_noise_lines(verbose):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    script = STDERR_SCRIPT.replace("console.setup(False)", f"console.setup({verbose})")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    err = run.stderr.decode()
    assert "a mixray line" in err and "a native warning that stays" in err
    assert "a python line that stays" in err and err.endswith("a partial line")
    assert err.count("has constructor arguments in the object store") == (2 if verbose else 0)


def test_quiet_ray_data_turns_its_progress_off_on_the_driver(monkeypatch):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.quiet_ray_data()
    assert ctx.enable_progress_bars  # verbose: Ray Data's own progress
    monkeypatch.delenv(console.VERBOSE_ENV)
    handlers = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    progress = logging.getLogger("ray.data._internal.progress")
    try:
        console.quiet_ray_data()
        assert not ctx.enable_progress_bars
        assert all(h.level == logging.WARNING for h in handlers)
        assert progress.level == logging.ERROR
    finally:
        for h, level in zip(handlers, levels, strict=True):
            h.setLevel(level)
        progress.setLevel(logging.NOTSET)
