"""The reduction engine: a ViT forward pass over timm's own modules that reduces tokens where a
`ReductionPlan` says, and records provenance for every stage.

The model object is shared (every app session uses the same one) and is never modified: the plan
is an argument of every call. Attention always goes through `F.scaled_dot_product_attention`; what
a method needs from a reducing block (`Method.needs`: the class-attention row, keys, queries,
values, or the full attention matrix) is computed on demand and only then, so the dense path is
timm's own computation. The engine names no method: it reads everything from the registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import PlanError
from .methods.base import ReduceContext, apply_assignment
from .plan import ReductionPlan
from .provenance import Stage


@dataclass
class Result:
    """What one forward pass returns.

    Attributes:
        logits: [B, classes] float32.
        token_counts: tokens (cls included) leaving each block, one int per block.
        stages: one `Stage` per reduction stage that changed the sequence (empty with track=False).
        block_outputs: per block, the [B, N_i, C] tokens leaving it (only with keep_block_outputs).
        block_sizes: per block, the [B, N_i] token sizes (only with keep_block_outputs).
        plan: the plan that produced it.
    """

    logits: torch.Tensor
    token_counts: list[int]
    stages: list[Stage]
    plan: ReductionPlan
    block_outputs: list[torch.Tensor] | None = None
    block_sizes: list[torch.Tensor] | None = None


def _attention(block: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None, needs: frozenset[str]):
    """timm's `Attention.forward`, plus what a method needs from it (`methods.base.NEEDS`).

    Returns (output [B, N, C], features: a dict with one entry per name in `needs`).
    """
    attn = block.attn
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    features: dict[str, torch.Tensor] = {}
    if needs:
        features = _block_features(q, k, v, attn.scale, bias, needs)
    out = out.transpose(1, 2).reshape(batch, n, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return out, features


def _block_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None,
                    needs: frozenset[str]) -> dict[str, torch.Tensor]:
    """The attention quantities a method asked for, from q, k, v [B, H, N, d] (float32 scores)."""
    features: dict[str, torch.Tensor] = {}
    if "attention" in needs:
        # The full post-softmax attention [B, H, N, N]: only for a method that declared it.
        logits = (q.float() @ k.float().transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias.float()
        features["attention"] = logits.softmax(dim=-1)
        rows = features["attention"][:, :, :1]
    elif needs & {"cls_attention", "cls_attention_heads"}:
        # Only the cls query row: [B, H, 1, N], O(N d) per head (methods.md §1).
        logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias.float()
        rows = logits.softmax(dim=-1)
    if "cls_attention" in needs:
        features["cls_attention"] = rows.mean(dim=1)[:, 0, 1:]
    if "cls_attention_heads" in needs:
        features["cls_attention_heads"] = rows[:, :, 0, 1:]
    for name, tensor in (("keys", k), ("queries", q), ("values", v)):
        if name in needs:
            features[name] = tensor.mean(dim=1)
        if f"{name}_heads" in needs:
            features[f"{name}_heads"] = tensor
    return features


_IDENTITY = torch.nn.Identity()


def _layer_scale(block: torch.nn.Module, name: str):
    return getattr(block, name, None) or _IDENTITY


def _embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's token embedding: [B, 3, H, W] -> [B, 1 + P, C] (cls token and position embedding added)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def _attention_residual(block: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None, needs: frozenset[str] = frozenset()):
    """The first half of a timm block, x + attention(norm1(x)); returns (x, features) as `_attention`."""
    attn_out, features = _attention(block, block.norm1(x), bias, needs)
    return x + block.drop_path1(_layer_scale(block, "ls1")(attn_out)), features


def _mlp_residual(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The second half of a timm block, x + mlp(norm2(x))."""
    return x + block.drop_path2(_layer_scale(block, "ls2")(block.mlp(block.norm2(x))))


