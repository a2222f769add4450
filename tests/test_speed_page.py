"""The Speed page through Streamlit's AppTest: it opens on DeiT-T (the cached weights), runs a tiny
benchmark and shows the table (dense row speedup 1) and the speedup-vs-GMACs chart, without errors."""
from __future__ import annotations


from conftest import open_page

def _page():
    return open_page("pages/2_Speed.py", timeout=180)


def test_speed_page_runs_a_tiny_benchmark():
    at = _page()
    # The default DeiT-S weights are not cached here: the page falls back to DeiT-T and says so.
    assert at.selectbox(key="model_name").value == "deit_tiny_patch16_224"
    assert not at.get("plotly_chart"), "nothing runs before the button"
    at.multiselect(key="speed_methods").set_value(["evit"])
    at.multiselect(key="speed_keep_rates").set_value([0.7])
    at.multiselect(key="speed_batch_sizes").set_value([1])
    at.number_input(key="speed_warmup").set_value(0)
    at.number_input(key="speed_repeats").set_value(1)
    at.run()
    at.button(key="speed_run").click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    frame = at.dataframe[0].value
    assert list(frame["setting"]) == ["dense", "EViT keep 0.7"]
    # the speedups come first, so they stay on screen; device, precision and threads are in the caption
    assert list(frame.columns[:4]) == ["setting", "batch_size", "speedup_vs_dense", "gmacs_ratio"] and len(frame.columns) <= 11
    assert any(c.value.startswith("cpu · float32") for c in at.caption)
    assert list(frame["batch_size"]) == [1, 1]
    assert frame["speedup_vs_dense"].iloc[0] == 1.0
    assert (frame["images_per_s"] > 0).all()
    assert frame["gmacs_ratio"].iloc[1] > 1.4  # EViT 0.7 on DeiT-T: 1.3 / 0.8 GMACs
    assert len(at.get("plotly_chart")) == 1
    assert "speedup_bound" not in frame.columns


def test_speed_page_shows_the_token_count_bound():
    at = _page()
    at.multiselect(key="speed_methods").set_value(["tome"])
    at.multiselect(key="speed_batch_sizes").set_value([1])
    at.number_input(key="speed_warmup").set_value(0)
    at.number_input(key="speed_repeats").set_value(1)
    at.checkbox(key="speed_bound").check()
    at.run()
    at.button(key="speed_run").click()
    at.run()
    assert not at.exception, at.exception
    frame = at.dataframe[0].value
    assert list(frame["setting"]) == ["dense", "ToMe r=13"]
    assert frame["speedup_bound"].isna().iloc[0] and frame["speedup_bound"].iloc[1] > 0
    figure = at.get("plotly_chart")[0].proto.spec
    assert "token-count bound" in figure


def test_speed_page_bad_settings_show_an_error():
    at = _page()
    at.multiselect(key="speed_batch_sizes").set_value([])
    at.run()
    at.button(key="speed_run").click()
    at.run()
    assert not at.exception
    assert at.error and "batch size" in at.error[0].value
