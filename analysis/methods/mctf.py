"""MCTF: multi-criteria token fusion, training-free (Lee et al., CVPR 2024; methods.md §12).

MCTF merges tokens in pairs chosen by a bipartite matching whose score multiplies three criteria
(paper §3.2): similarity, informativeness and size. It acts on the block input, with the
"one-step-ahead" attention: the block's own attention of the unreduced tokens gives the
informativeness, and that attention, reduced like the tokens, is what the rest of the block uses
(`acts = "attention"`). This is what the official code runs (mlvlab/MCTF at 2004da0,
`utils/mctf.py` `mctf`, `bipartite_soft_matching`, `merge_wavg`; `models/modules/blocks.py`
`Block_DEIT.forward` with one_step_ahead=1):

1. The tokens x [B, N, C] entering the block (cls at 0) split by position: A = even positions
   (cls included), B = odd positions.
2. Attraction of A token i to B token j (paper §3.2), on the L2-normalised block input:
   `W = W_sim * W_info * W_size` with
   `W_sim = ((cos(x_i, x_j) + 1) / 2) ** (1 / tau_sim)`,
   `W_info = (I_i I_j) ** (1 / tau_info)`, `I = 1 / a` divided by its maximum over the image, `a` the
   attention each token receives, averaged over heads and queries,
   `W_size = (S_i S_j) ** (1 / tau_size)`, `S = 1 / size` divided by its maximum over the image.
   A tau of 0 switches its criterion off (factor 1). The cls row is -inf.
3. Bidirectional matching (paper §3.2): r1 = r // 2 A tokens with the highest best score merge
   into their best B token; then the r2 = r - r1 B tokens (with what they received) whose best
   score towards the remaining A tokens (the same scores W, not recomputed) is highest merge into
   that A token. Without `bidirection`, r A tokens merge into B (ToMe's matching).
4. Output `[remaining A (ascending position, cls first), remaining B (descending second-step best
   score)]`; without `bidirection`, `[remaining A (ascending), B (ascending)]`.
5. Members combine by a weighted mean with weights `a * size / max(size)` (pooling
   "attention_size", the official pooling_type 1), sizes add. The handed-on attention sums the
   members' columns (keys) and averages their rows (queries) with the same weights.

The number of merges in a block of N tokens is the official rule (`mctf_merges`): r is a count
(or, with `r_share`, int((N - 1) r_share)), at most (N - 1) // 2 and at most N - 10.

Budget helpers: `mctf_counts` (tokens leaving each block), `r_for_keep_rate` and
`matched_mctf_schedule`.
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

POOLINGS = ("attention_size", "size", "mean")
OFFICIAL_LAYERS = tuple(range(2, 13))  # `--activate_layer [1,...,11]` (0-based) of run/eval_deit_t_mctf.sh
FAST_LAYERS = (4, 7, 10)               # `--activate_layer [3,6,9]` of run/eval_deit_t_mctf_fast.sh


def mctf_merges(n: int, r: float) -> int:
    """Merges in a block of `n` tokens (cls included), as `utils/mctf.py` `mctf` computes them:
    `if n - r < 10: r = n - 10`, then `min(int((n - 1) * r) if r < 1 else r, (n - 1) // 2)`.

    Args:
        n: tokens entering the block, cls included.
        r: a count (>= 1; 0 merges nothing) or a share of the n - 1 patch tokens (0 < r < 1).
    Returns:
        the merges, >= 0 (a result below 0 for tiny n means none)."""
    if n - r < 10:
        r = n - 10
    r = min(int((n - 1) * r) if r < 1 else int(r), (n - 1) // 2)
    return max(0, r)


def r_entry(r: int | Sequence[int], stage: int) -> int:
    """The `r` parameter at reducing stage `stage` (0-based): one number applies to every stage.
    Raises PlanError when a list is shorter than the plan's reducing layers."""
    if isinstance(r, (list, tuple)):
        if stage >= len(r):
            raise PlanError(
                f"MCTF's r list has {len(r)} entries but the plan reduces at more layers; give one r per reducing layer "
                "(11 for its default blocks 2-12 of DeiT) or a single number"
            )
        return int(r[stage])
    return int(r)


