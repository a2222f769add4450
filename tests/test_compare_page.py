"""The Compare page through Streamlit's AppTest, on the results of a small `sweep --patterns`."""
from __future__ import annotations

from conftest import open_page

from test_patterns import pattern_sweep  # noqa: F401  (the session's --patterns sweep)


def test_compare_page_draws_every_chart_and_offers_downloads(pattern_sweep):  # noqa: F811
    out, outcome, methods = pattern_sweep
    at = open_page("pages/3_Compare.py", timeout=600)
    assert at.title[0].value == "Compare"
    assert not at.get("plotly_chart")
    at.text_input(key="compare_path").set_value(str(out))
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    charts = at.get("plotly_chart")
    reduced = len(methods) - 1
    # one keep-frequency chart per method, the agreement matrices, map similarity, fidelity, CKA, correlation
    assert len(charts) >= reduced + 1 + 4, len(charts)
    assert len(at.get("download_button")) >= len(charts)
    assert len(at.dataframe) == 2  # agreement pairs, correlation table
    at.selectbox(key="compare_metric").set_value("EMD")
    at.run()
    assert not at.exception, at.exception


def test_compare_page_explains_results_without_patterns(tmp_path):
    import json

    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "rows": [
        {"model": "deit_tiny_patch16_224", "method": "none", "keep_rate": 1.0, "top1": 80.0, "gmacs": 1.3}]}))
    at = open_page("pages/3_Compare.py", timeout=120)
    at.text_input(key="compare_path").set_value(str(tmp_path))
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "--patterns" in at.error[0].value
