"""PPT: token pruning and pooling, chosen per image by the variance of the importance scores
(Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers", arXiv 2310.01812;
official code xjwu1024/PPT at 706bcdd, `ppt_deit.py`; spec: methods.md §19).

At each reducing layer (the official `pp_loc_list`; default 4, 7, 10), inside the block after the
attention residual, every image removes the same number r of tokens in one of two ways:
- its importance scores (ATS's class attention summed over heads times the value norm, normalised
  over the non-cls tokens) have a variance below the threshold: the attention is spread out, the
  redundancy is *duplicative*, and the image is **pooled** (ToMe's bipartite soft matching on the
  head-averaged keys, size-weighted mean);
- otherwise the attention is concentrated, the redundancy is *inattentive*, and the image is
  **pruned** (the r lowest-scored tokens are discarded, the rest come out by descending score).

Both branches are built for the whole batch and selected per image with `torch.where` (one
assignment, no loop over images). Provenance follows from the per-image assignment, so a batch
mixing pooled and pruned images gives every image its own provenance (the official `trace_source`
crashes on such batches, methods.md §19).
"""
from __future__ import annotations

import math
from collections import abc
from typing import Sequence

import torch

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_assignment,
    keep_rate_counts, register,
)
from .tome import tome_assignment

DECISIONS = ("adaptive", "pool", "prune")


def importance_scores(cls_attention_heads: torch.Tensor, values_heads: torch.Tensor) -> torch.Tensor:
    """PPT's token importance (ATS's significance score, official `score_assignment_step`).

    `s_j = (sum over heads of P[:, h, 0, j]) * ||v_j||_2`, with v_j the token's values of all heads
    concatenated (length C), for the non-cls tokens j; then `S_j = s_j / sum_k s_k`.

    Args:
        cls_attention_heads: [B, H, n] post-softmax attention of cls to the n non-cls tokens
            (proportional attention included when it is on).
        values_heads: [B, H, N, d] the block's values, token 0 = cls.
    Returns:
        [B, n] float32 scores summing to 1 per image.
    """
    batch, heads, n_all, head_dim = values_heads.shape
    values = values_heads.float().transpose(1, 2).reshape(batch, n_all, heads * head_dim)[:, 1:]
    raw = cls_attention_heads.float().sum(dim=1) * torch.linalg.vector_norm(values, ord=2, dim=-1)
    return raw / raw.sum(dim=1, keepdim=True)


def score_variance(scores: torch.Tensor) -> torch.Tensor:
    """[B] the unbiased variance (denominator n - 1) of each image's n scores, as `torch.var`
    (the official redundancy criterion `S_op`)."""
    return scores.var(dim=1, correction=1)


def prune_assignment(scores: torch.Tensor, r: int) -> TokenAssignment:
    """PPT's pruning branch: keep the n - r best-scored non-cls tokens, by descending score (ties by
    position: a stable sort), after cls; discard the r others.

    Args:
        scores: [B, n] importance scores of the non-cls tokens; r: 1 <= r < n.
    """
    n = scores.shape[1]
    kept = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : n - r] + 1
    return keep_assignment(kept, n + 1)


class StageNotes(abc.Sequence):
    """One short text per image about a PPT stage's decision (`TokenAssignment.notes`), e.g.
    "pooled: variance 5.12e-05 < 7e-05". The texts are formed on first access, so a run that
    records no provenance (the bench) never copies the variances to the host.

    Attributes:
        variance: [B] the variance of each image's scores; pooled: [B] bool, the decision.
        threshold: the plan's threshold; forced: the plan's `decision` when it is not "adaptive".
    """

    def __init__(self, variance: torch.Tensor, pooled: torch.Tensor, threshold: float, forced: str | None = None):
        self.variance = variance.detach()
        self.pooled = pooled.detach()
        self.threshold = float(threshold)
        self.forced = forced
        self._texts: list[str] | None = None

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [self._text(v, p) for v, p in zip(self.variance.float().cpu().tolist(), self.pooled.cpu().tolist())]
        return self._texts

    def _text(self, variance: float, pooled: bool) -> str:
        verb = "pooled" if pooled else "pruned"
        if self.forced is not None:
            return f"{verb} (decision={self.forced}): variance {variance:.3g}"
        return f"{verb}: variance {variance:.3g} {'<' if pooled else '>='} {self.threshold:g}"

    def __getitem__(self, index):
        return self.texts()[index]

    def __len__(self) -> int:
        return int(self.variance.shape[0])

    def __repr__(self) -> str:
        return f"StageNotes({self.texts()!r})"


