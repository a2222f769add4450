"""A method from outside the package works like a built-in one (issue: "Methods from outside the
package"): the worked example `examples/random_projection_pruning.py`, loaded as a plugin file, by
`TOKENSCOPE_PLUGINS` and through a `tokenscope.methods` entry point, runs in inspect (and its JSON),
the sweep at a keep-rate budget, bench (with the token-count bound), GMACs (equal to the flop
counter), the figures and the app's method list and comparison row, with no other file changed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from analysis import registry
from analysis.errors import PluginError
from analysis.plan import ReductionPlan

from conftest import ROOT, SAMPLE_DIR, TINY

PLUGIN = ROOT / "examples" / "random_projection_pruning.py"
NAME = "random_projection"
ASSET = str(ROOT / "assets" / "cat.jpg")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


def _cli(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, timeout=600,
                          cwd=str(cwd), env=env or _env())


@pytest.fixture()
def plugin():
    """The example plugin, registered for one test and removed afterwards."""
    added = registry.load_plugin(PLUGIN)
    assert added == [NAME]
    yield registry.get_method(NAME)
    registry.unregister(NAME)
    assert NAME not in registry.all_methods()


def test_plugin_file_runs_through_inspect_json():
    done = _cli("--plugin", str(PLUGIN), "inspect", ASSET, "--model", TINY, "--method", NAME, "--keep-rate", "0.5",
                "--seed", "3", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)[0]
    assert record["method"] == NAME and record["params"]["seed"] == 3 and record["params"]["layers"] == [4, 7, 10]
    # ceil(0.5 n): 197 -> 99 -> 50 -> 26 tokens, every dropped patch discarded (-1)
    assert record["token_counts"][-1] == 26 and [len(s["token_kinds"]) for s in record["stages"]] == [99, 50, 26]
    assert record["stages"][-1]["patch_to_token"].count(-1) == 196 - 25
    assert 0 < record["gmacs"] < record["dense_gmacs"]


def test_plugin_flags_in_help_and_qualified():
    done = _cli("--plugin", str(PLUGIN), "inspect", "-h")
    assert done.returncode == 0 and "--random-projection-seed" in done.stdout and "plugin example" in done.stdout


def test_plugin_from_the_environment_and_a_bad_plugin_is_one_line(tmp_path):
    done = _cli("inspect", ASSET, "--model", TINY, "--method", NAME, "--json", env=_env(TOKENSCOPE_PLUGINS=str(PLUGIN)))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["token_counts"][-1] == 69
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    for args in (("--plugin", str(broken), "inspect", ASSET), ("--plugin", str(tmp_path / "missing.py"), "inspect", ASSET)):
        done = _cli(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "plugin" in done.stderr, done.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    done = _cli("--plugin", str(empty), "inspect", ASSET)
    assert done.returncode == 2 and "registered no method" in done.stderr


def test_plugin_through_an_entry_point(tmp_path):
    """An installed distribution declaring `[tokenscope.methods]` in its entry points is found with no flag."""
    package = tmp_path / "tokenscope_example_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(PLUGIN.read_text())
    info = tmp_path / "tokenscope_example_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenscope-example-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tokenscope.methods]\nrandom_projection = tokenscope_example_plugin\n")
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    done = _cli("inspect", ASSET, "--model", TINY, "--method", NAME, "--keep-rate", "0.6", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["token_counts"][-1] == 1 + 43  # ceil(.6 196)=118, ceil(.6 118)=71, ceil(.6 71)=43
    script = textwrap.dedent("""
        from analysis.registry import origin
        print(origin("random_projection"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert done.stdout.strip().startswith("entry point random_projection"), done.stderr


def test_plugin_in_sweep_bench_gmacs_and_figures(plugin, tiny, tmp_path):
    from analysis.bench import BenchConfig, make_settings, run_benchmark
    from analysis.engine import run
    from analysis.figures import write_figures
    from analysis.gmacs import flop_counter, plan_macs
    from analysis.sweep import SweepConfig, run_sweep
    from viz.palette import method_colour

    # the sweep meets each keep rate's budget through Method.budget (a keep-rate method: itself)
    config = SweepConfig(data=str(SAMPLE_DIR), model=TINY, methods=("none", NAME), keep_rates=(0.7, 0.5), limit=10, batch_size=10,
                         workers=0, out=str(tmp_path / "sweep"), device="cpu", diversity_images=4)
    outcome = run_sweep(config, loaded=tiny, show_bar=False)
    rows = {row["keep_rate"]: row for row in outcome.rows if row["method"] == NAME}
    assert sorted(rows) == [0.5, 0.7] and rows[0.7]["token_counts"][-1] == 69 and rows[0.5]["token_counts"][-1] == 26
    assert rows[0.7]["label"] == plugin.label and rows[0.7]["n_images"] == 10 and rows[0.5]["gmacs"] < rows[0.7]["gmacs"]

    # GMACs: the plugin's own_macs joins the count, and the matrix products equal the flop counter
    plan = ReductionPlan.make(NAME, 0.7)
    ours = plan_macs(tiny.model, plan)
    assert sum(block.method_matmul for block in ours.blocks) == pytest.approx((196 + 138 + 97) * 192)  # n C for n = 196, 138, 97 non-cls tokens
    counter = flop_counter()
    with counter:
        run(tiny.model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)), plan, track=False)
    assert ours.matmul == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)

    # bench, with the token-count bound
    settings = make_settings(["none", NAME], [0.7], [13])
    bench = run_benchmark(tiny, settings, BenchConfig(batch_sizes=(2,), warmup=0, repeats=1, bound=True))
    assert [row.method for row in bench] == ["none", NAME] and bench[1].speedup_bound is not None

    # figures: its own colour, a column in the comparison grid
    written = write_figures(outcome.out, tmp_path / "figures", images=[ASSET], n_images=1, loaded=tiny)
    assert "grid" not in written["skipped"]
    colour = method_colour(NAME)
    others = {method_colour(name) for name in registry.all_methods() if name != NAME}
    assert colour not in others and colour in (tmp_path / "figures" / "accuracy.svg").read_text().lower()


