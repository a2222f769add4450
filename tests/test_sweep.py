"""Sweeps over the real ImageNet sample: accuracy per keep rate, GMACs, diversity, resuming, errors.

The 100-image sweep (DeiT-T, EViT at 1.0, 0.7, 0.5) runs once per session in `sample_sweep`; the
figures and Curves-page tests import the same fixture (a rerun in the same folder resumes: nothing
is recomputed)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.plan import ReductionPlan
from analysis.gmacs import plan_gmacs
from analysis.errors import PlanError, SweepError
from analysis.sweep import CSV_COLUMNS, SweepConfig, build_settings, load_results, run_sweep

from conftest import ROOT, SAMPLE_DIR, TINY

KEEP_RATES = (1.0, 0.7, 0.5)


@pytest.fixture(scope="session")
def sample_sweep(tmp_path_factory, tiny):
    """results of `sweep --data ../shared/imagenet-sample/val --model deit_tiny --methods evit --keep-rates 1.0,0.7,0.5`."""
    out = tmp_path_factory.getbasetemp() / "sample-sweep"
    config = SweepConfig(data=str(SAMPLE_DIR), model=TINY, weights="pretrained", methods=("evit",), keep_rates=KEEP_RATES,
                         batch_size=50, workers=2, out=str(out), device="cpu", diversity_images=100)
    outcome = run_sweep(config, loaded=tiny, show_bar=False)
    return out, outcome


def _rows(outcome):
    return {row["keep_rate"]: row for row in outcome.rows if row["method"] == "evit"}


def test_dense_top1_equals_inspect_image_by_image(sample_sweep, tiny, sample_files):
    from analysis.inspect import analyse_images
    from analysis.models import imagenet_wnids, load_image

    _, outcome = sample_sweep
    rows = _rows(outcome)
    wnids = imagenet_wnids()
    analyses = analyse_images(tiny, [load_image(path) for path in sample_files], ReductionPlan(), crop_pct=None)
    predicted = [analysis.dense_top5[0]["index"] for analysis in analyses]
    correct = sum(int(p == wnids.index(path.parent.name)) for p, path in zip(predicted, sample_files))
    assert rows[1.0]["n_images"] == 100 and rows[1.0]["n_skipped"] == 0
    assert rows[1.0]["top1"] == pytest.approx(correct)  # 100 images: percent = count
    assert rows[1.0]["top1"] >= 75


def test_accuracy_falls_with_the_keep_rate(sample_sweep):
    _, outcome = sample_sweep
    rows = _rows(outcome)
    top1 = [rows[rate]["top1"] for rate in KEEP_RATES]
    assert top1[0] >= top1[1] >= top1[2] and top1[0] > top1[2], top1
    for row in rows.values():
        assert row["top5"] >= row["top1"]


def test_rows_hold_gmacs_diversity_and_throughput(sample_sweep, tiny):
    out, outcome = sample_sweep
    rows = _rows(outcome)
    for rate, row in rows.items():
        assert row["gmacs"] == pytest.approx(plan_gmacs(tiny.model, ReductionPlan.make("evit", rate)))
        assert len(row["diversity"]) == 12 and len(row["diversity_per_token"]) == 12
        assert row["images_per_s"] > 0 and row["seconds"] > 0
        assert row["crop_pct"] == pytest.approx(0.9)  # DeiT's timm data config (the papers use 0.875)
        assert row["diversity_images"] == 100
    assert round(rows[1.0]["gmacs"], 1) == 1.3 and round(rows[0.7]["gmacs"], 1) == 0.8
    assert rows[0.7]["token_counts"] == [197, 197, 197, 140, 140, 140, 100, 100, 100, 72, 72, 72]
    # before the first reducing layer the tokens are the dense model's: same diversity
    assert rows[0.5]["diversity"][:3] == pytest.approx(rows[1.0]["diversity"][:3], rel=1e-9)
    assert rows[0.5]["diversity"][3] < rows[1.0]["diversity"][3]  # half the tokens: far less total spread
    with open(out / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        assert len(list(reader)) == 3
    content = json.loads((out / "results.json").read_text())
    assert content["config"]["data"] == str(SAMPLE_DIR.resolve())
    assert not (out / "partial.json").exists()


def test_rerun_skips_finished_settings(sample_sweep, tiny):
    out, first = sample_sweep
    config = SweepConfig(data=str(SAMPLE_DIR), model=TINY, methods=("evit",), keep_rates=KEEP_RATES, batch_size=50, workers=0,
                         out=str(out), diversity_images=100)
    again = run_sweep(config, loaded=tiny, show_bar=False)
    assert again.ran == 0 and again.skipped_settings == 3
    assert [r["top1"] for r in again.rows] == [r["top1"] for r in first.rows]


def _small_layout(tmp_path, sample_files) -> Path:
    root = tmp_path / "data"
    for path in sample_files[::20]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).symlink_to(path)
    (root / sample_files[0].parent.name / "corrupt.JPEG").write_bytes(b"not a jpeg at all")
    return root


def test_interrupted_pass_resumes_to_the_same_result(tmp_path, tiny, sample_files):
    root = _small_layout(tmp_path, sample_files)  # 5 photos + 1 corrupt file
    base = dict(data=str(root), model=TINY, methods=("evit",), keep_rates=(0.6,), batch_size=2, workers=0, checkpoint_every=1,
                diversity_images=3)
    clean = run_sweep(SweepConfig(**base, out=str(tmp_path / "clean")), loaded=tiny, show_bar=False).rows[0]
    assert clean["n_images"] == 5 and clean["n_skipped"] == 1
    assert "corrupt.JPEG" in clean["skipped_files"][0]

    calls = []

    def stop_after_two_batches(fraction, message):
        if message.endswith("settings") and " images, " in message:  # the end-of-batch report (not the per-setting ones)
            calls.append(fraction)
        if len(calls) == 2:
            raise KeyboardInterrupt

    resumed_out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepConfig(**base, out=str(resumed_out)), loaded=tiny, progress=stop_after_two_batches, show_bar=False)
    state = json.loads((resumed_out / "partial.json").read_text())
    assert list(state["tallies"].values())[0]["batches"] == 2
    resumed = run_sweep(SweepConfig(**base, out=str(resumed_out)), loaded=tiny, show_bar=False)
    row = resumed.rows[0]
    assert row["diversity_images"] == clean["diversity_images"] == 2  # 3 evenly spaced files, one of them the corrupt one
    for field in ("top1", "top5", "n_images", "n_skipped", "gmacs", "diversity", "diversity_per_token"):
        assert row[field] == pytest.approx(clean[field], rel=1e-9), field


def test_every_registered_method_runs_at_a_matched_budget(tmp_path, tiny, sample_files):
    from analysis.registry import all_methods
    METHODS = all_methods()

    methods = tuple(m for m in ("evit", "etps", "bat", "dpc", "tome") if m in METHODS)
    settings = build_settings(methods, (1.0, 0.7), tiny, "constant")
    if "tome" in methods:
        tome = {s.keep_rate: s for s in settings if s.method == "tome"}
        assert tome[1.0].params_dict() == {"r": 0}
        assert 0 < tome[0.7].params_dict()["r"] < 20
    root = _small_layout(tmp_path, sample_files)
    outcome = run_sweep(SweepConfig(data=str(root), model=TINY, methods=methods, keep_rates=(0.7,), batch_size=5, workers=0,
                                    out=str(tmp_path / "all")), loaded=tiny, show_bar=False)
    assert {row["method"] for row in outcome.rows} == set(methods)
    dense = plan_gmacs(tiny.model, ReductionPlan())
    for row in outcome.rows:
        assert 0.5 * dense < row["gmacs"] < 0.8 * dense, row["method"]
        assert row["n_images"] == 5 and 0 <= row["top1"] <= 100
    if "tome" in methods:
        assert "r" in next(r for r in outcome.rows if r["method"] == "tome")["params"]


def test_bad_sweeps_say_why(tmp_path, tiny):
    with pytest.raises(PlanError, match="unknown method 'nosuch'"):
        build_settings(("evit", "nosuch"), (0.7,), tiny)
    with pytest.raises(SweepError, match=r"keep rate must be in \(0, 1\]"):
        build_settings(("evit",), (1.5,), tiny)
    with pytest.raises(SweepError, match="no results file"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"hello": 1}')
    with pytest.raises(SweepError, match="not a tokenscope results file"):
        load_results(tmp_path)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "analysis", "sweep", "--data", str(tmp_path / "missing"), "--model", TINY, "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr


def test_a_folder_of_unreadable_images_is_an_error(tmp_path, tiny):
    folder = tmp_path / "data" / "n01496331"
    folder.mkdir(parents=True)
    (folder / "a.JPEG").write_bytes(b"garbage")
    (folder / "b.png").write_bytes(b"")
    with pytest.raises(SweepError, match="none of the 2 images"):
        run_sweep(SweepConfig(data=str(tmp_path / "data"), model=TINY, methods=("evit",), keep_rates=(0.7,), workers=0,
                              out=str(tmp_path / "out")), loaded=tiny, show_bar=False)


def test_gmacs_come_from_the_observed_counts_without_a_dummy_forward(tmp_path, tiny, sample_files, monkeypatch):
    """The sweep takes each setting's GMACs from the token counts its own pass observed: no extra
    forward to count tokens (gmacs.token_counts would run one) and the same GMACs as counting."""
    import analysis.gmacs as gmacs

    root = _small_layout(tmp_path, sample_files)
    expected = plan_gmacs(tiny.model, ReductionPlan.make("evit", 0.7))

    counting = gmacs.token_counts

    def no_dummy_forward(model, plan, extras=None):
        assert plan.is_dense, "the sweep ran a dummy forward to count a reduced plan's tokens"
        return counting(model, plan, extras)  # the dense counts need no forward

    monkeypatch.setattr(gmacs, "token_counts", no_dummy_forward)
    outcome = run_sweep(SweepConfig(data=str(root), model=TINY, methods=("evit",), keep_rates=(0.7,), batch_size=5, workers=0,
                                    diversity_images=0, out=str(tmp_path / "out")), loaded=tiny, show_bar=False)
    assert outcome.rows[0]["gmacs"] == pytest.approx(expected, rel=1e-12)


def test_accumulators_merge_exactly(tiny, sample_files):
    """Two halves of a folder, accumulated apart and merged, give the row of the whole folder:
    counts add up exactly and means are kept as sums (diversity within float rounding)."""
    from analysis.datasets import make_loader, resolve_dataset
    from analysis.engine import run
    from analysis.models import make_transform
    from analysis.sweep import Observation, SweepContext, Tally

    files = resolve_dataset(SAMPLE_DIR).subset(24)
    config = SweepConfig(data=str(SAMPLE_DIR), model=TINY, diversity_images=12)
    context = SweepContext(config, files)
    plan = ReductionPlan.make("evit", 0.7)
    whole, first, second = Tally.create(context), Tally.create(context), Tally.create(context)
    loader = make_loader(files, make_transform(tiny.model), batch_size=6, workers=0)
    for index, batch in enumerate(loader):
        result = run(tiny.model, batch.images, plan, track=False, keep_block_outputs=True)
        observation = Observation(result, batch, 0.25, tiny.model, tiny.extras)
        for tally in (whole, first if index < 2 else second):
            for acc in tally.accumulators.values():
                acc.update(observation)
    first.merge(second)
    merged, expected = first.fields(), whole.fields()
    assert expected["n_images"] == 24 and expected["diversity_images"] == 12 and expected["timed_batches"] == 4
    for name in ("top1", "top5", "n_images", "correct1", "correct5", "seconds", "images_per_s", "timed_batches",
                 "token_counts", "diversity_images", "gmacs", "gmacs_min", "gmacs_max"):
        assert merged[name] == expected[name], name
    np.testing.assert_allclose(merged["diversity"], expected["diversity"], rtol=1e-12)
    np.testing.assert_allclose(merged["diversity_per_token"], expected["diversity_per_token"], rtol=1e-12)
    # the state survives a JSON round trip (partial.json) unchanged
    again = Tally.from_state(json.loads(json.dumps(whole.state())), context)
    assert again.fields() == whole.fields()
    assert merged["gmacs"] == pytest.approx(0.821, abs=1e-3) and merged["gmacs_std"] == pytest.approx(0.0, abs=1e-9)


def test_csv_columns_are_the_rows_csv_fields(sample_sweep):
    import dataclasses

    from analysis.sweep import SweepRow

    out, _ = sample_sweep
    assert CSV_COLUMNS == tuple(f.name for f in dataclasses.fields(SweepRow) if f.metadata.get("csv"))
    with open(out / "results.csv") as handle:
        assert tuple(next(csv.reader(handle))) == CSV_COLUMNS
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert ReductionPlan.from_record(row["plan"]).method == "evit" and row["uses_keep_rate"] is True


def test_sweep_throughput_is_flagged_when_it_cannot_be_trusted(sample_sweep, tmp_path, capsys):
    """images_per_s from 2 batches is marked indicative, in the results, the CLI and the figures'
    table; and a load average above the cores + 1 is named."""
    from analysis.cli import main
    from analysis.sweep import MIN_TIMED_BATCHES, timing_note

    _, outcome = sample_sweep  # 100 images in batches of 50: 2 timed batches per setting
    row = next(r for r in outcome.rows if r["method"] == "evit")
    assert row["timed_batches"] == 2 < MIN_TIMED_BATCHES and "indicative" in row["timing_note"]
    assert timing_note(MIN_TIMED_BATCHES, 0.0) is None
    assert "load average reached 99.0" in timing_note(10, 99.0)
    code = main(["sweep", "--data", str(SAMPLE_DIR), "--model", TINY, "--device", "cpu", "--methods", "evit", "--keep-rates", "0.7",
                 "--limit", "8", "--batch-size", "4", "--workers", "0", "--diversity-images", "0", "--out", str(tmp_path / "s"),
                 "--quiet", "--figures", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 0 and "WARNING: images/s is indicative only: it rests on 2 timed batches" in err
    assert "indicative only" in (tmp_path / "f" / "table.md").read_text()


def test_progress_moves_within_a_batch(tiny, tmp_path):
    """The Curves page's progress bar moves per setting inside a batch, not only per batch: one batch
    of 8 photos and three settings report three growing fractions before the end."""
    reports = []
    config = SweepConfig(data=str(SAMPLE_DIR), model=TINY, methods=("evit",), keep_rates=(0.9, 0.7, 0.5), limit=8, batch_size=8,
                         workers=0, out=str(tmp_path / "p"), device="cpu", diversity_images=0)
    run_sweep(config, loaded=tiny, progress=lambda fraction, text: reports.append((fraction, text)), show_bar=False)
    within = [(f, t) for f, t in reports if "settings)" in t]
    assert [round(f, 3) for f, _ in within] == [0.333, 0.667, 1.0]
    assert "EViT at keep rate 0.9 (1/3 settings)" in within[0][1]
