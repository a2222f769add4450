"""ATS (methods.md §16) on the real DeiT-Tiny weights and ImageNet photos: the sampler and one
stage (with padding) against plain-loop references, the whole network against a per-image loop,
the official run's counts, batch independence, the official softmax, GMACs, the budget, the CLI
JSON and bad parameters."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_macs
from analysis.methods import KINDS
from analysis.methods.base import ReduceContext, keep_rate_counts
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import block_input, check_provenance

# Tokens (cls included) leaving each block in the official run at batch 1 (adaptivetokensampling/ATS
# @9271257, DeiT-S config with the DeiT-T weights; /work/scratch/ats/official_b1.pt), by index into the
# sorted sample.
OFFICIAL_COUNTS = {
    0: [197, 197, 197, 160, 143, 131, 114, 99, 95, 74, 68, 55],
    1: [197, 197, 197, 160, 139, 127, 106, 95, 89, 48, 43, 39],
    3: [197, 197, 197, 164, 154, 145, 132, 111, 94, 63, 56, 53],
}
EPS = 1e-6


def photos(tiny, sample_files, indices):
    from analysis.models import load_image, preprocess

    return preprocess([load_image(sample_files[i]) for i in indices], tiny.model)


# ----------------------------------------------------------------------------------------------
# plain-loop references, written from methods.md §16
# ----------------------------------------------------------------------------------------------

def loop_significance(cls_rows: list[list[float]], values: list[list[list[float]]]) -> list[float]:
    """§16 (1): S_j for one image's own tokens. cls_rows [H][N] (post-softmax cls row), values [H][N][d]."""
    heads, n_all = len(values), len(values[0])
    raw = []
    for j in range(1, n_all):
        attention = sum(cls_rows[h][j] for h in range(heads))
        norm = math.sqrt(sum(value ** 2 for h in range(heads) for value in values[h][j]))
        raw.append(attention * norm)
    total = sum(raw)
    return [s / total for s in raw]


def loop_sample(scores: list[float], samples: int) -> list[int]:
    """§16 (2)-(4): the kept token indices (0-based among the non-cls tokens) by ascending score."""
    order = sorted(range(len(scores)), key=lambda j: (scores[j], j))
    cdf, running = [], 0.0
    for j in order:
        running += scores[j]
        cdf.append(running)
    low, high = cdf[0], cdf[-1]
    normalised = [(c - low) / (high - low) for c in cdf]
    start = min(c for c in normalised if c != 0)
    drawn = set()
    for i in range(samples):
        y = start + i * (1 - start) / (samples - 1)
        best = min(range(len(normalised)), key=lambda p: (abs(y - normalised[p]), p))
        drawn.add(best)
    return [order[p] for p in sorted(drawn)]


