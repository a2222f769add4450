"""DiffRate: prune, then merge, with per-layer kept-token counts searched by gradient (Chen et al.,
"DiffRate: Differentiable Compression Rate for Efficient Vision Transformers", ICCV 2023,
arXiv 2305.17997; methods.md §14).

The searched "compression rates" are kept-token counts (cls included) per block; they are data, not
weights, so they apply to stock DeiT checkpoints. This file replays the published ones
(OpenGVLab/DiffRate at 91ae3e3, `compression_rate.json`, entries ViT-T-DeiT / ViT-S-DeiT /
ViT-B-DeiT) or a user's own lists. In every block, inside it (after the attention residual, before
the MLP), as the official `DiffRateBlock.forward` (`DiffRate/patch/deit.py`, eval branch) does:

1. Rank the patch tokens by the block's class attention averaged over heads (the post-softmax row
   of cls, proportional attention included), descending; cls stays first.
2. Prune: keep the first `prune_kept_num` tokens of that ranking (cls counted), drop the rest.
3. Merge (`DiffRate/merge.py`, `get_merge_func`): the first `merge_kept_num` tokens stay; each
   further kept token merges into its most similar staying token other than cls, by the cosine
   similarity of the hidden states (after the attention residual). Merging is a plain mean of the
   staying token and everything merged into it (`scatter_reduce(..., "mean")`, include_self).
4. Sizes for proportional attention (`log(size)` added to every key's logit in later blocks): a
   staying token's size grows by `size_src * s_src`, with s_src the merged token's best cosine
   similarity (the official "similarity-aware" size). Output: `[cls, staying tokens by descending
   class attention]`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import PlanError
from ..plan import ReductionPlan
from .base import (
    KIND_CODE, ComparisonEntry, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, keep_rate_counts, register,
    token_kinds,
)

# ----------------------------------------------------------------------------------------------
# The published kept-token counts: OpenGVLab/DiffRate, commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e,
# file compression_rate.json, {model: {target GFLOPs: (prune_kept_num, merge_kept_num)}}, one entry
# per block, cls included, copied verbatim (the 1.0 entry's merge list is not monotone: 148, 156).
# ----------------------------------------------------------------------------------------------
PUBLISHED: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "ViT-T-DeiT": {
        "0.6": ((197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3), (197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3)),
        "0.7": ((197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3), (197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3)),
        "0.8": ((197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3), (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3)),
        "0.9": ((197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3), (197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3)),
        "1.0": ((197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21), (197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21)),
    },
    "ViT-S-DeiT": {
        "2.3": ((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3), (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
        "2.5": ((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3), (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
        "2.7": ((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3), (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
        "2.9": ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3), (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
        "3.1": ((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3), (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
    },
    "ViT-B-DeiT": {
        "8.7": ((197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3), (197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3)),
        "10.0": ((197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3), (197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3)),
        "10.4": ((197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3), (197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3)),
        "11.5": ((197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3), (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3)),
        "12.5": ((197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3), (197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3)),
    },
}

# The model each published entry was searched on (main.py's `model_name_dict`), as the shape the
# check compares: (timm model, width C, patches, blocks).
PUBLISHED_MODELS: dict[str, tuple[str, int, int, int]] = {
    "ViT-T-DeiT": ("deit_tiny_patch16_224", 192, 196, 12),
    "ViT-S-DeiT": ("deit_small_patch16_224", 384, 196, 12),
    "ViT-B-DeiT": ("deit_base_patch16_224", 768, 196, 12),
}

CUSTOM = "custom"
SETTINGS: tuple[str, ...] = tuple(f"{model}:{flops}" for model, table in PUBLISHED.items() for flops in table) + (CUSTOM,)
DEFAULT_SETTING = "ViT-T-DeiT:0.8"
SIZE_RULES = ("similarity", "count")


def published_lists(setting: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prune_kept_num, merge_kept_num) of a published setting "MODEL:GFLOPS", one entry per block.
    Raises PlanError for "custom" or an unknown name."""
    model, _, flops = setting.partition(":")
    try:
        return PUBLISHED[model][flops]
    except KeyError:
        raise PlanError(f"DiffRate has no published setting {setting!r}: use one of {', '.join(SETTINGS[:-1])}") from None


