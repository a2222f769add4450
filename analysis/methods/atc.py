"""ATC: agglomerative token clustering (Haurum et al., ECCV 2024; methods.md §13).

In every block (by default), after the attention residual and before the MLP, the patch tokens are
clustered bottom-up on ToMe's metric (the block's keys averaged over heads, cosine distance
`1 - cos`), with single, average or complete linkage, down to a target number of clusters; each
cluster becomes one token, the size-weighted mean of its members, and sizes add. The class token
never merges. Proportional attention adds log(size) of every key to the attention logits.

Official code: github.com/JoakimHaurum/ATC at 227c94b, `SSLBackbone_setup/token_reduc/merge.py`
(`agglomerative_clustering`, `merge_wavg`) and `SSLBackbone_setup/token_reduc/patch/timm.py`
(`ToMeBlock.forward`, `ToMeAttention.forward`, `apply_patch`): scikit-learn's
`AgglomerativeClustering(n_clusters=N - r, metric="precomputed", linkage=...)` on the patch tokens'
distance matrix, image by image. scikit-learn hands a precomputed matrix to scipy's
`hierarchy.linkage` (its upper triangle) and cuts the full tree at `N - r` clusters. N counts the
class token while the clustered tokens do not, so the official code merges `r - 1` tokens per block
(DeiT r = 8: 197 -> 190 -> ... -> 113). That is the default; `exact_r` gives the paper's r merges.

Here the clustering is a vectorised torch loop over merge steps (not over images or tokens): at
every step each image merges its closest pair of clusters and updates the distances by the
Lance-Williams rule of the linkage, in float64 as scipy does. For these three (monotone) linkages
the clusters after m such steps are scipy's tree cut at `P - m` clusters, up to exact ties
(tests/test_methods_atc.py checks it against scipy on real DeiT-T keys).

Budget helpers: `atc_counts` (tokens leaving each block), `matched_r_schedule` (a per-block r that
follows target counts) and `r_for_keep_rate` (the constant r whose token total best matches a keep
rate's).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_rate_counts, register,
    token_kinds,
)

LINKAGES = ("average", "complete", "single")


def r_entry(r: int | Sequence[int], stage: int) -> int:
    """The `r` parameter at reducing stage `stage` (0-based): a single number applies to every stage.
    Raises PlanError when a list is shorter than the plan's reducing layers."""
    if isinstance(r, (list, tuple)):
        if stage >= len(r):
            raise PlanError(
                f"ATC's r list has {len(r)} entries but the plan reduces at more layers; give one r per reducing layer "
                "(12 for every block of DeiT) or a single number"
            )
        return int(r[stage])
    return int(r)


def block_merges(n: int, r: int, exact_r: bool = False) -> int:
    """Merges in a block entered by `n` tokens (cls included, so P = n - 1 patch tokens).

    Official (`exact_r` False, merge.py l.43-44): `r = min(r, n - 1)`, `num_clusters = n - r`, and the
    P patch tokens are clustered into n - r clusters: `r - 1` merges (0 for r <= 1). With `exact_r`
    (the paper's r): `min(r, P - 1)` merges. Either way at least one patch token is left."""
    r = int(r)
    if exact_r:
        return max(0, min(r, n - 2))
    return max(0, min(r, n - 1) - 1)


def cluster_distances(keys: torch.Tensor) -> torch.Tensor:
    """The official distance matrix of the patch tokens, [B, P, P] float64.

    `metric = keys / |keys|` over all N tokens, `scores = metric metric^T` in the keys' precision
    (float32 for float32 or half keys, float64 for float64 keys), the class row and column dropped,
    `1 - scores`; then, as scikit-learn passes only the upper triangle to scipy, entry (i, j) with
    i < j is used for both (i, j) and (j, i). The diagonal is +inf (a cluster never merges with itself).
    A zero key gets distance 1 to every token (the norm is clamped at 1e-12; the official code gives NaN).

    Args:
        keys: [B, N, d] keys averaged over heads, token 0 = cls.
    """
    metric = keys if keys.dtype == torch.float64 else keys.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    distance = (1 - metric @ metric.transpose(-1, -2))[:, 1:, 1:]
    p = distance.shape[-1]
    upper = torch.ones(p, p, dtype=torch.bool, device=keys.device).triu(1)
    distance = torch.where(upper, distance, distance.transpose(-1, -2)).double()
    distance.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return distance


