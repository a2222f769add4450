"""eTPS, dTPS and DynamicViT (methods.md §3) on the real DeiT-Tiny weights and ImageNet photos,
against plain loop references written from the spec."""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis.engine import run

from analysis.errors import PlanError

from analysis.plan import ReductionPlan
from analysis.methods import KINDS, ReduceContext, apply_assignment, get_method
from analysis.methods.tps import predictor_problems
from analysis.models import load_model
from conftest import TINY
from method_states import block_input, check_provenance, inside_state

COUNTS_07 = [197, 197, 197, 139, 139, 139, 98, 98, 98, 69, 69, 69]


def _ctx(x, cls_attention=None, keys=None, keep_rate=0.7, stage=0, block_index=3, params=None, extras=None, sizes=None):
    batch, n, _ = x.shape
    return ReduceContext(
        x=x, sizes=torch.ones(batch, n) if sizes is None else sizes, cls_attention=cls_attention, keys=keys,
        keep_rate=keep_rate, stage=stage, block_index=block_index, params=params or {}, num_patches=196, extras=extras or {},
    )


def reference_squeeze(x: torch.Tensor, kept: list[int], pruned: list[int], tau: float):
    """methods.md §3 squeeze for one image, token by token, in float64.
    Returns (host of each pruned token as an index into `kept`, the squeezed hosts [k, C],
    self weight per host, {pruned token: weight})."""
    x = x.double()
    norm = lambda v: v / (v.norm() + 1e-6)  # noqa: E731
    hosts = [norm(x[i]) for i in kept]
    host_of, logit_of = {}, {}
    for j in pruned:
        q = norm(x[j])
        sims = [float(q @ h) / tau for h in hosts]
        best = max(range(len(kept)), key=lambda i: sims[i])
        host_of[j], logit_of[j] = best, sims[best]
    out, self_weight, weight = [], [], {}
    for i, t in enumerate(kept):
        guests = [j for j in pruned if host_of[j] == i]
        den = math.e + sum(math.exp(logit_of[j]) for j in guests)
        out.append((math.e * x[t] + sum((math.exp(logit_of[j]) * x[j] for j in guests), torch.zeros_like(x[t]))) / den)
        self_weight.append(math.e / den)
        for j in guests:
            weight[j] = math.exp(logit_of[j]) / den
    return host_of, torch.stack(out), self_weight, weight


