"""ToFu, reconstructed: Token Fusion (Kim et al., WACV 2024, arXiv 2312.01026; methods.md §11).

The authors released no code, so this is a reconstruction, labelled "ToFu (reconstructed)"
everywhere; every choice methods.md §11 marks "Choice:" is a parameter whose help says so. Two public
re-implementations were read and run for comparison (hchautran/PiToMe `algo/tofu` at 550b5de,
Westlake-AI/OpenToMe `opentome/timm/tofu.py` at 4b791cb; methods.md §11 lists where they differ).

In every block by default, inside it (after the attention residual, before the MLP), ToMe's
bipartite soft matching on the block's keys averaged over heads (`tome.bipartite_match`) picks the
r A tokens (even positions, cls excluded) most similar to a B token (odd positions). Then:

- in the first `prune_blocks` blocks ("pruning-like fusion"): the r A tokens are dropped; their
  B partners stay exactly as they were (`F(x_a, x_b) = x_b`);
- in the later blocks ("MLERP merge"): every B token and the A tokens matched to it become one
  token whose direction is their weighted mean and whose norm is the largest member norm
  (`norm="max"`) or the weighted mean of the member norms (`norm="mean"`): `mlerp_combine`.

Output order as ToMe: `[cls, unmerged A (ascending position), B (ascending position)]`.
Budget: `ToFu.budget` reuses ToMe's r helpers (the token counts are ToMe's for the same r).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, register, token_kinds,
    weighted_rows,
)
from .tome import bipartite_destinations, matched_r_schedule, r_for_keep_rate

RECONSTRUCTION = "Reconstruction choice (ToFu released no code, methods.md §11): "


def prune_block_count(prune_blocks: int, depth: int) -> int:
    """How many leading blocks prune: `prune_blocks`, or for -1 `depth // 2 + 1`, the
    re-implementations' split (`'tofu' if i > depth // 2 else 'prune'` over 0-based blocks i:
    blocks 1-7 of 12 prune, 8-12 merge)."""
    return depth // 2 + 1 if prune_blocks < 0 else int(prune_blocks)


def ratio_merges(n: int, ratio: float) -> int:
    """hchautran/PiToMe's `algo/tofu/merge.py` count: `math.floor(N - N * ratio)` with N the tokens
    entering the block, cls included, in IEEE double; 0 for ratio >= 1."""
    if ratio >= 1.0:
        return 0
    return max(0, math.floor(n - n * ratio))


def block_r(r: int | Sequence[int], ratio: float, stage: int, n: int) -> int:
    """The merges asked for at reducing stage `stage` (0-based) with `n` tokens (cls included):
    `ratio_merges(n, ratio)` when ratio < 1, else r (one number or one entry per reducing layer).
    Raises PlanError when an r list is shorter than the plan's reducing layers."""
    if ratio < 1.0:
        return ratio_merges(n, ratio)
    if isinstance(r, (list, tuple)):
        if stage >= len(r):
            raise PlanError(
                f"ToFu's r list has {len(r)} entries but the plan reduces at more layers; give one r per reducing layer "
                "(12 for every block of DeiT) or a single number"
            )
        return int(r[stage])
    return int(r)


class MLERPCombine:
    """MLERP merge as a `TokenAssignment.combine` rule (methods.md §11, "MLERP").

    For output token o with members i (weights `share_i`, summing to 1):
    `m_o = sum_i share_i x_i` (the weighted mean: the direction), and the output is
    `m_o / ||m_o|| * n_o` with `n_o = max_i ||x_i||` (norm "max") or `sum_i share_i ||x_i||`
    (norm "mean"). With `reference="destination"` the mean is divided by the norm of the output's
    B token from before the merge instead of `||m_o||` (the re-implementations' rule, not
    norm-preserving). Outputs with a single member are returned as they are (bit for bit).

    Attributes:
        norm: "max" or "mean"; reference: "merged" or "destination".
        anchor: [B, n_out] long, the input index of each output's B token (its own index for
            unmerged tokens); read only for reference "destination".
    """

    def __init__(self, norm: str, reference: str, anchor: torch.Tensor):
        self.norm = norm
        self.reference = reference
        self.anchor = anchor

    def __call__(self, x: torch.Tensor, assignment: TokenAssignment, share: torch.Tensor) -> torch.Tensor:
        """x [B, N, C], share [B, N] -> [B, n_out, C]."""
        dest, n_out = assignment.dest, assignment.n_out
        mean = weighted_rows(x, dest, share, n_out)
        norms = x.norm(dim=-1)  # [B, N]
        keep = dest >= 0
        index = dest.clamp(min=0)
        if self.norm == "max":
            target = norms.new_zeros(x.shape[0], n_out).scatter_reduce_(
                1, index, torch.where(keep, norms, torch.zeros_like(norms)), reduce="amax", include_self=True)
        else:
            target = norms.new_zeros(x.shape[0], n_out).scatter_add_(1, index, torch.where(keep, share * norms, torch.zeros_like(norms)))
        if self.reference == "destination":
            reference = norms.gather(1, self.anchor)
        else:
            reference = mean.norm(dim=-1)
        members = torch.zeros(x.shape[0], n_out, dtype=torch.long, device=x.device).scatter_add_(1, index, keep.long())
        tiny = torch.finfo(x.dtype).tiny
        scaled = mean * (target / reference.clamp(min=tiny)).unsqueeze(-1)
        return torch.where((members > 1).unsqueeze(-1), scaled, mean)


