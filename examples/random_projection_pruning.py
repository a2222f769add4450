"""A token-pruning method written outside tokenscope: the worked example of README's "Write your own
method" section, and the plugin the tests load.

Run it like a built-in method:

    python -m analysis --plugin examples/random_projection_pruning.py inspect IMAGE --method random_projection --json
    TOKENSCOPE_PLUGINS=examples/random_projection_pruning.py streamlit run app.py

At each reducing layer it scores every non-cls token by its projection on a seeded random direction
and keeps the `ceil(rho n)` highest (a deliberately naive pruner: a sanity floor, not a method).
"""
from __future__ import annotations

import torch

from analysis.methods.base import (
    ComparisonEntry,
    Method,
    ParamSpec,
    ReduceContext,
    StageShape,
    TokenAssignment,
    keep_assignment,
    kept_count,
    register,
)


@register
class RandomProjectionPruning(Method):
    name = "random_projection"
    label = "Random projection (plugin example)"
    paper = "tokenscope's plugin example (examples/random_projection_pruning.py)"
    needs = frozenset()  # nothing from the attention: it reads the hidden states only
    params = (ParamSpec("seed", 0, "int", "Seed of the random direction (stage s uses seed + s).", minimum=0),)
    comparison = (ComparisonEntry("importance-diversity", 90, "plugin: random projection"),)

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """Keep the ceil(rho n) tokens with the largest projection x . u on a random unit direction u;
        output [cls, kept (descending projection)]; the rest are dropped."""
        batch, n_tokens, channels = ctx.x.shape
        n = n_tokens - 1
        k = kept_count(ctx.keep_rate, n)
        if k == n:
            return None
        generator = torch.Generator().manual_seed(ctx.params["seed"] + ctx.stage)
        direction = torch.randn(channels, 1, generator=generator)
        direction = (direction / direction.norm()).to(ctx.x)
        score = (ctx.x[:, 1:] @ direction).squeeze(-1)  # [B, n]: one matrix product, n C MACs per image
        kept = torch.topk(score.float(), k, dim=1).indices + 1
        return keep_assignment(kept, n_tokens)

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The projection of every non-cls token: n C multiply-adds, when the stage acts."""
        return (float(shape.n_in * shape.channels) if shape.acted else 0.0), 0.0
