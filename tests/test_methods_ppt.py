"""PPT (methods.md §19) on the real DeiT-Tiny weights and ImageNet photos: one stage and the whole
network against plain-loop reimplementations, the official run's decisions and counts, mixed
batches, GMACs, the budget, the CLI JSON and bad parameters."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_macs
from analysis.methods import KINDS, apply_assignment
from analysis.methods.base import ReduceContext, keep_rate_counts
from analysis.methods.ppt import ppt_counts, prune_assignment
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance

# Tokens leaving each block in the official run (README setting r 50 at 4, 7, 10; every image,
# both thresholds; /work/scratch/ppt/official_deit_t_*.meta.json).
OFFICIAL_COUNTS = [197, 197, 197, 147, 147, 147, 97, 97, 97, 49, 49, 49]
# The official decisions (layers 4 / 7 / 10) of sample photos, by index into the sorted sample:
# threshold 7e-5 (README eval) and 6e-5 (README fine-tuning), from the official dumps.
OFFICIAL_PATHS_7E5 = {0: "pool/pool/prune", 6: "pool/pool/prune", 8: "pool/prune/prune", 17: "pool/pool/pool",
                      73: "pool/prune/prune"}
OFFICIAL_PATHS_6E5 = {0: "pool/pool/prune", 6: "pool/prune/prune", 8: "pool/prune/prune", 17: "pool/pool/prune",
                      73: "pool/prune/prune"}


def photos(tiny, sample_files, indices):
    from analysis.models import load_image, preprocess

    return preprocess([load_image(sample_files[i]) for i in indices], tiny.model)


def decisions(result) -> list[str]:
    """'pool/prune/...' per image from the stage notes."""
    per_image = [[] for _ in range(result.logits.shape[0])]
    for stage in result.stages:
        for b in range(len(per_image)):
            per_image[b].append("pool" if stage.notes[b].startswith("pooled") else "prune")
    return ["/".join(path) for path in per_image]


# ----------------------------------------------------------------------------------------------
# plain-loop references, written from methods.md §19
# ----------------------------------------------------------------------------------------------

def loop_scores(cls_rows: torch.Tensor, values: torch.Tensor) -> list[float]:
    """§19 (1): S_j for one image. cls_rows [H, N] post-softmax cls row, values [H, N, d]."""
    rows, vals = cls_rows.tolist(), values.tolist()
    heads, n_all = len(vals), len(vals[0])
    raw = []
    for j in range(1, n_all):
        attention = sum(rows[h][j] for h in range(heads))
        norm = math.sqrt(sum(value ** 2 for h in range(heads) for value in vals[h][j]))
        raw.append(attention * norm)
    total = sum(raw)
    return [s / total for s in raw]


def loop_variance(scores: list[float]) -> float:
    mean = sum(scores) / len(scores)
    return sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)


def loop_pool(keys: torch.Tensor, r: int) -> tuple[list[int], dict[int, int]]:
    """§19 pooling (ToMe's matching) for one image [N, d]: the output order as old indices
    (unmerged A ascending, then B) and {merged A token: its B partner}; ties by position."""
    n = keys.shape[0]
    metric = keys.double() / keys.double().norm(dim=-1, keepdim=True)
    side_a, side_b = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for i in side_a[1:]:
        sims = [float(metric[i] @ metric[j]) for j in side_b]
        q = max(range(len(side_b)), key=lambda k: sims[k])
        best[i] = (sims[q], side_b[q])
    merging = sorted(best, key=lambda i: -best[i][0])[:r]
    return sorted(set(side_a) - set(merging)) + side_b, {i: best[i][1] for i in merging}


def loop_prune(scores: list[float], r: int) -> list[int]:
    """§19 pruning for one image: cls, then the n - r best-scored tokens by descending score (ties by position)."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    return [0] + [j + 1 for j in order[: len(scores) - r]]


def loop_stage(x, sizes, cls_rows, values, keys, r, threshold, prop_attn=True):
    """One PPT stage for one image with Python lists: returns (decision, variance, groups of old
    indices per output token in output order, new x rows, new sizes)."""
    scores = loop_scores(cls_rows, values)
    variance = loop_variance(scores)
    r = min(r, (x.shape[0] - 1) // 2)
    if variance < threshold:
        order, partner = loop_pool(keys, r)
        groups = [[t] + [i for i, j in partner.items() if j == t] for t in order]
        weights = sizes if prop_attn else [1.0] * len(sizes)
        rows = [sum(weights[i] * x[i].double() for i in g) / sum(weights[i] for i in g) for g in groups]
        return "pool", variance, groups, rows, [sum(sizes[i] for i in g) for g in groups]
    kept = loop_prune(scores, r)
    return "prune", variance, [[t] for t in kept], [x[t].double() for t in kept], [sizes[t] for t in kept]


@torch.inference_mode()
def loop_network(model, image: torch.Tensor, r=50, threshold=7e-5, layers=(4, 7, 10)):
    """The whole DeiT forward with PPT for one image, with explicit attention (log-size bias on every
    key) and `loop_stage`. Returns (logits [1000], decisions, patch members per token in order)."""
    x = block_input(model, image[None], 0)[0]
    sizes = [1.0] * x.shape[0]
    members: list[list[int]] = [[]] + [[p] for p in range(x.shape[0] - 1)]
    path = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        n, channels = x.shape
        heads, d = attn.num_heads, channels // attn.num_heads
        qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = ((q @ k.transpose(-2, -1)) * attn.scale + torch.tensor(sizes).log()[None, None, :]).softmax(-1)
        x = x + attn.proj((probs @ v).transpose(0, 1).reshape(n, channels))
        if index + 1 in layers:
            decision, _, groups, rows, sizes = loop_stage(x, sizes, probs[:, 0], v, k.mean(0), r, threshold)
            path.append(decision)
            members = [sorted(p for i in g for p in members[i]) for g in groups]
            x = torch.stack(rows).float()
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, "/".join(path), members


def dense_state(model, images, block_index):
    """x after the attention residual, the cls rows [B, H, N], values [B, H, N, d] and mean keys of
    block `block_index` of the dense model (explicit softmax)."""
    x = block_input(model, images, block_index)
    block = model.blocks[block_index]
    attn = block.attn
    batch, n, channels = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, n, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    p = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    x = x + attn.proj((p @ v).transpose(1, 2).reshape(batch, n, channels))
    return x, p[:, :, 0], v, k.mean(dim=1)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prop_attn", [True, False])
def test_one_stage_matches_loop_reference_on_a_mixed_batch(tiny, sample_batch, prop_attn):
    """Layer 7 of the dense model for 6 photos, sizes 1..3, the threshold at the batch's median
    variance: half the images pool, half prune, in one assignment."""
    images = sample_batch[:6]
    x, cls_rows, values, keys = dense_state(tiny.model, images, 6)
    sizes = torch.randint(1, 4, x.shape[:2], generator=torch.Generator().manual_seed(3)).float()
    sizes[:, 0] = 1
    variances = [loop_variance(loop_scores(cls_rows[b], values[b])) for b in range(6)]
    ordered = sorted(variances)
    threshold = (ordered[2] + ordered[3]) / 2  # three images pool, three prune
    plan = ReductionPlan.make("ppt", r_tokens=30, threshold=threshold, prop_attn=prop_attn)
    ctx = ReduceContext(x=x, sizes=sizes, keep_rate=1.0, stage=1, block_index=6, params=plan.param_dict(), num_patches=196,
                        cls_attention_heads=cls_rows[:, :, 1:], values_heads=values, keys=keys)
    assignment = get_method("ppt").assign(ctx)
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    assert assignment.n_out == 197 - 30
    seen = set()
    for b in range(6):
        decision, variance, groups, rows, new_sizes = loop_stage(x[b], sizes[b].tolist(), cls_rows[b], values[b], keys[b], 30,
                                                                 threshold, prop_attn)
        seen.add(decision)
        dest = [-1] * 197
        for t, group in enumerate(groups):
            for i in group:
                dest[i] = t
        assert assignment.dest[b].tolist() == dest
        torch.testing.assert_close(out[b].double(), torch.stack(rows), atol=2e-5, rtol=1e-5)
        assert sizes_out[b].tolist() == new_sizes
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        if decision == "pool":
            assert kinds == ["cls"] + ["merged" if s > 1 else "kept" for s in new_sizes[1:]]
        else:
            assert kinds == ["cls"] + ["kept"] * (len(groups) - 1) and min(dest) == -1
        verb = "pooled" if decision == "pool" else "pruned"
        assert assignment.notes[b].startswith(f"{verb}: variance ")
        assert abs(float(assignment.notes.variance[b]) - variance) <= 1e-6 * variance
    assert seen == {"pool", "prune"}


def test_whole_network_matches_loop_reference(tiny, sample_files):
    """Three photos that take three different official paths, batched: partitions and token order
    after the last stage, the decisions and the logits equal the per-image loop reference."""
    indices = [0, 8, 17]
    images = photos(tiny, sample_files, indices)
    result = run(tiny.model, images, ReductionPlan.make("ppt"))
    check_provenance(result, allow_discard=True)
    paths = decisions(result)
    for b, index in enumerate(indices):
        logits, path, members = loop_network(tiny.model, images[b])
        assert path == paths[b] == OFFICIAL_PATHS_7E5[index]
        ours: dict[int, list[int]] = {}
        for patch, token in enumerate(result.stages[-1].patch_to_token[b].tolist()):
            ours.setdefault(token, []).append(patch)
        assert [ours.get(t, []) for t in range(len(members))] == members  # token order included
        torch.testing.assert_close(result.logits[b], logits, atol=2e-4, rtol=1e-4)


def test_official_decisions_counts_and_pictures(tiny, sample_files):
    """The official run's per-image decisions (both README thresholds) and token counts, in one
    batch mixing the paths; pooled stages draw merge groups, pruned stages discard patches."""
    from viz.overlays import suggested_view
    from analysis.provenance import StageRecord

    indices = sorted(OFFICIAL_PATHS_7E5)
    images = photos(tiny, sample_files, indices)
    for threshold, official in ((7e-5, OFFICIAL_PATHS_7E5), (6e-5, OFFICIAL_PATHS_6E5)):
        result = run(tiny.model, images, ReductionPlan.make("ppt", threshold=threshold))
        assert result.token_counts == OFFICIAL_COUNTS == ppt_counts(50)
        assert decisions(result) == [official[i] for i in indices]
        check_provenance(result, allow_discard=True)
        discarded_before = torch.zeros(len(indices), dtype=torch.long)
        for stage in result.stages:
            for b in range(len(indices)):
                record = StageRecord.from_stage(stage, b)
                discarded = int((stage.patch_to_token[b] < 0).sum())
                if record.note.startswith("pooled"):
                    assert suggested_view(record) == "merge" and discarded == discarded_before[b]
                    assert f"< {threshold:g}" in record.note
                else:
                    assert suggested_view(record) == "masked" and discarded > discarded_before[b]
                    assert f">= {threshold:g}" in record.note
                discarded_before[b] = discarded


def test_mixed_batch_provenance_equals_each_image_alone(tiny, sample_files):
    """The official trace_source crashes on batches mixing pooled and pruned images; ours takes
    each image's provenance from its own decision."""
    indices = [8, 0, 17, 73]  # mixed at layers 7 and 10
    images = photos(tiny, sample_files, indices)
    plan = ReductionPlan.make("ppt")
    together = run(tiny.model, images, plan)
    mixed = [stage.layer for stage in together.stages if 0 < int(stage.notes.pooled.sum()) < len(indices)]
    assert mixed == [7, 10]
    for b in range(len(indices)):
        alone = run(tiny.model, images[b:b + 1], plan)
        for one, many in zip(alone.stages, together.stages):
            assert torch.equal(one.patch_to_token[0], many.patch_to_token[b])
            assert torch.equal(one.token_sizes[0], many.token_sizes[b])
            assert one.kind_names(0) == many.kind_names(b) and one.notes[0] == many.notes[b]
        torch.testing.assert_close(alone.logits[0], together.logits[b], atol=1e-4, rtol=1e-4)


def test_forced_branches_r_zero_and_prop_attn(tiny, sample_batch):
    images = sample_batch[:2]
    pool = run(tiny.model, images, ReductionPlan.make("ppt", decision="pool"))
    prune = run(tiny.model, images, ReductionPlan.make("ppt", decision="prune", threshold=0.0))
    assert pool.token_counts == prune.token_counts == OFFICIAL_COUNTS
    assert decisions(pool) == ["pool/pool/pool"] * 2 and decisions(prune) == ["prune/prune/prune"] * 2
    assert "decision=prune" in prune.stages[0].notes[0]
    assert all(int((s.patch_to_token < 0).sum()) == 0 for s in pool.stages)
    # pruning 50 size-1 tokens at layer 4 discards exactly 50 patches
    assert torch.equal((prune.stages[0].patch_to_token < 0).sum(dim=1), torch.tensor([50, 50]))
    dense = run(tiny.model, images)
    none = run(tiny.model, images, ReductionPlan.make("ppt", r_tokens=0))
    assert none.stages == [] and none.token_counts == [197] * 12
    torch.testing.assert_close(none.logits, dense.logits, atol=1e-4, rtol=1e-4)
    off = run(tiny.model, images, ReductionPlan.make("ppt", prop_attn=False), track=False)
    on = run(tiny.model, images, ReductionPlan.make("ppt"), track=False)
    assert off.token_counts == on.token_counts and not torch.allclose(off.logits, on.logits, atol=1e-3)
    listed = run(tiny.model, images, ReductionPlan.make("ppt", r_tokens=(20, 60, 10)), track=False)
    assert listed.token_counts == ppt_counts((20, 60, 10)) == [197] * 3 + [177] * 3 + [117] * 3 + [107] * 3


def test_prune_ties_go_by_position():
    """Tokens 1..5 scored 0.1, 0.3, 0.3, 0.1, 0.2: by descending score, equal scores by position."""
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.1, 0.2]])
    assert prune_assignment(scores, 2).dest[0].tolist() == [0, -1, 1, 2, -1, 3]
    assert prune_assignment(scores, 1).dest[0].tolist() == [0, 4, 1, 2, -1, 3]  # the tie at the boundary: token 1 stays


