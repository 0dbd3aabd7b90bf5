"""`mixray report`: the page's content from run directories, and the page in a real headless browser."""

from __future__ import annotations

import re

import numpy as np
import pytest
from report_runs import fake_run

from mixray.cli import main
from mixray.report import write_report


@pytest.fixture
def two_runs(tmp_path):
    base = {"heldout": 2.0, "gsm8k": 0.1}
    return [fake_run(tmp_path, "qdit", {"heldout": 1.5, "gsm8k": 0.3}, base),
            fake_run(tmp_path, "random", {"heldout": 1.75, "gsm8k": 0.2}, base)]


def test_report_has_the_comparison_table_every_figure_inlined_and_a_markdown_twin(two_runs, tmp_path, capsys):
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    html = (tmp_path / "rep" / "report.html").read_text()
    md = (tmp_path / "rep" / "report.md").read_text()
    # the evaluation table: base, each run's trained value and its delta vs the base
    assert re.search(r"heldout\s+loss ↓\s+5\s+2\s+1\.5 \(-0\.5000\)\s+1\.75 \(-0\.2500\)", printed)
    assert re.search(r"gsm8k\s+exact_match ↑\s+5\s+0\.1\s+0\.3 \(\+0\.2000\)\s+0\.2 \(\+0\.1000\)", printed)
    assert f"report: {tmp_path / 'rep' / 'report.html'}" in printed
    assert "| heldout | loss ↓ | 5 | 2 | 1.5 (-0.5000) | 1.75 (-0.2500) |" in md
    # every PNG of every manifest (select, train, the dynamics folder) + the loss overlay, inlined
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert len(imgs) == 2 * 3 + 1 and all(s.startswith("data:image/png;base64,iVBOR") for s in imgs)
    for caption in ("select/alpha_sweep.png", "train/loss.png", "dynamics/maps/data_map.png"):
        assert html.count(f"<figcaption>{caption}") == 2  # one per run
    links = re.findall(r"!\[[^\]]*\]\((images/[^)]+)\)", md)
    assert len(links) == 7 and all((tmp_path / "rep" / x).is_file() for x in links)
    # the per-stage table from the manifests: in / kept / rejected
    assert "<td>ingest</td><td>12</td><td>10</td><td>2</td>" in html
    assert "<script" not in html


def test_report_of_one_run_without_evaluation(tmp_path, capsys):
    run = fake_run(tmp_path, "only", {"heldout": 1.0, "gsm8k": 0.0}, {"heldout": 1.0, "gsm8k": 0.0})
    for p in (run / "evaluate").iterdir():
        p.unlink()
    (run / "evaluate").rmdir()
    html_path, md_path, table = write_report([run])
    assert html_path == run / "report" / "report.html" and md_path.is_file() and table == ""
    assert "No run has an evaluate stage yet" in html_path.read_text()


def test_report_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no stage has completed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in a browser

@pytest.mark.browser
def test_report_renders_in_headless_chromium_with_every_image(two_runs, tmp_path):
    from browser import render

    html_path, _, _ = write_report(two_runs, tmp_path / "rep")
    page = render(html_path, tmp_path / "shot.png")
    assert page.errors == [], page.errors
    assert page.images == 7 and page.broken == []
    assert page.text.count("Run qdit") == 1 and "exact_match" in page.text
    assert page.screenshot_bytes > 10_000 and page.screenshot_colours > 50  # not a blank page


@pytest.mark.browser
def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    """The harness itself can fail: a console error, a script exception and a missing image."""
    from browser import render

    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png" alt="gone"><img src="data:image/png;base64,AAAA" '
                   'alt="garbled"><script>console.error("boom"); undefinedName();</script></body></html>')
    page = render(bad, tmp_path / "bad.png")
    assert page.broken == ["gone", "garbled"]
    joined = " ".join(page.errors)
    assert "boom" in joined and "undefinedName" in joined


def test_sweep_plot_stars_the_trained_alpha_and_names_the_quality_backend(tmp_path, monkeypatch):
    import matplotlib.axes

    from mixray.stages.select import write_sweep

    seen = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, text, **kw: seen.setdefault("ylabel", text))
    rows = [{"alpha": a, "objective": 0.5, "diversity": d, "quality_mean": q, "time_s": 0.1}
            for a, d, q in ((0.7, 0.4, 0.8), (0.0, 0.6, 0.3), (1.0, 0.2, 0.9))]
    rows.append({"alpha": None, "objective": float("nan"), "diversity": 0.5, "quality_mean": 0.4, "time_s": 0.0})
    write_sweep(rows, tmp_path / "s.csv", tmp_path / "s.png", 4, trained_alpha=0.7, backend="ifd")
    assert "IFD (a model-based proxy)" in seen["ylabel"]
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(int)
    orange = (abs(img[..., 0] - 0xFF) < 30) & (abs(img[..., 1] - 0x7F) < 40) & (img[..., 2] < 60)
    assert orange.sum() > 50  # the star (C1) at the trained alpha
