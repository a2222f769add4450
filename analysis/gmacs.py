"""GMACs of a reduction plan, from the real per-block token counts (methods.md §8).

Convention: one multiply-add = one MAC (fvcore / torchprofile; what the papers call "FLOPs"), per
image. Counted, per block, from the token count the attention and the MLP really see:

- attention projections: `qkv` (N C 3C) and `proj` (N C C), from the modules' real shapes;
- attention products: Q K^T and P V, `2 N^2 C` (all heads together); a method acting on the block's
  own attention (`acts = "attention"`) reads Q K^T of the unreduced tokens and hands its reduced
  attention to P V, so q, k and Q K^T count at the tokens entering the block, v, P V and the
  projection at the reduced count (a method that hands no attention on is not counted apart);
- MLP: `fc1` and `fc2` (N C 4C each for ViT);
- the patch embedding (a convolution) and the classifier head;
- the class-attention row at a reducing block of a method that scores by it (`(N) C`), or the full
  attention matrix (`N^2 C`) for one that asks for it; nothing for a method that transforms the
  attention (`transform_attention`): the engine then computes the block's probabilities explicitly
  and reads what the method needs from them;
- the method's own work (its `own_macs`, see `method_macs`), split into matrix products (class-attention row,
  similarity matrices, bipartite scores, predictor layers), pairwise distance matrices (DPC-kNN)
  and element-wise work (weighted sums of fused, squeezed or merged tokens).

Not counted (as in fvcore's defaults that the papers used): LayerNorm, softmax, GELU, additions,
top-k and sorting. `torch.utils.flop_counter.FlopCounterMode` counts only matrix products and
convolutions (including `scaled_dot_product_attention`, which `flop_counter` makes sure of; not
`torch.cdist`), so its total / 2 must equal `MACsBreakdown.matmul` (tests/test_gmacs.py checks every
method within 2 %; they agree exactly).

Token counts come from one engine forward of a single seeded dummy image (`track=False`): every
method here keeps a fixed count per stage, so one image gives the counts of every image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import run
from .methods.base import StageShape
from .plan import ReductionPlan
from .registry import get_method


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


def method_macs(method_name: str, shape: StageShape) -> tuple[float, float, float]:
    """The reduction's own MACs at one stage: (matrix products, element-wise, distance matrices), per
    image, from the method's `own_macs` (a missing third entry is 0)."""
    values = [float(v) for v in get_method(method_name).own_macs(shape)]
    values += [0.0] * (3 - len(values))
    return values[0], values[1], values[2]


def needs_macs(needs: frozenset[str], n_tokens: int, width: int, has_class_token: bool = True) -> float:
    """MACs of what the engine computes for a method's `needs` at one block (methods.md §8), per
    image: the full attention matrix Q K^T (N^2 C) when asked for, or when a model without a class
    token needs the class-attention substitute (the mean attention received, methods.md §1); else
    the class-attention row (N C) when that is asked for; head averages of keys, queries and values
    are additions (free)."""
    rows = bool(needs & {"cls_attention", "cls_attention_heads"})
    if "attention" in needs or (rows and not has_class_token):
        return float(n_tokens * n_tokens * width)
    if rows:
        return float(n_tokens * width)
    return 0.0


def head_macs(model: torch.nn.Module, n_tokens: int) -> float:
    """MACs of the classifier head on `n_tokens` tokens leaving the last block (prefix included):
    the linear head (and DeiT's distillation head), and SigLIP's attention pool (MAP: the latent's
    query, keys and values of the pooled tokens, its two attention products, projection and MLP)."""
    macs = _linear_macs(getattr(model, "head", None)) + _linear_macs(getattr(model, "head_dist", None))
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        n = n_tokens if getattr(model, "pool_include_prefix", False) else n_tokens - int(getattr(model, "num_prefix_tokens", 0))
        latent, width = int(pool.latent_len), int(pool.num_heads * pool.head_dim)
        macs += latent * _linear_macs(pool.q) + n * _linear_macs(pool.kv) + 2.0 * latent * n * width + latent * _linear_macs(pool.proj)
        if pool.mlp is not None:
            macs += latent * sum(_linear_macs(m) for m in pool.mlp.modules() if isinstance(m, torch.nn.Linear))
    return float(macs)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """A `torch.utils.flop_counter.FlopCounterMode` (display off) that also counts the CPU's fused
    attention kernel: some torch releases (2.14) count `scaled_dot_product_attention` only on CUDA,
    so on the CPU they miss the 2 N^2 C attention products of every block. FLOPs = 2 x MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is not None:
        mapping[cpu_op] = _sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


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
        return [model.patch_embed.num_patches + int(getattr(model, "num_prefix_tokens", 1))] * len(model.blocks)
    return run(model, _dummy_image(model), plan, extras=extras, track=False).token_counts


def _linear_macs(module: torch.nn.Module) -> float:
    return float(module.in_features * module.out_features) if isinstance(module, torch.nn.Linear) else 0.0


def plan_macs(model: torch.nn.Module, plan: ReductionPlan, extras: dict[str, Any] | None = None,
              counts: list[int] | None = None) -> MACsBreakdown:
    """Per-image MACs of `plan` on `model`, block by block (methods.md §8).

    Args:
        model: a timm ViT (any prefix tokens, any weights, random included).
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
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    has_class_token = getattr(model, "cls_token", None) is not None
    n0 = embed.num_patches + prefix
    kernel = embed.proj.weight
    patch_embed = float(embed.num_patches * kernel.numel())
    breakdown = MACsBreakdown(plan=plan, patch_embed=patch_embed, head=head_macs(model, counts[-1]))
    method = plan.spec()
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
        if reducing and method.acts == "attention":
            # The block's attention of the unreduced tokens (q, k and Q K^T at the count entering the
            # block), then values, P V and the projection at the reduced count with the attention the
            # method hands on (engine._attention_stage).
            qk = attn.qkv.in_features * 2.0 * width
            entry.attention_linear = previous * qk + after * (_linear_macs(attn.qkv) - qk + _linear_macs(attn.proj))
            entry.attention_products = (previous * previous + after * after) * float(width)
        entry.mlp = after * sum(_linear_macs(m) for m in block.mlp.modules() if isinstance(m, torch.nn.Linear))
        if reducing:
            shape = StageShape(
                n_in=previous - prefix, n_out=after - prefix, channels=int(model.embed_dim), heads=int(attn.num_heads),
                keep_rate=plan.keep_rate, params=params, acted=after != previous, stage=layers.index(layer), layer=layer, depth=depth,
            )
            entry.method_matmul, entry.method_elementwise, entry.method_distances = method_macs(plan.method, shape)
            if method.acts == "inside" and getattr(method, "transform_attention", None) is None:
                # what the engine computes for the method's needs (e.g. q_cls k^T: (n + 1) d per head);
                # a method transforming the attention reads it from the matrix the block computes anyway
                entry.method_matmul += needs_macs(frozenset(method.needs), n_attention, width, has_class_token)
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
