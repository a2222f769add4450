"""ATC (methods.md §13) on the real DeiT-Tiny weights and ImageNet photos.

Covered here: the clusters against scipy's / scikit-learn's (what the official code calls) on real
DeiT-T keys; one block and the whole network against a plain-loop reference written from the spec
(cluster distances from their definition over member pairs, not by the Lance-Williams update); the
official token counts; provenance; GMACs; the budget; the CLI JSON and bad parameters.

The loop reference and the engine run on a float64 copy of DeiT-T, so both see the same distances
and the decisions have margins far above the rounding. The scipy comparison runs in float32, as
the official code does.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import cut_tree, linkage as scipy_linkage
from sklearn.cluster import AgglomerativeClustering

from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_macs
from analysis.methods import KINDS, apply_assignment
from analysis.methods.atc import (
    agglomerate, atc_assignment, atc_counts, block_merges, cluster_distances, matched_r_schedule, r_for_keep_rate,
)
from analysis.methods.base import keep_rate_counts
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance, inside_state

# The official code (JoakimHaurum/ATC @ 227c94b) at r = 8 on DeiT-T: N - r clusters of the N - 1
# patch tokens, 7 merges per block (/work/scratch/atc/NOTES.md).
OFFICIAL_COUNTS_R8 = [190, 183, 176, 169, 162, 155, 148, 141, 134, 127, 120, 113]


# ------------------------------------------------------------------------------------------------
# The plain-loop reference (methods.md §13), one image, Python lists
# ------------------------------------------------------------------------------------------------

def reference_distances(keys: torch.Tensor) -> list[list[float]]:
    """1 - cosine of every pair of patch keys (cls left out), [P][P] Python floats (the definition)."""
    unit = keys[1:].double() / keys[1:].double().norm(dim=-1, keepdim=True)
    return (1 - unit @ unit.T).tolist()


def reference_clusters(dist: list[list[float]], merges: int, link: str) -> list[list[int]]:
    """Bottom-up clustering by the definition: the distance of two clusters is the min / max / mean
    of their member pairs' distances; each step merges the closest pair of clusters (a tie: the pair
    with the smallest first, then second, smallest member). Returns the clusters, each sorted,
    ordered by their smallest member."""
    def linkage_distance(a: list[int], b: list[int]) -> float:
        values = [dist[min(i, j)][max(i, j)] for i in a for j in b]  # upper triangle, as scikit-learn reads it
        if link == "single":
            return min(values)
        if link == "complete":
            return max(values)
        return sum(values) / len(values)

    clusters = [[i] for i in range(len(dist))]
    between = {(a, b): linkage_distance(clusters[a], clusters[b]) for a in range(len(clusters)) for b in range(a + 1, len(clusters))}
    alive = set(range(len(clusters)))
    for _ in range(merges):
        a, b = min(between, key=lambda pair: (between[pair], clusters[pair[0]][0], clusters[pair[1]][0]))
        clusters[a] = sorted(clusters[a] + clusters[b])
        alive.discard(b)
        between = {pair: value for pair, value in between.items() if b not in pair and a not in pair}
        for c in alive:
            if c != a:
                between[(min(a, c), max(a, c))] = linkage_distance(clusters[a], clusters[c])
    return sorted((clusters[c] for c in alive), key=lambda members: members[0])


def reference_merge(x: torch.Tensor, sizes: list[float], groups: list[list[int]]) -> tuple[torch.Tensor, list[float]]:
    """The size-weighted mean of every group, and the groups' sizes."""
    rows, new_sizes = [], []
    for group in groups:
        total = sum(sizes[i] for i in group)
        rows.append(sum(sizes[i] * x[i] for i in group) / total)
        new_sizes.append(total)
    return torch.stack(rows), new_sizes


@torch.inference_mode()
def reference_atc(model, image: torch.Tensor, r: int, link: str = "average", exact_r: bool = False, prop_attn: bool = True):
    """The whole DeiT forward with ATC in every block, written plainly for one image. Returns
    (logits [1000], the partition of the 196 patches after every block that merged, per block the
    merges)."""
    x = block_input(model, image[None], 0)[0]
    sizes = [1.0] * x.shape[0]
    members: list[list[int]] = [[]] + [[p] for p in range(x.shape[0] - 1)]
    partitions, merges_done = [], []
    for block in model.blocks:
        attn = block.attn
        n, channels = x.shape
        heads, d = attn.num_heads, channels // attn.num_heads
        qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn:
            logits = logits + torch.tensor(sizes, dtype=logits.dtype).log()[None, None, :]
        x = x + attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, channels))
        # official: r = min(r, N - 1), N - r clusters of the N - 1 patch tokens; the paper: r merges
        merges = min(r, n - 2) if exact_r else max(0, min(r, n - 1) - 1)
        if merges > 0:
            clusters = reference_clusters(reference_distances(k.mean(0)), merges, link)
            groups = [[0]] + [[i + 1 for i in cluster] for cluster in clusters]
            x, sizes = reference_merge(x, sizes, groups)
            members = [sorted(p for i in group for p in members[i]) for group in groups]
            partitions.append({frozenset(group) for group in members[1:]})  # a stage only where tokens merged
        merges_done.append(merges)
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, partitions, merges_done


