"""Interactive (plotly) pictures: the TPS dispatch map with hover, and HTML export.

Pure functions over the crop and a `StageRecord`; nothing here runs a model.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from .overlays import (  # noqa: I001
    arrow_opacity,
    ARROW_COLOUR,
    ARROW_SHADOW,
    StageRecord,
    dispatch_arrows,
    dispatch_view,
    host_locations,
    patch_centres,
)


def dispatch_figure(crop: Image.Image, record: StageRecord, grid: tuple[int, int], *, scale: int = 2,
                    title: str | None = None) -> go.Figure:
    """Interactive TPS dispatch map (methods.md §3): the static `dispatch_view` (without its arrows and
    legend) as the background, one arrow per pruned patch to its host with opacity = squeeze weight
    (two annotations each: a black shadow and a white core),
    and hover on every pruned patch showing the patch (index, row, column), its host token and the
    weight; hover on a host shows its token index and how many patches it received.

    Args:
        crop: the model's input crop (W x H); grid: (rows, cols).
        record: a stage with `patch_pruned` and `patch_weight`.
    Returns:
        a plotly Figure of W * scale x H * scale pixels (y axis downwards, as in the image).
    Raises:
        ValueError: the record has no dispatch information.
    """
    background = dispatch_view(crop, record, grid, scale=scale, legend=False, arrows=False)
    width, height = background.size
    rows, cols = grid
    patch_px = (height // rows, width // cols)
    pruned = np.flatnonzero(record.patch_pruned & (record.patch_to_token >= 0))
    hosts = host_locations(record, grid, patch_px)
    centres = patch_centres(grid, patch_px)
    fig = go.Figure(go.Image(z=np.asarray(background), hoverinfo="skip"))
    weights = record.patch_weight
    arrows = []
    for patch, host, weight in dispatch_arrows(record):
        (x0, y0), (x1, y1) = centres[patch], hosts[host]
        # as in the static map: a white core over a black shadow, both at opacity = weight
        for colour, line_width in ((ARROW_SHADOW, 4), (ARROW_COLOUR, 2)):
            arrows.append(dict(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                               arrowhead=2, arrowsize=1, arrowwidth=line_width, arrowcolor="rgb(%d,%d,%d)" % colour,
                               opacity=arrow_opacity(weight), text=""))
    # one layout update for all arrows: `add_annotation` per arrow re-validates the growing list
    # (quadratic; tens of seconds for a map with hundreds of arrows, e.g. a pruned token sent to
    # several receivers)
    fig.update_layout(annotations=arrows)
    r, c = np.divmod(pruned, cols)
    others = record.other_hosts()

    def hosts_text(p: int) -> str:
        if p not in others:
            return f"host token {int(record.patch_to_token[p])}<br>squeeze weight {weights[p]:.3f}"
        pairs = [(int(record.patch_to_token[p]), float(weights[p]))] + others[p]
        return "tied hosts " + ", ".join(f"{token} (weight {weight:.3f})" for token, weight in pairs)

    hover = [f"patch {p} (row {rr}, col {cc})<br>{hosts_text(p)}" for p, rr, cc in zip(pruned.tolist(), r.tolist(), c.tolist())]
    fig.add_trace(go.Scatter(x=centres[pruned, 0], y=centres[pruned, 1], mode="markers", name="pruned patch",
                             marker=dict(size=max(6, patch_px[0] // 2), color="rgba(0,0,0,0)", line=dict(width=0)),
                             text=hover, hovertemplate="%{text}<extra></extra>"))
    host_ids = sorted(hosts)
    received = [int(((record.patch_to_token == h) & record.patch_pruned).sum()) for h in host_ids]
    fig.add_trace(go.Scatter(x=[hosts[h][0] for h in host_ids], y=[hosts[h][1] for h in host_ids], mode="markers",
                             name="host token", marker=dict(size=7, color="white", line=dict(width=1.5, color="black")),
                             text=[f"host token {h}<br>received {n} pruned patches" for h, n in zip(host_ids, received)],
                             hovertemplate="%{text}<extra></extra>"))
    fig.update_xaxes(visible=False, range=[0, width])
    fig.update_yaxes(visible=False, range=[height, 0], scaleanchor="x")
    fig.update_layout(width=width, height=height + (30 if title else 0), margin=dict(l=0, r=0, t=30 if title else 0, b=0),
                      title=title, showlegend=False, plot_bgcolor="white")
    return fig


def html_bytes(fig: go.Figure) -> bytes:
    """A self-contained HTML file of the figure (plotly.js embedded, works offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
