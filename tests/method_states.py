"""Helpers for the method tests: real DeiT hidden states computed straight from methods.md §0-§1
with timm's own modules (explicit softmax, no engine), and the provenance invariants (§7)."""
from __future__ import annotations

import torch

from analysis.methods import KINDS


@torch.inference_mode()
def block_input(model: torch.nn.Module, images: torch.Tensor, block_index: int) -> torch.Tensor:
    """[B, N, C] the input of block `block_index` (0-based) of the dense model, via timm's blocks."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks[:block_index]:
        x = block(x)
    return x


@torch.inference_mode()
def inside_state(model: torch.nn.Module, images: torch.Tensor, block_index: int):
    """Where an "inside" method acts in block `block_index` of the dense model (methods.md §0):

    Returns (x [B, N, C] after the attention residual, cls_attention [B, N-1] = mean over heads of
    the post-softmax P[:, :, 0, 1:] (§1), keys [B, N, d] averaged over heads).
    """
    x = block_input(model, images, block_index)
    block = model.blocks[block_index]
    attn = block.attn
    batch, n, channels = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, n, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    p = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    x = x + attn.proj((p @ v).transpose(1, 2).reshape(batch, n, channels))
    return x, p[:, :, 0, 1:].mean(dim=1), k.mean(dim=1)


def check_provenance(result, num_patches: int = 196, allow_discard: bool = False) -> None:
    """Assert methods.md §7's invariants on every stage of an engine `Result`:
    patch_to_token in [-1, n_out); token sizes = patches per token; sum of sizes + discarded = P;
    cls holds no patch and is kind "cls"; every other token holds >= 1 patch (unless the method drops);
    kinds have one entry per token; patch_pruned / patch_weight shapes."""
    assert result.stages, "no stages recorded"
    for stage in result.stages:
        p2t = stage.patch_to_token
        batch, patches = p2t.shape
        assert patches == num_patches
        n_out = stage.n_tokens
        assert stage.token_sizes.shape == (batch, n_out)
        assert int(p2t.min()) >= -1 and int(p2t.max()) < n_out
        discarded = (p2t < 0).sum(dim=1)
        assert torch.equal(stage.token_sizes.sum(dim=1) + discarded, torch.full((batch,), num_patches))
        counted = torch.zeros(batch, n_out, dtype=torch.long).scatter_add_(1, p2t.clamp(min=0), (p2t >= 0).long())
        assert torch.equal(counted, stage.token_sizes)
        assert torch.all(stage.token_sizes[:, 0] == 0)
        assert torch.all(stage.token_kinds[:, 0] == KINDS.index("cls"))
        assert torch.all(stage.token_kinds[:, 1:] != KINDS.index("cls"))
        if not allow_discard:
            assert int(discarded.sum()) == 0
            assert torch.all(stage.token_sizes[:, 1:] >= 1)
        assert stage.patch_weight.shape == (batch, num_patches)
