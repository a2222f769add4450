"""A plain per-image DeiT forward pass for pruning methods (methods.md §0): the test files of Top-K,
Random and Zero-TPrune give it a plain-loop selection rule written from their spec sections and
compare the engine with it."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# select(stage, x [N, C] after the attention residual, probs [H, N, N] post-softmax, keys [N, d]
# averaged over heads) -> the kept non-cls token indices (>= 1) in output order, or None (no change).
Select = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "Sequence[int] | None"]


@torch.inference_mode()
def reference_pruning(model, image: torch.Tensor, select: Select, layers: Sequence[int] = (4, 7, 10)):
    """One image [3, H, W] through a timm DeiT, pruning inside the blocks `layers` (1-based) as
    `select` says, with explicit attention and no batching.

    Returns (logits [classes], per stage the sorted original patch numbers the kept tokens hold,
    per stage the kept patch numbers in output order)."""
    x = model._pos_embed(model.patch_embed(image[None]))[0]  # [N, C]
    origin = [None] + list(range(x.shape[0] - 1))  # the original patch each token is
    kept_sets, kept_orders = [], []
    stage = 0
    for index, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        n_tokens = h.shape[0]
        qkv = attn.qkv(h).reshape(n_tokens, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.head_dim ** -0.5, dim=-1)  # [H, N, N]
        x = x + attn.proj((probs @ v).transpose(0, 1).reshape(n_tokens, -1))
        if index + 1 in layers:
            kept = select(stage, x, probs, k.mean(dim=0))
            stage += 1
            if kept is not None:
                kept = list(kept)
                x = torch.stack([x[0]] + [x[j] for j in kept])
                origin = [None] + [origin[j] for j in kept]
                kept_orders.append(origin[1:])
                kept_sets.append(sorted(origin[1:]))
        x = x + block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x)[None])[0], kept_sets, kept_orders


def engine_kept(stage, b: int) -> tuple[list[int], list[int]]:
    """(sorted kept patch numbers, kept patch numbers in output-token order) of image b at one engine
    stage of a pure pruning method (every kept token holds one patch)."""
    p2t = stage.patch_to_token[b]
    held = {int(t): p for p, t in enumerate(p2t.tolist()) if t >= 0}
    order = [held[t] for t in sorted(held)]
    return sorted(order), order
