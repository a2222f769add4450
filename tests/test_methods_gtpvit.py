"""GTP-ViT (methods.md §18) on the real DeiT-Tiny weights and ImageNet photos: the sparsified
attention, the scores, the graph and one propagation step, then the whole network, against plain
loop references written from the spec; counts, provenance and the dispatch map, ties, GMACs, the
budget, the CLI JSON and bad parameters."""
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
from analysis.methods.gtpvit import (
    README_SETTINGS, gtp_counts, propagation_graph, select_propagated, sparsify_attention, token_scores,
)
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import check_provenance

DEFAULTS = {"num_prop": 13, "sparsity": 0.7, "alpha": 0.3, "num_neighbours": 8, "graph_type": "Mixed",
            "selection": "MixedAttnMax", "propagation": "GraphProp", "ties": "position", "token_scale": True}


# ----------------------------------------------------------------------------------------------
# plain-loop references, written from methods.md §18
# ----------------------------------------------------------------------------------------------

def loop_sparsify(probs: torch.Tensor, sparsity: float) -> torch.Tensor:
    """§18 (1) for one image [H, N, N]: per head, zero every probability below the k-th smallest."""
    heads, n, _ = probs.shape
    k = int(n * n * (1 - sparsity))
    out = probs.clone()
    for h in range(heads):
        threshold = sorted(probs[h].flatten().tolist())[k - 1]
        out[h][probs[h] < threshold] = 0.0
    return out


def loop_scores(probs: torch.Tensor) -> list[float]:
    """§18 (2) MixedAttnMax for one image [H, N, N]: max_h A[j, j] * max_h sum_i A[i, j], j >= 1."""
    p = probs.double().tolist()
    heads, n = len(p), len(p[0])
    scores = []
    for j in range(1, n):
        diag = max(p[h][j][j] for h in range(heads))
        received = max(math.fsum(p[h][i][j] for i in range(n)) for h in range(heads))
        scores.append(diag * received)
    return scores


