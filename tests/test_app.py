"""The Streamlit page through streamlit.testing.v1.AppTest, with the real DeiT-Tiny weights.

conftest.py points HF_HUB_CACHE at ../shared and sets HF_HUB_OFFLINE=1, so the page falls back
from DeiT-S (not cached) to DeiT-T, as a fresh machine without network would.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from analysis.registry import all_methods

METHODS = all_methods()

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def images(at: AppTest) -> list[str]:
    """Captions of every picture on the page (one per st.image call)."""
    return [img.caption for element in at.get("image") for img in element.proto.imgs]


def fresh() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture(scope="module")
def opened() -> AppTest:
    return fresh()


def comparison_rows_shown() -> int:
    """How many comparison rows the main page draws for DeiT-Tiny: each row that at least two of
    the registered methods can join (methods needing checkpoint extras cannot)."""
    from analysis.methods.base import COMPARISON_ROWS
    from analysis.registry import all_methods

    joining = {row: [m for m in all_methods().values() if m.unavailable_reason({}) is None
                     and any(e.row == row for e in m.comparison)] for row in COMPARISON_ROWS}
    return sum(len(methods) >= 2 for methods in joining.values())


def test_opens_on_a_sample_photo_with_evit(opened):
    at = opened
    assert_clean(at)
    assert "deit_tiny_patch16_224" in at.sidebar.selectbox(key="model_name").value
    assert any("opened on deit_tiny_patch16_224" in info.value for info in at.sidebar.info)
    captions = images(at)
    assert captions[0].startswith("input crop the model sees (224×224, 14×14 patches)")
    # one masked view and one class-attention map per EViT stage (layers 4, 7, 10); the comparison
    # rows are drawn when opened (test_comparison_rows_are_drawn_when_opened)
    assert [c for c in captions if "masked tokens" in c] == [
        "layer 4: masked tokens, 140 tokens out", "layer 7: masked tokens, 100 tokens out", "layer 10: masked tokens, 72 tokens out"]
    assert [c for c in captions if "class attention" in c] == [f"layer {n}: class attention" for n in (4, 7, 10)]
    assert len(captions) == 1 + 3 + 3, "input crop, 3 masked views, 3 attention maps"
    assert len(at.get("download_button")) == 3 + 3 + 1, "every picture has a PNG download, the diversity chart HTML"
    # the real weights classify the sample cat as a cat, dense and pruned alike
    tables = [frame.value for frame in at.dataframe]
    top5 = [t for t in tables if list(t.columns) == ["class", "probability"]]
    assert len(top5) >= 2 and all("cat" in t["class"].iloc[0] for t in top5)
    counts = next(t for t in tables if list(t.columns) == list(range(1, 13)))
    assert counts.loc["EViT"].tolist() == [197, 197, 197, 140, 140, 140, 100, 100, 100, 72, 72, 72]
    assert any("pretrained · device: cpu" in c.value for c in at.caption)
    assert any("GMACs" in m.value for m in at.markdown)
    summary = next(t for t in tables if "GMACs" in t.columns)
    assert summary.loc["EViT", "GMACs"] < summary.loc["dense", "GMACs"]
    assert summary.loc["EViT", "tokens after last block"] == 72


def comparison_toggles(at: AppTest) -> list:
    """The comparison rows' "draw this row" toggles, in page order."""
    return [toggle for toggle in at.toggle if toggle.key.startswith("compare_show_")]


def open_all_rows(at: AppTest) -> AppTest:
    """Switch every comparison row's toggle on and rerun the page (the rows start closed)."""
    toggles = comparison_toggles(at)
    assert toggles, [toggle.key for toggle in at.toggle]
    for toggle in toggles:
        toggle.set_value(True)
    return at.run()


