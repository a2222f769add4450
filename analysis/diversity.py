"""The diversity score r(Z) of a token sequence (BAT, "Beyond Attentive Tokens"; methods.md §5).

    r(Z) = || Z - 1 z^T ||_1,   z = argmin_{z'} || Z - 1 z'^T ||_1

with `Z [N, C]` the non-cls tokens and `||.||_1` the sum of absolute entries. With the centre `z`
restricted to one of the tokens (BAT's definition, the default "medoid" centre) this is
`r(Z) = min_j sum_i ||Z_i - Z_j||_1`. With a free centre ("median") the optimum is the channel-wise
median, and `r_median <= r_medoid <= 2 r_median`.

Size weighting (our definition): a token that holds `s_i` original patches counts `s_i` times,
    r_w(Z) = min_j sum_i s_i ||Z_i - Z_j||_1     (medoid)
    r_w(Z) = sum_i s_i ||Z_i - m_w||_1           (median; m_w the channel-wise weighted median)
so a merged token weighs what its patches would have weighed unmerged. Per-token normalisation
divides by the number of rows (unweighted) or by the total weight `sum_i s_i` (weighted), so that
sequences of different lengths compare.

Computation, exact and in float64, vectorised over the batch (no Python loop over tokens):
- up to `SORT_ABOVE` tokens: all pairwise l1 distances with `torch.cdist(p=1)`, in chunks of
  candidates (O(N^2 C); the fastest on CPU and GPU at ViT sizes);
- longer sequences: per channel, `sum_i w_i |z_i - z_j|` for every `j` from the values sorted once
  and prefix sums of `w` and `w z` (O(C N log N)); summed over channels it gives each candidate's
  cost. The tests check both against a brute-force loop.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

CENTRES = ("medoid", "median")
SORT_ABOVE = 1024  # tokens; beyond this the O(N log N) sorted form beats the pairwise distances


def _validate(tokens: torch.Tensor, sizes: torch.Tensor | None, centre: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {', '.join(CENTRES)}, got {centre!r}")
    single = tokens.dim() == 2
    if single:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [N, C] or [B, N, C], got shape {tuple(tokens.shape)}")
    z = tokens.detach().to(torch.float64)
    if sizes is None:
        weights = torch.ones(z.shape[:2], dtype=torch.float64, device=z.device)
    else:
        weights = sizes.detach().to(device=z.device, dtype=torch.float64)
        if single and weights.dim() == 1:
            weights = weights.unsqueeze(0)
        if weights.shape != z.shape[:2]:
            raise ValueError(f"sizes must be [N] or [B, N] matching tokens, got {tuple(sizes.shape)} for tokens {tuple(tokens.shape)}")
        if (weights < 0).any():
            raise ValueError("sizes must be non-negative")
    return z, weights, single


def candidate_costs(tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """For every token j, the weighted l1 cost of using it as the centre: `sum_i s_i ||Z_i - Z_j||_1`.

    Args:
        tokens: [B, N, C] (any float dtype; computed in float64).
        sizes: [B, N] non-negative weights, or None for 1.
    Returns:
        [B, N] float64.
    """
    if tokens.shape[-2] > SORT_ABOVE:
        return sorted_candidate_costs(tokens, sizes)
    return pairwise_l1_cost(tokens, sizes)


def sorted_candidate_costs(tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """`candidate_costs` by sorting each channel once and prefix sums, O(C N log N). Same args / returns."""
    z, w, _ = _validate(tokens, sizes, "medoid")
    values, order = z.sort(dim=1)                                   # [B, N, C] per channel
    w_sorted = w.unsqueeze(-1).expand_as(z).gather(1, order)         # weights in each channel's order
    cum_w = w_sorted.cumsum(1)
    cum_wz = (w_sorted * values).cumsum(1)
    total_w = cum_w[:, -1:]
    total_wz = cum_wz[:, -1:]
    # Tokens at or below position p contribute z_p * W_le - WZ_le; tokens above contribute WZ_gt - z_p * W_gt.
    below = values * cum_w - cum_wz
    above = (total_wz - cum_wz) - values * (total_w - cum_w)
    cost_sorted = below + above
    cost = torch.empty_like(cost_sorted).scatter_(1, order, cost_sorted)  # back to token order
    return cost.sum(-1)


def pairwise_l1_cost(tokens: torch.Tensor, sizes: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """`candidate_costs` from all pairwise l1 distances, `torch.cdist(p=1)` in chunks of `chunk`
    candidates, O(N^2 C). Same args / returns."""
    z, w, _ = _validate(tokens, sizes, "medoid")
    out = []
    for start in range(0, z.shape[1], chunk):
        distances = torch.cdist(z[:, start:start + chunk], z, p=1)     # [B, chunk, N]
        out.append((distances * w.unsqueeze(1)).sum(-1))
    return torch.cat(out, 1)


def weighted_median(tokens: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """The channel-wise (weighted) median of the tokens, a minimiser of `sum_i s_i ||Z_i - m||_1`.

    Args:
        tokens: [B, N, C]; sizes: [B, N] or None.
    Returns:
        [B, C] float64: per channel the smallest value whose cumulative weight reaches half the total
        (the lower median when unweighted and N is even; every value between the two middle ones is
        optimal).
    """
    z, w, _ = _validate(tokens, sizes, "median")
    values, order = z.sort(dim=1)
    cum_w = w.unsqueeze(-1).expand_as(z).gather(1, order).cumsum(1)
    half = cum_w[:, -1:] / 2
    index = (cum_w < half - 1e-12 * cum_w[:, -1:].abs().clamp(min=1)).sum(1, keepdim=True).clamp(max=z.shape[1] - 1)
    return values.gather(1, index).squeeze(1)


def diversity_score(
    tokens: torch.Tensor,
    centre: str = "medoid",
    per_token: bool = False,
    sizes: torch.Tensor | None = None,
) -> float | torch.Tensor:
    """The diversity score r(Z) (methods.md §5) of the non-cls tokens `tokens`.

    Args:
        tokens: [N, C] or [B, N, C] token features (pass tokens 1: of a sequence, without cls).
        centre: "medoid" (one of the tokens, BAT's definition) or "median" (free centre: the
            channel-wise median, weighted when `sizes` is given).
        per_token: divide by the number of tokens (or by the total size when weighted).
        sizes: optional [N] or [B, N] patches held per token (size weighting, see module docstring).
    Returns:
        a float for a single [N, C] input, else a [B] float64 tensor; l1 units of the features.
    Raises:
        ValueError: an unknown centre or mismatched shapes.
    """
    z, w, single = _validate(tokens, sizes, centre)
    if z.shape[1] == 0:
        score = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    elif centre == "medoid":
        score = candidate_costs(z, w).min(dim=1).values
    else:
        median = weighted_median(z, w)
        score = ((z - median.unsqueeze(1)).abs().sum(-1) * w).sum(-1)
    if per_token:
        score = score / w.sum(-1).clamp(min=torch.finfo(torch.float64).tiny)
    return float(score[0]) if single else score.cpu()


def diversity_of_blocks(
    block_outputs: list[torch.Tensor],
    block_sizes: list[torch.Tensor] | None = None,
    centre: str = "medoid",
    size_weighted: bool = False,
    prefix: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(raw, per-token) r(Z) (methods.md §5; BAT, Long et al., CVPR 2023) of every block's output,
    from lists of block tensors rather than an engine `Result`.

    Each block's `prefix` tokens (the class token, and distillation or register tokens) are left
    out; per-token values divide the raw ones by the number of other tokens, or by their total size
    when `size_weighted`.

    Args:
        block_outputs: per block, the [B, N_i, C] tokens leaving it, cls token at index 0 (any
            float dtype and device; computed in float64).
        block_sizes: per block, the [B, N_i] patches held by each token (cls included); needed
            only when `size_weighted`.
        centre: "medoid" or "median", as `diversity_score`.
        size_weighted: weight the tokens by `block_sizes`.
    Returns:
        (raw, per_token), each a [B, depth] float64 numpy array.
    Raises:
        ValueError: no blocks, `size_weighted` without one sizes tensor per block, an unknown
            centre or mismatched shapes.
    """
    if not block_outputs:
        raise ValueError("no block outputs given")
    if size_weighted and (block_sizes is None or len(block_sizes) != len(block_outputs)):
        raise ValueError("size_weighted needs one sizes tensor per block output")
    columns, totals = [], []
    for index, output in enumerate(block_outputs):
        sizes = block_sizes[index][:, prefix:] if size_weighted else None
        columns.append(diversity_score(output[:, prefix:], centre=centre, per_token=False, sizes=sizes).numpy())
        if size_weighted:
            totals.append(sizes.double().sum(1).cpu().numpy())
        else:
            totals.append(np.full(output.shape[0], output.shape[1] - prefix, dtype=np.float64))
    raw = np.stack(columns, axis=1)
    return raw, raw / np.maximum(np.stack(totals, axis=1), np.finfo(np.float64).tiny)


