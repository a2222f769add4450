"""Top-K (methods.md §15) on the real DeiT-Tiny weights and ImageNet photos: a plain-loop reference,
the same run as EViT without fusion, GMACs, the budget, the CLI JSON and a bad parameter."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.engine import run
from analysis.errors import PlanError
from analysis.gmacs import flop_counter, plan_macs
from analysis.methods.base import keep_rate_counts
from analysis.plan import ReductionPlan
from analysis.registry import get_method
from conftest import TINY
from method_states import check_provenance
from pruning_reference import engine_kept, reference_pruning


def topk_select(keep_rate: float, count: str = "power"):
    """methods.md §15: keep the tokens with the highest head-averaged class attention, by descending
    attention; the rest are dropped. count "power": int(196 * rho^s) at stage s = 1, 2, 3 (the
    official Top-K code); "evit": ceil(rho n) of the n present."""
    def select(stage, x, probs, keys):
        n = x.shape[0] - 1
        a = [float(probs[:, 0, j].mean()) for j in range(1, n + 1)]
        k = int(196 * keep_rate ** (stage + 1)) if count == "power" else math.ceil(keep_rate * n)
        if k >= n:
            return None
        return [j + 1 for j in sorted(range(n), key=lambda j: -a[j])[:k]]
    return select


def power_counts(keep_rate: float) -> list[int]:
    kept = [int(196 * keep_rate ** s) for s in (1, 2, 3)]
    return [197] * 3 + [1 + kept[0]] * 3 + [1 + kept[1]] * 3 + [1 + kept[2]] * 3


@pytest.mark.parametrize("keep_rate, count", [(0.7, "power"), (0.5, "power"), (0.7, "evit")])
def test_topk_matches_the_loop_reference(tiny, sample_batch, keep_rate, count):
    images = sample_batch[:4]
    result = run(tiny.model, images, ReductionPlan.make("topk", keep_rate, count=count))
    check_provenance(result, allow_discard=True)
    assert result.token_counts == (power_counts(keep_rate) if count == "power" else keep_rate_counts(keep_rate))
    for b in range(images.shape[0]):
        logits, sets, orders = reference_pruning(tiny.model, images[b], topk_select(keep_rate, count))
        torch.testing.assert_close(result.logits[b], logits, atol=1e-4, rtol=0)
        assert len(result.stages) == len(sets) == 3
        for stage, expected, order in zip(result.stages, sets, orders):
            assert engine_kept(stage, b) == (expected, order)


def test_official_counts():
    """The official code's counts at DeiT 224 (Haurum et al., models/topk.py): 137, 96, 67 at 0.7,
    one fewer per stage than EViT's recursive ceil (138, 97, 68)."""
    assert power_counts(0.7)[3::3] == [138, 97, 68] and keep_rate_counts(0.7)[3::3] == [139, 98, 69]


def test_topk_is_evit_without_fusion(tiny, sample_batch):
    images = sample_batch[:3]
    topk = run(tiny.model, images, ReductionPlan.make("topk", 0.6, count="evit"))
    evit = run(tiny.model, images, ReductionPlan.make("evit", 0.6, fuse=False))
    assert torch.equal(topk.logits, evit.logits)
    for a, b in zip(topk.stages, evit.stages):
        assert torch.equal(a.patch_to_token, b.patch_to_token) and torch.equal(a.token_kinds, b.token_kinds)
    fused = run(tiny.model, images, ReductionPlan.make("evit", 0.6), track=False)
    assert fused.token_counts != topk.token_counts  # the preset really is the unfused one


@pytest.mark.parametrize("keep_rate, count", [(0.7, "power"), (0.4, "evit")])
def test_gmacs_match_the_flop_counter(tiny, keep_rate, count):
    plan = ReductionPlan.make("topk", keep_rate, count=count)
    macs = plan_macs(tiny.model, plan)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with flop_counter() as counter:
        run(tiny.model, image, plan, track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)
    assert sum(block.method_elementwise for block in macs.blocks) == 0  # no fused token
    if count == "evit":
        assert macs.total == pytest.approx(plan_macs(tiny.model, ReductionPlan.make("evit", keep_rate, fuse=False)).total)


def test_budget_is_the_method_at_the_keep_rate(tiny, sample_batch):
    plan = get_method("topk").budget(0.7, 12, 197)
    assert plan == ReductionPlan.make("topk", 0.7, count="evit")
    assert run(tiny.model, sample_batch[:1], plan, track=False).token_counts == keep_rate_counts(0.7)
    assert get_method("topk").budget(0.5, 12, 197, layers=(3, 6)).reducing_layers(12) == (3, 6)


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[3]), "--model", TINY, "--device", "cpu", "--method", "topk", "--keep-rate", "0.7", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["token_counts"] == power_counts(0.7) and record["params"]["count"] == "power"
    assert [len(stage["token_kinds"]) for stage in record["stages"]] == [138, 97, 68]
    assert all(set(stage["token_kinds"][1:]) == {"kept"} for stage in record["stages"])


@pytest.mark.parametrize("params, message", [({"fuse": True}, "no parameter 'fuse'"), ({"count": "ceil"}, "count must be one of")])
def test_bad_parameters_give_a_one_line_plan_error(params, message):
    with pytest.raises(PlanError, match=message) as err:
        ReductionPlan.make("topk", 0.7, **params).validate(12)
    assert "\n" not in str(err.value)
    with pytest.raises(PlanError, match="keep rate") as err:
        ReductionPlan.make("topk", 0.0).validate(12)
    assert "\n" not in str(err.value)
