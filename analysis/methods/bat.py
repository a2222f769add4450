"""BAT, reconstructed, and diversity-only clustering (methods.md §4).

BAT ("Beyond Attentive Tokens", Long et al., CVPR 2023) released no code, so this is a
reconstruction: every choice methods.md marks **[choice]** is a parameter below whose help says
so, and the method is labelled "BAT (reconstructed)" everywhere.

- `dpc_knn` is density-peak clustering with k nearest neighbours as in TCFormer (Zeng et al.,
  CVPR 2022), deterministic (no random tie-breaking noise), vectorised over the batch.
- `bipartite_pairs` is ToMe's bipartite soft matching (methods.md §6) on a token subset.
- BAT: the attentive tokens (top class attention) are matched in pairs and the inattentive ones
  clustered; the output keeps EViT's budget of K = ceil(rho n) non-cls tokens.
- Diversity-only clustering ("dpc"): the same DPC-kNN over all n non-cls tokens into K groups.
"""
from __future__ import annotations

import math

import torch

from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, complement, kept_count, register,
    token_kinds,
)
from .evit import select_attentive
from .tome import bipartite_match

RECONSTRUCTION = "Reconstruction choice (BAT released no code, methods.md §4): "
# Shared by BAT and the diversity-only clustering: one spec, one CLI flag.
KNN = ParamSpec(
    "knn", 5, "int",
    RECONSTRUCTION + "neighbours k of the DPC-kNN density (TCFormer's; the token itself counts).",
    minimum=1, maximum=64,
)


