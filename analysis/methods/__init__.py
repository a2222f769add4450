"""The token-reduction methods. Importing this package imports every module in it, and each
module registers its methods (`analysis.registry.register`); nothing else names them.

The shared mechanism (`TokenAssignment`, `apply_assignment`, `Method`, `ParamSpec`) is in `base`.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (  # noqa: F401
    KIND_CODE,
    KINDS,
    Method,
    ParamSpec,
    ReduceContext,
    StageShape,
    TokenAssignment,
    apply_assignment,
    kept_count,
    register,
)
from ..registry import METHODS, all_methods, get_method  # noqa: F401

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
