"""DiffRate (methods.md §14) on the real DeiT-Tiny weights and ImageNet photos.

Covered here: one block and the whole network against a plain-loop reference written from the spec
(float64 on both sides), the published token counts and GFLOPs, the model check, GMACs against the
flop counter, the budget, the CLI JSON and bad parameters.
"""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_gmacs, plan_macs
from analysis.methods import KINDS, apply_assignment
from analysis.methods.base import keep_rate_counts
from analysis.methods.diffrate import (
    PUBLISHED, SETTINGS, diffrate_assignment, diffrate_counts, matched_lists, published_lists, stage_counts,
)
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance, inside_state


# ------------------------------------------------------------------------------------------------
# The plain-loop reference (methods.md §14), one image, Python lists
# ------------------------------------------------------------------------------------------------

def reference_block(x: torch.Tensor, cls_attention: list[float], sizes: list[float], prune_kept: int, merge_kept: int,
                    weighted: bool = False, size_rule: str = "similarity"):
    """One DiffRate block for one image [N, C], token by token. Returns None when all N tokens stay,
    else (groups: the output tokens in output order, each the list of input tokens it holds, its
    host first; merged rows [n_out, C]; new sizes)."""
    n = x.shape[0]
    mid = min(n, prune_kept)
    out = min(mid, merge_kept)
    if out >= n:
        return None
    ranking = [0] + sorted(range(1, n), key=lambda j: -cls_attention[j - 1])  # stable: ties by position
    hosts, sources = ranking[:out], ranking[out:mid]
    unit = [x[i] / x[i].norm() for i in range(n)]
    groups = {h: [h] for h in hosts}
    gain = {}
    for s in sources:
        best = best_host = None
        for h in hosts[1:]:  # never into cls
            value = float(unit[s] @ unit[h])
            if best is None or value > best:
                best, best_host = value, h
        groups[best_host].append(s)
        gain[s] = best
    rows, new_sizes = [], []
    for h in hosts:
        members = groups[h]
        w = [sizes[i] if weighted else 1.0 for i in members]
        rows.append(sum(wi * x[i] for wi, i in zip(w, members)) / sum(w))
        if size_rule == "similarity":
            new_sizes.append(sizes[h] + sum(sizes[s] * gain[s] for s in members[1:]))
        else:
            new_sizes.append(sum(sizes[i] for i in members))
    return [groups[h] for h in hosts], torch.stack(rows), new_sizes


@torch.inference_mode()
def reference_diffrate(model, image: torch.Tensor, prune: list[int], merge: list[int], prop_attn: bool = True,
                       weighted: bool = False, size_rule: str = "similarity"):
    """The whole DeiT forward with DiffRate in every block, written plainly for one image.
    Returns (logits [1000], per block the output tokens in order as lists of 0-based patches)."""
    x = block_input(model, image[None], 0)[0]
    sizes = [1.0] * x.shape[0]
    members: list[list[int]] = [[]] + [[p] for p in range(x.shape[0] - 1)]
    blocks = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        n, channels = x.shape
        heads, d = attn.num_heads, channels // attn.num_heads
        qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn:
            logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
        p = logits.softmax(-1)
        x = x + attn.proj((p @ v).transpose(0, 1).reshape(n, channels))
        cls_attention = p[:, 0, 1:].mean(0).tolist()
        step = reference_block(x, cls_attention, sizes, prune[index], merge[index], weighted, size_rule)
        if step is not None:
            groups, x, sizes = step
            members = [sorted(q for i in group for q in members[i]) for group in groups]
        blocks.append([list(m) for m in members])
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, blocks


