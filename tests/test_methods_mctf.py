"""MCTF (methods.md §12) on the real DeiT-Tiny weights and ImageNet photos.

Covered here: one block and the whole network against a plain-loop reference written from the spec
(the partition and order of the tokens, the merged tokens, sizes, kinds and the attention handed
on), the official token counts and merge rule, batch independence, ties, GMACs against
FlopCounterMode, the budget, the CLI JSON and bad parameters.

The loop reference runs in float64 and so does the vectorised code it is compared with (the method
keeps float64 inputs in float64; the engine's float32 attention probabilities are computed in the
model's dtype for these tests). In float32 two correct implementations may order a near-tie of
scores differently; in float64 the decisions on these photos are far above the rounding.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import analysis.engine as engine
from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_macs
from analysis.methods import KINDS, apply_assignment
from analysis.methods.base import keep_rate_counts
from analysis.methods.mctf import (
    attraction, matched_mctf_schedule, mctf_assignment, mctf_counts, mctf_merges, r_for_keep_rate,
)
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance

# Tokens (cls included) leaving blocks 1..12 in the official eval settings (run/eval_deit_t_mctf.sh,
# run/eval_deit_t_mctf_fast.sh; the official model's sequence lengths, /work/scratch/mctf/NOTES.md).
OFFICIAL_COUNTS = {
    "default": [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21],
    "fast": [197, 197, 197, 129, 129, 129, 85, 85, 85, 56, 56, 56],
}
FAST = dict(layers=(4, 7, 10), r_share=0.35)
DEFAULTS = dict(tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirection=True, pooling="attention_size")


# ------------------------------------------------------------------------------------------------
# The plain-loop reference (methods.md §12), one image, Python lists
# ------------------------------------------------------------------------------------------------

def reference_groups(x: torch.Tensor, attention: torch.Tensor, sizes: list[float], r: int, tau_sim: float = 1.0,
                     tau_info: float = 20.0, tau_size: float = 40.0, bidirection: bool = True) -> list[list[int]]:
    """One MCTF block for one image (x [N, C], attention [H, N, N]), pair by pair. Returns the output
    tokens in output order, each as the list of input tokens it holds ([0] is cls)."""
    n = x.shape[0]
    unit = x.double() / x.double().norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).tolist()  # the cosine of every pair (the definition)
    p = attention.double().tolist()
    heads = len(p)
    received = [sum(p[h][q][j] for h in range(heads) for q in range(n)) / (heads * n) for j in range(n)]
    info = [1 / a for a in received]
    info = [v / max(info) for v in info]
    inverse = [1 / s for s in sizes]
    inverse = [v / max(inverse) for v in inverse]
    side_a, side_b = list(range(0, n, 2)), list(range(1, n, 2))

    def score(i: int, j: int) -> float:
        if i == 0:
            return -math.inf
        w = ((cos[i][j] + 1) / 2) ** (1 / tau_sim) if tau_sim else 1.0
        if tau_info:
            w *= (info[i] * info[j]) ** (1 / tau_info)
        if tau_size:
            w *= (inverse[i] * inverse[j]) ** (1 / tau_size)
        return w

    w = [[score(i, j) for j in side_b] for i in side_a]
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)

    def best(row: list[float]) -> tuple[float, int]:
        top = 0
        for q in range(1, len(row)):
            if row[q] > row[top]:
                top = q
        return row[top], top

    first = [best(row) for row in w]
    ranking = sorted(range(len(side_a)), key=lambda a: -first[a][0])  # stable: ties by position
    moving, staying = ranking[:r1], sorted(ranking[r1:])
    b_groups = [[side_b[j]] + [side_a[a] for a in moving if first[a][1] == j] for j in range(len(side_b))]
    a_groups = [[side_a[a]] for a in staying]
    if not bidirection:
        return a_groups + b_groups
    second = [best([w[a][j] for a in staying]) for j in range(len(side_b))]
    ranking2 = sorted(range(len(side_b)), key=lambda j: -second[j][0])
    for j in ranking2[:r2]:
        a_groups[second[j][1]] += b_groups[j]
    return a_groups + [b_groups[j] for j in ranking2[r2:]]


def reference_weights(attention: torch.Tensor, sizes: list[float], pooling: str) -> list[float]:
    n = attention.shape[-1]
    p = attention.double().tolist()
    received = [sum(p[h][q][j] for h in range(len(p)) for q in range(n)) / (len(p) * n) for j in range(n)]
    if pooling == "attention_size":
        return [received[i] * sizes[i] / max(sizes) for i in range(n)]
    return list(sizes) if pooling == "size" else [1.0] * n


def reference_merge(x: torch.Tensor, attention: torch.Tensor, sizes: list[float], weights: list[float],
                    groups: list[list[int]]):
    """Weighted means of the groups' tokens, their sizes, and the attention handed on: every group's
    keys summed, its queries averaged with the same weights. Returns (x [n_out, C], sizes, attention [H, n_out, n_out])."""
    p = attention.double().tolist()
    rows, new_sizes, shares = [], [], {}
    for group in groups:
        total = sum(weights[i] for i in group)
        rows.append(sum(weights[i] * x[i] for i in group) / total)
        new_sizes.append(sum(sizes[i] for i in group))
        for i in group:
            shares[i] = weights[i] / total
    handed = [[[sum(shares[i] * sum(p[h][i][j] for j in cols) for i in group) for cols in groups] for group in groups]
              for h in range(len(p))]
    return torch.stack(rows), new_sizes, torch.tensor(handed, dtype=torch.float64)


@torch.inference_mode()
def reference_mctf(model, image: torch.Tensor, layers=tuple(range(2, 13)), r: float = 16, prop_attn: bool = True,
                   pooling: str = "attention_size", **taus):
    """The whole DeiT forward with MCTF, written plainly for one image (float64 model).
    Returns (logits [1000], per block each patch's output token index)."""
    x = block_input(model, image[None], 0)[0]
    sizes = [1.0] * x.shape[0]
    members: list[list[int]] = [[]] + [[p] for p in range(x.shape[0] - 1)]
    maps = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        n, channels = x.shape
        heads, d = attn.num_heads, channels // attn.num_heads
        qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
        logits = (qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale
        if prop_attn:
            logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
        probs = logits.softmax(-1)
        merges = mctf_merges(n, r) if index + 1 in layers else 0
        if merges > 0:
            groups = reference_groups(x, probs, sizes, merges, **taus)
            weights = reference_weights(probs, sizes, pooling)
            x, sizes, probs = reference_merge(x, probs, sizes, weights, groups)
            members = [sorted(p for i in group for p in members[i]) for group in groups]
            n = x.shape[0]
            v = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)[2]
        else:
            v = qkv[2]
        x = x + attn.proj((probs @ v).transpose(0, 1).reshape(n, channels))
        x = x + block.mlp(block.norm2(x))
        where = [0] * 196
        for token, group in enumerate(members):
            for patch in group:
                where[patch] = token
        maps.append(where)
    return model.forward_head(model.norm(x)[None])[0], maps


@pytest.fixture(scope="module")
def tiny64(tiny):
    """A float64 copy of DeiT-T (the shared model is not modified)."""
    return copy.deepcopy(tiny.model).double().eval()


@pytest.fixture()
def float64_attention(monkeypatch):
    """The engine's explicit attention probabilities in the model's dtype (float32 otherwise)."""
    def probabilities(q, k, scale, bias):
        logits = (q @ k.transpose(-2, -1)) * scale
        return (logits if bias is None else logits + bias).softmax(dim=-1)

    monkeypatch.setattr(engine, "_probabilities", probabilities)


def block_state(model, images: torch.Tensor, block_index: int, sizes: torch.Tensor):
    """(x [B, N, C] block input, attention [B, H, N, N] with log(sizes) added) of the dense model."""
    x = block_input(model, images, block_index)
    block = model.blocks[block_index]
    attn = block.attn
    batch, n, channels = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, n, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale + sizes.log().to(x.dtype)[:, None, None, :]
    return x, logits.softmax(dim=-1)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_index, r, params", [
    (1, 16, {}),
    (6, 33, {"bidirection": False, "pooling": "size"}),
    (9, 21, {"tau_sim": 0.0, "tau_size": 0.0, "pooling": "mean"}),
    (3, 7, {"tau_info": 0.0, "tau_sim": 2.0}),
], ids=["default-block2", "one-way-size", "info-only-mean", "odd-r-no-info"])
def test_one_block_matches_the_loop_reference(tiny64, sample_batch, block_index, r, params):
    """dest, output order, merged tokens, sizes, kinds and the handed-on attention of one block equal the
    loop reference, on real DeiT-T states with uneven token sizes (float64 on both sides)."""
    images = sample_batch[:3].double()
    generator = torch.Generator().manual_seed(block_index)
    sizes = torch.randint(1, 5, (3, 197), generator=generator).double()
    sizes[:, 0] = 1
    x, attention = block_state(tiny64, images, block_index, sizes)
    p = {**DEFAULTS, **params}
    assignment = mctf_assignment(x, attention, sizes, r, p["tau_sim"], p["tau_info"], p["tau_size"], p["bidirection"], p["pooling"])
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    assert assignment.n_out == 197 - r
    for b in range(3):
        groups = reference_groups(x[b], attention[b], sizes[b].tolist(), r, p["tau_sim"], p["tau_info"], p["tau_size"],
                                  p["bidirection"])
        dest = [0] * 197
        for position, group in enumerate(groups):
            for token in group:
                dest[token] = position
        assert assignment.dest[b].tolist() == dest
        weights = reference_weights(attention[b], sizes[b].tolist(), p["pooling"])
        expected, expected_sizes, handed = reference_merge(x[b], attention[b], sizes[b].tolist(), weights, groups)
        torch.testing.assert_close(out[b], expected, atol=1e-10, rtol=1e-10)
        assert sizes_out[b].tolist() == expected_sizes
        torch.testing.assert_close(assignment.attention[b], handed, atol=1e-12, rtol=1e-10)
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        assert kinds == ["cls"] + ["merged" if s > 1 else "kept" for s in expected_sizes[1:]]
    torch.testing.assert_close(assignment.attention.sum(-1), torch.ones(3, 3, 197 - r, dtype=torch.float64))


