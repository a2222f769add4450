"""ToFu, reconstructed (methods.md §11), on the real DeiT-Tiny weights and ImageNet photos.

Covered here: one block and the whole network against a plain-loop reference written from the spec
(ToMe's matching, then drop or MLERP merge), the MLERP norm rules, the token counts, provenance with
discarded patches, GMACs, the budget, the CLI JSON and bad parameters. The loop reference runs in
float64 and so does the model the vectorised code runs on. The method's bipartite scores are float32
(`tome.bipartite_match`, methods.md §11), the reference's float64; on these photos no decision is
close enough for that to matter.
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
from analysis.methods.tofu import prune_block_count, ratio_merges, tofu_assignment
from analysis.methods.tome import matched_r_schedule, r_for_keep_rate, tome_counts
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance, inside_state

# r per block of hchautran/PiToMe's algo/tofu at ratio 0.9 on DeiT-T (r = floor(N - 0.9 N), N with
# cls), as its run printed it (/work/scratch/tofu/NOTES.md).
REIMPL_R_09 = [19, 17, 16, 14, 13, 11, 10, 9, 8, 8, 7, 6]


# ------------------------------------------------------------------------------------------------
# The plain-loop reference (methods.md §11), one image, Python lists
# ------------------------------------------------------------------------------------------------

def reference_groups(keys: torch.Tensor, r: int, prune: bool) -> tuple[list[list[int]], list[int]]:
    """One ToFu block's decision for one image [N, d], token by token.

    Returns (the output tokens in output order, each as the list of input tokens it holds with its
    own token first; the dropped tokens)."""
    n = keys.shape[0]
    r = min(r, (n - 1) // 2)
    unit = keys.double() / keys.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    side_a, side_b = list(range(0, n, 2)), list(range(1, n, 2))
    best, partner = {}, {}
    for a in side_a:
        if a == 0:
            best[a], partner[a] = -math.inf, side_b[0]
            continue
        scores = [float(unit[a] @ unit[b]) for b in side_b]
        q = max(range(len(side_b)), key=lambda i: (scores[i], -i))  # the first B with the best score
        best[a], partner[a] = scores[q], side_b[q]
    ranked = sorted(side_a, key=lambda a: -best[a])  # stable: ties by position
    sources, unmerged = ranked[:r], sorted(ranked[r:])
    groups = [[a] for a in unmerged]
    for b in side_b:
        groups.append([b] if prune else [b] + [a for a in sources if partner[a] == b])
    return groups, (sources if prune else [])


def reference_merge(x: torch.Tensor, sizes: list[float], groups: list[list[int]], norm: str = "max",
                    reference: str = "merged", weighting: str = "size") -> tuple[torch.Tensor, list[float]]:
    """MLERP of every group (a group of one is the token itself), and the groups' sizes."""
    rows, new_sizes = [], []
    for group in groups:
        new_sizes.append(sum(sizes[i] for i in group))
        if len(group) == 1:
            rows.append(x[group[0]])
            continue
        weights = [sizes[i] if weighting == "size" else 1.0 for i in group]
        total = sum(weights)
        mean = sum(w * x[i] for w, i in zip(weights, group)) / total
        norms = [float(x[i].norm()) for i in group]
        target = max(norms) if norm == "max" else sum(w * v for w, v in zip(weights, norms)) / total
        scale = float(mean.norm()) if reference == "merged" else norms[0]  # group[0] is the B token
        rows.append(mean / scale * target)
    return torch.stack(rows), new_sizes


@torch.inference_mode()
def reference_tofu(model, image: torch.Tensor, r: int | list[int] = 13, prune_blocks: int = -1, norm: str = "max",
                   reference: str = "merged", weighting: str = "size", prop_attn: bool = True):
    """The whole DeiT forward with ToFu in every block, written plainly for one image.
    Returns (logits [1000], per block (the partition of the kept patches into tokens, the discarded patches))."""
    x = block_input(model, image[None], 0)[0]
    sizes = [1.0] * x.shape[0]
    members: list[list[int]] = [[]] + [[p] for p in range(x.shape[0] - 1)]
    discarded: set[int] = set()
    depth = len(model.blocks)
    n_prune = depth // 2 + 1 if prune_blocks < 0 else prune_blocks
    stages = []
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
        block_r = r[index] if isinstance(r, list) else r
        groups, dropped = reference_groups(k.mean(0), block_r, index < n_prune)
        for token in dropped:
            discarded.update(members[token])
        x, sizes = reference_merge(x, sizes, groups, norm, reference, weighting)
        members = [sorted(p for i in group for p in members[i]) for group in groups]
        stages.append(({frozenset(group) for group in members[1:]}, frozenset(discarded)))
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, stages


