"""`python -m analysis inspect`: JSON shape, dense accuracy on the ImageNet sample, bad input (issue 2)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.cli import main
from analysis.models import imagenet_wnids

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "deit_tiny_patch16_224", "--device", "cpu"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_shape(capsys, sample_files):
    files = [str(path) for path in sample_files[:2]]
    code, out, err = run_cli(capsys, "inspect", *files, *TINY, "--method", "evit", "--keep-rate", "0.7", "--json")
    assert code == 0, err
    records = json.loads(out)
    assert [record["file"] for record in records] == files
    for record in records:
        assert record["model"] == "deit_tiny_patch16_224" and record["weights"] == "pretrained"
        assert record["method"] == "evit" and record["device"] == "cpu"
        assert record["params"] == {"keep_rate": 0.7, "layers": [4, 7, 10], "fuse": True}
        assert record["token_counts"] == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
        assert [stage["layer"] for stage in record["stages"]] == [4, 7, 10]
        for stage in record["stages"]:
            assert len(stage["patch_to_token"]) == 196
            n = len(stage["token_kinds"])
            assert len(stage["token_sizes"]) == n and stage["token_kinds"][0] == "cls"
            assert sum(stage["token_sizes"]) + stage["patch_to_token"].count(-1) == 196
            assert all(-1 <= t < n and t != 0 for t in stage["patch_to_token"])
        for key in ("top5", "dense_top5"):
            assert len(record[key]) == 5
            assert {"index", "label", "prob"} <= set(record[key][0])
            probs = [p["prob"] for p in record[key]]
            assert probs == sorted(probs, reverse=True)
        assert len(record["diversity"]) == 12 and all(value > 0 for value in record["diversity"])
        assert round(record["gmacs"], 1) == 0.8 and round(record["dense_gmacs"], 1) == 1.3
    # the robin photo is a robin for the dense model
    assert records[1]["dense_top5"][0]["index"] == imagenet_wnids().index("n01558993")


def test_no_fuse_and_readable_summary(capsys, sample_files):
    code, out, _ = run_cli(capsys, "inspect", str(sample_files[0]), *TINY, "--no-fuse", "--json")
    assert code == 0
    record = json.loads(out)[0]
    assert record["token_counts"][-1] == 69 and record["params"]["fuse"] is False
    code, out, _ = run_cli(capsys, "inspect", str(sample_files[0]), *TINY)
    assert code == 0 and "tokens per block: 197" in out and "dense top-3" in out


def test_random_weights_are_labelled_in_json(capsys, sample_files):
    code, out, _ = run_cli(capsys, "inspect", str(sample_files[0]), *TINY, "--weights", "random", "--json")
    assert code == 0 and json.loads(out)[0]["weights"].startswith("random")
    # DeiT-S is not shipped: random weights still give its published GMACs (EViT, methods.md §2)
    code, out, _ = run_cli(capsys, "inspect", str(sample_files[0]), "--model", "deit_small_patch16_224",
                           "--device", "cpu", "--weights", "random", "--json")
    record = json.loads(out)[0]
    assert code == 0 and round(record["gmacs"], 1) == 3.0 and round(record["dense_gmacs"], 1) == 4.6


def test_dense_top1_on_the_imagenet_sample(capsys, sample_files):
    """Top-1 of the dense DeiT-T over the 100 sample photos, through the CLI, labels from WordNet ids."""
    wnids = imagenet_wnids()
    code, out, err = run_cli(capsys, "inspect", *map(str, sample_files), *TINY, "--method", "none", "--json")
    assert code == 0, err
    records = json.loads(out)
    assert len(records) == 100
    hits = sum(r["dense_top5"][0]["index"] == wnids.index(Path(r["file"]).parent.name) for r in records)
    assert records[0]["stages"] == [] and records[0]["top5"] == records[0]["dense_top5"]
    print(f"dense DeiT-T top-1 on the sample: {hits}%")
    assert hits >= 75


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jpg"], "no such file"),
        (["{empty}"], "empty"),
        (["{text}"], "not an image"),
        (["{photo}", "--keep-rate", "0"], "keep rate"),
        (["{photo}", "--keep-rate", "1.5"], "keep rate"),
        (["{photo}", "--layers", "4,4,7"], "repeat"),
        (["{photo}", "--layers", "3,13"], "out of range"),
        (["{photo}", "--layers", "four"], "--layers must be comma-separated block numbers such as 4,7,10, got 'four'"),
        (["{photo}", "--method", "tome", "--r", "1 3"], "r must be comma-separated integers such as 13 or 16,16,8, got '1 3'"),
        (["{photo}", "--weights", "{wrong}"], "does not fit"),
        (["{photo}", "--method", "nosuch"], "unknown method"),
        (["{photo}", "--crop-pct", "2"], "crop_pct"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, sample_files, capsys, args, message):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    import torch

    torch.save({"head.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    values = {"empty": tmp_path / "empty.jpg", "text": tmp_path / "text.jpg", "photo": sample_files[0], "wrong": tmp_path / "wrong.pth"}
    argv = [a.format(**values) for a in args]
    code, out, err = run_cli(capsys, "inspect", *argv, *TINY)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]


def test_the_real_process_exits_2_without_traceback(tmp_path):
    """The same path through a real `python -m analysis` process."""
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", "inspect", str(tmp_path / "missing.jpg"), *TINY],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.jpg'}: no such file"]


def test_shared_parameter_names_stay_unambiguous(capsys, sample_files, tmp_path):
    """BAT and DPC-kNN both take `weighting`, with different defaults: `-h` shows each default, the
    bare flag applies to the one chosen method, the qualified flags always work, and a sweep of
    both refuses the bare flag with the qualified names."""
    code = None
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "-h"])
    code = exit_info.value.code
    out = capsys.readouterr().out
    assert code == 0
    assert "BAT (reconstructed): default attention; DPC-kNN (diversity only): default size" in " ".join(out.split())
    assert "--bat-weighting" in out and "--dpc-weighting" in out
    image = str(sample_files[0])
    for flags, want in ((["--method", "dpc", "--weighting", "attention"], "attention"), (["--method", "dpc"], "size"),
                        (["--method", "dpc", "--dpc-weighting", "attention"], "attention"),
                        (["--method", "bat", "--weighting", "size"], "size"), (["--method", "bat"], "attention")):
        code, out, err = run_cli(capsys, "inspect", image, *TINY, *flags, "--json")
        assert code == 0, err
        assert json.loads(out)[0]["params"]["weighting"] == want, flags
    code, out, err = run_cli(capsys, "sweep", "--data", str(tmp_path), *TINY, "--methods", "bat,dpc", "--weighting", "size",
                             "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "--weighting is ambiguous" in err and "--bat-weighting" in err, err
    code, out, err = run_cli(capsys, "inspect", image, *TINY, "--method", "dpc", "--weighting", "nonsense")
    assert code == 2 and "--weighting" in err and "nonsense" in err


def test_tome_json_has_no_keep_rate_and_says_when_r_is_capped(capsys, sample_files):
    """ToMe has no keep rate: its JSON params say null; an r above half the tokens is capped, and the
    stage records say so (caption and JSON note)."""
    image = str(sample_files[0])
    code, out, err = run_cli(capsys, "inspect", image, *TINY, "--method", "tome", "--r", "200", "--json")
    assert code == 0, err
    record = json.loads(out)[0]
    assert record["params"]["keep_rate"] is None and record["params"]["r"] == 200
    assert record["stages"][0]["note"].startswith("r=200 capped at 98")
    assert record["token_counts"][:2] == [99, 50]
    code, out, err = run_cli(capsys, "inspect", image, *TINY, "--method", "tome", "--json")
    assert all("note" not in stage for stage in json.loads(out)[0]["stages"])  # r = 13 never hits the cap at 224 px
    code, out, err = run_cli(capsys, "inspect", image, *TINY, "--method", "evit", "--layers", "10,7,4", "--json")
    assert json.loads(out)[0]["params"]["layers"] == [4, 7, 10]
