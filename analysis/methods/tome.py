"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023; methods.md §6).

In every block (by default), after the attention residual and before the MLP, r tokens merge into
their most similar partners; proportional attention adds log(size) of every key to the attention
logits (the engine passes it to SDPA as an additive mask).

Budget helpers, for comparing ToMe with the keep-rate methods at the same cost (`ToMe.budget`):
- `tome_counts(r, depth, n0)`: the tokens leaving each block for an r schedule.
- `matched_r_schedule(target_counts, n0)`: a per-block r whose counts follow a target per block.
- `r_for_keep_rate(keep_rate, ...)`: a constant r (or the matched list) whose total token budget,
  the sum of tokens over blocks (the GMACs proxy), best matches a keep-rate method
  (`base.keep_rate_counts`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_rate_counts, register,
    token_kinds,
)


def r_at_stage(r: int | Sequence[int], stage: int) -> int:
    """The merges at reducing stage `stage` (0-based) for a constant r or a per-stage list.

    Raises PlanError when the list is shorter than the number of reducing layers (the method
    cannot see the plan's length, so entries beyond the last reducing layer are simply unused)."""
    if isinstance(r, (list, tuple)):
        if stage >= len(r):
            raise PlanError(
                f"ToMe's r list has {len(r)} entries but the plan reduces at more layers; give one r per reducing layer "
                "(12 for every block of DeiT) or a single number"
            )
        return int(r[stage])
    return int(r)


