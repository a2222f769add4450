"""Several values of one method parameter in a sweep (`--seed 0,1,2`): one setting per value, and
the figures and table show the mean over a seed-like (`ParamSpec.averaged`) parameter."""
from __future__ import annotations

import argparse
import json

import pytest

from analysis.cli.common import add_method_param_args, method_params_from_args
from analysis.errors import PlanError
from analysis.figures import average_repeats, write_figures
from analysis.sweep import SweepConfig, build_settings, run_sweep, user_variants
from analysis.registry import get_method
from conftest import SAMPLE_DIR, TINY


def _args(argv):
    parser = argparse.ArgumentParser()
    add_method_param_args(parser)
    return parser.parse_args(argv)


def test_a_comma_list_is_several_values_only_when_asked():
    args = _args(["--rand-seed", "0,1,2", "--tome-r", "13,12"])
    assert method_params_from_args(args, "rand", many=True) == {"seed": [0, 1, 2]}
    assert method_params_from_args(args, "tome", many=True) == {"r": (13, 12)}  # an int_list stays one value
    with pytest.raises(PlanError, match="seed must be a number"):
        method_params_from_args(args, "rand")  # inspect / bench: one value
    with pytest.raises(PlanError, match="--rand-seed: seed must be at least 0"):
        method_params_from_args(_args(["--rand-seed", "0,-1"]), "rand", many=True)
    assert method_params_from_args(_args(["--rand-seed", "4"]), "rand", many=True) == {"seed": 4}


def test_user_variants_are_every_combination():
    bat = get_method("bat")
    tome = get_method("tome")
    assert user_variants(bat, {}) == [{}]
    assert user_variants(tome, {"r": [13, 12]}) == [{"r": [13, 12]}]  # a list parameter's list is one value
    name = next(spec.name for spec in bat.params if spec.kind == "float")
    variants = user_variants(bat, {name: [0.3, 0.5], "other": 1})
    assert variants == [{name: 0.3, "other": 1}, {name: 0.5, "other": 1}]


def test_build_settings_runs_one_setting_per_seed(tiny):
    settings = build_settings(("none", "rand"), (0.7, 0.5), tiny, method_params={"rand": {"seed": [0, 1, 2]}})
    reduced = [s for s in settings if s.method == "rand"]
    assert [(s.keep_rate, s.params_dict()["seed"]) for s in reduced] == [(0.7, 0), (0.5, 0), (0.7, 1), (0.5, 1), (0.7, 2), (0.5, 2)]
    assert len({s.plan for s in reduced}) == 6


def test_average_repeats_means_numbers_and_lists():
    rows = [
        {"model": "m", "method": "rand", "keep_rate": 0.7, "params": {"seed": seed}, "label": "Random", "top1": top1,
         "gmacs": 0.8, "diversity": [1.0, d], "n_images": 8, "device": "cpu"}
        for seed, top1, d in ((0, 60.0, 2.0), (1, 62.0, 4.0), (2, 67.0, 6.0))
    ] + [{"model": "m", "method": "rand", "keep_rate": 0.5, "params": {"seed": 0}, "label": "Random", "top1": 40.0, "gmacs": 0.6,
          "diversity": [1.0, 1.0], "n_images": 8, "device": "cpu"},
         {"model": "m", "method": "evit", "keep_rate": 0.7, "params": {"fuse": False}, "label": "EViT", "top1": 70.0, "gmacs": 0.8,
          "diversity": [], "n_images": 8, "device": "cpu"},
         {"model": "m", "method": "evit", "keep_rate": 0.7, "params": {"fuse": True}, "label": "EViT", "top1": 71.0, "gmacs": 0.8,
          "diversity": [], "n_images": 8, "device": "cpu"}]
    out = average_repeats(rows)
    assert len(out) == 4
    mean = out[0]
    assert mean["top1"] == pytest.approx(63.0) and mean["diversity"] == [1.0, 4.0] and mean["gmacs"] == pytest.approx(0.8)
    assert mean["params"] == {"seed": [0, 1, 2]} and mean["label"] == "Random (mean of 3)" and mean["n_repeats"] == 3
    assert mean["device"] == "cpu" and mean["n_images"] == 8
    assert out[1:] == rows[3:]  # a single seed, and parameters that are not averaged, stay as they are


def test_cli_sweep_with_three_seeds_and_their_mean_in_the_table(tmp_path):
    from analysis.cli import main

    out = tmp_path / "sweep"
    code = main(["sweep", "--data", str(SAMPLE_DIR), "--model", TINY, "--device", "cpu", "--methods", "rand", "--keep-rates", "0.5",
                 "--rand-seed", "0,1,2", "--limit", "4", "--batch-size", "4", "--workers", "0", "--diversity-images", "0",
                 "--out", str(out), "--quiet"])
    assert code == 0
    content = json.loads((out / "results.json").read_text())
    rows = content["rows"]
    assert sorted(row["params"]["seed"] for row in rows) == [0, 1, 2]
    assert len({tuple(row["token_counts"]) for row in rows}) == 1
    figures = write_figures(content, tmp_path / "figures", images=[sorted(SAMPLE_DIR.glob("*/*.JPEG"))[0]], n_images=1)
    assert "table" not in figures["skipped"]
    table = (tmp_path / "figures" / "table.csv").read_text().splitlines()
    assert len(table) == 2 and "Random (mean of 3)" in table[1] and "seed=[0, 1, 2]" in table[1]
    mean_top1 = sum(row["top1"] for row in rows) / 3
    assert f"{mean_top1:.2f}" in table[1]
