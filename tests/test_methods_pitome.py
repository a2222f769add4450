"""PiToMe (methods.md §10) on the real DeiT-Tiny weights and ImageNet photos.

Covered here: one block and the whole network against a plain-loop reference written from the spec,
the official token counts, provenance, GMACs, the budget, the CLI JSON and bad parameters.

The loop reference runs in float64 and so does the vectorised code it is compared with (the method
keeps float64 keys in float64). In float32, about 1 block decision in 9 has an energy gap under 1e-6
(the official dumps, methods.md §10), so two float32 implementations may rank a near-tie
differently. In float64 the same decisions have gaps far above the rounding.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_macs
from analysis.methods import KINDS, apply_assignment
from analysis.methods.base import keep_rate_counts
from analysis.methods.pitome import (
    block_margin, bsm_blocks, energy_scores, matched_merge_schedule, merges_for_ratio, pitome_assignment, pitome_counts,
    ratio_for_keep_rate,
)
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance, inside_state

# Tokens (cls included) leaving blocks 1..12 in the official run (hchautran/PiToMe @ 550b5de, DeiT-T,
# every image of the batch): /work/scratch/pitome/NOTES.md §4.
OFFICIAL_COUNTS = {
    0.9: [178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60],
    0.9125: [180, 165, 151, 138, 127, 116, 106, 97, 89, 82, 75, 69],
    0.925: [183, 170, 158, 147, 137, 127, 118, 110, 102, 95, 88, 82],
    0.95: [188, 179, 171, 163, 155, 148, 141, 134, 128, 122, 116, 111],
    0.975: [193, 189, 185, 181, 177, 173, 169, 165, 161, 157, 154, 151],
}
OFFICIAL_R_09 = [19, 17, 16, 14, 13, 11, 10, 9, 8, 7, 7, 6]


# ------------------------------------------------------------------------------------------------
# The plain-loop reference (methods.md §10), one image, Python lists
# ------------------------------------------------------------------------------------------------

def reference_groups(keys: torch.Tensor, r: int, margin: float, alpha: float, bsm: bool) -> list[list[int]]:
    """One PiToMe block for one image [N, d], token by token. Returns the output tokens in output
    order, each as the list of input tokens it holds, its own token first ([0] is cls)."""
    n = keys.shape[0]
    t = n - 1
    r = min(r, t // 2)
    unit = keys[1:].double() / keys[1:].double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sim = (unit @ unit.T).tolist()  # cosine of every pair of patch tokens (the definition)

    def elu(value: float) -> float:
        return value if value > 0 else alpha * (math.exp(value) - 1.0)

    energy = [sum(elu(sim[i][j] - margin) for j in range(t)) / t for i in range(t)]
    ranking = sorted(range(t), key=lambda i: -energy[i])  # stable: ties by position
    if bsm:
        side_a, side_b, protected = ranking[0::2], ranking[1::2], []
    else:
        side_a, side_b, protected = ranking[0:2 * r:2], ranking[1:2 * r:2], ranking[2 * r:]
    partner = {}
    for a in side_a:
        best = 0
        for q in range(1, len(side_b)):
            if sim[a][side_b[q]] > sim[a][side_b[best]]:
                best = q
        partner[a] = (sim[a][side_b[best]], side_b[best])
    if bsm:
        by_score = sorted(side_a, key=lambda a: -partner[a][0])
        merging, head = by_score[:r], by_score[r:]
    else:
        merging, head = side_a, protected
    groups = [[0]] + [[i + 1] for i in head]
    for b in side_b:
        groups.append([b + 1] + [a + 1 for a in merging if partner[a][1] == b])
    return groups


def reference_merge(x: torch.Tensor, sizes: list[float], groups: list[list[int]]) -> tuple[torch.Tensor, list[float]]:
    """The size-weighted mean of every group, and the groups' sizes."""
    rows, new_sizes = [], []
    for group in groups:
        total = sum(sizes[i] for i in group)
        rows.append(sum(sizes[i] * x[i] for i in group) / total)
        new_sizes.append(total)
    return torch.stack(rows), new_sizes