def test_plugin_in_the_app(tmp_path):
    """The app reads TOKENSCOPE_PLUGINS: the method is in the sidebar's list, runs in its tab, and joins
    the comparison row it declared (run in a subprocess so the test session's registry stays as it is)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conftest  # the offline weights
        os.environ["TOKENSCOPE_PLUGINS"] = {str(PLUGIN)!r}
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(ROOT / "app.py")!r}, default_timeout=300)
        at.query_params["method"] = ["{NAME}"]
        at.run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]
        options = at.sidebar.multiselect(key="methods").options
        assert "Random projection (plugin example)" in options, options
        assert at.sidebar.multiselect(key="methods").value == ["{NAME}"]
        tabs = [tab.label for tab in at.tabs]
        assert "Random projection (plugin example)" in tabs, tabs
        from test_app import open_all_rows
        open_all_rows(at)  # the comparison rows are drawn only once opened
        assert not at.exception, at.exception
        captions = [img.caption for element in at.get("image") for img in element.proto.imgs]
        assert sum("layer" in (c or "") for c in captions) >= 3, captions
        assert any("plugin: random projection" in (c or "") and "EViT" in (c or "") for c in captions), captions
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout[-2000:] + done.stderr[-3000:]


def test_registry_refuses_clashes():
    from analysis.methods.base import Method

    class Clash(Method):
        name = "evit"

    with pytest.raises(PluginError, match="already registered"):
        registry.register(Clash)

    class Nameless(Method):
        name = "Bad Name"

    with pytest.raises(PluginError, match="lower-case identifier"):
        registry.register(Nameless)
    with pytest.raises(Exception, match="built-in"):
        registry.unregister("evit")