def official_softmax(logits: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The official `softmax_with_policy` for one image with every token present (batch 1)."""
    n = logits.shape[-1]
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    return (e + eps / n) / (e.sum(-1, keepdim=True) + eps)


@torch.inference_mode()
def loop_network(model, image: torch.Tensor, layers=tuple(range(4, 13)), samples=196):
    """The whole DeiT forward with ATS for one image: the official attention in every block and
    `loop_sample` at `layers`. Returns (logits [1000], kept patch ids per stage in output order)."""
    x = block_input(model, image[None], 0)[0]
    patches = [-1] + list(range(x.shape[0] - 1))
    kept_per_stage = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        n, channels = x.shape
        heads, d = attn.num_heads, channels // attn.num_heads
        qkv = attn.qkv(block.norm1(x)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = official_softmax((q @ k.transpose(-2, -1)) * attn.scale)
        x = x + attn.proj((probs @ v).transpose(0, 1).reshape(n, channels))
        if index + 1 in layers:
            scores = loop_significance(probs[:, 0].tolist(), v.tolist())
            kept = loop_sample(scores, samples)
            rows = [0] + [j + 1 for j in kept]
            x = x[rows]
            patches = [patches[r] for r in rows]
            kept_per_stage.append(patches[1:])
        x = x + block.mlp(block.norm2(x))
    logits = model.forward_head(model.norm(x)[None])[0]
    return logits, kept_per_stage


def kept_patches(result, index: int) -> list[list[int]]:
    """Image `index`'s kept patch ids per stage, in output-token order."""
    out = []
    for stage in result.stages:
        owner = {int(t): p for p, t in enumerate(stage.patch_to_token[index].tolist()) if t > 0}
        out.append([owner[t] for t in range(1, stage.image_tokens(index))])
    return out


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

def test_sampler_matches_loop_reference():
    """Handmade scores: tied scores (by position), a zero-score token, few and many draws. (No
    exact tie between two distances: which of two equidistant tokens float32 rounding picks is
    the official code's business, not a reference's.)"""
    from analysis.methods.ats import sample_tokens

    cases = [
        [0.1, 0.3, 0.3, 0.1, 0.2],
        [0.05, 0.0, 0.5, 0.05, 0.15, 0.25],
        [0.14, 0.15, 0.13, 0.16, 0.14, 0.13, 0.15],  # nearly flat
        torch.softmax(torch.randn(40, generator=torch.Generator().manual_seed(1)) * 3, 0).tolist(),
    ]
    for scores in cases:
        tensor = torch.tensor([scores], dtype=torch.float32)
        tensor = tensor / tensor.sum()
        for samples in (3, 7, 40, 196):
            kept, counts = sample_tokens(tensor, samples)
            expected = loop_sample(tensor[0].tolist(), samples)
            assert int(counts[0]) == len(expected)
            assert kept[0, : len(expected)].tolist() == expected
            assert torch.all(kept[0, len(expected):] == -1)


def test_one_stage_with_padding_matches_loop_reference(tiny, sample_batch):
    """Block 4 of four photos, each cut to its own count (197, 150, 120, 181 tokens) and padded to 197
    as the engine hands over a batch with padding: every image's assignment equals the loop on its
    own tokens; padding is never kept and the output pads the shorter images."""
    method = get_method("ats")
    plan = ReductionPlan.make("ats")
    images = sample_batch[:4]
    own = [197, 150, 120, 181]
    x_in = block_input(tiny.model, images, 3)
    block = tiny.model.blocks[3]
    attn = block.attn
    batch, width, channels = x_in.shape
    heads, d = attn.num_heads, channels // attn.num_heads
    cls_rows = torch.zeros(batch, heads, width - 1)
    values = torch.zeros(batch, heads, width, d)
    x = torch.zeros(batch, width, channels)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    expected = []
    with torch.inference_mode():
        for b, n in enumerate(own):
            tokens = x_in[b, :n]
            qkv = attn.qkv(block.norm1(tokens)).reshape(n, 3, heads, d).permute(1, 2, 0, 3)
            probs = official_softmax((qkv[0] @ qkv[1].transpose(-2, -1)) * attn.scale)
            cls_rows[b, :, : n - 1] = probs[:, 0, 1:]
            values[b, :, :n] = qkv[2]
            x[b, :n] = tokens + attn.proj((probs @ qkv[2]).transpose(0, 1).reshape(n, channels))
            valid[b, :n] = True
            expected.append(loop_sample(loop_significance(probs[:, 0].tolist(), qkv[2].tolist()), 196))
    ctx = ReduceContext(x=x, sizes=valid.float(), keep_rate=1.0, stage=0, block_index=3, params=plan.param_dict(),
                        num_patches=196, valid=valid, cls_attention_heads=cls_rows, values_heads=values)
    assignment = method.assign(ctx)
    counts = [len(e) for e in expected]
    assert len(set(counts)) > 1
    assert assignment.n_out == 1 + max(counts)
    for b in range(batch):
        dest = [-1] * width
        dest[0] = 0
        for slot, j in enumerate(expected[b], 1):
            dest[j + 1] = slot
        assert assignment.dest[b].tolist() == dest
        assert assignment.valid[b].tolist() == [True] * (1 + counts[b]) + [False] * (max(counts) - counts[b])
        kinds = ["cls"] + ["kept"] * counts[b] + ["pad"] * (max(counts) - counts[b])
        assert [KINDS[c] for c in assignment.kinds[b].tolist()] == kinds
        assert assignment.notes[b] == f"kept {counts[b]} of {own[b] - 1} (196 draws)"


def test_whole_network_matches_loop_reference(tiny, sample_files):
    """Three photos batched (they keep different counts): kept patches per stage in order and the
    logits equal the per-image loop reference with the official attention."""
    indices = [0, 1, 3]
    images = photos(tiny, sample_files, indices)
    result = run(tiny.model, images, ReductionPlan.make("ats"))
    check_provenance(result, allow_discard=True)
    assert len(set(result.image_token_counts[:, -1].tolist())) == 3
    for b in range(len(indices)):
        logits, kept = loop_network(tiny.model, images[b])
        assert kept_patches(result, b) == kept
        assert result.image_token_counts[b].tolist() == [197] * 3 + [1 + len(k) for k in kept]
        torch.testing.assert_close(result.logits[b], logits, atol=1e-4, rtol=1e-4)


def test_official_counts_and_pictures(tiny, sample_files):
    """The official run's per-image counts at batch 1, in one batch; each stage discards patches
    (the masked picture) and the padding holds none."""
    from analysis.provenance import StageRecord
    from viz.overlays import suggested_view

    indices = sorted(OFFICIAL_COUNTS)
    result = run(tiny.model, photos(tiny, sample_files, indices), ReductionPlan.make("ats"))
    assert result.image_token_counts.tolist() == [OFFICIAL_COUNTS[i] for i in indices]
    assert result.token_counts == [max(column) for column in zip(*OFFICIAL_COUNTS.values())]
    for stage in result.stages:
        for b in range(len(indices)):
            record = StageRecord.from_stage(stage, b)
            assert suggested_view(record) == "masked"
            assert len(record.token_kinds) == stage.image_tokens(b) and "pad" not in record.token_kinds
            assert int(stage.token_sizes[b, stage.image_tokens(b):].sum()) == 0


def test_an_image_keeps_the_same_tokens_alone_and_in_a_batch(tiny, sample_files):
    """REQUIRED (issue): unlike the official code, an image's kept set and logits do not depend on
    the batch it is in."""
    indices = [0, 1, 2, 3, 5, 8]
    images = photos(tiny, sample_files, indices)
    plan = ReductionPlan.make("ats")
    together = run(tiny.model, images, plan)
    assert len(set(together.image_token_counts[:, -1].tolist())) > 1  # padding is in play
    for b in range(len(indices)):
        alone = run(tiny.model, images[b:b + 1], plan)
        assert alone.image_token_counts[0].tolist() == together.image_token_counts[b].tolist()
        for one, many in zip(alone.stages, together.stages):
            assert set(torch.nonzero(one.patch_to_token[0] >= 0).flatten().tolist()) == \
                set(torch.nonzero(many.patch_to_token[b] >= 0).flatten().tolist())
            assert torch.equal(one.patch_to_token[0], many.patch_to_token[b])
            assert one.notes[0] == many.notes[b]
        torch.testing.assert_close(alone.logits[0], together.logits[b], atol=1e-5, rtol=0)


def test_transform_is_the_official_softmax_with_padding(tiny, sample_batch):
    """`transform_attention` turns the engine's masked softmax into the official softmax_with_policy
    of each image's own tokens (its N), and eps 0 leaves it the plain softmax."""
    method = get_method("ats")
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 30, 30) * 4
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 21:] = False
    masked = logits.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    ctx = ReduceContext(x=torch.zeros(2, 30, 4), sizes=torch.ones(2, 30), keep_rate=1.0, stage=-1, block_index=0,
                        params=ReductionPlan.make("ats").param_dict(), num_patches=196, valid=valid)
    out = method.transform_attention(masked, ctx)
    torch.testing.assert_close(out[0], official_softmax(logits[0]), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out[1, :, :, :21], official_softmax(logits[1, :, :, :21]), atol=1e-7, rtol=1e-6)
    assert torch.all(out[1, :, :, 21:] == 0)
    ctx.params = ReductionPlan.make("ats", eps=0.0).param_dict()
    assert method.transform_attention(masked, ctx) is masked
    # eps changes the attention of every block by a little, not the decision of these photos
    on = run(tiny.model, sample_batch[:2], ReductionPlan.make("ats", layers=(12,)), track=False)
    off = run(tiny.model, sample_batch[:2], ReductionPlan.make("ats", layers=(12,), eps=0.0), track=False)
    assert 0 < float((on.logits - off.logits).abs().max()) < 1e-3