@pytest.fixture(scope="module")
def block4(tiny, sample_batch):
    return inside_state(tiny.model, sample_batch, 3)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_etps_matches_loop_reference(block4, tau):
    x, attention, _ = block4
    assignment = get_method("etps").assign(_ctx(x, attention, params={"tau": tau}))
    out, sizes, share, _ = apply_assignment(assignment, x, torch.ones(x.shape[:2]))
    assert out.shape == (8, 139, 192) and assignment.n_out == 139
    self_share = assignment.extra["dispatch"]
    for b in range(x.shape[0]):
        scores = attention[b].tolist()
        order = sorted(range(196), key=lambda i: -scores[i])
        k = math.ceil(0.7 * 196)
        kept = [i + 1 for i in order[:k]]
        pruned = sorted(i + 1 for i in order[k:])
        host_of, hosts, self_weight, weight = reference_squeeze(x[b], kept, pruned, tau)
        assert assignment.dest[b, 0] == 0
        assert assignment.dest[b, kept].tolist() == list(range(1, k + 1))
        assert assignment.dest[b, pruned].tolist() == [host_of[j] + 1 for j in pruned]
        torch.testing.assert_close(out[b, 1:].double(), hosts, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[b, 0], x[b, 0])
        torch.testing.assert_close(self_share[b, 1:].double(), torch.tensor(self_weight, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(share[b, pruned].double(), torch.tensor([weight[j] for j in pruned], dtype=torch.float64), atol=1e-6, rtol=0)
        # Each host's squeeze weights, its own plus what it received, sum to 1.
        total = self_share[b].clone().double()
        total.index_add_(0, assignment.dest[b, pruned], share[b, pruned].double())
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
        received = {host_of[j] + 1 for j in pruned}
        kinds = [KINDS[c] for c in assignment.kinds[b].tolist()]
        assert kinds[0] == "cls"
        assert [i for i, kind in enumerate(kinds) if kind == "host"] == sorted(received)
        assert assignment.pruned[b].nonzero().flatten().tolist() == pruned
    assert torch.equal(sizes[:, 1:].sum(1), torch.full((8,), 196.0))


def test_etps_counts_provenance_and_dispatch(tiny, sample_batch):
    result = run(tiny.model, sample_batch, ReductionPlan.make("etps", 0.7))
    assert result.token_counts == COUNTS_07
    assert [stage.n_tokens for stage in result.stages] == [139, 98, 69]
    check_provenance(result)
    for stage in result.stages:
        host = stage.token_kinds == KINDS.index("host")
        assert host.any(dim=1).all()
        # A pruned patch lands in a host token; hosts keep less than all of themselves.
        pruned_tokens = stage.patch_to_token[stage.patch_pruned]
        assert stage.patch_pruned.any(dim=1).all()
        assert torch.all(host.gather(1, stage.patch_to_token.clamp(min=0))[stage.patch_pruned])
        weights = stage.patch_weight[stage.patch_pruned]
        assert torch.all((weights > 0) & (weights < 1)), pruned_tokens.shape
        self_share = stage.extra["dispatch"]
        assert torch.all(self_share[host] < 1) and torch.all(self_share[~host] == 1)
    dense = run(tiny.model, sample_batch)
    assert (result.logits.argmax(1) == dense.logits.argmax(1)).float().mean() >= 0.75


# ---------------------------------------------------------------------------------------------
# dTPS / DynamicViT from a written checkpoint
# ---------------------------------------------------------------------------------------------

def _predictor_state(width: int, stages: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded predictor weights under the official key names (score_predictor.{s}.in_conv/out_conv)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return torch.randn(*shape, generator=generator) * scale

    state = {}
    for s in range(stages):
        p = f"score_predictor.{s}."
        state[p + "in_conv.0.weight"] = 1 + randn(width, scale=0.1)
        state[p + "in_conv.0.bias"] = randn(width, scale=0.1)
        state[p + "in_conv.1.weight"] = randn(width, width, scale=width ** -0.5)
        state[p + "in_conv.1.bias"] = randn(width, scale=0.1)
        state[p + "out_conv.0.weight"] = randn(width // 2, width, scale=width ** -0.5)
        state[p + "out_conv.0.bias"] = randn(width // 2, scale=0.1)
        state[p + "out_conv.2.weight"] = randn(width // 4, width // 2, scale=(width // 2) ** -0.5)
        state[p + "out_conv.2.bias"] = randn(width // 4, scale=0.1)
        state[p + "out_conv.4.weight"] = randn(2, width // 4, scale=(width // 4) ** -0.5)
        state[p + "out_conv.4.bias"] = randn(2, scale=0.1)
    return state


@pytest.fixture(scope="module")
def predictor_checkpoint(tiny, tmp_path_factory):
    """A DeiT-Tiny checkpoint as the official releases wrap it: {"model": real weights + predictor}."""
    state = dict(tiny.model.state_dict())
    state.update(_predictor_state(192))
    path = tmp_path_factory.mktemp("ckpt") / "dtps_deit_tiny_seeded.pth"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def with_predictor(predictor_checkpoint):
    return load_model(TINY, str(predictor_checkpoint), "cpu")


def reference_keep_log_prob(weights: dict[str, torch.Tensor], stage: int, tokens: torch.Tensor) -> torch.Tensor:
    """methods.md §3's predictor for one image [n, C], token by token, in float64."""
    w = {k: v.double() for k, v in weights.items() if k.startswith(f"{stage}.")}
    p = f"{stage}."
    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))  # noqa: E731
    hidden = []
    for t in tokens.double():
        ln = (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5) * w[p + "in_conv.0.weight"] + w[p + "in_conv.0.bias"]
        hidden.append(gelu(w[p + "in_conv.1.weight"] @ ln + w[p + "in_conv.1.bias"]))
    c = tokens.shape[1]
    global_part = sum(h[c // 2:] for h in hidden) / len(hidden)
    out = []
    for h in hidden:
        z = torch.cat([h[: c // 2], global_part])
        z = gelu(w[p + "out_conv.0.weight"] @ z + w[p + "out_conv.0.bias"])
        z = gelu(w[p + "out_conv.2.weight"] @ z + w[p + "out_conv.2.bias"])
        z = w[p + "out_conv.4.weight"] @ z + w[p + "out_conv.4.bias"]
        out.append(float(z[0] - torch.logsumexp(z, 0)))
    return torch.tensor(out, dtype=torch.float64)


def test_checkpoint_splits_predictor_and_backbone_is_unchanged(tiny, with_predictor):
    weights = with_predictor.extras["score_predictor"]
    assert predictor_problems(weights) == []
    assert len(weights) == 30 and "2.out_conv.4.bias" in weights
    assert get_method("dtps").unavailable_reason(with_predictor.extras) is None
    assert get_method("dynamicvit").unavailable_reason(with_predictor.extras) is None
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(with_predictor.model.state_dict()[name], value)


@pytest.fixture(scope="module")
def stage1_reference(with_predictor, sample_batch):
    """Block 4's input for 4 photos and the loop reference's keep log-probabilities of stage 0."""
    x = block_input(with_predictor.model, sample_batch[:4], 3)
    weights = with_predictor.extras["score_predictor"]
    return x, [reference_keep_log_prob(weights, 0, x[b, 1:]) for b in range(x.shape[0])]


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_predictor_stage_matches_loop_reference(with_predictor, stage1_reference, method):
    from analysis.methods.tps import predictor_keep_log_prob

    x, scores = stage1_reference
    ours = predictor_keep_log_prob(with_predictor.extras["score_predictor"], 0, x[:, 1:])
    assignment = get_method(method).assign(_ctx(x, params={"tau": 1.0} if method == "dtps" else {}, extras=with_predictor.extras))
    out, _, share, _ = apply_assignment(assignment, x, torch.ones(x.shape[:2]))
    assert assignment.n_out == 138 == out.shape[1]
    for b in range(x.shape[0]):
        score = scores[b]
        torch.testing.assert_close(ours[b].double(), score, atol=1e-5, rtol=0)
        order = sorted(range(196), key=lambda i: -float(score[i]))
        kept = [i + 1 for i in order[:137]]
        pruned = sorted(i + 1 for i in order[137:])
        assert assignment.dest[b, kept].tolist() == list(range(1, 138))
        if method == "dynamicvit":
            assert assignment.dest[b, pruned].tolist() == [-1] * len(pruned)
            torch.testing.assert_close(out[b], x[b, [0] + kept])
            assert set(assignment.kinds[b, 1:].tolist()) == {KINDS.index("kept")}
        else:
            host_of, hosts, self_weight, weight = reference_squeeze(x[b], kept, pruned, 1.0)
            assert assignment.dest[b, pruned].tolist() == [host_of[j] + 1 for j in pruned]
            torch.testing.assert_close(out[b, 1:].double(), hosts, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(assignment.extra["dispatch"][b, 1:].double(), torch.tensor(self_weight, dtype=torch.float64), atol=1e-6, rtol=0)
            torch.testing.assert_close(share[b, pruned].double(), torch.tensor([weight[j] for j in pruned], dtype=torch.float64), atol=1e-6, rtol=0)


def test_later_predictor_stage_matches_reference(with_predictor, sample_batch):
    from analysis.methods.tps import predictor_keep_log_prob

    x = block_input(with_predictor.model, sample_batch[:1], 6)
    ours = predictor_keep_log_prob(with_predictor.extras["score_predictor"], 1, x[:, 1:])
    torch.testing.assert_close(ours[0].double(), reference_keep_log_prob(with_predictor.extras["score_predictor"], 1, x[0, 1:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,counts", [
    ("dtps", [197, 197, 197, 138, 138, 138, 97, 97, 97, 68, 68, 68]),
    ("dynamicvit", [197, 197, 197, 138, 138, 138, 97, 97, 97, 68, 68, 68]),
])
def test_predictor_methods_run_end_to_end(with_predictor, sample_batch, method, counts):
    result = run(with_predictor.model, sample_batch, ReductionPlan.make(method, 0.7), extras=with_predictor.extras)
    assert result.token_counts == counts
    check_provenance(result, allow_discard=method == "dynamicvit")
    if method == "dynamicvit":
        discarded = [int((stage.patch_to_token[0] < 0).sum()) for stage in result.stages]
        assert discarded == [59, 100, 129]
    else:
        for stage in result.stages:
            assert (stage.token_kinds == KINDS.index("host")).any()
            assert "dispatch" in stage.extra


def test_predictor_methods_unavailable_without_predictor(tiny, sample_batch):
    for name in ("dtps", "dynamicvit"):
        reason = get_method(name).unavailable_reason(tiny.extras)
        assert reason and "score_predictor" in reason and "\n" not in reason
        with pytest.raises(PlanError, match="cannot run"):
            run(tiny.model, sample_batch[:1], ReductionPlan.make(name, 0.7), extras=tiny.extras)


def test_checkpoint_with_missing_or_mismatched_predictor_keys_is_reported(tiny, sample_batch, tmp_path):
    state = dict(tiny.model.state_dict())
    state.update(_predictor_state(192))
    del state["score_predictor.2.out_conv.4.bias"]
    state["score_predictor.1.out_conv.2.weight"] = torch.zeros(48, 97)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    loaded = load_model(TINY, str(path), "cpu")
    with pytest.raises(PlanError) as err:
        run(loaded.model, sample_batch[:1], ReductionPlan.make("dtps", 0.7), extras=loaded.extras)
    message = str(err.value)
    assert "score_predictor.2.out_conv.4.bias" in message
    assert "score_predictor.1.out_conv.2.weight (48, 97) (expected (48, 96))" in message
    assert "\n" not in message


def test_predictor_for_another_width_is_refused(tiny, sample_batch):
    extras = {"score_predictor": {k.split(".", 1)[1]: v for k, v in _predictor_state(384).items()}}
    assert get_method("dtps").unavailable_reason(extras) is None
    with pytest.raises(Exception, match="width 384"):
        run(tiny.model, sample_batch[:1], ReductionPlan.make("dtps", 0.7), extras=extras)


def test_cli_inspect_json_has_dispatch(capsys, sample_files, predictor_checkpoint):
    from analysis.cli import main

    image = str(sample_files[0])
    weights = ["--weights", str(predictor_checkpoint)]
    for method, extra_args in (("etps", []), ("dtps", weights), ("dynamicvit", weights)):
        code = main(["inspect", image, "--model", TINY, "--device", "cpu", "--method", method, "--json", *extra_args])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        record = json.loads(captured.out)[0]
        assert record["method"] == method
        expected = [139, 98, 69] if method == "etps" else [138, 97, 68]
        assert [len(stage["token_kinds"]) for stage in record["stages"]] == expected
        for stage in record["stages"]:
            if method == "dynamicvit":  # drops, does not squeeze: no dispatch map, discarded patches
                assert "dispatch" not in stage and -1 in stage["patch_to_token"]
                continue
            assert stage["dispatch"], "a squeezing stage lists its dispatched patches"
            for item in stage["dispatch"]:
                assert stage["token_kinds"][item["host_token"]] == "host"
                assert stage["patch_to_token"][item["patch"]] == item["host_token"]
                assert 0 < item["weight"] < 1


def _tied_tokens() -> torch.Tensor:
    """[1, 8, 4]: cls, four kept tokens (2 and 3 identical), then three pruned tokens: one along the
    duplicated hosts (tied between them), one zero vector (cosine 0 with every host: tied between all
    four) and one that prefers host 1 alone."""
    g = torch.Generator().manual_seed(3)
    cls, h1, h2, h4 = torch.randn(4, 4, generator=g)
    h4 = -h2 + 0.1 * h4
    tied_pair = 2.0 * h2
    zero = torch.zeros(4)
    near_h1 = h1 + 0.01 * torch.randn(4, generator=g)
    return torch.stack([cls, h1, h2, h2.clone(), h4, tied_pair, zero, near_h1]).unsqueeze(0)


def test_squeeze_into_every_tied_host():
    """The official TPSModule squeezes a pruned token into every host whose cosine equals the row's
    maximum (`cos == rowmax`): with duplicated hosts, a zero pruned token and an ordinary one."""
    from analysis.engine import _stage
    from analysis.methods.tps import squeeze_assignment
    from analysis.provenance import StageRecord

    x = _tied_tokens()
    kept, pruned = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7]])
    assignment = squeeze_assignment(x, kept, pruned, 1.0)
    out, _, share, edge_share = apply_assignment(assignment, x, torch.ones(1, 8))
    # loop reference: every host at the row maximum receives e^c (float32 cosines, as the official code)
    unit = x[0] / (x[0].norm(dim=-1, keepdim=True) + 1e-6)
    received = {h: [] for h in range(1, 5)}
    for j in (5, 6, 7):
        sims = [float(unit[j] @ unit[h]) for h in range(1, 5)]
        best = max(sims)
        for h, sim in zip(range(1, 5), sims):
            if sim == best:
                received[h].append((j, sim))
    assert [j for j, _ in received[2]] == [5, 6] and [j for j, _ in received[3]] == [5, 6]  # the pair and the zero token
    assert [j for j, _ in received[1]] == [6, 7] and [j for j, _ in received[4]] == [6]
    for h in range(1, 5):
        den = math.e + sum(math.exp(c) for _, c in received[h])
        want = (math.e * x[0, h].double() + sum(math.exp(c) * x[0, j].double() for j, c in received[h])) / den
        torch.testing.assert_close(out[0, h].double(), want, atol=1e-6, rtol=1e-6)
    # the zero token went to host 1 first (the lowest position), to hosts 2-4 by edges
    assert assignment.dest[0, 6] == 1 and assignment.dest[0, 5] == 2 and assignment.dest[0, 7] == 1
    assert sorted(zip(assignment.edges.source[0].tolist(), assignment.edges.target[0].tolist())) == [(5, 3), (6, 2), (6, 3), (6, 4)]
    # the dispatch JSON lists every host of a tied patch (patches 4, 5, 6 are tokens 5, 6, 7)
    before = torch.arange(1, 8).unsqueeze(0)
    record = StageRecord.from_stage(_stage(4, assignment, before, share, edge_share, None, None), 0)
    dispatch = {entry["patch"]: entry for entry in record.to_json()["dispatch"]}
    assert [host["token"] for host in dispatch[4]["hosts"]] == [2, 3]
    assert [host["token"] for host in dispatch[5]["hosts"]] == [1, 2, 3, 4]
    assert "hosts" not in dispatch[6]
    again = StageRecord.from_json(record.to_json())
    assert again.other_hosts() == {p: [(t, pytest.approx(w, abs=1e-6)) for t, w in pairs] for p, pairs in record.other_hosts().items()}


def test_dispatch_picture_draws_an_arrow_to_every_tied_host():
    from analysis.engine import _stage
    from analysis.methods.tps import squeeze_assignment
    from analysis.provenance import StageRecord
    from viz.overlays import dispatch_arrows

    x = _tied_tokens()
    assignment = squeeze_assignment(x, torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7]]), 1.0)
    _, _, share, edge_share = apply_assignment(assignment, x, torch.ones(1, 8))
    record = StageRecord.from_stage(_stage(4, assignment, torch.arange(1, 8).unsqueeze(0), share, edge_share, None, None), 0)
    arrows = dispatch_arrows(record)
    assert sorted((p, h) for p, h, _ in arrows) == [(4, 2), (4, 3), (5, 1), (5, 2), (5, 3), (5, 4), (6, 1)]
