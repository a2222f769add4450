"""Dataset-level analysis (analysis/patterns.py, the --patterns accumulators): each measure against a
plain reference on small hand-made cases, rollout against a plain dense rollout, and a small sweep."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from analysis import patterns
from analysis.plan import ReductionPlan
from analysis.provenance import KIND_CODE, Stage

from conftest import SAMPLE_DIR, TINY


# ---------------------------------------------------------------- agreement

def test_iou_of_known_sets():
    a = torch.zeros(3, 10, dtype=torch.bool)
    b = torch.zeros(3, 10, dtype=torch.bool)
    a[0, [0, 1, 2, 3]] = True
    b[0, [2, 3, 4, 5, 6, 7]] = True  # 2 shared of 8 in the union
    a[1, [1, 2]] = True
    b[1, [1, 2]] = True  # equal
    a[2, [0]] = True
    b[2, [9]] = True  # disjoint
    assert patterns.iou(a, b).tolist() == pytest.approx([2 / 8, 1.0, 0.0])
    assert patterns.iou(a[:0], b[:0]).shape == (0,)


def test_partition_scores_of_known_partitions_and_equal_to_sklearn():
    from sklearn.metrics import homogeneity_completeness_v_measure, normalized_mutual_info_score

    same = [0, 0, 1, 1, 2, 2]
    renamed = [5, 5, 3, 3, 9, 9]  # the same partition under other names
    independent = [0, 1, 0, 1, 0, 1]  # carries no information about `same`
    trivial = [0] * 6
    cases = torch.tensor([renamed, independent, trivial, [0, 0, 0, 1, 1, 1]])
    scores = patterns.partition_scores(torch.tensor([same] * 4), cases)
    assert scores["nmi"][0] == pytest.approx(1.0)
    assert scores["nmi"][1] == pytest.approx(0.0, abs=1e-12)
    assert scores["completeness"][2] == pytest.approx(1.0)  # one group: complete, not homogeneous
    assert scores["homogeneity"][2] == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    a = torch.tensor(np.concatenate([np.array([same] * 4), rng.integers(0, 4, (20, 6))]))
    b = torch.cat([cases, torch.tensor(rng.integers(0, 3, (20, 6)))])
    scores = patterns.partition_scores(a, b)
    for i in range(len(a)):
        h, c, v = homogeneity_completeness_v_measure(a[i].numpy(), b[i].numpy())
        assert scores["nmi"][i] == pytest.approx(normalized_mutual_info_score(a[i].numpy(), b[i].numpy()), abs=1e-9)
        assert (scores["homogeneity"][i], scores["completeness"][i], scores["v_measure"][i]) == pytest.approx((h, c, v), abs=1e-9)


def test_block_states_of_a_hand_made_stage():
    # 4 patches; stage at block 2: patch 0 kept alone (token 1), patches 1 and 2 merged (token 2), patch 3 discarded
    stage = Stage(layer=2, patch_to_token=torch.tensor([[1, 2, 2, -1]]), token_sizes=torch.tensor([[0, 1, 2]]),
                  token_kinds=torch.tensor([[KIND_CODE["cls"], KIND_CODE["kept"], KIND_CODE["merged"]]]))
    own, labels = patterns.block_states([stage], depth=3, batch=1, num_patches=4)
    assert own[0].tolist() == [[True] * 4, [True, False, False, False], [True, False, False, False]]
    assert labels[0, 0].tolist() == [2, 3, 4, 5] and labels[0, 2].tolist() == [2, 3, 3, 0]
    assert patterns.survival_depth(own)[0].tolist() == [3.0, 1.0, 1.0, 1.0]
    fused = Stage(layer=1, patch_to_token=torch.tensor([[1, 2, -1, -1]]), token_sizes=torch.tensor([[0, 1, 1]]),
                  token_kinds=torch.tensor([[KIND_CODE["cls"], KIND_CODE["kept"], KIND_CODE["fused"]]]))
    assert patterns.stage_own(fused)[0].tolist() == [True, False, False, False]  # a fused token of one patch is not its own
    assert patterns.method_family("", ["cls", "kept", "fused"]) == "pruning"
    assert patterns.method_family("", ["cls", "merged"]) == "merging"
    assert patterns.method_family("pruning", ["cls", "merged"]) == "pruning"


# ---------------------------------------------------------------- CKA

def _biased_linear_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(torch.linalg.norm(y.T @ x) ** 2 / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)))


def test_cka_identical_is_one_and_invariant_to_orthogonal_transforms_and_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(12, 8, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(64, 8, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    assert patterns.linear_cka(x, x, batch=16) == pytest.approx(1.0)
    base = patterns.linear_cka(x, y, batch=16)
    assert 0.2 < base < 1.0
    assert patterns.linear_cka(x @ q, y, batch=16) == pytest.approx(base, rel=1e-9)
    assert patterns.linear_cka(3.0 * x, y, batch=16) == pytest.approx(base, rel=1e-9)
    # minibatch sums: one batch of 64 differs from 4 of 16, but both estimate the same CKA
    assert abs(patterns.linear_cka(x, y) - base) < 0.1


def test_unbiased_cka_converges_to_the_biased_one_on_many_samples():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 6, generator=gen, dtype=torch.float64)
    y = torch.tanh(x[:, :4]) + 0.3 * torch.randn(3000, 4, generator=gen, dtype=torch.float64)
    assert patterns.linear_cka(x, y) == pytest.approx(_biased_linear_cka(x, y), abs=0.01)


def test_unbiased_hsic_against_its_u_statistic_definition():
    # Song et al. 2012, eq. 4: the mean over distinct (i, j, q, r) of K_ij L_ij + K_ij L_qr - 2 K_ij L_iq
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    import itertools

    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(6), 4):
        total += float(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
        count += 1
    assert patterns.hsic_unbiased(k, l) == pytest.approx(total / count, rel=1e-9)


# ---------------------------------------------------------------- map metrics

def test_map_metrics_on_known_maps():
    uniform = np.ones((4, 4))
    corner = np.zeros((4, 4))
    corner[0, 0] = 1.0
    other_corner = np.zeros((4, 4))
    other_corner[0, 3] = 1.0
    ramp = np.arange(16, dtype=float).reshape(4, 4)
    same = patterns.map_similarity(ramp, 2 * ramp + 1)
    assert same["CC"] == pytest.approx(1.0) and same["SCC"] == pytest.approx(1.0)
    assert patterns.map_sim(ramp, ramp) == pytest.approx(1.0)
    assert patterns.map_sim(corner, other_corner) == pytest.approx(0.0)
    assert patterns.map_kl(ramp, ramp) == pytest.approx(0.0, abs=1e-12)
    assert patterns.map_js(corner, other_corner) == pytest.approx(math.log(2))
    assert patterns.map_js(ramp, ramp) == pytest.approx(0.0, abs=1e-12)
    assert patterns.map_emd(corner, other_corner) == pytest.approx(3.0)  # all mass moves 3 patches
    assert patterns.map_emd(corner, uniform) == pytest.approx(np.mean([math.hypot(r, c) for r in range(4) for c in range(4)]))
    # KL(uniform || corner): the benchmark's eps keeps it finite, and it is large
    assert patterns.map_kl(uniform, corner) == pytest.approx(15 / 16 * math.log(1 / 16 / 2.220446049250313e-16) + 1 / 16 * math.log(1 / 16 + 2.220446049250313e-16), rel=1e-6)
    assert math.isnan(patterns.map_cc(uniform, ramp))  # a constant map has no correlation


def test_emd_equals_scipys_dense_wasserstein_solver():
    from scipy.stats import wasserstein_distance_nd

    rng = np.random.default_rng(3)
    yy, xx = np.divmod(np.arange(30), 6)
    points = np.stack([yy, xx], 1).astype(float)
    for _ in range(3):
        a, b = rng.random((5, 6)), rng.random((5, 6))
        a[a < 0.3] = 0.0
        reference = wasserstein_distance_nd(points, points, a.ravel() / a.sum(), b.ravel() / b.sum())
        assert patterns.map_emd(a, b) == pytest.approx(reference, rel=1e-7, abs=1e-9)


def test_rank_correlations_match_scipy():
    from scipy.stats import kendalltau, spearmanr

    x = [0.1, 0.5, 0.3, 0.9, 0.7]
    y = [1.0, 3.0, 2.5, 5.0, 4.0]
    out = patterns.rank_correlations(x, y)
    assert out["spearman_rho"] == pytest.approx(1.0) and out["kendall_tau"] == pytest.approx(1.0)
    y2 = [2.0, 1.0, 3.0, 5.0, 4.0]
    out = patterns.rank_correlations(x, y2 + [])
    assert out["spearman_p"] == pytest.approx(spearmanr(x, y2).pvalue) and out["kendall_p"] == pytest.approx(kendalltau(x, y2).pvalue)
    assert math.isnan(patterns.rank_correlations([1, 2], [3, 4])["spearman_rho"])


# ---------------------------------------------------------------- rollout

def _plain_rollout(model, images, fusion="mean", discard_ratio=0.0):
    """Rollout as jacobgil/vit-explain (vit_rollout.rollout) from attention taken from timm's own
    blocks by recomputing softmax(q k' * scale) on each block's input."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    result = torch.eye(x.shape[1], dtype=torch.float64).expand(x.shape[0], -1, -1).clone()
    with torch.inference_mode():
        for block in model.blocks:
            attn = block.attn
            h = block.norm1(x)
            b, n, c = h.shape
            qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            probs = ((q.float() @ k.float().transpose(-2, -1)) * attn.scale).softmax(-1).double()
            fused = {"mean": probs.mean(1), "max": probs.amax(1), "min": probs.amin(1)}[fusion]
            flat = fused.reshape(b, -1).clone()
            for image in range(b):
                _, idx = flat[image].topk(int(flat.shape[1] * discard_ratio), largest=False)
                idx = idx[idx != 0]
                flat[image, idx] = 0
            a = flat.reshape(b, n, n)
            a = (a + torch.eye(n, dtype=a.dtype)) / 2
            a = a / a.sum(-1, keepdim=True)
            result = a @ result
            x = block(x)
    mask = result[:, 0, 1:]
    return mask / mask.sum(-1, keepdim=True)


@pytest.mark.parametrize("fusion,ratio", [("mean", 0.0), ("max", 0.9), ("min", 0.5)])
def test_rollout_at_keep_1_equals_the_plain_dense_rollout(tiny, sample_batch, fusion, ratio):
    from analysis.engine import run
    from analysis.registry import all_methods

    images = sample_batch[:2]
    reference = _plain_rollout(tiny.model, images, fusion, ratio)
    method = next(m for m in all_methods().values() if m.uses_keep_rate)  # any keep-rate method, at keep 1.0
    for plan in (ReductionPlan(), ReductionPlan.make(method.name, 1.0)):
        result = run(tiny.model, images, plan, keep_attention=True)
        assert len(result.attentions) == len(tiny.model.blocks)
        mine = patterns.rollout(result.attentions, result.stages, acts=method.acts, fusion=fusion, discard_ratio=ratio)
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-7)