def bipartite_match(metric: torch.Tensor, protect_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The scoring step of ToMe's bipartite soft matching (Bolya et al., ICLR 2023, §3; methods.md §6).

    The sequence alternates into set A (even positions) and set B (odd positions); every A token
    is scored by its best cosine similarity to a B token on the L2-normalised metric.

    Args:
        metric: [B, T, d] float, T >= 2, in the sequence's order.
        protect_first: score position 0 (the class token) at -inf so it never merges.
    Returns:
        (order [B, ceil(T / 2)] long: A indices (into A, not the sequence) by descending best
         score, ties by position, so `order[:, :r]` are the r A tokens that merge;
         partner [B, ceil(T / 2)] long: every A token's best B index, into B).
    """
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)
    if protect_first:
        scores[:, 0, :] = -float("inf")
    best, partner = scores.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    return order, partner


def bipartite_destinations(keys: torch.Tensor, r: int, drop_matched: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where every token goes under ToMe's bipartite matching with r merges (methods.md §6): the
    unmerged A tokens (even positions, cls first) keep their order, then the B tokens (odd
    positions); each of the r best-matched A tokens goes to its B partner, or is discarded
    (dest -1) with `drop_matched` (a pruning-like variant of the matching).

    Args:
        keys: [B, N, d] head-averaged keys; r: 1 <= r <= (N - 1) // 2.
    Returns:
        (dest [B, N] long, unmerged [B, n_a - r] sorted positions among the A tokens, n_out).
    """
    batch, n, _ = keys.shape
    device = keys.device
    order, partner = bipartite_match(keys, protect_first=True)
    n_a, n_b = order.shape[1], n // 2
    src = order[:, :r]
    unmerged = order[:, r:].sort(dim=-1).values
    n_unmerged = n_a - r
    dest_a = torch.empty(batch, n_a, dtype=torch.long, device=device)
    dest_a.scatter_(1, unmerged, torch.arange(n_unmerged, device=device).expand(batch, n_unmerged))
    dest_a.scatter_(1, src, torch.full_like(src, -1) if drop_matched else partner.gather(1, src) + n_unmerged)
    dest = torch.empty(batch, n, dtype=torch.long, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = torch.arange(n_unmerged, n_unmerged + n_b, device=device).expand(batch, n_b)
    return dest, unmerged, n_unmerged + n_b


def tome_assignment(keys: torch.Tensor, sizes: torch.Tensor, r: int) -> TokenAssignment | None:
    """ToMe's bipartite soft matching with a class token (methods.md §6).

    metric = head-averaged keys, L2-normalised; A = even positions (with cls), B = odd positions;
    scores `A B^T` with the cls row at -inf; the r A tokens with the highest best score merge into
    their best B partner (several may share one); merge by size-weighted mean, sizes add. Output
    `[unmerged A (ascending position), B]`. r is capped at (N - 1) // 2.

    Args:
        keys: [B, N, d] keys averaged over heads (token 0 = cls).
        sizes: [B, N] float, original tokens held (cls 1).
        r: merges in this block.
    Returns:
        the assignment (weights = sizes, weighted mean; kinds "merged" for tokens holding more
        than one original token, "kept" otherwise; a note when r was capped), or None when r <= 0.
    """
    batch, n, _ = keys.shape
    asked, r = int(r), min(int(r), (n - 1) // 2)
    if r <= 0:
        return None
    dest, _, n_out = bipartite_destinations(keys, r)
    sizes_out = sizes.new_zeros(batch, n_out).scatter_add_(1, dest, sizes)
    kinds = token_kinds(torch.where(sizes_out[:, 1:] > 1, KIND_CODE["merged"], KIND_CODE["kept"]))
    notes = [f"r={asked} capped at {r}: at most (N - 1) // 2 of {n} tokens merge in one block"] * batch if r < asked else None
    return TokenAssignment(dest=dest, weight=sizes.float(), n_out=n_out, kinds=kinds, notes=notes)


@register
class ToMe(Method):
    name = "tome"
    rank = 70
    in_default_sweep = True
    label = "ToMe"
    paper = "ToMe, Bolya et al., ICLR 2023"
    default_layers = None  # every block
    needs = frozenset({"keys"})
    uses_keep_rate = False
    colour = "#9467bd"
    marker = "v"
    comparison = (ComparisonEntry("importance-diversity", 5, "ToMe"), ComparisonEntry("merging", 1, "ToMe"))
    params = (
        ParamSpec(
            "r", 13, "int_list",
            "Tokens merged per block: one number for every block, or a comma list with one entry per reducing layer "
            "(capped at (N-1)//2; DeiT r=13: 197 -> 41 tokens).",
            minimum=0,
        ),
        ParamSpec("prop_attn", True, "bool", "Proportional attention: add log(size) of each key to the attention logits (ToMe's default for DeiT)."),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """ToMe at one block (methods.md §6). Raises PlanError for an r list shorter than the plan's layers."""
        return tome_assignment(ctx.keys, ctx.sizes, r_at_stage(ctx.params["r"], ctx.stage))

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("prop_attn", True))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """An r list needs one entry per reducing layer."""
        r = plan.param_dict()["r"]
        layers = plan.reducing_layers(depth)
        if isinstance(r, tuple) and len(r) < len(layers):
            r_at_stage(r, len(layers) - 1)  # raises the one message for this mistake

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The bipartite scores on head-averaged keys (ceil(N/2) floor(N/2) d, cls in the split) and
        the merge of the r tokens (r C)."""
        if not shape.acted:
            return 0.0, 0.0
        n = shape.n_in + 1
        d = shape.channels // shape.heads
        return float(math.ceil(n / 2) * (n // 2) * d), float((shape.n_in - shape.n_out) * shape.channels)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """ToMe at a keep rate's budget: `matched_r_schedule(target_counts)` when counts are given,
        else `r_for_keep_rate` against EViT's selection without fusion at `layers` (4, 7, 10).
        ToMe merges in every block, so the plan keeps its every-block default.
        Raises PlanError for an unknown schedule."""
        if target_counts is not None:
            r = matched_r_schedule(target_counts, n0)
        else:
            try:
                r = r_for_keep_rate(keep_rate, depth, n0, tuple(layers or (4, 7, 10)), fuse=False, schedule=schedule)
            except ValueError as err:
                raise PlanError(f"ToMe budget: {err}") from None
        return ReductionPlan.make(self.name, 1.0, None, r=r)


# ----------------------------------------------------------------------------------------------
# Budget helpers
# ----------------------------------------------------------------------------------------------

def tome_counts(r: int | Sequence[int], depth: int = 12, n0: int = 197, layers: Sequence[int] | None = None) -> list[int]:
    """Tokens (cls included) leaving each block when ToMe merges `r` at `layers` (1-based; None =
    every block), r constant or one entry per reducing layer, each capped at (N - 1) // 2.
    E.g. r = 13, depth 12, n0 197 -> [184, 171, ..., 41]."""
    layers = tuple(range(1, depth + 1)) if layers is None else tuple(layers)
    counts, n = [], n0
    for block in range(1, depth + 1):
        if block in layers:
            n -= max(0, min(r_at_stage(r, layers.index(block)), (n - 1) // 2))
        counts.append(n)
    return counts


def matched_r_schedule(target_counts: Sequence[int], n0: int = 197) -> tuple[int, ...]:
    """A per-block ToMe r schedule whose token counts follow `target_counts` (methods.md §6 budget).

    Block i merges `r_i = clamp(N_{i-1} - target_i, 0, (N_{i-1} - 1) // 2)`, N_{i-1} being ToMe's
    own count before the block: the counts equal the target wherever ToMe can reach it in one
    block, and where the cap (half the tokens per block) stops it, the later blocks catch up. Where
    the target rises (a fused token appears) ToMe stays put (it cannot add tokens).

    Args:
        target_counts: tokens (cls included) leaving each block of the other method, e.g.
            `base.keep_rate_counts(0.7)` = [197, 197, 197, 139, 139, 139, 98, 98, 98, 69, 69, 69].
        n0: tokens entering the first block (197 for DeiT at 224 px).
    Returns:
        r per block, one per entry of `target_counts` (use as the plan's `r` with every block
        reducing; `tome_counts(schedule, len(schedule), n0)` gives the resulting counts).
    """
    schedule, n = [], n0
    for target in target_counts:
        r = max(0, min(n - int(target), (n - 1) // 2))
        schedule.append(r)
        n -= r
    return tuple(schedule)


def r_for_keep_rate(
    keep_rate: float, depth: int = 12, n0: int = 197, layers: Sequence[int] = (4, 7, 10), fuse: bool = False,
    schedule: str = "constant",
) -> int | tuple[int, ...]:
    """ToMe's r at the budget of a keep-rate method (EViT / eTPS / BAT / dpc at `keep_rate`).

    The budget is the sum over blocks of the tokens leaving each block (the GMACs proxy: a block's
    cost grows with its token count).
    - schedule="constant": the constant r in 0..(n0 - 1) // 2 whose ToMe total is nearest to the
      keep-rate method's total (ties: the smaller r). At 0.7 on DeiT (total 1509) this is r = 11
      (total 1506).
    - schedule="matched": `matched_r_schedule(keep_rate_counts(...))`: the same count per block
      wherever ToMe can reach it (so the same total when reachable).

    Raises ValueError for an unknown schedule.
    """
    target = keep_rate_counts(keep_rate, depth, n0, layers, extra=1 if fuse else 0)
    if schedule == "matched":
        return matched_r_schedule(target, n0)
    if schedule != "constant":
        raise ValueError(f"schedule must be 'constant' or 'matched', got {schedule!r}")
    budget = sum(target)
    return min(range(0, (n0 - 1) // 2 + 1), key=lambda r: (abs(sum(tome_counts(r, depth, n0)) - budget), r))