def test_comparison_rows_are_drawn_when_opened():
    """Each comparison row starts closed, naming its methods, and draws its picture (every method at
    the same budget, one stage slider) once opened; closing it again removes it."""
    at = fresh()
    assert_clean(at)
    rows = comparison_rows_shown()
    assert rows >= 2
    toggles = comparison_toggles(at)
    assert len(toggles) == rows and not any(toggle.value for toggle in toggles)
    named = [c.value for c in at.caption if c.value.startswith("Methods in this row:")]
    assert named[0] == ("Methods in this row: importance-based: EViT, diversity-based: DPC-kNN, BAT (reconstructed), "
                        "eTPS, ToMe.")
    assert len(named) == rows and not [c for c in images(at) if c and c.startswith("(a) input")]
    open_all_rows(at)
    assert_clean(at)
    captions = images(at)
    rows_drawn = [c for c in captions if c.startswith("(a) input")]
    assert len(captions) == 1 + 3 + 3 + rows and len(rows_drawn) == rows
    assert rows_drawn[0] == ("(a) input · (b) importance-based: EViT · (c) diversity-based: DPC-kNN · "
                             "(d) BAT (reconstructed) · (e) eTPS · (f) ToMe")
    assert at.select_slider(key="compare_layer_importance-diversity").value == 10
    assert len(at.get("download_button")) == 3 + 3 + rows + 1
    assert not [c for c in at.caption if c.value.startswith("Methods in this row:")]
    comparison_toggles(at)[0].set_value(False).run()
    assert len([c for c in images(at) if c.startswith("(a) input")]) == rows - 1


def test_a_keep_rate_move_runs_only_the_chosen_method_while_the_rows_are_closed(monkeypatch):
    """A slider move re-runs the model once per chosen method (the dense run is cached); an open
    comparison row adds one run per method of the row (issue 15 point 6: the page's own cost)."""
    import ui.shared

    runs: list[str] = []
    real = ui.shared.analyse_images
    monkeypatch.setattr(ui.shared, "analyse_images", lambda loaded, images_, plan, *a, **k: runs.append(plan.method) or
                        real(loaded, images_, plan, *a, **k))
    at = fresh()
    at.sidebar.slider(key="keep_rate").set_value(0.45).run()
    assert_clean(at)
    assert runs[-1:] == ["evit"] and "etps" not in runs
    runs.clear()
    at.sidebar.slider(key="keep_rate").set_value(0.4).run()
    assert runs == ["evit"]
    runs.clear()
    comparison_toggles(at)[0].set_value(True).run()
    assert_clean(at)
    assert sorted(runs) == sorted(["evit", "dpc", "bat", "etps", "tome"])


def test_predictor_methods_disabled_with_reason(opened):
    disabled = {box.key: box for box in opened.sidebar.checkbox if box.key.startswith("off_")}
    assert set(disabled) == {"off_dtps", "off_dynamicvit"}
    assert all(box.disabled and "score_predictor" in box.help for box in disabled.values())
    options = opened.sidebar.multiselect(key="methods").options  # as shown: the methods' labels
    assert METHODS["dtps"].label not in options and METHODS["dynamicvit"].label not in options
    assert METHODS["evit"].label in options


