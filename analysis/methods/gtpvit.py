"""GTP-ViT: graph-based token propagation (Xu et al., "GTP-ViT: Efficient Vision Transformers via
Graph-based Token Propagation", WACV 2024, arXiv 2311.03035; official code Ackesnal/GTP-ViT at
97a1178, `models_v3.py`: `GraphPropagationTransformer`, `GraphPropagationBlock`, `Attention`,
`select`, `propagate`; spec: methods.md §18).

In every block (the official model has no reduction layers: every block selects), inside the block
after the attention residual:

1. the attention is sparsified (official `Attention.forward`): per image and head, every
   post-softmax probability below the k-th smallest of the N x N map, k = int(N^2 (1 - theta)),
   is set to 0 (no renormalisation); the block's output uses the sparsified map
   (`transform_attention`);
2. the P least significant image tokens are chosen from that map (official `select`, default
   "MixedAttnMax": s_j = max_h A_h[j, j] * max_h sum_i A_h[i, j]);
3. their features are propagated over a sparse graph into the kept tokens they are connected to
   (official `propagate`, "GraphProp"): x_i <- x_i + alpha sum_j G[i, j] x_j for every kept i and
   pruned j. G is built once per forward from the patch embedding (`ctx.state`): the 8-neighbour
   spatial grid OR each patch's k most cosine-similar patches ("Mixed"), symmetrically normalised
   D^-1/2 A D^-1/2, and then reduced with the tokens (rows and columns of the kept tokens, in their
   new order; never renormalised);
4. token scales (official `--token_scale`): s_i <- s_i + alpha sum_j G[i, j] s_j, and log(s) is
   added to every key's attention logit (proportional attention).

The kept tokens come out by descending score, as the official `argsort`; ties (exact zeros after
the sparsification are common) go by position (a stable sort, `ties` "position"), where the
official CPU sort is unstable (`ties` "torch" reproduces its CPU order; methods.md §18).

As a `TokenAssignment` (combine "sum"): every kept token goes to its own slot with weight 1; a
pruned token j goes to the kept token i with the largest G[i, j] (`dest`, the first at equal
weights) with weight alpha G[i, j], and to every other connected kept token by `Edges`; a pruned
token connected to no kept token is discarded (the official code drops it silently too).
"""
from __future__ import annotations

import math
from collections import abc
from typing import Sequence

import torch

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Edges, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_rate_counts,
    register, token_kinds,
)

SELECTIONS = ("MixedAttnMax", "MixedAttnMean", "SumAttnMax", "CLSAttnMean", "CLSAttnMax", "IMGAttnMean", "IMGAttnMax",
              "DiagAttnMean", "DiagAttnMax")
GRAPHS = ("Mixed", "Spatial", "Semantic")
PROPAGATIONS = ("GraphProp", "None")

# The official README's optimal (sparsity theta, magnitude alpha) per P on DeiT-B (MixedAttnMax,
# Mixed graph, GraphProp, token scale), found by its hyperparameter_search.py.
README_SETTINGS: dict[int, tuple[float, float]] = {
    1: (0.8, 0.1), 2: (0.7, 0.1), 3: (0.9, 0.4), 4: (1.0, 0.4), 5: (0.6, 0.15), 6: (0.6, 0.15), 7: (0.6, 0.1),
    8: (0.6, 0.1), 9: (0.7, 0.2), 10: (0.5, 0.2), 11: (0.8, 0.3), 12: (0.8, 0.3), 13: (0.7, 0.3), 14: (0.8, 0.3),
}


# ----------------------------------------------------------------------------------------------
# The sparsified attention, the scores, the graph
# ----------------------------------------------------------------------------------------------