def stage_of(patch_to_token: torch.Tensor) -> tuple[set[frozenset[int]], frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for patch, token in enumerate(patch_to_token.tolist()):
        if token >= 0:
            groups.setdefault(token, set()).add(patch)
    return {frozenset(group) for group in groups.values()}, frozenset(p for p, t in enumerate(patch_to_token.tolist()) if t < 0)


@pytest.fixture(scope="module")
def tiny64(tiny):
    """A float64 copy of DeiT-T (the shared model is not modified)."""
    return copy.deepcopy(tiny.model).double().eval()


def _uneven_sizes(shape, seed):
    sizes = torch.randint(1, 4, shape, generator=torch.Generator().manual_seed(seed)).double()
    sizes[:, 0] = 1
    return sizes


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_index, prune, norm, reference, weighting", [
    (1, True, "max", "merged", "size"),
    (8, False, "max", "merged", "size"),
    (9, False, "mean", "merged", "size"),
    (10, False, "max", "destination", "uniform"),
    (3, False, "mean", "destination", "size"),
], ids=["prune-block2", "mlerp-max", "mlerp-mean", "reimpl-rules", "mean-destination"])
def test_one_block_matches_the_loop_reference(tiny64, sample_batch, block_index, prune, norm, reference, weighting):
    """dest, output order, merged states, sizes and kinds of one block equal the loop reference, on
    real DeiT-T states with uneven token sizes (float64 on both sides)."""
    x, _, keys = inside_state(tiny64, sample_batch[:4].double(), block_index)
    sizes = _uneven_sizes(x.shape[:2], block_index)
    r = 16
    assignment = tofu_assignment(keys, sizes, r, prune, norm, reference, weighting)
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    assert assignment.n_out == x.shape[1] - r
    for b in range(4):
        groups, dropped = reference_groups(keys[b], r, prune)
        dest = [-1] * x.shape[1]
        for position, group in enumerate(groups):
            for token in group:
                dest[token] = position
        assert assignment.dest[b].tolist() == dest
        assert sorted(i for i, d in enumerate(dest) if d < 0) == sorted(dropped)
        expected, expected_sizes = reference_merge(x[b], sizes[b].tolist(), groups, norm, reference, weighting)
        torch.testing.assert_close(out[b], expected, atol=1e-10, rtol=1e-10)
        assert sizes_out[b].tolist() == expected_sizes
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        assert kinds == ["cls"] + ["merged" if s > 1 else "kept" for s in expected_sizes[1:]]


def test_mlerp_keeps_the_direction_of_the_mean_and_the_largest_norm(tiny, sample_batch):
    """Norm "max" with reference "merged": every merged token points like the weighted mean of its
    members and has the largest member norm (the average's norm would be smaller); norm "mean"
    gives the weighted mean of the norms; tokens alone are returned bit for bit."""
    x, _, keys = inside_state(tiny.model, sample_batch[:2], 9)
    sizes = _uneven_sizes(x.shape[:2], 3).float()
    for norm in ("max", "mean"):
        assignment = tofu_assignment(keys, sizes, 20, False, norm)
        out, _, share, _ = apply_assignment(assignment, x, sizes)
        plain = apply_assignment(type(assignment)(**{**assignment.__dict__, "combine": "mean"}), x, sizes)[0]
        members = torch.zeros(2, assignment.n_out, dtype=torch.long).scatter_add_(1, assignment.dest, torch.ones_like(assignment.dest))
        norms = x.norm(dim=-1)
        merged = members > 1
        assert int(merged.sum()) >= 2 * 10
        cosine = torch.nn.functional.cosine_similarity(out, plain, dim=-1)
        assert bool((cosine[merged] > 1 - 1e-5).all())
        if norm == "max":
            target = torch.zeros(2, assignment.n_out).scatter_reduce(1, assignment.dest, norms, reduce="amax")
        else:
            target = torch.zeros(2, assignment.n_out).scatter_add(1, assignment.dest, share * norms)
        torch.testing.assert_close(out.norm(dim=-1)[merged], target[merged], rtol=1e-5, atol=1e-5)
        assert bool((plain.norm(dim=-1)[merged] < target[merged] - 1e-3).any()), "averaging shrinks norms; MLERP does not"
        assert torch.equal(out[~merged], plain[~merged])