def dpc_knn(x: torch.Tensor, num_clusters: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-kNN, TCFormer; methods.md §4 step 3).

    `D = cdist(X, X) / sqrt(C)`; density `rho_i = exp(-mean of the squared distances to its k
    nearest neighbours)`, the token itself counted among them as in TCFormer (distance 0);
    `delta_i` = distance to the nearest token of strictly higher density, and for a token with no
    denser token the largest distance in the image's matrix (TCFormer); centres = the top
    `num_clusters` of `rho_i * delta_i`; every token joins its nearest centre, a centre its own
    cluster. Deterministic: no random noise. Densities and scores are compared in the log domain
    (`log rho + log delta`), which ranks exactly like `rho * delta` but cannot underflow.

    Args:
        x: [B, M, C] token features (hidden states), M >= 1.
        num_clusters: c, clipped to [1, M].
        k: neighbours, clipped to [1, M].
    Returns:
        (cluster [B, M] long in 0..c-1, centres [B, c] long indices into M, by descending score;
        cluster i's centre is centres[:, i]).
    """
    batch, m, channels = x.shape
    c = max(1, min(int(num_clusters), m))
    k = max(1, min(int(k), m))
    features = x.float()
    # The exact (non-matmul) distance: the diagonal is exactly 0 and near-ties stay faithful.
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(channels)
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    log_density = -(nearest ** 2).mean(dim=-1)  # [B, M]
    denser = log_density.unsqueeze(1) > log_density.unsqueeze(2)  # [B, i, j]: j denser than i
    dist_max = dist.flatten(1).max(dim=1).values[:, None]
    delta = dist.masked_fill(~denser, float("inf")).min(dim=-1).values
    delta = torch.where(torch.isinf(delta), dist_max.expand_as(delta), delta)
    score = log_density + torch.log(delta)  # log(rho * delta); delta 0 (duplicates) -> -inf
    centres = torch.topk(score, c, dim=-1, largest=True, sorted=True).indices
    to_centre = dist.gather(2, centres.unsqueeze(1).expand(batch, m, c))
    cluster = to_centre.argmin(dim=-1)
    cluster.scatter_(1, centres, torch.arange(c, device=x.device).expand(batch, c))
    return cluster, centres


def bipartite_pairs(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching on a sequence with no class token (methods.md §6, §4 step 4).

    The sequence alternates into A (even positions) and B (odd positions); cosine scores `A B^T`
    on the L2-normalised metric; every A token's best B partner; the r A tokens with the highest
    best score merge into their partners (several may share one B).

    Args:
        metric: [B, T, d] in the sequence's order, T >= 2.
        r: merges, clipped to [0, ceil(T / 2)].
    Returns:
        (src [B, r] long, A tokens that merge, as positions in the sequence;
         dst [B, r] long, their partners, as positions in the sequence).
    """
    order, partner = bipartite_match(metric)
    r = max(0, min(int(r), order.shape[1]))
    order = order[:, :r]
    src = order * 2
    dst = partner.gather(1, order) * 2 + 1
    return src, dst


def combine_weight(ctx: ReduceContext, weighting: str) -> torch.Tensor:
    """[B, N] float32 combination weights (methods.md §4 step 5): `a_i * size_i` ("attention")
    or `size_i` ("size"); cls gets 1. Floored at 1e-30 so a cluster whose class attention
    underflowed still averages instead of vanishing."""
    sizes = ctx.sizes.float()
    if weighting == "attention" and ctx.cls_attention is not None:
        weight = sizes.clone()
        weight[:, 1:] = ctx.cls_attention.float() * sizes[:, 1:]
        weight[:, 0] = 1.0
        return weight.clamp(min=1e-30)
    return sizes.clamp(min=1e-30)


def bat_budget(n: int, keep_rate: float, beta: float) -> tuple[int, int, int]:
    """(K, c, r) of one BAT stage on n non-cls tokens (methods.md §4 step 2, a [choice]).

    K = ceil(rho n) attentive tokens, M = n - K; c = max(1, round(beta M)) clusters (round half
    up); r = c attentive pairs so the output keeps K tokens. ToMe's matching on K tokens can merge
    at most ceil(K / 2) of them, so when c is larger both c and r become ceil(K / 2) (still K
    tokens out); with K = 1 no pair exists: r = 0, c = 1 and the output has K + 1 tokens.
    Returns c = r = 0 when M = 0 (nothing to do).
    """
    k = kept_count(keep_rate, n)
    m = n - k
    if m == 0:
        return k, 0, 0
    c = max(1, math.floor(beta * m + 0.5))
    pair_limit = math.ceil(k / 2) if k >= 2 else 0
    if pair_limit == 0:
        return k, 1, 0
    c = min(c, pair_limit)
    return k, c, c


@register
class BAT(Method):
    name = "bat"
    rank = 50
    in_default_sweep = True
    label = "BAT (reconstructed)"
    paper = "BAT, Long et al., CVPR 2023 (no code released; reconstructed from the paper)"
    needs = frozenset({"cls_attention", "keys"})
    colour = "#d62728"
    marker = "D"
    comparison = (ComparisonEntry("importance-diversity", 3, "BAT (reconstructed)"),)
    params = (
        ParamSpec(
            "beta", 0.5, "float",
            RECONSTRUCTION + "clusters c = max(1, round(beta x inattentive count)); the attentive branch merges c pairs so the output keeps ceil(rho n) tokens.",
            minimum=0.01, maximum=1.0,
        ),
        KNN,
        ParamSpec(
            "weighting", "attention", "choice",
            RECONSTRUCTION + "how a pair or cluster is combined: attention = weighted mean with a_i x size_i, size = size-weighted mean "
            "(diversity-only clustering, dpc, shares this flag and defaults to size).",
            choices=("attention", "size"),
        ),
        ParamSpec(
            "match_on", "keys", "choice",
            RECONSTRUCTION + "features for the attentive pair matching: keys = head-averaged keys (ToMe), hidden = hidden states.",
            choices=("keys", "hidden"),
        ),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """One BAT stage (methods.md §4): output `[cls, attentive tokens (a merged pair sits in its
        B token's place), cluster tokens (by descending centre score)]`; kinds "kept" (an attentive
        token alone), "pair" (a B token that absorbed A tokens), "cluster" (inattentive clusters)."""
        attention = ctx.cls_attention
        batch, n = attention.shape
        device = attention.device
        k, c, r = bat_budget(n, ctx.keep_rate, ctx.params["beta"])
        if k == n:
            return None
        attentive = select_attentive(attention, ctx.keep_rate)  # [B, K], descending attention
        inattentive = complement(attentive, n)  # [B, M]

        # Attentive branch: slots 1..K-r, a merged A token goes to its B partner's slot.
        removed = torch.zeros(batch, k, dtype=torch.bool, device=device)
        src = dst = None
        if r > 0:
            source = ctx.keys if ctx.params["match_on"] == "keys" else ctx.x
            metric = source.gather(1, attentive.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
            src, dst = bipartite_pairs(metric, r)
            removed.scatter_(1, src, True)
        slot = torch.cumsum((~removed).long(), dim=1)  # 1-based slot of each surviving position
        if src is not None:
            slot.scatter_(1, src, slot.gather(1, dst))
        dest = torch.zeros(batch, n + 1, dtype=torch.long, device=device)
        dest.scatter_(1, attentive, slot)

        # Inattentive branch: c clusters after the K - r attentive slots.
        features = ctx.x.gather(1, inattentive.unsqueeze(-1).expand(-1, -1, ctx.x.shape[-1]))
        cluster, _ = dpc_knn(features, c, ctx.params["knn"])
        n_attentive = k - r
        dest.scatter_(1, inattentive, cluster + n_attentive + 1)
        n_out = 1 + n_attentive + c

        kinds = token_kinds("cluster", n_out, batch, device)
        pair = torch.zeros(batch, n_out, dtype=torch.bool, device=device)
        if src is not None:
            pair.scatter_(1, slot.gather(1, dst), True)
        kinds[:, 1: n_attentive + 1] = torch.where(pair[:, 1: n_attentive + 1], KIND_CODE["pair"], KIND_CODE["kept"])
        pruned = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
        pruned.scatter_(1, inattentive, True)
        return TokenAssignment(dest=dest, weight=combine_weight(ctx, ctx.params["weighting"]), n_out=n_out, kinds=kinds, pruned=pruned)

    def own_macs(self, shape: StageShape) -> tuple[float, float, float]:
        """DPC-kNN's distances on the inattentive tokens (M^2 C), the bipartite matching on the attentive
        keys (ceil(K/2) floor(K/2) d), and one weighted mean over every token (n C)."""
        if not shape.acted:
            return 0.0, 0.0, 0.0
        attentive = kept_count(shape.keep_rate, shape.n_in)
        inattentive = shape.n_in - attentive
        d = shape.channels if shape.params.get("match_on") == "hidden" else shape.channels // shape.heads
        matching = math.ceil(attentive / 2) * (attentive // 2) * d
        return float(matching), float(shape.n_in * shape.channels), float(inattentive * inattentive * shape.channels)


@register
class DiversityClustering(Method):
    name = "dpc"
    rank = 60
    in_default_sweep = True
    label = "DPC-kNN (diversity only)"
    paper = "the diversity-based baseline of BAT (Long et al., CVPR 2023), DPC-kNN as in TCFormer (Zeng et al., CVPR 2022)"
    needs = frozenset({"cls_attention"})  # only for the "attention" weighting and the stage records
    colour = "#2ca02c"
    marker = "^"
    comparison = (ComparisonEntry("importance-diversity", 2, "diversity-based: DPC-kNN"),)
    params = (
        KNN,
        ParamSpec(
            "weighting", "size", "choice",
            "How a cluster is combined: size = size-weighted mean (no importance, the default for this diversity-only baseline), "
            "attention = weighted mean with a_i x size_i.",
            choices=("size", "attention"),
        ),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """DPC-kNN over all n non-cls tokens into K = ceil(rho n) clusters (methods.md §4, last
        point). Output `[cls, clusters by descending centre score]`; kinds "cluster" for a group
        of two or more tokens, "kept" for a token alone in its group."""
        batch, big_n, _ = ctx.x.shape
        n = big_n - 1
        k = kept_count(ctx.keep_rate, n)
        if k == n:
            return None
        device = ctx.x.device
        cluster, _ = dpc_knn(ctx.x[:, 1:], k, ctx.params["knn"])
        dest = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device), cluster + 1], dim=1)
        members = torch.zeros(batch, k + 1, dtype=torch.long, device=device).scatter_add_(1, dest, torch.ones_like(dest))
        kinds = token_kinds(torch.where(members[:, 1:] > 1, KIND_CODE["cluster"], KIND_CODE["kept"]))
        return TokenAssignment(dest=dest, weight=combine_weight(ctx, ctx.params["weighting"]), n_out=k + 1, kinds=kinds)

    def own_macs(self, shape: StageShape) -> tuple[float, float, float]:
        """DPC-kNN's distances over all n tokens (n^2 C) and one weighted mean over every token (n C)."""
        if not shape.acted:
            return 0.0, 0.0, 0.0
        return 0.0, float(shape.n_in * shape.channels), float(shape.n_in * shape.n_in * shape.channels)