def partition_of(labels) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for index, label in enumerate(list(labels)):
        groups.setdefault(int(label), set()).add(index)
    return {frozenset(group) for group in groups.values()}


@pytest.fixture(scope="module")
def tiny64(tiny):
    """A float64 copy of DeiT-T (the shared model is not modified)."""
    return copy.deepcopy(tiny.model).double().eval()


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["average", "complete", "single"])
def test_clusters_equal_scipy_and_sklearn_on_real_keys(tiny, sample_batch, link):
    """The vectorised clustering equals scikit-learn's AgglomerativeClustering (the official call) and
    scipy's linkage + cut_tree on the float32 distance matrix of real DeiT-T keys, at several blocks
    and cluster counts, for every image."""
    checked = 0
    for block_index in (0, 5, 10):
        _, _, keys = inside_state(tiny.model, sample_batch, block_index)
        distance = cluster_distances(keys)
        for merges in (7, 60, 150, 195):
            labels, heights, following = agglomerate(distance, merges, link)
            assert torch.all(heights[:, 1:] >= heights[:, :-1]), "monotone linkage heights"
            for b in range(keys.shape[0]):
                unit = keys[b] / keys[b].norm(dim=-1, keepdim=True)
                matrix = (1 - unit @ unit.T)[1:, 1:].numpy()  # the official float32 matrix
                official = AgglomerativeClustering(n_clusters=196 - merges, metric="precomputed", linkage=link).fit(matrix).labels_
                i, j = np.triu_indices(196, k=1)
                tree = scipy_linkage(matrix[i, j], method=link)
                cut = cut_tree(tree, n_clusters=196 - merges)[:, 0]
                ours = partition_of(labels[b].tolist())
                assert ours == partition_of(official) == partition_of(cut), (block_index, merges, b)
                np.testing.assert_allclose(heights[b].numpy(), tree[:merges, 2], rtol=0, atol=1e-12)
                if merges < 195:
                    assert following[b].item() == pytest.approx(tree[merges, 2], abs=1e-12)
                checked += 1
    assert checked == 3 * 4 * sample_batch.shape[0]


@pytest.mark.parametrize("block_index, link, merges", [(1, "average", 7), (6, "complete", 40), (9, "single", 25)])
def test_one_block_matches_the_loop_reference(tiny64, sample_batch, block_index, link, merges):
    """dest, output order, merged states, sizes and kinds of one block equal the loop reference, on
    real DeiT-T states with uneven token sizes (float64 on both sides)."""
    x, _, keys = inside_state(tiny64, sample_batch[:3].double(), block_index)
    generator = torch.Generator().manual_seed(block_index)
    sizes = torch.randint(1, 4, x.shape[:2], generator=generator).double()
    sizes[:, 0] = 1
    assignment = atc_assignment(keys, sizes, merges, link)
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    assert assignment.n_out == 197 - merges
    for b in range(3):
        clusters = reference_clusters(reference_distances(keys[b]), merges, link)
        groups = [[0]] + [[i + 1 for i in cluster] for cluster in clusters]
        dest = [0] * x.shape[1]
        for position, group in enumerate(groups):
            for token in group:
                dest[token] = position
        assert assignment.dest[b].tolist() == dest
        expected, expected_sizes = reference_merge(x[b], sizes[b].tolist(), groups)
        torch.testing.assert_close(out[b], expected, atol=1e-10, rtol=1e-10)
        assert sizes_out[b].tolist() == pytest.approx(expected_sizes)
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        assert kinds == ["cls"] + ["merged" if s > 1 else "kept" for s in expected_sizes[1:]]


@pytest.mark.parametrize("params", [{"r": 8}, {"r": 20, "linkage": "complete", "exact_r": True, "prop_attn": False}],
                         ids=["official-r8", "paper-r20-complete-noprop"])