def agglomerate(distance: torch.Tensor, merges: int, linkage: str = "average", inplace: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bottom-up clustering of every image of a batch, `merges` steps, vectorised over the batch.

    At each step every image merges its pair of clusters (i, j), i < j, at the smallest distance
    (an exact tie goes to the first pair in row-major order, i.e. the smallest i, then j; each row's
    nearest cluster is cached and only rows whose nearest changed are scanned again); cluster i
    takes j in, and its distance to every other cluster k becomes (Lance-Williams, as scipy's
    `_hierarchy_distance_update`):
      single   min(d_ik, d_jk);  complete  max(d_ik, d_jk);
      average  (n_i d_ik + n_j d_jk) / (n_i + n_j), n = tokens in the cluster (not their sizes).

    Args:
        distance: [B, P, P] float64 symmetric distances, +inf on the diagonal (`cluster_distances`).
        merges: steps, 0 <= merges <= P - 1.
        linkage: "average", "complete" or "single".
        inplace: work on `distance` itself (it is overwritten) instead of a copy.
    Returns:
        (label [B, P] long: every token's cluster, named by its smallest member;
         heights [B, merges] float64: the linkage distance of each step, non-decreasing;
         following [B] float64: the distance the next step would merge at, +inf with one cluster left).
    Raises:
        ValueError: an unknown linkage, or merges outside 0..P - 1.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {', '.join(LINKAGES)}, got {linkage!r}")
    batch, p, _ = distance.shape
    if not 0 <= merges <= p - 1:
        raise ValueError(f"{merges} merges of {p} tokens: give 0 to {p - 1}")
    device = distance.device
    d = distance if inplace else distance.clone()
    rows = torch.arange(batch, device=device)
    label = torch.arange(p, device=device).expand(batch, p).clone()
    count = torch.ones(batch, p, dtype=d.dtype, device=device)
    heights = d.new_empty(batch, merges)
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=device)
    # Every row's nearest cluster (value, first column reaching it), so a step scans [B, P], not [B, P, P].
    nearest, partner = d.min(dim=2)
    for step in range(merges):
        # The first row holding the smallest entry, and its first minimal column: the row-major first
        # minimum of the matrix. Its column is > the row (the matrix is symmetric).
        height, i = nearest.min(dim=1)
        j = partner[rows, i]
        heights[:, step] = height
        d_i, d_j = d[rows, i], d[rows, j]  # [B, P]
        if linkage == "single":
            new = torch.minimum(d_i, d_j)
        elif linkage == "complete":
            new = torch.maximum(d_i, d_j)
        else:
            n_i, n_j = count[rows, i].unsqueeze(1), count[rows, j].unsqueeze(1)
            new = (n_i * d_i + n_j * d_j) / (n_i + n_j)
        new[rows, i] = inf
        new[rows, j] = inf
        d[rows, i] = new
        d[rows, :, i] = new
        d[rows, j] = inf
        d[rows, :, j] = inf
        count[rows, i] += count[rows, j]
        label = torch.where(label == j.unsqueeze(1), i.unsqueeze(1), label)
        # Nearest clusters after the merge: rows whose nearest was i or j (and row i itself) are
        # scanned again; every other row only compares its nearest with its new entry in column i
        # (an equal value in an earlier column wins, as in a scan).
        ci, cj = i.unsqueeze(1), j.unsqueeze(1)
        stale = (partner == ci) | (partner == cj)
        stale[rows, i] = True
        closer = (new < nearest) | ((new == nearest) & (ci < partner))
        nearest = torch.where(closer, new, nearest)
        partner = torch.where(closer, ci.expand(batch, p), partner)
        image, row = stale.nonzero(as_tuple=True)
        if image.numel():
            value, column = d[image, row].min(dim=1)
            nearest[image, row] = value
            partner[image, row] = column
        nearest[rows, j] = inf
    return label, heights, nearest.min(dim=1).values


