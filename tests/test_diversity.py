"""The diversity score r(Z) (methods.md §5) against a brute-force definition, and its bounds."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from analysis.diversity import (candidate_costs, diversity_per_block, diversity_score, pairwise_l1_cost, sorted_candidate_costs,
                                weighted_median)
from analysis.engine import run
from analysis.plan import ReductionPlan


def brute_medoid(z: np.ndarray, w: np.ndarray | None = None) -> float:
    """min_j sum_i w_i ||z_i - z_j||_1, with plain loops straight from the definition."""
    n = len(z)
    w = np.ones(n) if w is None else w
    best = None
    for j in range(n):
        total = 0.0
        for i in range(n):
            total += w[i] * sum(abs(float(a) - float(b)) for a, b in zip(z[i], z[j]))
        best = total if best is None else min(best, total)
    return best


def test_medoid_matches_brute_force_on_small_matrices():
    generator = torch.Generator().manual_seed(0)
    for n, c in [(1, 3), (2, 2), (5, 4), (9, 7), (16, 3)]:
        z = torch.randn(n, c, generator=generator)
        assert diversity_score(z) == pytest.approx(brute_medoid(z.numpy()), rel=1e-12, abs=1e-12)
        assert diversity_score(z, per_token=True) == pytest.approx(brute_medoid(z.numpy()) / n, rel=1e-12)
        assert sorted_candidate_costs(z.unsqueeze(0)).min().item() == pytest.approx(brute_medoid(z.numpy()), rel=1e-12, abs=1e-12)
    # ties and repeated rows
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, -1.0], [0.0, 1.0]])
    assert diversity_score(z) == pytest.approx(brute_medoid(z.numpy()))


def test_sorted_costs_equal_pairwise_cdist():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(3, 40, 11, generator=generator)
    sizes = torch.randint(1, 6, (3, 40), generator=generator).float()
    torch.testing.assert_close(sorted_candidate_costs(z), pairwise_l1_cost(z, chunk=7), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sorted_candidate_costs(z, sizes), pairwise_l1_cost(z, sizes), rtol=1e-12, atol=1e-10)
    # long sequences take the sorted form
    z = torch.randn(1, 1100, 4, generator=generator)
    torch.testing.assert_close(candidate_costs(z), pairwise_l1_cost(z), rtol=1e-12, atol=1e-8)


def test_size_weighting_equals_repeating_tokens():
    """Weight s_i means: the token counts as s_i copies of itself (medoid and median alike)."""
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(7, 5, generator=generator)
    sizes = torch.tensor([1, 3, 2, 1, 4, 1, 2])
    repeated = z.repeat_interleave(sizes, dim=0)
    for centre in ("medoid", "median"):
        assert diversity_score(z, centre=centre, sizes=sizes) == pytest.approx(diversity_score(repeated, centre=centre), rel=1e-12)
        assert diversity_score(z, centre=centre, sizes=sizes, per_token=True) == pytest.approx(
            diversity_score(repeated, centre=centre, per_token=True), rel=1e-12)
    assert brute_medoid(z.numpy(), sizes.numpy().astype(float)) == pytest.approx(diversity_score(z, sizes=sizes), rel=1e-12)


def test_median_is_the_free_optimum():
    """The channel-wise median beats every token and every point of a small grid around it."""
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    m = weighted_median(z.unsqueeze(0))[0]
    best = (z - m).abs().sum().item()
    assert diversity_score(z, centre="median") == pytest.approx(best)
    for dx, dy in itertools.product(np.linspace(-0.3, 0.3, 7), repeat=2):
        assert (z - (m + torch.tensor([dx, dy]))).abs().sum().item() >= best - 1e-12


def test_bounds_on_real_hidden_states(tiny, sample_batch):
    """median <= medoid <= 2 median on every block of real DeiT-T outputs, dense and EViT-reduced."""
    for plan in (ReductionPlan(), ReductionPlan.make("evit", 0.5)):
        result = run(tiny.model, sample_batch[:2], plan, keep_block_outputs=True, track=False)
        for weighted in (False, True):
            medoid = diversity_per_block(result, "medoid", size_weighted=weighted)
            median = diversity_per_block(result, "median", size_weighted=weighted)
            assert medoid.shape == (2, 12)
            assert np.all(median > 0)
            assert np.all(median <= medoid * (1 + 1e-12))
            assert np.all(medoid <= 2 * median)
            if not weighted:  # real features: no token sits on the channel-wise median
                assert np.all(medoid > median * 1.001)
            # weighted, EViT's fused token holds over half the patches, so it *is* the weighted median
        # the batched score equals the score of each image on its own
        block = result.block_outputs[5][:, 1:]
        one = [diversity_score(block[i]) for i in range(2)]
        np.testing.assert_allclose(diversity_per_block(result)[:, 5], one, rtol=1e-12)
        per_token = diversity_per_block(result, per_token=True)
        counts = np.array(result.token_counts) - 1
        np.testing.assert_allclose(per_token, diversity_per_block(result) / counts, rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="centre"):
        diversity_score(torch.zeros(3, 2), centre="mean")
    with pytest.raises(ValueError, match="sizes"):
        diversity_score(torch.zeros(3, 2), sizes=torch.ones(4))


def test_raw_and_per_token_together(tiny, sample_batch):
    from analysis.diversity import diversity_per_block_both

    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("evit", 0.7), keep_block_outputs=True, track=False)
    for weighted in (False, True):
        raw, per_token = diversity_per_block_both(result, "medoid", weighted)
        np.testing.assert_allclose(raw, diversity_per_block(result, size_weighted=weighted), rtol=1e-12)
        np.testing.assert_allclose(per_token, diversity_per_block(result, per_token=True, size_weighted=weighted), rtol=1e-12)
