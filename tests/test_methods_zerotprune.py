"""Zero-TPrune, reconstructed (methods.md §17), on the real DeiT-Tiny weights and ImageNet photos: the
whole network against a plain-loop reference written from the spec (several parameter settings),
the Weighted PageRank against the attention graph's stationary distribution, the S-stage on a
hand-made example, batch independence, GMACs, the budget, the CLI JSON and bad parameters."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_macs
from analysis.methods.base import keep_rate_counts
from analysis.methods.zerotprune import head_scores, weighted_pagerank, zerotprune_keep
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance
from pruning_reference import engine_kept, reference_pruning

DEFAULTS = {"iterations": 30, "aggregation": "eir", "v_min": 0.0, "v_max": 1.0, "s_ratio": 0.5,
            "partition": "sequential", "metric": "keys"}


def zerotprune_select(keep_rate: float, **overrides):
    """methods.md §17 written as plainly as possible, for one image."""
    p = {**DEFAULTS, **overrides}

    def select(stage, x, probs, keys):
        n_tokens = x.shape[0]
        n = n_tokens - 1
        k = math.ceil(keep_rate * n)
        if k >= n:
            return None
        r = n - k
        r_s = min(math.floor(p["s_ratio"] * r), k)
        r_i = r - r_s
        # I-stage: Weighted PageRank per head, s_j <- sum_i A[i, j] s_i from s = 1/N
        per_head = []
        for h in range(probs.shape[0]):
            s = torch.full((n_tokens,), 1.0 / n_tokens)
            for _ in range(p["iterations"]):
                s = torch.mv(probs[h].T, s)
            per_head.append([float(v) for v in s[1:]])
        variances = []
        for scores in per_head:
            mean = sum(scores) / n
            variances.append(sum((v - mean) ** 2 for v in scores) / n)
        used = [h for h, v in enumerate(variances) if p["v_min"] <= v <= p["v_max"]] or list(range(len(per_head)))
        if p["aggregation"] == "eir":
            score = [math.sqrt(sum(per_head[h][j] ** 2 for h in used) / len(used)) for j in range(n)]
        else:
            score = [sum(per_head[h][j] for h in used) / len(used) for j in range(n)]
        ranked = sorted(range(n), key=lambda j: (-score[j], j))
        survivors = ranked[: n - r_i]
        if r_s == 0:
            return [j + 1 for j in survivors]
        # S-stage: groups by importance rank, each A token's best cosine similarity to B
        m = len(survivors)
        if p["partition"] == "sequential":
            b_group, a_group = survivors[: (m + 1) // 2], survivors[(m + 1) // 2:]
        else:
            b_group, a_group = survivors[0::2], survivors[1::2]
        feats = keys if p["metric"] == "keys" else x
        unit = {j: feats[j + 1] / feats[j + 1].norm() for j in survivors}
        best = {a: max(float(torch.dot(unit[a], unit[b])) for b in b_group) for a in a_group}
        dropped = set(sorted(a_group, key=lambda a: (-best[a], -survivors.index(a)))[:r_s])
        return [j + 1 for j in survivors if j not in dropped]
    return select


@pytest.mark.parametrize("keep_rate, params", [
    (0.7, {}),
    (0.5, {"metric": "x", "partition": "alternate", "aggregation": "mean", "v_max": 1.5e-5}),
    (0.6, {"s_ratio": 0.0, "iterations": 3}),
    (0.3, {"s_ratio": 1.0}),
])
def test_zerotprune_matches_the_loop_reference(tiny, sample_batch, keep_rate, params):
    images = sample_batch[:3]
    result = run(tiny.model, images, ReductionPlan.make("zerotprune", keep_rate, **params))
    check_provenance(result, allow_discard=True)
    assert result.token_counts == keep_rate_counts(keep_rate)
    for b in range(images.shape[0]):
        logits, sets, orders = reference_pruning(tiny.model, images[b], zerotprune_select(keep_rate, **params))
        torch.testing.assert_close(result.logits[b], logits, atol=1e-4, rtol=0)
        assert len(result.stages) == len(sets) == 3
        for stage, expected, order in zip(result.stages, sets, orders):
            assert engine_kept(stage, b) == (expected, order)


def _attention(tiny, images, block_index: int) -> torch.Tensor:
    model = tiny.model
    x = block_input(model, images, block_index)
    block = model.blocks[block_index]
    attn = block.attn
    batch, n, channels = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, n, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
    return ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(dim=-1)


def test_pagerank_is_the_attention_graphs_stationary_distribution(tiny, sample_batch):
    probs = _attention(tiny, sample_batch[:2], 9).double()
    scores = weighted_pagerank(probs, 200).double()
    assert torch.allclose(scores.sum(dim=-1), torch.ones(2, 3, dtype=torch.float64), atol=1e-5)
    for b in range(2):
        for h in range(3):
            values, vectors = torch.linalg.eig(probs[b, h].T)
            one = int((values - 1).abs().argmin())
            stationary = vectors[:, one].real
            stationary = stationary / stationary.sum()
            torch.testing.assert_close(scores[b, h], stationary, atol=1e-5, rtol=1e-3)
    # one iteration from s = 1/N: the mean attention each token receives
    torch.testing.assert_close(weighted_pagerank(probs, 1).double(), probs.mean(dim=2), atol=1e-6, rtol=1e-5)
    # and the ranking is not the class attention's (the graph is not the cls row)
    ranked = torch.argsort(scores[0, 0, 1:], descending=True)[:50]
    cls_ranked = torch.argsort(probs[0, 0, 0, 1:], descending=True)[:50]
    assert set(ranked.tolist()) != set(cls_ranked.tolist())


def test_head_filter_and_aggregation():
    scores = torch.tensor([[[0.1, 0.3, 0.6], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]]])  # [1, 3 heads, 3 tokens]
    variance = scores.var(dim=2, correction=0)[0]
    torch.testing.assert_close(head_scores(scores, "mean", 0.0, 1.0), scores.mean(dim=1))
    torch.testing.assert_close(head_scores(scores, "eir", 0.0, 1.0), scores.square().mean(dim=1).sqrt())
    # v_max just below head 0's variance leaves heads 1 and 2
    cut = float(variance[0]) * 0.999
    assert float(variance[1]) < cut and float(variance[2]) < cut
    torch.testing.assert_close(head_scores(scores, "mean", 0.0, cut), scores[:, 1:].mean(dim=1))
    # a filter that removes every head falls back to all of them
    torch.testing.assert_close(head_scores(scores, "mean", 5.0, 6.0), scores.mean(dim=1))


def test_s_stage_on_a_hand_made_example():
    """Six tokens, importance 6 > 5 > ... > 1 for tokens 1 .. 6; token 5 nearly duplicates token 1
    (cosine 0.9988), token 6 duplicates token 2, tokens 3 and 4 are orthogonal to everything else."""
    importance = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    features = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0], [2.0, 0, 0, 0.1], [0, 3.0, 0, 0]]])
    assert zerotprune_keep(importance, features, 0.5, 1.0, "sequential").tolist() == [[1, 2, 3]]
    # keep 3 with s_ratio 1: r_S = min(3, k = 3): sequential A = tokens 4, 5, 6 (the less important half), all go
    # s_ratio 0.5: r = 3, r_S = 1, r_I = 2: tokens 6 and 5 go by importance; of 1 .. 4, B = {1, 2}, A = {3, 4}, both
    # at similarity 0: the tie goes against the less important, token 4
    assert zerotprune_keep(importance, features, 0.5, 0.5, "sequential").tolist() == [[1, 2, 3]]
    # keep 4 with s_ratio 1: r_S = 2 of A = {4, 5, 6}: 6 (cosine 1 with 2) and 5 (0.998 with 1) go
    assert zerotprune_keep(importance, features, 4 / 6, 1.0, "sequential").tolist() == [[1, 2, 3, 4]]
    # alternate: B = ranks 0, 2, 4 = tokens 1, 3, 5; A = tokens 2, 4, 6. Token 4 is closest to B (0.05 with 5);
    # token 6 duplicates 2, but 2 is in A: tokens 2 and 6 tie at 0 and the less important, 6, goes
    assert zerotprune_keep(importance, features, 4 / 6, 1.0, "alternate").tolist() == [[1, 2, 3, 5]]


def test_an_image_keeps_the_same_tokens_alone_and_in_a_batch(tiny, sample_batch):
    plan = ReductionPlan.make("zerotprune", 0.6)
    together = run(tiny.model, sample_batch[:4], plan)
    for b in (0, 3):
        alone = run(tiny.model, sample_batch[b:b + 1], plan)
        for one, many in zip(alone.stages, together.stages):
            assert torch.equal(one.patch_to_token[0], many.patch_to_token[b])
        torch.testing.assert_close(alone.logits[0], together.logits[b], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep_rate, params", [
    (0.7, {}), (0.4, {"metric": "x", "partition": "alternate"}), (0.7, {"s_ratio": 0.0, "iterations": 5}), (0.5, {"s_ratio": 1.0}),
])
def test_gmacs_match_the_flop_counter(tiny, keep_rate, params):
    model = tiny.model
    plan = ReductionPlan.make("zerotprune", keep_rate, **params)
    macs = plan_macs(model, plan)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with flop_counter() as counter:
        run(model, image, plan, track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)
    # the full attention matrix (N^2 C per reducing block) and the PageRank are counted: dearer than Top-K
    topk = plan_macs(model, ReductionPlan.make("topk", keep_rate))
    extra = sum(b.method_matmul for b in macs.blocks) - sum(b.method_matmul for b in topk.blocks)
    n_blocks = [197, 1 + math.ceil(keep_rate * 196)]
    n_blocks.append(1 + math.ceil(keep_rate * (n_blocks[1] - 1)))
    full_attention = sum(n * n * 192 for n in n_blocks)
    pagerank = sum(plan.param_dict()["iterations"] * 3 * n * n for n in n_blocks)
    assert extra >= full_attention + pagerank - sum(n * 192 for n in n_blocks)


def test_budget_is_the_method_at_the_keep_rate(tiny, sample_batch):
    plan = get_method("zerotprune").budget(0.6, 12, 197)
    assert plan == ReductionPlan.make("zerotprune", 0.6)
    assert run(tiny.model, sample_batch[:1], plan, track=False).token_counts == keep_rate_counts(0.6)


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[5]), "--model", TINY, "--device", "cpu", "--method", "zerotprune", "--keep-rate", "0.7",
                 "--zerotprune-partition", "alternate", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["token_counts"] == keep_rate_counts(0.7)
    assert record["params"]["partition"] == "alternate" and record["params"]["iterations"] == 30
    assert [len(stage["token_kinds"]) for stage in record["stages"]] == [139, 98, 69]
    discarded = [sum(1 for t in stage["patch_to_token"] if t < 0) for stage in record["stages"]]
    assert discarded == [196 - 138, 196 - 97, 196 - 68]  # pruned patches are discarded


@pytest.mark.parametrize("params, message", [
    ({"iterations": 0}, "iterations must be at least 1"),
    ({"v_min": 0.5, "v_max": 0.1}, "v_min .* must not exceed v_max"),
    ({"s_ratio": 1.5}, "s_ratio must be at most 1"),
    ({"partition": "random"}, "partition must be one of"),
    ({"metric": "values"}, "metric must be one of"),
    ({"aggregation": "max"}, "aggregation must be one of"),
])
def test_bad_parameters_give_a_one_line_plan_error(params, message):
    with pytest.raises(PlanError, match=message) as err:
        ReductionPlan.make("zerotprune", 0.7, **params).validate(12)
    assert "\n" not in str(err.value)


def test_the_full_attention_is_formed_only_at_the_reducing_blocks(tiny, sample_batch, monkeypatch):
    """`needs = {"attention"}`: the engine forms the N x N softmax at the 3 reducing blocks only
    (the other blocks stay on the fused attention)."""
    shapes: list[tuple[int, ...]] = []
    original = torch.Tensor.softmax

    def spy(tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    run(tiny.model, sample_batch[:2], ReductionPlan.make("zerotprune", 0.7), track=False)
    square = [shape for shape in shapes if len(shape) == 4 and shape[-1] == shape[-2] > 1]
    assert square == [(2, 3, 197, 197), (2, 3, 139, 139), (2, 3, 98, 98)]