@pytest.mark.parametrize("setting", ["default", "fast", "paper-variants"])
def test_whole_network_matches_the_loop_reference(tiny64, sample_batch, float64_attention, setting):
    """The engine with MCTF (float64 DeiT-T) against the plain reference forward: every patch's output
    token after every block (partition and order), the token counts and the logits."""
    images = sample_batch[3:5].double()
    if setting == "default":
        plan, kwargs = ReductionPlan.make("mctf"), {}
    elif setting == "fast":
        plan, kwargs = ReductionPlan.make("mctf", 1.0, FAST["layers"], r_share=0.35), {"layers": FAST["layers"], "r": 0.35}
    else:
        plan = ReductionPlan.make("mctf", 1.0, (2, 5, 8, 11), r=25, bidirection=False, pooling="size", prop_attn=False,
                                  tau_info=10.0)
        kwargs = {"layers": (2, 5, 8, 11), "r": 25, "bidirection": False, "pooling": "size", "prop_attn": False,
                  "tau_info": 10.0}
    result = run(tiny64, images, plan)
    check_provenance(result)
    stage_of = {stage.layer: stage for stage in result.stages}
    for b in range(images.shape[0]):
        logits, maps = reference_mctf(tiny64, images[b], **kwargs)
        current = list(range(1, 197))
        for block in range(12):
            if block + 1 in stage_of:
                current = stage_of[block + 1].patch_to_token[b].tolist()
            assert current == maps[block], f"block {block + 1}"
        torch.testing.assert_close(result.logits[b].double(), logits, atol=1e-6, rtol=1e-6)  # Result.logits are float32
    if setting in OFFICIAL_COUNTS:
        assert result.token_counts == OFFICIAL_COUNTS[setting]


