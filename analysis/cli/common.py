"""Flags shared by the commands: model and weights, and the method flags built from the registry.

Every method parameter has a qualified flag, `--<method>-<parameter>` (e.g. `--bat-weighting`),
and, under its bare name, `--<parameter>` (e.g. `--weighting`), which applies to the chosen method
that has it. When several chosen methods (a sweep or a benchmark) share a bare name with different
specs, the bare flag is ambiguous and refused with a message naming the qualified flags.
Booleans get `--x` / `--no-x`.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable

from ..errors import PlanError
from ..models import DEFAULT_MODEL
from ..plan import ReductionPlan
from ..plan import parse_layers as plan_parse_layers
from ..registry import all_methods, get_method


def add_model_args(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default_model, help=f"timm ViT with a class token (default {default_model})")
    parser.add_argument("--weights", default="pretrained", help="pretrained (timm / Hugging Face), a checkpoint path, or random")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available, else cpu")


def add_crop_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: the model's timm data config; the papers use 0.875)")


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """--layers '4,7,10' -> (4, 7, 10); None or blank stays None (the method's default). Raises PlanError."""
    return plan_parse_layers(text, "--layers")


def _flag(*parts: str) -> str:
    return "--" + "-".join(part.replace("_", "-") for part in parts)


def _no_flag(*parts: str) -> str:
    return "--no-" + "-".join(part.replace("_", "-") for part in parts)


def _qualified_dest(method: str, name: str) -> str:
    return f"param__{method}__{name}"


def add_method_param_args(parser: argparse.ArgumentParser) -> None:
    """The method flags of every registered method (see the module docstring), grouped in -h. Call it
    after the command's own flags: a bare name the command already uses (bench's --r and --seed)
    gets no bare flag, only the qualified one."""
    taken = set(parser._option_string_actions)  # noqa: SLF001 - argparse offers no public query
    shared: dict[str, list[tuple[Any, Any]]] = {}
    skipped: set[str] = set()
    for method in all_methods().values():
        for spec in method.params:
            if _flag(spec.name) in taken:
                skipped.add(spec.name)
            else:
                shared.setdefault(spec.name, []).append((method, spec))
    parser.set_defaults(method_bare_skipped=tuple(sorted(skipped)))
    bare = parser.add_argument_group("method parameters (apply to the chosen method that has them)")
    for name, owners in shared.items():
        dest = f"param_{name}"
        defaults = "; ".join(f"{m.label}: default {s.default_text()}" for m, s in owners)
        text = f"{owners[0][1].help} [{defaults}]"
        if owners[0][1].kind == "bool":
            bare.add_argument(_flag(name), dest=dest, action="store_true", default=None, help=text)
            bare.add_argument(_no_flag(name), dest=dest, action="store_false", help=f"turn {name} off")
        else:
            bare.add_argument(_flag(name), dest=dest, default=None, metavar=name.upper(), help=text)
    qualified = parser.add_argument_group("per-method parameters (always unambiguous)")
    for method in all_methods().values():
        for spec in method.params:
            if _flag(method.name, spec.name) in taken:
                continue
            dest = _qualified_dest(method.name, spec.name)
            text = f"[{method.label}] default {spec.default_text()}"
            if spec.kind == "bool":
                qualified.add_argument(_flag(method.name, spec.name), dest=dest, action="store_true", default=None, help=text)
                qualified.add_argument(_no_flag(method.name, spec.name), dest=dest, action="store_false", help=argparse.SUPPRESS)
            else:
                qualified.add_argument(_flag(method.name, spec.name), dest=dest, default=None, metavar=spec.name.upper(), help=text)


def method_params_from_args(args: argparse.Namespace, method_name: str, chosen: Iterable[str] = (),
                            many: bool = False) -> dict[str, Any]:
    """The parameters of `method_name` that the user set explicitly, parsed and validated.

    Args:
        chosen: every method of the command (a sweep's list); a bare flag whose name two of them
            declare with different specs is ambiguous.
        many: a comma list given to a parameter that is not itself a list (`int_list`) is several
            values, returned as a list, one sweep setting each (`--seed 0,1,2`).
    Raises:
        PlanError: an unknown method, a bad value (naming the flag), or an ambiguous bare flag.
    """
    if method_name == "none":
        return {}
    method = get_method(method_name)
    skip_bare = getattr(args, "method_bare_skipped", ())
    others = [get_method(name) for name in dict.fromkeys(chosen) if name not in ("none", "dense", method_name)]
    values: dict[str, Any] = {}
    for spec in method.params:
        flag = _flag(method.name, spec.name)
        value = getattr(args, _qualified_dest(method.name, spec.name), None)
        if value is None and spec.name not in skip_bare:
            value = getattr(args, f"param_{spec.name}", None)
            flag = _flag(spec.name)
            if value is not None:
                clash = [m for m in others if m.param(spec.name) is not None and m.param(spec.name) != spec]
                if clash:
                    names = ", ".join(_flag(m.name, spec.name) for m in [method, *clash])
                    raise PlanError(f"{flag} is ambiguous: {', '.join(m.label for m in [method, *clash])} all take {spec.name} "
                                    f"with different defaults; use {names}")
        if value is None:
            continue
        try:
            items = [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else []
            if many and spec.kind not in ("int_list", "bool") and len(items) > 1:
                values[spec.name] = [spec.parse(item) for item in items]
                continue
            values[spec.name] = spec.parse(value)
        except ValueError as err:
            raise PlanError(f"{flag}: {err}") from None
    return values


def make_plan(args: argparse.Namespace, method: str, keep_rate: float, layers: tuple[int, ...] | None) -> ReductionPlan:
    """The plan of `method` with the parameters set on the command line."""
    return ReductionPlan.make(method, keep_rate, layers, **method_params_from_args(args, method))
