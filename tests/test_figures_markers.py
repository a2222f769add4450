"""The diversity figure's open markers (blocks that do not reduce) stay visible for line markers
("x", "+"), which have no face to leave empty."""
from __future__ import annotations

import warnings

import pytest

from analysis.figures import _hollow, figure_diversity


@pytest.mark.parametrize("marker, visible_face", [("o", False), ("h", False), ("x", True), ("+", True)])
def test_open_markers(marker, visible_face):
    style = _hollow(marker, "#7f7f7f")
    assert ("facecolors" not in style) == visible_face
    if not visible_face:
        assert style == {"facecolors": "none", "edgecolors": "#7f7f7f"}


def test_diversity_figure_draws_line_markers_without_a_warning(monkeypatch):
    import viz.palette

    monkeypatch.setattr(viz.palette, "method_marker", lambda method: "x")
    rows = [{"model": "m", "method": "evit", "keep_rate": 0.7, "label": "EViT", "top1": 70.0, "gmacs": 0.8, "n_images": 4,
             "diversity": [3.0, 2.0, 1.0, 0.5], "reducing_layers": [2]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = figure_diversity(rows, 0.7)
    left = fig.axes[0]
    open_points = [c for c in left.collections if len(c.get_offsets()) == 3]
    assert open_points and open_points[0].get_facecolor()[0][3] > 0  # drawn, faint, not invisible