@pytest.mark.parametrize("params", [
    {},
    {"prune_blocks": 0, "norm": "mean", "r": 9},
    {"prune_blocks": 12, "prop_attn": False},
    {"ratio": 0.9, "norm_reference": "destination", "weighting": "uniform", "prop_attn": False},
], ids=["default", "all-merge", "all-prune", "reimpl-settings"])
def test_whole_network_matches_the_loop_reference(tiny64, sample_batch, params):
    """The engine (float64 copy of DeiT-T) against the plain reference forward: the same partition of
    the kept patches and the same discarded patches after every block, and the same logits."""
    images = sample_batch[:2].double()
    plan = ReductionPlan.make("tofu", **params)
    result = run(tiny64, images, plan)
    check_provenance(result, allow_discard=True)
    values = plan.param_dict()
    for b in range(images.shape[0]):
        r = values["r"]
        if values["ratio"] < 1:  # the ratio's r per block (N with cls), from the counts entering each block
            r = [ratio_merges(n, values["ratio"]) for n in [197] + result.token_counts[:-1]]
            assert r == REIMPL_R_09
        logits, stages = reference_tofu(tiny64, images[b], r, values["prune_blocks"], values["norm"],
                                        values["norm_reference"], values["weighting"], values["prop_attn"])
        assert [stage_of(stage.patch_to_token[b]) for stage in result.stages] == stages
        torch.testing.assert_close(result.logits[b].double(), logits, atol=1e-6, rtol=1e-9)
    n_prune = prune_block_count(values["prune_blocks"], 12)
    discarded = [int((stage.patch_to_token < 0).sum()) for stage in result.stages]
    if n_prune:
        assert discarded[n_prune - 1] > 0 and discarded[n_prune:] == [discarded[n_prune - 1]] * (12 - n_prune)
    else:
        assert discarded == [0] * 12


def test_token_counts_kinds_and_notes(tiny, sample_batch):
    images = sample_batch[:2]
    result = run(tiny.model, images, ReductionPlan.make("tofu"))
    assert result.token_counts == tome_counts(13) == [184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]
    check_provenance(result, allow_discard=True)
    kept = [int((stage.token_sizes[0]).sum()) for stage in result.stages]
    assert kept[:7] == [196 - 13 * (i + 1) for i in range(7)] and kept[7:] == [196 - 91] * 5
    assert {KINDS[c] for c in result.stages[6].token_kinds.flatten().tolist()} == {"cls", "kept"}
    assert "merged" in {KINDS[c] for c in result.stages[7].token_kinds.flatten().tolist()}
    assert result.stages[0].notes[0].startswith("pruning-like fusion: 13 matched A tokens dropped")
    assert result.stages[7].notes[0].startswith("MLERP merge of 13 A tokens")
    ratio = run(tiny.model, images, ReductionPlan.make("tofu", ratio=0.9), track=False)
    assert ratio.token_counts == tome_counts(REIMPL_R_09)
    capped = run(tiny.model, images[:1], ReductionPlan.make("tofu", r=150))
    assert capped.token_counts == tome_counts(150)
    assert capped.stages[0].notes[0].endswith("r=150 capped at 98: at most (N - 1) // 2 of 197 tokens go in one block")
    dense = run(tiny.model, images)
    none = run(tiny.model, images, ReductionPlan.make("tofu", r=0))
    torch.testing.assert_close(none.logits, dense.logits, atol=1e-4, rtol=1e-4)
    assert none.stages == []


def test_the_ratio_formula_in_double():
    """r = floor(N - N*ratio), N with cls, as hchautran/PiToMe's algo/tofu writes it."""
    assert ratio_merges(197, 0.9) == 19 and math.floor(197 * (1 - 0.9)) == 19
    assert ratio_merges(160, 0.9) == 16 and math.floor(160 * (1 - 0.9)) == 15
    assert ratio_merges(197, 1.0) == 0 and prune_block_count(-1, 12) == 7 and prune_block_count(-1, 24) == 13
    assert prune_block_count(3, 12) == 3


def test_batch_equals_one_image_at_a_time(tiny, sample_batch):
    x, _, keys = inside_state(tiny.model, sample_batch[:4], 8)
    sizes = torch.ones(x.shape[:2])
    together = tofu_assignment(keys, sizes, 12, False)
    out, _, _, _ = apply_assignment(together, x, sizes)
    for b in range(4):
        alone = tofu_assignment(keys[b:b + 1], sizes[b:b + 1], 12, False)
        assert torch.equal(together.dest[b], alone.dest[0])
        torch.testing.assert_close(out[b], apply_assignment(alone, x[b:b + 1], sizes[b:b + 1])[0][0], atol=1e-6, rtol=1e-6)


