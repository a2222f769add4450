"""ToMe (methods.md §6) on the real DeiT-Tiny weights and ImageNet photos: one merge step and the
whole network against a plain loop reimplementation, counts, r schedules and the budget helpers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.engine import run

from analysis.errors import PlanError

from analysis.plan import ReductionPlan
from analysis.methods import KINDS, apply_assignment
from analysis.methods.base import keep_rate_counts
from analysis.methods.tome import matched_r_schedule, r_for_keep_rate, tome_assignment, tome_counts
from conftest import TINY
from method_states import block_input, check_provenance, inside_state

COUNTS_R13 = [184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]


def reference_match(keys: torch.Tensor, r: int) -> tuple[list[int], dict[int, int]]:
    """methods.md §6 steps 1-2 for one image [N, d], token by token: the new order (unmerged A
    ascending, then B) as old indices, and {merged A token: its B partner}."""
    n = keys.shape[0]
    r = min(r, (n - 1) // 2)
    metric = keys.double() / keys.double().norm(dim=-1, keepdim=True)
    side_a, side_b = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for i in side_a:
        if i == 0:
            best[i] = (-math.inf, None)
            continue
        sims = (metric[side_b] @ metric[i]).tolist()
        j = max(range(len(side_b)), key=lambda q: sims[q])
        best[i] = (sims[j], side_b[j])
    merging = sorted(side_a, key=lambda i: -best[i][0])[:r]
    order = sorted(set(side_a) - set(merging)) + side_b
    return order, {i: best[i][1] for i in merging}


@torch.inference_mode()
def reference_tome(model, image: torch.Tensor, r: int, prop_attn: bool = True):
    """The whole DeiT forward with ToMe in every block, written plainly for one image.
    Returns (logits [1000], the partition of the 196 patches into the final tokens)."""
    x = block_input(model, image[None], 0)[0]
    sizes = [1.0] * x.shape[0]
    members: list[list[int]] = [[]] + [[p] for p in range(x.shape[0] - 1)]
    for block in model.blocks:
        attn = block.attn
        n, channels = x.shape
        heads, d = attn.num_heads, channels // attn.num_heads
        qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn:
            logits = logits + torch.tensor(sizes).log()[None, None, :]
        x = x + attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, channels))
        order, partner = reference_match(k.mean(0), r)
        new_x, new_sizes, new_members = [], [], []
        for t in order:
            group = [t] + [i for i, j in partner.items() if j == t]
            total = sum(sizes[i] for i in group)
            new_x.append(sum(sizes[i] * x[i] for i in group) / total)
            new_sizes.append(total)
            new_members.append(sorted(p for i in group for p in members[i]))
        x, sizes, members = torch.stack(new_x), new_sizes, new_members
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, {frozenset(group) for group in members[1:]}


def test_one_merge_step_matches_loop_reference(tiny, sample_batch):
    x, _, keys = inside_state(tiny.model, sample_batch[:4], 3)
    generator = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 4, x.shape[:2], generator=generator).float()
    sizes[:, 0] = 1
    assignment = tome_assignment(keys, sizes, 13)
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    assert assignment.n_out == 197 - 13
    for b in range(4):
        order, partner = reference_match(keys[b], 13)
        dest = [order.index(partner.get(t, t)) for t in range(197)]
        assert assignment.dest[b].tolist() == dest
        expected = []
        for t in order:
            group = [t] + [i for i, j in partner.items() if j == t]
            expected.append(sum(sizes[b, i].double() * x[b, i].double() for i in group) / sum(float(sizes[b, i]) for i in group))
        torch.testing.assert_close(out[b].double(), torch.stack(expected), atol=2e-5, rtol=1e-5)
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        assert kinds == ["cls"] + ["merged" if s > 1 else "kept" for s in sizes_out[b, 1:].tolist()]


@pytest.mark.parametrize("r", [8, 13])
def test_whole_network_partition_matches_reimplementation(tiny, sample_batch, r):
    images = sample_batch[:2]
    result = run(tiny.model, images, ReductionPlan.make("tome", r=r))
    check_provenance(result)
    final = result.stages[-1].patch_to_token
    for b in range(images.shape[0]):
        logits, partition = reference_tome(tiny.model, images[b], r)
        ours = {}
        for patch, token in enumerate(final[b].tolist()):
            ours.setdefault(token, set()).add(patch)
        assert {frozenset(group) for group in ours.values()} == partition
        torch.testing.assert_close(result.logits[b], logits, atol=2e-3, rtol=1e-3)


def test_counts_r13_and_lists(tiny, sample_batch):
    result = run(tiny.model, sample_batch, ReductionPlan.make("tome", r=13))
    assert result.token_counts == COUNTS_R13 == tome_counts(13)
    assert [stage.n_tokens for stage in result.stages] == COUNTS_R13
    check_provenance(result)
    assert {KINDS[c] for c in result.stages[-1].token_kinds.flatten().tolist()} >= {"cls", "merged"}
    schedule = (20, 20, 10, 10, 5, 5, 0, 0, 16, 16, 1, 1)
    listed = run(tiny.model, sample_batch[:2], ReductionPlan.make("tome", r=schedule), track=False)
    assert listed.token_counts == tome_counts(schedule) == [177, 157, 147, 137, 132, 127, 127, 127, 111, 95, 94, 93]
    capped = run(tiny.model, sample_batch[:2], ReductionPlan.make("tome", r=150), track=False)
    assert capped.token_counts == tome_counts(150) == [99, 50, 26, 14, 8, 5, 3, 2, 2, 2, 2, 2]
    with pytest.raises(PlanError, match="r list"):
        run(tiny.model, sample_batch[:1], ReductionPlan.make("tome", r=(13, 13)))


def test_r_zero_is_the_dense_model_and_prop_attn_matters(tiny, sample_batch):
    images = sample_batch[:2]
    dense = run(tiny.model, images)
    none = run(tiny.model, images, ReductionPlan.make("tome", r=0))
    torch.testing.assert_close(none.logits, dense.logits, atol=1e-4, rtol=1e-4)
    assert none.stages == []
    with_prop = run(tiny.model, images, ReductionPlan.make("tome", r=13), track=False)
    without = run(tiny.model, images, ReductionPlan.make("tome", r=13, prop_attn=False), track=False)
    assert with_prop.token_counts == without.token_counts
    assert not torch.allclose(with_prop.logits, without.logits, atol=1e-3)


def test_matched_schedule_reproduces_the_keep_rate_counts(tiny, sample_batch):
    target = keep_rate_counts(0.7)
    assert target == [197, 197, 197, 139, 139, 139, 98, 98, 98, 69, 69, 69]
    assert keep_rate_counts(0.7, extra=1)[-1] == 72
    schedule = matched_r_schedule(target)
    assert schedule == (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0)
    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("tome", r=schedule), track=False)
    assert result.token_counts == target
    # At 0.3 ToMe cannot halve 197 to 60 in one block: it takes 98 and catches up later.
    low = matched_r_schedule(keep_rate_counts(0.3))
    assert tome_counts(low)[3] == 99 and tome_counts(low)[-1] == keep_rate_counts(0.3)[-1] == 7
    assert r_for_keep_rate(0.7, schedule="matched") == schedule


def test_constant_r_for_keep_rate_has_the_nearest_total():
    for keep_rate in (0.5, 0.7, 0.9):
        budget = sum(keep_rate_counts(keep_rate))
        r = r_for_keep_rate(keep_rate)
        gaps = {candidate: abs(sum(tome_counts(candidate)) - budget) for candidate in range(99)}
        assert gaps[r] == min(gaps.values())
    assert r_for_keep_rate(0.7) == 11 and sum(tome_counts(11)) == 1506
    with pytest.raises(ValueError):
        r_for_keep_rate(0.7, schedule="bogus")


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[2]), "--model", TINY, "--device", "cpu", "--method", "tome", "--r", "13", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["token_counts"] == COUNTS_R13
    assert record["params"]["r"] == 13 and record["params"]["prop_attn"] is True
    assert len(record["stages"]) == 12
    last = record["stages"][-1]
    assert len(last["token_kinds"]) == 41 and "merged" in last["token_kinds"]
    assert sum(last["token_sizes"]) == 196


def test_matching_ties_go_by_position_and_a_zero_key_stays_finite(tiny, sample_batch):
    """bipartite_match on real DeiT-T keys with two A tokens made identical (an exact tie) and one
    key zeroed: the tied tokens come out in position order, the cls row never merges, no NaN."""
    from analysis.methods.tome import bipartite_match

    _, _, keys = inside_state(tiny.model, sample_batch[:2], 3)
    keys = keys.clone()
    keys[:, 10] = keys[:, 4]  # A positions 4 and 10 (A indices 2 and 5) now score the same
    keys[:, 20] = 0.0  # A index 10: a zero vector (its norm is clamped, its scores are 0)
    order, partner = bipartite_match(keys, protect_first=True)
    assert order.shape == partner.shape == (2, 99)
    for b in range(2):
        ranks = order[b].tolist()
        assert ranks.index(2) < ranks.index(5), "an exact tie keeps position order (stable sort)"
        assert ranks[-1] == 0, "the cls row is scored -inf and comes last"
    assert torch.isfinite(tome_assignment(keys, torch.ones(keys.shape[:2]), 13).weight).all()
    assert not torch.isnan(partner.float()).any()
