"""EViT against a plain loop-based reference written straight from methods.md §2 (issue 2)."""
from __future__ import annotations

import math

import pytest
import torch

from analysis.engine import run

from analysis.plan import ReductionPlan
from analysis.methods import KINDS


def reference_evit(model, image: torch.Tensor, keep_rate: float, layers=(4, 7, 10), fuse=True):
    """One image [3, H, W] through DeiT with EViT, written as plainly as possible.

    Returns (logits [classes], kept patch sets per stage as lists of original patch numbers).
    """
    x = model._pos_embed(model.patch_embed(image[None]))[0]  # [N, C]
    origin = [[]] + [[p] for p in range(x.shape[0] - 1)]  # patches each token holds
    kept_sets = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        h = block.norm1(x)
        n_tokens = h.shape[0]
        qkv = attn.qkv(h).reshape(n_tokens, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.head_dim ** -0.5, dim=-1)  # full P, [H, N, N]
        out = (probs @ v).transpose(0, 1).reshape(n_tokens, -1)
        x = x + attn.proj(out)
        if index + 1 in layers:
            a = [float(probs[:, 0, j].mean()) for j in range(1, n_tokens)]  # class attention
            n = n_tokens - 1
            k_keep = math.ceil(round(keep_rate * n, 9))
            if k_keep < n:
                order = sorted(range(n), key=lambda j: -a[j])
                kept, pruned = order[:k_keep], order[k_keep:]
                tokens = [x[0]] + [x[j + 1] for j in kept]
                holds = [[]] + [origin[j + 1] for j in kept]
                if fuse:
                    fused = torch.zeros_like(x[0])
                    for j in pruned:
                        fused = fused + a[j] * x[j + 1]
                    tokens.append(fused)
                    holds.append([p for j in pruned for p in origin[j + 1]])
                x = torch.stack(tokens)
                origin = holds
                kept_sets.append(sorted(p for hold in holds[1:1 + k_keep] for p in hold))
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, kept_sets


@pytest.mark.parametrize("keep_rate, fuse", [(0.7, True), (0.7, False), (0.5, True)])
def test_evit_matches_reference(tiny, sample_batch, keep_rate, fuse):
    images = sample_batch[:4]
    result = run(tiny.model, images, ReductionPlan.make("evit", keep_rate, fuse=fuse))
    with torch.inference_mode():
        for index in range(images.shape[0]):
            logits, kept_sets = reference_evit(tiny.model, images[index], keep_rate, fuse=fuse)
            torch.testing.assert_close(result.logits[index], logits, atol=1e-4, rtol=0)
            assert len(kept_sets) == len(result.stages) == 3
            for stage, expected in zip(result.stages, kept_sets):
                kinds = stage.token_kinds[index]
                p2t = stage.patch_to_token[index]
                kept_token = kinds == KINDS.index("kept")
                held_by_kept = kept_token[p2t.clamp(min=0)] & (p2t >= 0)
                assert sorted(held_by_kept.nonzero().flatten().tolist()) == expected


def test_fused_token_is_unnormalised_weighted_sum(tiny, sample_batch):
    """The fused token's patches are exactly the pruned ones, and its share of each is the raw class attention."""
    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("evit", 0.7))
    stage = result.stages[0]
    fused_index = stage.n_tokens - 1
    in_fused = stage.patch_to_token == fused_index
    assert torch.equal(in_fused, stage.patch_pruned)
    torch.testing.assert_close(stage.patch_weight[in_fused], stage.cls_attention[in_fused])
    assert (stage.patch_weight[~in_fused] == 1).all()


@pytest.mark.parametrize("pixels, keep_rate", [(240, 0.56), (240, 0.28), (256, 0.68), (448, 0.675)])
def test_kept_count_is_the_official_ceil(pixels, keep_rate):
    """EViT keeps `math.ceil(keep_rate * (N - 1))` (youweiliang/evit), in IEEE double with no rounding:
    at these (grid, keep rate) pairs a product lands just above an integer (0.56 * 225 =
    126.00000000000001), and EViT keeps one token more than a rounded product would."""
    import math

    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=pixels).eval()
    images = torch.randn(1, 3, pixels, pixels, generator=torch.Generator().manual_seed(0))
    differs = False
    for fuse in (True, False):
        result = run(model, images, ReductionPlan.make("evit", keep_rate, fuse=fuse))
        n, official, rounded = (pixels // 16) ** 2 + 1, [], []
        for _ in (4, 7, 10):  # the official recurrence; a fused token counts among the next stage's tokens
            official.append(1 + math.ceil(keep_rate * (n - 1)) + fuse)
            rounded.append(1 + math.ceil(round(keep_rate * (n - 1), 9)) + fuse)
            n = official[-1]
        assert [result.token_counts[i] for i in (3, 6, 9)] == official, fuse
        differs |= official != rounded
    assert differs  # a rounded product keeps one token fewer at some stage of this pair
