"""Backbones beyond DeiT (issue: "Backbones beyond DeiT"): every supported family, with random weights
(`pretrained=False`; only the architecture matters here):

- the dense engine equals timm's own `model(x)` (max |logit difference| <= 1e-4);
- keep rate 1.0 (each method's `budget(1.0)`) equals the dense model, for every method;
- every method runs once at keep rate 0.7's budget with consistent provenance on the model's own
  patch grid (methods that cannot run on the model say why);
- prefix tokens (class, distillation, registers) are never pruned or merged.

Large variants are marked `large` and run only with TOKENSCOPE_LARGE_TESTS=1: a plain `pytest` still
runs at least one model per family.
"""
from __future__ import annotations

import os

import pytest
import timm
import torch

from analysis.engine import Layout, method_unavailable, run
from analysis.errors import ModelError, PlanError
from analysis.gmacs import flop_counter, plan_gmacs, plan_macs
from analysis.models import check_architecture
from analysis.plan import ReductionPlan
from analysis.registry import all_methods
from method_states import check_provenance

LARGE = pytest.mark.skipif(not os.environ.get("TOKENSCOPE_LARGE_TESTS"), reason="large model: set TOKENSCOPE_LARGE_TESTS=1")

# (family, timm name, create_model overrides)
FAMILIES = [
    pytest.param("DeiT", "deit_tiny_patch16_224", {}, id="deit"),
    pytest.param("DeiT distilled", "deit_tiny_distilled_patch16_224", {}, id="deit-distilled"),
    pytest.param("DeiT-III (LayerScale)", "deit3_small_patch16_224", {}, id="deit3"),
    pytest.param("AugReg ViT 224", "vit_small_patch16_224.augreg_in21k_ft_in1k", {}, id="augreg-s-224"),
    pytest.param("AugReg ViT 384", "vit_small_patch16_384.augreg_in21k_ft_in1k", {}, id="augreg-s-384"),
    pytest.param("AugReg ViT-B 224", "vit_base_patch16_224.augreg_in21k_ft_in1k", {}, id="augreg-b-224", marks=LARGE),
    pytest.param("AugReg ViT-B 384", "vit_base_patch16_384.augreg_in21k_ft_in1k", {}, id="augreg-b-384", marks=LARGE),
    pytest.param("AugReg ViT-L 224", "vit_large_patch16_224.augreg_in21k_ft_in1k", {}, id="augreg-l-224", marks=LARGE),
    pytest.param("AugReg ViT-L 384", "vit_large_patch16_384.augreg_in21k_ft_in1k", {}, id="augreg-l-384", marks=LARGE),
    pytest.param("MAE (global pool)", "vit_base_patch16_224.mae", {"global_pool": "avg"}, id="mae"),
    pytest.param("CLIP", "vit_base_patch16_clip_224", {}, id="clip"),
    pytest.param("CLIP QuickGELU", "vit_base_patch16_clip_quickgelu_224", {}, id="clip-quickgelu", marks=LARGE),
    pytest.param("DINOv2", "vit_small_patch14_dinov2", {"img_size": 224}, id="dinov2"),
    pytest.param("DINOv2 registers", "vit_small_patch14_reg4_dinov2", {"img_size": 224}, id="dinov2-reg4"),
    pytest.param("DINOv2 518 px", "vit_small_patch14_dinov2", {}, id="dinov2-518", marks=LARGE),
    pytest.param("SigLIP (attention pool)", "vit_base_patch16_siglip_224", {}, id="siglip"),
    pytest.param("global-average-pool ViT", "vit_wee_patch16_reg1_gap_256", {}, id="gap"),
    pytest.param("non-square grid", "deit_tiny_patch16_224", {"img_size": (160, 224)}, id="non-square"),
    pytest.param("dynamic image size", "deit_tiny_patch16_224", {"dynamic_img_size": True}, id="dynamic"),
]


def _model(name: str, overrides: dict):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **overrides).eval().requires_grad_(False)
    check_architecture(model, name)
    return model


