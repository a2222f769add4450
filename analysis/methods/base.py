"""The one mechanism every token-reduction method shares.

A method only decides *who goes where with what weight*: it returns a `TokenAssignment` that maps
each current token to at most one output token. `apply_assignment` then updates hidden states,
token sizes and provenance with the same scatter (a row-wise index_add), on whatever device the tensors live
(see ../shared/docs/architecture.md, "One mechanism for every method").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..lists import comma_list

# Token kinds, as the CLI JSON spells them (methods.md §7). Stored as small integer codes.
KINDS: tuple[str, ...] = ("cls", "kept", "fused", "host", "pair", "cluster", "merged")
KIND_CODE: dict[str, int] = {name: code for code, name in enumerate(KINDS)}


@dataclass
class TokenAssignment:
    """Where every current token goes at one reduction stage.

    Attributes:
        dest: [B, N] long, the output token each current token goes to; -1 = discarded. The class
            token (index 0) must go to output 0.
        weight: [B, N] float, each token's weight in its output token.
        n_out: number of output tokens (cls included), the same for every image of the batch.
        normalize: True: an output token is the weighted mean of its inputs (weights divided by
            their sum); False: the weighted sum (EViT's fused token, methods.md §2).
        kinds: [B, n_out] long codes into `KINDS`.
        pruned: optional [B, N] bool, the tokens that lost their own slot at this stage (pruned
            and fused or squeezed into a host); the dispatch maps draw these.
        extra: optional arrays a method wants on its stage record, copied as they are; per patch
            [B, P] or per output token [B, n_out], as the method documents (e.g. TPS's "dispatch":
            [B, n_out] self weight of every output token; its presence makes the CLI JSON list the
            dispatched patches).
    """

    dest: torch.Tensor
    weight: torch.Tensor
    n_out: int
    normalize: bool
    kinds: torch.Tensor
    pruned: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def apply_assignment(assignment: TokenAssignment, x: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge, fuse or drop tokens as `assignment` says.

    Args:
        x: [B, N, C] hidden states.
        sizes: [B, N] float, how many original tokens each current token holds.
    Returns:
        (x_out [B, n_out, C], sizes_out [B, n_out], normalized_weight [B, N]); the last is each
        token's share of its output token (weight / sum of weights there, or the raw weight when
        `normalize` is False), 0 for discarded tokens.
    """
    batch, _, channels = x.shape
    keep = assignment.dest >= 0
    dest = assignment.dest.clamp(min=0)
    weight = torch.where(keep, assignment.weight.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
    if assignment.normalize:
        # Normalise the [B, N] weights first, so the weighted mean costs no pass over [B, n_out, C].
        denominator = weight.new_zeros(batch, assignment.n_out).scatter_add_(1, dest, weight)
        share = weight / denominator.gather(1, dest).clamp(min=torch.finfo(x.dtype).tiny)
    else:
        share = weight
    # Row-wise index_add_ over the flattened batch rather than scatter_add_ with an index expanded
    # over channels: whole rows are added at once, about twice as fast on the CPU
    # (analysis/bench.py measures the forward).
    rows = (dest + torch.arange(batch, device=dest.device).unsqueeze(1) * assignment.n_out).reshape(-1)
    out = x.new_zeros(batch * assignment.n_out, channels)
    out.index_add_(0, rows, (x * share.unsqueeze(-1)).reshape(-1, channels))
    out = out.view(batch, assignment.n_out, channels)
    sizes_out = sizes.new_zeros(batch, assignment.n_out).scatter_add_(1, dest, torch.where(keep, sizes, torch.zeros_like(sizes)))
    return out, sizes_out, share


def kept_count(keep_rate: float, n: int) -> int:
    """`ceil(keep_rate * n)` (EViT, methods.md §2), with the product rounded to 9 decimals first so
    that float noise such as 0.7 * 100 = 70.00000000000001 does not keep one token too many."""
    return min(n, max(1, math.ceil(round(keep_rate * n, 9))))


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: the app's widget and the CLI flag are built from it.

    `kind` is "float", "int", "bool", "choice" or "int_list" (an int or a comma list, e.g. ToMe's r).
    """

    name: str
    default: Any
    kind: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()

    def parse(self, value: Any) -> Any:
        """Convert and validate a user value. Raises ValueError with a one-line reason."""
        if self.kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return bool(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
            return value
        if self.kind == "int_list":
            if isinstance(value, (str, list, tuple)):
                items = tuple(comma_list(value, int, self.name, ValueError, "13 or 16,16,8"))
            else:
                items = (int(value),)
            if not items:
                raise ValueError(f"{self.name} is empty")
            for item in items:
                self._check_range(item)
            return items[0] if len(items) == 1 else items
        try:
            number = int(value) if self.kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a number, got {value!r}") from None
        if self.kind == "float" and math.isnan(number):
            raise ValueError(f"{self.name} must be a number, got NaN")
        self._check_range(number)
        return number

    def _check_range(self, number: float) -> None:
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"{self.name} must be at least {self.minimum}, got {number}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"{self.name} must be at most {self.maximum}, got {number}")


@dataclass
class ReduceContext:
    """What a method may read when it decides an assignment.

    Attributes:
        x: [B, N, C] hidden states (after the attention residual for methods acting inside a
            block, the block input for methods acting before one).
        sizes: [B, N] float, original tokens held by each token (cls counts 1, ToMe's convention).
        cls_attention: [B, N-1] head-averaged post-softmax attention of cls to every non-cls token
            in the current block (methods.md §1), or None when the method does not need it.
        keys: [B, N, d] keys averaged over heads (ToMe's metric), or None when not needed.
        keep_rate: the plan's keep rate.
        stage: 0-based index of this stage among the plan's reducing layers.
        block_index: 0-based index of the block.
        params: the plan's parameters, defaults filled in.
        num_patches: the number of original patches (196 for DeiT at 224 px).
        extras: method weights loaded with the checkpoint (e.g. "score_predictor"), or {}.
    """

    x: torch.Tensor
    sizes: torch.Tensor
    cls_attention: torch.Tensor | None
    keys: torch.Tensor | None
    keep_rate: float
    stage: int
    block_index: int
    params: dict[str, Any]
    num_patches: int
    extras: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of a token-reduction method; subclasses fill in the class attributes and `assign`.

    Attributes:
        name: the CLI name (`--method NAME`).
        label: the name shown in the app and figures.
        paper: the source, e.g. "EViT, Liang et al., ICLR 2022".
        acts: "inside" (after the attention residual, before the MLP) or "before" (on the block input).
        default_layers: 1-based reducing layers, or None for every block (ToMe).
        needs_cls_attention / needs_keys: what the engine must compute at a reducing block.
        params: the method's parameters.
        uses_keep_rate: False for methods driven by another budget (ToMe's r).
    """

    name: str = ""
    label: str = ""
    paper: str = ""
    acts: str = "inside"
    default_layers: tuple[int, ...] | None = (4, 7, 10)
    needs_cls_attention: bool = False
    needs_keys: bool = False
    uses_keep_rate: bool = True
    params: tuple[ParamSpec, ...] = ()

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """The assignment at one stage, or None when the stage changes nothing."""
        raise NotImplementedError

    def proportional_attention(self, params: dict[str, Any]) -> bool:
        """True when attention logits get log(size) added for every key (ToMe)."""
        return False

    def unavailable_reason(self, extras: dict[str, Any]) -> str | None:
        """Why the method cannot run with these loaded extras (e.g. no predictor weights), or None."""
        return None

    def describe(self) -> str:
        return f"{self.label} ({self.paper})"


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under its `name`."""
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method called `name`. Raises KeyError with the known names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None


def complement(selected: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n - s] long: the non-cls token indices 1..n that are not in `selected` [B, s], ascending
    (the pruned / inattentive tokens beside a selection)."""
    batch = selected.shape[0]
    chosen = torch.zeros(batch, n + 1, dtype=torch.bool, device=selected.device)
    chosen[:, 0] = True
    chosen.scatter_(1, selected, True)
    return torch.sort(chosen.to(torch.uint8), dim=1, stable=True).indices[:, : n - selected.shape[1]]