def diversity_per_block_both(result: Any, centre: str = "medoid", size_weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(raw, per-token) r(Z) of every block's output, [B, depth] each, from one computation
    (`diversity_of_blocks` on `result.block_outputs` and `result.block_sizes`).

    The per-token value divides by the number of non-cls tokens (or their total size when
    `size_weighted`). Raises ValueError when the result kept no block outputs.
    """
    if result.block_outputs is None:
        raise ValueError("the result has no block outputs: run the engine with keep_block_outputs=True")
    return diversity_of_blocks(result.block_outputs, result.block_sizes, centre, size_weighted, result.num_prefix_tokens)


def diversity_per_block(result: Any, centre: str = "medoid", per_token: bool = False, size_weighted: bool = False) -> np.ndarray:
    """r(Z) of every block's output (non-cls tokens 1:) for every image of a batch.

    Args:
        result: an `analysis.engine.Result` from `run(..., keep_block_outputs=True)`.
        centre, per_token: as `diversity_score`.
        size_weighted: weight tokens by `result.block_sizes` (patches held).
    Returns:
        [B, depth] float64 numpy array.
    Raises:
        ValueError: the result kept no block outputs.
    """
    if result.block_outputs is None:
        raise ValueError("the result has no block outputs: run the engine with keep_block_outputs=True")
    raw, normalised = diversity_of_blocks(result.block_outputs, result.block_sizes, centre, size_weighted,
                                          result.num_prefix_tokens)
    return normalised if per_token else raw