def list_entry(value: int | Sequence[int], index: int, name: str) -> int:
    """Entry `index` (0-based reducing stage) of a custom kept-count parameter: a single number applies
    to every stage. Raises PlanError when a list is shorter than the plan's reducing layers."""
    if isinstance(value, (list, tuple)):
        if index >= len(value):
            raise PlanError(f"DiffRate's {name} list has {len(value)} entries but the plan reduces at more layers; give one "
                            "kept count (cls included) per reducing layer, 12 for every block of DeiT, or a single number")
        return int(value[index])
    return int(value)


def kept_numbers(params: dict[str, Any], stage: int, block_index: int) -> tuple[int, int]:
    """(prune_kept_num, merge_kept_num) at one reducing block: a published setting's entries for the
    0-based block `block_index`; custom lists' entries for the 0-based reducing stage `stage`."""
    if params["setting"] == CUSTOM:
        return (list_entry(params["prune_kept_num"], stage, "prune_kept_num"),
                list_entry(params["merge_kept_num"], stage, "merge_kept_num"))
    prune, merge = published_lists(params["setting"])
    if block_index >= len(prune):
        raise PlanError(f"DiffRate setting {params['setting']} has {len(prune)} blocks; this model has more")
    return prune[block_index], merge[block_index]


def stage_counts(n: int, prune_kept: int, merge_kept: int) -> tuple[int, int]:
    """(tokens after pruning, tokens after merging), cls included, from the `n` tokens entering a
    block: `mid = min(n, prune_kept)`, `out = min(mid, merge_kept)`, as the official eval branch
    (`x[:, :prune_kept_num]`, then merging only `if merge_kept_num < prune_kept_num`, and a merge
    with fewer tokens than `merge_kept_num` merges nothing)."""
    mid = min(n, int(prune_kept))
    return mid, min(mid, int(merge_kept))


def model_mismatch(setting: str, channels: int, num_patches: int, depth: int) -> str | None:
    """Why a published setting does not belong to a model of this shape, or None."""
    model = setting.partition(":")[0]
    name, width, patches, blocks = PUBLISHED_MODELS[model]
    if (channels, num_patches, depth) == (width, patches, blocks):
        return None
    return (f"DiffRate setting {setting} was searched on {name} (width {width}, {patches} patches, {blocks} blocks); this "
            f"model has width {channels}, {num_patches} patches, {depth} blocks: pick a setting of its own model, "
            "setting=custom with prune_kept_num / merge_kept_num, or check_model=false to apply these counts anyway")


def diffrate_assignment(x: torch.Tensor, cls_attention: torch.Tensor, sizes: torch.Tensor, prune_kept: int,
                        merge_kept: int, size_rule: str = "similarity", weighted: bool = False,
                        held: torch.Tensor | None = None) -> TokenAssignment | None:
    """DiffRate at one block (methods.md §14, steps 1-4).

    Args:
        x: [B, N, C] hidden states after the attention residual (token 0 = cls).
        cls_attention: [B, N-1] head-averaged post-softmax attention of cls to the other tokens.
        sizes: [B, N] float, the sizes proportional attention reads (cls 1).
        prune_kept / merge_kept: the kept counts of this block, cls included.
        size_rule: "similarity" (official: a merged token adds size * its best cosine to its host)
            or "count" (sizes add, ToMe's rule).
        weighted: False = the official plain mean of host and merged tokens; True = size-weighted.
        held: [B, N] original patches each token holds (for the kinds); None = `sizes`.
    Returns:
        the assignment ([cls, the merge_kept - 1 staying tokens by descending class attention];
        pruned tokens dest -1; merged tokens to their host; `sizes` set for the "similarity" rule;
        kinds "merged" for tokens holding more than one patch, else "kept"; extra "attention_size"
        [B, n_out], the sizes of the next block's proportional attention; one note per image),
        or None when the block keeps all N tokens. Ties in class attention go by position (stable
        sort); ties between hosts to the first one in ranking order (`max`).
    """
    batch, n, _ = x.shape
    mid, out = stage_counts(n, prune_kept, merge_kept)
    if out >= n:
        return None
    device = x.device
    order = torch.sort(cls_attention, dim=1, descending=True, stable=True).indices + 1  # [B, N-1]
    ranked = torch.cat([order.new_zeros(batch, 1), order], dim=1)  # [B, N], cls first
    hosts, sources = ranked[:, :out], ranked[:, out:mid]  # [B, out], [B, S]
    n_src = mid - out
    dest = torch.full((batch, n), -1, dtype=torch.long, device=device)
    dest.scatter_(1, hosts, torch.arange(out, device=device).expand(batch, out))
    weight = sizes if weighted else torch.ones(batch, n, dtype=sizes.dtype, device=device)
    gain = None
    if n_src > 0:
        metric = x if x.dtype == torch.float64 else x.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)  # official: no clamp
        channels = metric.shape[-1]
        src = metric.gather(1, sources.unsqueeze(-1).expand(batch, n_src, channels))
        dst = metric.gather(1, hosts.unsqueeze(-1).expand(batch, out, channels))
        similarity = src @ dst.transpose(1, 2)  # [B, S, out]
        similarity[..., 0] = -float("inf")  # never into cls
        best, host = similarity.max(dim=-1)
        dest.scatter_(1, sources, host)
        gain = best
    held = sizes if held is None else held
    zero = torch.zeros((), dtype=held.dtype, device=device)
    held_out = held.new_zeros(batch, out).scatter_add_(1, dest.clamp(min=0), torch.where(dest >= 0, held, zero))
    sizes_out = None
    if size_rule == "similarity":
        sizes_out = sizes.new_zeros(batch, out).scatter_add_(1, torch.arange(out, device=device).expand(batch, out),
                                                             sizes.gather(1, hosts))
        if gain is not None:
            sizes_out.scatter_add_(1, host, sizes.gather(1, sources) * gain.to(sizes.dtype))
    elif size_rule != "count":
        raise PlanError(f"DiffRate size_rule must be one of {', '.join(SIZE_RULES)}, got {size_rule!r}")
    attention_size = sizes_out if sizes_out is not None else sizes.new_zeros(batch, out).scatter_add_(
        1, dest.clamp(min=0), torch.where(dest >= 0, sizes, torch.zeros((), dtype=sizes.dtype, device=device)))
    kinds = token_kinds(torch.where(held_out[:, 1:] > 1, KIND_CODE["merged"], KIND_CODE["kept"]))
    note = f"{n - mid} pruned, {n_src} merged into the {out - 1} most attended tokens (prune_kept {prune_kept}, merge_kept {merge_kept})"
    return TokenAssignment(dest=dest, weight=weight, n_out=out, kinds=kinds, sizes=sizes_out, notes=[note] * batch,
                           extra={"attention_size": attention_size})