def test_rollout_through_a_hand_made_merge_and_prune():
    # 3 patches: identity attention everywhere, so only the residual-free mixing matters.
    eye = torch.eye(4).view(1, 1, 4, 4)
    # block 1 merges patches 1 and 2 (shares 0.5 each) into token 1, keeps patch 3 as token 2
    merge = Stage(layer=1, patch_to_token=torch.tensor([[1, 1, 2]]), token_sizes=torch.tensor([[0, 2, 1]]),
                  token_kinds=torch.tensor([[0, KIND_CODE["merged"], KIND_CODE["kept"]]]),
                  patch_weight=torch.tensor([[0.5, 0.5, 1.0]]))
    # the class token attends half to itself and half to token 1 (the merged one) in block 2
    attention = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    out = patterns.rollout([eye, attention], [merge], acts="inside")
    # block 2: A~ row 0 = normalise(0.5*[0.5,0.5,0] + 0.5*[1,0,0]) = [0.75, 0.25, 0]; token 1 = 0.5 p1 + 0.5 p2
    expected = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    kept = torch.tensor([[False, False, True]])
    assert patterns.rollout_overlap(out, kept).tolist() == [0.0]
    assert patterns.rollout_overlap(torch.tensor([[0.1, 0.2, 0.7]]), kept).tolist() == [1.0]