def stage_r(params: dict, stage: int) -> float:
    """The r the official rule gets at a stage: `r_share` when it is above 0, else the stage's r."""
    share = float(params.get("r_share", 0.0))
    return share if share > 0 else r_entry(params["r"], stage)


def _working(tensor: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (the loop-reference tests); anything else is computed in float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def attraction(x: torch.Tensor, attention: torch.Tensor | None, sizes: torch.Tensor, tau_sim: float, tau_info: float,
               tau_size: float) -> torch.Tensor:
    """MCTF's multi-criteria attraction of every A token to every B token (paper §3.2; methods.md
    §12, step 2), written as `bipartite_soft_matching` computes it.

    Args:
        x: [B, N, C] the tokens the matching reads (the block input; cls at 0).
        attention: [B, H, N, N] post-softmax attention of these tokens, or None (no informativeness).
        sizes: [B, N] float, original tokens held.
        tau_sim, tau_info, tau_size: temperatures; 0 switches a criterion off.
    Returns:
        [B, ceil(N / 2), N // 2] scores of A (even positions) against B (odd positions), the cls row
        at -inf; float32 (float64 for float64 inputs).
    """
    metric = _working(x)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    if tau_sim:
        w_sim = a @ b.transpose(-1, -2)
        w_sim = ((w_sim + 1) / 2) ** (1 / tau_sim)
    else:
        w_sim = torch.ones(a.shape[0], a.shape[1], b.shape[1], dtype=metric.dtype, device=x.device)
    w_info: torch.Tensor | float = 1
    if tau_info > 0 and attention is not None:
        info = 1 / _working(attention).mean(dim=[1, 2])
        info = info / info.max(1, keepdim=True)[0]
        w_info = (info[:, ::2, None] * info[:, 1::2, None].transpose(1, 2)) ** (1 / tau_info)
    w_size: torch.Tensor | float = 1
    if tau_size:
        size = 1 / _working(sizes)[..., None]
        size = size / size.max(1, keepdim=True)[0]
        w_size = (size[:, ::2] * size[:, 1::2].transpose(1, 2)) ** (1 / tau_size)
    scores = w_sim * w_info * w_size
    scores[:, 0, :] = -math.inf
    return scores


def mctf_destinations(scores: torch.Tensor, r: int, bidirection: bool = True) -> tuple[torch.Tensor, int]:
    """The bipartite matching of `bipartite_soft_matching` (methods.md §12, steps 3-4).

    Args:
        scores: [B, T1, T2] attraction of A (even positions) to B (odd positions), cls row -inf.
        r: merges, 1 <= r <= T2 (callers cap it with `mctf_merges`).
        bidirection: r // 2 A->B merges then r - r // 2 B->A merges; else r A->B merges.
    Returns:
        (dest [B, T1 + T2] long, the output token of every position; n_out). Ties in a best score go
        to the lower index (stable sorts; the official `argsort` / `sort` are not stable) and ties
        between partners to the first one (`max`).
    """
    batch, t1, t2 = scores.shape
    device = scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    node_max, node_idx = scores.max(dim=-1)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    src = order[:, :r1]
    unm = order[:, r1:].sort(dim=1).values                      # remaining A, ascending (cls first)
    n_unm = t1 - r1
    n_out = n_unm + t2 - r2
    dest_b = torch.empty(batch, t2, dtype=torch.long, device=device)
    if bidirection:
        second = scores.gather(1, unm.unsqueeze(-1).expand(batch, n_unm, t2)).transpose(1, 2)  # [B, T2, n_unm]
        node_max2, node_idx2 = second.max(dim=-1)
        order2 = torch.sort(node_max2, dim=-1, descending=True, stable=True).indices
        src2, unm2 = order2[:, :r2], order2[:, r2:]
        dest_b.scatter_(1, unm2, torch.arange(n_unm, n_out, device=device).expand(batch, t2 - r2))
        dest_b.scatter_(1, src2, node_idx2.gather(1, src2))
    else:
        dest_b.copy_(torch.arange(n_unm, n_out, device=device).expand(batch, t2))
    dest_a = torch.empty(batch, t1, dtype=torch.long, device=device)
    dest_a.scatter_(1, unm, torch.arange(n_unm, device=device).expand(batch, n_unm))
    dest_a.scatter_(1, src, dest_b.gather(1, node_idx.gather(1, src)))
    dest = torch.empty(batch, t1 + t2, dtype=torch.long, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = dest_b
    return dest, n_out


def merge_weights(attention: torch.Tensor, sizes: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, N] weights of the members' mean (`merge_wavg`): "attention_size" (pooling_type 1) the
    attention received (mean over heads and queries) times size / max size; "size" (0) the size;
    "mean" (3) 1. Raises ValueError for another pooling."""
    attention, sizes = _working(attention), _working(sizes)
    if pooling == "attention_size":
        return attention.mean(dim=[1, 2]) * (sizes / sizes.amax(dim=1, keepdim=True))
    if pooling == "size":
        return sizes
    if pooling == "mean":
        return torch.ones_like(sizes)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def reduced_attention(attention: torch.Tensor, dest: torch.Tensor, share: torch.Tensor, n_out: int) -> torch.Tensor:
    """The one-step-ahead attention handed to the rest of the block (`merge_wavg`'s attn_n):
    columns (keys) of a group summed, rows (queries) averaged with the members' shares.

    Args:
        attention: [B, H, N, N] post-softmax attention of the unreduced tokens.
        dest: [B, N] output token of every token; share: [B, N] its weight / its group's weight sum.
    Returns:
        [B, H, n_out, n_out] float32 (float64 for float64 attention); each row still sums to 1.
    """
    batch, heads, n, _ = attention.shape
    attention = _working(attention)
    columns = attention.new_zeros(batch, heads, n, n_out).scatter_add_(3, dest[:, None, None, :].expand(batch, heads, n, n), attention)
    rows = columns * share.to(attention.dtype)[:, None, :, None]
    return attention.new_zeros(batch, heads, n_out, n_out).scatter_add_(2, dest[:, None, :, None].expand(batch, heads, n, n_out), rows)


def mctf_assignment(x: torch.Tensor, attention: torch.Tensor, sizes: torch.Tensor, r: int, tau_sim: float = 1.0,
                    tau_info: float = 20.0, tau_size: float = 40.0, bidirection: bool = True,
                    pooling: str = "attention_size") -> TokenAssignment | None:
    """MCTF at one block (methods.md §12, steps 1-5).

    Args:
        x: [B, N, C] block input (cls at 0); attention: [B, H, N, N] its post-softmax attention.
        sizes: [B, N] float, original tokens held (cls 1).
        r: merges (already capped by `mctf_merges`); tau_*: temperatures (0: criterion off);
        bidirection: the two-way matching; pooling: the members' weights (`merge_weights`).
    Returns:
        the assignment (weights of `merge_weights`, weighted mean; kinds "merged" for tokens holding
        more than one original token, "kept" otherwise; the reduced attention handed on; a note),
        or None when r <= 0.
    Raises:
        ValueError: an unknown pooling.
    """
    batch, n, _ = x.shape
    r = min(int(r), (n - 1) // 2)
    if r <= 0:
        return None
    weight = merge_weights(attention, sizes, pooling)
    scores = attraction(x, attention, sizes, tau_sim, tau_info, tau_size)
    dest, n_out = mctf_destinations(scores, r, bidirection)
    denominator = weight.new_zeros(batch, n_out).scatter_add_(1, dest, weight)
    share = weight / denominator.gather(1, dest).clamp(min=torch.finfo(weight.dtype).tiny)
    sizes_out = sizes.new_zeros(batch, n_out).scatter_add_(1, dest, sizes)
    kinds = token_kinds(torch.where(sizes_out[:, 1:] > 1, KIND_CODE["merged"], KIND_CODE["kept"]))
    r1 = r // 2 if bidirection else r
    note = f"{r} merged: {r1} A->B" + (f", {r - r1} B->A" if bidirection else "")
    return TokenAssignment(dest=dest, weight=weight, n_out=n_out, kinds=kinds, notes=[note] * batch,
                           attention=reduced_attention(attention, dest, share, n_out))


@register
class MCTF(Method):
    name = "mctf"
    rank = 73
    label = "MCTF"
    paper = "MCTF, Lee et al., CVPR 2024"
    acts = "attention"
    default_layers = OFFICIAL_LAYERS
    needs = frozenset({"attention"})
    uses_keep_rate = False
    colour = "#e7ba52"
    marker = "P"
    comparison = (ComparisonEntry("merging", 4, "MCTF"),)
    params = (
        ParamSpec(
            "r", 16, "int_list",
            "Tokens merged per reducing block: one number or a comma list, one per reducing layer. The official DeiT-T eval "
            "merges 16 at blocks 2-12. Capped at (N-1)//2 of N tokens, and at least 10 tokens remain (the official caps).",
            minimum=0,
        ),
        ParamSpec(
            "r_share", 0.0, "float",
            "Above 0: merge int((N-1)*r_share) of the N-1 patch tokens per reducing block instead of r (the official "
            "r < 1 form; its 'fast' DeiT-T eval is 0.35 at layers 4,7,10).",
            minimum=0.0, maximum=0.99,
        ),
        ParamSpec("tau_sim", 1.0, "float", "Temperature of the similarity criterion, ((cos+1)/2)^(1/tau_sim); 0 turns it off.",
                  minimum=0.0),
        ParamSpec("tau_info", 20.0, "float", "Temperature of the informativeness criterion (inverse attention received); "
                  "0 turns it off.", minimum=0.0),
        ParamSpec("tau_size", 40.0, "float", "Temperature of the size criterion (inverse token size); 0 turns it off.",
                  minimum=0.0),
        ParamSpec("bidirection", True, "bool", "Bidirectional matching: r//2 merges A->B, then r - r//2 merges B->A "
                  "(off: r merges A->B, as ToMe)."),
        ParamSpec("pooling", "attention_size", "choice", "How members combine: attention_size (weights attention received "
                  "x size, the official default), size (size-weighted mean) or mean.", choices=POOLINGS),
        ParamSpec("prop_attn", True, "bool", "Proportional attention: add log(size) of each key to the attention logits "
                  "(on in the official eval)."),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """MCTF at one block (methods.md §12). Raises PlanError for an r list shorter than the plan's layers."""
        p = ctx.params
        r = mctf_merges(ctx.x.shape[1], stage_r(p, ctx.stage))
        return mctf_assignment(ctx.x, ctx.attention, ctx.sizes, r, p["tau_sim"], p["tau_info"], p["tau_size"],
                               p["bidirection"], p["pooling"])

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("prop_attn", True))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """An r list needs one entry per reducing layer (unless r_share replaces it)."""
        params = plan.param_dict()
        layers = plan.reducing_layers(depth)
        if isinstance(params["r"], tuple) and len(params["r"]) < len(layers) and not params["r_share"] > 0:
            r_entry(params["r"], len(layers) - 1)  # raises the one message for this mistake

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """Matrix products: the cosine similarities of A and B on the block input (ceil(N/2) floor(N/2) C).
        Element-wise: the two criteria products of the scores (2 ceil(N/2) floor(N/2)), the weighted
        tokens (N C) and the weighted attention rows handed on (H N n_out). The attention matrix
        itself is the block's (analysis.gmacs counts it); sorts and sums are not MACs (methods.md §8)."""
        if not shape.acted:
            return 0.0, 0.0
        n, n_out = shape.n_in + 1, shape.n_out + 1
        pairs = math.ceil(n / 2) * (n // 2)
        matmul = float(pairs * shape.channels) if shape.params.get("tau_sim", 1.0) else 0.0
        return matmul, float(2 * pairs + n * shape.channels + shape.heads * n * n_out)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """MCTF at a keep rate's budget. With target counts, `matched_mctf_schedule` gives an r for every
        block (all blocks reduce). Otherwise the target is EViT's selection without fusion at `layers`
        (4, 7, 10): "constant" returns the constant r at MCTF's default blocks 2-12 whose token total is
        nearest (`r_for_keep_rate`), "matched" the per-block r (every block) that follows the target.
        Raises PlanError for an unknown schedule."""
        every = tuple(range(1, depth + 1))
        if target_counts is not None:
            return ReductionPlan.make(self.name, 1.0, every, r=matched_mctf_schedule(target_counts, n0))
        target = keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10)))
        if schedule == "matched":
            return ReductionPlan.make(self.name, 1.0, every, r=matched_mctf_schedule(target, n0))
        if schedule != "constant":
            raise PlanError(f"MCTF budget: schedule must be 'constant' or 'matched', got {schedule!r}")
        return ReductionPlan.make(self.name, 1.0, None, r=r_for_keep_rate(keep_rate, depth, n0, layers))