@register
class DiffRate(Method):
    name = "diffrate"
    rank = 75
    label = "DiffRate"
    paper = "DiffRate, Chen et al., ICCV 2023"
    acts = "inside"
    default_layers = None  # every block
    needs = frozenset({"cls_attention"})
    uses_keep_rate = False
    colour = "#31a354"
    marker = "4"
    comparison = (ComparisonEntry("merging", 6, "DiffRate"),)
    params = (
        ParamSpec(
            "setting", DEFAULT_SETTING, "choice",
            "The published kept-token counts (OpenGVLab/DiffRate compression_rate.json): MODEL:GFLOPs target, for the "
            "model it was searched on; custom = your own prune_kept_num / merge_kept_num.",
            choices=SETTINGS,
        ),
        ParamSpec(
            "prune_kept_num", 197, "int_list",
            "setting=custom: tokens (cls included) kept after pruning at each reducing layer, one number or a comma list "
            "with one entry per reducing layer (official --prune_kept_num of set_kept_num).",
            minimum=1,
        ),
        ParamSpec(
            "merge_kept_num", 197, "int_list",
            "setting=custom: tokens (cls included) left after merging at each reducing layer, one number or a comma list "
            "with one entry per reducing layer (the official merge_kept_num); at least 2 (cls and a host).",
            minimum=2,
        ),
        ParamSpec(
            "prop_attn", True, "bool",
            "Proportional attention: log(size) of each key added to the attention logits (the official code: always on).",
        ),
        ParamSpec(
            "size_rule", "similarity", "choice",
            "Sizes for proportional attention: similarity = a merged token adds its size times its best cosine similarity "
            "to its host (the official inference code); count = sizes add (ToMe).",
            choices=SIZE_RULES,
        ),
        ParamSpec(
            "weighted_merge", False, "bool",
            "Merge by size-weighted mean; the official code takes the plain mean of the host and its merged tokens (off).",
        ),
        ParamSpec(
            "check_model", True, "bool",
            "Refuse a published setting on a model of another shape (width, patches, blocks) than the one it was searched "
            "on; off applies the published counts to any model.",
        ),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """DiffRate at one block (methods.md §14). Raises PlanError for a published setting on a model of
        another shape (unless check_model is off) or a custom list shorter than the plan's layers."""
        params = ctx.params
        if params["setting"] != CUSTOM and params["check_model"]:
            reason = model_mismatch(params["setting"], int(ctx.x.shape[-1]), int(ctx.num_patches), int(ctx.depth))
            if reason:
                raise PlanError(reason)
        prune_kept, merge_kept = kept_numbers(params, ctx.stage, ctx.block_index)
        held = ctx.state.get("diffrate_held")
        if held is None or held.shape != ctx.sizes.shape:
            held = torch.ones_like(ctx.sizes)
        assignment = diffrate_assignment(ctx.x, ctx.cls_attention, ctx.sizes, prune_kept, merge_kept, params["size_rule"],
                                         params["weighted_merge"], held)
        if assignment is not None:
            ctx.state["diffrate_held"] = held.new_zeros(held.shape[0], assignment.n_out).scatter_add_(
                1, assignment.dest.clamp(min=0), torch.where(assignment.dest >= 0, held, torch.zeros_like(held)))
        return assignment

    def proportional_attention(self, params: dict) -> bool:
        return bool(params.get("prop_attn", True))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """Custom lists need one entry per reducing layer; a published setting needs its 12 blocks."""
        params = plan.param_dict()
        layers = plan.reducing_layers(depth)
        if params["setting"] == CUSTOM:
            for name in ("prune_kept_num", "merge_kept_num"):
                if isinstance(params[name], tuple) and len(params[name]) < len(layers):
                    list_entry(params[name], len(layers) - 1, name)  # raises the one message for this mistake
        elif params["setting"] in SETTINGS and max(layers, default=0) > len(published_lists(params["setting"])[0]):
            raise PlanError(f"DiffRate setting {params['setting']} gives 12 blocks; this model has {depth}: use setting=custom")

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The cosine similarities of the S merged tokens to the K staying ones (cls column included,
        as the official product): S K C; the merge of the S tokens (S C). Pruning, the ranking and the
        normalisation are not MACs (methods.md §8); the class-attention row is the engine's."""
        if not shape.acted:
            return 0.0, 0.0
        prune_kept, merge_kept = kept_numbers(shape.params, shape.stage, shape.layer - 1)
        mid, out = stage_counts(shape.n_in + 1, prune_kept, merge_kept)
        merged = mid - out
        return float(merged * out * shape.channels), float(merged * shape.channels)

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """DiffRate at a keep rate's token budget (methods.md §14, budget): custom lists that follow
        `target_counts`, or EViT's selection without fusion at `layers` (4, 7, 10), block by block
        (`matched_lists`; both schedules give them). Raises PlanError for an unknown schedule."""
        if schedule not in ("constant", "matched"):
            raise PlanError(f"DiffRate budget: schedule must be 'constant' or 'matched', got {schedule!r}")
        if target_counts is None:
            target_counts = keep_rate_counts(keep_rate, depth, n0, tuple(layers or (4, 7, 10)))
        prune, merge = matched_lists(target_counts, n0)
        return ReductionPlan.make(self.name, 1.0, None, setting=CUSTOM, prune_kept_num=prune, merge_kept_num=merge)


# ----------------------------------------------------------------------------------------------
# Budget helpers
# ----------------------------------------------------------------------------------------------

def diffrate_counts(prune: Sequence[int], merge: Sequence[int], n0: int = 197) -> list[int]:
    """Tokens (cls included) leaving each block for per-block kept counts (`stage_counts`), e.g. the
    published ViT-T-DeiT 0.8: [197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3]."""
    counts, n = [], n0
    for prune_kept, merge_kept in zip(prune, merge):
        n = stage_counts(n, prune_kept, merge_kept)[1]
        counts.append(n)
    return counts


def matched_lists(target_counts: Sequence[int], n0: int = 197) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-block (prune_kept_num, merge_kept_num) whose counts follow `target_counts` (tokens, cls
    included, leaving each block), the budget's lists (methods.md §14).

    Block i removes `r_i = N_{i-1} - max(target_i, 2)` tokens (none where the target rises, e.g. a
    fused token): `r_i // 2` are pruned and the rest merged, i.e. prune_kept = N_{i-1} - r_i // 2 and
    merge_kept = N_{i-1} - r_i. A block that removes nothing gets N_{i-1} for both.
    """
    prune, merge, n = [], [], n0
    for target in target_counts:
        r = max(0, n - max(int(target), 2))
        prune.append(n - r // 2)
        merge.append(n - r)
        n -= r
    return tuple(prune), tuple(merge)