def atc_assignment(keys: torch.Tensor, sizes: torch.Tensor, merges: int, linkage: str = "average",
                   note: str | None = None) -> TokenAssignment | None:
    """ATC at one block (methods.md §13): cluster the patch tokens with `merges` agglomerative steps.

    Args:
        keys: [B, N, d] keys averaged over heads (token 0 = cls, never merged).
        sizes: [B, N] float, original tokens held (cls 1).
        merges: merges in this block (`block_merges`), capped at N - 2 (one patch token is left).
        linkage: "average", "complete" or "single".
        note: the stage's note for every image (None: a generic one).
    Returns:
        the assignment `[cls, clusters by smallest member position]` (weights = sizes, weighted mean;
        kinds "merged" for tokens holding more than one original token, "kept" otherwise; each
        image's note gives the gap between the last linkage height used and the next one, the
        decision margin of the cut), or None when merges <= 0.
    """
    batch, n, _ = keys.shape
    p = n - 1
    merges = min(int(merges), p - 1)
    if merges <= 0:
        return None
    device = keys.device
    label, heights, following = agglomerate(cluster_distances(keys), merges, linkage, inplace=True)
    margin = following - heights[:, -1]
    roots = torch.zeros(batch, p, dtype=torch.bool, device=device)
    roots.scatter_(1, label, True)
    slot = roots.long().cumsum(dim=1)  # 1-based output position of every cluster's smallest member
    n_out = 1 + p - merges
    dest = torch.zeros(batch, n, dtype=torch.long, device=device)
    dest[:, 1:] = slot.gather(1, label)
    sizes_out = sizes.new_zeros(batch, n_out).scatter_add_(1, dest, sizes)
    kinds = token_kinds(torch.where(sizes_out[:, 1:] > 1, KIND_CODE["merged"], KIND_CODE["kept"]))
    text = note or f"{linkage} linkage: {p} patch tokens -> {p - merges} clusters"
    notes = [f"{text}; height gap {gap:.2e}" for gap in margin.tolist()]
    return TokenAssignment(dest=dest, weight=sizes.float(), n_out=n_out, kinds=kinds, notes=notes)


