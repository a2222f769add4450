"""Every error tokenscope reports to a user, in one place beneath everything else.

A `TokenscopeError` is bad input a user can fix: the CLI prints its one-line message and exits 2,
the app shows it in `st.error`. Anything else (a `KeyError`, a `RuntimeError`) is a bug in
tokenscope and keeps its traceback.
"""
from __future__ import annotations


class TokenscopeError(Exception):
    """Base class of every error tokenscope reports to a user as one line (CLI exit 2, app st.error)."""


class ImageLoadError(TokenscopeError):
    """An image file is missing, empty, corrupt, not an image, or over PIL's decompression-bomb limit."""


class WeightsError(TokenscopeError):
    """Weights cannot be obtained (no network and no cache) or do not fit the architecture."""


class ModelError(TokenscopeError):
    """The model name is unknown to timm or is not a ViT tokenscope supports."""


class PlanError(TokenscopeError):
    """A reduction plan that cannot run: bad keep rate, layers, parameters or an unknown method."""


class PluginError(TokenscopeError):
    """A method plugin (file, module or entry point) that cannot be loaded or registers nothing usable."""


class DatasetError(TokenscopeError):
    """A folder that is not a labelled ImageNet-style dataset, or whose labels cannot be resolved."""


class SweepError(TokenscopeError):
    """A sweep that cannot run: an unknown or unavailable method, a bad keep rate or option."""


class BenchError(TokenscopeError):
    """A benchmark request that cannot run: unknown method, empty or bad batch sizes, repeats < 1."""


class FiguresError(TokenscopeError):
    """Figures that cannot be made: no rows, no images for the grid, an unusable option."""


class CLIError(TokenscopeError):
    """A bad command-line value."""
