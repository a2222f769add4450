"""Plotly charts of sweep results and of diversity per layer; one fixed colour per method
(`viz.palette`). Inputs are plain rows / lists (the dicts of `results.json`); nothing here runs a model.

A row needs: method, label, keep_rate, top1 (and top5, gmacs, params, diversity,
diversity_per_token, reducing_layers for the charts that use them).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import plotly.graph_objects as go

from analysis.registry import all_methods
from analysis.sweep import gmacs_spread

from .palette import method_colour

# The legend sits below the plot: above it, long method names would run into the title in narrow columns.
LAYOUT = dict(template="plotly_white", height=460, margin=dict(l=60, r=20, t=50, b=130),
              legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0))


def _by_method(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


def _params_text(row: dict[str, Any]) -> str:
    params = row.get("params") or {}
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def uses_keep_rate(row: dict[str, Any]) -> bool:
    """Whether a results row's method is driven by the keep rate (else its budget is in its params,
    e.g. ToMe's r): the row's own `uses_keep_rate`, else the registry's, else True."""
    if "uses_keep_rate" in row:
        return bool(row["uses_keep_rate"])
    method = all_methods().get(row["method"])
    return True if method is None else bool(method.uses_keep_rate)


def setting_label(row: dict[str, Any]) -> str:
    """The row's method label, with its budget parameters for a method that has no keep rate."""
    label = row.get("label", row["method"])
    return label if uses_keep_rate(row) or row["method"] == "none" else f"{label} ({_params_text(row)})"


def accuracy_vs_keep_rate(rows: Sequence[dict[str, Any]], metric: str = "top1") -> go.Figure:
    """Top-1 (or top-5, `metric`) in percent against the keep rate, one line per method."""
    fig = go.Figure()
    for method, group in _by_method(rows).items():
        group = sorted(group, key=lambda r: r["keep_rate"])
        fig.add_trace(go.Scatter(
            x=[r["keep_rate"] for r in group], y=[r[metric] for r in group], mode="lines+markers",
            name=group[0].get("label", method), line=dict(color=method_colour(method)),
            customdata=[[_params_text(r), r.get("gmacs", float("nan"))] for r in group],
            hovertemplate="keep rate %{x}<br>" + metric + " %{y:.2f}%<br>%{customdata[0]}<br>%{customdata[1]:.2f} GMACs<extra></extra>",
        ))
    fig.update_layout(title=f"{'Top-1' if metric == 'top1' else 'Top-5'} accuracy vs keep rate", **LAYOUT)
    fig.update_xaxes(title="keep rate", autorange="reversed")
    fig.update_yaxes(title=f"{metric} (%)")
    return fig


def accuracy_vs_gmacs(rows: Sequence[dict[str, Any]], metric: str = "top1") -> go.Figure:
    """Top-1 (or top-5) in percent against GMACs per image, one line per method. A method whose
    images keep different token counts sits at its mean GMACs with a horizontal error bar of one
    standard deviation over the images (min and max in the hover)."""
    fig = go.Figure()
    for method, group in _by_method(rows).items():
        group = sorted(group, key=lambda r: r["gmacs"])
        spreads = [gmacs_spread(r) for r in group]
        fig.add_trace(go.Scatter(
            x=[r["gmacs"] for r in group], y=[r[metric] for r in group], mode="lines+markers",
            name=group[0].get("label", method), line=dict(color=method_colour(method)),
            error_x=dict(type="data", array=spreads, visible=True, thickness=1.2, width=4) if any(spreads) else None,
            customdata=[[r["keep_rate"], _params_text(r),
                         (f"per image {r['gmacs_min']:.3f}-{r['gmacs_max']:.3f} GMACs (std {spread:.3f})" if spread else "")]
                        for r, spread in zip(group, spreads)],
            hovertemplate="%{x:.3f} GMACs<br>" + metric + " %{y:.2f}%<br>keep rate %{customdata[0]}<br>%{customdata[1]}"
                          "<br>%{customdata[2]}<extra></extra>",
        ))
    fig.update_layout(title=f"{'Top-1' if metric == 'top1' else 'Top-5'} accuracy vs GMACs", **LAYOUT)
    fig.update_xaxes(title="GMACs per image")
    fig.update_yaxes(title=f"{metric} (%)")
    return fig


def diversity_series_from_rows(rows: Sequence[dict[str, Any]], keep_rate: float, per_token: bool = False) -> list[dict[str, Any]]:
    """The rows at `keep_rate` as diversity series: {method, label, values, reducing_layers}."""
    key = "diversity_per_token" if per_token else "diversity"
    series = []
    for row in rows:
        if abs(row["keep_rate"] - keep_rate) < 1e-9 and row.get(key):
            series.append({"method": row["method"], "label": setting_label(row), "values": row[key],
                           "reducing_layers": row.get("reducing_layers", [])})
    return series


def diversity_chart(series: Sequence[dict[str, Any]], title: str | None = "Diversity r(Z) per layer", per_token: bool = False) -> go.Figure:
    """Diversity per block with methods overlaid and reducing layers marked.

    Args:
        series: one dict per method: method (name, picks the colour), label, values (one r(Z) per
            block, block 1 first), reducing_layers (1-based; optional).
        per_token: only changes the axis title (values are passed as they are).
    Reducing layers get filled markers (others hollow), and dotted vertical lines mark the layers
    where a method with a few reducing stages acts (a method reducing in every block draws none).
    """
    fig = go.Figure()
    line_layers: set[int] = set()
    for item in series:
        values = list(item["values"])
        layers = list(range(1, len(values) + 1))
        reducing = set(item.get("reducing_layers") or [])
        if reducing and len(reducing) < len(values):
            line_layers |= reducing
        colour = method_colour(item["method"])
        fig.add_trace(go.Scatter(
            x=layers, y=values, mode="lines+markers", name=item.get("label", item["method"]),
            line=dict(color=colour),
            marker=dict(size=[11 if layer in reducing else 6 for layer in layers],
                        symbol=["diamond" if layer in reducing else "circle-open" for layer in layers], color=colour),
            hovertemplate="block %{x}<br>r(Z) %{y:.4g}<extra>%{fullData.name}</extra>",
        ))
    # all lines in one layout update: add_vline per line took 27 of the chart's 50 ms for three lines
    lines = [dict(type="line", xref="x", yref="y domain", x0=layer, x1=layer, y0=0, y1=1,
                  line=dict(color="#999999", dash="dot", width=1)) for layer in sorted(line_layers)]
    fig.update_layout(title=title, shapes=lines, **LAYOUT)
    fig.update_xaxes(title="block (diamond = a reducing layer)", dtick=1)
    fig.update_yaxes(title="r(Z) per token (l1)" if per_token else "r(Z) (l1, summed over tokens)")
    return fig