# ---------------------------------------------------------------- the sweep with --patterns, and compare

PATTERN_RATES = (1.0, 0.7)


@pytest.fixture(scope="session")
def pattern_sweep(tmp_path_factory, tiny):
    """`sweep --patterns` on 8 of the shared photos: the dense model and the first four methods of the
    default sweep, at keep rates 1.0 and 0.7."""
    from analysis.registry import all_methods
    from analysis.sweep import SweepConfig, run_sweep

    methods = ["none"] + [name for name, m in all_methods().items() if m.in_default_sweep][:4]
    out = tmp_path_factory.getbasetemp() / "pattern-sweep"
    config = SweepConfig(data=str(SAMPLE_DIR), model=TINY, methods=tuple(methods), keep_rates=PATTERN_RATES, limit=8,
                         batch_size=4, workers=0, out=str(out), device="cpu", diversity_images=0, patterns=True)
    return out, run_sweep(config, loaded=tiny, show_bar=False), methods


def test_patterns_sweep_writes_every_measure(pattern_sweep, tiny):
    out, outcome, methods = pattern_sweep
    rows = {(r["method"], r["keep_rate"]): r for r in outcome.rows}
    depth, p = len(tiny.model.blocks), tiny.model.patch_embed.num_patches
    for (method, rate), row in rows.items():
        freq = np.asarray(row["keep_frequency"])
        assert freq.shape == (depth, p) and row["patch_grid"] == [14, 14]
        assert ((0 <= freq) & (freq <= 1)).all() and (np.diff(freq, axis=0) <= 1e-12).all()  # never regained
        assert len(row["survival_depth"]) == p and len(row["cka"]) == depth
        if rate == 1.0:
            assert freq.min() == 1.0 and row["dense_agreement"] == 100.0 and row["dense_kl"] < 1e-8
            assert row["cka"] == pytest.approx([1.0] * depth, abs=1e-6)
        else:
            assert freq[-1].mean() < 0.9 and 0 < row["dense_cosine"] <= 1
    reduced = methods[1:]
    later = rows[(reduced[-1], 0.7)]
    assert set(later["agreement"]) == set(reduced[:-1])  # each pair once, in the later setting's row
    assert later["agreement"][reduced[0]]["n"] == 8
    saved = json.loads((out / "results.json").read_text())
    assert all("keep_frequency" in r for r in saved["rows"])


