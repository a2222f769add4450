"""The engine's capabilities beyond one fixed token count (docs/architecture.md): images that keep
different token counts in one batch (padding masked out of attention and of later decisions), a
method acting on the block's own attention before reducing (acts="attention"), a method that
transforms the attention (transform_attention), and tokens spread over several outputs (edges).
Each is driven by a small test method registered for the test, on the real DeiT-T weights."""
from __future__ import annotations

import pytest
import torch

from analysis import registry
from analysis.engine import run
from analysis.methods.base import Edges, Method, ParamSpec, TokenAssignment, keep_assignment, token_kinds
from analysis.plan import ReductionPlan
from method_states import check_provenance


@pytest.fixture()
def registered():
    """Register test methods for one test; unregister them afterwards."""
    names = []

    def add(cls):
        registry.register(cls)
        names.append(cls.name)
        return registry.get_method(cls.name)

    yield add
    for name in names:
        registry.METHODS.pop(name, None)
        registry._ORIGIN.pop(name, None)  # noqa: SLF001 - test-only cleanup of a builtin-origin entry


class AboveMean(Method):
    """Keep the tokens whose class attention exceeds the image's mean (over its own tokens): a count
    per image. Output [cls, kept (descending attention), padding]."""

    name = "test_above_mean"
    label = "test: above-mean class attention"
    needs = frozenset({"cls_attention"})

    def assign(self, ctx):
        attention = ctx.cls_attention  # [B, N-1]; padding has attention 0
        batch, n = attention.shape
        present = torch.ones(batch, n, dtype=torch.bool) if ctx.valid is None else ctx.valid[:, 1:]
        mean = (attention * present).sum(1, keepdim=True) / present.sum(1, keepdim=True)
        keep = present & (attention > mean)
        count = keep.sum(1)
        # kept tokens in position order (an order by attention would flip at float near-ties between batch sizes)
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
        width = int(count.max())
        kept = order[:, :width] + 1
        valid = torch.arange(width + 1).unsqueeze(0) <= count.unsqueeze(1)  # cls + each image's own count
        dest = torch.full((batch, n + 1), -1, dtype=torch.long)
        dest[:, 0] = 0
        slots = torch.arange(1, width + 1).expand(batch, width)
        dest.scatter_(1, torch.where(valid[:, 1:], kept, 0), torch.where(valid[:, 1:], slots, 0))
        dest[:, 0] = 0
        kinds = token_kinds(torch.where(valid[:, 1:], 1, 7))
        return TokenAssignment(dest=dest, weight=torch.ones(batch, n + 1), n_out=width + 1, kinds=kinds, valid=valid)


def test_per_image_counts_do_not_depend_on_the_batch(registered, tiny, sample_batch):
    """Padding is masked out of attention, the class token and later decisions: every image keeps the
    same tokens and logits alone as in a batch of 8."""
    registered(AboveMean)
    plan = ReductionPlan.make("test_above_mean", 1.0, (4, 7, 10))
    batch = run(tiny.model, sample_batch, plan, keep_block_outputs=True)
    finals = batch.image_token_counts[:, -1]
    assert len(set(finals.tolist())) > 1, "the test needs images that keep different counts"
    assert batch.token_counts[-1] == int(finals.max())
    check_provenance(batch, allow_discard=True)
    for index in range(sample_batch.shape[0]):
        alone = run(tiny.model, sample_batch[index:index + 1], plan)
        assert alone.image_token_counts[0].tolist() == batch.image_token_counts[index].tolist()
        for one, many in zip(alone.stages, batch.stages):
            assert torch.equal(one.patch_to_token[0], many.patch_to_token[index])
            assert one.kind_names(0) == many.kind_names(index)
        torch.testing.assert_close(alone.logits[0], batch.logits[index], atol=1e-5, rtol=0)
    # padding holds no patch and has size 0
    last = batch.stages[-1]
    for index in range(sample_batch.shape[0]):
        own = last.image_tokens(index)
        assert int(last.token_sizes[index, own:].sum()) == 0
        assert torch.all(batch.block_sizes[-1][index, own:] == 0)


