"""One fixed colour per method, for every chart and figure (plotly and matplotlib alike).

Colours are matplotlib's "tab10" hex codes, so the paper figures and the app's charts match.
"""
from __future__ import annotations

METHOD_COLOURS: dict[str, str] = {
    "none": "#000000",        # the dense model
    "evit": "#1f77b4",        # blue
    "etps": "#ff7f0e",        # orange
    "dtps": "#8c564b",        # brown
    "bat": "#d62728",         # red
    "dpc": "#2ca02c",         # green
    "tome": "#9467bd",        # purple
    "dynamicvit": "#e377c2",  # pink
}
_SPARE = ("#17becf", "#bcbd22", "#7f7f7f")

METHOD_MARKERS: dict[str, str] = {"none": "*", "evit": "o", "etps": "s", "dtps": "P", "bat": "D", "dpc": "^", "tome": "v",
                                  "dynamicvit": "X"}


def method_colour(method: str) -> str:
    """The hex colour of `method` (a registered name or "none"); unknown names get a stable spare colour."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _SPARE[sum(map(ord, method)) % len(_SPARE)]


def method_marker(method: str) -> str:
    """The matplotlib marker of `method` (plotly charts use circles)."""
    return METHOD_MARKERS.get(method, "o")