def test_the_official_merge_rule_and_counts(tiny, sample_batch):
    """r as a count or a share of the patch tokens, at most (N-1)//2 and N-10 (utils/mctf.py `mctf`)."""
    assert mctf_merges(197, 16) == 16 and mctf_merges(197, 0.35) == 68 and mctf_merges(129, 0.35) == 44
    assert mctf_merges(197, 150) == 98 and mctf_merges(21, 16) == 10 and mctf_merges(12, 16) == 2
    assert mctf_merges(10, 16) == 0 and mctf_merges(197, 0) == 0 and mctf_merges(9, 0.35) == 0
    assert mctf_counts(16) == OFFICIAL_COUNTS["default"]
    assert mctf_counts(16, layers=FAST["layers"], r_share=0.35) == OFFICIAL_COUNTS["fast"]
    # 77 -> 39: half of 76 patch tokens; 39 -> 20: (38 // 2); 20 -> 11: 9 of 19; 11 -> 10: N - 10; then none
    assert mctf_counts(40) == [197, 157, 117, 77, 39, 20, 11, 10, 10, 10, 10, 10]
    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("mctf", r=40))
    assert result.token_counts == mctf_counts(40)
    check_provenance(result)
    assert [stage.layer for stage in result.stages] == [2, 3, 4, 5, 6, 7, 8]  # nothing merges below 10 tokens
    assert {KINDS[c] for c in result.stages[0].token_kinds.flatten().tolist()} == {"cls", "kept", "merged"}
    assert result.stages[0].notes == ["40 merged: 20 A->B, 20 B->A"] * 2
    assert get_method("mctf").proportional_attention(ReductionPlan.make("mctf").param_dict())