def _images(model, count: int = 2, size=None) -> torch.Tensor:
    height, width = size or model.patch_embed.img_size
    return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family, name, overrides", FAMILIES)
def test_family(family, name, overrides):
    model = _model(name, overrides)
    images = _images(model)
    layout = Layout.of(model)
    grid = tuple(model.patch_embed.grid_size)
    num_patches = grid[0] * grid[1]
    with torch.inference_mode():
        expected = model(images)
    dense = run(model, images)
    assert (dense.logits - expected).abs().max().item() <= 1e-4, family
    assert dense.token_counts[0] == num_patches + layout.prefix
    # budgets are in the methods' view of the sequence: the class token (or its placeholder slot in a
    # model without one) and the patches, prefix tokens set aside (Method.budget, engine.Layout)
    depth, n0 = len(model.blocks), num_patches + 1
    for method_name, method in all_methods().items():
        if method.unavailable_reason({}):
            continue  # needs weights of its own (dTPS / DynamicViT predictors)
        reason = method_unavailable(method, model)
        if reason:
            with pytest.raises(PlanError, match="cannot run on this model"):
                run(model, images, method.budget(0.7, depth, n0))
            continue
        full = run(model, images, method.budget(1.0, depth, n0))
        assert (full.logits - dense.logits).abs().max().item() <= 1e-4, (family, method_name, "keep rate 1.0")
        result = run(model, images, method.budget(0.7, depth, n0))
        assert result.logits.shape == dense.logits.shape and torch.isfinite(result.logits).all(), (family, method_name)
        assert result.token_counts[-1] < dense.token_counts[-1], (family, method_name, "nothing was reduced")
        check_provenance(result, num_patches=num_patches, allow_discard=True)
        counts = result.image_token_counts
        assert torch.all(counts >= layout.prefix + (0 if layout.has_cls else 0))
        for stage in result.stages:  # prefix tokens are not patches: provenance covers the patches only
            assert stage.patch_to_token.shape == (images.shape[0], num_patches)


def test_prefix_tokens_are_never_pruned_or_merged():
    """DINOv2 with 4 registers: the class token and the registers keep their place at the front and
    their size 1 through every stage (nothing is merged into them); only patch tokens are reduced."""
    model = _model("vit_small_patch14_reg4_dinov2", {"img_size": 224})
    images = _images(model)
    for method in ("evit", "tome", "etps", "bat", "dpc"):
        result = run(model, images, ReductionPlan.make(method, 0.7), keep_block_outputs=True)
        for sizes, count in zip(result.block_sizes, result.token_counts):
            assert sizes.shape[1] == count and torch.all(sizes[:, :5] == 1), method
        assert result.token_counts[-1] - 5 == sum(int(s) for s in result.stages[-1].token_sizes[0] > 0) - (0 if method == "evit" else 0)


def test_global_pool_is_size_weighted():
    """`global_pool="avg"` over reduced tokens weighs each by the patches it holds (ToMe's MAE patch).
    Two textures, one per half of the image, and no position code: ToMe merges only exact duplicates,
    so with proportional attention every block computes what the dense model computes, and the
    size-weighted pool equals the dense pool, while the plain mean of the remaining tokens does not."""
    model = _model("deit_tiny_patch16_224", {"global_pool": "avg"})
    model.pos_embed.zero_()  # no position code: patches of one texture give identical tokens
    generator = torch.Generator().manual_seed(3)
    top, bottom = (torch.randn(1, 3, 16, 16, generator=generator) for _ in range(2))
    images = torch.cat([top.repeat(1, 1, 4, 14), bottom.repeat(1, 1, 10, 14)], dim=2)  # 56 + 140 patches
    dense = run(model, images)
    merged = run(model, images, ReductionPlan.make("tome", 1.0, r=13, prop_attn=True), keep_block_outputs=True)
    assert merged.token_counts[-1] == 41
    torch.testing.assert_close(merged.logits, dense.logits, atol=1e-4, rtol=1e-4)
    tokens, sizes = merged.block_outputs[-1][:, 1:], merged.block_sizes[-1][:, 1:]
    assert sizes.min() < sizes.max()  # the merged tokens hold different numbers of patches
    plain = model.forward_head(model.norm(torch.cat([tokens[:, :1], tokens], dim=1)))  # unweighted mean
    assert (plain - dense.logits).abs().max() > 1e-2