@torch.inference_mode()
def run(
    model: torch.nn.Module,
    images: torch.Tensor,
    plan: ReductionPlan = ReductionPlan(),
    *,
    extras: dict[str, Any] | None = None,
    track: bool = True,
    keep_block_outputs: bool = False,
) -> Result:
    """Forward `images` through a timm ViT, reducing tokens as `plan` says.

    Args:
        model: a timm VisionTransformer with one class token, in eval mode; it is not modified.
        images: [B, 3, H, W] normalised input, on the model's device (any float dtype under autocast).
        plan: the reduction; the default is the dense model (logits equal timm's `model(x)`).
        extras: method weights from the checkpoint (`LoadedModel.extras`).
        track: record per-stage provenance (off for benchmarks).
        keep_block_outputs: keep every block's output tokens and sizes (for the diversity score).
    Returns:
        a `Result`.
    Raises:
        PlanError: the plan does not fit this model, or the method cannot run (e.g. no predictor).
    """
    depth = len(model.blocks)
    plan.validate(depth)
    method = plan.spec()
    params = plan.param_dict()
    layers = plan.reducing_layers(depth)
    extras = extras or {}
    if method is not None:
        reason = method.unavailable_reason(extras)
        if reason:
            raise PlanError(f"{method.label} cannot run: {reason}")
    proportional = method is not None and method.proportional_attention(params)

    x = _embed(model, images)
    batch, n0, _ = x.shape
    device = x.device
    num_patches = n0 - 1
    sizes = torch.ones(batch, n0, device=device, dtype=torch.float32)
    patch_to_token = torch.arange(1, n0, device=device).expand(batch, num_patches).clone() if track else None
    stages: list[Stage] = []
    counts: list[int] = []
    outputs: list[torch.Tensor] | None = [] if keep_block_outputs else None
    block_sizes: list[torch.Tensor] | None = [] if keep_block_outputs else None

    def reduce(stage_index: int, block_index: int, features: dict[str, torch.Tensor]) -> None:
        nonlocal x, sizes, patch_to_token
        ctx = ReduceContext(
            x=x, sizes=sizes, keep_rate=plan.keep_rate, stage=stage_index, block_index=block_index, params=params,
            num_patches=num_patches, depth=depth, layers=layers, extras=extras, **features,
        )
        cls_attention = features.get("cls_attention")
        assignment = method.assign(ctx)
        if assignment is None:
            return
        x, sizes, share = apply_assignment(assignment, x, sizes)
        if not track:
            return
        before = patch_to_token
        present = before >= 0
        source = before.clamp(min=0)
        after = torch.where(present, assignment.dest.gather(1, source), before.new_full((), -1))
        token_sizes = torch.zeros(batch, assignment.n_out, dtype=torch.long, device=device)
        token_sizes.scatter_add_(1, after.clamp(min=0), (after >= 0).long())
        stage = Stage(layer=block_index + 1, patch_to_token=after, token_sizes=token_sizes, token_kinds=assignment.kinds)
        nan = torch.full((), float("nan"), device=device)
        if cls_attention is not None:
            padded = torch.cat([cls_attention.new_zeros(batch, 1), cls_attention.float()], 1)
            stage.cls_attention = torch.where(present, padded.gather(1, source), nan)
        if assignment.pruned is not None:
            stage.patch_pruned = present & assignment.pruned.gather(1, source) & (after >= 0)
        stage.patch_weight = torch.where(present, share.float().gather(1, source), nan)
        stage.extra.update(assignment.extra)
        patch_to_token = after
        stages.append(stage)

    needs = frozenset(method.needs) if method is not None else frozenset()
    for block_index, block in enumerate(model.blocks):
        layer = block_index + 1
        stage_index = layers.index(layer) if layer in layers else -1
        if method is not None and method.acts == "before" and stage_index >= 0:
            reduce(stage_index, block_index, {})
        inside = method is not None and method.acts == "inside" and stage_index >= 0
        bias = sizes.log().to(x.dtype)[:, None, None, :] if proportional else None
        x, features = _attention_residual(block, x, bias, needs if inside else frozenset())
        if inside:
            reduce(stage_index, block_index, features)
        x = _mlp_residual(block, x)
        counts.append(int(x.shape[1]))
        if outputs is not None:
            outputs.append(x)
            block_sizes.append(sizes)
    x = model.norm(x)
    logits = model.forward_head(x)
    return Result(logits=logits.float(), token_counts=counts, stages=stages, plan=plan, block_outputs=outputs, block_sizes=block_sizes)


@torch.inference_mode()
def run_token_count_twin(model: torch.nn.Module, images: torch.Tensor, counts: list[int], acts: str = "inside") -> torch.Tensor:
    """The model's blocks with the sequence simply cut to `counts`, as a timing reference.

    A reduction method's forward costs (a) the blocks at its token counts and (b) its own work:
    scoring, selecting, merging, proportional attention. This twin does only (a): where a count
    drops, it keeps the first tokens and drops the rest (no scores, no merges, no attention bias).
    Its time is the fastest any method with these token counts can run on this engine, so
    `method time / twin time - 1` is the method's own overhead (analysis/bench.py, `--bound`).
    The logits are meaningless for a reduced count (which tokens survive is arbitrary); with no
    cut they equal the dense model's.

    Args:
        model: a timm VisionTransformer with one class token (not modified).
        images: [B, 3, H, W] normalised input on the model's device.
        counts: tokens (cls included) leaving each block, e.g. `Result.token_counts`; one per block.
        acts: "inside" (cut after the attention residual, as EViT / ToMe / TPS / BAT do) or
            "before" (cut the block input, as DynamicViT / dTPS do).
    Returns:
        [B, classes] float32 logits.
    Raises:
        PlanError: `counts` has the wrong length, a count grows, or `acts` is neither "inside"
            nor "before".
    """
    if acts not in ("inside", "before"):
        raise PlanError(f"acts must be 'inside' or 'before', got {acts!r}")
    depth = len(model.blocks)
    if len(counts) != depth:
        raise PlanError(f"the twin needs one token count per block ({depth}), got {len(counts)}")
    x = _embed(model, images)
    for block, count in zip(model.blocks, counts):
        if count > x.shape[1]:
            raise PlanError(f"token counts must not grow: {count} after {x.shape[1]}")
        if acts == "before" and count < x.shape[1]:
            x = x[:, :count].contiguous()
        x, _ = _attention_residual(block, x, None)
        if acts == "inside" and count < x.shape[1]:
            x = x[:, :count].contiguous()
        x = _mlp_residual(block, x)
    return model.forward_head(model.norm(x)).float()
