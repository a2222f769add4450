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
        token_counts: tokens (cls included) leaving each block, one int per block: the batch's
            sequence length, i.e. the longest image's count when images keep different counts.
        image_token_counts: [B, depth] long, each image's own count per block (padding excluded).
        num_prefix_tokens: tokens before the patches in `block_outputs` (class, distillation,
            registers; 0 without any), which the diversity leaves out.
        stages: one `Stage` per reduction stage that changed the sequence (empty with track=False).
        block_outputs: per block, the [B, N_i, C] tokens leaving it (only with keep_block_outputs).
        block_sizes: per block, the [B, N_i] token sizes, 0 for padding (only with keep_block_outputs).
        plan: the plan that produced it.
        attentions: per block the [B, H, N, N] float32 post-softmax attention the block used, in the
            method's view [cls, patches] (only with keep_attention; for attention rollout).
    """

    logits: torch.Tensor
    token_counts: list[int]
    stages: list[Stage]
    plan: ReductionPlan
    block_outputs: list[torch.Tensor] | None = None
    block_sizes: list[torch.Tensor] | None = None
    image_token_counts: torch.Tensor | None = None
    num_prefix_tokens: int = 1
    attentions: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class Layout:
    """Where the patches sit in a model's token sequence, and the view a method sees.

    timm puts `prefix` tokens before the patches: the class token (if any), DeiT's distillation
    token, register tokens. A method always sees `[cls, patches...]`: the class token, or, for a
    model without one (SigLIP, global-pool ViTs), an empty placeholder slot that holds no patch and
    is dropped again; the other prefix tokens are set aside, never pruned or merged, and put back
    after the class token. With exactly one prefix token, the class token, the view *is* the
    sequence (no copy).
    """

    prefix: int
    has_cls: bool

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Layout":
        return cls(int(getattr(model, "num_prefix_tokens", 1)), getattr(model, "cls_token", None) is not None)

    @property
    def plain(self) -> bool:
        return self.has_cls and self.prefix == 1

    @property
    def kept_aside(self) -> int:
        """Prefix tokens other than the class token (distillation, registers)."""
        return self.prefix - (1 if self.has_cls else 0)

    def to_view(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The method's view of a per-token tensor (tokens along `dim`): [cls or placeholder, patches]."""
        if self.plain:
            return tensor
        patches = tensor.narrow(dim, self.prefix, tensor.shape[dim] - self.prefix)
        head = tensor.narrow(dim, 0, 1) if self.has_cls else torch.zeros_like(tensor.narrow(dim, 0, 1))
        return torch.cat([head, patches], dim=dim)

    def view_square(self, probs: torch.Tensor) -> torch.Tensor:
        """The method's view of an attention matrix [B, H, N, N] (rows and columns)."""
        return probs if self.plain else self.to_view(self.to_view(probs, 2), 3)

    def from_view(self, view: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """The full sequence from a reduced view [B, n_out, ...] and the sequence before `full`
        (whose set-aside prefix tokens are put back after the class token)."""
        if self.plain:
            return view
        aside = full[:, (1 if self.has_cls else 0):self.prefix]
        if self.has_cls:
            return torch.cat([view[:, :1], aside, view[:, 1:]], dim=1)
        return torch.cat([aside, view[:, 1:]], dim=1)


def _heads(attn: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """[B, N, H * d] -> [B, H, N, d]."""
    batch, n, _ = tensor.shape
    return tensor.reshape(batch, n, attn.num_heads, attn.head_dim).transpose(1, 2)


def _qkv(attn: torch.nn.Module, h: torch.Tensor, parts: str = "qkv") -> dict[str, torch.Tensor]:
    """The block's q, k and/or v of `h` [B, N, C] as [B, H, N, d] (q and k after q_norm / k_norm).
    With all three, one qkv product (timm's own); else only the rows of the weight that are needed."""
    if parts == "qkv":
        batch, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return {"q": attn.q_norm(q), "k": attn.k_norm(k), "v": v}
    width = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    out: dict[str, torch.Tensor] = {}
    for index, part in enumerate("qkv"):
        if part in parts:
            rows = slice(index * width, (index + 1) * width)
            out[part] = _heads(attn, F.linear(h, weight[rows], None if bias is None else bias[rows]))
    if "q" in out:
        out["q"] = attn.q_norm(out["q"])
    if "k" in out:
        out["k"] = attn.k_norm(out["k"])
    return out


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """The full post-softmax attention [B, H, N, N] in float32."""
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)


def _finish(attn: torch.nn.Module, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] attention output -> timm's projection (with the optional norm and gate)."""
    batch, _, n, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, n, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _attention(block: torch.nn.Module, h: torch.Tensor, bias: torch.Tensor | None, needs: frozenset[str],
               transform=None, layout: Layout = Layout(1, True), record: list | None = None):
    """timm's `Attention.forward` on `h` = norm1(x), plus what a method needs from it
    (`methods.base.NEEDS`). With `transform` (a method's `transform_attention`), the attention is
    computed explicitly and the transformed probabilities are used for the output and the features.
    With `record` (a list), the post-softmax attention the block used is appended to it, in the
    method's view (computed on its own when the output goes through SDPA, which is unchanged).

    Returns (output [B, N, C], features: a dict with one entry per name in `needs`).
    """
    attn = block.attn
    qkv = _qkv(attn, h)
    q, k, v = qkv["q"], qkv["k"], qkv["v"]
    probs = None
    if transform is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        probs = transform(_probabilities(q, k, attn.scale, bias))
        out = probs.to(v.dtype) @ v
    features = _block_features(q, k, v, attn.scale, bias, needs, probs, layout) if needs else {}
    if record is not None:
        record.append(layout.view_square(probs if probs is not None else _probabilities(q, k, attn.scale, bias)))
    return _finish(attn, h, out), features


def _block_features(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, scale: float, bias: torch.Tensor | None,
                    needs: frozenset[str], probs: torch.Tensor | None = None, layout: Layout = Layout(1, True)
                    ) -> dict[str, torch.Tensor]:
    """The attention quantities a method asked for, from q, k, v [B, H, N, d] (float32 scores), or
    from already computed probabilities `probs` [B, H, N, N], in the method's view (`Layout`).

    The class-attention row is the class token's query over all keys, kept for the patch columns
    (methods.md §1). A model without a class token has none: its substitute is the mean attention
    each patch receives over all queries (methods.md §1), which needs the full matrix."""
    features: dict[str, torch.Tensor] = {}
    want_rows = bool(needs & {"cls_attention", "cls_attention_heads"})
    if probs is None and ("attention" in needs or (want_rows and not layout.has_cls)):
        # The full post-softmax attention [B, H, N, N]: only for a method that asked for it.
        probs = _probabilities(q, k, scale, bias)
    rows = None
    if want_rows:
        if not layout.has_cls:
            if bias is None:
                rows = probs.mean(dim=2, keepdim=True)  # mean attention received, [B, H, 1, N]
            else:
                # over the present queries only: padding (a -inf key in the mask) asks nothing
                present = torch.isfinite(bias[:, 0, 0, :]).to(probs.dtype)[:, None, :, None]
                rows = (probs * present).sum(dim=2, keepdim=True) / present.sum(dim=2, keepdim=True)
        elif probs is not None:
            rows = probs[:, :, :1]
        else:
            # Only the cls query row: [B, H, 1, N], O(N d) per head (methods.md §1).
            logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * scale
            if bias is not None:
                logits = logits + bias.float()
            rows = logits.softmax(dim=-1)
    if "cls_attention" in needs:
        features["cls_attention"] = rows.mean(dim=1)[:, 0, layout.prefix:]
    if "cls_attention_heads" in needs:
        features["cls_attention_heads"] = rows[:, :, 0, layout.prefix:]
    if "attention" in needs:
        features["attention"] = layout.view_square(probs)
    for name, tensor in (("keys", k), ("queries", q), ("values", v)):
        if tensor is None:
            continue
        if name in needs:
            features[name] = layout.to_view(tensor.mean(dim=1))
        if f"{name}_heads" in needs:
            features[f"{name}_heads"] = layout.to_view(tensor, 2)
    return features


_IDENTITY = torch.nn.Identity()


def _layer_scale(block: torch.nn.Module, name: str):
    return getattr(block, name, None) or _IDENTITY


def _embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's token embedding: [B, 3, H, W] -> [B, 1 + P, C] (cls token and position embedding added)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def _attention_residual(block: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None, needs: frozenset[str] = frozenset(),
                        transform=None, layout: Layout = Layout(1, True), record: list | None = None):
    """The first half of a timm block, x + attention(norm1(x)); returns (x, features) as `_attention`."""
    attn_out, features = _attention(block, block.norm1(x), bias, needs, transform, layout, record)
    return x + block.drop_path1(_layer_scale(block, "ls1")(attn_out)), features