@torch.inference_mode()
def reference_pitome(model, image: torch.Tensor, ratio: float = 0.9, margin: float = 0.75, bsm_share: float = 0.5,
                     prop_attn: bool = False):
    """The whole DeiT forward with PiToMe in every block, written plainly for one image.
    Returns (logits [1000], per block the partition of the 196 patches into tokens, per block r)."""
    x = block_input(model, image[None], 0)[0]
    sizes = [1.0] * x.shape[0]
    members: list[list[int]] = [[]] + [[p] for p in range(x.shape[0] - 1)]
    depth = len(model.blocks)
    partitions, merges = [], []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        n, channels = x.shape
        heads, d = attn.num_heads, channels // attn.num_heads
        qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn:
            logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
        x = x + attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, channels))
        t = n - 1
        r = math.floor(t - t * ratio)  # the official formula, merge.py l.163
        m = margin - margin * index / depth
        groups = reference_groups(k.mean(0), r, m, 1.0, index < math.ceil(depth * bsm_share))
        x, sizes = reference_merge(x, sizes, groups)
        members = [sorted(p for i in group for p in members[i]) for group in groups]
        partitions.append({frozenset(group) for group in members[1:]})
        merges.append(r)
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, partitions, merges


def partition_of(patch_to_token: torch.Tensor) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for patch, token in enumerate(patch_to_token.tolist()):
        groups.setdefault(token, set()).add(patch)
    return {frozenset(group) for group in groups.values()}


@pytest.fixture(scope="module")
def tiny64(tiny):
    """A float64 copy of DeiT-T (the shared model is not modified)."""
    return copy.deepcopy(tiny.model).double().eval()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_index, bsm", [(2, True), (8, False), (0, False)], ids=["bsm-block3", "protect-block9", "protect-block1"])
def test_one_block_matches_the_loop_reference(tiny64, sample_batch, block_index, bsm):
    """dest, output order, merged states, sizes and kinds of one block equal the loop reference, on
    real DeiT-T states with uneven token sizes (float64 on both sides)."""
    x, _, keys = inside_state(tiny64, sample_batch[:4].double(), block_index)
    generator = torch.Generator().manual_seed(block_index)
    sizes = torch.randint(1, 4, x.shape[:2], generator=generator).float()
    sizes[:, 0] = 1
    t = x.shape[1] - 1
    r = merges_for_ratio(t, 0.9)
    margin = block_margin(0.75, block_index, 12)
    assignment = pitome_assignment(keys, sizes, r, margin, 1.0, bsm)
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    assert assignment.n_out == 1 + t - r
    for b in range(4):
        groups = reference_groups(keys[b], r, margin, 1.0, bsm)
        dest = [0] * x.shape[1]
        for position, group in enumerate(groups):
            for token in group:
                dest[token] = position
        assert assignment.dest[b].tolist() == dest
        expected, expected_sizes = reference_merge(x[b], sizes[b].tolist(), groups)
        torch.testing.assert_close(out[b], expected, atol=1e-10, rtol=1e-10)
        assert sizes_out[b].tolist() == expected_sizes
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        assert kinds == ["cls"] + ["merged" if s > 1 else "kept" for s in expected_sizes[1:]]


