"""Interactive (plotly) charts of the dataset-level analysis, drawn from `sweep --patterns` rows
(the Compare page); the data come from `analysis.compare`, the same as the paper figures."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.compare import (MEASURE_LABELS, agreement_matrix, fidelity_table, grid_of, label_of, map_matrix, map_of,
                              methods_of, row_at, setting_measures, stage_blocks)
from viz.palette import method_colour


def keep_frequency_maps(rows: Sequence[dict[str, Any]], method: str, keep_rate: float) -> go.Figure:
    """One method at one keep rate: the keep frequency on the patch grid after each reduction stage,
    and the mean survival depth."""
    row = row_at(rows, method, keep_rate)
    blocks = stage_blocks(row)
    if len(blocks) > 8:
        blocks = sorted({blocks[int(round(i))] for i in np.linspace(0, len(blocks) - 1, 8)})
    depth = len(row["keep_frequency"])
    titles = [f"after block {b}" for b in blocks] + ["survival depth"]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.02)
    for index, block in enumerate(blocks):
        fig.add_trace(go.Heatmap(z=map_of(row, "keep_frequency", block), zmin=0, zmax=1, colorscale="Viridis",
                                 colorbar=dict(title="keep", x=1.0, len=0.9), showscale=index == 0,
                                 hovertemplate="row %{y}, col %{x}: %{z:.2f}<extra></extra>"), row=1, col=index + 1)
    fig.add_trace(go.Heatmap(z=map_of(row, "survival_depth"), zmin=0, zmax=depth, colorscale="Magma",
                             colorbar=dict(title="blocks", x=1.07, len=0.9),
                             hovertemplate="row %{y}, col %{x}: %{z:.2f} blocks<extra></extra>"), row=1, col=len(titles))
    fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor="x")
    fig.update_xaxes(showticklabels=False)
    rows_, cols_ = grid_of(row)
    fig.update_layout(title=f"{label_of(rows, method)} at keep rate {keep_rate:g}: keep frequency per patch ({rows_}x{cols_} grid)",
                      height=300, margin=dict(l=10, r=90, t=70, b=10))
    return fig


def matrix_chart(matrix: np.ndarray, labels: Sequence[str], title: str, zmin=None, zmax=None, reverse: bool = False) -> go.Figure:
    text = [[("" if not np.isfinite(v) else f"{v:.2f}") for v in row] for row in matrix]
    fig = go.Figure(go.Heatmap(z=matrix, x=list(labels), y=list(labels), zmin=zmin, zmax=zmax, colorscale="Viridis",
                               reversescale=reverse, text=text, texttemplate="%{text}",
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=380, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def agreement_chart(rows, keep_rate: float, measure: str, block: int, methods: Sequence[str], title: str) -> go.Figure:
    matrix = agreement_matrix(rows, keep_rate, measure, block, methods)
    return matrix_chart(matrix, [label_of(rows, m) for m in methods], f"{title}, keep rate {keep_rate:g}, after block {block}", 0.0, 1.0)


def map_similarity_chart(rows, table, keep_rate: float, metric: str, which: str = "keep_frequency") -> go.Figure:
    methods = [m for m in methods_of(rows) if row_at(rows, m, keep_rate)]
    matrix = map_matrix(table, keep_rate, metric, methods, which)
    bounded = metric in ("CC", "SCC", "SIM")
    low = -1.0 if metric in ("CC", "SCC") else (0.0 if bounded else None)
    title = f"{metric} between {which.replace('_', ' ')} maps, keep rate {keep_rate:g}" + (" (row = reference)" if metric == "KL" else "")
    return matrix_chart(matrix, [label_of(rows, m) for m in methods], title, low, 1.0 if bounded else None, reverse=not bounded)


def fidelity_chart(rows, measure: str) -> go.Figure:
    table = fidelity_table(rows)
    fig = go.Figure()
    for method in methods_of(rows):
        records = sorted([t for t in table if t["method"] == method], key=lambda t: -t["keep_rate"])
        fig.add_trace(go.Scatter(x=[t["keep_rate"] for t in records], y=[t[measure] for t in records], mode="lines+markers",
                                 name=label_of(rows, method), line=dict(color=method_colour(method))))
    fig.update_xaxes(title="keep rate", autorange="reversed")
    fig.update_yaxes(title=MEASURE_LABELS[measure])
    fig.update_layout(title=MEASURE_LABELS[measure] + " vs keep rate", height=340, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def cka_chart(rows, keep_rate: float) -> go.Figure:
    fig = go.Figure()
    for method in methods_of(rows):
        row = row_at(rows, method, keep_rate)
        if row and row.get("cka"):
            fig.add_trace(go.Scatter(x=list(range(1, len(row["cka"]) + 1)), y=row["cka"], mode="lines+markers",
                                     name=label_of(rows, method), line=dict(color=method_colour(method))))
    fig.update_xaxes(title="block")
    fig.update_yaxes(title="linear CKA to dense")
    fig.update_layout(title=f"CKA of the class-token features per block, keep rate {keep_rate:g}", height=340,
                      margin=dict(l=10, r=10, t=50, b=10))
    return fig


def correlation_chart(rows, measure: str) -> go.Figure:
    settings = setting_measures(rows)
    fig = go.Figure()
    for method in methods_of(rows):
        mine = [s for s in settings if s["method"] == method]
        fig.add_trace(go.Scatter(x=[s[measure] for s in mine], y=[s["top1_gap"] for s in mine], mode="markers",
                                 name=label_of(rows, method), marker=dict(color=method_colour(method), size=9),
                                 text=[f"keep {s['keep_rate']:g}" for s in mine]))
    fig.update_xaxes(title=MEASURE_LABELS[measure])
    fig.update_yaxes(title="top-1 gap to dense (points)")
    fig.update_layout(title=f"{MEASURE_LABELS[measure]} against the top-1 gap", height=340, margin=dict(l=10, r=10, t=50, b=10))
    return fig