def test_slider_rerenders_without_reloading_the_model(opened, monkeypatch):
    import ui.shared

    calls = []
    real = ui.shared.load_model
    monkeypatch.setattr(ui.shared, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    at = opened
    at.sidebar.slider(key="keep_rate").set_value(0.5).run()
    assert_clean(at)
    assert calls == [], "the cached model is reused"
    assert [c for c in images(at) if "masked tokens" in c][-1] == "layer 10: masked tokens, 28 tokens out"
    at.sidebar.slider(key="keep_rate").set_value(0.7).run()


def test_every_registered_method_renders(opened):
    at = opened
    runnable = [name for name in METHODS if name not in ("dtps", "dynamicvit")]
    shown = at.sidebar.multiselect(key="methods").options
    assert shown == ["none (dense model only)"] + [METHODS[name].label for name in runnable]
    at.sidebar.multiselect(key="methods").set_value(runnable).run()
    assert_clean(at)
    labels = [tab.label for tab in at.tabs]
    assert labels == [METHODS[name].label for name in runnable]
    captions = images(at)
    stage_pictures = [c for c in captions if c.startswith("layer ") and "class attention" not in c]
    # 3 stages each: the keep-rate methods reduce at 4, 7, 10; ToMe merges in all 12 blocks and shows the
    # sidebar's layers by default (the others on request)
    assert len(stage_pictures) == 3 * len(runnable)
    assert at.multiselect(key="stages_tome").options == [str(layer) for layer in range(1, 13)]
    # per method tab: BAT, DPC and ToMe draw merge groups at every stage shown, EViT masked tokens, eTPS
    # dispatch maps (other squeezing or propagating methods draw them too; a
    # method that pools some images and prunes others draws either, stage by stage)
    per_tab = {tab.label: [img.caption for element in tab.get("image") for img in element.proto.imgs] for tab in at.tabs}
    for name, view, stages in (("bat", "merge groups", 3), ("dpc", "merge groups", 3), ("tome", "merge groups", 3),
                               ("evit", "masked tokens", 3), ("etps", "dispatch map", 3)):
        assert sum(view in c for c in per_tab[METHODS[name].label]) == stages, name
    assert len(at.get("plotly_chart")) == 1, "the diversity chart; interactive dispatch maps are built when opened"
    at.toggle(key="show_plot_etps_7").set_value(True).run()
    assert_clean(at)
    assert len(at.get("plotly_chart")) == 2
    counts = next(frame.value for frame in at.dataframe if list(frame.value.columns) == list(range(1, 13)))
    assert len(counts) == 1 + len(runnable)
    assert counts.loc["ToMe"].iloc[-1] == 41
    assert counts.loc[METHODS["etps"].label].iloc[-1] == 69
    at.sidebar.multiselect(key="methods").set_value(["evit"]).run()


def _png_bomb() -> bytes:
    """A PNG header claiming 20000 x 20000 pixels (over PIL's decompression-bomb limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.jpg", b"", "the file is empty"),
        ("notes.png", b"this is a text file, not a picture", "not an image PIL can read"),
        ("cut.jpg", (ROOT / "assets" / "cat.jpg").read_bytes()[:3000], "corrupt or truncated"),
        ("bomb.png", _png_bomb(), "decompression-bomb limit"),
    ],
    ids=["empty", "not-an-image", "truncated", "decompression-bomb"],
)
def test_bad_upload_shows_an_error_and_draws_nothing(name, data, message):
    at = fresh()
    at.file_uploader(key="upload").set_value((name, data, "application/octet-stream")).run()
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value and name in at.error[0].value
    assert "Upload a JPEG, PNG, WebP, BMP, TIFF or GIF image" in at.error[0].value
    assert images(at) == [], "nothing half-drawn"


def test_uploaded_formats_render():
    from PIL import Image

    at = fresh()
    frames = [Image.new("P", (40, 30), color=i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    at.file_uploader(key="upload").set_value(("anim.gif", buffer.getvalue(), "image/gif")).run()
    assert_clean(at)
    assert images(at)[0].startswith("input crop the model sees (224×224")


@pytest.mark.parametrize(
    "layers, message",
    [("4,4", "must not repeat"), ("4,13", "out of range"), ("four", "comma-separated block numbers")],
    ids=["repeated", "out-of-range", "not-numbers"],
)
def test_bad_layers_show_an_error(layers, message):
    at = fresh()
    at.sidebar.text_input(key="layers").set_value(layers).run()
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value
    assert images(at) == []


def test_checkpoint_for_another_architecture(tmp_path):
    at = fresh()
    at.sidebar.radio(key="model_weights").set_value("checkpoint file").run()
    buffer = io.BytesIO()
    torch.save({"model": {"head.weight": torch.zeros(10, 384), "head.bias": torch.zeros(10)}}, buffer)
    at.sidebar.file_uploader(key="model_ckpt").set_value(("other.pth", buffer.getvalue(), "application/octet-stream")).run()
    assert not at.exception
    assert len(at.error) == 1 and "does not fit deit_tiny_patch16_224" in at.error[0].value
    assert images(at) == []


def test_random_weights_are_labelled():
    at = fresh()
    at.sidebar.radio(key="model_weights").set_value("random").run()
    assert not at.exception
    assert any("random (untrained" in w.value for w in at.warning)
    assert any("(random weights)" in m.value for m in at.markdown)


def _seeded_predictor(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded dTPS / DynamicViT predictor weights for 3 stages under the official key names."""
    from analysis.methods.tps import PREDICTOR_PREFIX, PREDICTOR_TENSORS

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for stage in range(3):
        for name, shape in PREDICTOR_TENSORS:
            dims = shape(width)
            scale = dims[-1] ** -0.5 if len(dims) == 2 else 0.1
            value = torch.randn(*dims, generator=generator) * scale
            state[f"{PREDICTOR_PREFIX}.{stage}.{name}"] = value + (1.0 if name == "in_conv.0.weight" else 0.0)
    return state


def test_predictor_checkpoint_enables_dtps_and_dynamicvit(tiny):
    """Real DeiT-T weights plus seeded predictor weights, uploaded as a checkpoint: the two
    predictor methods become selectable and render (dTPS as dispatch maps, DynamicViT masked)."""
    state = dict(tiny.model.state_dict())
    state.update(_seeded_predictor(192))
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer)
    at = fresh()
    at.sidebar.radio(key="model_weights").set_value("checkpoint file").run()
    at.sidebar.file_uploader(key="model_ckpt").set_value(("dtps_tiny.pth", buffer.getvalue(), "application/octet-stream")).run()
    assert_clean(at)
    assert not [box for box in at.sidebar.checkbox if box.key.startswith("off_")], "nothing disabled with a predictor"
    at.sidebar.multiselect(key="methods").set_value(["dtps", "dynamicvit"]).run()
    assert_clean(at)
    captions = images(at)
    assert [c for c in captions if "dispatch map" in c] == [
        "layer 4: dispatch map, 138 tokens out", "layer 7: dispatch map, 97 tokens out", "layer 10: dispatch map, 68 tokens out"]
    assert [c for c in captions if "masked tokens" in c] == [
        "layer 4: masked tokens, 138 tokens out", "layer 7: masked tokens, 97 tokens out", "layer 10: masked tokens, 68 tokens out"]
    assert [tab.label for tab in at.tabs] == [METHODS["dtps"].label, METHODS["dynamicvit"].label]