def test_known_behaviours_of_the_official_code(tiny64, sample_batch):
    """Blocks 1-6 split the whole energy ranking (low-energy tokens merge too); the other blocks
    merge only inside the top 2r and merge every A token there."""
    x, _, keys = inside_state(tiny64, sample_batch[:4].double(), 0)
    t, r = 196, 19
    bsm = pitome_assignment(keys, torch.ones(x.shape[:2]), r, 0.75, 1.0, bsm=True)
    protect = pitome_assignment(keys, torch.ones(x.shape[:2]), r, 0.75, 1.0, bsm=False)
    _, energy = energy_scores(keys[:, 1:], 0.75)
    rank = torch.empty_like(energy, dtype=torch.long).scatter_(
        1, torch.sort(energy, dim=1, descending=True, stable=True).indices, torch.arange(t).expand(4, t))
    deep_merges = 0
    for b in range(4):
        for assignment, bsm_mode in ((bsm, True), (protect, False)):
            dest = assignment.dest[b, 1:]
            counts = torch.bincount(dest, minlength=assignment.n_out)
            merged_tokens = counts[dest] > 1  # patch tokens that share an output token
            if bsm_mode:
                deep_merges += int((merged_tokens & (rank[b] >= 2 * r)).sum())
            else:
                assert bool((rank[b][merged_tokens] < 2 * r).all())
                assert int(merged_tokens.sum()) >= r + 1 and assignment.n_out == 1 + t - r
                # every even-rank token of the top 2r merged away: it holds no output slot of its own
                even = rank[b] < 2 * r
                even &= rank[b] % 2 == 0
                assert int((counts[dest][even] > 1).sum()) == r
    assert deep_merges > 0, "blocks 1-6 merge tokens beyond the top 2r in energy"
    assert not get_method("pitome").proportional_attention(ReductionPlan.make("pitome").param_dict())
    assert [block_margin(0.75, i, 12) for i in range(12)] == [0.75 - 0.75 * (i / 12) for i in range(12)]
    assert block_margin(0.75, 11, 12) == 0.0625 and bsm_blocks(0.5, 12) == 6 and bsm_blocks(0.0, 12) == 0


@pytest.mark.parametrize("ratio", [0.9, 0.95])
def test_whole_network_matches_the_loop_reference(tiny64, sample_batch, ratio):
    """The engine with PiToMe's defaults (float64 copy of DeiT-T) against the plain reference forward:
    the same partition of the patches after every block, the same r and logits to 1e-9."""
    images = sample_batch[:2].double()
    result = run(tiny64, images, ReductionPlan.make("pitome", ratio=ratio))
    check_provenance(result)
    for b in range(images.shape[0]):
        logits, partitions, merges = reference_pitome(tiny64, images[b], ratio)
        assert [partition_of(stage.patch_to_token[b]) for stage in result.stages] == partitions
        assert result.token_counts == pitome_counts(ratio) == OFFICIAL_COUNTS[ratio]
        torch.testing.assert_close(result.logits[b].double(), logits, atol=1e-6, rtol=1e-9)
    if ratio == 0.9:
        assert merges == OFFICIAL_R_09


def test_paper_variant_parameters_follow_the_reference(tiny64, sample_batch):
    """bsm_share 0 (the paper's protect-then-merge in every block), margin 0.9 and proportional attention."""
    images = sample_batch[2:3].double()
    result = run(tiny64, images, ReductionPlan.make("pitome", ratio=0.925, bsm_share=0.0, margin=0.9, prop_attn=True))
    logits, partitions, _ = reference_pitome(tiny64, images[0], 0.925, 0.9, 0.0, prop_attn=True)
    assert [partition_of(stage.patch_to_token[0]) for stage in result.stages] == partitions
    torch.testing.assert_close(result.logits[0].double(), logits, atol=1e-6, rtol=1e-9)


@pytest.mark.parametrize("ratio", sorted(OFFICIAL_COUNTS))
def test_official_token_counts(tiny, sample_batch, ratio):
    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("pitome", ratio=ratio))
    assert result.token_counts == OFFICIAL_COUNTS[ratio] == pitome_counts(ratio)
    assert [stage.n_tokens for stage in result.stages] == OFFICIAL_COUNTS[ratio]
    check_provenance(result)
    assert {KINDS[c] for c in result.stages[-1].token_kinds.flatten().tolist()} == {"cls", "kept", "merged"}
    assert all(len(stage.notes) == 2 for stage in result.stages)