@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "vit_wee_patch16_reg1_gap_256"])
def test_per_image_counts_without_a_class_token(registered, name):
    """A model without a class token scores by the mean attention each patch receives: padding
    queries are left out of that mean, so an image keeps its tokens and logits alone as in a batch
    (random weights: only the architecture matters)."""
    import timm

    registered(AboveMean)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().requires_grad_(False)
    height, width = model.patch_embed.img_size
    images = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(1))
    plan = ReductionPlan.make("test_above_mean", 1.0, (2, 3, 4))
    batch = run(model, images, plan)
    assert len(set(batch.image_token_counts[:, 2].tolist())) > 1, "the test needs images that keep different counts"
    for index in range(images.shape[0]):
        alone = run(model, images[index:index + 1], plan)
        assert alone.image_token_counts[0].tolist() == batch.image_token_counts[index].tolist()
        for one, many in zip(alone.stages, batch.stages):
            assert torch.equal(one.patch_to_token[0], many.patch_to_token[index])
            # the score each stage read (the mean attention received), padding queries left out
            torch.testing.assert_close(one.cls_attention[0], many.cls_attention[index], atol=1e-7, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(alone.logits[0], batch.logits[index], atol=1e-5, rtol=0)


class BeforeAttention(Method):
    """Keep the top half by this block's class attention of the *unreduced* tokens, then let the block
    attend with the kept rows and columns of that same attention, renormalised (acts="attention")."""

    name = "test_before_attention"
    label = "test: reduce with the block's own attention"
    acts = "attention"
    needs = frozenset({"cls_attention", "attention"})
    params = (ParamSpec("hand_over", True, "bool", "hand the reduced attention to the block"),)

    def assign(self, ctx):
        n = ctx.cls_attention.shape[1]
        kept = torch.topk(ctx.cls_attention, n // 2, dim=1).indices + 1
        assignment = keep_assignment(kept, n + 1)
        if ctx.params["hand_over"]:
            index = torch.cat([torch.zeros_like(kept[:, :1]), kept], dim=1)
            heads = ctx.attention.shape[1]
            rows = ctx.attention.gather(2, index[:, None, :, None].expand(-1, heads, -1, ctx.attention.shape[-1]))
            sub = rows.gather(3, index[:, None, None, :].expand(-1, heads, index.shape[1], -1))
            assignment.attention = sub / sub.sum(-1, keepdim=True)
        return assignment


def test_acting_on_the_blocks_own_attention(registered, tiny, sample_batch):
    """acts="attention": the block's attention of the unreduced tokens selects; the reduced map it hands
    over equals attention recomputed on the kept tokens (without proportional attention the kept
    rows and columns, renormalised, are exactly softmax over the kept keys)."""
    registered(BeforeAttention)
    handed = run(tiny.model, sample_batch, ReductionPlan.make("test_before_attention", 1.0, (4,)))
    recomputed = run(tiny.model, sample_batch, ReductionPlan.make("test_before_attention", 1.0, (4,), hand_over=False))
    assert handed.token_counts[3] == 1 + 98
    check_provenance(handed, allow_discard=True)
    torch.testing.assert_close(handed.logits, recomputed.logits, atol=2e-4, rtol=0)
    dense = run(tiny.model, sample_batch)
    assert (handed.logits - dense.logits).abs().max() > 1e-2  # it did reduce


def test_gmacs_of_a_block_acting_on_its_own_attention(registered, tiny, sample_batch):
    """acts="attention" with the attention handed on: q, k and Q K^T at the tokens entering the block,
    v, P V and the projection at the reduced count; plan_macs equals FlopCounterMode's count."""
    from analysis.gmacs import flop_counter, plan_macs

    registered(BeforeAttention)
    plan = ReductionPlan.make("test_before_attention", 1.0, (4, 8))
    counter = flop_counter()
    with counter:
        result = run(tiny.model, sample_batch[:1], plan, track=False)
    breakdown = plan_macs(tiny.model, plan, counts=result.token_counts)
    assert breakdown.matmul == counter.get_total_flops() / 2
    block = breakdown.blocks[3]
    assert (block.tokens_attention, block.tokens_mlp) == (197, 99)
    assert block.attention_products == (197 * 197 + 99 * 99) * 192
    assert block.attention_linear == 197 * 192 * 384 + 99 * (192 * 192 + 192 * 192)


class Sharpen(Method):
    """Square every attention probability and renormalise (transform_attention), at its layers only."""

    name = "test_sharpen"
    label = "test: sharpened attention"
    needs = frozenset({"cls_attention"})

    def transform_attention(self, probs, ctx):
        probs = probs ** 2
        return probs / probs.sum(-1, keepdim=True)

    def assign(self, ctx):
        return None


def test_transform_attention_changes_only_its_blocks(registered, tiny, sample_batch):
    registered(Sharpen)
    from method_states import block_input

    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("test_sharpen", 1.0, (12,)))
    # by hand: blocks 1..11 as timm, block 12 with the squared, renormalised attention
    model = tiny.model
    with torch.inference_mode():
        x = block_input(model, sample_batch[:2], 11)
        block = model.blocks[11]
        attn = block.attn
        b, n, c = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        p = ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(-1) ** 2
        p = p / p.sum(-1, keepdim=True)
        x = x + attn.proj((p @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        x = x + block.mlp(block.norm2(x))
        expected = model.forward_head(model.norm(x))
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)


class SharpenEverywhere(Sharpen):
    """Sharpen at every block (transform_every_block), keeping the top half by class attention at its
    reducing layers; records the stage each transform saw."""

    name = "test_sharpen_everywhere"
    label = "test: sharpened attention in every block"
    transform_every_block = True
    seen: list = []

    def transform_attention(self, probs, ctx):
        self.seen.append((ctx.block_index, ctx.stage))
        return super().transform_attention(probs, ctx)

    def assign(self, ctx):
        n = ctx.cls_attention.shape[1]
        return keep_assignment(torch.topk(ctx.cls_attention, n // 2, dim=1).indices + 1, n + 1)


def test_transform_every_block_and_its_gmacs(registered, tiny, sample_batch):
    """transform_every_block: every block attends with the transformed attention (ctx.stage -1 off
    the reducing layers); the class-attention row comes from that matrix, so GMACs count no extra
    row and equal the flop counter's."""
    from analysis.gmacs import flop_counter, needs_macs, plan_macs

    method = registered(SharpenEverywhere)
    method.seen.clear()
    plan = ReductionPlan.make("test_sharpen_everywhere", 1.0, (6,))
    images = sample_batch[:2]
    result = run(tiny.model, images, plan)
    assert method.seen == [(b, 0 if b == 5 else -1) for b in range(12)]
    model = tiny.model
    with torch.inference_mode():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for index, block in enumerate(model.blocks):
            attn = block.attn
            b, n, c = x.shape
            qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
            p = ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(-1) ** 2
            p = p / p.sum(-1, keepdim=True)
            x = x + attn.proj((p @ qkv[2]).transpose(1, 2).reshape(b, n, c))
            if index == 5:
                kept = torch.topk(p.mean(1)[:, 0, 1:], 98, dim=1).indices + 1
                x = torch.cat([x[:, :1], x.gather(1, kept.unsqueeze(-1).expand(-1, -1, c))], dim=1)
            x = x + block.mlp(block.norm2(x))
        expected = model.forward_head(model.norm(x))
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)
    macs = plan_macs(model, plan)
    with flop_counter() as counter:
        run(model, images[:1], plan, track=False)
    assert macs.matmul == counter.get_total_flops() / 2
    assert macs.blocks[5].method_matmul == 0.0 < needs_macs(method.needs, 197, 192)


class SpreadHalf(Method):
    """Drop the odd tokens, each spread over its two even neighbours with weight 1/2 (edges)."""

    name = "test_spread"
    label = "test: spread over two tokens"

    def assign(self, ctx):
        batch, n_tokens, _ = ctx.x.shape
        kept = torch.arange(2, n_tokens, 2).expand(batch, -1)  # even non-cls positions
        k = kept.shape[1]
        dest = torch.full((batch, n_tokens), -1, dtype=torch.long)
        dest[:, 0] = 0
        dest.scatter_(1, kept, torch.arange(1, k + 1).expand(batch, k))
        odd = torch.arange(1, n_tokens, 2)
        left = torch.clamp((odd - 1) // 2, min=1, max=k)       # slot of the even token before (or the first)
        right = torch.clamp((odd + 1) // 2, min=1, max=k)      # slot of the even token after (or the last)
        dest[:, odd] = left
        weight = torch.ones(batch, n_tokens)
        weight[:, odd] = 0.5
        edges = Edges(source=odd.expand(batch, -1), target=right.expand(batch, -1), weight=torch.full((batch, odd.numel()), 0.5))
        pruned = torch.zeros(batch, n_tokens, dtype=torch.bool)
        pruned[:, odd] = True
        kinds = token_kinds("host", k + 1, batch, ctx.x.device)
        return TokenAssignment(dest=dest, weight=weight, n_out=k + 1, kinds=kinds, combine="sum", pruned=pruned, edges=edges)


def test_edges_spread_a_token_over_several_outputs(registered, tiny, sample_batch):
    from analysis.methods.base import apply_assignment
    from analysis.provenance import StageRecord

    registered(SpreadHalf)
    x = torch.randn(2, 197, 8, generator=torch.Generator().manual_seed(0))
    ctx = type("Ctx", (), {"x": x})()
    assignment = SpreadHalf().assign(ctx)
    out, sizes, share, edge_share = apply_assignment(assignment, x, torch.ones(2, 197))
    # by hand: even token 2j + (odd neighbours) / 2
    expected = torch.zeros(2, 99, 8)
    expected[:, 0] = x[:, 0]
    for slot in range(1, 99):
        expected[:, slot] += x[:, 2 * slot]
    for t in range(1, 197, 2):
        expected[:, min(max((t - 1) // 2, 1), 98)] += 0.5 * x[:, t]
        expected[:, min(max((t + 1) // 2, 1), 98)] += 0.5 * x[:, t]
    torch.testing.assert_close(out, expected)
    assert torch.all(edge_share == 0.5)
    result = run(tiny.model, sample_batch[:1], ReductionPlan.make("test_spread", 1.0, (6,)))
    record = StageRecord.from_stage(result.stages[0], 0)
    others = record.other_hosts()
    assert len(others) == 98 and all(len(pairs) == 1 and pairs[0][1] == 0.5 for pairs in others.values())
    assert sum(len(pairs) for pairs in others.values()) == int(record.patch_pruned.sum())


class RecordGrid(Method):
    """Change nothing; record the patch grid the engine hands to a method."""

    name = "test_record_grid"
    label = "test: records ctx.grid"
    default_layers = (1,)
    seen: list = []

    def assign(self, ctx):
        RecordGrid.seen.append((ctx.grid, ctx.num_patches))
        return None


def test_context_gives_the_patch_grid(registered, tiny, sample_batch):
    """`ReduceContext.grid`: (rows, cols) of the patch grid, also when it is not square."""
    import timm

    registered(RecordGrid)
    RecordGrid.seen.clear()
    run(tiny.model, sample_batch[:1], ReductionPlan.make("test_record_grid", 1.0))
    torch.manual_seed(0)
    wide = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=(160, 224)).eval()
    run(wide, torch.randn(1, 3, 160, 224), ReductionPlan.make("test_record_grid", 1.0))
    assert RecordGrid.seen == [((14, 14), 196), ((10, 14), 140)]
