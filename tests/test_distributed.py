"""A sweep on two gloo processes gives the results of one process (issue: scale out).

Real DeiT-Tiny weights, part of the shared sample plus one unreadable file, so the skipped count and
its reason travel through the merge too."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from conftest import ROOT, SAMPLE_DIR

# Row fields that are measurements of time or of the machine, not results.
TIMING = {"images_per_s", "seconds", "timed_batches", "load_average_max", "timing_note"}
ARGS = ["--model", "deit_tiny_patch16_224", "--methods", "none,evit,tome", "--keep-rates", "0.7",
        "--batch-size", "2", "--workers", "0", "--diversity-images", "5", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """9 sample photos and one unreadable file: 5 batches of 2 (one short of the bad file)."""
    root = tmp_path_factory.mktemp("dist") / "val"
    photos = sorted(SAMPLE_DIR.glob("*/*.JPEG"))[::11][:9]
    for photo in photos:
        (root / photo.parent.name).mkdir(parents=True, exist_ok=True)
        (root / photo.parent.name / photo.name).symlink_to(photo)
    (root / photos[4].parent.name / "broken.JPEG").write_text("not a jpeg")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENSCOPE_DEFAULT_THREADS": "1"}


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


def assert_same_results(one: Path, many: Path) -> None:
    rows_one, rows_many = read_rows(one), read_rows(many)
    assert len(rows_one) == len(rows_many) == 3
    for a, b in zip(rows_one, rows_many):
        assert a["n_images"] == b["n_images"] == "9" and a["n_skipped"] == b["n_skipped"] == "1"
        for name in a.keys() - TIMING:
            try:
                x, y = float(a[name]), float(b[name])
            except ValueError:
                assert a[name] == b[name], name
                continue
            assert x == pytest.approx(y, rel=1e-5, abs=1e-6), name
    import json

    one_json, many_json = (json.loads((path / "results.json").read_text()) for path in (one, many))
    assert many_json["config"]["processes"] == 2 and one_json["config"]["processes"] == 1
    for a, b in zip(one_json["rows"], many_json["rows"]):
        assert (a["correct1"], a["correct5"], a["n_images"]) == (b["correct1"], b["correct5"], b["n_images"])
        assert a["skipped_files"] == b["skipped_files"] and "broken.JPEG" in a["skipped_files"][0]
        assert a["token_counts"] == b["token_counts"]
        assert a["diversity"] == pytest.approx(b["diversity"], rel=1e-5) and len(a["diversity"]) == 12


@pytest.fixture(scope="module")
def one(folder) -> Path:
    """The same sweep in one process (the reference)."""
    out = folder.parent / "one"
    single = subprocess.run([sys.executable, "-m", "analysis", "sweep", "--data", str(folder), "--out", str(out), *ARGS],
                            cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    return out


def test_torchrun_two_processes_equal_one(folder, one, tmp_path):
    """`torchrun --nproc_per_node 2 -m analysis sweep` writes the results of one process."""
    many = tmp_path / "many"
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                               "-m", "analysis", "sweep", "--data", str(folder), "--out", str(many), *ARGS],
                              cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count("settings run") == 1, "rank 0 alone reports"
    assert not list(many.glob("partial*")), "the resume files are removed once the results are written"
    assert_same_results(one, many)


class Interrupted(Exception):
    pass


def _worker(rank: int, port: int, folder: str, out: str, stop_after: dict[int, int]) -> None:
    """One gloo process of a sweep; rank r stops (as if killed) after `stop_after[r]` batches."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    from analysis.distributed import World
    from analysis.models import load_model
    from analysis.sweep import SweepConfig, run_sweep

    world = World.from_env("cpu")
    loaded = load_model("deit_tiny_patch16_224", "pretrained", "cpu")
    config = SweepConfig(data=folder, model="deit_tiny_patch16_224", methods=("none", "evit", "tome"), keep_rates=(0.7,),
                         batch_size=2, workers=0, out=out, diversity_images=5, checkpoint_every=1)
    ends = {"n": 0}

    def progress(fraction: float, message: str) -> None:
        if " images, " in message:  # the end of one of this process's batches
            ends["n"] += 1
            if ends["n"] == stop_after.get(rank, -1):
                raise Interrupted

    try:
        run_sweep(config, loaded, progress=progress, show_bar=False, world=world)
    except Interrupted:
        pass  # the process dies here; its resume file holds the batches it counted
    finally:
        world.close()
    (Path(out).parent / f"batches{rank}").write_text(str(ends["n"]))


def test_resume_after_every_process_stopped_at_its_own_batch(folder, one, tmp_path):
    """torchrun stops every process when one fails, each at its own batch: rank 1 after 1 batch,
    rank 0 after 2. The next launch resumes each from its own file and the results equal one process's."""
    many = tmp_path / "many"
    mp.start_processes(_worker, args=(free_port(), str(folder), str(many), {0: 2, 1: 1}), nprocs=2, start_method="spawn")
    assert sorted(p.name for p in many.glob("partial*")) == ["partial.rank0of2.json", "partial.rank1of2.json"]
    assert not (many / "results.json").exists()
    mp.start_processes(_worker, args=(free_port(), str(folder), str(many), {}), nprocs=2, start_method="spawn")
    assert not list(many.glob("partial*"))
    # 5 batches: rank 0 owns 0, 2, 4 and had counted 2; rank 1 owns 1, 3 and had counted 1
    assert [(tmp_path / f"batches{rank}").read_text() for rank in (0, 1)] == ["1", "1"]
    assert_same_results(one, many)