@pytest.mark.parametrize("params", [{}, {"decision": "prune"}, {"decision": "pool", "r_tokens": 30}])
def test_gmacs_match_the_flop_counter(tiny, params):
    model = tiny.model
    plan = ReductionPlan.make("ppt", **params)
    macs = plan_macs(model, plan)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with flop_counter() as counter:
        run(model, image, plan, track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=0.02)
    if params.get("decision") == "prune":
        assert sum(block.method_elementwise for block in macs.blocks) > 0
    # the official DeiT-T README-setting count is 0.7997 (prune) .. 0.8010 (pool) GMACs (torchprofile,
    # NOTES.md §4); ours counts no LayerNorm or scaling multiplies: within 0.2 %
    if not params:
        assert 0.7997e9 * 0.998 < macs.total < 0.8010e9


def test_budget_follows_the_keep_rate_counts(tiny, sample_batch):
    method = get_method("ppt")
    for keep_rate in (0.9, 0.8, 0.7, 0.6, 0.5):
        target = keep_rate_counts(keep_rate)
        plan = method.budget(keep_rate, 12, 197)
        plan.validate(12)
        layers = plan.reducing_layers(12)
        counts = ppt_counts(plan.param_dict()["r_tokens"], 12, 197, layers)
        assert counts == target and layers == (4, 7, 10)
    # at 0.4 the (N - 1) // 2 cap stops layers 4, 7 and 10 (target 80 from 197, 33 from 80, 14 from 33):
    # the next block catches up each time
    low = method.budget(0.4, 12, 197)
    layers = low.reducing_layers(12)
    assert layers == (4, 5, 7, 8, 10, 11)
    assert ppt_counts(low.param_dict()["r_tokens"], 12, 197, layers) == [197] * 3 + [99, 80, 80, 41, 33, 33, 17, 14, 14]
    assert keep_rate_counts(0.4)[-1] == 14
    seven = method.budget(0.7, 12, 197)
    result = run(tiny.model, sample_batch[:2], seven, track=False)
    assert result.token_counts == keep_rate_counts(0.7) == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    # target counts block by block (ToMe's r = 13 in every block): PPT reduces where they drop
    tome_like = [184 - 13 * i for i in range(12)]
    follow = method.budget(0.7, 12, 197, target_counts=tome_like)
    assert follow.reducing_layers(12) == tuple(range(1, 13))
    assert ppt_counts(follow.param_dict()["r_tokens"], layers=range(1, 13)) == tome_like
    assert method.budget(1.0, 12, 197).param_dict()["r_tokens"] == 0
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[8]), "--model", TINY, "--device", "cpu", "--method", "ppt", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["token_counts"] == OFFICIAL_COUNTS
    assert record["params"]["r_tokens"] == 50 and record["params"]["threshold"] == 7e-5 and record["params"]["layers"] == [4, 7, 10]
    assert [stage["note"].split(":")[0] for stage in record["stages"]] == ["pooled", "pruned", "pruned"]  # the official path
    discarded = 0
    for stage in record["stages"]:
        p2t = stage["patch_to_token"]
        assert len(stage["token_kinds"]) == len(stage["token_sizes"])
        assert sum(stage["token_sizes"]) + sum(1 for t in p2t if t < 0) == 196
        assert ("merged" in stage["token_kinds"]) == stage["note"].startswith("pooled")
        now = sum(1 for t in p2t if t < 0)
        assert (now > discarded) == stage["note"].startswith("pruned")
        discarded = now
    assert [len(stage["token_kinds"]) for stage in record["stages"]] == [147, 97, 49]


@pytest.mark.parametrize("params, message", [
    ({"r_tokens": -1}, "r_tokens must be at least 0"),
    ({"threshold": -1e-5}, "threshold must be at least 0"),
    ({"decision": "both"}, "decision must be one of"),
    ({"r_tokens": (50, 50)}, "r_tokens list has 2 entries"),
    ({"threshold": "high"}, "threshold must be a number"),
])
def test_bad_parameters_give_a_one_line_plan_error(params, message):
    with pytest.raises(PlanError, match=message) as err:
        ReductionPlan.make("ppt", **params).validate(12)
    assert "\n" not in str(err.value)