def test_diversity_options_change_the_chart():
    """Medoid vs median centre, per token or not (methods.md §5): the chart follows the options,
    and the bound median <= medoid <= 2 median holds block by block on the real tokens."""
    import json

    at = fresh()
    assert_clean(at)

    def dense_values() -> list[float]:
        figure = json.loads(at.get("plotly_chart")[-1].proto.spec)
        return next(trace["y"] for trace in figure["data"] if trace["name"] == "dense")

    per_token_medoid = dense_values()
    at.checkbox(key="diversity_per_token").uncheck().run()
    medoid = dense_values()
    assert all(abs(total / 196 - per) < 1e-6 * total for total, per in zip(medoid, per_token_medoid))
    at.radio(key="diversity_centre").set_value("median").run()
    assert_clean(at)
    median = dense_values()
    assert all(m <= d <= 2 * m for m, d in zip(median, medoid))
    assert median != medoid
    at.checkbox(key="diversity_size_weighted").check().run()
    assert_clean(at)
    assert len(dense_values()) == 12


def test_diversity_computed_on_demand_from_the_stored_block_outputs(tiny, sample_batch):
    """ImageAnalysis keeps the block outputs and computes r(Z) only when asked: every option
    combination equals diversity_per_block_both on the same engine result, bit for bit."""
    import pickle

    import numpy as np

    from analysis.diversity import diversity_per_block_both
    from analysis.engine import run
    from analysis.plan import ReductionPlan
    from analysis.inspect import analyse_result

    plan = ReductionPlan.make("evit", 0.7)  # EViT fuses the inattentive tokens: sizes above 1
    result = run(tiny.model, sample_batch[:1], plan, extras=tiny.extras, keep_block_outputs=True)
    analysis = analyse_result(result, 0, gmacs={})
    assert [output.shape[0] for output in analysis.block_outputs] == result.token_counts
    assert all(output.dtype == np.float32 for output in analysis.block_outputs)
    # pickled as st.cache_data does
    analysis = pickle.loads(pickle.dumps(analysis))
    for centre in ("medoid", "median"):
        for size_weighted in (False, True):
            expected = diversity_per_block_both(result, centre, size_weighted)
            for values, want in zip(analysis.diversity(centre=centre, size_weighted=size_weighted), expected):
                assert values.dtype == np.float64 and values.shape == (12,)
                np.testing.assert_array_equal(values, want[0])
    assert not np.array_equal(analysis.diversity("medoid", True)[1], analysis.diversity("medoid", False)[1])
    with pytest.raises(ValueError, match="centre"):
        analysis.diversity(centre="mean")