def test_batch_equals_one_image_at_a_time(tiny, sample_batch):
    """The vectorised assignment on 4 images equals the same images one by one (float32, real states)."""
    sizes = torch.ones(4, 197)
    x, attention = block_state(tiny.model, sample_batch[:4], 5, sizes)
    together = mctf_assignment(x, attention, sizes, 16)
    for b in range(4):
        alone = mctf_assignment(x[b:b + 1], attention[b:b + 1], sizes[b:b + 1], 16)
        assert torch.equal(together.dest[b], alone.dest[0])
        torch.testing.assert_close(together.attention[b], alone.attention[0])


def test_exact_ties_go_by_position(tiny, sample_batch):
    """Two A tokens with identical states, attention and size have the same best score: the earlier one
    merges first (stable sort), at a cut between them the later one stays; partners tie to the first B."""
    sizes = torch.ones(1, 197)
    x, attention = block_state(tiny.model, sample_batch[:1], 4, sizes)
    x, attention = x.clone(), attention.clone()
    scores = attraction(x, attention, sizes, 1.0, 20.0, 40.0)
    best = scores.max(-1).values[0]
    top = int(best[1:].argmax()) + 1          # the A token (index into A) with the highest best score
    twin = 50 if top != 50 else 51
    x[:, 2 * twin] = x[:, 2 * top]
    attention[..., 2 * twin] = attention[..., 2 * top]
    scores = attraction(x, attention, sizes, 1.0, 20.0, 40.0)
    assert scores[0, top].max() == scores[0, twin].max() == scores[0, 1:].max(-1).values.max()
    first, second = sorted((top, twin))
    one = mctf_assignment(x, attention, sizes, 2, bidirection=False)  # r = 2 ... one more merge decides the cut
    assert one.dest[0, 2 * first] >= one.n_out - 98 and one.dest[0, 2 * second] >= one.n_out - 98, "both twins merge into B"
    cut = mctf_assignment(x, attention, sizes, 1, bidirection=False)
    assert cut.dest[0, 2 * first] >= cut.n_out - 98, "the earlier twin merges"
    assert cut.dest[0, 2 * second] < cut.n_out - 98, "the later twin stays"


def test_parameters_change_the_result(tiny, sample_batch):
    images = sample_batch[:2]
    base = run(tiny.model, images, ReductionPlan.make("mctf"), track=False)
    for params in ({"prop_attn": False}, {"pooling": "size"}, {"bidirection": False}, {"tau_info": 0.0}):
        other = run(tiny.model, images, ReductionPlan.make("mctf", **params), track=False)
        assert other.token_counts == base.token_counts
        assert not torch.allclose(other.logits, base.logits, atol=1e-3), params
    none = run(tiny.model, images, ReductionPlan.make("mctf", r=0))
    dense = run(tiny.model, images)
    torch.testing.assert_close(none.logits, dense.logits, atol=1e-4, rtol=1e-4)
    assert none.stages == [] and none.token_counts == [197] * 12


@pytest.mark.parametrize("params", [{}, {"layers": FAST["layers"], "r_share": 0.35},
                                    {"bidirection": False, "tau_sim": 0.0, "r": 9}], ids=["default", "fast", "one-way-no-sim"])
def test_gmacs_match_the_flop_counter(tiny, params):
    params = dict(params)
    layers = params.pop("layers", None)
    plan = ReductionPlan.make("mctf", 1.0, layers, **params)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    counter = flop_counter()
    with counter:
        result = run(tiny.model, image, plan, track=False)
    breakdown = plan_macs(tiny.model, plan, counts=result.token_counts)
    assert breakdown.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    block = breakdown.blocks[(layers or (2,))[0] - 1]
    n, n_out = 197, result.token_counts[(layers or (2,))[0] - 1]
    assert block.attention_products == (n * n + n_out * n_out) * 192
    assert block.method_matmul == (0 if params.get("tau_sim") == 0.0 else 99 * 98 * 192)
    assert block.method_elementwise == 2 * 99 * 98 + 197 * 192 + 3 * 197 * n_out
    assert 0 < breakdown.method_share < 0.05


