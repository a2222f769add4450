"""Random pruning (methods.md §15) on the real DeiT-Tiny weights and ImageNet photos: a plain-loop
reference, determinism (the same seed keeps the same set on every run and in every batch
composition, other seeds differ), GMACs, the budget, the CLI JSON and bad parameters."""
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


def random_select(keep_rate: float, seed: int):
    """methods.md §15: at stage s, the first ceil(rho n) entries of randperm(n) under a CPU generator
    seeded with seed * 2**16 + s, in ascending position order."""
    def select(stage, x, probs, keys):
        n = x.shape[0] - 1
        k = math.ceil(keep_rate * n)
        if k >= n:
            return None
        generator = torch.Generator().manual_seed(seed * 65536 + stage)
        chosen = torch.randperm(n, generator=generator).tolist()[:k]
        return [j + 1 for j in sorted(chosen)]
    return select


@pytest.mark.parametrize("keep_rate, seed", [(0.7, 0), (0.5, 3)])
def test_random_matches_the_loop_reference(tiny, sample_batch, keep_rate, seed):
    images = sample_batch[:3]
    result = run(tiny.model, images, ReductionPlan.make("rand", keep_rate, seed=seed))
    check_provenance(result, allow_discard=True)
    assert result.token_counts == keep_rate_counts(keep_rate)
    for b in range(images.shape[0]):
        logits, sets, orders = reference_pruning(tiny.model, images[b], random_select(keep_rate, seed))
        torch.testing.assert_close(result.logits[b], logits, atol=1e-4, rtol=0)
        for stage, expected, order in zip(result.stages, sets, orders):
            assert engine_kept(stage, b) == (expected, order)


def _kept_sets(result, b: int) -> list[list[int]]:
    return [engine_kept(stage, b)[0] for stage in result.stages]


def test_same_seed_same_set_across_runs_and_batches(tiny, sample_batch):
    plan = ReductionPlan.make("rand", 0.6, seed=7)
    together = run(tiny.model, sample_batch[:4], plan)
    again = run(tiny.model, sample_batch[:4], plan)
    reordered = run(tiny.model, sample_batch[[5, 2, 6]], plan)  # image 2 among others, at index 1
    alone = run(tiny.model, sample_batch[2:3], plan)
    for one, two in zip(together.stages, again.stages):
        assert torch.equal(one.patch_to_token, two.patch_to_token)
    assert torch.equal(together.logits, again.logits)
    expected = _kept_sets(together, 2)
    assert _kept_sets(alone, 0) == expected == _kept_sets(reordered, 1)
    torch.testing.assert_close(alone.logits[0], together.logits[2], atol=1e-4, rtol=1e-4)
    # a positional choice: every image keeps the same patches
    assert all(_kept_sets(together, b) == expected for b in range(4))


def test_different_seeds_differ(tiny, sample_batch):
    image = sample_batch[:1]
    sets = {seed: _kept_sets(run(tiny.model, image, ReductionPlan.make("rand", 0.7, seed=seed)), 0) for seed in (0, 1, 2)}
    for stage in range(3):
        assert len({tuple(sets[seed][stage]) for seed in sets}) == 3
    # and every stage of one seed draws anew (not one permutation reused)
    first = run(tiny.model, image, ReductionPlan.make("rand", 0.7, seed=0)).stages
    assert len({tuple(engine_kept(stage, 0)[0][:20]) for stage in first}) == 3


def test_kept_set_is_drawn_on_the_cpu_for_any_device():
    """The positions come from a CPU generator and are moved: the same on every device (here the
    meta device stands in for an accelerator: the assignment is built without touching the data)."""
    from analysis.methods.base import ReduceContext

    method = get_method("rand")
    params = {"seed": 5}
    kept = []
    for device in ("cpu", "meta"):
        ctx = ReduceContext(x=torch.zeros(2, 197, 8, device=device), sizes=torch.ones(2, 197, device=device), keep_rate=0.7,
                            stage=1, block_index=6, params=params, num_patches=196)
        assignment = method.assign(ctx)
        assert assignment.dest.device.type == device
        kept.append(assignment)
    cpu = kept[0].dest
    expected = torch.sort(torch.randperm(196, generator=torch.Generator().manual_seed(5 * 65536 + 1))[:138]).values + 1
    assert torch.equal((cpu[0] > 0).nonzero().flatten(), expected) and torch.equal(cpu[0], cpu[1])


def test_gmacs_match_the_flop_counter(tiny):
    plan = ReductionPlan.make("rand", 0.5)
    macs = plan_macs(tiny.model, plan)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with flop_counter() as counter:
        run(tiny.model, image, plan, track=False)
    assert macs.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)
    # no score at all: cheaper than Top-K (no class-attention row) at the same counts
    assert macs.total < plan_macs(tiny.model, ReductionPlan.make("topk", 0.5, count="evit")).total


def test_budget_is_the_method_at_the_keep_rate():
    plan = get_method("rand").budget(0.7, 12, 197)
    assert plan == ReductionPlan.make("rand", 0.7)


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    code = main(["inspect", str(sample_files[0]), "--model", TINY, "--device", "cpu", "--method", "rand", "--keep-rate", "0.5",
                 "--seed", "4", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)[0]
    assert record["params"]["seed"] == 4 and record["token_counts"] == keep_rate_counts(0.5)
    first = [p for p, t in enumerate(record["stages"][0]["patch_to_token"]) if t >= 0]
    assert first == sorted(torch.randperm(196, generator=torch.Generator().manual_seed(4 * 65536)).tolist()[:98])


@pytest.mark.parametrize("params, message", [
    ({"seed": -1}, "seed must be at least 0"),
    ({"seed": "x"}, "seed must be a number"),
])
def test_bad_parameters_give_a_one_line_plan_error(params, message):
    with pytest.raises(PlanError, match=message) as err:
        ReductionPlan.make("rand", 0.7, **params).validate(12)
    assert "\n" not in str(err.value)
