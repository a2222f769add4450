"""ATS: Adaptive Token Sampling (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision
Transformers", ECCV 2022, arXiv 2111.15667; official code adaptivetokensampling/ATS at 9271257,
`libs/models/transformers/ats_block.py`, `AdaptiveTokenSampler`; spec: methods.md §16).

At each reducing block (official DeiT-S config `ATS_BLOCKS` 3..11, 0-based: blocks 4 to 12),
inside the block after the attention residual, every image

1. scores its non-cls tokens by significance (methods.md §16 S1, official `score_assignment_step`):
   `S_j = (sum_h A[h, 0, j]) ||v_j|| / sum_k (sum_h A[h, 0, k]) ||v_k||`, with `v_j` the token's
   values of all heads concatenated;
2. sorts the scores ascending and forms their cumulative distribution, min-max normalised to
   [0, 1] (S2, official `inverse_transform_sampling`);
3. draws K - 1 evenly spaced values y_i from the smallest positive normalised cdf value to 1
   (official `create_ys`) and takes, for each, the token whose normalised cdf is nearest
   (|y - cdf|, ties to the less significant token): inverse transform sampling;
4. keeps the distinct tokens drawn, by ascending significance, after cls. Duplicates collapse,
   so each image keeps its own number of tokens; the batch is padded to its longest image
   (`TokenAssignment.valid`, kind "pad") and the engine masks the padding out of attention, the
   class token and later decisions, so an image keeps the same tokens alone and in any batch
   (the official code's do not: methods.md §16).

The official attention everywhere is `softmax_with_policy` (`(e^a + eps/N) / (sum e^a + eps)`,
eps 1e-6, N the image's own token count at batch 1), reproduced at every block from the
engine's probabilities by `transform_attention` (`transform_every_block`).
"""
from __future__ import annotations

from collections import abc
from typing import Sequence

import torch

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_rate_counts, register,
)


