"""Zero-TPrune (reconstructed): zero-shot token pruning on the attention graph (Wang, Dedhia, Jha,
"Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in Pre-Trained
Transformers", CVPR 2024, arXiv 2305.17328; spec: methods.md §17).

The authors released no code, so this is a reconstruction from the paper's description; every
choice it makes is a parameter and is marked [choice] in methods.md §17. At each reducing layer
(default 4, 7, 10), inside the block after the attention residual, with k = ceil(keep_rate * n)
tokens to keep (EViT's budget without fusion) and r = n - k to remove:

- **I-stage** (importance): the block's post-softmax attention of every head is the adjacency
  matrix of a graph over the N tokens (cls included); the Weighted PageRank `s <- A^T s` from
  `s = 1/N`, `iterations` times, gives every token the attention it receives from important tokens.
  Heads whose score variance lies outside [v_min, v_max] are left out (the variance-based head
  filter) and the others are aggregated (`aggregation`: "eir", the root mean square that emphasises
  tokens one head finds very important, or "mean"). The r_I = r - r_S least important tokens go.
- **S-stage** (similarity): the survivors, ranked by importance, are split into an important group
  B and an unimportant group A (`partition`); every A token's best cosine similarity to a B token
  (on `metric`: head-averaged keys or hidden states) marks it as a duplicate; the r_S A tokens with
  the highest similarity go, r_S = min(floor(s_ratio * r), k).

Output: `[cls, kept tokens by descending importance]`; pruned tokens are discarded (no fusion).
Vectorised over the batch: no loop over images or tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_assignment, kept_count, register

AGGREGATIONS = ("eir", "mean")
PARTITIONS = ("sequential", "alternate")
METRICS = ("keys", "x")


def weighted_pagerank(attention: torch.Tensor, iterations: int) -> torch.Tensor:
    """Weighted PageRank over the attention graph of every head (methods.md §17, I-stage).

    `s^(0) = 1/N`, `s^(t+1)_j = sum_i A[i, j] s^(t)_i` (a token is important when important tokens
    attend to it), `iterations` times. The rows of A sum to 1, so every s^(t) sums to 1.

    Args:
        attention: [B, H, N, N] post-softmax attention (row = query, column = key), cls at 0.
        iterations: T >= 1.
    Returns:
        [B, H, N] float32 scores of all N tokens (cls included).
    """
    probs = attention.float()
    batch, heads, n_tokens, _ = probs.shape
    s = probs.new_full((batch, heads, 1, n_tokens), 1.0 / n_tokens)
    for _ in range(iterations):  # T matrix-vector products (not a loop over tokens or images)
        s = s @ probs
    return s[:, :, 0]


def head_scores(scores: torch.Tensor, aggregation: str, v_min: float, v_max: float) -> torch.Tensor:
    """Aggregate per-head scores of the non-cls tokens into one score per token.

    Variance-based head filter: a head takes part when the (population) variance of its n scores
    lies in [v_min, v_max]; when no head does, all take part [choice]. Aggregation over the heads
    taking part: "eir" (emphasising the informative region) = sqrt(mean of s_h^2), "mean" = mean.

    Args:
        scores: [B, H, n] per-head scores of the non-cls tokens.
    Returns:
        [B, n] float32.
    Raises:
        ValueError: an unknown aggregation.
    """
    variance = scores.var(dim=2, correction=0)  # [B, H]
    use = (variance >= v_min) & (variance <= v_max)
    use = torch.where(use.any(dim=1, keepdim=True), use, torch.ones_like(use))
    weight = use.to(scores.dtype).unsqueeze(-1)  # [B, H, 1]
    count = weight.sum(dim=1)  # [B, 1]
    if aggregation == "eir":
        return ((scores.square() * weight).sum(dim=1) / count).sqrt()
    if aggregation == "mean":
        return (scores * weight).sum(dim=1) / count
    raise ValueError(f"unknown aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")


def stage_removals(n: int, keep_rate: float, s_ratio: float) -> tuple[int, int, int]:
    """(k kept, r_I removed by importance, r_S removed by similarity) for n non-cls tokens:
    k = ceil(keep_rate * n), r = n - k, r_S = min(floor(s_ratio * r), k) (at most the size of group
    A, floor((k + r_S) / 2)), r_I = r - r_S."""
    k = kept_count(keep_rate, n)
    r = n - k
    r_s = min(int(math.floor(s_ratio * r + 1e-9)), k)
    return k, r - r_s, r_s


def group_positions(m: int, partition: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) positions in the importance ranking (0 = most important) of m survivors.

    "sequential": B = the ceil(m/2) most important, A = the floor(m/2) least important;
    "alternate": B = ranks 0, 2, 4, ..., A = ranks 1, 3, 5, ... (both [choice]).
    Raises ValueError for an unknown partition."""
    ranks = torch.arange(m)
    if partition == "sequential":
        return ranks[(m + 1) // 2:], ranks[: (m + 1) // 2]
    if partition == "alternate":
        return ranks[1::2], ranks[0::2]
    raise ValueError(f"unknown partition {partition!r}: use one of {', '.join(PARTITIONS)}")


def zerotprune_keep(importance: torch.Tensor, features: torch.Tensor, keep_rate: float, s_ratio: float,
                    partition: str) -> torch.Tensor:
    """The kept non-cls tokens of one stage, by descending importance (methods.md §17).

    Args:
        importance: [B, n] aggregated I-stage scores; features: [B, n, d] the S-stage metric.
    Returns:
        [B, k] long indices into the full sequence (cls = 0, so non-cls indices start at 1).
    """
    batch, n = importance.shape
    k, r_i, r_s = stage_removals(n, keep_rate, s_ratio)
    order = torch.sort(importance, dim=1, descending=True, stable=True).indices  # ties by position
    survivors = order[:, : n - r_i]  # I-stage: the r_I least important go
    if r_s == 0:
        return survivors + 1
    m = survivors.shape[1]
    a_pos, b_pos = (p.to(importance.device) for p in group_positions(m, partition))
    metric = F.normalize(features.float().gather(1, survivors.unsqueeze(-1).expand(-1, -1, features.shape[-1])), dim=-1)
    similarity = metric[:, a_pos] @ metric[:, b_pos].transpose(1, 2)  # [B, |A|, |B|] cosine
    best = similarity.amax(dim=2)  # every A token's closest important token
    # the r_S most similar A tokens go; equal similarities: the less important A token first (a stable
    # sort over A in reverse importance order)
    last = best.shape[1] - 1
    drop = last - torch.sort(best.flip(1), dim=1, descending=True, stable=True).indices[:, :r_s]
    keep = torch.ones(batch, m, dtype=torch.bool, device=importance.device)
    keep.scatter_(1, a_pos[drop], False)
    # the survivors that stay, still in importance order (a stable sort puts the kept ranks first)
    ranks = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    return survivors.gather(1, ranks) + 1


@register
class ZeroTPrune(Method):
    name = "zerotprune"
    rank = 46
    label = "Zero-TPrune (reconstructed)"
    paper = "Zero-TPrune, Wang, Dedhia, Jha, CVPR 2024 (no official code: reconstructed)"
    acts = "inside"
    default_layers = (4, 7, 10)
    needs = frozenset({"attention", "keys"})
    colour = "#393b79"
    marker = "h"
    comparison = (ComparisonEntry("pruning", 5, "Zero-TPrune (reconstructed)"),)
    params = (
        ParamSpec("iterations", 30, "int",
                  "I-stage: Weighted PageRank iterations s <- A^T s from s = 1/N over the block's attention graph "
                  "[choice: a fixed count instead of a convergence test].", minimum=1, maximum=1000),
        ParamSpec("aggregation", "eir", "choice",
                  "I-stage: how the heads' scores combine: eir (emphasise the informative region: root mean square over "
                  "heads, [choice] for the paper's EIR) or mean.", choices=AGGREGATIONS),
        ParamSpec("v_min", 0.0, "float",
                  "Variance-based head filter: heads whose score variance is below v_min are left out (0: none; if every "
                  "head is filtered, all are used).", minimum=0.0),
        ParamSpec("v_max", 1.0, "float",
                  "Variance-based head filter: heads whose score variance is above v_max are left out (1: none, scores "
                  "sum to 1).", minimum=0.0),
        ParamSpec("s_ratio", 0.5, "float",
                  "Share of each stage's removals made by the S-stage (similarity), the rest by the I-stage (importance) "
                  "first [choice]; capped so that the S-stage removes at most the kept count.", minimum=0.0, maximum=1.0),
        ParamSpec("partition", "sequential", "choice",
                  "S-stage groups by importance rank: sequential (the less important half is A, the candidates) or "
                  "alternate (ranks alternate between B and A) [choice].", choices=PARTITIONS),
        ParamSpec("metric", "keys", "choice",
                  "S-stage similarity features: keys (averaged over heads) or x (hidden states); cosine similarity "
                  "[choice].", choices=METRICS),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """One Zero-TPrune stage: I-stage scores, importance pruning, similarity pruning (methods.md §17)."""
        n_tokens = ctx.x.shape[1]
        n = n_tokens - 1
        if kept_count(ctx.keep_rate, n) >= n:
            return None
        params = ctx.params
        scores = weighted_pagerank(ctx.attention, params["iterations"])[:, :, 1:]
        importance = head_scores(scores, params["aggregation"], params["v_min"], params["v_max"])
        features = (ctx.keys if params["metric"] == "keys" else ctx.x)[:, 1:]
        kept = zerotprune_keep(importance, features, ctx.keep_rate, params["s_ratio"], params["partition"])
        return keep_assignment(kept, n_tokens)

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """v_min must not exceed v_max."""
        params = plan.param_dict()
        if params["v_min"] > params["v_max"]:
            raise PlanError(f"{self.label}: v_min ({params['v_min']:g}) must not exceed v_max ({params['v_max']:g})")

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """Per image at one stage (methods.md §17): the PageRank's `iterations` products of an N-vector
        with every head's N x N attention (iterations H N^2, N = n_in + 1), and the S-stage's cosine
        similarities |A| |B| d (d = C / H for keys, C for x); element-wise: the head variances and
        aggregation (3 H n) and the normalisation of the m survivors' features (m d). The attention
        matrix itself is the engine's (`needs`, counted by analysis.gmacs)."""
        if not shape.acted:
            return 0.0, 0.0
        params = shape.params
        n, heads = shape.n_in, shape.heads
        matmul = float(params.get("iterations", 30) * heads * (n + 1) ** 2)
        elementwise = float(3 * heads * n)
        _, r_i, r_s = stage_removals(n, shape.keep_rate, params.get("s_ratio", 0.5))
        if r_s:
            m = n - r_i
            a_pos, b_pos = group_positions(m, params.get("partition", "sequential"))
            width = shape.channels // heads if params.get("metric", "keys") == "keys" else shape.channels
            matmul += float(len(a_pos) * len(b_pos) * width)
            elementwise += float(m * width)
        return matmul, elementwise