def _mlp_residual(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The second half of a timm block, x + mlp(norm2(x))."""
    return x + block.drop_path2(_layer_scale(block, "ls2")(block.mlp(block.norm2(x))))


def _bias(sizes: torch.Tensor, valid: torch.Tensor | None, proportional: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive attention mask [B, 1, 1, N]: log(size) of every key for proportional attention
    (ToMe), and -inf on padding keys; None when neither applies (the dense path)."""
    if proportional:
        bias = sizes.log()
        if valid is not None:
            bias = bias.masked_fill(~valid, float("-inf"))
        return bias.to(dtype)[:, None, None, :]
    if valid is not None:
        return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))[:, None, None, :]
    return None


@torch.inference_mode()
def run(
    model: torch.nn.Module,
    images: torch.Tensor,
    plan: ReductionPlan = ReductionPlan(),
    *,
    extras: dict[str, Any] | None = None,
    track: bool = True,
    keep_block_outputs: bool = False,
    keep_attention: bool = False,
) -> Result:
    """Forward `images` through a timm ViT, reducing tokens as `plan` says.

    Args:
        model: a timm VisionTransformer with one class token, in eval mode; it is not modified.
        images: [B, 3, H, W] normalised input, on the model's device (any float dtype under autocast).
        plan: the reduction; the default is the dense model (logits equal timm's `model(x)`).
        extras: method weights from the checkpoint (`LoadedModel.extras`).
        track: record per-stage provenance (off for benchmarks).
        keep_block_outputs: keep every block's output tokens and sizes (for the diversity score).
        keep_attention: keep every block's post-softmax attention (`Result.attentions`; rollout).
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
    layout = Layout.of(model)
    if method is not None:
        reason = layout_reason(method, layout)
        if reason:
            raise PlanError(f"{method.label} cannot run on this model: {reason}")

    x = _embed(model, images)
    batch, n0, _ = x.shape
    device = x.device
    num_patches = n0 - layout.prefix
    sizes = torch.ones(batch, n0, device=device, dtype=torch.float32)
    valid: torch.Tensor | None = None
    patch_to_token = torch.arange(1, num_patches + 1, device=device).expand(batch, num_patches).clone() if track else None
    stages: list[Stage] = []
    counts: list[int] = []
    image_counts: list[torch.Tensor] = []
    outputs: list[torch.Tensor] | None = [] if keep_block_outputs else None
    block_sizes: list[torch.Tensor] | None = [] if keep_block_outputs else None
    attentions: list[torch.Tensor] | None = [] if keep_attention else None
    state: dict[str, Any] = {}
    embedding = layout.to_view(x)
    grid = _patch_grid(model, num_patches)
    reduced = False

    def context(stage_index: int, block_index: int, features: dict[str, torch.Tensor]) -> ReduceContext:
        return ReduceContext(
            x=layout.to_view(x), sizes=layout.to_view(sizes) if layout.has_cls else _placeholder_sizes(layout, sizes),
            keep_rate=plan.keep_rate, stage=stage_index, block_index=block_index, params=params, num_patches=num_patches,
            depth=depth, layers=layers, extras=extras, valid=None if valid is None else _view_valid(layout, valid),
            state=state, embedding=embedding, grid=grid, **features,
        )

    def reduce(ctx: ReduceContext, features: dict[str, torch.Tensor]):
        nonlocal x, sizes, patch_to_token, valid, reduced
        assignment = method.assign(ctx)
        if assignment is None:
            return None
        reduced = True
        view_x, view_sizes, share, edge_share = apply_assignment(assignment, ctx.x, ctx.sizes)
        before_valid = valid
        if assignment.valid is not None:
            # padding: no size, no attention; the slots of each image must be a prefix
            view_sizes = view_sizes.masked_fill(~assignment.valid, 0.0)
            view_x = view_x.masked_fill(~assignment.valid.unsqueeze(-1), 0.0)
            full_valid = torch.ones(batch, x.shape[1], dtype=torch.bool, device=device)
            valid = layout.from_view(assignment.valid, full_valid)
        else:
            valid = None
        x = layout.from_view(view_x, x)
        sizes = layout.from_view(view_sizes, sizes)
        if track:
            stages.append(_stage(ctx.block_index + 1, assignment, patch_to_token, share, edge_share,
                                 features.get("cls_attention"), before_valid))
            patch_to_token = stages[-1].patch_to_token
        return assignment

    needs = frozenset(method.needs) if method is not None else frozenset()
    transform = getattr(method, "transform_attention", None) if method is not None else None
    # a method may transform the attention of every block, not only its reducing ones (ctx.stage -1 there)
    every_block = transform is not None and bool(getattr(method, "transform_every_block", False))
    for block_index, block in enumerate(model.blocks):
        layer = block_index + 1
        stage_index = layers.index(layer) if layer in layers else -1
        reducing = method is not None and stage_index >= 0
        if reducing and method.acts == "before":
            reduce(context(stage_index, block_index, {}), {})
        bias = _bias(sizes, valid, proportional, x.dtype)
        if reducing and method.acts == "attention":
            x = _attention_stage(block, x, bias, needs, stage_index, block_index, context, reduce,
                                 lambda: _bias(sizes, valid, proportional, x.dtype), lambda: x, attentions)
        else:
            block_transform = None
            if transform is not None and (reducing or every_block):
                block_transform = lambda probs, i=stage_index, b=block_index: method.transform_attention(probs, context(i, b, {}))  # noqa: E731
            x, features = _attention_residual(block, x, bias, needs if reducing else frozenset(), block_transform, layout, attentions)
            if reducing and method.acts == "inside":
                reduce(context(stage_index, block_index, features), features)
        x = _mlp_residual(block, x)
        counts.append(int(x.shape[1]))
        image_counts.append(torch.full((batch,), x.shape[1], dtype=torch.long, device=device) if valid is None
                            else valid.sum(dim=1))
        if outputs is not None:
            outputs.append(x)
            block_sizes.append(sizes)
    x = model.norm(x)
    logits = _head(model, x, sizes, valid, layout) if reduced else model.forward_head(x)
    return Result(logits=logits.float(), token_counts=counts, stages=stages, plan=plan, block_outputs=outputs,
                  block_sizes=block_sizes, image_token_counts=torch.stack(image_counts, dim=1).cpu(),
                  num_prefix_tokens=layout.prefix, attentions=attentions)


def _patch_grid(model: torch.nn.Module, num_patches: int) -> tuple[int, int] | None:
    """(rows, cols) of the patch grid from timm's `patch_embed.grid_size`, or None when it is missing
    or does not match the number of patches."""
    size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if size is None:
        return None
    rows, cols = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return (rows, cols) if rows * cols == num_patches else None


def layout_reason(method, layout: Layout) -> str | None:
    """Why `method` cannot run on a model of this token layout, or None."""
    if method.acts == "attention" and not layout.plain:
        return ("it hands the block's own attention on to the block, which tokenscope supports only for models whose one "
                f"prefix token is the class token (this model has {layout.prefix} prefix tokens"
                f"{'' if layout.has_cls else ' and no class token'})")
    return None


def method_unavailable(method, model: torch.nn.Module, extras: dict[str, Any] | None = None) -> str | None:
    """Why `method` cannot run on `model` with these loaded extras (its own `unavailable_reason`, or
    the model's token layout), or None: what the app shows beside a disabled method."""
    return method.unavailable_reason(extras or {}) or layout_reason(method, Layout.of(model))


def _placeholder_sizes(layout: Layout, sizes: torch.Tensor) -> torch.Tensor:
    """The view's sizes for a model without a class token: the placeholder counts 1."""
    view = layout.to_view(sizes)
    view[:, 0] = 1.0
    return view


def _view_valid(layout: Layout, valid: torch.Tensor) -> torch.Tensor:
    view = layout.to_view(valid)
    view[:, 0] = True
    return view


def _head(model: torch.nn.Module, x: torch.Tensor, sizes: torch.Tensor, valid: torch.Tensor | None, layout: Layout) -> torch.Tensor:
    """timm's head (`forward_head`) on a reduced sequence: the class token (and DeiT's distillation
    head) as timm reads them; average pooling weighted by the patches each token holds, so a merged
    token counts for all its patches (as ToMe's MAE patch does) and padding for none; max pooling
    over the present tokens; SigLIP's attention pool (MAP) with log(size) added to its keys
    (proportional attention: a merged token weighs as the patches it holds). Then fc_norm, head."""
    pool = getattr(model, "global_pool", "token")
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is None and pool in ("token", ""):
        return model.forward_head(x)
    prefix = 0 if getattr(model, "pool_include_prefix", False) else layout.prefix
    tokens, weights = x[:, prefix:], sizes[:, prefix:].to(x.dtype)
    present = weights > 0
    if attn_pool is not None:
        pooled = _attention_pool(attn_pool, tokens, weights)
    elif pool == "avg":
        pooled = (tokens * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
    elif pool in ("max", "avgmax"):
        peak = tokens.masked_fill(~present.unsqueeze(-1), float("-inf")).amax(dim=1)
        pooled = peak if pool == "max" else 0.5 * (peak + (tokens * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True))
    else:
        raise PlanError(f"global pool {pool!r} of this model is not supported on reduced tokens")
    return model.head(model.head_drop(model.fc_norm(pooled)))


def _attention_pool(attn_pool: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """timm's `AttentionPoolLatent.forward` with log(weight) added to the keys (0 weight: masked)."""
    batch, n, channels = x.shape
    if attn_pool.pos_embed is not None:
        x = x + attn_pool.pos_embed.unsqueeze(0).to(x.dtype)
    q_latent = attn_pool.latent.expand(batch, -1, -1)
    q = attn_pool.q(q_latent).reshape(batch, attn_pool.latent_len, attn_pool.num_heads, attn_pool.head_dim).transpose(1, 2)
    kv = attn_pool.kv(x).reshape(batch, n, 2, attn_pool.num_heads, attn_pool.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q, k = attn_pool.q_norm(q), attn_pool.k_norm(k)
    bias = weights.log()[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn_pool.proj_drop(attn_pool.proj(out.transpose(1, 2).reshape(batch, attn_pool.latent_len, channels)))
    if attn_pool.mlp is not None:
        out = out + attn_pool.mlp(attn_pool.norm(out))
    if attn_pool.pool == "token":
        return out[:, 0]
    if attn_pool.pool == "avg":
        return out.mean(1)
    return out


def _attention_stage(block, x, bias, needs, stage_index, block_index, context, reduce, new_bias, current, record=None):
    """A block whose method acts on the block's own attention before the tokens are reduced
    (`acts = "attention"`, MCTF's one-step-ahead attention): q, k of the unreduced tokens give the
    attention the method reads (`needs`); its assignment reduces the tokens and may hand over the
    reduced attention map, which the rest of the block uses with the values of the reduced tokens.
    Returns the block's tokens after its attention residual."""
    attn = block.attn
    h = block.norm1(x)
    qk = _qkv(attn, h, "qk")
    probs = _probabilities(qk["q"], qk["k"], attn.scale, bias)
    features = _block_features(qk["q"], qk["k"], None, attn.scale, bias, needs | {"attention"}, probs)
    if "attention" not in needs:
        features.pop("attention")
    assignment = reduce(context(stage_index, block_index, features), features)
    used = probs
    if assignment is None:
        v = _qkv(attn, h, "v")["v"]
        out = probs.to(v.dtype) @ v
    else:
        x = current()
        h = block.norm1(x)
        if assignment.attention is not None:
            v = _qkv(attn, h, "v")["v"]
            out = assignment.attention.to(v.dtype) @ v
            used = assignment.attention
        else:
            qkv = _qkv(attn, h)
            out = F.scaled_dot_product_attention(qkv["q"], qkv["k"], qkv["v"], attn_mask=new_bias())
            if record is not None:
                used = _probabilities(qkv["q"], qkv["k"], attn.scale, new_bias())
    if record is not None:
        record.append(used.float())
    return x + block.drop_path1(_layer_scale(block, "ls1")(_finish(attn, h, out)))


def _stage(layer: int, assignment, before: torch.Tensor, share: torch.Tensor, edge_share: torch.Tensor | None,
           cls_attention: torch.Tensor | None, before_valid: torch.Tensor | None) -> Stage:
    """The provenance of one stage from the previous `patch_to_token` [B, P] and the assignment."""
    batch, device = before.shape[0], before.device
    present = before >= 0
    source = before.clamp(min=0)
    after = torch.where(present, assignment.dest.gather(1, source), before.new_full((), -1))
    token_sizes = torch.zeros(batch, assignment.n_out, dtype=torch.long, device=device)
    token_sizes.scatter_add_(1, after.clamp(min=0), (after >= 0).long())
    stage = Stage(layer=layer, patch_to_token=after, token_sizes=token_sizes, token_kinds=assignment.kinds,
                  valid=assignment.valid, notes=assignment.notes)
    nan = torch.full((), float("nan"), device=device)
    if cls_attention is not None:
        padded = torch.cat([cls_attention.new_zeros(batch, 1), cls_attention.float()], 1)
        stage.cls_attention = torch.where(present, padded.gather(1, source), nan)
    if assignment.pruned is not None:
        stage.patch_pruned = present & assignment.pruned.gather(1, source) & (after >= 0)
    stage.patch_weight = torch.where(present, share.float().gather(1, source), nan)
    if assignment.edges is not None:
        stage.patch_edges = _patch_edges(before, assignment.edges, edge_share)
    stage.extra.update(assignment.extra)
    return stage


def _patch_edges(before: torch.Tensor, edges, edge_share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edges in patch space: for every patch held by an edge's source token, (patch, target
    token, share), as [B, M] tensors padded with -1 (patch, token) and NaN (share)."""
    batch = before.shape[0]
    hit = (before.unsqueeze(2) == edges.source.unsqueeze(1)) & (before.unsqueeze(2) >= 0) & (edges.target.unsqueeze(1) >= 0)
    per_image = hit.flatten(1).sum(dim=1)
    width = int(per_image.max()) if batch else 0
    patch = before.new_full((batch, width), -1)
    token = before.new_full((batch, width), -1)
    weight = torch.full((batch, width), float("nan"), device=before.device)
    image, p, e = hit.nonzero(as_tuple=True)
    if image.numel():
        slot = torch.arange(image.numel(), device=before.device) - torch.cumsum(per_image, 0).sub(per_image)[image]
        patch[image, slot] = p
        token[image, slot] = edges.target[image, e]
        weight[image, slot] = edge_share.float()[image, e]
    return patch, token, weight


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
        acts: "inside" (cut after the attention residual, as EViT / ToMe / TPS / BAT do),
            "before" (cut the block input, as DynamicViT / dTPS do) or "attention" (a method acting
            on the block's own attention: cut the block input too, the least such a block can cost).
    Returns:
        [B, classes] float32 logits.
    Raises:
        PlanError: `counts` has the wrong length, a count grows, or `acts` is not "inside",
            "before" or "attention".
    """
    if acts not in ("inside", "before", "attention"):
        raise PlanError(f"acts must be 'inside', 'before' or 'attention', got {acts!r}")
    depth = len(model.blocks)
    if len(counts) != depth:
        raise PlanError(f"the twin needs one token count per block ({depth}), got {len(counts)}")
    x = _embed(model, images)
    for block, count in zip(model.blocks, counts):
        if count > x.shape[1]:
            raise PlanError(f"token counts must not grow: {count} after {x.shape[1]}")
        if acts in ("before", "attention") and count < x.shape[1]:
            x = x[:, :count].contiguous()
        x, _ = _attention_residual(block, x, None)
        if acts == "inside" and count < x.shape[1]:
            x = x[:, :count].contiguous()
        x = _mlp_residual(block, x)
    return model.forward_head(model.norm(x)).float()
