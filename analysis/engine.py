"""The reduction engine: a ViT forward pass over timm's own modules that reduces tokens where a
`ReductionPlan` says, and records provenance for every stage.

The model object is shared (every app session uses the same one) and is never modified: the plan
is an argument of every call. Attention always goes through `F.scaled_dot_product_attention`; at a
reducing block the class-attention row is computed on its own, O(N d) per head, so no N x N
attention matrix is formed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .methods import METHODS, KINDS, ReduceContext, apply_assignment, get_method
from .lists import comma_list
from .models import TokenscopeError


class PlanError(TokenscopeError):
    """A reduction plan that cannot run: bad keep rate, layers, parameters or method."""


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def parse_layers(text: str | None, what: str = "reduction layers") -> tuple[int, ...] | None:
    """'4, 7, 10' -> (4, 7, 10), the 1-based reducing blocks as typed in the CLI or the app; None or
    blank -> None (each method's default). Range and repeats are checked by `ReductionPlan.validate`.
    Raises PlanError naming `what` for a part that is not an integer."""
    if text is None:
        return None
    layers = comma_list(text, int, what, PlanError, "4,7,10", "block numbers")
    return tuple(layers) or None


@dataclass(frozen=True)
class ReductionPlan:
    """What to reduce, where and how; hashable so results can be cached by it.

    Attributes:
        method: a registered method name, or "none" for the dense model.
        keep_rate: rho in (0, 1], the fraction of non-cls tokens kept at each stage.
        layers: 1-based reducing blocks, or None for the method's default (4, 7, 10; every block
            for ToMe).
        params: the method's parameters as sorted (name, value) pairs; lists become tuples.
    """

    method: str = "none"
    keep_rate: float = 1.0
    layers: tuple[int, ...] | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, method: str = "none", keep_rate: float = 1.0, layers=None, **params: Any) -> "ReductionPlan":
        """Build a plan from plain values (lists are frozen to tuples)."""
        return cls(
            method=method,
            keep_rate=float(keep_rate),
            layers=None if layers is None else tuple(int(layer) for layer in layers),
            params=tuple(sorted((name, _freeze(value)) for name, value in params.items())),
        )

    @property
    def is_dense(self) -> bool:
        return self.method == "none"

    def param_dict(self) -> dict[str, Any]:
        """The method's parameters with its defaults filled in."""
        if self.is_dense:
            return {}
        method = get_method(self.method)
        values = {spec.name: spec.default for spec in method.params}
        values.update(dict(self.params))
        return values

    def reducing_layers(self, depth: int) -> tuple[int, ...]:
        """The 1-based reducing layers for a model of `depth` blocks."""
        if self.is_dense:
            return ()
        if self.layers is not None:
            return self.layers
        default = get_method(self.method).default_layers
        return tuple(range(1, depth + 1)) if default is None else default

    def validate(self, depth: int) -> None:
        """Raise PlanError with a one-line reason if the plan cannot run on `depth` blocks."""
        if self.is_dense:
            return
        if self.method not in METHODS:
            raise PlanError(f"unknown method {self.method!r}: choose none or one of {', '.join(sorted(METHODS))}")
        method = get_method(self.method)
        if not (0.0 < self.keep_rate <= 1.0):
            raise PlanError(f"keep rate must be in (0, 1], got {self.keep_rate}")
        layers = self.reducing_layers(depth)
        if len(set(layers)) != len(layers):
            raise PlanError(f"reduction layers must not repeat, got {','.join(map(str, layers))}")
        bad = [layer for layer in layers if not 1 <= layer <= depth]
        if bad:
            raise PlanError(f"reduction layer {bad[0]} is out of range: this model has blocks 1..{depth}")
        known = {spec.name: spec for spec in method.params}
        for name, value in self.params:
            if name not in known:
                raise PlanError(f"{method.label} has no parameter {name!r} (it has: {', '.join(known) or 'none'})")
            try:
                known[name].parse(value)
            except ValueError as err:
                raise PlanError(str(err)) from None


