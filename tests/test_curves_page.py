"""The Curves page through Streamlit's AppTest: loading the real sample sweep's results, a bad
path, running a small sweep from the page, and preparing the figures download."""
from __future__ import annotations

import json

from conftest import open_page

from test_sweep import sample_sweep  # noqa: F401  (the session's sweep; reruns resume instantly)

def _page():
    return open_page("pages/1_Curves.py", timeout=240)


def test_loads_a_results_file_and_draws_everything(sample_sweep):  # noqa: F811
    at = _page()
    assert at.title[0].value == "Curves"
    assert not at.get("plotly_chart")
    at.text_input(key="curves_path").set_value(str(sample_sweep[0] / "results.json"))
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    charts = at.get("plotly_chart")
    assert len(charts) == 3  # top-1 vs keep rate, top-1 vs GMACs, diversity per layer
    frame = at.dataframe[0].value
    assert list(frame["keep_rate"]) == [1.0, 0.7, 0.5]
    rows = {row["keep_rate"]: row for row in sample_sweep[1].rows}
    assert list(frame["top1"]) == [rows[k]["top1"] for k in (1.0, 0.7, 0.5)]
    at.button(key="curves_figures").click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    assert len(at.get("download_button")) == 1


def test_bad_path_says_what_to_do(tmp_path):
    at = _page()
    at.text_input(key="curves_path").set_value(str(tmp_path / "nothing-here"))
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "no results file" in at.error[0].value
    (tmp_path / "results.json").write_text("[1, 2, 3]")
    at.text_input(key="curves_path").set_value(str(tmp_path))
    at.run()
    assert "not a tokenscope results file" in at.error[0].value


def test_runs_a_small_sweep_from_the_page(tmp_path, sample_files):
    data = tmp_path / "data"
    for path in sample_files[::25]:
        (data / path.parent.name).mkdir(parents=True, exist_ok=True)
        (data / path.parent.name / path.name).symlink_to(path)
    at = _page()
    at.radio(key="curves_source").set_value("Run a sweep on a folder")
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_name").value == "deit_tiny_patch16_224"  # the cached weights
    at.text_input(key="curves_data").set_value(str(data))
    at.text_input(key="curves_out").set_value(str(tmp_path / "out"))
    at.multiselect(key="curves_methods").set_value(["evit"])
    at.multiselect(key="curves_keep_rates").set_value([1.0, 0.5])
    at.radio(key="curves_centre").set_value("median")
    at.checkbox(key="curves_size_weighted").check()
    at.run()
    at.button(key="curves_run").click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    assert "2 settings run" in at.success[0].value
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {(row["diversity_centre"], row["diversity_size_weighted"]) for row in rows} == {("median", True)}
    assert len(at.dataframe[0].value) == 2 and len(at.get("plotly_chart")) == 3
    # a folder that is not a dataset: an error saying why, no traceback
    at.text_input(key="curves_data").set_value(str(tmp_path / "missing"))
    at.run()
    at.button(key="curves_run").click()
    at.run()
    assert not at.exception
    assert "does not exist" in at.error[0].value