def loop_graph(patches: torch.Tensor, k: int, graph_type: str = "Mixed") -> list[list[float]]:
    """§18 (3) for one image [P, C]: the 8-neighbour grid OR each patch's k most cosine-similar
    patches, then G[i][j] = A[i][j] / sqrt(d_i d_j) with d the row sums."""
    n = patches.shape[0]
    side = math.isqrt(n)
    unit = patches.double() / patches.double().norm(dim=-1, keepdim=True)
    sims = (unit @ unit.T).tolist()
    adjacency = [[0] * n for _ in range(n)]
    for i in range(n):
        if graph_type in ("Spatial", "Mixed"):
            for j in range(n):
                if j != i and abs(i // side - j // side) <= 1 and abs(i % side - j % side) <= 1:
                    adjacency[i][j] = 1
        if graph_type in ("Semantic", "Mixed"):
            nearest = sorted(range(n), key=lambda j: -sims[i][j])[: k + 1]  # itself and its k nearest
            for j in nearest:
                if j != i:
                    adjacency[i][j] = 1
    degree = [sum(row) for row in adjacency]
    return [[adjacency[i][j] / math.sqrt(degree[i] * degree[j]) for j in range(n)] for i in range(n)]


def loop_propagate(x: torch.Tensor, scales: list[float], graph: list[list[float]], kept: list[int], prop: list[int],
                   alpha: float):
    """§18 (3)-(4) for one image: x [N, C] (token 0 = cls), kept / prop 0-based image-token indices.
    Returns (x' [1 + k, C] float64, scales', the graph over the kept tokens, {prop j: {kept i: weight}})."""
    rows, new_scales, received = [x[0].double()], [scales[0]], {}
    for i in kept:
        row, scale = x[i + 1].double().clone(), scales[i + 1]
        for j in prop:
            w = graph[i][j]
            if w > 0:
                row = row + alpha * w * x[j + 1].double()
                scale += alpha * w * scales[j + 1]
                received.setdefault(j, {})[i] = alpha * w
        rows.append(row)
        new_scales.append(scale)
    reduced = [[graph[a][b] for b in kept] for a in kept]
    return torch.stack(rows), new_scales, reduced, received


@torch.inference_mode()
def loop_network(model, image: torch.Tensor, params: dict):
    """The whole GTP-ViT forward for one image [3, H, W], block by block (timm's own modules, explicit
    softmax). Returns (logits [classes], per block the kept tokens as original patch ids, in order)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]
    graph = loop_graph(x[1:], params["num_neighbours"])
    ids, scales, trace = list(range(x.shape[0] - 1)), [1.0] * x.shape[0], []
    for block in model.blocks:
        attn = block.attn
        n, channels = x.shape
        qkv = attn.qkv(block.norm1(x[None])).reshape(1, n, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = torch.tensor(scales).log() if params["token_scale"] else torch.zeros(n)
        p = ((q @ k.transpose(-2, -1)) * attn.scale + bias).softmax(-1)[0]
        p = loop_sparsify(p, params["sparsity"])
        x = x + attn.proj((p[None] @ v).transpose(1, 2).reshape(1, n, channels))[0]
        scores = loop_scores(p)
        order = sorted(range(n - 1), key=lambda j: (-scores[j], j))
        cut = n - 1 - params["num_prop"]
        kept, prop = order[:cut], order[cut:]
        x, scales, graph, _ = loop_propagate(x, scales, graph, kept, prop, params["alpha"])
        x = x.float()
        ids = [ids[i] for i in kept]
        trace.append(ids)
        x = x + block.mlp(block.norm2(x[None]))[0]
    return model.forward_head(model.norm(x[None]))[0], trace


# ----------------------------------------------------------------------------------------------
# one block
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def block_one(tiny, sample_batch):
    """Block 1 of two photos: the embedding, the block's post-softmax attention, x after its
    attention residual with the sparsified attention (theta 0.7)."""
    model = tiny.model
    images = sample_batch[:2]
    with torch.inference_mode():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        block = model.blocks[0]
        attn = block.attn
        b, n, c = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        probs = ((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale).softmax(-1)
        sparse = torch.stack([loop_sparsify(probs[i], 0.7) for i in range(b)])
        after = x + attn.proj((sparse @ qkv[2]).transpose(1, 2).reshape(b, n, c))
    return x, probs, sparse, after


def test_sparsified_attention_matches_loop_reference(block_one):
    _, probs, sparse, _ = block_one
    ours = sparsify_attention(probs, 0.7)
    assert torch.equal(ours, sparse)
    n = probs.shape[-1]
    k = int(n * n * (1 - 0.7))
    zeros = (ours == 0).flatten(2).sum(-1)
    assert torch.all(zeros == k - 1)  # no exact ties at the k-th value on these photos: k - 1 entries below it
    assert torch.equal(sparsify_attention(probs, 1.0), probs)


def test_one_block_matches_loop_reference(block_one):
    """Scores, selection, graph and propagation of block 1 (default parameters) against §18 by loops."""
    embedding, _, sparse, after = block_one
    method = get_method("gtpvit")
    batch, n = after.shape[:2]
    ctx = ReduceContext(x=after, sizes=torch.ones(batch, n), keep_rate=1.0, stage=0, block_index=0, params=dict(DEFAULTS),
                        num_patches=196, layers=tuple(range(1, 13)), embedding=embedding, attention=sparse)
    assignment = method.assign(ctx)
    out, sizes, share, edge_share = apply_assignment(assignment, after, torch.ones(batch, n))
    assert assignment.n_out == 184 and out.shape == (2, 184, 192)
    graph = ctx.state["graph"]
    assert graph.shape == (2, 183, 183)
    for b in range(batch):
        scores = loop_scores(sparse[b])
        torch.testing.assert_close(token_scores(sparse[b:b + 1])[0].double(), torch.tensor(scores, dtype=torch.float64),
                                   atol=1e-7, rtol=1e-5)
        order = sorted(range(196), key=lambda j: (-scores[j], j))
        kept, prop = order[:183], order[183:]
        full = loop_graph(embedding[b, 1:], 8)
        torch.testing.assert_close(propagation_graph(embedding[b:b + 1, 1:])[0].double(), torch.tensor(full, dtype=torch.float64),
                                   atol=1e-7, rtol=0)
        rows, scales, reduced, received = loop_propagate(after[b], [1.0] * n, full, kept, prop, 0.3)
        assert assignment.dest[b, [i + 1 for i in kept]].tolist() == list(range(1, 184))  # descending score
        torch.testing.assert_close(out[b].double(), rows, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(sizes[b].double(), torch.tensor(scales, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(graph[b].double(), torch.tensor(reduced, dtype=torch.float64), atol=1e-7, rtol=0)
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        hosts = {kept.index(i) + 1 for weights in received.values() for i in weights}
        assert kinds[0] == "cls" and [t for t, kind in enumerate(kinds) if kind == "host"] == sorted(hosts)
        # every receiver of a propagated token, with weight alpha G[i, j]: dest (the strongest) + edges
        for j in prop:
            want = {kept.index(i) + 1: w for i, w in received.get(j, {}).items()}
            got = {}
            if int(assignment.dest[b, j + 1]) >= 0:
                got[int(assignment.dest[b, j + 1])] = float(share[b, j + 1])
            if assignment.edges is not None:
                mine = assignment.edges.source[b] == j + 1
                for t, w in zip(assignment.edges.target[b][mine].tolist(), edge_share[b][mine].tolist()):
                    got[t] = w
            assert got.keys() == want.keys()
            for t in want:
                assert got[t] == pytest.approx(want[t], abs=1e-7)
            if want:
                strongest = max(want.values())
                assert int(assignment.dest[b, j + 1]) == min(t for t, w in want.items() if w == pytest.approx(strongest, abs=1e-9))
                assert bool(assignment.pruned[b, j + 1])
            else:
                assert int(assignment.dest[b, j + 1]) == -1 and not bool(assignment.pruned[b, j + 1])


def test_whole_network_matches_loop_reference(tiny, sample_batch):
    """Two photos through all 12 blocks: the kept tokens (original patches, in order) of every
    block and the logits equal the per-image loop reference."""
    images = sample_batch[:2]
    params = dict(DEFAULTS)
    captured = []
    import analysis.methods.gtpvit as module

    original = module.select_propagated

    def recording(scores, num_prop, ties="position"):
        kept, prop = original(scores, num_prop, ties)
        captured.append(kept)
        return kept, prop

    module.select_propagated = recording
    try:
        result = run(tiny.model, images, ReductionPlan.make("gtpvit"))
    finally:
        module.select_propagated = original
    assert len(captured) == 12
    for b in range(2):
        logits, trace = loop_network(tiny.model, images[b], params)
        ids = list(range(196))
        for block, kept in enumerate(captured):
            ids = [ids[i - 1] for i in kept[b].tolist()]
            assert ids == trace[block], f"image {b} block {block + 1}"
        torch.testing.assert_close(result.logits[b], logits, atol=2e-3, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# the engine: counts, provenance, the dispatch map
# ----------------------------------------------------------------------------------------------

def test_counts_provenance_and_dispatch(tiny, sample_batch):
    from analysis.provenance import StageRecord
    from viz.overlays import dispatch_arrows, dispatch_view, suggested_view

    images = sample_batch[:4]
    result = run(tiny.model, images, ReductionPlan.make("gtpvit"))
    assert result.token_counts == gtp_counts(13) == [197 - 13 * i for i in range(1, 13)]
    assert len(result.stages) == 12
    check_provenance(result, allow_discard=True)
    for stage in result.stages:
        host = stage.token_kinds == KINDS.index("host")
        assert host.any(dim=1).all()
        assert stage.patch_pruned.any(dim=1).all()
        # a propagated patch is held by a receiving host; its weight there is alpha G[i, j] <= alpha
        holders = stage.patch_to_token[stage.patch_pruned]
        assert torch.all(host.gather(1, stage.patch_to_token.clamp(min=0))[stage.patch_pruned])
        weights = stage.patch_weight[stage.patch_pruned]
        assert torch.all((weights > 0) & (weights <= 0.3)), holders.shape
        patch, token, share = stage.patch_edges
        used = patch >= 0
        assert used.any() and torch.all((share[used] > 0) & (share[used] <= 0.3))
        received = stage.extra["received"]
        assert torch.all((received > 0) == host)
    # several receivers per pruned patch: the dispatch map draws one arrow to each
    record = StageRecord.from_stage(result.stages[0], 0)
    assert suggested_view(record) == "dispatch"
    arrows = dispatch_arrows(record)
    assert len(arrows) > int(record.patch_pruned.sum()) and len({p for p, _, _ in arrows}) == int(record.patch_pruned.sum())
    from PIL import Image

    picture = dispatch_view(Image.new("RGB", (224, 224), (128, 128, 128)), record, tiny.grid_size)
    assert picture.width == 448
    dense = run(tiny.model, images)
    assert (result.logits.argmax(1) == dense.logits.argmax(1)).float().mean() >= 0.75


def test_options_change_what_they_say(tiny, sample_batch):
    images = sample_batch[:2]
    base = run(tiny.model, images, ReductionPlan.make("gtpvit"), track=False)
    dropped = run(tiny.model, images, ReductionPlan.make("gtpvit", propagation="None"))
    assert dropped.token_counts == base.token_counts
    assert all(stage.patch_edges is None and stage.patch_pruned is None for stage in dropped.stages)
    assert int((dropped.stages[0].patch_to_token < 0).sum()) == 2 * 13  # dropped, not propagated
    for change in ({"token_scale": False}, {"graph_type": "Spatial"}, {"graph_type": "Semantic"}, {"sparsity": 1.0},
                   {"selection": "CLSAttnMean"}, {"alpha": 0.0}):
        other = run(tiny.model, images, ReductionPlan.make("gtpvit", **change), track=False)
        assert other.token_counts == base.token_counts
        assert not torch.allclose(other.logits, base.logits, atol=1e-3), change
    listed = run(tiny.model, images, ReductionPlan.make("gtpvit", 1.0, (2, 5), num_prop=(50, 20)), track=False)
    assert listed.token_counts == gtp_counts((50, 20), layers=(2, 5)) == [197, 147, 147, 147, 127] + [127] * 7
    none = run(tiny.model, images, ReductionPlan.make("gtpvit", num_prop=0, sparsity=1.0), track=False)
    assert none.token_counts == [197] * 12
    torch.testing.assert_close(none.logits, run(tiny.model, images, track=False).logits, atol=1e-4, rtol=1e-4)


def test_ties_go_by_position_or_torch():
    """Scores 0.3, 0, 0.5, 0, 0, 0.1 (three exact zeros): 'position' propagates the last zeros."""
    scores = torch.tensor([[0.3, 0.0, 0.5, 0.0, 0.0, 0.1]])
    kept, prop = select_propagated(scores, 2)
    assert kept.tolist() == [[3, 1, 6, 2]] and prop.tolist() == [[4, 5]]
    kept, prop = select_propagated(scores, 3)
    assert prop.tolist() == [[2, 4, 5]]
    # many tied zeros: 'torch' is torch's own CPU argsort (descending), whatever order it gives ties
    many = torch.zeros(1, 40)
    many[0, ::7] = torch.arange(1.0, 7.0)
    kept, prop = select_propagated(many, 10, "torch")
    order = torch.argsort(many, dim=1, descending=True) + 1
    assert torch.equal(torch.cat([kept, prop], 1), order)
    kept, prop = select_propagated(many, 10)
    assert prop.tolist() == [[i + 1 for i in range(40) if i % 7][-10:]]


def test_transform_attention_only_at_reducing_blocks(tiny, sample_batch):
    """The attention is sparsified at the plan's reducing blocks (here 4 and 8, P 0): it changes the
    logits; with theta 1 and no token scales those blocks are the dense model's again."""
    images = sample_batch[:2]
    dense = run(tiny.model, images, track=False)
    sparse_late = run(tiny.model, images, ReductionPlan.make("gtpvit", 1.0, (4, 8), num_prop=0), track=False)
    dense_path = run(tiny.model, images, ReductionPlan.make("gtpvit", 1.0, (4, 8), num_prop=0, sparsity=1.0,
                                                         token_scale=False), track=False)
    torch.testing.assert_close(dense_path.logits, dense.logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sparse_late.logits, dense.logits, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# GMACs, budget, CLI, parameters
# ----------------------------------------------------------------------------------------------

SEMANTIC = 196 * 196 * 192  # the patch embeddings' cosine similarities, once per forward


@pytest.mark.parametrize("params, first_block", [
    ({}, SEMANTIC + 183 * 13),                         # + the token scales, k m
    ({"graph_type": "Spatial"}, 183 * 13),
    ({"propagation": "None"}, 0),
    ({"num_prop": 8, "sparsity": 0.6, "alpha": 0.1}, SEMANTIC + 188 * 8),
])
def test_gmacs_match_the_flop_counter(tiny, params, first_block):
    model = tiny.model
    plan = ReductionPlan.make("gtpvit", **params)
    macs = plan_macs(model, plan)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with flop_counter() as counter:
        run(model, image, plan, track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)
    assert macs.blocks[0].method_matmul == first_block  # no second Q K^T for the attention it reads
    assert (sum(block.method_elementwise for block in macs.blocks) > 13 * 180 * 192) == (params.get("propagation") != "None")
    if "num_prop" not in params:
        assert macs.gmacs < 0.7 * plan_macs(model, ReductionPlan()).gmacs


def test_budget_meets_the_keep_rate_budget(tiny, sample_batch):
    method = get_method("gtpvit")
    for keep_rate in (0.9, 0.7, 0.5):
        target = keep_rate_counts(keep_rate)
        plan = method.budget(keep_rate, 12, 197)
        plan.validate(12)
        p = plan.param_dict()["num_prop"]
        best = min(abs(sum(gtp_counts(q)) - sum(target)) for q in range(0, 196))
        assert abs(sum(gtp_counts(p)) - sum(target)) == best
        assert plan.reducing_layers(12) == tuple(range(1, 13))
        assert (plan.param_dict()["sparsity"], plan.param_dict()["alpha"]) == README_SETTINGS[min(p, 14)]
        # per block: the counts follow the keep rate's exactly
        matched = method.budget(keep_rate, 12, 197, schedule="matched")
        assert gtp_counts(matched.param_dict()["num_prop"]) == target
    assert method.budget(0.7, 12, 197).param_dict()["num_prop"] == 11  # 2364 - 78 P closest to 1509
    result = run(tiny.model, sample_batch[:2], method.budget(0.7, 12, 197, schedule="matched"), track=False)
    assert result.token_counts == keep_rate_counts(0.7)
    tome_like = [184 - 13 * i for i in range(12)]
    follow = method.budget(0.7, 12, 197, target_counts=tome_like)
    assert follow.param_dict()["num_prop"] == 13 and gtp_counts(13) == tome_like
    for schedule in ("constant", "matched"):
        full = method.budget(1.0, 12, 197, schedule=schedule)
        assert full.param_dict()["num_prop"] == 0 and full.param_dict()["sparsity"] == 1.0  # the dense model
    torch.testing.assert_close(run(tiny.model, sample_batch[:2], method.budget(1.0, 12, 197), track=False).logits,
                               run(tiny.model, sample_batch[:2], track=False).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json_lists_every_receiver(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[3]), "--model", TINY, "--device", "cpu", "--method", "gtpvit", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["method"] == "gtpvit" and record["token_counts"] == gtp_counts(13)
    assert record["params"]["num_prop"] == 13 and record["params"]["layers"] == list(range(1, 13))
    several = 0
    for stage in record["stages"]:
        assert stage["dispatch"], "every block propagates"
        for item in stage["dispatch"]:
            assert stage["token_kinds"][item["host_token"]] == "host"
            assert stage["patch_to_token"][item["patch"]] == item["host_token"]
            assert 0 < item["weight"] <= 0.3
            hosts = item.get("hosts", [])
            for host in hosts:
                assert stage["token_kinds"][host["token"]] == "host" and 0 < host["weight"] <= item["weight"] + 1e-6
            several += len(hosts) > 1
    assert several > 0


@pytest.mark.parametrize("params, message", [
    ({"num_prop": -1}, "num_prop must be at least 0"),
    ({"sparsity": 0.0}, "sparsity must be at least 0.01"),
    ({"sparsity": 1.5}, "sparsity must be at most 1.0"),
    ({"graph_type": "Dense"}, "graph_type must be one of"),
    ({"selection": "Random"}, "selection must be one of"),
    ({"ties": "random"}, "ties must be one of"),
    ({"num_prop": (13, 13)}, "num_prop list has 2 entries"),
    ({"alpha": "big"}, "alpha must be a number"),
])
def test_bad_parameters_give_a_one_line_plan_error(params, message):
    with pytest.raises(PlanError, match=message) as err:
        ReductionPlan.make("gtpvit", **params).validate(12)
    assert "\n" not in str(err.value)


def test_spatial_graph_of_a_non_square_grid():
    """The 8-neighbourhood on a 10 x 14 grid (the model's `ctx.grid`), by loops; without a grid, a
    non-square count is a one-line PlanError."""
    from analysis.methods.gtpvit import spatial_graph

    graph = spatial_graph(140, grid=(10, 14))
    for i in range(140):
        for j in range(140):
            want = i != j and abs(i // 14 - j // 14) <= 1 and abs(i % 14 - j % 14) <= 1
            assert graph[i, j] == float(want)
    assert torch.equal(spatial_graph(196), spatial_graph(196, grid=(14, 14)))
    for call, message in ((lambda: spatial_graph(150), "needs the patch grid"), (lambda: spatial_graph(140, grid=(10, 10)), "does not hold")):
        with pytest.raises(PlanError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_matched_budget_builds_the_graph_where_it_first_propagates(tiny):
    """P 0 in blocks 1-3 (the keep rate's counts): the graph and its GMACs belong to block 4."""
    plan = get_method("gtpvit").budget(0.7, 12, 197, schedule="matched")
    macs = plan_macs(tiny.model, plan)
    assert [block.method_matmul for block in macs.blocks[:4]] == [0, 0, 0, SEMANTIC + 138 * 58]
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with flop_counter() as counter:
        run(tiny.model, image, plan, track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)
