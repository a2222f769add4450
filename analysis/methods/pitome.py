"""PiToMe: protect informative tokens before merging (Tran et al., NeurIPS 2024; methods.md §10).

Acts in every block by default, inside it (after the attention residual, before the MLP), on the
block's keys averaged over heads, as the official code does (hchautran/PiToMe at 550b5de,
`algo/pitome/merge.py` and `algo/pitome/patch/{timm,deit}.py`):

1. Energy. The patch tokens' keys (cls left out) are L2-normalised. Their cosine similarities
   `S [T, T]` give every token the energy `E_i = mean_j elu(S_ij - m_l, alpha)`, with the margin
   `m_l = margin * (1 - l / L)` at 0-based block l of L. Tokens are ranked by descending energy.
   High energy means many similar tokens, so the token is redundant.
2. The number of merges in a block with T patch tokens is `r = floor(T - T * ratio)` in IEEE double,
   the official expression as written (`merges_for_ratio`).
3. Blocks 1..ceil(bsm_share L) (the first 6 of 12 by default) run ToMe's bipartite matching on the
   energy-ordered sequence: A = the tokens at even ranks, B = those at odd ranks, over the whole
   ranking. The r A tokens with the highest best similarity to B merge into their best B token.
   Output: `[cls, unmerged A (descending best score), B (energy order)]`.
   The other blocks protect tokens: the `T - 2r` lowest-energy tokens are kept as they are. Among
   the top 2r, the even ranks (A) all merge into their most similar odd-rank token (B).
   Output: `[cls, protected (descending energy), B (energy order)]`.
4. Merged tokens are averaged weighted by size, and sizes carry across blocks. Proportional
   attention is off by default, as in the official code; `prop_attn` turns it on.

Budget helpers: `pitome_counts` (tokens leaving each block), `ratio_for_keep_rate` (the ratio whose
token total best matches a keep rate's) and `matched_merge_schedule` (a per-block `r` that follows
target counts).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_rate_counts, register,
    token_kinds,
)

# The grid `ratio_for_keep_rate` searches: 0.5, 0.5005, ..., 1.0. It holds every ratio in the
# official eval scripts (0.9, 0.9125, 0.925, 0.95, 0.975).
RATIO_STEPS = 2000


def merges_for_ratio(t: int, ratio: float) -> int:
    """The official count of merges in a block with `t` patch tokens: `math.floor(t - t * ratio)`,
    computed in IEEE double as `merge.py` l.163 writes it, or 0 for ratio >= 1. The rewrite
    `floor(t * (1 - ratio))` differs: at ratio 0.9 and t = 160 it gives 15 instead of 16."""
    if ratio >= 1.0:
        return 0
    return max(0, math.floor(t - t * ratio))


def block_merges(t: int, ratio: float, r: int = -1) -> int:
    """The merges in a block with `t` patch tokens. An `r` of 0 or more is used as given, and -1 means
    the ratio's count (`merges_for_ratio`). Either way the count is capped at t // 2, since both
    matchings need 2r <= t. A ratio >= 0.5 never reaches the cap."""
    count = merges_for_ratio(t, ratio) if r < 0 else int(r)
    return max(0, min(count, t // 2))


def r_entry(r: int | Sequence[int], stage: int) -> int:
    """The `r` parameter at reducing stage `stage` (0-based): a single number applies to every stage.
    Raises PlanError when a list is shorter than the plan's reducing layers."""
    if isinstance(r, (list, tuple)):
        if stage >= len(r):
            raise PlanError(
                f"PiToMe's r list has {len(r)} entries but the plan reduces at more layers; give one r per reducing layer "
                "(12 for every block of DeiT), a single number, or -1 to follow the ratio"
            )
        return int(r[stage])
    return int(r)


def block_margin(margin: float, block_index: int, depth: int) -> float:
    """The energy margin of 0-based block `block_index`: `margin - margin * (block_index / depth)`,
    exactly as `deit.py` l.98 computes it (0.75, 0.6875, ..., 0.0625 for DeiT)."""
    return margin - margin * (block_index / depth)


