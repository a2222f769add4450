"""GMACs (methods.md §8): the published figures, and agreement with torch's FlopCounterMode."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from analysis.engine import run
from analysis.gmacs import flop_counter, gmacs_report, plan_gmacs, plan_macs
from analysis.plan import ReductionPlan


@pytest.fixture(scope="module")
def models(tiny):
    """DeiT-T with real weights; DeiT-S and DeiT-B with random weights (counts do not depend on them)."""
    torch.manual_seed(0)
    small = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    base = timm.create_model("deit_base_patch16_224", pretrained=False).eval()
    return {"tiny": tiny.model, "small": small, "base": base}


def test_dense_gmacs_match_the_papers(models):
    assert round(plan_gmacs(models["tiny"], ReductionPlan()), 1) == 1.3
    assert round(plan_gmacs(models["small"], ReductionPlan()), 1) == 4.6
    assert round(plan_gmacs(models["base"], ReductionPlan()), 1) == 17.6


@pytest.mark.parametrize("keep_rate, expected", [(0.9, 4.0), (0.8, 3.5), (0.7, 3.0), (0.6, 2.6), (0.5, 2.3)])
def test_evit_deit_small_matches_the_paper(models, keep_rate, expected):
    assert round(plan_gmacs(models["small"], ReductionPlan.make("evit", keep_rate)), 1) == expected


def test_evit_tiny_and_base_at_keep_07(models):
    plan = ReductionPlan.make("evit", 0.7)
    assert round(plan_gmacs(models["tiny"], plan), 1) == 0.8
    assert round(plan_gmacs(models["base"], plan), 1) == 11.6


def test_breakdown_uses_the_real_token_counts(models):
    breakdown = plan_macs(models["tiny"], ReductionPlan.make("evit", 0.7))
    attention = [block.tokens_attention for block in breakdown.blocks]
    mlp = [block.tokens_mlp for block in breakdown.blocks]
    # EViT acts inside blocks 4, 7, 10: the attention sees the count before, the MLP the count after
    assert attention == [197, 197, 197, 197, 140, 140, 140, 100, 100, 100, 72, 72]
    assert mlp == [197, 197, 197, 140, 140, 140, 100, 100, 100, 72, 72, 72]
    own = [block.method_matmul for block in breakdown.blocks]
    assert own[3] == 197 * 192 and own[6] == 140 * 192 and own[9] == 100 * 192  # the class-attention row
    assert breakdown.blocks[3].method_elementwise == (196 - 138) * 192            # fused token: 58 weighted adds
    assert 0 < breakdown.method_share < 0.01
    report = gmacs_report(models["tiny"], ReductionPlan.make("evit", 0.7))
    assert report["dense_gmacs"] == pytest.approx(plan_gmacs(models["tiny"], ReductionPlan()))
    assert 30 < report["reduction_pct"] < 40
    # fusion off: no fused token, fewer tokens, fewer MACs
    assert plan_gmacs(models["tiny"], ReductionPlan.make("evit", 0.7, fuse=False)) < report["gmacs"]


def test_stage_shapes_carry_the_model_depth(models, monkeypatch):
    """`own_macs` sees the model's number of blocks (`StageShape.depth`), for rules that depend on a
    block's place in the network; DeiT-T has 12 blocks."""
    from analysis.registry import get_method

    seen = []
    method = get_method("evit")
    monkeypatch.setattr(type(method), "own_macs", lambda self, shape: seen.append((shape.layer, shape.depth)) or (0.0, 0.0))
    plan_macs(models["tiny"], ReductionPlan.make("evit", 0.7))
    assert seen == [(4, 12), (7, 12), (10, 12)]


def _flop_counter_macs(model, plan) -> float:
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    counter = flop_counter()
    with counter:
        run(model, image, plan, track=False)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "additive-mask"])
