"""Paper figures, tables and plotly charts from the real 100-image sweep (fixture `sample_sweep`)."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from PIL import Image

from analysis.errors import FiguresError
from analysis.figures import write_figures
from analysis.sweep import load_results
from viz.charts import accuracy_vs_gmacs, accuracy_vs_keep_rate, diversity_chart, diversity_series_from_rows
from viz.palette import method_colour

from conftest import ROOT
from test_sweep import sample_sweep  # noqa: F401  (the session's sweep; reruns resume instantly)

FIGURES = ("accuracy", "diversity", "grid")


@pytest.fixture(scope="module")
def figures(sample_sweep, tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("figures")
    outcome = write_figures(sample_sweep[0], out, loaded=tiny, n_images=3)
    return out, outcome


def test_every_figure_in_every_format(figures):
    out, outcome = figures
    assert outcome["skipped"] == {}
    for stem in FIGURES:
        for fmt in ("pdf", "svg", "png"):
            path = out / f"{stem}.{fmt}"
            assert path.is_file() and path.stat().st_size > 2000, path
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert "<svg" in (out / f"{stem}.svg").read_text()[:2000]
        with Image.open(out / f"{stem}.png") as png:
            assert png.info["dpi"][0] == pytest.approx(300, abs=1)
            assert png.width > 600
    # one fixed colour per method: EViT's palette colour is in the vector figures
    assert method_colour("evit") in (out / "accuracy.svg").read_text().lower()
    # the grid: 3 rows (images) x 2 columns (input, EViT) at 300 dpi
    with Image.open(out / "grid.png") as grid:
        assert grid.height > grid.width


def test_table_in_csv_markdown_and_latex(figures, sample_sweep):  # noqa: F811
    out, _ = figures
    rows = {row["keep_rate"]: row for row in load_results(sample_sweep[0])["rows"]}
    with open(out / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(line["Keep rate"]) for line in table] == [1.0, 0.7, 0.5]
    for line in table:
        row = rows[float(line["Keep rate"])]
        assert float(line["Top-1 (%)"]) == pytest.approx(row["top1"], abs=0.005)
        assert float(line["GMACs"]) == pytest.approx(row["gmacs"], abs=0.005)
        assert line["Params (M)"] == "5.7"  # DeiT-T: 5.7 M parameters (../shared/README.md)
    expected_reduction = 100 * (1 - rows[0.7]["gmacs"] / rows[1.0]["gmacs"])
    assert float(table[1]["GMACs reduction (%)"]) == pytest.approx(expected_reduction, abs=0.05)
    markdown = (out / "table.md").read_text()
    assert "| Method | Keep rate |" in markdown and markdown.count("| EViT |") == 3
    latex = (out / "table.tex").read_text()
    assert r"\begin{tabular}" in latex and r"Top-1 (\%)" in latex and latex.count(r"\\") >= 4


def test_plotly_charts_use_the_palette(sample_sweep):  # noqa: F811
    rows = load_results(sample_sweep[0])["rows"]
    for figure in (accuracy_vs_keep_rate(rows), accuracy_vs_gmacs(rows)):
        assert len(figure.data) == 1 and figure.data[0].line.color == method_colour("evit")
        assert sorted(figure.data[0].y) == sorted(row["top1"] for row in rows)
    series = diversity_series_from_rows(rows, 0.7)
    chart = diversity_chart(series)
    assert len(chart.data) == 1 and list(chart.data[0].y) == pytest.approx(rows[1]["diversity"])
    symbols = list(chart.data[0].marker.symbol)
    assert [i + 1 for i, s in enumerate(symbols) if s == "diamond"] == [4, 7, 10]  # reducing layers marked
    assert len(chart.layout.shapes) == 3


def test_cli_with_explicit_images(sample_sweep, sample_files, tmp_path):  # noqa: F811
    result = subprocess.run(
        [sys.executable, "-m", "analysis", "figures", "--results", str(sample_sweep[0] / "results.json"), "--out", str(tmp_path),
         "--images", str(sample_files[0]), str(sample_files[50]), "--keep-rate", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "table.tex").is_file()


def test_bad_options_say_why(sample_sweep, tmp_path, tiny):  # noqa: F811
    with pytest.raises(FiguresError, match="no rows at keep rate 0.3"):
        write_figures(sample_sweep[0], tmp_path, keep_rate=0.3, loaded=tiny)
    with pytest.raises(FiguresError, match="does not exist"):
        write_figures(sample_sweep[0], tmp_path, images=[tmp_path / "nope.jpg"], loaded=tiny)


def test_an_unreadable_image_is_skipped_and_named_not_the_grid(sample_sweep, sample_files, tmp_path):  # noqa: F811
    """One unreadable photo among the grid's images: the grid is drawn from the rest, and the file is
    named on the console."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sample_files[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    done = subprocess.run([sys.executable, "-m", "analysis", "figures", "--results", str(sample_sweep[0]), "--out", str(tmp_path / "f"),
                           "--images", str(folder), "--n-images", "3"], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "f" / "grid.png").is_file()
    assert "skipped image" in done.stderr and "broken.JPEG" in done.stderr
    with Image.open(tmp_path / "f" / "grid.png") as grid:
        assert grid.height < grid.width * 1.2  # two image rows, not three
