"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022; methods.md §2),
and Top-K, EViT's selection without the fused token (methods.md §15)."""
from __future__ import annotations

import torch

from ..plan import ReductionPlan
from .base import ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_assignment, kept_count, register


def select_attentive(cls_attention: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Indices of the `ceil(keep_rate * n)` tokens with the highest class attention.

    Args:
        cls_attention: [B, n] class attention of the non-cls tokens (methods.md §1).
    Returns:
        [B, k] long token indices into the full sequence (cls = 0, so non-cls indices start at 1),
        sorted by descending class attention (EViT's `topk`, sorted=True).
    """
    k = kept_count(keep_rate, cls_attention.shape[1])
    return torch.topk(cls_attention, k, dim=1, largest=True, sorted=True).indices + 1


@register
class EViT(Method):
    name = "evit"
    rank = 10
    in_default_sweep = True
    label = "EViT"
    paper = "EViT, Liang et al., ICLR 2022"
    needs = frozenset({"cls_attention"})
    colour = "#1f77b4"
    marker = "o"
    params = (
        ParamSpec("fuse", True, "bool", "Fuse the inattentive tokens into one extra token (EViT's default); off drops them."),
    )
    comparison = (ComparisonEntry("importance-diversity", 1, "importance-based: EViT", (("fuse", False),)),
                  ComparisonEntry("pruning", 3, "EViT"))

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """EViT at one stage: [cls, kept (descending class attention), fused]; the fused token is the
        class-attention-weighted *sum* of the pruned tokens (methods.md §2, not normalised)."""
        attention = ctx.cls_attention
        n = attention.shape[1]
        kept = select_attentive(attention, ctx.keep_rate)
        if kept.shape[1] == n:
            return None
        fuse_weight = None
        if ctx.params.get("fuse", False):
            fuse_weight = torch.cat([attention.new_ones(attention.shape[0], 1), attention], dim=1)
        return keep_assignment(kept, n + 1, fuse_weight)

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The fused token's weighted sum: one multiply-add per channel of every pruned token."""
        if not (shape.acted and shape.params.get("fuse", False)):
            return 0.0, 0.0
        return 0.0, float((shape.n_in - kept_count(shape.keep_rate, shape.n_in)) * shape.channels)


COUNTS = ("power", "evit")


def power_count(keep_rate: float, stage: int, num_patches: int) -> int:
    """`int(num_patches * keep_rate ** (stage + 1))`, at least 1: the official Top-K code's kept count
    at 0-based stage s (Haurum et al.'s `models/topk.py`: `left_tokens = int(keep_rate * init_n)`
    with `init_n = 14 * 14` and a single keep rate raised to the power s + 1; 137, 96, 67 of 196 at 0.7)."""
    return max(1, int(num_patches * keep_rate ** (stage + 1)))


@register
class TopK(EViT):
    """Top-K (Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision
    Transformers", ICCV 2023 Workshops; official code JoakimHaurum/TokenReduction `models/topk.py`;
    methods.md §15): keep the tokens with the highest head-averaged class attention, by descending
    attention, drop the rest. Haurum et al. found Top-K and EViT hard to beat.

    It is EViT's selection without the fused token (`select_attentive`, same tie order, same output
    order) except for the kept count: the official code keeps `int(P * rho^s)` of the P original
    patches at stage s = 1, 2, 3 (`count="power"`, the default), EViT `ceil(rho n)` of the n present
    (`count="evit"`, which is exactly EViT with fuse off). `budget` uses "evit", whose counts are the
    keep rate's budget by definition."""

    name = "topk"
    rank = 11
    in_default_sweep = False
    label = "Top-K"
    paper = "Top-K, Haurum et al., \"Which Tokens to Use?\", ICCVW 2023"
    colour = "#17becf"
    marker = "<"
    params = (
        ParamSpec("count", "power", "choice",
                  "Kept tokens at stage s: power = int(P * rho^s) of the P original patches (the official Top-K code: "
                  "137, 96, 67 at 0.7), evit = ceil(rho n) of the n present (EViT without fusion: 138, 97, 68).",
                  choices=COUNTS),
    )
    comparison = (ComparisonEntry("pruning", 1, "Top-K"),)

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """Top-K at one stage: [cls, kept (descending class attention)]; the others are dropped."""
        if ctx.params["count"] == "evit":
            return super().assign(ctx)
        attention = ctx.cls_attention
        n = attention.shape[1]
        k = min(n, power_count(ctx.keep_rate, ctx.stage, ctx.num_patches))
        if k == n:
            return None
        kept = torch.topk(attention, k, dim=1, largest=True, sorted=True).indices + 1
        return keep_assignment(kept, n + 1)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers=None, schedule: str = "constant",
               target_counts=None) -> ReductionPlan:
        """Top-K at a keep rate's budget: `count="evit"`, whose counts are `keep_rate_counts` (the
        official power schedule keeps one token fewer per stage at 0.7)."""
        return ReductionPlan.make(self.name, keep_rate, None if layers is None else tuple(layers), count="evit")