@register
class ATC(Method):
    name = "atc"
    rank = 74
    label = "ATC"
    paper = "ATC, Haurum et al., ECCV 2024"
    default_layers = None  # every block
    needs = frozenset({"keys"})
    uses_keep_rate = False
    colour = "#e6550d"
    marker = "3"
    comparison = (ComparisonEntry("merging", 5, "ATC"),)
    params = (
        ParamSpec(
            "r", 13, "int_list",
            "Merge budget per block, one number for every block or a comma list with one entry per reducing layer. As in "
            "the official code, the N-1 patch tokens are clustered into N - r clusters, i.e. r - 1 merges (DeiT r=8: "
            "197 -> 190 -> ... -> 113); exact_r merges r. At least one patch token is left.",
            minimum=0,
        ),
        ParamSpec("linkage", "average", "choice", "Linkage of the agglomerative clustering (official default: average).",
                  choices=LINKAGES),
        ParamSpec(
            "exact_r", False, "bool",
            "Merge exactly r tokens per block (the paper's r). Off: the official code's N - r clusters, i.e. r - 1 merges.",
        ),
        ParamSpec("prop_attn", True, "bool",
                  "Proportional attention: add log(size) of each key to the attention logits (the official default)."),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """ATC at one block (methods.md §13). Raises PlanError for an r list shorter than the plan's layers."""
        params = ctx.params
        n = ctx.keys.shape[1]
        r = r_entry(params["r"], ctx.stage)
        merges = block_merges(n, r, params["exact_r"])
        if merges <= 0:
            return None
        rule = "r merges" if params["exact_r"] else f"{n} - r = {n - min(r, n - 1)} clusters"
        note = f"r={r}, {params['linkage']} linkage ({rule}): {n - 1} patch tokens -> {n - 1 - merges} clusters"
        return atc_assignment(ctx.keys, ctx.sizes, merges, params["linkage"], note)

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("prop_attn", True))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """An r list needs one entry per reducing layer."""
        r = plan.param_dict()["r"]
        layers = plan.reducing_layers(depth)
        if isinstance(r, tuple) and len(r) < len(layers):
            r_entry(r, len(layers) - 1)  # raises the one message for this mistake

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The cosine similarities of all N head-averaged keys (N^2 d, d = C / H, cls included as in the
        official code), and element-wise: the merge (C per merged token) and, for average linkage, the
        Lance-Williams update (2 P per merge step). Comparisons (single, complete, the minimum search)
        are not MACs (methods.md §8)."""
        if not shape.acted:
            return 0.0, 0.0
        n = shape.n_in + 1
        d = shape.channels // shape.heads
        merges = shape.n_in - shape.n_out
        update = 2.0 * merges * shape.n_in if shape.params.get("linkage", "average") == "average" else 0.0
        return float(n * n * d), float(merges * shape.channels) + update

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """ATC at a keep rate's budget: `matched_r_schedule(target_counts)` when counts are given, else
        `r_for_keep_rate` against EViT's selection without fusion at `layers` (4, 7, 10). ATC merges in
        every block, so the plan keeps its every-block default; r is in the official convention.
        Raises PlanError for an unknown schedule."""
        if target_counts is not None:
            return ReductionPlan.make(self.name, 1.0, None, r=matched_r_schedule(target_counts, n0))
        target = keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10)))
        if schedule == "matched":
            return ReductionPlan.make(self.name, 1.0, None, r=matched_r_schedule(target, n0))
        if schedule != "constant":
            raise PlanError(f"ATC budget: schedule must be 'constant' or 'matched', got {schedule!r}")
        return ReductionPlan.make(self.name, 1.0, None, r=r_for_keep_rate(keep_rate, depth, n0, layers))


# ----------------------------------------------------------------------------------------------
# Budget helpers
# ----------------------------------------------------------------------------------------------

def atc_counts(r: int | Sequence[int], depth: int = 12, n0: int = 197, layers: Sequence[int] | None = None,
               exact_r: bool = False) -> list[int]:
    """Tokens (cls included) leaving each block when ATC merges at `layers` (1-based; None = every
    block), r constant or one entry per reducing layer (`block_merges`). Official r = 8 on DeiT:
    [190, 183, ..., 113]."""
    layers = tuple(range(1, depth + 1)) if layers is None else tuple(layers)
    counts, n = [], n0
    for block in range(1, depth + 1):
        if block in layers:
            n -= block_merges(n, r_entry(r, layers.index(block)), exact_r)
        counts.append(n)
    return counts


def matched_r_schedule(target_counts: Sequence[int], n0: int = 197, exact_r: bool = False) -> tuple[int, ...]:
    """A per-block r whose ATC counts follow `target_counts` (methods.md §13, budget).

    Block i merges `m_i = clamp(N_{i-1} - target_i, 0, N_{i-1} - 2)`, N_{i-1} being ATC's own count
    before the block, and r_i is that count in the convention of `exact_r`: m_i + 1 officially (0
    when m_i = 0), m_i with `exact_r`. Where the target rises (a fused token appears) r is 0."""
    schedule, n = [], n0
    for target in target_counts:
        merges = max(0, min(n - int(target), n - 2))
        schedule.append(merges if exact_r or merges == 0 else merges + 1)
        n -= merges
    return tuple(schedule)


def r_for_keep_rate(keep_rate: float, depth: int = 12, n0: int = 197, layers: Sequence[int] | None = None,
                    exact_r: bool = False) -> int:
    """The constant r in 0..n0 - 1 whose ATC token total (the sum over blocks of the tokens leaving
    each block, the GMACs proxy ToMe's budget uses) is nearest to EViT-without-fusion's total at
    `keep_rate` and `layers` (4, 7, 10). Ties go to the smaller r."""
    budget = sum(keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10))))
    return min(range(0, n0), key=lambda r: (abs(sum(atc_counts(r, depth, n0, exact_r=exact_r)) - budget), r))