def test_whole_network_matches_the_loop_reference(tiny64, sample_batch, params):
    """The engine (float64 copy of DeiT-T) against the plain reference forward: the same partition of
    the patches after every block, the same merges and logits to 1e-9."""
    images = sample_batch[:2].double()
    result = run(tiny64, images, ReductionPlan.make("atc", **params))
    check_provenance(result)
    plan = ReductionPlan.make("atc", **params).param_dict()
    for b in range(images.shape[0]):
        logits, partitions, merges = reference_atc(tiny64, images[b], plan["r"], plan["linkage"], plan["exact_r"], plan["prop_attn"])
        assert [partition_of(stage.patch_to_token[b].tolist()) for stage in result.stages] == partitions
        torch.testing.assert_close(result.logits[b].double(), logits, atol=1e-6, rtol=1e-9)
    counts = atc_counts(plan["r"], exact_r=plan["exact_r"])
    assert result.token_counts == counts == [197 - sum(merges[: i + 1]) for i in range(12)]
    if params == {"r": 8}:
        assert merges == [7] * 12 and counts == OFFICIAL_COUNTS_R8


def test_official_counts_caps_and_no_op(tiny, sample_batch):
    """r - 1 merges officially (r = 1: none), r with exact_r; at least one patch token is left;
    r = 0 or 1 leaves the model dense."""
    images = sample_batch[:2]
    result = run(tiny.model, images, ReductionPlan.make("atc", r=8))
    assert result.token_counts == OFFICIAL_COUNTS_R8 == atc_counts(8)
    check_provenance(result)
    assert result.stages[0].notes[0].startswith("r=8, average linkage (197 - r = 189 clusters): 196 patch tokens -> 189 clusters")
    assert {KINDS[c] for c in result.stages[-1].token_kinds.flatten().tolist()} == {"cls", "kept", "merged"}
    exact = run(tiny.model, images, ReductionPlan.make("atc", r=8, exact_r=True), track=False)
    assert exact.token_counts == [197 - 8 * (i + 1) for i in range(12)] == atc_counts(8, exact_r=True)
    capped = run(tiny.model, images, ReductionPlan.make("atc", r=150), track=False)
    assert capped.token_counts == atc_counts(150) == [48, 2] + [2] * 10
    assert atc_counts(150, exact_r=True) == [47, 2] + [2] * 10
    assert block_merges(197, 1) == 0 and block_merges(197, 0) == 0 and block_merges(2, 5) == 0
    dense = run(tiny.model, images)
    for r in (0, 1):
        none = run(tiny.model, images, ReductionPlan.make("atc", r=r))
        assert none.stages == [] and none.token_counts == [197] * 12
        torch.testing.assert_close(none.logits, dense.logits, atol=1e-4, rtol=1e-4)
    schedule = (0, 20, 1, 5) + (3,) * 8
    listed = run(tiny.model, images, ReductionPlan.make("atc", r=schedule), track=False)
    assert listed.token_counts == atc_counts(schedule) and listed.token_counts[:4] == [197, 178, 178, 174]


def test_prop_attn_is_on_by_default_and_changes_the_result(tiny, sample_batch):
    images = sample_batch[:2]
    assert get_method("atc").proportional_attention(ReductionPlan.make("atc").param_dict())
    with_prop = run(tiny.model, images, ReductionPlan.make("atc"), track=False)
    without = run(tiny.model, images, ReductionPlan.make("atc", prop_attn=False), track=False)
    assert with_prop.token_counts == without.token_counts
    assert not torch.allclose(with_prop.logits, without.logits, atol=1e-3)


def test_batch_equals_one_image_at_a_time(tiny, sample_batch):
    """The vectorised clustering of 4 images equals the same images one by one (float32, real states)."""
    _, _, keys = inside_state(tiny.model, sample_batch[:4], 7)
    sizes = torch.ones(keys.shape[:2])
    for link in ("average", "single"):
        together = atc_assignment(keys, sizes, 30, link)
        for b in range(4):
            alone = atc_assignment(keys[b:b + 1], sizes[b:b + 1], 30, link)
            assert torch.equal(together.dest[b], alone.dest[0])


