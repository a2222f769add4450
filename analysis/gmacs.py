"""GMACs of a reduction plan, from the real per-block token counts (methods.md §8).

Convention: one multiply-add = one MAC (fvcore / torchprofile; what the papers call "FLOPs"), per
image. Counted, per block, from the token count the attention and the MLP really see:

- attention projections: `qkv` (N C 3C) and `proj` (N C C), from the modules' real shapes;
- attention products: Q K^T and P V, `2 N^2 C` (all heads together);
- MLP: `fc1` and `fc2` (N C 4C each for ViT);
- the patch embedding (a convolution) and the classifier head;
- the class-attention row at a reducing block of a method that scores by it (`(N) C`);
- the method's own work (see `method_macs`), split into matrix products (class-attention row,
  similarity matrices, bipartite scores, predictor layers), pairwise distance matrices (DPC-kNN)
  and element-wise work (weighted sums of fused, squeezed or merged tokens).

Not counted (as in fvcore's defaults that the papers used): LayerNorm, softmax, GELU, additions,
top-k and sorting. `torch.utils.flop_counter.FlopCounterMode` counts only matrix products and
convolutions (including `scaled_dot_product_attention`, not `torch.cdist`), so its total / 2 must
equal `MACsBreakdown.matmul` (tests/test_gmacs.py checks every method within 2 %; they agree exactly).

Token counts come from one engine forward of a single seeded dummy image (`track=False`): every
method here keeps a fixed count per stage, so one image gives the counts of every image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .engine import ReductionPlan, run
from .methods import get_method, kept_count


@dataclass
class BlockMACs:
    """MACs of one block for one image.

    Attributes:
        layer: 1-based block index.
        tokens_attention: tokens (cls included) entering the attention.
        tokens_mlp: tokens (cls included) entering the MLP.
        attention_linear: qkv and output projection MACs.
        attention_products: Q K^T and P V MACs.
        mlp: fc1 and fc2 MACs.
        method_matmul: the reduction's own matrix products (class-attention row, similarities,
            bipartite scores, predictor layers).
        method_distances: the reduction's pairwise distance matrices (DPC-kNN's `torch.cdist`,
            N^2 C), counted as MACs like a product; FlopCounterMode does not see `cdist`.
        method_elementwise: the reduction's own element-wise multiply-adds (weighted sums).
    """

    layer: int
    tokens_attention: int
    tokens_mlp: int
    attention_linear: float = 0.0
    attention_products: float = 0.0
    mlp: float = 0.0
    method_matmul: float = 0.0
    method_distances: float = 0.0
    method_elementwise: float = 0.0

    @property
    def total(self) -> float:
        return (self.attention_linear + self.attention_products + self.mlp + self.method_matmul + self.method_distances
                + self.method_elementwise)


@dataclass
class MACsBreakdown:
    """Per-image MACs of a plan: `total` (everything counted) and `matmul` (what FlopCounterMode sees:
    products and convolutions, without the element-wise work and the `cdist` distance matrices)."""

    plan: ReductionPlan
    patch_embed: float
    head: float
    blocks: list[BlockMACs] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.patch_embed + self.head + sum(block.total for block in self.blocks)

    @property
    def matmul(self) -> float:
        return self.total - sum(block.method_elementwise + block.method_distances for block in self.blocks)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    @property
    def method_share(self) -> float:
        """The fraction of `total` spent on the reduction itself."""
        own = sum(block.method_matmul + block.method_distances + block.method_elementwise for block in self.blocks)
        return own / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "gmacs": self.gmacs,
            "patch_embed": self.patch_embed,
            "head": self.head,
            "blocks": [dict(vars(block), total=block.total) for block in self.blocks],
        }


@dataclass(frozen=True)
class StageShape:
    """What a method's cost depends on at one reducing block.

    Attributes:
        n_in / n_out: non-cls tokens before and after the reduction.
        channels: C; heads: H (head dim C / H).
        keep_rate: the plan's keep rate; params: the method's parameters (defaults filled in).
        acted: False when the stage changed nothing (e.g. keep rate 1.0).
    """

    n_in: int
    n_out: int
    channels: int
    heads: int
    keep_rate: float
    params: dict[str, Any]
    acted: bool


def _predictor(s: StageShape) -> float:
    # methods.md §3: Linear(C,C), Linear(C,C/2), Linear(C/2,C/4), Linear(C/4,2) on every token
    c = s.channels
    return s.n_in * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)


def _squeeze(s: StageShape) -> tuple[float, float]:
    # cosine similarity of the m pruned tokens to the k hosts, then each host's weighted mix
    m = s.n_in - s.n_out
    return m * s.n_out * s.channels, (m + s.n_out) * s.channels


def _evit(s: StageShape) -> tuple[float, float]:
    fused = (s.n_in - kept_count(s.keep_rate, s.n_in)) * s.channels if s.acted and s.params.get("fuse", True) else 0
    return 0.0, fused


def _etps(s: StageShape) -> tuple[float, float]:
    return _squeeze(s) if s.acted else (0.0, 0.0)


def _dtps(s: StageShape) -> tuple[float, float]:
    matmul, elementwise = _squeeze(s) if s.acted else (0, 0)
    return _predictor(s) + matmul, elementwise


def _dynamicvit(s: StageShape) -> tuple[float, float]:
    return _predictor(s), 0.0


def _bat(s: StageShape) -> tuple[float, float, float]:
    if not s.acted:
        return 0.0, 0.0, 0.0
    attentive = kept_count(s.keep_rate, s.n_in)
    inattentive = s.n_in - attentive
    d = s.channels if s.params.get("match_on") == "hidden" else s.channels // s.heads
    distances = inattentive * inattentive * s.channels               # DPC-kNN on the inattentive tokens
    matching = math.ceil(attentive / 2) * (attentive // 2) * d        # bipartite matching on the attentive keys
    return matching, s.n_in * s.channels, distances                   # every token enters one weighted mean


def _dpc(s: StageShape) -> tuple[float, float, float]:
    if not s.acted:
        return 0.0, 0.0, 0.0
    return 0.0, s.n_in * s.channels, s.n_in * s.n_in * s.channels


def _tome(s: StageShape) -> tuple[float, float]:
    if not s.acted:
        return 0.0, 0.0
    n = s.n_in + 1                                                    # ToMe's split includes cls
    d = s.channels // s.heads
    return math.ceil(n / 2) * (n // 2) * d, (s.n_in - s.n_out) * s.channels


# The reduction's own work per method name: StageShape -> (matrix products, element-wise[, distances]) MACs.
# A method class may instead define `own_macs(stage_shape)` returning the same tuple.
METHOD_WORK: dict[str, Callable[[StageShape], tuple[float, float]]] = {
    "evit": _evit,
    "etps": _etps,
    "dtps": _dtps,
    "dynamicvit": _dynamicvit,
    "bat": _bat,
    "dpc": _dpc,
    "tome": _tome,
}


def method_macs(method_name: str, shape: StageShape) -> tuple[float, float, float]:
    """The reduction's own MACs at one stage: (matrix products, element-wise, distance matrices), per image.

    Uses the method's `own_macs` when it defines one, else `METHOD_WORK`; an unknown method
    without either is counted as free (0, 0, 0).
    """
    method = get_method(method_name)
    own = getattr(method, "own_macs", None)
    work = own if callable(own) else METHOD_WORK.get(method_name)
    if work is None:
        return 0.0, 0.0, 0.0
    values = [float(v) for v in work(shape)]
    return values[0], values[1], values[2] if len(values) > 2 else 0.0


def _dummy_image(model: torch.nn.Module) -> torch.Tensor:
    size = model.patch_embed.img_size
    height, width = (size, size) if isinstance(size, int) else size
    in_chans = model.patch_embed.proj.in_channels
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, in_chans, height, width, generator=generator)
    parameter = next(model.parameters())
    return image.to(device=parameter.device, dtype=parameter.dtype)


def token_counts(model: torch.nn.Module, plan: ReductionPlan, extras: dict[str, Any] | None = None) -> list[int]:
    """Tokens (cls included) leaving each block under `plan`, from one dummy forward (none for the dense model)."""
    if plan.is_dense:
        return [model.patch_embed.num_patches + 1] * len(model.blocks)
    return run(model, _dummy_image(model), plan, extras=extras, track=False).token_counts


def _linear_macs(module: torch.nn.Module) -> float:
    return float(module.in_features * module.out_features) if isinstance(module, torch.nn.Linear) else 0.0


def plan_macs(model: torch.nn.Module, plan: ReductionPlan, extras: dict[str, Any] | None = None,
              counts: list[int] | None = None) -> MACsBreakdown:
    """Per-image MACs of `plan` on `model`, block by block (methods.md §8).

    Args:
        model: a timm ViT with one class token (any weights, random included).
        plan: the reduction plan (validated against the model).
        extras: method weights, as for `engine.run` (dTPS / DynamicViT need their predictor).
        counts: tokens leaving each block, if already known (e.g. `Result.token_counts`);
            otherwise one dummy forward finds them.
    Returns:
        a `MACsBreakdown`.
    Raises:
        PlanError: the plan does not fit the model or the method cannot run.
    """
    depth = len(model.blocks)
    plan.validate(depth)
    counts = list(counts) if counts is not None else token_counts(model, plan, extras)
    embed = model.patch_embed
    n0 = embed.num_patches + 1
    kernel = embed.proj.weight
    patch_embed = float(embed.num_patches * kernel.numel())
    head = _linear_macs(getattr(model, "head", None))
    breakdown = MACsBreakdown(plan=plan, patch_embed=patch_embed, head=head)
    method = None if plan.is_dense else get_method(plan.method)
    layers = plan.reducing_layers(depth)
    params = plan.param_dict()
    previous = n0
    for index, block in enumerate(model.blocks):
        layer = index + 1
        after = counts[index]
        reducing = method is not None and layer in layers
        # A method acting inside a block reduces between attention and MLP; one acting before a
        # block reduces its input, so the attention already sees the reduced count.
        n_attention = after if (reducing and method.acts == "before") else previous
        attn = block.attn
        width = attn.num_heads * attn.head_dim
        entry = BlockMACs(layer=layer, tokens_attention=n_attention, tokens_mlp=after)
        entry.attention_linear = n_attention * (_linear_macs(attn.qkv) + _linear_macs(attn.proj))
        entry.attention_products = 2.0 * n_attention * n_attention * width
        entry.mlp = after * sum(_linear_macs(m) for m in block.mlp.modules() if isinstance(m, torch.nn.Linear))
        if reducing:
            shape = StageShape(
                n_in=previous - 1, n_out=after - 1, channels=int(model.embed_dim), heads=int(attn.num_heads),
                keep_rate=plan.keep_rate, params=params, acted=after != previous,
            )
            entry.method_matmul, entry.method_elementwise, entry.method_distances = method_macs(plan.method, shape)
            if method.acts == "inside" and method.needs_cls_attention:
                # the engine computes the class-attention row on its own: q_cls k^T, (n + 1) d per head
                entry.method_matmul += n_attention * width
        breakdown.blocks.append(entry)
        previous = after
    return breakdown


def plan_gmacs(model: torch.nn.Module, plan: ReductionPlan, extras: dict[str, Any] | None = None,
               counts: list[int] | None = None) -> float:
    """GMACs per image of `plan` on `model` (methods.md §8): `plan_macs(...).total / 1e9`.

    Reproduces the published figures: DeiT-T/S/B dense 1.3/4.6/17.6; EViT keep 0.7 on DeiT-T/S/B
    0.8/3.0/11.6; EViT on DeiT-S at 0.9/0.8/0.6/0.5: 4.0/3.5/2.6/2.3 (rounded to one decimal).
    """
    return plan_macs(model, plan, extras, counts).gmacs


def gmacs_report(model: torch.nn.Module, plan: ReductionPlan, extras: dict[str, Any] | None = None,
                 counts: list[int] | None = None) -> dict[str, float]:
    """`{"gmacs", "dense_gmacs", "reduction_pct"}` for one plan: what the CLI JSON and the app show."""
    gmacs = plan_gmacs(model, plan, extras, counts)
    dense = plan_gmacs(model, ReductionPlan())
    return {"gmacs": gmacs, "dense_gmacs": dense, "reduction_pct": 100.0 * (1.0 - gmacs / dense)}