def bsm_blocks(bsm_share: float, depth: int) -> int:
    """How many leading blocks use the energy-ordered bipartite matching: `ceil(depth * bsm_share)`,
    as `deit.py` l.33 computes it (6 of 12 at 0.5)."""
    return math.ceil(depth * bsm_share)


def energy_scores(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PiToMe's energy (methods.md §10, step 1).

    Args:
        metric: [B, T, d] patch-token keys (cls left out), in the sequence's order.
        margin: this block's margin m_l.
        alpha: the ELU's alpha.
    Returns:
        (similarity [B, T, T], the cosine of the L2-normalised keys, diagonal included;
         energy [B, T], the mean over all T columns of elu(similarity - m_l, alpha)).
        Both are float32, or float64 when the keys are float64 (half-precision keys are promoted).
    """
    metric = F.normalize(metric if metric.dtype == torch.float64 else metric.float(), p=2, dim=-1)
    similarity = metric @ metric.transpose(1, 2)
    return similarity, F.elu(similarity - margin, alpha=alpha).mean(dim=-1)


def pitome_assignment(keys: torch.Tensor, sizes: torch.Tensor, r: int, margin: float, alpha: float = 1.0,
                      bsm: bool = False) -> TokenAssignment | None:
    """PiToMe at one block (methods.md §10, steps 1-4).

    Args:
        keys: [B, N, d] keys averaged over heads (token 0 = cls, never merged).
        sizes: [B, N] float, original tokens held (cls 1).
        r: merges in this block, capped at (N - 1) // 2 (the note says so).
        margin: this block's energy margin m_l; alpha: the ELU's alpha.
        bsm: True runs the energy-ordered bipartite matching over every token (the official first
            blocks); False protects the T - 2r lowest-energy tokens and merges every A token of
            the top 2r (the paper's algorithm).
    Returns:
        the assignment (weights = sizes, weighted mean; kinds "merged" for tokens holding more than
        one original token, "kept" otherwise), or None when r <= 0. Ties in energy or in the best
        score go by position (stable sorts); ties between partners go to the first B token in
        energy order (`max`).
    """
    batch, n, _ = keys.shape
    t = n - 1
    asked, r = int(r), min(int(r), t // 2)
    if r <= 0:
        return None
    device = keys.device
    similarity, energy = energy_scores(keys[:, 1:], margin, alpha)
    order = torch.sort(energy, dim=1, descending=True, stable=True).indices  # [B, T], patch indices
    if bsm:
        side_a, side_b = order[:, 0::2], order[:, 1::2]
    else:
        side_a, side_b = order[:, 0:2 * r:2], order[:, 1:2 * r:2]
    n_a, n_b = side_a.shape[1], side_b.shape[1]
    rows = similarity.gather(1, side_a.unsqueeze(-1).expand(batch, n_a, t))
    scores = rows.gather(2, side_b.unsqueeze(1).expand(batch, n_a, n_b))  # [B, |A|, |B|]
    best, partner = scores.max(dim=-1)
    if bsm:
        ranked = torch.sort(best, dim=1, descending=True, stable=True).indices
        merging = ranked[:, :r]
        head = side_a.gather(1, ranked[:, r:])      # unmerged A, descending best score
        sources = side_a.gather(1, merging)
        targets = partner.gather(1, merging)
    else:
        head = order[:, 2 * r:]                     # protected, descending energy
        sources, targets = side_a, partner
    n_head = head.shape[1]
    dest = torch.zeros(batch, n, dtype=torch.long, device=device)
    dest.scatter_(1, head + 1, torch.arange(1, n_head + 1, device=device).expand(batch, n_head))
    dest.scatter_(1, side_b + 1, torch.arange(n_head + 1, n_head + 1 + n_b, device=device).expand(batch, n_b))
    dest.scatter_(1, sources + 1, targets + n_head + 1)
    n_out = 1 + n_head + n_b
    sizes_out = sizes.new_zeros(batch, n_out).scatter_add_(1, dest, sizes)
    kinds = token_kinds(torch.where(sizes_out[:, 1:] > 1, KIND_CODE["merged"], KIND_CODE["kept"]))
    if bsm:
        note = f"energy-ordered matching over all {t} tokens (margin {margin:.4g}): {r} merged"
    else:
        note = f"{t - 2 * r} low-energy tokens protected; {r} of the top {2 * r} merged (margin {margin:.4g})"
    if r < asked:
        note += f"; r={asked} capped at {r}: at most half of the {t} patch tokens merge in one block"
    return TokenAssignment(dest=dest, weight=sizes.float(), n_out=n_out, kinds=kinds, notes=[note] * batch)


@register
class PiToMe(Method):
    name = "pitome"
    rank = 71
    label = "PiToMe"
    paper = "PiToMe, Tran et al., NeurIPS 2024"
    default_layers = None  # every block
    needs = frozenset({"keys"})
    uses_keep_rate = False
    colour = "#843c39"
    marker = "d"
    comparison = (ComparisonEntry("merging", 2, "PiToMe"),)
    params = (
        ParamSpec(
            "ratio", 0.9, "float",
            "Share of tokens kept per block: r = floor(T - T*ratio) of the T patch tokens merge in each block. The official "
            "DeiT eval scripts use 0.9 to 0.975 and main_ic.py's default is 0.9125; the default 0.9 is our choice. "
            "Must be 0.5 to 1 (1 = no merging).",
            minimum=0.5, maximum=1.0,
        ),
        ParamSpec(
            "r", -1, "int_list",
            "Tokens merged per block: one number for every reducing block or a comma list, one per reducing layer. For PiToMe "
            "it overrides the ratio; -1 (its default, also per entry) takes the ratio's count; capped at T//2 (our choice: "
            "the official code has no r argument).",
            minimum=-1,
        ),
        ParamSpec(
            "margin", 0.75, "float",
            "Energy margin m: block l of L uses m - m*l/L. The official DeiT patch uses 0.75 (the paper and the repo's other "
            "patches use 0.9).",
            minimum=-1.0, maximum=1.0,
        ),
        ParamSpec("alpha", 1.0, "float", "The ELU's alpha in the energy kernel below the margin (official: 1).", minimum=0.0),
        ParamSpec(
            "bsm_share", 0.5, "float",
            "Share of leading blocks, ceil(L*share), that run energy-ordered bipartite matching over every token with no "
            "protection (the official DeiT code: 0.5, i.e. blocks 1-6). 0 runs the paper's protect-then-merge in every block.",
            minimum=0.0, maximum=1.0,
        ),
        ParamSpec(
            "prop_attn", False, "bool",
            "Proportional attention: add log(size) of each key to the attention logits (PiToMe's official code at 550b5de: "
            "off; earlier commits: on).",
        ),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """PiToMe at one block (methods.md §10). Raises PlanError for an r list shorter than the plan's layers."""
        params = ctx.params
        t = ctx.keys.shape[1] - 1
        entry = r_entry(params["r"], ctx.stage)
        r = merges_for_ratio(t, params["ratio"]) if entry < 0 else entry  # pitome_assignment caps it at t // 2
        margin = block_margin(params["margin"], ctx.block_index, ctx.depth)
        bsm = ctx.block_index < bsm_blocks(params["bsm_share"], ctx.depth)
        return pitome_assignment(ctx.keys, ctx.sizes, r, margin, params["alpha"], bsm)

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("prop_attn", False))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """An r list needs one entry per reducing layer."""
        r = plan.param_dict()["r"]
        layers = plan.reducing_layers(depth)
        if isinstance(r, tuple) and len(r) < len(layers):
            r_entry(r, len(layers) - 1)  # raises the one message for this mistake

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The cosine similarities of the T patch keys (T^2 d, d = C / H; both matchings read their
        scores from this one matrix) and the merge of the r sources (r C). The ELU, the means and the
        sorts are not MACs (methods.md §8)."""
        if not shape.acted:
            return 0.0, 0.0
        t = shape.n_in
        d = shape.channels // shape.heads
        return float(t * t * d), float((shape.n_in - shape.n_out) * shape.channels)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """PiToMe at a keep rate's budget. With target counts, `matched_merge_schedule` gives a per-block r.
        Otherwise the target is EViT's selection without fusion at `layers` (4, 7, 10): "constant" returns
        the ratio of `ratio_for_keep_rate`, and "matched" returns the per-block r that follows the target.
        PiToMe merges in every block, so the plan keeps its every-block default.
        Raises PlanError for an unknown schedule."""
        if target_counts is not None:
            return ReductionPlan.make(self.name, 1.0, None, r=matched_merge_schedule(target_counts, n0))
        target = keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10)))
        if schedule == "matched":
            return ReductionPlan.make(self.name, 1.0, None, r=matched_merge_schedule(target, n0))
        if schedule != "constant":
            raise PlanError(f"PiToMe budget: schedule must be 'constant' or 'matched', got {schedule!r}")
        return ReductionPlan.make(self.name, 1.0, None, ratio=ratio_for_keep_rate(keep_rate, depth, n0, layers))


# ----------------------------------------------------------------------------------------------
# Budget helpers
# ----------------------------------------------------------------------------------------------

def pitome_counts(ratio: float = 0.9, r: int | Sequence[int] = -1, depth: int = 12, n0: int = 197,
                  layers: Sequence[int] | None = None) -> list[int]:
    """Tokens (cls included) leaving each block when PiToMe merges at `layers` (1-based; None = every
    block) with `ratio` or the `r` override (`block_merges`). For example, ratio 0.9 on DeiT at 224 px
    gives [178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]."""
    layers = tuple(range(1, depth + 1)) if layers is None else tuple(layers)
    counts, n = [], n0
    for block in range(1, depth + 1):
        if block in layers:
            n -= block_merges(n - 1, ratio, r_entry(r, layers.index(block)))
        counts.append(n)
    return counts


def matched_merge_schedule(target_counts: Sequence[int], n0: int = 197) -> tuple[int, ...]:
    """A per-block r whose PiToMe counts follow `target_counts` (methods.md §10, budget).

    Block i merges `r_i = clamp(N_{i-1} - target_i, 0, (N_{i-1} - 1) // 2)`, with N_{i-1} PiToMe's own
    count before the block. Where a block cannot reach the target (at most half of the patch tokens
    merge), the later blocks catch up. Where the target rises (a fused token appears), r is 0.

    Args:
        target_counts: tokens (cls included) leaving each block of the other method.
        n0: tokens entering the first block (197 for DeiT at 224 px).
    Returns:
        one r per entry of `target_counts`, the plan's `r` with every block reducing.
    """
    schedule, n = [], n0
    for target in target_counts:
        r = max(0, min(n - int(target), (n - 1) // 2))
        schedule.append(r)
        n -= r
    return tuple(schedule)


def ratio_for_keep_rate(keep_rate: float, depth: int = 12, n0: int = 197, layers: Sequence[int] | None = None) -> float:
    """The ratio whose PiToMe token total best matches a keep-rate method's total.

    The total is the sum over blocks of the tokens leaving each block, the GMACs proxy that ToMe's
    budget uses too. The target is EViT's selection without fusion at `layers` (4, 7, 10). The
    candidates are the grid 0.5, 0.5005, ..., 1.0 (`RATIO_STEPS`). Ties go to the larger ratio,
    i.e. fewer merges. At 0.7 on DeiT (total 1509) this gives 0.9245, with the same total, 1509.
    """
    budget = sum(keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10))))
    candidates = [step / RATIO_STEPS for step in range(RATIO_STEPS // 2, RATIO_STEPS + 1)]
    return min(candidates, key=lambda ratio: (abs(sum(pitome_counts(ratio, -1, depth, n0)) - budget), -ratio))