def test_checkpoints_by_upload_and_by_server_path(tiny, tmp_path):
    """An uploaded checkpoint is named by its own file name, its temporary copy is gone once loaded;
    a checkpoint too large to upload can be given by its path on the server; the shared model cache
    is bounded; the upload limit is raised for ViT-B checkpoints."""
    import tempfile

    import tomllib

    import ui.shared

    before = set(Path(tempfile.gettempdir()).glob("tokenscope-ckpt-*"))
    buffer = io.BytesIO()
    torch.save({"model": tiny.model.state_dict()}, buffer)
    at = fresh()
    at.sidebar.radio(key="model_weights").set_value("checkpoint file").run()
    at.sidebar.file_uploader(key="model_ckpt").set_value(("my_deit_tiny.pth", buffer.getvalue(), "application/octet-stream")).run()
    assert_clean(at)
    badges = [c.value for c in at.caption if "weights:" in c.value]
    assert badges and all("weights: my_deit_tiny.pth" in b and "/tmp" not in b for b in badges), badges
    assert set(Path(tempfile.gettempdir()).glob("tokenscope-ckpt-*")) == before, "no temporary copy left behind"

    path = tmp_path / "server_side.pth"
    path.write_bytes(buffer.getvalue())
    at.sidebar.radio(key="model_weights").set_value("checkpoint path").run()
    at.sidebar.text_input(key="model_ckpt_path").set_value(str(path)).run()
    assert_clean(at)
    assert any(f"weights: {path}" in c.value for c in at.caption)
    at.sidebar.text_input(key="model_ckpt_path").set_value(str(tmp_path)).run()
    assert at.error and "is a folder, not a checkpoint file" in at.error[0].value

    assert ui.shared.cached_model._info.max_entries == ui.shared.MODEL_CACHE_ENTRIES <= 4
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] >= 1024  # MB: a ViT-B checkpoint is about 350 MB
    assert config.get("client", {}).get("toolbarMode") != "minimal", "the running indicator and Stop button stay visible"


def test_merge_groups_drawn_over_the_photo_by_default():
    """The comparison row and the stage pictures draw merge groups over the photo (tinted and
    outlined), legible; the mean-colour rendering is one choice away."""
    at = fresh()
    at.sidebar.multiselect(key="methods").set_value(["tome"]).run()
    assert_clean(at)
    assert at.sidebar.radio(key="merge_style").value == "tint"
    tint = [c for c in images(at) if "merge groups" in (c or "")]
    at.sidebar.radio(key="merge_style").set_value("mean").run()
    assert_clean(at)
    assert [c for c in images(at) if "merge groups" in (c or "")] == tint


def test_layers_are_explained_when_blank_or_unsorted():
    at = fresh()
    at.sidebar.text_input(key="layers").set_value("").run()
    assert_clean(at)
    assert any("every method uses its own default layers" in c.value for c in at.sidebar.caption)
    at.sidebar.text_input(key="layers").set_value("10,7,4").run()
    assert_clean(at)
    assert any("block order: 4,7,10" in c.value for c in at.sidebar.caption)
    assert [c for c in images(at) if c and c.startswith("layer ")][0].startswith("layer 4:")


def test_pictures_drawn_side_by_side_equal_those_drawn_one_by_one(tiny):
    """ui.shared.draw_in_parallel (the page's stage pictures and comparison panels): the same PNG
    bytes as drawing them one after another, in job order, and a job's error is raised."""
    from PIL import Image

    from analysis.inspect import analyse_images
    from analysis.models import crop_only_transform
    from analysis.plan import ReductionPlan
    from ui.shared import draw_in_parallel
    from viz.overlays import attention_view, png_bytes, stage_view

    photo = Image.open(ROOT / "assets" / "cat.jpg")
    crop = crop_only_transform(tiny.model, None)(photo).convert("RGB")
    jobs = []
    for method in ("etps", "tome", "evit"):
        analysis = analyse_images(tiny, [photo], ReductionPlan.make(method, 0.7, (4, 7, 10)), None, dense=False)[0]
        for record in analysis.stages[:3]:
            jobs.append(lambda r=record: png_bytes(stage_view(crop, r, tiny.grid_size)))
            if record.cls_attention is not None:
                jobs.append(lambda r=record: png_bytes(attention_view(crop, r.cls_attention, tiny.grid_size)))
    assert len(jobs) >= 12
    assert draw_in_parallel(jobs) == [job() for job in jobs]

    def broken():
        raise ValueError("a bad picture")

    with pytest.raises(ValueError, match="a bad picture"):
        draw_in_parallel([jobs[0], broken])
