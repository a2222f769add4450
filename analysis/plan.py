"""`ReductionPlan`: what to reduce, where and how, and `parse_layers`.

A plan is frozen and hashable (the app caches results by it) and is an argument of every forward
call: the shared model is never modified. `ReductionPlan.make` parses every parameter through the
method's `ParamSpec`, so a plan holds typed values and methods read them as they are;
`validate` is the only gate for unknown methods, keep rates, layers and parameters; `to_record` /
`from_record` is the one serialisation (CLI JSON, sweep rows, figures, the app).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import PlanError
from .lists import comma_list
from .registry import get_method

DENSE = "none"


def parse_layers(text: str | None, what: str = "reduction layers") -> tuple[int, ...] | None:
    """'4, 7, 10' -> (4, 7, 10), the 1-based reducing blocks as typed in the CLI or the app; None or
    blank -> None (each method's default). Range and repeats are checked by `ReductionPlan.validate`.
    Raises PlanError naming `what` for a part that is not an integer."""
    if text is None:
        return None
    layers = comma_list(text, int, what, PlanError, "4,7,10", "block numbers")
    return tuple(layers) or None


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _parse_params(method: str, params: dict[str, Any], strict: bool) -> tuple[tuple[str, Any], ...]:
    """The parameters parsed by the method's `ParamSpec`s, as sorted pairs. With `strict`, raise
    PlanError for an unknown method, an unknown parameter or a bad value; without, keep what cannot
    be parsed as it is (frozen), for `validate` to refuse."""
    if method == DENSE:
        if params and strict:
            raise PlanError(f"the dense model takes no parameters (got {', '.join(sorted(params))})")
        return tuple(sorted((name, _freeze(value)) for name, value in params.items()))
    try:
        spec = get_method(method)
    except PlanError:
        if strict:
            raise
        return tuple(sorted((name, _freeze(value)) for name, value in params.items()))
    known = {p.name: p for p in spec.params}
    parsed = []
    for name, value in params.items():
        if name not in known:
            if strict:
                raise PlanError(f"{spec.label} has no parameter {name!r} (it has: {', '.join(known) or 'none'})")
            parsed.append((name, _freeze(value)))
            continue
        try:
            parsed.append((name, known[name].parse(value)))
        except ValueError as err:
            if strict:
                raise PlanError(f"{spec.label}: {err}") from None
            parsed.append((name, _freeze(value)))
    return tuple(sorted(parsed))


@dataclass(frozen=True)
class ReductionPlan:
    """What to reduce, where and how; hashable so results can be cached by it.

    Attributes:
        method: a registered method name, or "none" for the dense model.
        keep_rate: rho in (0, 1], the fraction of non-cls tokens kept at each stage (1.0 for
            methods driven by another budget, e.g. ToMe's r).
        layers: 1-based reducing blocks in block order (`make` sorts them), or None for the method's default.
        params: the method's explicitly set parameters as sorted (name, value) pairs, values
            already parsed by the method's `ParamSpec` (lists are tuples).
    """

    method: str = DENSE
    keep_rate: float = 1.0
    layers: tuple[int, ...] | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, method: str = DENSE, keep_rate: float = 1.0, layers=None, **params: Any) -> "ReductionPlan":
        """Build a plan from plain values, parsing every parameter with its method's `ParamSpec`
        (typed values: methods read them as they are). `make` refuses nothing it can store: an
        unknown method or parameter, or a bad value, is kept as given for `validate`, the one gate.

        Raises:
            PlanError: a keep rate or layer list that is not numeric (it cannot be stored).
        """
        try:
            rate = float(keep_rate)
            layer_tuple = None if layers is None else tuple(sorted(int(layer) for layer in layers))
        except (TypeError, ValueError):
            raise PlanError(f"keep rate must be a number and layers whole numbers, got {keep_rate!r} and {layers!r}") from None
        return cls(method=method, keep_rate=rate, layers=layer_tuple, params=_parse_params(method, params, strict=False))

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    def spec(self):
        """The registered `Method` of this plan (None for the dense model)."""
        return None if self.is_dense else get_method(self.method)

    def param_dict(self) -> dict[str, Any]:
        """The method's parameters with its defaults filled in."""
        if self.is_dense:
            return {}
        values = {p.name: p.default for p in self.spec().params}
        values.update(dict(self.params))
        return values

    def reducing_layers(self, depth: int) -> tuple[int, ...]:
        """The 1-based reducing layers for a model of `depth` blocks."""
        if self.is_dense:
            return ()
        if self.layers is not None:
            return self.layers
        default = self.spec().default_layers
        return tuple(range(1, depth + 1)) if default is None else tuple(default)

    def validate(self, depth: int) -> None:
        """Raise PlanError with a one-line reason if the plan cannot run on `depth` blocks."""
        if self.is_dense:
            _parse_params(self.method, dict(self.params), strict=True)
            return
        method = self.spec()
        if not (0.0 < self.keep_rate <= 1.0) or math.isnan(self.keep_rate):
            raise PlanError(f"keep rate must be in (0, 1], got {self.keep_rate}")
        layers = self.reducing_layers(depth)
        if len(set(layers)) != len(layers):
            raise PlanError(f"reduction layers must not repeat, got {','.join(map(str, layers))}")
        bad = [layer for layer in layers if not 1 <= layer <= depth]
        if bad:
            raise PlanError(f"reduction layer {bad[0]} is out of range: this model has blocks 1..{depth}")
        _parse_params(self.method, dict(self.params), strict=True)
        method.check_plan(self, depth)

    def to_record(self) -> dict[str, Any]:
        """The plan as plain JSON values: {"method", "keep_rate", "layers", "params"} (tuples as lists)."""
        return {
            "method": self.method,
            "keep_rate": self.keep_rate,
            "layers": None if self.layers is None else list(self.layers),
            "params": {name: (list(value) if isinstance(value, tuple) else value) for name, value in self.params},
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ReductionPlan":
        """The inverse of `to_record`. Raises PlanError for a record that does not make a plan."""
        if not isinstance(record, dict) or "method" not in record:
            raise PlanError(f"not a plan record: {record!r}")
        return cls.make(record["method"], record.get("keep_rate", 1.0), record.get("layers"), **(record.get("params") or {}))

    def resolved(self, depth: int) -> dict[str, Any]:
        """The plan as it runs on `depth` blocks, flattened as `inspect --json` prints its `params`:
        keep_rate (null for a method without one, e.g. ToMe, whose budget is in its own parameters),
        layers (resolved) and every parameter with defaults filled in; {} for the dense model."""
        if self.is_dense:
            return {}
        rate = self.keep_rate if self.spec().uses_keep_rate else None
        out: dict[str, Any] = {"keep_rate": rate, "layers": list(self.reducing_layers(depth))}
        for name, value in self.param_dict().items():
            out[name] = list(value) if isinstance(value, tuple) else value
        return out