def test_no_class_token_uses_the_mean_attention_received():
    """SigLIP has no class token: a method that scores by class attention gets the mean attention each
    patch receives (methods.md §1), so EViT keeps the most-attended patches; its GMACs count the full
    attention matrix that substitute needs, and agree with the flop counter."""
    model = _model("vit_base_patch16_siglip_224", {})
    images = _images(model, 1)
    result = run(model, images, ReductionPlan.make("evit", 0.7, fuse=False))
    assert result.token_counts[3] == 138  # no class token: 138 patches and nothing else
    macs = plan_macs(model, ReductionPlan.make("evit", 0.7, fuse=False))
    counter = flop_counter()
    with counter:
        run(model, images, ReductionPlan.make("evit", 0.7, fuse=False), track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)


@pytest.mark.parametrize("name, overrides, gmacs", [
    ("vit_base_patch16_384", {}, 55.54),
    ("deit_base_patch16_224", {}, 17.58),
    ("vit_small_patch14_dinov2", {}, 46.76),           # at its 518 px
    ("vit_base_patch16_siglip_224", {}, 17.73),        # the attention-pool head included
    ("vit_base_patch16_gap_224", {}, 17.49),           # no class token
    ("vit_small_patch16_384.augreg_in21k_ft_in1k", {}, 15.52),
])
def test_gmacs_match_timms_table(name, overrides, gmacs):
    """Dense GMACs equal timm's own benchmark table (huggingface/pytorch-image-models,
    results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv, column infer_gmacs) to 0.1 G. For ViT-B/16
    at 384 px that is 55.54; without the attention products Q K^T and P V (2 N^2 C per block) the count
    is 49.3, what a flop counter that misses the fused attention kernel reports."""
    model = _model(name, overrides)
    macs = plan_macs(model, ReductionPlan())
    assert macs.gmacs == pytest.approx(gmacs, abs=0.1)
    if name == "vit_base_patch16_384":
        assert (macs.total - sum(block.attention_products for block in macs.blocks)) / 1e9 == pytest.approx(49.3, abs=0.1)
    assert plan_gmacs(model, ReductionPlan.make("tome", 1.0, r=8)) < macs.gmacs


@pytest.mark.parametrize("name, reason", [
    ("swin_tiny_patch4_window7_224", "windowed attention"),
    ("eva02_tiny_patch14_224", "rotary position embeddings"),
    ("beit_base_patch16_224", "relative position bias"),
    ("vit_relpos_small_patch16_224", "relative position bias"),
    ("vit_pwee_patch16_reg1_gap_256", "ParallelScalingBlock"),
])
def test_unsupported_families_say_why(name, reason):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with pytest.raises(ModelError, match=reason) as info:
        check_architecture(model, name)
    assert "\n" not in str(info.value)


def test_inspect_json_for_registers_and_layerscale(capsys):
    """The issue's two commands: DINOv2 with registers under ToMe, DeiT-III under EViT, random weights."""
    import json

    from analysis.cli import main
    from conftest import ROOT

    image = str(ROOT / "assets" / "cat.jpg")
    for model, method in (("vit_small_patch14_reg4_dinov2", "tome"), ("deit3_small_patch16_224", "evit")):
        code = main(["inspect", image, "--model", model, "--weights", "random", "--method", method, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        record = json.loads(out)[0]
        patches = 37 * 37 if "dinov2" in model else 196
        assert all(len(stage["patch_to_token"]) == patches for stage in record["stages"]) and record["stages"]
        assert "random" in record["weights"]