def r_at_stage(r: int | Sequence[int], stage: int) -> int:
    """The tokens removed at reducing stage `stage` (0-based): a constant or one entry per reducing
    layer, consumed in layer order (the official blocks `pop(0)` one entry each).
    Raises PlanError for a list shorter than the plan's reducing layers."""
    if isinstance(r, (list, tuple)):
        if stage >= len(r):
            raise PlanError(f"PPT's r_tokens list has {len(r)} entries but the plan reduces at more layers; "
                            "give one entry per reducing layer or a single number")
        return int(r[stage])
    return int(r)


def ppt_counts(r: int | Sequence[int], depth: int = 12, n0: int = 197, layers: Sequence[int] = (4, 7, 10)) -> list[int]:
    """Tokens (cls included) leaving each block: N -> N - min(r, (N - 1) // 2) at each reducing
    layer, whatever each image decides. DeiT at 224, r 50 at 4, 7, 10: 197, 147, 97, 49."""
    counts, n = [], n0
    for block in range(1, depth + 1):
        if block in layers:
            n -= max(0, min(r_at_stage(r, tuple(layers).index(block)), (n - 1) // 2))
        counts.append(n)
    return counts


@register
class PPT(Method):
    name = "ppt"
    rank = 48
    label = "PPT"
    paper = "PPT, Wu et al., arXiv 2310.01812 (2023)"
    acts = "inside"
    default_layers = (4, 7, 10)
    needs = frozenset({"cls_attention", "cls_attention_heads", "values_heads", "keys"})
    uses_keep_rate = False
    colour = "#8c6d31"
    marker = "H"
    comparison = (ComparisonEntry("pruning", 7, "PPT"),)
    params = (
        ParamSpec(
            "r_tokens", 50, "int_list",
            "Tokens removed at each reducing layer by pooling or pruning (official --r_tokens; one number, or a comma "
            "list with one entry per reducing layer), capped at (N-1)//2. Default 50 at layers 4, 7, 10: 197 -> 147 -> 97 -> 49.",
            minimum=0,
        ),
        ParamSpec(
            "threshold", 7e-5, "float",
            "Variance threshold of the redundancy criterion: an image whose importance-score variance is below it is "
            "pooled, else pruned (official --threshold; README eval setting 7e-5, fine-tuning 6e-5).",
            minimum=0.0,
        ),
        ParamSpec(
            "prop_attn", True, "bool",
            "Proportional attention: log(size) of every key added to the attention logits, and pooling weighted by "
            "size (the official default; off: no bias and unweighted pooling, as the official code does).",
        ),
        ParamSpec(
            "decision", "adaptive", "choice",
            "adaptive: per image by the variance (the official method); pool / prune: force one branch for every image "
            "(our ablation switch, not an official option).",
            choices=DECISIONS,
        ),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """One PPT stage (methods.md §19): score, decide per image, pool or prune r tokens.
        Raises PlanError for an r_tokens list shorter than the plan's layers."""
        n_tokens = ctx.x.shape[1]
        r = min(r_at_stage(ctx.params["r_tokens"], ctx.stage), (n_tokens - 1) // 2)
        if r <= 0:
            return None
        scores = importance_scores(ctx.cls_attention_heads, ctx.values_heads)
        variance = score_variance(scores)
        decision = ctx.params["decision"]
        threshold = ctx.params["threshold"]
        if decision == "adaptive":
            pooled = variance < threshold
        else:
            pooled = torch.full_like(variance, decision == "pool", dtype=torch.bool)
        notes = StageNotes(variance, pooled, threshold, None if decision == "adaptive" else decision)
        merge_weight = ctx.sizes if ctx.params["prop_attn"] else torch.ones_like(ctx.sizes)
        if decision == "prune":
            assignment = prune_assignment(scores, r)
        else:
            pool = tome_assignment(ctx.keys, merge_weight, r)
            if not ctx.params["prop_attn"]:
                # kinds follow the patches held (merged: more than one), not the unit weights
                held = ctx.sizes.new_zeros(pool.dest.shape[0], pool.n_out).scatter_add_(1, pool.dest, ctx.sizes)
                pool.kinds[:, 1:] = torch.where(held[:, 1:] > 1, KIND_CODE["merged"], KIND_CODE["kept"])
            assignment = pool
            if decision == "adaptive":
                prune = prune_assignment(scores, r)
                take = pooled.unsqueeze(1)
                assignment = TokenAssignment(
                    dest=torch.where(take, pool.dest, prune.dest),
                    weight=torch.where(take, pool.weight, prune.weight.to(pool.weight.dtype)),
                    n_out=pool.n_out,
                    kinds=torch.where(take, pool.kinds, prune.kinds),
                )
        assignment.notes = notes
        return assignment

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("prop_attn", True))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """An r_tokens list needs one entry per reducing layer."""
        r = plan.param_dict()["r_tokens"]
        layers = plan.reducing_layers(depth)
        if isinstance(r, tuple) and len(r) < len(layers):
            r_at_stage(r, len(layers) - 1)  # raises the one message for this mistake

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """PPT's own work at one stage, per image (methods.md §19): the scores (value norms n C, the
        product with the attention n, the variance n) and, for pooling, ToMe's bipartite scores
        (ceil(N/2) floor(N/2) d, cls in the split) and the merge of the r tokens (r C). The
        class-attention row is the engine's (`needs`, counted by analysis.gmacs). With
        decision=adaptive the image's branch is unknown here: the pooling path is counted (the
        dearer one, and the matching the batched code computes for every image) [choice]."""
        if not shape.acted:
            return 0.0, 0.0
        n, channels = shape.n_in, shape.channels
        scoring = float(n * channels + 2 * n)
        if shape.params.get("decision", "adaptive") == "prune":
            return 0.0, scoring
        tokens = n + 1
        head_dim = channels // shape.heads
        similarity = float(math.ceil(tokens / 2) * (tokens // 2) * head_dim)
        return similarity, scoring + float((shape.n_in - shape.n_out) * channels)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """PPT at a keep rate's budget: an r per reducing layer so that the counts follow EViT's
        selection without fusion at `layers` (4, 7, 10; `keep_rate_counts`), or `target_counts`
        block by block (methods.md §19). Where the (N - 1) // 2 cap stops a layer, the next block
        that can catches up (it becomes a reducing layer). Both schedules give this per-layer r
        (the counts are reachable layer by layer). Raises PlanError for an unknown schedule."""
        if schedule not in ("constant", "matched"):
            raise PlanError(f"PPT budget: schedule must be 'constant' or 'matched', got {schedule!r}")
        if target_counts is None:
            target_counts = keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10)))
        layers, params = matched_layers(target_counts, n0)
        return ReductionPlan.make(self.name, 1.0, layers, **params)


def matched_layers(target_counts: Sequence[int], n0: int = 197) -> tuple[tuple[int, ...] | None, dict]:
    """The reducing layers and r_tokens whose counts follow `target_counts` (tokens, cls included,
    leaving each block) as closely as PPT can: at block i, r_i = clamp(N_{i-1} - target_i, 0,
    (N_{i-1} - 1) // 2), and the blocks with r_i > 0 reduce. Where a target rises (a fused token),
    PPT stays put.

    Returns:
        (layers, {"r_tokens": r}) for `ReductionPlan.make`: r one number when all layers agree,
        else one entry per layer; (None, {"r_tokens": 0}) when nothing is removed.
    """
    layers, removed, n = [], [], n0
    for block, target in enumerate(target_counts, 1):
        r = max(0, min(n - int(target), (n - 1) // 2))
        if r > 0:
            layers.append(block)
            removed.append(r)
            n -= r
    if not layers:
        return None, {"r_tokens": 0}
    r_tokens = removed[0] if len(set(removed)) == 1 else tuple(removed)
    return tuple(layers), {"r_tokens": r_tokens}