def test_patterns_equal_a_plain_per_image_reference(pattern_sweep, tiny):
    """Keep frequency, IoU and NMI of two methods, and the fidelity, recomputed image by image with
    python loops over stages and patches and sklearn, from the engine's provenance of each image alone."""
    from sklearn.metrics import normalized_mutual_info_score

    from analysis.datasets import make_loader, resolve_dataset
    from analysis.engine import run
    from analysis.models import make_transform
    from analysis.provenance import StageRecord
    from analysis.sweep import build_settings

    out, outcome, methods = pattern_sweep
    files = resolve_dataset(str(SAMPLE_DIR)).subset(8)
    images = torch.cat([b.images for b in make_loader(files, make_transform(tiny.model, None), 8, 0)])
    settings = {(s.method, s.keep_rate): s for s in build_settings(tuple(methods), (0.7,), tiny)}
    a, b = methods[1], methods[-1]
    depth, p = len(tiny.model.blocks), tiny.model.patch_embed.num_patches

    def per_image(method):
        states = []
        for i in range(len(images)):
            result = run(tiny.model, images[i:i + 1], settings[(method, 0.7)].plan)
            records = [StageRecord.from_stage(s, 0) for s in result.stages]
            own, labels = [], []
            for block in range(1, depth + 1):
                last = [r for r in records if r.layer <= block]
                if not last:
                    own.append([True] * p)
                    labels.append(list(range(p)))
                    continue
                r = last[-1]
                own.append([bool(r.patch_to_token[q] >= 0 and r.token_sizes[r.patch_to_token[q]] == 1
                                 and r.token_kinds[r.patch_to_token[q]] != "fused") for q in range(p)])
                labels.append([int(t) for t in r.patch_to_token])
            states.append((own, labels, result.logits))
        return states

    mine, theirs = per_image(a), per_image(b)
    rows = {(r["method"], r["keep_rate"]): r for r in outcome.rows}
    freq = np.mean([np.asarray(s[0], float) for s in mine], axis=0)
    np.testing.assert_allclose(rows[(a, 0.7)]["keep_frequency"], freq, atol=1e-6)
    survival = np.mean([[max([d + 1 for d in range(depth) if s[0][d][q]], default=0) for q in range(p)] for s in mine], axis=0)
    np.testing.assert_allclose(rows[(a, 0.7)]["survival_depth"], survival, atol=1e-6)
    ious, nmis = [], []
    for (own_a, lab_a, _), (own_b, lab_b, _) in zip(mine, theirs):
        sa, sb = set(np.flatnonzero(own_a[-1])), set(np.flatnonzero(own_b[-1]))
        ious.append(len(sa & sb) / len(sa | sb))
        nmis.append(normalized_mutual_info_score(lab_a[-1], lab_b[-1]))
    entry = rows[(b, 0.7)]["agreement"][a]
    assert entry["iou"][-1] == pytest.approx(np.mean(ious), abs=1e-6)
    assert entry["nmi"][-1] == pytest.approx(np.mean(nmis), abs=1e-6)
    dense = run(tiny.model, images, ReductionPlan(), track=False).logits
    reduced = torch.cat([s[2] for s in mine])
    agree = (dense.argmax(1) == reduced.argmax(1)).double().mean() * 100
    assert rows[(a, 0.7)]["dense_agreement"] == pytest.approx(float(agree))
    kl = torch.nn.functional.kl_div(reduced.double().log_softmax(1), dense.double().log_softmax(1), log_target=True,
                                    reduction="batchmean")
    assert rows[(a, 0.7)]["dense_kl"] == pytest.approx(float(kl), rel=1e-3, abs=1e-6)