@pytest.mark.parametrize("params", [{}, {"K": (120, 100, 80), "layers": (4, 7, 10)}])
def test_gmacs_match_the_flop_counter(tiny, sample_files, params):
    """One photo at batch 1 (no padding): GMACs from its own counts equal the flop counter's."""
    model = tiny.model
    params = dict(params)
    layers = params.pop("layers", None)
    plan = ReductionPlan.make("ats", 1.0, layers, **params)
    image = photos(tiny, sample_files, [8])
    result = run(model, image, plan, track=False)
    macs = plan_macs(model, plan, counts=result.token_counts)
    with flop_counter() as counter:
        run(model, image, plan, track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    own = sum(block.method_elementwise for block in macs.blocks)
    assert own > 0 and all(block.method_matmul == 0 for block in macs.blocks)
    dense = plan_macs(model, ReductionPlan())
    assert macs.total < dense.total


def test_budget_stays_within_the_keep_rate_counts(tiny, sample_batch):
    method = get_method("ats")
    images = sample_batch[:4]
    for keep_rate in (0.9, 0.7, 0.5):
        target = keep_rate_counts(keep_rate)
        plan = method.budget(keep_rate, 12, 197)
        plan.validate(12)
        assert plan.reducing_layers(12) == (4, 7, 10)
        assert plan.param_dict()["K"] == tuple(target[i - 1] for i in (4, 7, 10))
        result = run(tiny.model, images, plan, track=False)
        counts = result.image_token_counts
        assert torch.all(counts <= torch.tensor(target))  # every image within the budget
        assert float(counts[:, -1].double().mean()) < target[-1]  # the mean below it
    tome_like = [184 - 13 * i for i in range(12)]
    follow = method.budget(0.7, 12, 197, target_counts=tome_like)
    assert follow.reducing_layers(12) == tuple(range(1, 13)) and follow.param_dict()["K"] == tuple(tome_like)
    result = run(tiny.model, images, follow, track=False)
    assert torch.all(result.image_token_counts <= torch.tensor(tome_like))
    none = method.budget(1.0, 12, 197)
    assert none.reducing_layers(12) == () and run(tiny.model, images[:1], none).stages == []
    with pytest.raises(PlanError, match="schedule"):
        method.budget(0.7, 12, 197, schedule="bogus")


def test_cli_inspect_json_gives_each_image_its_own_count(capsys, sample_files):
    from analysis.cli import main

    files = [str(sample_files[i]) for i in sorted(OFFICIAL_COUNTS)]
    code = main(["inspect", *files, "--model", TINY, "--device", "cpu", "--method", "ats", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = json.loads(captured.out)
    assert [r["token_counts"] for r in records] == [OFFICIAL_COUNTS[i] for i in sorted(OFFICIAL_COUNTS)]
    for record in records:
        assert record["params"]["K"] == 0 and record["params"]["eps"] == EPS
        assert record["params"]["layers"] == list(range(4, 13)) and record["params"]["keep_rate"] is None
        assert [len(stage["token_kinds"]) for stage in record["stages"]] == record["token_counts"][3:]
        for stage, count in zip(record["stages"], record["token_counts"][3:]):
            assert stage["note"].startswith(f"kept {count - 1} of ")
            assert sum(stage["token_sizes"]) == sum(1 for t in stage["patch_to_token"] if t >= 0) == count - 1
            assert "pad" not in stage["token_kinds"]


@pytest.mark.parametrize("params, message", [
    ({"K": 2}, "K must be 0 .* or at least 3, got 2"),
    ({"K": -1}, "K must be at least 0"),
    ({"eps": -1e-6}, "eps must be at least 0"),
    ({"K": (100, 90)}, "K list has 2 entries"),
    ({"eps": "small"}, "eps must be a number"),
])
def test_bad_parameters_give_a_one_line_plan_error(params, message):
    with pytest.raises(PlanError, match=message) as err:
        ReductionPlan.make("ats", **params).validate(12)
    assert "\n" not in str(err.value)
