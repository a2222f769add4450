"""Pictures of token reduction, drawn from arrays and provenance records; nothing here runs a model.

`viz.overlays`: static PIL pictures (masked tokens, class attention, merge groups, TPS dispatch
map, comparison row, PNG bytes). `viz.interactive`: the plotly dispatch map and HTML export.
"""
from .overlays import (
    Panel,
    StageRecord,
    attention_view,
    comparison_row,
    dispatch_view,
    masked_view,
    merge_groups_view,
    png_bytes,
    stage_view,
    suggested_view,
)

__all__ = [
    "Panel", "StageRecord", "attention_view", "comparison_row", "dispatch_view", "masked_view",
    "merge_groups_view", "png_bytes", "stage_view", "suggested_view",
]