def test_compare_cli_writes_every_table_and_figure(pattern_sweep, tmp_path):
    import subprocess
    import sys

    out, outcome, methods = pattern_sweep
    done = subprocess.run([sys.executable, "-m", "analysis", "compare", str(out), "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    names = {path.name for path in (tmp_path / "cmp").iterdir()}
    for stem in ("fidelity", "agreement", "map_similarity", "correlation"):
        assert {f"{stem}.csv", f"{stem}.md", f"{stem}.tex"} <= names
    for stem in ["keep_frequency", "agreement", "map_similarity", "fidelity", "correlation"] + [f"keep_frequency_{m}" for m in methods[1:]]:
        assert {f"{stem}.pdf", f"{stem}.svg", f"{stem}.png"} <= names, stem
    assert "skipped" not in done.stderr


def test_results_without_patterns_stay_readable_and_compare_says_what_to_do(tmp_path):
    import subprocess
    import sys

    from analysis.compare import write_compare
    from analysis.errors import FiguresError
    from analysis.sweep import load_results

    old = {"config": {"model": TINY}, "rows": [{"model": TINY, "method": "none", "keep_rate": 1.0, "top1": 80.0, "gmacs": 1.3}]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert load_results(tmp_path)["rows"][0]["top1"] == 80.0
    with pytest.raises(FiguresError, match="--patterns"):
        write_compare(tmp_path, tmp_path / "cmp")
    done = subprocess.run([sys.executable, "-m", "analysis", "compare", str(tmp_path), "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--patterns" in done.stderr and "Traceback" not in done.stderr


def test_main_page_draws_the_rollout_beside_the_stage_pictures():
    from conftest import open_page

    at = open_page("app.py", timeout=600)
    toggles = [t for t in at.toggle if str(t.key).startswith("rollout_")]
    assert toggles, "a rollout toggle for the shown method"
    toggles[0].set_value(True)
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    captions = [img.caption for element in at.get("image") for img in element.proto.imgs]
    assert len([c for c in captions if "rollout" in c]) == 2, captions
    overlap = [m for m in at.metric if "Overlap" in m.label]
    assert len(overlap) == 1 and 0.0 <= float(overlap[0].value) <= 1.0
    fusion = [s for s in at.selectbox if str(s.key).startswith("rollout_fusion_")][0]
    fusion.set_value("max")
    at.run()
    assert not at.exception, at.exception