def sparsify_attention(probs: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The official sparsified attention (`Attention.forward`, `self.sparsity < 1`).

    Per image and head, `threshold` = the k-th smallest of the N^2 probabilities, k =
    int(N^2 (1 - sparsity)) (Python float arithmetic, as the official code); every probability
    below it becomes 0, the rest are kept as they are (no renormalisation).

    Args:
        probs: [B, H, N, N] post-softmax attention.
        sparsity: theta in (0, 1]; 1 (or a k of 0) leaves `probs` unchanged.
    Returns:
        [B, H, N, N], a new tensor (or `probs` itself when nothing changes).
    """
    batch, heads, n, _ = probs.shape
    k = int(n * n * (1 - sparsity)) if sparsity < 1 else 0
    if k < 1:
        return probs
    threshold = torch.kthvalue(probs.reshape(batch, heads, n * n), k, dim=-1, keepdim=True).values.unsqueeze(-1)
    return probs.masked_fill(probs < threshold, 0.0)


def token_scores(probs: torch.Tensor, selection: str = "MixedAttnMax") -> torch.Tensor:
    """The significance of every image token from the (sparsified) attention (official `select`,
    class-token branch); the P lowest are propagated.

    With D_h[j] = A_h[j, j] (the diagonal) and R_h[j] = sum_i A_h[i, j] (the attention token j
    receives, every query row, cls included): MixedAttnMax max_h D * max_h R (the default);
    MixedAttnMean mean_h D * mean_h R; SumAttnMax max_h D + max_h R; CLSAttnMean / CLSAttnMax the
    class row A_h[0, j]; IMGAttnMean / IMGAttnMax R; DiagAttnMean / DiagAttnMax D.

    Args:
        probs: [B, H, N, N], token 0 = cls.
        selection: one of `SELECTIONS`.
    Returns:
        [B, N - 1] float scores of tokens 1..N-1.
    Raises:
        ValueError: an unknown selection.
    """
    diag = torch.diagonal(probs, dim1=-2, dim2=-1)[:, :, 1:]
    if selection.startswith("CLS"):
        per_head = probs[:, :, 0, 1:]
        return per_head.mean(1) if selection.endswith("Mean") else per_head.max(1)[0]
    if selection.startswith("Diag"):
        return diag.mean(1) if selection.endswith("Mean") else diag.max(1)[0]
    received = probs[:, :, :, 1:].sum(-2)
    if selection == "IMGAttnMean":
        return received.mean(1)
    if selection == "IMGAttnMax":
        return received.max(1)[0]
    if selection == "MixedAttnMean":
        return diag.mean(1) * received.mean(1)
    if selection == "MixedAttnMax":
        return diag.max(1)[0] * received.max(1)[0]
    if selection == "SumAttnMax":
        return diag.max(1)[0] + received.max(1)[0]
    raise ValueError(f"unknown GTP-ViT selection {selection!r}: use one of {', '.join(SELECTIONS)}")


def spatial_graph(num_patches: int, device: torch.device | str | None = None,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[P, P] float 0/1: patches whose rows and columns both differ by at most 1 (the 8-neighbourhood
    on the grid), without self loops (official `GraphPropagationTransformer.__init__`, for a square
    grid; `grid` (rows, cols) gives any other, row-major).

    Raises:
        PlanError: no grid is given and P is not a square number, or the grid does not hold P patches."""
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise PlanError(f"GTP-ViT's spatial graph needs the patch grid; this model has {num_patches} patches "
                            "and gives no (rows, cols)")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != num_patches:
        raise PlanError(f"GTP-ViT's spatial graph: a {rows} x {cols} grid does not hold {num_patches} patches")
    index = torch.arange(num_patches, device=device)
    row, col = index // cols, index % cols
    near = ((row[:, None] - row[None, :]).abs() <= 1) & ((col[:, None] - col[None, :]).abs() <= 1)
    return near.float() - torch.eye(num_patches, device=device)


def semantic_graph(patches: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """[B, P, P] float 0/1: each patch's row marks the patches whose cosine similarity to it is at
    least its (P - k)-th smallest similarity (official `forward_features`: `kthvalue(x_cossim, N-1-k)`,
    `>=`), i.e. itself and its k most similar patches (more at exact ties), self loop removed.
    Not symmetric.

    Args:
        patches: [B, P, C] the patch tokens entering the first block (patch + position embedding).
        num_neighbours: k, 1 <= k <= P - 1.
    """
    n = patches.shape[1]
    normed = patches / patches.norm(dim=-1, keepdim=True)
    cossim = normed @ normed.transpose(-1, -2)
    threshold = torch.kthvalue(cossim, n - num_neighbours, dim=-1, keepdim=True).values
    return torch.where(cossim >= threshold, 1.0, 0.0) - torch.eye(n, device=patches.device).unsqueeze(0)


def propagation_graph(patches: torch.Tensor, graph_type: str = "Mixed", num_neighbours: int = 8,
                      grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The normalised graph G = D^-1/2 A D^-1/2 (D = the row sums of A) over the patches.

    A: "Spatial" (`spatial_graph`), "Semantic" (`semantic_graph`) or "Mixed" (their logical OR).

    Args:
        patches: [B, P, C] the patch tokens entering the first block.
        grid: (rows, cols) of the patches (None: a square grid).
    Returns:
        [B, P, P] float32.
    Raises:
        PlanError: no usable grid (Spatial / Mixed), see `spatial_graph`.
    """
    batch, n, _ = patches.shape
    patches = patches.float()
    if graph_type == "Semantic":
        adjacency = semantic_graph(patches, min(num_neighbours, n - 1))
    else:
        adjacency = spatial_graph(n, patches.device, grid).unsqueeze(0).expand(batch, -1, -1)
        if graph_type == "Mixed":
            semantic = semantic_graph(patches, min(num_neighbours, n - 1))
            adjacency = torch.bitwise_or(semantic.int(), adjacency.int()).float()
    scale = adjacency.sum(-1) ** (-1 / 2)
    # (D A) D as the official `degree @ graph @ degree` with diagonal D, element by element
    return (scale.unsqueeze(-1) * adjacency) * scale.unsqueeze(-2)


# ----------------------------------------------------------------------------------------------
# The assignment
# ----------------------------------------------------------------------------------------------

def select_propagated(scores: torch.Tensor, num_prop: int, ties: str = "position") -> tuple[torch.Tensor, torch.Tensor]:
    """(kept [B, n - P], propagated [B, P]) 1-based token indices: all tokens by descending score;
    the last P are propagated (official `select`).

    Equal scores (exact zeros after the sparsification are common) go by `ties`: "position" (a
    stable sort: the earlier token first, on every device); "torch": the order of torch's unstable
    CPU sort, as the official `torch.argsort(descending=True)` in a CPU run (the order depends on
    the torch build; the scores are sorted on the CPU whatever the device)."""
    if ties == "torch":
        order = torch.argsort(scores.cpu(), dim=1, descending=True).to(scores.device) + 1
    else:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices + 1
    n = scores.shape[1]
    return order[:, : n - num_prop], order[:, n - num_prop:]


def propagation_assignment(x: torch.Tensor, sizes: torch.Tensor, graph: torch.Tensor | None, kept: torch.Tensor,
                           prop: torch.Tensor, alpha: float) -> tuple[TokenAssignment, torch.Tensor | None]:
    """GTP's propagation as a `TokenAssignment`: output `[cls, kept (in the given order)]`.

    Args:
        x: [B, N, C] hidden states (used for shapes only); sizes: [B, N] token scales.
        graph: [B, N - 1, N - 1] the current graph over the non-cls tokens, or None to drop the
            propagated tokens (official propagation "None").
        kept: [B, k] and prop: [B, m] 1-based token indices.
        alpha: the propagation magnitude.
    Returns:
        (assignment, the graph over the kept tokens [B, k, k] in output order, or None).
        The assignment (combine "sum"): kept tokens weight 1 in their slot; a propagated token j
        to the kept token with the largest G[i, j] (the first at a tie) with weight alpha G[i, j],
        to the other connected ones by `edges`, discarded when connected to none; kinds "host" for
        kept tokens that received anything; `pruned` marks propagated tokens that went somewhere;
        `sizes` the new token scales s_i + alpha sum_j G[i, j] s_j; `extra["received"]` [B, k + 1]
        each output token's total weight received, alpha sum_j G[i, j] (0 for cls).
    """
    batch, n_tokens = x.shape[:2]
    k, m = kept.shape[1], prop.shape[1]
    device = x.device
    dest = torch.full((batch, n_tokens), -1, dtype=torch.long, device=device)
    dest[:, 0] = 0
    dest.scatter_(1, kept, torch.arange(1, k + 1, device=device).expand(batch, k))
    weight = torch.ones(batch, n_tokens, dtype=torch.float32, device=device)
    kept_sizes = sizes.gather(1, kept)
    if graph is None:
        weight.scatter_(1, prop, 0.0)
        kinds = token_kinds("kept", k + 1, batch, device)
        new_sizes = torch.cat([sizes[:, :1], kept_sizes], dim=1)
        return TokenAssignment(dest=dest, weight=weight, n_out=k + 1, kinds=kinds, sizes=new_sizes), None
    rows = graph.gather(1, (kept - 1).unsqueeze(-1).expand(-1, -1, graph.shape[2]))  # [B, k, n]
    w_prop = rows.gather(2, (prop - 1).unsqueeze(1).expand(-1, k, -1))                 # [B, k, m]
    new_graph = rows.gather(2, (kept - 1).unsqueeze(1).expand(-1, k, -1))              # [B, k, k]
    strongest, host = w_prop.max(dim=1)  # [B, m]: first maximum along the kept order
    connected = strongest > 0
    dest.scatter_(1, prop, torch.where(connected, host + 1, -1))
    weight.scatter_(1, prop, torch.where(connected, alpha * strongest, 0.0))
    others = (w_prop > 0) & ~torch.nn.functional.one_hot(host, k).transpose(1, 2).bool()
    edges = _edges(others, prop, alpha * w_prop) if bool(others.any()) else None
    received = alpha * w_prop.sum(dim=2)
    kinds = token_kinds(torch.where(received > 0, KIND_CODE["host"], KIND_CODE["kept"]))
    pruned = torch.zeros(batch, n_tokens, dtype=torch.bool, device=device)
    pruned.scatter_(1, prop, connected)
    new_sizes = kept_sizes + alpha * (w_prop @ sizes.gather(1, prop).unsqueeze(-1).to(w_prop.dtype)).squeeze(-1)
    new_sizes = torch.cat([sizes[:, :1], new_sizes.to(sizes.dtype)], dim=1)
    received = torch.cat([received.new_zeros(batch, 1), received], dim=1)
    assignment = TokenAssignment(dest=dest, weight=weight, n_out=k + 1, kinds=kinds, combine="sum", pruned=pruned,
                                 edges=edges, sizes=new_sizes, extra={"received": received})
    return assignment, new_graph


def _edges(others: torch.Tensor, prop: torch.Tensor, weights: torch.Tensor) -> Edges:
    """`Edges` from [B, k, m] further receivers (kept i, propagated j): source token prop[j] -> slot
    i + 1 with weight weights[b, i, j], ordered by (j, i), padded with target -1."""
    batch = others.shape[0]
    by_source = others.transpose(1, 2)  # [B, m, k]
    per_image = by_source.flatten(1).sum(dim=1)
    width = int(per_image.max())
    image, j, i = by_source.nonzero(as_tuple=True)
    slot = torch.arange(image.numel(), device=others.device) - torch.cumsum(per_image, 0).sub(per_image)[image]
    source = prop.new_zeros(batch, width)
    target = prop.new_full((batch, width), -1)
    weight = weights.new_zeros(batch, width)
    source[image, slot] = prop[image, j]
    target[image, slot] = i + 1
    weight[image, slot] = weights[image, i, j]
    return Edges(source=source, target=target, weight=weight)


def prop_at_stage(num_prop: int | Sequence[int], stage: int) -> int:
    """P at reducing stage `stage` (0-based): a constant, or one entry per reducing layer (the official
    per-block list `num_prop[i]`). Raises PlanError for a list shorter than the plan's layers."""
    if isinstance(num_prop, abc.Sequence):
        if stage >= len(num_prop):
            raise PlanError(f"GTP-ViT's num_prop list has {len(num_prop)} entries but the plan reduces at more layers; "
                            "give one entry per reducing layer or a single number")
        return int(num_prop[stage])
    return int(num_prop)


def _first_propagating_stage(num_prop: int | Sequence[int]) -> int | None:
    """The first reducing stage with P > 0 (where `assign` builds the graph), or None."""
    entries = list(num_prop) if isinstance(num_prop, abc.Sequence) else [num_prop]
    return next((stage for stage, p in enumerate(entries) if int(p) > 0), None)


def gtp_counts(num_prop: int | Sequence[int], depth: int = 12, n0: int = 197, layers: Sequence[int] | None = None) -> list[int]:
    """Tokens (cls included) leaving each block: N -> N - min(P, N - 2) at each reducing layer (None:
    every block; at least one image token stays). DeiT at 224, P 13: 184, 171, ..., 41."""
    layers = tuple(range(1, depth + 1)) if layers is None else tuple(layers)
    counts, n = [], n0
    for block in range(1, depth + 1):
        if block in layers:
            n -= max(0, min(prop_at_stage(num_prop, layers.index(block)), n - 2))
        counts.append(n)
    return counts


@register
class GTPViT(Method):
    name = "gtpvit"
    rank = 47
    label = "GTP-ViT"
    paper = "GTP-ViT, Xu et al., WACV 2024"
    acts = "inside"
    default_layers = None
    needs = frozenset({"attention"})
    uses_keep_rate = False
    colour = "#637939"
    marker = "D"
    comparison = (ComparisonEntry(row="pruning", order=6, title="GTP-ViT"),)
    params = (
        ParamSpec(
            "num_prop", 13, "int_list",
            "P: image tokens propagated (removed) in each reducing block (official --num_prop; one number, or a comma "
            "list with one entry per reducing layer). Default 13 in every block: 197 -> 184 -> ... -> 41.",
            minimum=0,
        ),
        ParamSpec(
            "sparsity", 0.7, "float",
            "theta: share of each head's N x N attention probabilities kept; the smaller ones are set to 0 "
            "(official --sparsity; 1 = dense). README DeiT-B optimum for P 13: 0.7 (P 8: 0.6).",
            minimum=0.01, maximum=1.0,
        ),
        ParamSpec(
            "alpha", 0.3, "float",
            "alpha: magnitude of the features propagated into the kept tokens (official --alpha). README DeiT-B optimum "
            "for P 13: 0.3 (P 8: 0.1).",
            minimum=0.0, maximum=10.0,
        ),
        ParamSpec(
            "num_neighbours", 8, "int",
            "k: semantic neighbours (most cosine-similar patch embeddings) of every patch in the graph (official "
            "--num_neighbours, default 8).",
            minimum=1, maximum=1024,
        ),
        ParamSpec(
            "graph_type", "Mixed", "choice",
            "Graph of the propagation: Spatial (8-neighbour grid), Semantic (k nearest patch embeddings) or Mixed "
            "(both; the official optimum).",
            choices=GRAPHS,
        ),
        ParamSpec(
            "selection", "MixedAttnMax", "choice",
            "Which tokens are propagated: the lowest of this score of the sparsified attention (official --selection; "
            "MixedAttnMax = max-over-heads self attention x max-over-heads attention received).",
            choices=SELECTIONS,
        ),
        ParamSpec(
            "propagation", "GraphProp", "choice",
            "GraphProp: propagate over the graph (the method); None: drop the selected tokens (official ablation).",
            choices=PROPAGATIONS,
        ),
        ParamSpec(
            "ties", "position", "choice",
            "Order of equal scores (exact zeros after the sparsification are common): position (earlier token first, "
            "deterministic on every device; our choice) or torch (torch's unstable CPU sort, as the official CPU run).",
            choices=("position", "torch"),
        ),
        ParamSpec(
            "token_scale", True, "bool",
            "Token scales (official --token_scale, on in the README's optimal settings): each token's scale grows by "
            "alpha times the graph-weighted scales it receives, and log(scale) is added to its attention logit.",
        ),
    )

    def transform_attention(self, probs: torch.Tensor, ctx: ReduceContext) -> torch.Tensor:
        """The sparsified attention of every reducing block (`sparsify_attention` at theta)."""
        return sparsify_attention(probs, float(ctx.params["sparsity"]))

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("token_scale", True))

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """One GTP block (methods.md §18): score the image tokens from the block's sparsified
        attention (`ctx.attention`), propagate the P lowest over the graph (built at the first call
        of a forward from `ctx.embedding`, kept in `ctx.state["graph"]`, reduced with the tokens).
        Output `[cls, kept (descending score)]`.

        Raises PlanError for a num_prop list shorter than the plan's layers, or when the model gives
        no patch grid and its patches do not form a square."""
        params = ctx.params
        n = ctx.x.shape[1] - 1
        graphing = params["propagation"] == "GraphProp"
        num_prop = min(prop_at_stage(params["num_prop"], ctx.stage), n - 1)
        if num_prop <= 0:
            return None
        if graphing and "graph" not in ctx.state:
            patches = ctx.embedding[:, 1:]
            ctx.state["graph"] = propagation_graph(patches, params["graph_type"], int(params["num_neighbours"]), ctx.grid)
        scores = token_scores(ctx.attention, params["selection"])
        kept, prop = select_propagated(scores, num_prop, params["ties"])
        assignment, graph = propagation_assignment(ctx.x, ctx.sizes, ctx.state.get("graph") if graphing else None, kept,
                                                   prop, float(params["alpha"]))
        if graph is not None:
            ctx.state["graph"] = graph
        return assignment

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """A num_prop list needs one entry per reducing layer."""
        num_prop = plan.param_dict()["num_prop"]
        layers = plan.reducing_layers(depth)
        if isinstance(num_prop, tuple) and len(num_prop) < len(layers):
            prop_at_stage(num_prop, len(layers) - 1)  # raises the one message for this mistake

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """GTP's own work at one block, per image (methods.md §18). First block that propagates
        (where the graph is built), with a semantic graph: the patch embeddings' cosine similarities (P^2 C, a matrix product), their
        normalisation (P C) and the graph normalisation (2 P^2). Every block that propagates m
        tokens into k: the token scales (k m, a matrix product), the scores (n) and the weighted
        sums of the propagated features, counted as the official dense product k m C (an upper
        bound of the sparse sums done here) [choice]. The sparsified attention (a k-th value and a
        mask), the sums of the selection and sorting are not counted (methods.md §8); the attention
        itself is the block's (the engine computes it once, explicitly)."""
        params = shape.params
        matmul = elementwise = 0.0
        graphing = params.get("propagation", "GraphProp") == "GraphProp"
        if graphing and shape.acted and shape.stage == _first_propagating_stage(params.get("num_prop", 13)) \
                and params.get("graph_type", "Mixed") != "Spatial":
            p, c = shape.n_in, shape.channels
            matmul += float(p * p * c)
            elementwise += float(p * c + 2 * p * p)
        if shape.acted:
            m, k = shape.n_in - shape.n_out, shape.n_out
            elementwise += float(shape.n_in)
            if graphing:
                matmul += float(k * m)
                elementwise += float(k * m * shape.channels)
        return matmul, elementwise

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """GTP-ViT at a keep rate's token budget (methods.md §18). With `target_counts` or the
        "matched" schedule: a P per block, P_i = clamp(N_{i-1} - target_i, 0, N_{i-1} - 2), that
        follows the counts block by block (EViT's selection without fusion at `layers`, default 4, 7,
        10, `keep_rate_counts`). "constant": the one P in every block whose total tokens over the
        blocks come closest to the budget's (the smaller P at a tie), with the README's theta and
        alpha for that P (DeiT-B; P > 14 keeps the P 14 row). A budget that removes nothing (keep rate
        1.0) gives P 0 with theta 1: the dense model. Raises PlanError for an unknown schedule."""
        if schedule not in ("constant", "matched"):
            raise PlanError(f"GTP-ViT budget: schedule must be 'constant' or 'matched', got {schedule!r}")
        if target_counts is not None or schedule == "matched":
            if target_counts is None:
                target_counts = keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10)))
            removed, n = [], n0
            for target in target_counts:
                p = max(0, min(n - int(target), n - 2))
                removed.append(p)
                n -= p
            if not any(removed):
                return ReductionPlan.make(self.name, 1.0, None, num_prop=0, sparsity=1.0)
            num_prop = removed[0] if len(set(removed)) == 1 else tuple(removed)
            return ReductionPlan.make(self.name, 1.0, None, num_prop=num_prop)
        target = sum(keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10))))
        best = min(range(0, n0 - 1), key=lambda p: (abs(sum(gtp_counts(p, depth, n0)) - target), p))
        if best == 0:
            return ReductionPlan.make(self.name, 1.0, None, num_prop=0, sparsity=1.0)
        sparsity, alpha = README_SETTINGS[min(best, max(README_SETTINGS))]
        return ReductionPlan.make(self.name, 1.0, None, num_prop=best, sparsity=sparsity, alpha=alpha)