# ----------------------------------------------------------------------------------------------
# Budget helpers
# ----------------------------------------------------------------------------------------------

def mctf_counts(r: int | Sequence[int] = 16, depth: int = 12, n0: int = 197, layers: Sequence[int] | None = None,
                r_share: float = 0.0) -> list[int]:
    """Tokens (cls included) leaving each block when MCTF merges at `layers` (1-based; None: its
    default blocks 2-12) with `r` (or `r_share`), by the official rule (`mctf_merges`). The official
    DeiT-T settings: r 16 at blocks 2-12 gives [197, 181, 165, ..., 37, 21]; r_share 0.35 at blocks
    4, 7, 10 gives 197 -> 129 -> 85 -> 56."""
    layers = OFFICIAL_LAYERS if layers is None else tuple(layers)
    counts, n = [], n0
    for block in range(1, depth + 1):
        if block in layers:
            n -= mctf_merges(n, r_share if r_share > 0 else r_entry(r, layers.index(block)))
        counts.append(n)
    return counts


def matched_mctf_schedule(target_counts: Sequence[int], n0: int = 197) -> tuple[int, ...]:
    """A per-block r (every block reducing) whose MCTF counts follow `target_counts`: block i asks for
    `N_{i-1} - target_i` (0 where the target rises), and the official cap (`mctf_merges`) may give fewer;
    later blocks then catch up.

    Args:
        target_counts: tokens (cls included) leaving each block of the other method.
        n0: tokens entering the first block (197 for DeiT at 224 px).
    Returns:
        one r per entry of `target_counts`, already capped.
    """
    schedule, n = [], n0
    for target in target_counts:
        r = mctf_merges(n, max(0, n - int(target)))
        schedule.append(r)
        n -= r
    return tuple(schedule)


def r_for_keep_rate(keep_rate: float, depth: int = 12, n0: int = 197, layers: Sequence[int] | None = None) -> int:
    """The constant r (0..(n0 - 1) // 2) at MCTF's default blocks 2-12 whose token total (the sum over
    blocks of the tokens leaving each, the GMACs proxy ToMe's budget uses) is nearest to EViT's selection
    without fusion at `layers` (4, 7, 10); ties go to the smaller r. At 0.7 on DeiT (total 1509): r = 13
    (total 1506)."""
    budget = sum(keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10))))
    return min(range(0, (n0 - 1) // 2 + 1), key=lambda r: (abs(sum(mctf_counts(r, depth, n0)) - budget), r))
