"""The throughput benchmark: a well-formed results.csv from the real CLI, exact agreement of the
reduced and the dense model at keep rate 1.0, and no N x N attention matrix anywhere in a benchmark.

Timings themselves are not asserted (a shared 2-core machine is far too noisy for that); the
efficiency goals are checked by running the benchmark (README, "Speed").
"""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from analysis.bench import CSV_COLUMNS, BenchConfig, make_settings, run_benchmark
from analysis.errors import PlanError
from analysis.cli import main as cli_main
from analysis.engine import run
from analysis.plan import ReductionPlan
from analysis.registry import all_methods
METHODS = all_methods()

TINY = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def cli_csv(tmp_path_factory):
    """One real `python -m analysis bench` run on DeiT-T (real weights), tiny repeat counts."""
    out = tmp_path_factory.mktemp("bench")
    code = cli_main([
        "bench", "--model", TINY, "--weights", "pretrained", "--device", "cpu", "--methods", "none,evit",
        "--keep-rates", "0.7,0.5", "--batch-sizes", "1,2", "--warmup", "1", "--repeats", "2", "--out", str(out),
    ])
    assert code == 0
    with (out / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_cli_writes_well_formed_csv(cli_csv, capsys):
    fieldnames, rows = cli_csv
    assert tuple(fieldnames) == CSV_COLUMNS
    assert fieldnames[:11] == ["model", "method", "keep_rate", "r", "batch_size", "dtype", "device",
                               "images_per_s", "latency_ms", "gmacs", "speedup_vs_dense"]
    # 2 batch sizes x (dense, evit 0.7, evit 0.5), dense first within each batch size
    assert [(int(row["batch_size"]), row["method"], float(row["keep_rate"])) for row in rows] == [
        (1, "none", 1.0), (1, "evit", 0.7), (1, "evit", 0.5), (2, "none", 1.0), (2, "evit", 0.7), (2, "evit", 0.5)]
    for row in rows:
        assert row["model"] == TINY and row["device"] == "cpu" and row["dtype"] == "float32"
        assert row["r"] == ""
        assert int(row["threads"]) == torch.get_num_threads() and int(row["repeats"]) == 2
        latency, throughput = float(row["latency_ms"]), float(row["images_per_s"])
        assert latency > 0 and math.isclose(throughput, 1000 * int(row["batch_size"]) / latency, rel_tol=1e-3)
        assert float(row["latency_ms_min"]) <= float(row["latency_ms_q1"]) <= latency <= float(row["latency_ms_q3"]) <= float(row["latency_ms_max"])
        assert float(row["speedup_vs_dense"]) > 0
    dense = [row for row in rows if row["method"] == "none"]
    assert all(float(row["speedup_vs_dense"]) == 1.0 for row in dense)
    # GMACs from analysis/gmacs.py on the real token counts: DeiT-T dense 1.3, EViT 0.7 0.8 (methods.md §8)
    assert round(float(dense[0]["gmacs"]), 1) == 1.3
    evit = {float(row["keep_rate"]): row for row in rows if row["method"] == "evit" and row["batch_size"] == "2"}
    assert round(float(evit[0.7]["gmacs"]), 1) == 0.8
    assert float(evit[0.5]["gmacs"]) < float(evit[0.7]["gmacs"]) < float(dense[0]["gmacs"])
    assert evit[0.7]["token_counts"].split()[-1] == "72" and evit[0.5]["token_counts"].split()[-1] == "28"
    # speedup is the dense median over the setting's median, from the same run
    for batch in ("1", "2"):
        base = next(float(r["latency_ms"]) for r in rows if r["batch_size"] == batch and r["method"] == "none")
        for row in (r for r in rows if r["batch_size"] == batch):
            assert math.isclose(float(row["speedup_vs_dense"]), base / float(row["latency_ms"]), rel_tol=1e-3)


def test_cli_unknown_method_is_one_line_exit_2(tmp_path, capsys):
    code = cli_main(["bench", "--model", TINY, "--weights", "random", "--methods", "none,nosuchmethod", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "nosuchmethod" in err and "unknown method" in err and "evit" in err
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("flags, word", [
    (["--batch-sizes", "0"], "batch sizes"),
    (["--batch-sizes", "a,b"], "--batch-sizes"),
    (["--repeats", "0"], "repeats"),
    (["--keep-rates", "1.5"], "keep rate"),
])
def test_cli_bad_values_are_one_line_exit_2(tmp_path, capsys, flags, word):
    code = cli_main(["bench", "--model", TINY, "--weights", "random", "--out", str(tmp_path)] + flags)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and word in err


def test_settings_dense_first_and_tome_uses_r():
    settings = make_settings(["evit", "tome"] if "tome" in METHODS else ["evit"], [0.7, 0.5], [13, 8])
    assert settings[0].method == "none" and settings[0].plan.is_dense
    assert [(s.method, s.keep_rate) for s in settings if s.method == "evit"] == [("evit", 0.7), ("evit", 0.5)]
    if "tome" in METHODS:
        tome = [s for s in settings if s.method == "tome"]
        assert [s.r for s in tome] == [13, 8] and [dict(s.plan.params)["r"] for s in tome] == [13, 8]
    with pytest.raises(PlanError, match="unknown method 'nosuchmethod'"):
        make_settings(["evit", "nosuchmethod"])


@pytest.fixture(scope="module")
def dense_result(tiny, sample_batch):
    return run(tiny.model, sample_batch, ReductionPlan(), track=False)


@pytest.mark.parametrize("method", ["evit", "etps", "bat"])
def test_keep_rate_one_equals_dense(tiny, sample_batch, dense_result, method):
    """At keep rate 1.0 the reduced model is the dense model: logits identical (real images)."""
    if method not in METHODS:
        pytest.skip(f"{method} is not registered yet")
    dense = dense_result
    reduced = run(tiny.model, sample_batch, ReductionPlan.make(method, 1.0), track=False)
    assert reduced.token_counts == dense.token_counts == [197] * 12
    assert torch.equal(reduced.logits, dense.logits)


def test_bench_forms_no_n_by_n_attention(tiny, monkeypatch):
    """Spy on every softmax entry point and on SDPA while the benchmark runs every registered
    method that runs off the shelf and does not ask for the full attention matrix: no softmax over an
    N x N (N > 1) matrix, and the attention of every block goes through the fused
    `scaled_dot_product_attention`."""
    softmax_shapes: list[tuple[int, ...]] = []
    sdpa_calls: list[tuple[int, ...]] = []

    def spy(original, record):
        def wrapper(tensor, *args, **kwargs):
            record.append(tuple(tensor.shape))
            return original(tensor, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "softmax", spy(torch.softmax, softmax_shapes))
    monkeypatch.setattr(torch.Tensor, "softmax", spy(torch.Tensor.softmax, softmax_shapes))
    monkeypatch.setattr(F, "softmax", spy(F.softmax, softmax_shapes))
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy(F.scaled_dot_product_attention, sdpa_calls))
    # a method that asks for the full attention (needs "attention", transform_attention) forms it by design
    runnable = [name for name, method in METHODS.items() if method.unavailable_reason(tiny.extras) is None
                and "attention" not in method.needs and getattr(method, "transform_attention", None) is None]
    settings = make_settings(runnable, [0.7], [13])
    rows = run_benchmark(tiny, settings, BenchConfig(batch_sizes=(2,), warmup=0, repeats=1))
    assert len(rows) == len(settings)
    reducing = [s for s in settings if s.method != "none"]
    assert softmax_shapes, "the class-attention row goes through softmax; the spy saw nothing"
    square = [shape for shape in softmax_shapes if len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] > 1]
    assert square == []
    # one timed forward per setting plus one token-count forward (GMACs) per reduced setting
    # (the dense counts need none), 12 blocks each: all attention goes through SDPA
    assert len(sdpa_calls) == 12 * (len(settings) + len(reducing))
    assert all(shape[-2] > 1 for shape in sdpa_calls)
    assert reducing


def test_contention_note_flags_a_loaded_machine(tiny):
    """The warning appears only when the load average during timing exceeded the cores (+1)."""
    import dataclasses
    import os

    from analysis.bench import contention_note

    rows = run_benchmark(tiny, make_settings([]), BenchConfig(batch_sizes=(1,), warmup=0, repeats=1))
    assert [row.method for row in rows] == ["none"] and rows[0].samples_ms and rows[0].speedup_vs_dense == 1.0
    cores = os.cpu_count() or 1
    quiet = [dataclasses.replace(rows[0], load_average=float(cores))]
    busy = [dataclasses.replace(rows[0], load_average=float(cores) + 3.0)]
    assert contention_note(quiet) is None
    note = contention_note(busy)
    assert note is not None and f"{cores + 3.0:.1f}" in note and "idle machine" in note


def test_steady_allocator_removes_page_faults_in_a_subprocess():
    """`--allocator steady` (glibc mallopt): after warm-up a DeiT-T batch-8 forward takes almost no
    page faults. Run in a child process because the setting is process-wide and irreversible."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import resource, torch
        from analysis.bench import random_images, use_steady_allocator
        from analysis.engine import run
        from analysis.plan import ReductionPlan
        from analysis.models import load_model
        model = load_model("deit_tiny_patch16_224", "random", "cpu").model
        # batch 64: the 64 x 197 x 768 float32 MLP activations (38.7 MB) exceed glibc's largest
        # mmap threshold (32 MB), so the system allocator maps fresh pages for them on every forward
        images = random_images(model, 64, "cpu")
        def faults():
            for _ in range(2):
                run(model, images, ReductionPlan(), track=False)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            run(model, images, ReductionPlan(), track=False)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        system = faults()
        assert use_steady_allocator()
        print("FAULTS", system, faults())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    line = [row for row in done.stdout.splitlines() if row.startswith("FAULTS")][-1]
    system, steady = map(int, line.split()[1:])
    assert steady < 1000 and steady < system / 5, (system, steady, done.stdout[-500:])


def test_token_count_twin_without_cuts_is_the_dense_model(tiny, sample_batch, dense_result):
    """With every count at 197 the twin runs exactly the dense blocks (real weights, real photos)."""
    from analysis.engine import run_token_count_twin

    logits = run_token_count_twin(tiny.model, sample_batch, [197] * 12)
    assert torch.equal(logits, dense_result.logits)


def test_token_count_twin_follows_the_counts_where_the_method_cuts(tiny, sample_batch, monkeypatch):
    """The twin's blocks see the method's token counts: inside-acting methods cut after the
    attention of the reducing block (its MLP already runs short), before-acting ones cut its input."""
    import analysis.engine as engine

    seen: list[int] = []
    original = engine._attention

    def spy(block, x, *args, **kwargs):
        seen.append(x.shape[1])
        return original(block, x, *args, **kwargs)

    monkeypatch.setattr(engine, "_attention", spy)
    evit = run(tiny.model, sample_batch, ReductionPlan.make("evit", 0.7), track=False)
    evit_attention = list(seen)
    seen.clear()
    engine.run_token_count_twin(tiny.model, sample_batch, evit.token_counts, "inside")
    assert seen == evit_attention == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    seen.clear()
    engine.run_token_count_twin(tiny.model, sample_batch, evit.token_counts, "before")
    assert seen == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    with pytest.raises(engine.PlanError, match="one token count per block"):
        engine.run_token_count_twin(tiny.model, sample_batch, [197] * 11)
    with pytest.raises(engine.PlanError, match="acts must be 'inside' or 'before'"):
        engine.run_token_count_twin(tiny.model, sample_batch, evit.token_counts, "Before")
    with pytest.raises(engine.PlanError, match="must not grow"):
        engine.run_token_count_twin(tiny.model, sample_batch, [100] + [150] * 11)


def test_bound_adds_the_twin_columns(tiny, capsys, tmp_path):
    """`--bound` fills speedup_bound and method_overhead_pct for reduced rows, consistently with
    the latencies, and leaves them empty for the dense row."""
    code = cli_main(["bench", "--model", TINY, "--weights", "pretrained", "--device", "cpu", "--methods", "none,tome",
                     "--r", "13", "--batch-sizes", "2", "--warmup", "0", "--repeats", "2", "--bound", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "token-count bound" in out and "method overhead" in out
    with (tmp_path / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    dense, tome = rows
    assert dense["speedup_bound"] == dense["method_overhead_pct"] == dense["bound_latency_ms"] == ""
    bound = float(tome["bound_latency_ms"])
    assert bound > 0
    assert math.isclose(float(tome["speedup_bound"]), float(dense["latency_ms"]) / bound, rel_tol=1e-3)
    assert math.isclose(float(tome["method_overhead_pct"]), 100 * (float(tome["latency_ms"]) / bound - 1), rel_tol=1e-3, abs_tol=0.01)


def test_methods_without_a_keep_rate_meet_each_budget_unless_r_is_given():
    """Without --r, ToMe runs at each keep rate's token budget (its r from Method.budget); with --r, at
    those r; keep-rate methods run at their keep rates either way."""
    budget = make_settings(["evit", "tome"], [0.7, 0.5])
    tome = [s for s in budget if s.method == "tome"]
    assert [s.keep_rate for s in tome] == [0.7, 0.5] and all(s.r is None for s in tome)
    assert [dict(s.plan.params)["r"] for s in tome] == [11, 16]  # the constant r nearest each budget (DeiT, 197 tokens)
    fixed = make_settings(["evit", "tome"], [0.7], [13])
    assert [(s.method, s.r) for s in fixed] == [("none", None), ("evit", None), ("tome", 13)]
