"""Dataset-level analysis of token reduction (issue 12): where each method keeps tokens, how two
methods agree, how far each strays from the dense model, and attention rollout through reductions.

Every function here is a plain computation on tensors or arrays; the sweep's accumulators
(`analysis.sweep`, enabled with `--patterns`) call the per-batch ones, and `python -m analysis
compare` / the Compare page call the ones on finished rows. Nothing here names a method: a method's
family (pruning or merging) comes from its comparison rows or, failing that, from what its stages did.

Conventions:
- P original patches in row-major order of the model's patch grid (`patch_grid`), D blocks.
- "own token": after block d a patch has a token of its own when the token holding it holds no
  other patch and is not a fused token (so it was neither discarded, fused nor merged).
- The state after block d is the provenance of the last reduction stage acting at a block <= d
  (a method acting "before" a block reduces the block's input: the stage counts for that block).
- The partition of the patches after block d: patches holding the same token form a group;
  discarded patches form one group of their own ("gone").

Sources: Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision
Transformers", ICCVW 2023 (the questions); Kornblith et al., ICML 2019 (linear CKA) with the
unbiased HSIC of Song et al., JMLR 2012, in minibatches as Nguyen et al., ICLR 2021; Bylinskii et
al., "What do different evaluation metrics tell us about saliency models?", TPAMI 2019, and the MIT
saliency benchmark's code (map metrics); Abnar & Zuidema, "Quantifying Attention Flow in
Transformers", ACL 2020 (rollout).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .provenance import KIND_CODE, Stage

# MATLAB's eps, as the MIT saliency benchmark's KLdiv uses it.
EPS = 2.220446049250313e-16
HEAD_FUSIONS = ("mean", "max", "min")
MAP_METRICS = ("KL", "JS", "CC", "SCC", "EMD", "SIM")


# ----------------------------------------------------------------------------------------------
# Per-batch patterns from the engine's provenance
# ----------------------------------------------------------------------------------------------

def patch_grid(model: torch.nn.Module) -> tuple[int, int]:
    """The model's patch grid (rows, columns), e.g. (14, 14) for DeiT at 224 px, (16, 16) at 256 px."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        return int(grid[0]), int(grid[1])
    n = int(model.patch_embed.num_patches)
    side = int(round(math.sqrt(n)))
    return (side, n // side) if side * (n // side) == n else (1, n)


def stage_own(stage: Stage) -> torch.Tensor:
    """[B, P] bool: patches whose token after `stage` holds only them and is not a fused token."""
    p2t = stage.patch_to_token
    token = p2t.clamp(min=0)
    size = stage.token_sizes.gather(1, token)
    kind = stage.token_kinds.to(p2t.device).gather(1, token)
    return (p2t >= 0) & (size == 1) & (kind != KIND_CODE["fused"])


def block_states(stages: Sequence[Stage], depth: int, batch: int, num_patches: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Every patch's state after every block, from a forward's stages (`track=True`).

    Returns:
        own: [B, D, P] bool, the patch has a token of its own after block d;
        labels: [B, D, P] long, the partition after block d: the token holding the patch + 1,
            0 for discarded patches (one "gone" group).
    """
    own = torch.ones(batch, depth, num_patches, dtype=torch.bool, device=device)
    labels = torch.arange(2, num_patches + 2, device=device).expand(batch, depth, num_patches).clone()
    for stage in stages:  # in block order; a later stage overwrites the blocks from its own on
        start = int(stage.layer) - 1
        own[:, start:] = stage_own(stage).to(device).unsqueeze(1)
        labels[:, start:] = (stage.patch_to_token.to(device) + 1).unsqueeze(1)
    return own, labels


def survival_depth(own: torch.Tensor) -> torch.Tensor:
    """[B, D, P] own-token states -> [B, P] float: the last block (1-based) after which the patch still
    had its own token, 0 when it lost it at the first block."""
    depth = own.shape[1]
    blocks = torch.arange(1, depth + 1, device=own.device, dtype=torch.float64).view(1, depth, 1)
    return (own.double() * blocks).amax(dim=1)


def kinds_seen(stages: Sequence[Stage]) -> set[str]:
    """The token kinds (`provenance.KINDS`) any stage of a forward produced."""
    from .provenance import KINDS

    codes: set[int] = set()
    for stage in stages:
        codes.update(torch.unique(stage.token_kinds).tolist())
    return {KINDS[code] for code in codes}


# Kinds of tokens that merge patches by similarity: a method producing one counts as merging when
# its comparison rows do not say (`method_family`); "fused" and "host" tokens collect pruned ones.
MERGING_KINDS = frozenset({"merged", "cluster", "pair"})


def method_family(declared: str, kinds: Sequence[str]) -> str:
    """"pruning" or "merging": the method's comparison rows ("merging" / "pruning" row) when it
    joins one, else "merging" when its stages produced similarity-merged tokens (`MERGING_KINDS`)."""
    if declared in ("pruning", "merging"):
        return declared
    return "merging" if MERGING_KINDS & set(kinds) else "pruning"


# ----------------------------------------------------------------------------------------------
# Agreement between two methods on the same images
# ----------------------------------------------------------------------------------------------

def iou(own_a: torch.Tensor, own_b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of two kept-patch sets, [..., P] bool -> [...] float64 (1 when both
    are empty: the sets are equal)."""
    inter = (own_a & own_b).sum(-1).double()
    union = (own_a | own_b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _entropy_of_counts(group: torch.Tensor, key: torch.Tensor, groups: int, n: float) -> torch.Tensor:
    """sum over distinct keys within each group of -(c/n) log(c/n), for counts c of each key."""
    pair = group * (key.max() + 1) + key
    unique, counts = torch.unique(pair, return_counts=True)
    owner = unique // (key.max() + 1)
    c = counts.double()
    out = torch.zeros(groups, dtype=torch.float64, device=key.device)
    out.index_add_(0, owner, -(c / n) * torch.log(c / n))
    return out


def partition_scores(labels_a: torch.Tensor, labels_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Normalised mutual information, homogeneity, completeness and V-measure between two partitions
    of the same P patches, for every leading index at once (vectorised; sklearn's definitions:
    `normalized_mutual_info_score` with the arithmetic mean, `homogeneity_completeness_v_measure`
    with `labels_true` = a, natural logarithm).

    Args:
        labels_a / labels_b: [..., P] integer labels (any values).
    Returns:
        {"nmi", "homogeneity", "completeness", "v_measure"}: float64 tensors of the leading shape.
        With beta = 1 the V-measure equals the arithmetic NMI (sklearn documents this); both are kept
        because papers report either. Conventions as sklearn: both partitions one group -> 1;
        one entropy 0 -> homogeneity / completeness 1 for the side with no entropy.
    """
    shape = labels_a.shape[:-1]
    p = labels_a.shape[-1]
    a = labels_a.reshape(-1, p).long()
    b = labels_b.reshape(-1, p).long()
    groups = a.shape[0]
    group = torch.arange(groups, device=a.device).unsqueeze(1).expand(groups, p).reshape(-1)
    a, b = a.reshape(-1), b.reshape(-1)
    # relabel to 0..K-1 so that joint keys stay small
    a = torch.unique(a, return_inverse=True)[1]
    b = torch.unique(b, return_inverse=True)[1]
    n = float(p)
    h_a = _entropy_of_counts(group, a, groups, n)
    h_b = _entropy_of_counts(group, b, groups, n)
    joint = a * (b.max() + 1) + b
    h_ab = _entropy_of_counts(group, joint, groups, n)
    mi = (h_a + h_b - h_ab).clamp(min=0.0)
    tiny = 1e-12
    both_trivial = (h_a < tiny) & (h_b < tiny)
    mean = 0.5 * (h_a + h_b)
    nmi = torch.where(both_trivial, torch.ones_like(mi), mi / mean.clamp(min=tiny))
    homogeneity = torch.where(h_a < tiny, torch.ones_like(mi), mi / h_a.clamp(min=tiny))
    completeness = torch.where(h_b < tiny, torch.ones_like(mi), mi / h_b.clamp(min=tiny))
    denom = homogeneity + completeness
    v = torch.where(denom > 0, 2 * homogeneity * completeness / denom.clamp(min=tiny), torch.zeros_like(mi))
    out = {"nmi": nmi.clamp(0, 1), "homogeneity": homogeneity.clamp(0, 1), "completeness": completeness.clamp(0, 1),
           "v_measure": v.clamp(0, 1)}
    return {name: value.reshape(shape) for name, value in out.items()}


# ----------------------------------------------------------------------------------------------
# Fidelity to the dense model
# ----------------------------------------------------------------------------------------------

def logit_fidelity(dense_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: top-1 agreement with the dense prediction (bool) and KL(dense || reduced) of the
    softmax in nats. [B, classes] -> {"agree": [B] bool, "kl": [B] float64}."""
    log_d = torch.log_softmax(dense_logits.double(), dim=-1)
    log_r = torch.log_softmax(logits.double(), dim=-1)
    kl = (log_d.exp() * (log_d - log_r)).sum(-1).clamp(min=0.0)
    return {"agree": dense_logits.argmax(-1) == logits.argmax(-1), "kl": kl}


def summary_tokens(outputs: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor] | None, has_cls: bool,
                   prefix: int) -> list[torch.Tensor]:
    """Per block the [B, C] float64 feature that summarises each image: the class token, or, for a
    model without one, the mean of the patch tokens weighted by the patches each holds."""
    out = []
    for index, x in enumerate(outputs):
        if has_cls:
            out.append(x[:, 0].double())
            continue
        weight = (sizes[index][:, prefix:] if sizes is not None else torch.ones(x.shape[:2], device=x.device)[:, prefix:]).double()
        out.append((x[:, prefix:].double() * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp(min=1e-12))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, [B, C] -> [B] float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:
    """The unbiased HSIC estimator of Song et al. (2012), eq. 5, for n x n kernel matrices (n >= 4):
    1/(n(n-3)) [tr(K~ L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1], K~ = K with a zero diagonal."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {n}")
    k = k.double().clone()
    l = l.double().clone()
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    ones_k, ones_l = k.sum(0), l.sum(0)
    term1 = (k * l).sum()
    term2 = k.sum() * l.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones_k @ ones_l)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def linear_cka_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(HSIC(K, L), HSIC(K, K), HSIC(L, L)) of one minibatch with linear kernels K = X X', L = Y Y'.
    Summed over minibatches, CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L))
    (Nguyen et al. 2021, eq. 3): exact to merge, independent of the batch order."""
    x, y = x.double(), y.double()
    k, l = x @ x.T, y @ y.T
    return hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l)


def linear_cka(x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    """Linear CKA of features x [n, c1] and y [n, c2] from unbiased HSIC in minibatches of `batch`
    rows (None: one batch); minibatches smaller than 4 are left out."""
    n = x.shape[0]
    step = batch or n
    xy = xx = yy = 0.0
    for start in range(0, n, step):
        if min(step, n - start) < 4:
            continue
        a, b, c = linear_cka_terms(x[start:start + step], y[start:start + step])
        xy, xx, yy = xy + a, xx + b, yy + c
    return cka_from_sums(xy, xx, yy)


def cka_from_sums(xy: float, xx: float, yy: float) -> float:
    if xx <= 0 or yy <= 0:
        return float("nan")
    return float(xy / math.sqrt(xx * yy))


# ----------------------------------------------------------------------------------------------
# Map similarity (MIT saliency benchmark definitions, Bylinskii et al. 2019)
# ----------------------------------------------------------------------------------------------

def _as_map(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def map_kl(reference: Any, other: Any) -> float:
    """KL(reference || other) as the benchmark's KLdiv(saliencyMap=other, fixationMap=reference):
    both divided by their sums, then sum(Q log(eps + Q / (P + eps))), Q = reference, P = other."""
    q, p = _as_map(reference), _as_map(other)
    if q.sum() <= 0 or p.sum() <= 0:
        return float("nan")
    q, p = q / q.sum(), p / p.sum()
    return float(np.sum(q * np.log(EPS + q / (p + EPS))))


def map_js(a: Any, b: Any) -> float:
    """Jensen-Shannon divergence (nats) of the two maps divided by their sums: scipy's
    `jensenshannon` distance squared. Not a benchmark metric; the symmetric counterpart of KL."""
    from scipy.spatial.distance import jensenshannon

    p, q = _as_map(a).ravel(), _as_map(b).ravel()
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    return float(jensenshannon(p, q) ** 2)


def map_cc(a: Any, b: Any) -> float:
    """Pearson's linear correlation (the benchmark's CC: both maps standardised, then corr2);
    NaN when a map is constant."""
    p, q = _as_map(a).ravel(), _as_map(b).ravel()
    if p.std() == 0 or q.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, q)[0, 1])


def map_scc(a: Any, b: Any) -> float:
    """Spearman's rank correlation (`scipy.stats.spearmanr`); NaN when a map is constant."""
    from scipy.stats import spearmanr

    p, q = _as_map(a).ravel(), _as_map(b).ravel()
    if p.std() == 0 or q.std() == 0:
        return float("nan")
    return float(spearmanr(p, q).statistic)


def map_sim(a: Any, b: Any) -> float:
    """Histogram intersection (the benchmark's similarity): each map rescaled to [0, 1], divided by
    its sum, then sum(min(P, Q)). 1 for identical maps; a constant map (max = min) counts as uniform."""
    out = []
    for m in (_as_map(a), _as_map(b)):
        span = m.max() - m.min()
        m = (m - m.min()) / span if span > 0 else np.ones_like(m)
        out.append(m / m.sum())
    return float(np.minimum(out[0], out[1]).sum())


def map_emd(a: Any, b: Any, grid: tuple[int, int] | None = None) -> float:
    """Earth mover's distance between the two maps divided by their sums, with the Euclidean
    distance between patch centres (in patches) as the ground distance, as the benchmark's EMD
    (which uses FastEMD on the resized maps). Solved exactly as the transportation problem with
    `scipy.optimize.linprog` (HiGHS, sparse constraints; POT is not a dependency); the tests check it
    against `scipy.stats.wasserstein_distance_nd`, which solves the same problem with dense
    constraints and is about 100 times slower on a 14 x 14 grid. `grid`: (rows, columns); default
    the maps' shape."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    p, q = _as_map(a), _as_map(b)
    rows, cols = grid or (p.shape if p.ndim == 2 else (1, p.size))
    p, q = p.ravel(), q.ravel()
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    yy, xx = np.divmod(np.arange(rows * cols), cols)
    points = np.stack([yy, xx], axis=1).astype(np.float64)
    # With a metric ground distance the mass the two maps share stays in place in an optimal plan
    # (triangle inequality), so only the difference is transported: a far smaller problem, same value.
    diff = p / p.sum() - q / q.sum()
    keep_p, keep_q = np.flatnonzero(diff > 1e-15), np.flatnonzero(diff < -1e-15)
    if not len(keep_p) or not len(keep_q):
        return 0.0
    supply, demand = diff[keep_p], -diff[keep_q]
    demand = demand * (supply.sum() / demand.sum())  # equal totals to the last bit
    n, m = len(keep_p), len(keep_q)
    cost = np.linalg.norm(points[keep_p][:, None, :] - points[keep_q][None, :, :], axis=-1).ravel()
    flat = np.arange(n * m)
    out_rows = coo_matrix((np.ones(n * m), (flat // m, flat)), shape=(n, n * m))
    in_rows = coo_matrix((np.ones(n * m), (flat % m, flat)), shape=(m, n * m))
    # the last demand row follows from the others (both sides sum to 1): left out, HiGHS needs no redundancy
    constraints = vstack([out_rows, in_rows.tocsr()[:-1]]).tocsr()
    targets = np.concatenate([supply, demand[:-1]])
    solved = linprog(cost, A_eq=constraints, b_eq=targets, bounds=(0, None), method="highs")
    if not solved.success:
        raise ValueError(f"the EMD transport problem was not solved: {solved.message}")
    return float(solved.fun)


def map_similarity(a: Any, b: Any, grid: tuple[int, int] | None = None) -> dict[str, float]:
    """Every map metric between maps a (the reference, for KL) and b."""
    return {"KL": map_kl(a, b), "JS": map_js(a, b), "CC": map_cc(a, b), "SCC": map_scc(a, b),
            "EMD": map_emd(a, b, grid), "SIM": map_sim(a, b)}


# ----------------------------------------------------------------------------------------------
# Correlation with accuracy
# ----------------------------------------------------------------------------------------------

def rank_correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman's rho and Kendall's tau (tau-b) with their two-sided p-values (`scipy.stats`), over
    the pairs where both are finite; NaN with fewer than 3 pairs or a constant side."""
    from scipy.stats import kendalltau, spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    nan = float("nan")
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return {"spearman_rho": nan, "spearman_p": nan, "kendall_tau": nan, "kendall_p": nan, "n": int(len(x))}
    rho = spearmanr(x, y)
    tau = kendalltau(x, y)
    return {"spearman_rho": float(rho.statistic), "spearman_p": float(rho.pvalue), "kendall_tau": float(tau.statistic),
            "kendall_p": float(tau.pvalue), "n": int(len(x))}


# ----------------------------------------------------------------------------------------------
# Attention rollout through the reductions (Abnar & Zuidema 2020)
# ----------------------------------------------------------------------------------------------

def fuse_heads(attention: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """[B, H, N, N] -> [B, N, N] by the mean, max or min over heads."""
    if fusion == "mean":
        return attention.mean(1)
    if fusion == "max":
        return attention.amax(1)
    if fusion == "min":
        return attention.amin(1)
    raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {fusion!r}")


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest `ratio` of each image's fused attention entries, never the class token's
    attention to itself (entry [0, 0]), as the reference implementation (jacobgil/vit-explain,
    `vit_rollout.rollout`) does. [B, N, N] -> [B, N, N]."""
    if ratio <= 0:
        return attention
    if not 0 <= ratio < 1:
        raise ValueError(f"the discard ratio must be in [0, 1), got {ratio}")
    batch, n, _ = attention.shape
    flat = attention.reshape(batch, -1).clone()
    count = int(flat.shape[1] * ratio)
    if count:
        lowest = flat.topk(count, dim=-1, largest=False).indices
        keep_first = lowest == 0
        flat.scatter_(1, lowest, torch.where(keep_first, flat.gather(1, lowest), torch.zeros_like(flat.gather(1, lowest))))
    return flat.reshape(batch, n, n)


def stage_mixing(stage: Stage, before: torch.Tensor, n_in: int) -> torch.Tensor:
    """The token-level matrix of one reduction stage, [B, n_out, n_in] float64: output token j is
    sum_t M[j, t] * input token t (the shares of `Stage.patch_weight`, plus `patch_edges`); a
    discarded token has no output row. Derived from the provenance alone: `before` [B, P] is the
    patch -> token map entering the stage (the cls token, which holds no patch, stays token 0)."""
    batch = before.shape[0]
    n_out = stage.n_tokens
    mix = torch.zeros(batch, n_out, n_in, dtype=torch.float64, device=before.device)
    mix[:, 0, 0] = 1.0
    after = stage.patch_to_token
    present = (before >= 0) & (after >= 0)
    share = torch.nan_to_num(stage.patch_weight.double(), nan=0.0) if stage.patch_weight is not None else torch.ones_like(after, dtype=torch.float64)
    image = torch.arange(batch, device=before.device).unsqueeze(1).expand_as(before)
    # every patch of a token carries the same (token -> destination, share): writing them is idempotent
    mix[image[present], after[present], before[present]] = share[present]
    if stage.patch_edges is not None:
        patch, token, weight = stage.patch_edges
        used = patch >= 0
        b = torch.arange(batch, device=before.device).unsqueeze(1).expand_as(patch)[used]
        source = before[b, patch[used]]
        mix[b, token[used], source] = weight[used].double()
    return mix


def rollout(attentions: Sequence[torch.Tensor], stages: Sequence[Stage] = (), *, acts: str = "inside",
            fusion: str = "mean", discard_ratio: float = 0.0, num_patches: int | None = None,
            has_cls: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through a forward's reductions.

    R starts as the identity over [cls, patches]; each block multiplies it by its residual-corrected
    attention A~ = normalise_rows(0.5 A + 0.5 I) (heads fused, lowest entries discarded), and each
    reduction stage by its token mixing matrix (`stage_mixing`), before the block's attention for a
    method acting "before" the block, after it otherwise. A merged or fused token thus spreads over
    its member patches, and a discarded token stops receiving. With no stage it is the plain rollout.

    Args:
        attentions: per block the [B, H, N_l, N_l] post-softmax attention the block used, over the
            method's view [cls, patches] (`engine.run(..., keep_attention=True)`).
        stages: the forward's `Stage`s (`track=True`), in block order.
        acts: the method's `acts`: "before" and "attention" reduce the tokens the block's attention
            then mixes (the recorded attention is over the reduced tokens); "inside" reduces after it.
        fusion / discard_ratio: head fusion ("mean", "max", "min") and the share of lowest entries zeroed.
        num_patches: P (default: from the first attention matrix).
        has_cls: False for a model without a class token (its view's first slot is an empty
            placeholder): the map is then the mean of the patch tokens' rows (weighted by the patches
            each holds). Other prefix tokens (registers, distillation) are outside the view: attention
            flowing through them is left out.
    Returns:
        [B, P] float64: the class token's row of the rollout over the original patches, divided by its sum.
    """
    if fusion not in HEAD_FUSIONS:
        raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {fusion!r}")
    first = attentions[0]
    batch, n0 = first.shape[0], first.shape[-1]
    num_patches = num_patches or n0 - 1
    device = first.device
    result = torch.eye(num_patches + 1, dtype=torch.float64, device=device).expand(batch, -1, -1).clone()
    by_layer = {int(stage.layer): stage for stage in stages}
    p2t = torch.arange(1, num_patches + 1, device=device).expand(batch, num_patches).clone()

    def reduce(stage: Stage) -> None:
        nonlocal result, p2t
        mix = stage_mixing(stage, p2t.to(stage.patch_to_token.device), result.shape[1]).to(device)
        result = mix @ result
        p2t = stage.patch_to_token.to(device)

    first_reduce = acts in ("before", "attention")
    for index, attention in enumerate(attentions):
        layer = index + 1
        stage = by_layer.get(layer)
        if stage is not None and first_reduce:
            reduce(stage)
        a = fuse_heads(attention.double(), fusion)
        a = discard_lowest(a, discard_ratio)
        n = a.shape[-1]
        if n != result.shape[1]:
            raise ValueError(f"block {layer}'s attention covers {n} tokens but the rollout holds {result.shape[1]}: "
                             "give the stages of the same forward")
        a = 0.5 * a + 0.5 * torch.eye(n, dtype=a.dtype, device=device)
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-300)
        result = a @ result
        if stage is not None and not first_reduce:
            reduce(stage)
    if has_cls:
        row = result[:, 0, 1:]
    else:
        sizes = torch.zeros(batch, result.shape[1], dtype=torch.float64, device=device)
        sizes.scatter_add_(1, p2t.clamp(min=0), (p2t >= 0).double())
        sizes[:, 0] = 0.0
        row = (sizes.unsqueeze(-1) * result).sum(1)[:, 1:]
    return row / row.sum(-1, keepdim=True).clamp(min=1e-300)


def rollout_overlap(rollout_map: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per image, the share of the k patches with the highest rollout that the method kept with a
    token of their own, k = the number it kept (1 when it kept every patch). [B, P] x [B, P] -> [B]."""
    k = own.sum(-1)
    order = rollout_map.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    top = rank < k.unsqueeze(1)
    hits = (top & own).sum(-1).double()
    return torch.where(k > 0, hits / k.clamp(min=1).double(), torch.full_like(hits, float("nan")))


def image_rollout(model: torch.nn.Module, images: torch.Tensor, plan, extras: dict[str, Any] | None = None,
                  fusion: str = "mean", discard_ratio: float = 0.0) -> dict[str, torch.Tensor]:
    """Rollout of `images` through `plan`'s reductions, the dense rollout, and the overlap scores.

    One forward with the plan (`keep_attention=True`, `track=True`) and one dense forward.
    Returns {"rollout": [B, P] through the reductions, "dense_rollout": [B, P], "kept": [B, P] bool
    (patches with their own token after the last block), "overlap": [B] (`rollout_overlap` of the
    method's own rollout with its kept patches), "dense_overlap": [B] (the same with the dense rollout)}.
    Raises PlanError as `engine.run`; ValueError for a bad fusion or discard ratio.
    """
    from .engine import run
    from .plan import ReductionPlan

    if fusion not in HEAD_FUSIONS:
        raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {fusion!r}")
    result = run(model, images, plan, extras=extras, track=True, keep_attention=True)
    dense = run(model, images, ReductionPlan(), extras=extras, track=False, keep_attention=True)
    spec = plan.spec()
    acts = spec.acts if spec is not None else "inside"
    num_patches = int(model.patch_embed.num_patches)
    has_cls = getattr(model, "cls_token", None) is not None
    mine = rollout(result.attentions, result.stages, acts=acts, fusion=fusion, discard_ratio=discard_ratio, num_patches=num_patches,
                   has_cls=has_cls)
    plain = rollout(dense.attentions, (), fusion=fusion, discard_ratio=discard_ratio, num_patches=num_patches, has_cls=has_cls)
    own, _ = block_states(result.stages, len(model.blocks), images.shape[0], num_patches, mine.device)
    kept = own[:, -1]
    return {"rollout": mine, "dense_rollout": plain, "kept": kept, "overlap": rollout_overlap(mine, kept),
            "dense_overlap": rollout_overlap(plain, kept)}