@dataclass
class Stage:
    """Provenance of one reduction stage (methods.md §7), for a batch.

    Attributes:
        layer: 1-based block index where the stage acted.
        patch_to_token: [B, P] long, for every original patch (row-major) the token holding it
            after the stage, -1 if discarded; 0 is cls, so patch tokens start at 1.
        token_sizes: [B, n_out] long, patches held by each output token (cls holds none: 0).
        token_kinds: [B, n_out] long codes into `KINDS`.
        cls_attention: [B, P] float, class attention of the token that held each patch just
            before the stage (NaN for a patch already discarded), or None for methods that do not
            score by class attention.
        patch_pruned: [B, P] bool, patches whose token was pruned at this stage and sent into
            another token (fused or squeezed); the dispatch maps draw these.
        patch_weight: [B, P] float, the share of each patch's source token in its destination
            token (see `apply_assignment`).
        extra: method-specific arrays (e.g. a predictor's keep score).
    """

    layer: int
    patch_to_token: torch.Tensor
    token_sizes: torch.Tensor
    token_kinds: torch.Tensor
    cls_attention: torch.Tensor | None = None
    patch_pruned: torch.Tensor | None = None
    patch_weight: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.token_kinds.shape[1])

    def kind_names(self, index: int = 0) -> list[str]:
        """The kinds of image `index`'s output tokens as names."""
        return [KINDS[code] for code in self.token_kinds[index].tolist()]


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


def _attention(block: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None, want_cls: bool, want_keys: bool):
    """timm's `Attention.forward`, plus the class-attention row and head-averaged keys on request.

    Returns (output [B, N, C], cls_attention [B, N-1] or None, keys [B, N, d] or None).
    """
    attn = block.attn
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    cls_attention = None
    if want_cls:
        # Only the cls query row: [B, H, 1, N], O(N d) per head (methods.md §1).
        logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * attn.scale
        if bias is not None:
            logits = logits + bias.float()
        cls_attention = logits.softmax(dim=-1).mean(dim=1)[:, 0, 1:]
    keys = k.mean(dim=1) if want_keys else None
    out = out.transpose(1, 2).reshape(batch, n, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return out, cls_attention, keys


_IDENTITY = torch.nn.Identity()


def _layer_scale(block: torch.nn.Module, name: str):
    return getattr(block, name, None) or _IDENTITY


def _embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's token embedding: [B, 3, H, W] -> [B, 1 + P, C] (cls token and position embedding added)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def _attention_residual(block: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None, want_cls: bool, want_keys: bool):
    """The first half of a timm block, x + attention(norm1(x)); returns (x, cls_attention, keys) as `_attention`."""
    attn_out, cls_attention, keys = _attention(block, block.norm1(x), bias, want_cls=want_cls, want_keys=want_keys)
    return x + block.drop_path1(_layer_scale(block, "ls1")(attn_out)), cls_attention, keys


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
    method = None if plan.is_dense else get_method(plan.method)
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

    def reduce(stage_index: int, block_index: int, cls_attention, keys) -> None:
        nonlocal x, sizes, patch_to_token
        ctx = ReduceContext(
            x=x, sizes=sizes, cls_attention=cls_attention, keys=keys, keep_rate=plan.keep_rate,
            stage=stage_index, block_index=block_index, params=params, num_patches=num_patches, extras=extras,
        )
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

    for block_index, block in enumerate(model.blocks):
        layer = block_index + 1
        stage_index = layers.index(layer) if layer in layers else -1
        if method is not None and method.acts == "before" and stage_index >= 0:
            reduce(stage_index, block_index, None, None)
        inside = method is not None and method.acts == "inside" and stage_index >= 0
        bias = sizes.log().to(x.dtype)[:, None, None, :] if proportional else None
        x, cls_attention, keys = _attention_residual(
            block, x, bias, want_cls=inside and method.needs_cls_attention, want_keys=inside and method.needs_keys,
        )
        if inside:
            reduce(stage_index, block_index, cls_attention, keys)
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
        x, _, _ = _attention_residual(block, x, None, want_cls=False, want_keys=False)
        if acts == "inside" and count < x.shape[1]:
            x = x[:, :count].contiguous()
        x = _mlp_residual(block, x)
    return model.forward_head(model.norm(x)).float()