def test_exact_ties_and_zero_keys(tiny, sample_batch):
    """Two tied pairs at the smallest distance: the pair with the smaller first member merges first,
    then the other; a zero key gives finite distances (distance 1 to everything)."""
    _, _, keys = inside_state(tiny.model, sample_batch[:1], 8)
    keys = keys.clone()
    keys[:, 101] = 0.0
    distance = cluster_distances(keys)
    assert torch.isfinite(distance[0, 100, :100]).all() and torch.all(distance[0, 100, :100] == 1)
    for i, j in ((49, 59), (12, 30)):
        distance[0, i, j] = distance[0, j, i] = 0.0
    one, heights, following = agglomerate(distance, 1, "complete")
    assert one[0, 30] == 12 and one[0, 59] == 59 and heights[0, 0] == 0 and following[0] == 0
    two, heights, _ = agglomerate(distance, 2, "average")
    assert two[0, 30] == 12 and two[0, 59] == 49 and heights[0].tolist() == [0.0, 0.0]
    assignment = atc_assignment(keys, torch.ones(keys.shape[:2]), 195, "single")
    assert assignment.n_out == 2 and torch.all(assignment.dest[0, 1:] == 1)


@pytest.mark.parametrize("params", [{}, {"r": 8, "linkage": "single"}, {"r": (0, 0, 0, 59, 0, 0, 42, 0, 0, 30, 0, 0)}],
                         ids=["default", "r8-single", "matched"])
def test_gmacs_match_the_flop_counter(tiny, params):
    plan = ReductionPlan.make("atc", **params)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    counter = flop_counter()
    with counter:
        result = run(tiny.model, image, plan, track=False)
    breakdown = plan_macs(tiny.model, plan, counts=result.token_counts)
    assert breakdown.matmul == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    first = breakdown.blocks[0]
    if not params:
        assert first.method_matmul == 197 * 197 * 64 and first.method_elementwise == 12 * 192 + 2 * 12 * 196
    if params.get("linkage") == "single":
        assert first.method_elementwise == 7 * 192
    assert 0 < breakdown.method_share < 0.05


def test_budget_meets_the_keep_rates():
    method = get_method("atc")
    for keep_rate in (0.9, 0.8, 0.7, 0.6, 0.5):
        budget = sum(keep_rate_counts(keep_rate))
        plan = method.budget(keep_rate, 12, 197)
        r = plan.param_dict()["r"]
        assert r == r_for_keep_rate(keep_rate)
        total = sum(atc_counts(r))
        for other in (r - 1, r + 1):  # the neighbours are no nearer
            assert abs(sum(atc_counts(other)) - budget) >= abs(total - budget)
        assert abs(total - budget) <= 0.02 * budget, (keep_rate, r, total, budget)
    assert method.budget(0.7, 12, 197).param_dict()["r"] == 12 and sum(atc_counts(12)) == 1506


def test_matched_budget_follows_target_counts(tiny, sample_batch):
    method = get_method("atc")
    target = keep_rate_counts(0.7)
    plan = method.budget(0.7, 12, 197, target_counts=target)
    assert plan.param_dict()["r"] == (0, 0, 0, 59, 0, 0, 42, 0, 0, 30, 0, 0) == matched_r_schedule(target)
    result = run(tiny.model, sample_batch[:2], plan, track=False)
    assert result.token_counts == target
    assert method.budget(0.7, 12, 197, schedule="matched") == plan
    assert matched_r_schedule(target, exact_r=True) == (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0)
    assert atc_counts(matched_r_schedule(target, exact_r=True), exact_r=True) == target
    tome_like = [184 - 13 * i for i in range(12)]
    assert atc_counts(matched_r_schedule(tome_like)) == tome_like
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[3]), "--model", TINY, "--device", "cpu", "--method", "atc", "--r", "8", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["method"] == "atc"
    assert record["token_counts"] == OFFICIAL_COUNTS_R8
    params = record["params"]
    assert params["r"] == 8 and params["linkage"] == "average" and params["exact_r"] is False and params["prop_attn"] is True
    assert len(record["stages"]) == 12
    for stage, count in zip(record["stages"], OFFICIAL_COUNTS_R8):
        assert len(stage["token_kinds"]) == count and sum(stage["token_sizes"]) == 196
        assert stage["token_kinds"][0] == "cls" and "height gap" in stage["note"]
    assert 0 < record["gmacs"] < record["dense_gmacs"]


@pytest.mark.parametrize("params, message", [
    ({"linkage": "ward"}, "linkage must be one of average, complete, single"),
    ({"r": -1}, "r must be at least 0"),
    ({"r": (13, 13)}, "r list has 2 entries"),
    ({"exact_r": "maybe"}, "exact_r must be true or false"),
    ({"bogus": 1}, "has no parameter 'bogus'"),
])
def test_bad_parameters_give_a_one_line_plan_error(tiny, sample_batch, params, message):
    plan = ReductionPlan.make("atc", **params)
    with pytest.raises(PlanError, match=message) as caught:
        run(tiny.model, sample_batch[:1], plan)
    assert "\n" not in str(caught.value)
