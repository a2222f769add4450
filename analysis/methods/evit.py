"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022; methods.md §2)."""
from __future__ import annotations

import torch

from .base import KIND_CODE, Method, ParamSpec, ReduceContext, TokenAssignment, kept_count, register


def select_attentive(cls_attention: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Indices of the `ceil(keep_rate * n)` tokens with the highest class attention.

    Args:
        cls_attention: [B, n] class attention of the non-cls tokens (methods.md §1).
    Returns:
        [B, k] long token indices into the full sequence (cls = 0, so non-cls indices start at 1),
        sorted by descending class attention (EViT's `topk`, sorted=True).
    """
    k = kept_count(keep_rate, cls_attention.shape[1])
    return torch.topk(cls_attention, k, dim=1, largest=True, sorted=True).indices + 1


@register
class EViT(Method):
    name = "evit"
    label = "EViT"
    paper = "EViT, Liang et al., ICLR 2022"
    needs_cls_attention = True
    params = (
        ParamSpec("fuse", True, "bool", "Fuse the inattentive tokens into one extra token (EViT's default); off drops them."),
    )

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """EViT at one stage: [cls, kept (descending class attention), fused]; the fused token is the
        class-attention-weighted *sum* of the pruned tokens (methods.md §2, not normalised)."""
        attention = ctx.cls_attention
        batch, n = attention.shape
        kept = select_attentive(attention, ctx.keep_rate)
        k = kept.shape[1]
        if k == n:
            return None
        fuse = bool(ctx.params["fuse"])
        device = attention.device
        dest = torch.full((batch, n + 1), k + 1 if fuse else -1, dtype=torch.long, device=device)
        dest[:, 0] = 0
        dest.scatter_(1, kept, torch.arange(1, k + 1, device=device).expand(batch, k))
        pruned = dest[:, 1:] > k
        weight = torch.ones(batch, n + 1, dtype=attention.dtype, device=device)
        weight[:, 1:] = torch.where(pruned, attention, weight[:, 1:])
        n_out = k + 2 if fuse else k + 1
        kinds = torch.full((batch, n_out), KIND_CODE["kept"], dtype=torch.long, device=device)
        kinds[:, 0] = KIND_CODE["cls"]
        if fuse:
            kinds[:, -1] = KIND_CODE["fused"]
        pruned_full = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=device), pruned], 1)
        return TokenAssignment(dest=dest, weight=weight, n_out=n_out, normalize=False, kinds=kinds, pruned=pruned_full)