def test_the_official_r_formula_in_double():
    """r = floor(T - T*ratio) as the official code writes it, not floor(T*(1 - ratio))."""
    assert merges_for_ratio(160, 0.9) == 16 and math.floor(160 * (1 - 0.9)) == 15
    assert merges_for_ratio(196, 0.9) == 19 and merges_for_ratio(40, 0.925) == 3
    assert merges_for_ratio(196, 1.0) == 0 and merges_for_ratio(196, 0.5) == 98
    assert pitome_counts(1.0) == [197] * 12


def test_batch_equals_one_image_at_a_time(tiny, sample_batch):
    """The vectorised assignment on 4 images equals the same images one by one (float32, real states)."""
    x, _, keys = inside_state(tiny.model, sample_batch[:4], 7)
    sizes = torch.ones(x.shape[:2])
    together = pitome_assignment(keys, sizes, 10, 0.3, 1.0, bsm=False)
    for b in range(4):
        alone = pitome_assignment(keys[b:b + 1], sizes[b:b + 1], 10, 0.3, 1.0, bsm=False)
        assert torch.equal(together.dest[b], alone.dest[0])


def test_exact_ties_go_by_position_and_zero_keys_stay_finite(tiny, sample_batch):
    """Two patch tokens with identical keys have identical energies: the earlier one ranks first
    (stable sort) and takes the even (A) rank, so it merges into the later one; a zero key gives no NaN."""
    _, _, keys = inside_state(tiny.model, sample_batch[:1], 8)
    keys = keys.clone()
    keys[:, 30] = keys[:, 12]
    keys[:, 40] = 0.0
    _, energy = energy_scores(keys[:, 1:], 0.25)
    assert energy[0, 11] == energy[0, 29] and torch.isfinite(energy).all()
    order = torch.sort(energy, dim=1, descending=True, stable=True).indices[0].tolist()
    assert order.index(11) + 1 == order.index(29), "identical tokens rank side by side, by position"
    assignment = pitome_assignment(keys, torch.ones(keys.shape[:2]), 98, 0.25, 1.0, bsm=False)
    assert assignment.dest[0, 12] == assignment.dest[0, 30], "the earlier twin (A) merges into the later (B), its best match"
    assert torch.isfinite(assignment.weight).all()


def test_r_override_and_prop_attn(tiny, sample_batch):
    images = sample_batch[:2]
    schedule = (20, 0, 10, -1, 5, 5, 0, 0, 16, 16, 1, 1)
    result = run(tiny.model, images, ReductionPlan.make("pitome", r=schedule), track=False)
    assert result.token_counts == pitome_counts(0.9, schedule)
    assert result.token_counts[:4] == [177, 177, 167, 167 - merges_for_ratio(166, 0.9)]
    capped = run(tiny.model, images, ReductionPlan.make("pitome", r=150))
    assert capped.token_counts == pitome_counts(0.9, 150) == [99, 50, 26, 14, 8, 5, 3, 2, 2, 2, 2, 2]
    assert capped.stages[0].notes[0].endswith("r=150 capped at 98: at most half of the 196 patch tokens merge in one block")
    dense = run(tiny.model, images)
    none = run(tiny.model, images, ReductionPlan.make("pitome", ratio=1.0))
    torch.testing.assert_close(none.logits, dense.logits, atol=1e-4, rtol=1e-4)
    assert none.stages == []
    with_prop = run(tiny.model, images, ReductionPlan.make("pitome", prop_attn=True), track=False)
    without = run(tiny.model, images, ReductionPlan.make("pitome"), track=False)
    assert with_prop.token_counts == without.token_counts
    assert not torch.allclose(with_prop.logits, without.logits, atol=1e-3)


@pytest.mark.parametrize("params", [{}, {"bsm_share": 0.0, "ratio": 0.95}, {"r": (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0)}],
                         ids=["default", "paper", "matched"])
