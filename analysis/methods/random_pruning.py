"""Random pruning: keep a seeded random subset of the tokens (Haurum et al., "Which Tokens to Use?
Investigating Token Reduction in Vision Transformers", ICCV 2023 Workshops, the "Random" baseline;
spec: methods.md §15).

At each reducing layer (default 4, 7, 10), inside the block after the attention residual, the
`ceil(keep_rate * n)` kept non-cls tokens are the first ones of a random permutation of the n
current positions; the others are discarded. The budget is EViT's selection without fusion, so the
method is the chance baseline of every importance score at the same token counts.

Determinism [choice, methods.md §15]: the permutation is drawn on the CPU by a `torch.Generator`
seeded with `seed * 2**16 + stage` (stage = the 0-based index among the plan's reducing layers) and
then moved to the device, so the same seed gives the same kept positions on every run and every
device. It is one permutation of *positions* shared by every image of the batch: an image's kept
set never depends on which other images share its batch (it is the same alone and in any batch),
and two images keep the same patches. Different seeds give different sets.
"""
from __future__ import annotations

import torch

from .base import ComparisonEntry, Method, ParamSpec, ReduceContext, TokenAssignment, keep_assignment, kept_count, register

STAGE_STRIDE = 2 ** 16  # seeds of consecutive stages never collide for plans with fewer reducing layers


def random_positions(seed: int, stage: int, n: int, k: int) -> torch.Tensor:
    """The k kept positions among n non-cls tokens at one stage, ascending: [k] long, 0-based.

    The first k entries of `torch.randperm(n)` under a CPU generator seeded with
    `seed * 2**16 + stage` (methods.md §15), sorted (the kept tokens keep their order)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed) * STAGE_STRIDE + int(stage))
    return torch.sort(torch.randperm(n, generator=generator)[:k]).values


@register
class RandomPruning(Method):
    name = "rand"
    rank = 12
    label = "Random"
    paper = "Random, Haurum et al., \"Which Tokens to Use?\", ICCVW 2023"
    acts = "inside"
    default_layers = (4, 7, 10)
    needs = frozenset()
    colour = "#7f7f7f"
    marker = "x"
    comparison = (ComparisonEntry("pruning", 2, "Random"),)
    params = (
        ParamSpec("seed", 0, "int",
                  "Seed of the random kept set: the same seed keeps the same token positions on every run, device and batch "
                  "(a sweep given a comma list, e.g. 0,1,2, runs each seed; the figures show their mean).",
                  minimum=0, maximum=2 ** 40, averaged=True),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """One stage: keep `ceil(keep_rate * n)` random positions (ascending), discard the rest."""
        batch, n_tokens, _ = ctx.x.shape
        n = n_tokens - 1
        k = kept_count(ctx.keep_rate, n)
        if k >= n:
            return None
        kept = random_positions(ctx.params["seed"], ctx.stage, n, k).to(ctx.x.device) + 1
        return keep_assignment(kept.unsqueeze(0).expand(batch, k).contiguous(), n_tokens)
