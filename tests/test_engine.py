"""The engine against timm, token counts, and provenance invariants (issue 2)."""
from __future__ import annotations

import pytest
import torch

from analysis.engine import run

from analysis.errors import PlanError

from analysis.plan import ReductionPlan


def test_dense_matches_timm(tiny, sample_batch):
    with torch.inference_mode():
        expected = tiny.model(sample_batch)
    result = run(tiny.model, sample_batch)
    assert result.token_counts == [197] * 12
    assert result.stages == []
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=0)


def test_keep_rate_one_is_dense(tiny, sample_batch):
    dense = run(tiny.model, sample_batch)
    full = run(tiny.model, sample_batch, ReductionPlan.make("evit", 1.0))
    assert full.token_counts == [197] * 12
    torch.testing.assert_close(full.logits, dense.logits, atol=1e-5, rtol=0)


# Tokens after layers 4, 7, 10 (methods.md §2), with and without the fused token.
EVIT_COUNTS = {
    0.9: ((179, 163, 148), (178, 161, 145)),
    0.8: ((159, 129, 105), (158, 127, 102)),
    0.7: ((140, 100, 72), (139, 98, 69)),
    0.6: ((120, 74, 46), (119, 72, 44)),
    0.5: ((100, 52, 28), (99, 50, 26)),
}


@pytest.mark.parametrize("keep_rate", sorted(EVIT_COUNTS))
@pytest.mark.parametrize("fuse", [True, False])
def test_evit_token_counts(tiny, sample_batch, keep_rate, fuse):
    expected = EVIT_COUNTS[keep_rate][0 if fuse else 1]
    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("evit", keep_rate, fuse=fuse))
    counts = result.token_counts
    assert [counts[3], counts[6], counts[9]] == list(expected)
    # counts only change at the reducing blocks
    assert counts[:3] == [197] * 3 and counts[3:6] == [expected[0]] * 3 and counts[9:] == [expected[2]] * 3
    assert [stage.layer for stage in result.stages] == [4, 7, 10]
    assert [stage.n_tokens for stage in result.stages] == list(expected)


@pytest.mark.parametrize("fuse", [True, False])
def test_provenance_invariants(tiny, sample_batch, fuse):
    result = run(tiny.model, sample_batch, ReductionPlan.make("evit", 0.5, fuse=fuse))
    assert [stage.layer for stage in result.stages] == [4, 7, 10]
    previous = None
    for stage in result.stages:
        p2t = stage.patch_to_token
        n_out = stage.n_tokens
        assert p2t.shape == (8, 196)
        assert ((p2t == -1) | ((p2t >= 1) & (p2t < n_out))).all(), "patches map to a patch token or -1"
        discarded = (p2t == -1).sum(1)
        # every patch is accounted for: held by exactly one token or discarded
        assert torch.equal(stage.token_sizes.sum(1) + discarded, torch.full((8,), 196))
        assert (stage.token_sizes[:, 0] == 0).all()
        recount = torch.stack([torch.bincount(row[row >= 0], minlength=n_out) for row in p2t])
        assert torch.equal(recount, stage.token_sizes)
        kinds = stage.kind_names(0)
        assert kinds[0] == "cls"
        if fuse:
            assert kinds[-1] == "fused" and set(kinds[1:-1]) == {"kept"}
            assert (discarded == 0).all()
        else:
            assert set(kinds[1:]) == {"kept"}
            assert (discarded > 0).all()
        if previous is not None:  # once discarded, always discarded
            assert ((previous == -1) <= (p2t == -1)).all()
        previous = p2t
    # without fusion, kept tokens hold exactly one patch
    if not fuse:
        assert (result.stages[-1].token_sizes[:, 1:] == 1).all()


def test_class_attention_recorded_per_patch(tiny, sample_batch):
    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("evit", 0.7, fuse=False))
    first = result.stages[0].cls_attention
    assert first.shape == (2, 196) and torch.isfinite(first).all()
    # post-softmax over 197 keys, not renormalised after dropping the cls column
    assert (first > 0).all() and (first.sum(1) < 1).all()
    later = result.stages[1].cls_attention
    assert torch.isnan(later).sum() == (result.stages[0].patch_to_token == -1).sum()


@pytest.mark.parametrize(
    "plan, message",
    [
        (ReductionPlan.make("evit", 0.0), "keep rate"),
        (ReductionPlan.make("evit", 1.2), "keep rate"),
        (ReductionPlan.make("evit", 0.7, [4, 4]), "repeat"),
        (ReductionPlan.make("evit", 0.7, [0, 5]), "out of range"),
        (ReductionPlan.make("evit", 0.7, [13]), "out of range"),
        (ReductionPlan.make("nosuch", 0.7), "unknown method"),
        (ReductionPlan.make("evit", 0.7, bogus=1), "no parameter"),
    ],
)
def test_bad_plans_are_rejected(tiny, sample_batch, plan, message):
    with pytest.raises(PlanError, match=message):
        run(tiny.model, sample_batch[:1], plan)


def test_plan_is_hashable_and_model_untouched(tiny, sample_batch):
    plan = ReductionPlan.make("evit", 0.7, [4, 7, 10], fuse=False)
    assert hash(plan) == hash(ReductionPlan.make("evit", 0.7, (4, 7, 10), fuse=False))
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    run(tiny.model, sample_batch[:1], plan)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny.model.training