def test_gmacs_match_the_flop_counter(tiny, params):
    plan = ReductionPlan.make("pitome", **params)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    counter = flop_counter()
    with counter:
        result = run(tiny.model, image, plan, track=False)
    breakdown = plan_macs(tiny.model, plan, counts=result.token_counts)
    assert breakdown.matmul == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    first = breakdown.blocks[0]
    if not params:
        assert first.method_matmul == 196 * 196 * 64 and first.method_elementwise == 19 * 192
    assert 0 < breakdown.method_share < 0.03


def test_budget_meets_the_keep_rates():
    method = get_method("pitome")
    for keep_rate in (0.9, 0.8, 0.7, 0.6, 0.5):
        budget = sum(keep_rate_counts(keep_rate))
        plan = method.budget(keep_rate, 12, 197)
        ratio = plan.param_dict()["ratio"]
        assert ratio == ratio_for_keep_rate(keep_rate)
        total = sum(pitome_counts(ratio))
        assert abs(total - budget) <= 0.005 * budget, (keep_rate, ratio, total, budget)
        step = 1 / 2000  # the grid's neighbours are no nearer
        for other in (ratio - step, ratio + step):
            if 0.5 <= other <= 1.0:
                assert abs(sum(pitome_counts(other)) - budget) >= abs(total - budget)
    assert method.budget(0.7, 12, 197).param_dict()["ratio"] == 0.9245


def test_matched_budget_follows_target_counts(tiny, sample_batch):
    method = get_method("pitome")
    target = keep_rate_counts(0.7)
    plan = method.budget(0.7, 12, 197, target_counts=target)
    assert plan.param_dict()["r"] == (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0) == matched_merge_schedule(target)
    result = run(tiny.model, sample_batch[:2], plan, track=False)
    assert result.token_counts == target
    assert method.budget(0.7, 12, 197, schedule="matched") == plan
    low = matched_merge_schedule(keep_rate_counts(0.3))
    assert pitome_counts(0.9, low)[3] == 99 and pitome_counts(0.9, low)[-1] == keep_rate_counts(0.3)[-1]
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[2]), "--model", TINY, "--device", "cpu", "--method", "pitome", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["method"] == "pitome"
    assert record["token_counts"] == OFFICIAL_COUNTS[0.9]
    params = record["params"]
    assert params["ratio"] == 0.9 and params["r"] == -1 and params["margin"] == 0.75
    assert params["bsm_share"] == 0.5 and params["prop_attn"] is False
    assert len(record["stages"]) == 12
    for stage, count in zip(record["stages"], OFFICIAL_COUNTS[0.9]):
        assert len(stage["token_kinds"]) == count and sum(stage["token_sizes"]) == 196
        assert stage["token_kinds"][0] == "cls"
    assert record["stages"][0]["note"].startswith("energy-ordered matching over all 196 tokens")
    assert record["stages"][6]["note"].startswith("86 low-energy tokens protected")
    assert 0 < record["gmacs"] < record["dense_gmacs"]


@pytest.mark.parametrize("params, message", [
    ({"ratio": 0.3}, "ratio must be at least 0.5"),
    ({"ratio": 1.5}, "ratio must be at most 1.0"),
    ({"bsm_share": 2}, "bsm_share must be at most 1.0"),
    ({"margin": "high"}, "margin must be a number"),
    ({"r": -2}, "r must be at least -1"),
    ({"r": (13, 13)}, "r list has 2 entries"),
    ({"bogus": 1}, "has no parameter 'bogus'"),
])
def test_bad_parameters_give_a_one_line_plan_error(tiny, sample_batch, params, message):
    plan = ReductionPlan.make("pitome", **params)
    with pytest.raises(PlanError, match=message) as caught:
        run(tiny.model, sample_batch[:1], plan)
    assert "\n" not in str(caught.value)
