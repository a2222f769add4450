"""BAT (reconstructed) and diversity-only clustering (methods.md §4) on the real DeiT-Tiny weights
and ImageNet photos, against plain loop references written from the spec."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.engine import run

from analysis.plan import ReductionPlan
from analysis.methods import KINDS, ReduceContext, apply_assignment, get_method
from analysis.methods.bat import bat_budget, dpc_knn
from analysis.methods.base import keep_rate_counts
from conftest import TINY
from method_states import check_provenance, inside_state

COUNTS_07 = [197, 197, 197, 139, 139, 139, 98, 98, 98, 69, 69, 69]
N_REF = 4  # photos checked against the loop references


def reference_dpc(x: torch.Tensor, c: int, k: int) -> list[int]:
    """methods.md §4 step 3 (DPC-kNN as in TCFormer) for one image [M, C], token by token, float64.
    Returns each token's cluster, clusters numbered by descending centre score."""
    x = x.double()
    m, channels = x.shape
    dist = [((x - x[i]).norm(dim=1) / math.sqrt(channels)).tolist() for i in range(m)]
    k = min(k, m)
    density = [math.exp(-sum(d * d for d in sorted(row)[:k]) / k) for row in dist]
    largest = max(max(row) for row in dist)
    delta = []
    for i in range(m):
        higher = [dist[i][j] for j in range(m) if density[j] > density[i]]
        delta.append(min(higher) if higher else largest)
    score = [density[i] * delta[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: -score[i])[:c]
    cluster = []
    for i in range(m):
        if i in centres:
            cluster.append(centres.index(i))
        else:
            to_centres = [dist[i][q] for q in centres]
            cluster.append(to_centres.index(min(to_centres)))
    return cluster


def reference_bat(x, attention, keys, sizes, keep_rate=0.7, beta=0.5, knn=5):
    """methods.md §4 BAT for one image, token by token (float64).
    Returns (output tokens [n_out, C], kinds, dest per input token)."""
    n = attention.shape[0]
    scores = attention.tolist()
    k = math.ceil(round(keep_rate * n, 9))
    m = n - k
    c = max(1, math.floor(beta * m + 0.5))
    c = min(c, math.ceil(k / 2))
    r = c
    order = sorted(range(n), key=lambda i: -scores[i])
    attentive = [i + 1 for i in order[:k]]
    inattentive = sorted(i + 1 for i in order[k:])
    unit = lambda v: v / v.norm()  # noqa: E731
    a_set, b_set = attentive[0::2], attentive[1::2]
    best = {}
    for t in a_set:
        sims = [float(unit(keys[t].double()) @ unit(keys[u].double())) for u in b_set]
        j = sims.index(max(sims))
        best[t] = (sims[j], b_set[j])
    merging = sorted(a_set, key=lambda t: -best[t][0])[:r]
    groups: list[list[int]] = [[0]]
    kinds = ["cls"]
    slot_of = {0: 0}
    for t in attentive:
        if t in merging:
            continue
        slot_of[t] = len(groups)
        guests = [s for s in merging if best[s][1] == t]
        groups.append([t] + guests)
        kinds.append("pair" if guests else "kept")
    for s in merging:
        slot_of[s] = slot_of[best[s][1]]
    cluster = reference_dpc(x[inattentive], c, knn)
    base = len(groups)
    for q in range(c):
        groups.append([t for t, g in zip(inattentive, cluster) if g == q])
        kinds.append("cluster")
    for t, g in zip(inattentive, cluster):
        slot_of[t] = base + g
    weight = lambda t: 1.0 if t == 0 else scores[t - 1] * float(sizes[t])  # noqa: E731
    out = torch.stack([
        sum((weight(t) * x[t].double() for t in group), torch.zeros(x.shape[1], dtype=torch.float64)) / sum(weight(t) for t in group)
        for group in groups
    ])
    return out, kinds, [slot_of[t] for t in range(n + 1)]


@pytest.fixture(scope="module")
def block4(tiny, sample_batch):
    return inside_state(tiny.model, sample_batch[:N_REF], 3)


def _ctx(state, sizes=None, keep_rate=0.7, params=None, stage=0):
    x, attention, keys = state
    batch, n, _ = x.shape
    return ReduceContext(
        x=x, sizes=torch.ones(batch, n) if sizes is None else sizes, cls_attention=attention, keys=keys, keep_rate=keep_rate,
        stage=stage, block_index=3, params=params, num_patches=196,
    )


def _bat_params(**overrides):
    values = {spec.name: spec.default for spec in get_method("bat").params}
    values.update(overrides)
    return values


def test_dpc_knn_matches_loop_reference(block4):
    x = block4[0][:, 1:59]  # 58 tokens, the inattentive count of the first stage
    for c, k in ((29, 5), (58, 5), (7, 3)):
        cluster, centres = dpc_knn(x, c, k)
        assert centres.shape == (N_REF, c)
        for b in range(N_REF):
            assert cluster[b].tolist() == reference_dpc(x[b], c, k), (c, k, b)
            # A centre sits in its own cluster.
            assert cluster[b, centres[b]].tolist() == list(range(c))


def test_bat_matches_loop_reference(block4):
    x, attention, keys = block4
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 5, x.shape[:2], generator=generator).float()
    sizes[:, 0] = 1
    assignment = get_method("bat").assign(_ctx(block4, sizes=sizes, params=_bat_params()))
    out, sizes_out, _, _ = apply_assignment(assignment, x, sizes)
    assert assignment.n_out == 139
    for b in range(N_REF):
        expected, kinds, dest = reference_bat(x[b], attention[b], keys[b], sizes[b])
        assert assignment.dest[b].tolist() == dest
        assert [KINDS[code] for code in assignment.kinds[b].tolist()] == kinds
        assert kinds.count("pair") >= 1 and kinds.count("cluster") == 29 and kinds.count("kept") + kinds.count("pair") == 138 - 29
        torch.testing.assert_close(out[b].double(), expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(sizes_out.sum(1), sizes.sum(1))


def test_dpc_method_matches_loop_reference(block4):
    x, attention, _ = block4
    params = {"knn": 5, "weighting": "size"}
    assignment = get_method("dpc").assign(_ctx(block4, params=params))
    out, _, _, _ = apply_assignment(assignment, x, torch.ones(x.shape[:2]))
    assert assignment.n_out == 139
    for b in range(2):
        cluster = reference_dpc(x[b, 1:], 138, 5)
        assert assignment.dest[b].tolist() == [0] + [g + 1 for g in cluster]
        members = [[t + 1 for t, g in enumerate(cluster) if g == q] for q in range(138)]
        expected = torch.stack([x[b, 0].double()] + [x[b, group].double().mean(0) for group in members])
        torch.testing.assert_close(out[b].double(), expected, atol=2e-5, rtol=1e-5)
        kinds = [KINDS[code] for code in assignment.kinds[b].tolist()]
        assert kinds == ["cls"] + ["cluster" if len(group) > 1 else "kept" for group in members]


@pytest.mark.parametrize("method", ["bat", "dpc"])
def test_counts_and_provenance(tiny, sample_batch, method):
    result = run(tiny.model, sample_batch, ReductionPlan.make(method, 0.7))
    assert result.token_counts == COUNTS_07
    assert [stage.n_tokens for stage in result.stages] == [139, 98, 69]
    check_provenance(result)
    kinds = set(torch.cat([stage.token_kinds.flatten() for stage in result.stages]).tolist())
    names = {KINDS[code] for code in kinds}
    assert names == ({"cls", "kept", "pair", "cluster"} if method == "bat" else {"cls", "kept", "cluster"})
    dense = run(tiny.model, sample_batch)
    assert (result.logits.argmax(1) == dense.logits.argmax(1)).float().mean() >= 0.75


@pytest.mark.parametrize("keep_rate", [0.3, 0.9])
def test_bat_keeps_the_evit_budget_at_other_keep_rates(tiny, sample_batch, keep_rate):
    result = run(tiny.model, sample_batch[:2], ReductionPlan.make("bat", keep_rate), track=False)
    assert result.token_counts == keep_rate_counts(keep_rate)


def test_bat_budget_edges():
    assert bat_budget(196, 0.7, 0.5) == (138, 29, 29)
    assert bat_budget(138, 0.7, 0.5) == (97, 21, 21)
    assert bat_budget(97, 0.7, 0.5) == (68, 15, 15)
    assert bat_budget(196, 0.3, 0.5) == (59, 30, 30)  # c = 69 exceeds ceil(59/2) pairs
    assert bat_budget(5, 1.0, 0.5) == (5, 0, 0)
    assert bat_budget(2, 0.5, 0.5) == (1, 1, 0)  # no pair possible: one token over budget
    assert bat_budget(3, 0.5, 1.0) == (2, 1, 1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("keep_rate", [0.05, 0.5, 0.7, 0.99])
def test_small_sequences_do_not_crash(block4, n, keep_rate):
    x, attention, keys = block4
    state = (x[:, : n + 1], attention[:, :n], keys[:, : n + 1])
    for method, params in (("bat", _bat_params()), ("dpc", {"knn": 5, "weighting": "attention"})):
        assignment = get_method(method).assign(_ctx(state, keep_rate=keep_rate, params=params))
        k = math.ceil(round(keep_rate * n, 9))
        if k == n:
            assert assignment is None
            continue
        out, sizes, _, _ = apply_assignment(assignment, state[0], torch.ones(state[0].shape[:2]))
        if method == "bat":
            kk, c, r = bat_budget(n, keep_rate, 0.5)
            assert out.shape[1] == 1 + kk - r + c
        else:
            assert out.shape[1] == 1 + k
        assert torch.isfinite(out).all()
        assert sizes.sum().item() == state[0].shape[0] * (n + 1)
        assert torch.all(sizes[:, 1:] >= 1)


def test_cli_inspect_json(capsys, sample_files):
    from analysis.cli import main

    for method, kinds in (("bat", {"cls", "kept", "pair", "cluster"}), ("dpc", {"cls", "kept", "cluster"})):
        code = main(["inspect", str(sample_files[1]), "--model", TINY, "--device", "cpu", "--method", method, "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        record = json.loads(captured.out)[0]
        assert record["token_counts"] == COUNTS_07
        assert {kind for stage in record["stages"] for kind in stage["token_kinds"]} == kinds
        for stage in record["stages"]:
            assert len(stage["patch_to_token"]) == 196 and "dispatch" not in stage
            assert sum(stage["token_sizes"]) == 196