def test_budget_meets_the_keep_rates(tiny, sample_batch):
    method = get_method("mctf")
    for keep_rate in (0.9, 0.8, 0.7, 0.6, 0.5):
        budget = sum(keep_rate_counts(keep_rate))
        plan = method.budget(keep_rate, 12, 197)
        r = plan.param_dict()["r"]
        assert r == r_for_keep_rate(keep_rate) and plan.layers is None
        total = sum(mctf_counts(r))
        for other in (r - 1, r + 1):  # the neighbours are no nearer
            assert abs(sum(mctf_counts(other)) - budget) >= abs(total - budget)
        assert abs(total - budget) <= 0.03 * budget, (keep_rate, r, total, budget)  # one r step moves ~66 tokens
    assert method.budget(0.7, 12, 197).param_dict()["r"] == 13
    target = keep_rate_counts(0.7)
    matched = method.budget(0.7, 12, 197, target_counts=target)
    assert matched.param_dict()["r"] == matched_mctf_schedule(target) == (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0)
    assert matched.layers == tuple(range(1, 13)) and method.budget(0.7, 12, 197, schedule="matched") == matched
    assert run(tiny.model, sample_batch[:1], matched, track=False).token_counts == target
    low = keep_rate_counts(0.05)
    assert mctf_counts(matched_mctf_schedule(low), layers=range(1, 13))[-1] == max(10, low[-1])  # the official floor of 10
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[5]), "--model", TINY, "--device", "cpu", "--method", "mctf",
                 "--layers", "4,7,10", "--r-share", "0.35", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["method"] == "mctf" and record["token_counts"] == OFFICIAL_COUNTS["fast"]
    params = record["params"]
    assert params["layers"] == [4, 7, 10] and params["r_share"] == 0.35 and params["r"] == 16
    assert params["tau_sim"] == 1.0 and params["tau_info"] == 20.0 and params["tau_size"] == 40.0
    assert params["bidirection"] is True and params["pooling"] == "attention_size" and params["prop_attn"] is True
    assert [len(stage["token_kinds"]) for stage in record["stages"]] == [129, 85, 56]
    assert all(sum(stage["token_sizes"]) == 196 and stage["token_kinds"][0] == "cls" for stage in record["stages"])
    assert record["stages"][0]["note"] == "68 merged: 34 A->B, 34 B->A"
    assert 0 < record["gmacs"] < record["dense_gmacs"]


@pytest.mark.parametrize("params, message", [
    ({"r": -1}, "r must be at least 0"),
    ({"r": (16, 16)}, "r list has 2 entries"),
    ({"r_share": 1.5}, "r_share must be at most 0.99"),
    ({"tau_info": -1}, "tau_info must be at least 0"),
    ({"tau_sim": "x"}, "tau_sim must be a number"),
    ({"pooling": "max"}, "pooling must be one of attention_size, size, mean"),
    ({"bogus": 1}, "has no parameter 'bogus'"),
])
def test_bad_parameters_give_a_one_line_plan_error(tiny, sample_batch, params, message):
    plan = ReductionPlan.make("mctf", **params)
    with pytest.raises(PlanError, match=message) as caught:
        run(tiny.model, sample_batch[:1], plan)
    assert "\n" not in str(caught.value)


def test_refused_on_a_model_with_more_prefix_tokens():
    """It hands the block's attention on, which the engine supports for [cls, patches] models only."""
    from analysis.engine import Layout, layout_reason

    assert "prefix tokens" in layout_reason(get_method("mctf"), Layout(5, True))
    assert layout_reason(get_method("mctf"), Layout(1, True)) is None


def test_stages_draw_merge_groups(tiny, sample_files):
    """Every MCTF stage is drawn as merge groups over the photo (the shared picture code, nothing of its own)."""
    from analysis.models import load_image, preprocess
    from analysis.provenance import StageRecord
    from viz.overlays import stage_view, suggested_view

    photo = load_image(sample_files[7])
    result = run(tiny.model, preprocess([photo], tiny.model), ReductionPlan.make("mctf", 1.0, FAST["layers"], r_share=0.35))
    for stage in result.stages:
        record = StageRecord.from_stage(stage, 0)
        assert suggested_view(record) == "merge"
        picture = stage_view(photo.resize((224, 224)), record, (14, 14))
        assert picture.width >= 224 and picture.height >= 224
