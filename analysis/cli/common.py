"""Flags shared by the commands: model and weights, and the method flags built from the registry."""
from __future__ import annotations

import argparse
from typing import Any

from ..engine import PlanError, ReductionPlan
from ..engine import parse_layers as engine_parse_layers
from ..methods import METHODS
from ..models import DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default_model, help=f"timm ViT with a class token (default {default_model})")
    parser.add_argument("--weights", default="pretrained", help="pretrained (timm / Hugging Face), a checkpoint path, or random")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available, else cpu")


def add_crop_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: the model's timm data config; the papers use 0.875)")


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """--layers '4,7,10' -> (4, 7, 10); None or blank stays None (the method's default). Raises PlanError."""
    return engine_parse_layers(text, "--layers")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_method_param_args(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter name across the registered methods; booleans get --x / --no-x."""
    seen: dict[str, str] = {}
    for method in METHODS.values():
        for spec in method.params:
            if spec.name in seen:
                continue
            seen[spec.name] = method.name
            dest = f"param_{spec.name}"
            if spec.kind == "bool":
                parser.add_argument(_flag(spec.name), dest=dest, action="store_true", default=None, help=f"[{method.label}] {spec.help}")
                parser.add_argument("--no-" + spec.name.replace("_", "-"), dest=dest, action="store_false", help=f"[{method.label}] turn {spec.name} off")
            else:
                parser.add_argument(_flag(spec.name), dest=dest, default=None, help=f"[{method.label}] {spec.help} (default {spec.default})")


def method_params_from_args(args: argparse.Namespace, method_name: str) -> dict[str, Any]:
    """The parameters of `method_name` that the user set explicitly, parsed and validated."""
    if method_name == "none":
        return {}
    if method_name not in METHODS:
        raise PlanError(f"unknown method {method_name!r}: choose none or one of {', '.join(sorted(METHODS))}")
    method = METHODS[method_name]
    chosen: dict[str, Any] = {}
    for spec in method.params:
        value = getattr(args, f"param_{spec.name}", None)
        if value is None:
            continue
        try:
            chosen[spec.name] = spec.parse(value)
        except ValueError as err:
            raise PlanError(f"--{spec.name.replace('_', '-')}: {err}") from None
    return chosen


def make_plan(method: str, keep_rate: float, layers: tuple[int, ...] | None, params: dict[str, Any]) -> ReductionPlan:
    if method != "none" and method not in METHODS:
        raise PlanError(f"unknown method {method!r}: choose none or one of {', '.join(sorted(METHODS))}")
    return ReductionPlan.make(method, keep_rate, layers, **params)