def tokens_of(result, b: int) -> list[list[list[int]]]:
    """Per block, the output tokens of image b in order, each as its sorted 0-based patches (from the engine's provenance)."""
    layer_of = {stage.layer: stage for stage in result.stages}
    current = [[]] + [[p] for p in range(196)]
    out = []
    for layer in range(1, len(result.token_counts) + 1):
        stage = layer_of.get(layer)
        if stage is not None:
            groups = [[] for _ in range(stage.n_tokens)]
            for patch, token in enumerate(stage.patch_to_token[b].tolist()):
                if token >= 0:
                    groups[token].append(patch)
            current = groups
        out.append(current)
    return out


@pytest.fixture(scope="module")
def tiny64(tiny):
    """A float64 copy of DeiT-T (the shared model is not modified)."""
    return copy.deepcopy(tiny.model).double().eval()


def random_deit(name: str) -> torch.nn.Module:
    """A DeiT of another size with random weights (only its shape matters: counts and GMACs)."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_index, prune_kept, merge_kept, weighted, size_rule", [
    (3, 186, 172, False, "similarity"), (8, 92, 84, True, "similarity"), (5, 197, 150, False, "count"), (10, 120, 130, False, "similarity"),
], ids=["prune+merge", "weighted", "merge-only", "prune-only"])
def test_one_block_matches_the_loop_reference(tiny64, sample_batch, block_index, prune_kept, merge_kept, weighted, size_rule):
    """dest, output order, merged states, sizes and kinds of one block equal the loop reference, on
    real DeiT-T states with uneven sizes (float64 on both sides)."""
    x, cls_attention, _ = inside_state(tiny64, sample_batch[:3].double(), block_index)
    generator = torch.Generator().manual_seed(block_index)
    sizes = torch.rand(x.shape[:2], generator=generator, dtype=torch.float64) * 3 + 0.5
    sizes[:, 0] = 1
    assignment = diffrate_assignment(x, cls_attention, sizes, prune_kept, merge_kept, size_rule, weighted, held=torch.ones_like(sizes))
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    mid, n_out = stage_counts(197, prune_kept, merge_kept)
    assert assignment.n_out == n_out
    for b in range(3):
        groups, rows, new_sizes = reference_block(x[b], cls_attention[b].tolist(), sizes[b].tolist(), prune_kept, merge_kept,
                                                  weighted, size_rule)
        dest = [-1] * 197
        for position, group in enumerate(groups):
            for token in group:
                dest[token] = position
        assert assignment.dest[b].tolist() == dest
        assert (assignment.dest[b] == -1).sum() == 197 - mid
        torch.testing.assert_close(out[b], rows, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(sizes_out[b], torch.tensor(new_sizes, dtype=sizes_out.dtype), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(assignment.extra["attention_size"][b], sizes_out[b], atol=0, rtol=0)
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        assert kinds == ["cls"] + ["merged" if len(g) > 1 else "kept" for g in groups[1:]]


def test_known_behaviours_of_the_official_code(tiny64, sample_batch):
    """The hosts are the most attended tokens, cls never hosts, merging is a plain mean (a weighted
    merge differs once sizes differ), the similarity-aware size is below the count, and a block
    that keeps every token returns nothing."""
    x, cls_attention, _ = inside_state(tiny64, sample_batch[:2].double(), 6)
    sizes = torch.ones(x.shape[:2], dtype=torch.float64)
    assignment = diffrate_assignment(x, cls_attention, sizes, 150, 120)
    order = torch.sort(cls_attention, dim=1, descending=True, stable=True).indices + 1
    for b in range(2):
        hosts = order[b, :119]
        assert assignment.dest[b, hosts].tolist() == list(range(1, 120))  # [cls, hosts by descending attention]
        assert bool((assignment.dest[b, order[b, 149:]] == -1).all())  # the least attended are pruned
        merged = order[b, 119:149]
        assert bool((assignment.dest[b, merged] >= 1).all())  # into a host, never into cls
    counts = torch.zeros(2, 120, dtype=torch.long).scatter_add_(1, assignment.dest.clamp(min=0), (assignment.dest >= 0).long())
    assert torch.all(assignment.sizes[:, 1:] <= counts[:, 1:].double() + 1e-12)
    assert torch.any(assignment.sizes[:, 1:] < counts[:, 1:].double() - 1e-3)  # cosine < 1: smaller than a count
    assert assignment.combine == "mean" and torch.all(assignment.weight == 1)
    assert diffrate_assignment(x, cls_attention, sizes, 197, 197) is None
    assert diffrate_assignment(x, cls_attention, sizes, 250, 197) is None
    assert get_method("diffrate").proportional_attention(ReductionPlan.make("diffrate").param_dict())


@pytest.mark.parametrize("setting", ["ViT-T-DeiT:0.8", "ViT-T-DeiT:0.6", "ViT-T-DeiT:1.0"])
def test_whole_network_matches_the_loop_reference(tiny64, sample_batch, setting):
    """The engine with a published DeiT-T setting (float64 copy of DeiT-T) against the plain reference
    forward: the same tokens in the same order after every block, and the logits to 1e-6 (sizes are float32)."""
    images = sample_batch[:2].double()
    prune, merge = published_lists(setting)
    result = run(tiny64, images, ReductionPlan.make("diffrate", setting=setting))
    check_provenance(result, allow_discard=True)
    assert result.token_counts == diffrate_counts(prune, merge)
    for b in range(images.shape[0]):
        logits, blocks = reference_diffrate(tiny64, images[b], list(prune), list(merge))
        assert tokens_of(result, b) == blocks
        # the engine keeps token sizes in float32 (log(size) in the attention): logits to 1e-6
        torch.testing.assert_close(result.logits[b].double(), logits, atol=1e-6, rtol=1e-6)


def test_variants_follow_the_reference(tiny64, sample_batch):
    """Custom lists (one per reducing layer), a size-weighted merge, count sizes and no proportional attention."""
    images = sample_batch[2:3].double()
    prune = (197, 190, 180, 170, 150, 130, 110, 100, 90, 80, 70, 10)
    merge = (190, 180, 160, 140, 140, 110, 100, 80, 70, 60, 50, 5)
    for extra in ({}, {"weighted_merge": True, "size_rule": "count"}, {"prop_attn": False}):
        plan = ReductionPlan.make("diffrate", setting="custom", prune_kept_num=prune, merge_kept_num=merge, **extra)
        result = run(tiny64, images, plan)
        logits, blocks = reference_diffrate(tiny64, images[0], list(prune), list(merge), extra.get("prop_attn", True),
                                            extra.get("weighted_merge", False), extra.get("size_rule", "similarity"))
        assert tokens_of(result, 0) == blocks
        torch.testing.assert_close(result.logits[0].double(), logits, atol=1e-6, rtol=1e-6)


def test_custom_lists_on_chosen_layers(tiny, sample_batch):
    """Custom lists index the reducing layers, a single number applies to all of them; a rising
    count changes nothing."""
    plan = ReductionPlan.make("diffrate", 1.0, (4, 7, 10), setting="custom", prune_kept_num=(180, 120, 60), merge_kept_num=(150, 100, 40))
    result = run(tiny.model, sample_batch[:2], plan)
    assert result.token_counts == [197] * 3 + [150] * 3 + [100] * 3 + [40] * 3
    assert [stage.layer for stage in result.stages] == [4, 7, 10]
    assert result.stages[0].notes[0] == "17 pruned, 30 merged into the 149 most attended tokens (prune_kept 180, merge_kept 150)"
    single = run(tiny.model, sample_batch[:1], ReductionPlan.make("diffrate", 1.0, (2, 5), setting="custom", prune_kept_num=150,
                                                                   merge_kept_num=120), track=False)
    assert single.token_counts == [197, 120, 120, 120, 120, 120] + [120] * 6


def official_gflops(counts: list[int], channels: int, classes: int = 1000) -> float:
    """The official counter (`calculate_flop_inference`, DiffRate/patch/deit.py) from the tokens
    leaving each block: 4NC^2 + 2N^2C (attention, N entering) + 8N'C^2 (MLP, N' leaving) per block,
    the patch embedding on 197 tokens and the classifier; multiply-adds, in G."""
    n, total = 197, 197 * channels * 16 * 16 * 3 + channels * classes
    for after in counts:
        total += 4 * n * channels ** 2 + 2 * n * n * channels + 8 * after * channels ** 2
        n = after
    return total / 1e9


@pytest.mark.parametrize("model_key", sorted(PUBLISHED))
def test_published_counts_and_gflops(tiny, model_key):
    """Every published setting runs with its counts, and our GMACs equal the official counter's within
    0.5 % (theirs puts the patch embedding on 197 tokens and counts no method work; ours adds the
    class-attention row and the merge similarities). The official count is near the target in the
    setting's name (0.6 gives 0.655 on DeiT-T): within 0.06 G or 1.5 %."""
    model = tiny.model if model_key == "ViT-T-DeiT" else random_deit(
        {"ViT-S-DeiT": "deit_small_patch16_224", "ViT-B-DeiT": "deit_base_patch16_224"}[model_key])
    for flops, (prune, merge) in PUBLISHED[model_key].items():
        plan = ReductionPlan.make("diffrate", setting=f"{model_key}:{flops}")
        counts = diffrate_counts(prune, merge)
        gmacs = plan_gmacs(model, plan)
        assert run(model, torch.randn(1, 3, 224, 224), plan, track=False).token_counts == counts
        theirs = official_gflops(counts, model.embed_dim)
        assert gmacs == pytest.approx(theirs, rel=0.005), (flops, gmacs, theirs)
        assert abs(theirs - float(flops)) < max(0.06, 0.015 * float(flops)), (flops, theirs)
    assert len(SETTINGS) == 16 and SETTINGS[-1] == "custom"
    # the official README's eval results ("flops 2.905", "flops 11.517") from the copied lists
    readme = {"ViT-S-DeiT": ("2.9", 384, 2.905), "ViT-B-DeiT": ("11.5", 768, 11.517)}
    if model_key in readme:
        flops, width, printed = readme[model_key]
        assert round(official_gflops(diffrate_counts(*PUBLISHED[model_key][flops]), width), 3) == printed