def test_prop_attn_changes_logits_not_counts(tiny, sample_batch):
    images = sample_batch[:2]
    with_prop = run(tiny.model, images, ReductionPlan.make("tofu"), track=False)
    without = run(tiny.model, images, ReductionPlan.make("tofu", prop_attn=False), track=False)
    assert with_prop.token_counts == without.token_counts
    assert not torch.allclose(with_prop.logits, without.logits, atol=1e-3)


@pytest.mark.parametrize("params", [{}, {"prune_blocks": 0, "ratio": 0.95}, {"r": (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0)}],
                         ids=["default", "all-merge", "matched"])
def test_gmacs_match_the_flop_counter(tiny, params):
    plan = ReductionPlan.make("tofu", **params)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    counter = flop_counter()
    with counter:
        result = run(tiny.model, image, plan, track=False)
    breakdown = plan_macs(tiny.model, plan, counts=result.token_counts)
    assert breakdown.matmul == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    if not params:
        first, eighth = breakdown.blocks[0], breakdown.blocks[7]
        assert first.method_matmul == 99 * 98 * 64  # ceil(197/2) floor(197/2) d; the keys come with qkv
        assert first.method_elementwise == 0.0, "a pruning block merges nothing"
        assert eighth.method_elementwise == (13 + 106 + 93) * 192
    assert 0 < breakdown.method_share < 0.03


def test_budget_meets_the_keep_rates(tiny, sample_batch):
    method = get_method("tofu")
    for keep_rate in (0.9, 0.7, 0.5):
        plan = method.budget(keep_rate, 12, 197)
        assert plan.param_dict()["r"] == r_for_keep_rate(keep_rate)
        budget = sum(keep_rate_counts(keep_rate))
        total = sum(tome_counts(plan.param_dict()["r"]))
        assert abs(total - budget) <= 0.01 * budget, (keep_rate, total, budget)
    assert method.budget(0.7, 12, 197).param_dict()["r"] == 11
    target = keep_rate_counts(0.7)
    matched = method.budget(0.7, 12, 197, target_counts=target)
    assert matched.param_dict()["r"] == matched_r_schedule(target) == (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0)
    assert run(tiny.model, sample_batch[:1], matched, track=False).token_counts == target
    assert method.budget(0.7, 12, 197, schedule="matched") == matched
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[5]), "--model", TINY, "--device", "cpu", "--method", "tofu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["method"] == "tofu"
    assert record["token_counts"] == tome_counts(13)
    params = record["params"]
    assert params["r"] == 13 and params["prune_blocks"] == -1 and params["norm"] == "max"
    assert params["norm_reference"] == "merged" and params["weighting"] == "size" and params["prop_attn"] is True
    assert len(record["stages"]) == 12
    for index, (stage, count) in enumerate(zip(record["stages"], tome_counts(13))):
        assert len(stage["token_kinds"]) == count and stage["token_kinds"][0] == "cls"
        kept = sum(stage["token_sizes"])
        assert kept + stage["patch_to_token"].count(-1) == 196
        assert kept == 196 - 13 * min(index + 1, 7)
    assert record["stages"][7]["note"].startswith("MLERP merge")
    assert 0 < record["gmacs"] < record["dense_gmacs"]


@pytest.mark.parametrize("params, message", [
    ({"ratio": 0.3}, "ratio must be at least 0.5"),
    ({"r": -1}, "r must be at least 0"),
    ({"prune_blocks": -2}, "prune_blocks must be at least -1"),
    ({"norm": "min"}, "norm must be one of max, mean"),
    ({"norm_reference": "b"}, "norm_reference must be one of merged, destination"),
    ({"weighting": "attention"}, "weighting must be one of size, uniform"),
    ({"r": (13, 13)}, "r list has 2 entries"),
    ({"bogus": 1}, "has no parameter 'bogus'"),
])
def test_bad_parameters_give_a_one_line_plan_error(tiny, sample_batch, params, message):
    with pytest.raises(PlanError, match=message) as caught:
        plan = ReductionPlan.make("tofu", **params)
        run(tiny.model, sample_batch[:1], plan)
    assert "\n" not in str(caught.value)