def significance(cls_attention_heads: torch.Tensor, values_heads: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """ATS's significance scores (methods.md §16 S1; official `score_assignment_step`).

    Args:
        cls_attention_heads: [B, H, n] post-softmax attention of cls to the n non-cls tokens.
        values_heads: [B, H, n + 1, d] the block's values, token 0 = cls.
        present: optional [B, n] bool, False for padding (scored 0, left out of the sum).
    Returns:
        [B, n] float32 scores summing to 1 per image over its own tokens (0 on padding).
    """
    batch, heads, n_all, head_dim = values_heads.shape
    values = values_heads.float().transpose(1, 2).reshape(batch, n_all, heads * head_dim)[:, 1:]
    raw = cls_attention_heads.float().sum(dim=1) * torch.linalg.vector_norm(values, ord=2, dim=-1)
    if present is not None:
        raw = raw.masked_fill(~present, 0.0)
    return raw / raw.sum(dim=1, keepdim=True)


def sample_points(start: torch.Tensor, samples: int) -> torch.Tensor:
    """The official `create_ys` with n_tokens = samples + 1: `samples` evenly spaced values from
    `start` [B] to 1, computed with the official float operations (so near-ties break alike):
    `start + (linspace(0, 1, samples) * (samples - 1) - start * i) / (samples - 1)`, i = 0..samples-1.

    Returns [B, samples] float32. Raises ValueError for samples < 2."""
    if samples < 2:
        raise ValueError(f"ATS needs at least 2 samples, got {samples}")
    device = start.device
    line = torch.linspace(0.0, 1.0, samples, device=device).unsqueeze(0)
    steps = torch.arange(0, samples, device=device, dtype=torch.float32).unsqueeze(0)
    start = start.float().unsqueeze(1)
    return start + ((line * (samples - 1)) - start * steps) / (samples - 1)


def sample_tokens(scores: torch.Tensor, samples: int, present: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse transform sampling (methods.md §16 S2-S4; official `inverse_transform_sampling`).

    Args:
        scores: [B, n] significance scores (0 on padding).
        samples: K - 1, the number of values drawn.
        present: optional [B, n] bool, False for padding (never drawn, left out of the cdf).
    Returns:
        (kept [B, n] long: the drawn tokens' indices 0..n-1 by ascending score, then -1;
        counts [B] long: distinct tokens drawn per image).
    """
    batch, n = scores.shape
    if present is None:
        present = torch.ones_like(scores, dtype=torch.bool)
    # ascending significance, padding last (official: torch.sort ascending, no padding at batch 1);
    # equal scores by position (stable; the official sort leaves their order unspecified)
    key = scores.masked_fill(~present, float("inf"))
    order = torch.sort(key, dim=1, stable=True).indices
    sorted_scores = scores.gather(1, order)
    sorted_present = present.gather(1, order)
    cdf = torch.cumsum(sorted_scores, dim=1)  # padding adds 0 after the image's own tokens
    low = cdf[:, :1]
    high = cdf.masked_fill(~sorted_present, float("-inf")).amax(dim=1, keepdim=True)
    normalised = (cdf - low) / ((high - low) / 1.0)
    big = torch.tensor(1e8, dtype=normalised.dtype, device=normalised.device)
    start = (normalised + (normalised == 0).to(normalised.dtype) * big).masked_fill(~sorted_present, float("inf")).amin(dim=1)
    ys = sample_points(start, samples)  # [B, K-1]
    distance = (ys.unsqueeze(2) - normalised.unsqueeze(1)).abs().masked_fill(~sorted_present.unsqueeze(1), float("inf"))
    picked = distance.argmin(dim=2)  # first minimum: ties go to the less significant token
    drawn = torch.zeros(batch, n, dtype=torch.bool, device=scores.device).scatter_(1, picked, True)
    counts = drawn.sum(dim=1)
    positions = torch.sort((~drawn).to(torch.uint8), dim=1, stable=True).indices
    kept = order.gather(1, positions)
    slot = torch.arange(n, device=scores.device).unsqueeze(0)
    return torch.where(slot < counts.unsqueeze(1), kept, kept.new_full((), -1)), counts


def ats_assignment(kept: torch.Tensor, counts: torch.Tensor, n_tokens: int) -> TokenAssignment:
    """`[cls, kept..., pad...]` for a batch whose images keep `counts` [B] tokens each.

    Args:
        kept: [B, n] long non-cls indices 0..n-1 of the kept tokens in output order, -1 after the
            image's count; n_tokens: N = n + 1, the current sequence length.
    Returns:
        the assignment (kinds "kept", "pad" on padding slots; `valid` only when counts differ or
        an image keeps fewer slots than the width).
    """
    batch = kept.shape[0]
    device = kept.device
    width = int(counts.max()) if batch else 0
    n_out = width + 1
    kept = kept[:, :width]
    slots = torch.arange(1, n_out, device=device).expand(batch, width)
    own = kept >= 0
    dest = torch.full((batch, n_tokens + 1), -1, dtype=torch.long, device=device)  # last column: a sink
    dest.scatter_(1, torch.where(own, kept + 1, n_tokens), torch.where(own, slots, -1))
    dest = dest[:, :n_tokens]
    dest[:, 0] = 0
    valid_out = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), own], dim=1)
    kinds = torch.full((batch, n_out), KIND_CODE["kept"], dtype=torch.long, device=device)
    kinds = kinds.masked_fill(~valid_out, KIND_CODE["pad"])
    kinds[:, 0] = KIND_CODE["cls"]
    padded = not bool(valid_out.all())
    return TokenAssignment(dest=dest, weight=torch.ones(batch, n_tokens, dtype=torch.float32, device=device),
                           n_out=n_out, kinds=kinds, valid=valid_out if padded else None)


class StageNotes(abc.Sequence):
    """One text per image about an ATS stage (`TokenAssignment.notes`), e.g. "kept 87 of 196
    (196 draws)"; formed on first access, so a run without provenance never copies the counts."""

    def __init__(self, counts: torch.Tensor, before: torch.Tensor, samples: int):
        self.counts, self.before, self.samples = counts.detach(), before.detach(), int(samples)
        self._texts: list[str] | None = None

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [f"kept {k} of {n} ({self.samples} draws)"
                           for k, n in zip(self.counts.cpu().tolist(), self.before.cpu().tolist())]
        return self._texts

    def __getitem__(self, index):
        return self.texts()[index]

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def __repr__(self) -> str:
        return f"StageNotes({self.texts()!r})"


def k_at_stage(k: int | Sequence[int], stage: int, n0: int) -> int:
    """K at reducing stage `stage` (0-based): a constant or one entry per reducing layer; 0 means
    n0, the tokens entering the first block (official `n_ref_tokens`). Raises PlanError for a list
    shorter than the plan's reducing layers."""
    if isinstance(k, (list, tuple)):
        if stage >= len(k):
            raise PlanError(f"ATS's K list has {len(k)} entries but the plan reduces at more layers; "
                            "give one entry per reducing layer or a single number")
        k = k[stage]
    return n0 if int(k) == 0 else int(k)


@register
class ATS(Method):
    name = "ats"
    rank = 40
    label = "ATS"
    paper = "ATS, Fayyaz et al., ECCV 2022"
    acts = "inside"
    default_layers = tuple(range(4, 13))
    needs = frozenset({"cls_attention_heads", "values_heads"})
    uses_keep_rate = False
    transform_every_block = True
    colour = "#bcbd22"
    marker = "p"
    comparison = (ComparisonEntry("pruning", 4, "ATS (mean count)"),)
    params = (
        ParamSpec(
            "K", 0, "int_list",
            "Tokens sampled at each reducing layer, cls included (the paper's K; K - 1 values are drawn and duplicates "
            "collapse, so at most K - 1 patch tokens stay). 0: the tokens entering the first block, 197 at 224 px (the "
            "official code's n_ref_tokens, DeiT-S config). One number, or a comma list with one entry per reducing layer.",
            minimum=0,
        ),
        ParamSpec(
            "eps", 1e-6, "float",
            "The official softmax_with_policy's eps in every block: (e^a + eps/N) / (sum e^a + eps); 0: the plain "
            "softmax (the paper's equations).",
            minimum=0.0,
        ),
    )

    def transform_attention(self, probs: torch.Tensor, ctx: ReduceContext) -> torch.Tensor:
        """The official `softmax_with_policy` from the engine's softmax `probs` [B, H, N, N] (padding
        keys 0): with p_max the row maximum, e = p / p_max and sum e = 1 / p_max, so the official
        `(e + eps/N) / (sum e + eps)` is `(p / p_max + eps/n) / (1 / p_max + eps)`, n the image's own
        token count (its N at batch 1: prefix tokens included); padding keys stay 0. Returns [B, H, N, N]."""
        eps = float(ctx.params["eps"])
        if eps == 0.0:
            return probs
        batch, _, n_all, _ = probs.shape
        present = None
        if ctx.valid is not None:
            # probs cover the whole sequence: every prefix token (cls, registers) is present, then the patches
            patches = ctx.valid[:, 1:]
            present = torch.cat([patches.new_ones(batch, n_all - patches.shape[1]), patches], dim=1)
        own = (torch.full((batch,), float(n_all), device=probs.device) if present is None else present.sum(dim=1)).to(probs.dtype)
        peak = probs.amax(dim=-1, keepdim=True)
        out = (probs / peak + eps / own[:, None, None, None]) / (1.0 / peak + eps)
        if present is not None:
            out = out.masked_fill(~present[:, None, None, :], 0.0)
        return out

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """One ATS stage (methods.md §16): score, sample K - 1 values, keep the distinct tokens.
        Raises PlanError for a K list shorter than the plan's layers."""
        n_tokens = ctx.x.shape[1]
        samples = k_at_stage(ctx.params["K"], ctx.stage, ctx.num_patches + 1) - 1
        present = None if ctx.valid is None else ctx.valid[:, 1:]
        scores = significance(ctx.cls_attention_heads, ctx.values_heads, present)
        kept, counts = sample_tokens(scores, samples, present)
        assignment = ats_assignment(kept, counts, n_tokens)
        before = torch.full_like(counts, n_tokens - 1) if present is None else present.sum(dim=1)
        assignment.notes = StageNotes(counts, before, samples)
        return assignment

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """K: 0 or at least 3 (the official formula divides by K - 2), one entry per reducing layer."""
        k = plan.param_dict()["K"]
        values = k if isinstance(k, tuple) else (k,)
        bad = [v for v in values if v in (1, 2)]
        if bad:
            raise PlanError(f"ATS's K must be 0 (the tokens entering the first block) or at least 3, got {bad[0]}")
        if isinstance(k, tuple):
            k_at_stage(k, len(plan.reducing_layers(depth)) - 1, 0)

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """ATS's own work at one stage, per image: the value norms (n C) and the heads' class
        attention times the norm (n H), element-wise. The class-attention row comes from the
        attention matrix the block computes anyway; sorting, the cumulative sum and the nearest-value
        search (K n comparisons) are not multiply-adds (methods.md §8)."""
        return 0.0, float(shape.n_in * shape.channels + shape.n_in * shape.heads)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """ATS at a keep rate's budget: it reduces where the target counts drop (EViT's selection
        without fusion at `layers`, default 4, 7, 10, `keep_rate_counts`; or `target_counts` block
        by block) with K = the target count there. ATS keeps at most K - 1 patch tokens, so every
        image stays within the budget and the mean count is below it (how far depends on the image:
        duplicates collapse; methods.md §16). Both schedules give this per-layer K.
        Raises PlanError for an unknown schedule."""
        if schedule not in ("constant", "matched"):
            raise PlanError(f"ATS budget: schedule must be 'constant' or 'matched', got {schedule!r}")
        if target_counts is None:
            target_counts = keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10)))
        chosen, ks, previous = [], [], n0
        for block, target in enumerate(target_counts, 1):
            target = int(target)
            if target < previous:
                chosen.append(block)
                ks.append(max(3, target))
            previous = min(previous, target)
        if not chosen:
            return ReductionPlan.make(self.name, 1.0, (), K=0)  # no sampling stage (the eps softmax only)
        k = ks[0] if len(set(ks)) == 1 else tuple(ks)
        return ReductionPlan.make(self.name, 1.0, tuple(chosen), K=k)