def tofu_assignment(keys: torch.Tensor, sizes: torch.Tensor, r: int, prune: bool, norm: str = "max",
                    reference: str = "merged", weighting: str = "size") -> TokenAssignment | None:
    """One ToFu block (methods.md §11): ToMe's matching, then drop (prune) or MLERP-merge.

    Args:
        keys: [B, N, d] keys averaged over heads (token 0 = cls, never reduced).
        sizes: [B, N] float, original patches held (cls 1).
        r: A tokens reduced in this block, capped at (N - 1) // 2 (a note says so).
        prune: True drops the r matched A tokens (their B partners unchanged); False MLERP-merges
            them into their B partners.
        norm, reference: `MLERPCombine`'s rules; weighting: "size" (weights = sizes, ToMe's) or
            "uniform" (every member weight 1, the re-implementations' `scatter_reduce(mean)`).
    Returns:
        the assignment, or None when r <= 0. Pruning: dest -1 for the dropped tokens, combine "mean"
        (every survivor alone, weight 1), kinds "kept" / "merged" by size. Merging: combine
        `MLERPCombine`, kinds "merged" for tokens holding more than one patch, else "kept".
    """
    batch, n, _ = keys.shape
    asked, r = int(r), min(int(r), (n - 1) // 2)
    if r <= 0:
        return None
    device = keys.device
    dest, unmerged, n_out = bipartite_destinations(keys, r, drop_matched=prune)
    n_b = n // 2
    keep = dest >= 0
    sizes_out = sizes.new_zeros(batch, n_out).scatter_add_(1, dest.clamp(min=0), torch.where(keep, sizes, torch.zeros_like(sizes)))
    kinds = token_kinds(torch.where(sizes_out[:, 1:] > 1, KIND_CODE["merged"], KIND_CODE["kept"]))
    if prune:
        note = f"pruning-like fusion: {r} matched A tokens dropped, their B partners kept unchanged"
        weight = torch.ones(batch, n, dtype=torch.float32, device=device)
        combine = "mean"
    else:
        note = f"MLERP merge of {r} A tokens into their B partners (norm {norm}, reference {reference}, weights {weighting})"
        weight = sizes.float() if weighting == "size" else torch.ones(batch, n, dtype=torch.float32, device=device)
        # each output's own input token: the unmerged A tokens (even positions), then the B tokens (odd)
        anchor = torch.cat([unmerged * 2, torch.arange(1, 2 * n_b, 2, device=device).expand(batch, n_b)], dim=1)
        combine = MLERPCombine(norm, reference, anchor)
    if r < asked:
        note += f"; r={asked} capped at {r}: at most (N - 1) // 2 of {n} tokens go in one block"
    return TokenAssignment(dest=dest, weight=weight, n_out=n_out, kinds=kinds, combine=combine, notes=[note] * batch)


@register
class ToFu(Method):
    name = "tofu"
    rank = 72
    label = "ToFu (reconstructed)"
    paper = "ToFu, Kim et al., WACV 2024 (no code released; reconstructed from the paper)"
    default_layers = None  # every block
    needs = frozenset({"keys"})
    uses_keep_rate = False
    colour = "#7b4173"
    marker = "8"
    comparison = (ComparisonEntry("merging", 3, "ToFu (reconstructed)"),)
    params = (
        ParamSpec(
            "r", 13, "int_list",
            "Tokens reduced per block (ToMe's r): one number for every reducing block, or a comma list with one entry per "
            "reducing layer; capped at (N-1)//2. " + RECONSTRUCTION + "13, ToMe's DeiT setting.",
            minimum=0,
        ),
        ParamSpec(
            "ratio", 1.0, "float",
            "Below 1 it overrides r: r = floor(N - N*ratio) with N the tokens entering the block, cls included "
            "(hchautran/PiToMe's re-implementation). 1 = use r.",
            minimum=0.5, maximum=1.0,
        ),
        ParamSpec(
            "prune_blocks", -1, "int",
            "Leading blocks that use pruning-like fusion (drop the matched A token, keep its B partner); the later blocks "
            "MLERP-merge. -1 = depth // 2 + 1 (blocks 1-7 of 12), the split of both re-implementations. " + RECONSTRUCTION
            + "the paper's layer split is per model; this is the re-implementations' fixed one.",
            minimum=-1,
        ),
        ParamSpec(
            "norm", "max", "choice",
            RECONSTRUCTION + "the MLERP norm: max = the largest member norm (both re-implementations), mean = the weighted "
            "mean of the member norms.",
            choices=("max", "mean"),
        ),
        ParamSpec(
            "norm_reference", "merged", "choice",
            RECONSTRUCTION + "what the weighted mean is divided by before it is rescaled: merged = its own norm "
            "(norm-preserving, the paper's intent), destination = the B token's norm from before the merge (both "
            "re-implementations).",
            choices=("merged", "destination"),
        ),
        ParamSpec(
            "weighting", "size", "choice",
            RECONSTRUCTION + "the weights of the MLERP mean (and of mean norms): size = token sizes (ToMe's), uniform = 1 per "
            "member (both re-implementations, which track no sizes).",
            choices=("size", "uniform"),
        ),
        ParamSpec(
            "prop_attn", True, "bool",
            RECONSTRUCTION + "proportional attention, log(size) of each key added to the attention logits (ToMe's DeiT "
            "default; the re-implementations never pass sizes, so theirs is off).",
        ),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """ToFu at one block (methods.md §11). Raises PlanError for an r list shorter than the plan's layers."""
        params = ctx.params
        r = block_r(params["r"], params["ratio"], ctx.stage, ctx.keys.shape[1])
        prune = ctx.block_index < prune_block_count(params["prune_blocks"], ctx.depth)
        return tofu_assignment(ctx.keys, ctx.sizes, r, prune, params["norm"], params["norm_reference"], params["weighting"])

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("prop_attn", True))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """An r list needs one entry per reducing layer (unless the ratio overrides it)."""
        params = plan.param_dict()
        layers = plan.reducing_layers(depth)
        if isinstance(params["r"], tuple) and params["ratio"] >= 1.0 and len(params["r"]) < len(layers):
            block_r(params["r"], 1.0, len(layers) - 1, 197)  # raises the one message for this mistake

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The bipartite scores on head-averaged keys (ceil(N/2) floor(N/2) d, cls in the split, as
        ToMe) and, in merging blocks, the MLERP merge: the weighted mean of the r sources (r C) and
        the norms of the N inputs and of the n_out outputs ((N + n_out) C). Pruning blocks merge
        nothing. Pruning or merging follows from `shape.layer` and `shape.depth`."""
        if not shape.acted:
            return 0.0, 0.0
        n = shape.n_in + 1
        d = shape.channels // shape.heads
        matching = float(math.ceil(n / 2) * (n // 2) * d)
        prune = shape.layer - 1 < prune_block_count(int(shape.params.get("prune_blocks", -1)), shape.depth)
        if prune:
            return matching, 0.0
        r = shape.n_in - shape.n_out
        return matching, float((r + n + shape.n_out + 1) * shape.channels)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """ToFu at a keep rate's budget, as ToMe (its token counts are ToMe's for the same r):
        `matched_r_schedule(target_counts)` when counts are given, else `r_for_keep_rate` against
        EViT's selection without fusion at `layers` (4, 7, 10). Every block reduces.
        Raises PlanError for an unknown schedule."""
        if target_counts is not None:
            r = matched_r_schedule(target_counts, n0)
        else:
            try:
                r = r_for_keep_rate(keep_rate, depth, n0, tuple(layers or (4, 7, 10)), fuse=False, schedule=schedule)
            except ValueError as err:
                raise PlanError(f"ToFu budget: {err}") from None
        return ReductionPlan.make(self.name, 1.0, None, r=r)