def test_flop_counter_counts_sdpa_on_the_cpu(mask):
    """The counter sees scaled_dot_product_attention on the CPU on every supported torch (2.14's own
    FlopCounterMode counts it only on CUDA): Q K^T and P V are 2 B H N^2 d MACs, 4 B H N^2 d FLOPs,
    with and without the additive mask ToMe's proportional attention passes."""
    batch, heads, n, d = 2, 3, 197, 64
    q = torch.randn(batch, heads, n, d, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(batch, 1, 1, n) if mask else None
    counter = flop_counter()
    with counter:
        F.scaled_dot_product_attention(q, q, q, attn_mask=bias)
    assert counter.get_total_flops() == 4 * batch * heads * n * n * d


@pytest.mark.parametrize("plan", [ReductionPlan(), ReductionPlan.make("evit", 0.7), ReductionPlan.make("evit", 0.5, fuse=False)],
                         ids=["dense", "evit0.7", "evit0.5-nofuse"])
def test_flop_counter_agrees(models, plan):
    """FlopCounterMode counts convolutions and matrix products, scaled_dot_product_attention
    included (2 N^2 C per image per block), and the cls-row product the engine computes; it does not
    count element-wise work, so it is compared with `matmul` (total minus element-wise)."""
    for name in ("tiny", "small"):
        ours = plan_macs(models[name], plan)
        counted = _flop_counter_macs(models[name], plan)
        assert ours.matmul == pytest.approx(counted, rel=0.02)
        assert ours.total >= ours.matmul


def _predictor_extras(width: int, stages: int = 3) -> dict:
    """Seeded dTPS / DynamicViT score-predictor weights (methods.md §3 shapes; official key names)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for s in range(stages):
        shapes = {"in_conv.0.weight": (width,), "in_conv.0.bias": (width,), "in_conv.1.weight": (width, width),
                  "in_conv.1.bias": (width,), "out_conv.0.weight": (width // 2, width), "out_conv.0.bias": (width // 2,),
                  "out_conv.2.weight": (width // 4, width // 2), "out_conv.2.bias": (width // 4,),
                  "out_conv.4.weight": (2, width // 4), "out_conv.4.bias": (2,)}
        for name, shape in shapes.items():
            state[f"{s}.{name}"] = torch.randn(*shape, generator=generator) * 0.1
    return {"score_predictor": state}


def test_every_method_agrees_with_the_flop_counter(models):
    """Each registered method's own work (cls row, similarities, bipartite scores, predictors) is
    counted like FlopCounterMode counts it; DPC-kNN's distance matrices (torch.cdist, which the
    counter does not see) are booked apart in `method_distances`."""
    from analysis.registry import all_methods
    METHODS = all_methods()

    extras = _predictor_extras(192)
    dense = plan_gmacs(models["tiny"], ReductionPlan())
    for name, method in METHODS.items():
        plan = ReductionPlan.make("tome", 1.0, None, r=13) if name == "tome" else ReductionPlan.make(name, 0.7)
        ours = plan_macs(models["tiny"], plan, extras)
        image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        counter = flop_counter()
        with counter:
            run(models["tiny"], image, plan, extras=extras, track=False)
        assert ours.matmul == pytest.approx(counter.get_total_flops() / 2, rel=0.02), name
        assert ours.gmacs < 0.7 * dense, name
        own = sum(b.method_matmul + b.method_distances + b.method_elementwise for b in ours.blocks)
        # every method's own work is counted; a method that reads nothing from the block and declares
        # no own work (random pruning) has none
        from analysis.methods.base import Method
        if method.needs or type(method).own_macs is not Method.own_macs:
            assert own > 0, name
        else:
            assert own == 0, name
        if name in ("bat", "dpc"):
            assert sum(b.method_distances for b in ours.blocks) > 0


class _KeepHalf:
    """Test methods: keep the first half of the image tokens at layer 4, reading the full attention
    (`needs`); one of them also transforms the attention (`transform_attention`)."""

    needs = frozenset({"attention", "cls_attention"})
    default_layers = (4,)

    def assign(self, ctx):
        from analysis.methods.base import keep_assignment

        assert ctx.attention is not None and ctx.cls_attention is not None
        n = ctx.x.shape[1] - 1
        kept = torch.arange(1, n // 2 + 1).expand(ctx.x.shape[0], -1)
        return keep_assignment(kept, n + 1)


def test_transform_attention_needs_cost_nothing_extra(models):
    """With `transform_attention` the engine computes the block's probabilities explicitly (Q K^T,
    P V: the block's own attention products) and reads the method's needs from them, so GMACs
    add nothing for them; without it, the full attention a method asks for is a second Q K^T."""
    from analysis import registry
    from analysis.methods.base import Method

    class Plain(_KeepHalf, Method):
        name = "test_gmacs_plain_attention"
        label = "test: needs the attention"

    class Transformed(_KeepHalf, Method):
        name = "test_gmacs_transformed_attention"
        label = "test: transforms the attention"

        def transform_attention(self, probs, ctx):
            return probs * 0.5 + 0.5 / probs.shape[-1]

    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    results = {}
    try:
        for cls in (Plain, Transformed):
            registry.register(cls)
            plan = ReductionPlan.make(cls.name, 1.0)
            ours = plan_macs(models["tiny"], plan)
            with flop_counter() as counter:
                run(models["tiny"], image, plan, track=False)
            assert ours.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-9), cls.name
            results[cls.name] = ours.blocks[3].method_matmul
    finally:
        for cls in (Plain, Transformed):
            registry.METHODS.pop(cls.name, None)
            registry._ORIGIN.pop(cls.name, None)  # noqa: SLF001 - test-only cleanup
    assert results["test_gmacs_plain_attention"] == 197 * 197 * 192
    assert results["test_gmacs_transformed_attention"] == 0
