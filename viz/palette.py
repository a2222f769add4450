"""One colour and one marker per method, for every chart and figure (plotly and matplotlib alike).

Each method declares its own (`Method.colour`, `Method.marker`, in its own file); a method that
declares none (a plugin, say) gets the first spare colour and marker that no other registered
method uses, in registration order, so colours stay distinct and the same on every run.
"""
from __future__ import annotations

from analysis.methods.base import SPARE_COLOURS, SPARE_MARKERS
from analysis.registry import all_methods

DENSE_COLOUR = "#000000"
DENSE_MARKER = "*"
UNKNOWN_COLOUR = "#7f7f7f"


def _assigned(attribute: str, spares: tuple[str, ...]) -> dict[str, str]:
    methods = all_methods()
    taken = {getattr(m, attribute) for m in methods.values() if getattr(m, attribute)}
    free = [value for value in spares if value not in taken]
    out: dict[str, str] = {}
    for index, (name, method) in enumerate(methods.items()):
        value = getattr(method, attribute)
        if not value:
            value = free.pop(0) if free else spares[index % len(spares)]
        out[name] = value
    return out


def method_colour(method: str) -> str:
    """The hex colour of `method` (a registered name or "none"); a name no longer registered (an old
    results file) gets a neutral grey."""
    if method == "none":
        return DENSE_COLOUR
    return _assigned("colour", SPARE_COLOURS).get(method, UNKNOWN_COLOUR)


def method_marker(method: str) -> str:
    """The matplotlib marker of `method` (plotly charts use circles)."""
    if method == "none":
        return DENSE_MARKER
    return _assigned("marker", SPARE_MARKERS).get(method, "o")