def test_published_setting_on_another_model_is_refused(tiny, sample_batch):
    small = random_deit("deit_small_patch16_224")
    image = torch.randn(1, 3, 224, 224)
    with pytest.raises(PlanError, match="searched on deit_tiny_patch16_224 \\(width 192") as caught:
        run(small, image, ReductionPlan.make("diffrate"))
    assert "\n" not in str(caught.value) and "width 384" in str(caught.value)
    with pytest.raises(PlanError, match="searched on deit_small_patch16_224"):
        run(tiny.model, sample_batch[:1], ReductionPlan.make("diffrate", setting="ViT-S-DeiT:2.9"))
    anyway = run(tiny.model, sample_batch[:1], ReductionPlan.make("diffrate", setting="ViT-S-DeiT:2.9", check_model=False))
    assert anyway.token_counts == diffrate_counts(*published_lists("ViT-S-DeiT:2.9"))
    assert run(small, image, ReductionPlan.make("diffrate", setting="ViT-S-DeiT:2.9"), track=False).token_counts[-1] == 3


@pytest.mark.parametrize("params", [{}, {"setting": "ViT-T-DeiT:0.6"},
                                    {"setting": "custom", "prune_kept_num": (197, 150, 150), "merge_kept_num": (180, 150, 120)}],
                         ids=["default", "0.6", "custom"])
def test_gmacs_match_the_flop_counter(tiny, params):
    layers = (2, 6, 9) if params.get("setting") == "custom" else None
    plan = ReductionPlan.make("diffrate", 1.0, layers, **params)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with flop_counter() as counter:
        result = run(tiny.model, image, plan, track=False)
    breakdown = plan_macs(tiny.model, plan, counts=result.token_counts)
    assert breakdown.matmul == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    if not params:
        # block 4 of ViT-T-DeiT:0.8: 190 in, 186 after pruning, 172 left: 14 x 172 x 192 similarities
        fourth = breakdown.blocks[3]
        assert fourth.method_matmul == 14 * 172 * 192 + 190 * 192 and fourth.method_elementwise == 14 * 192
    assert 0 < breakdown.method_share < 0.03


def test_budget_follows_the_keep_rate_counts(tiny, sample_batch):
    method = get_method("diffrate")
    for keep_rate in (0.9, 0.7, 0.5):
        target = keep_rate_counts(keep_rate)
        plan = method.budget(keep_rate, 12, 197)
        plan.validate(12)
        params = plan.param_dict()
        assert params["setting"] == "custom"
        assert diffrate_counts(params["prune_kept_num"], params["merge_kept_num"]) == target
    plan = method.budget(0.7, 12, 197)
    assert plan.param_dict()["prune_kept_num"] == (197, 197, 197, 168, 139, 139, 119, 98, 98, 84, 69, 69)
    assert plan.param_dict()["merge_kept_num"] == (197, 197, 197, 139, 139, 139, 98, 98, 98, 69, 69, 69)
    result = run(tiny.model, sample_batch[:2], plan)
    assert result.token_counts == keep_rate_counts(0.7)
    assert result.stages[0].notes[0].startswith("29 pruned, 29 merged")
    rising = [197, 150, 151, 100]
    assert matched_lists(rising) == ((197, 174, 150, 125), (197, 150, 150, 100))
    assert method.budget(0.7, 12, 197, target_counts=rising).param_dict()["merge_kept_num"] == (197, 150, 150, 100)
    assert method.budget(0.7, 12, 197, schedule="matched") == plan
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[3]), "--model", TINY, "--device", "cpu", "--method", "diffrate", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["method"] == "diffrate"
    counts = diffrate_counts(*published_lists("ViT-T-DeiT:0.8"))
    assert record["token_counts"] == counts
    params = record["params"]
    assert params["setting"] == "ViT-T-DeiT:0.8" and params["prop_attn"] is True and params["size_rule"] == "similarity"
    assert params["weighted_merge"] is False and params["layers"] == list(range(1, 13))
    assert len(record["stages"]) == 11  # block 1 keeps all 197 tokens
    for stage, count in zip(record["stages"], counts[1:]):
        assert len(stage["token_kinds"]) == count and stage["token_kinds"][0] == "cls"
    assert sum(record["stages"][0]["token_sizes"]) == 196 and sum(record["stages"][-1]["token_sizes"]) < 196
    assert record["stages"][2]["note"] == "4 pruned, 14 merged into the 171 most attended tokens (prune_kept 186, merge_kept 172)"
    assert 0 < record["gmacs"] < record["dense_gmacs"]


@pytest.mark.parametrize("params, message", [
    ({"setting": "ViT-T-DeiT:0.75"}, "setting must be one of"),
    ({"setting": "custom", "merge_kept_num": 1}, "merge_kept_num must be at least 2"),
    ({"setting": "custom", "prune_kept_num": 0}, "prune_kept_num must be at least 1"),
    ({"setting": "custom", "prune_kept_num": (190, 180)}, "prune_kept_num list has 2 entries"),
    ({"size_rule": "mean"}, "size_rule must be one of"),
    ({"prop_attn": "maybe"}, "prop_attn must be true or false"),
    ({"bogus": 1}, "has no parameter 'bogus'"),
])
def test_bad_parameters_give_a_one_line_plan_error(tiny, sample_batch, params, message):
    plan = ReductionPlan.make("diffrate", **params)
    with pytest.raises(PlanError, match=message) as caught:
        run(tiny.model, sample_batch[:1], plan)
    assert "\n" not in str(caught.value)
