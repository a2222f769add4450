"""The pictures (viz/): sizes, the colours the docstrings promise, legends, downloads.

Provenance comes from real DeiT-Tiny runs on a real ImageNet sample photo (EViT with and without
fusion, eTPS, BAT, ToMe), computed once per session.
"""
from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from analysis.engine import run

from analysis.plan import ReductionPlan
from analysis.models import crop_only_transform, load_image, preprocess
from viz import overlays as ov
from viz.interactive import dispatch_figure, html_bytes

SCALE = 2


@pytest.fixture(scope="session")
def photo(tiny, sample_files):
    image = load_image(sample_files[3])
    crop = crop_only_transform(tiny.model)(image).convert("RGB")
    return image, crop, preprocess([image], tiny.model)


@pytest.fixture(scope="session")
def records(tiny, photo):
    """StageRecords of one real photo for each method the pictures cover."""
    _, _, batch = photo
    plans = {
        "evit": ReductionPlan.make("evit", 0.7),
        "evit_drop": ReductionPlan.make("evit", 0.7, fuse=False),
        "etps": ReductionPlan.make("etps", 0.7),
        "bat": ReductionPlan.make("bat", 0.7),
        "tome": ReductionPlan.make("tome", 1.0, r=13),
    }
    out = {}
    for name, plan in plans.items():
        result = run(tiny.model, batch, plan)
        out[name] = ([ov.StageRecord.from_stage(stage, 0) for stage in result.stages], result)
    return out


def big(crop: Image.Image) -> np.ndarray:
    return np.asarray(crop.resize((crop.width * SCALE, crop.height * SCALE), Image.NEAREST), dtype=np.float64)


def patch_block(pixels: np.ndarray, patch: int, grid=(14, 14)) -> np.ndarray:
    """The pixels of one patch in a picture drawn at SCALE (picture area only)."""
    size = pixels.shape[1] // grid[1]
    r, c = divmod(patch, grid[1])
    return pixels[r * size:(r + 1) * size, c * size:(c + 1) * size]


def test_masked_view_colours_size_and_legend(tiny, photo, records):
    _, crop, _ = photo
    grid = tiny.grid_size
    record = records["evit"][0][1]  # layer 7: kept, fused (some from an earlier fused token)
    picture = ov.masked_view(crop, record, grid, scale=SCALE)
    width, height = crop.width * SCALE, crop.height * SCALE
    assert picture.size[0] == width and picture.size[1] > height
    legend_rows = [("kept", 0), ("in a fused token", 0)]
    assert picture.size[1] == height + ov.legend_height(legend_rows, width)
    pixels = np.asarray(picture, dtype=np.float64)[:height]
    base = big(crop)
    sizes = np.bincount(record.patch_to_token[record.patch_to_token >= 0], minlength=record.n_tokens)
    kinds = np.asarray(record.token_kinds)
    fused_patches = np.flatnonzero((kinds[record.patch_to_token] == "fused") | (sizes[record.patch_to_token] > 1))
    kept_patches = np.flatnonzero(sizes[record.patch_to_token] == 1)
    assert len(fused_patches) > 0 and len(kept_patches) == 98
    for patch in kept_patches[:20]:
        np.testing.assert_allclose(patch_block(pixels, patch), patch_block(base, patch), atol=0.51)
    for patch in fused_patches[:20]:
        expected = (1 - ov.FUSED_ALPHA) * patch_block(base, patch) + ov.FUSED_ALPHA * np.array(ov.FUSED_COLOUR)
        np.testing.assert_allclose(patch_block(pixels, patch), expected, atol=0.51)
    legend = np.asarray(picture)[height:]
    assert (legend == ov.FUSED_COLOUR).all(axis=-1).sum() > 50, "the legend shows the fused colour"


def test_masked_view_dims_discarded_patches(tiny, photo, records):
    _, crop, _ = photo
    record = records["evit_drop"][0][2]  # no fusion: 69 kept, 127 discarded
    picture = ov.masked_view(crop, record, tiny.grid_size, scale=SCALE)
    height = crop.height * SCALE
    pixels = np.asarray(picture, dtype=np.float64)[:height]
    base = big(crop)
    discarded = np.flatnonzero(record.patch_to_token < 0)
    assert len(discarded) == 196 - 68
    for patch in discarded[:20]:
        np.testing.assert_allclose(patch_block(pixels, patch), patch_block(base, patch) * ov.DIM_FACTOR, atol=0.51)
    legend = np.asarray(picture)[height:]
    assert (legend == ov.DISCARDED_SWATCH).all(axis=-1).sum() > 50
    assert not (legend == ov.FUSED_COLOUR).all(axis=-1).any(), "no fused legend entry without fusion"


def test_attention_view_heatmap_and_nan(tiny, photo, records):
    _, crop, _ = photo
    record = records["evit_drop"][0][1]  # layer 7: patches dropped at layer 4 have NaN attention
    values = record.cls_attention
    assert np.isnan(values).sum() == 196 - 138
    picture = ov.attention_view(crop, values, tiny.grid_size, scale=SCALE)
    height = crop.height * SCALE
    assert picture.size[0] == crop.width * SCALE and picture.size[1] > height
    pixels = np.asarray(picture, dtype=np.float64)[:height]
    for patch in np.flatnonzero(np.isnan(values))[:10]:
        assert (patch_block(pixels, patch) == ov.NAN_COLOUR).all()
    top = int(np.nanargmax(values))
    hot = np.asarray(matplotlib.colormaps["inferno"](1.0)[:3]) * 255
    expected = (1 - ov.ATTENTION_ALPHA) * patch_block(big(crop), top) + ov.ATTENTION_ALPHA * hot
    np.testing.assert_allclose(patch_block(pixels, top), expected, atol=0.51)
    legend = np.asarray(picture)[height:]
    assert (legend == ov.NAN_COLOUR).all(axis=-1).sum() > 50, "legend has the 'already discarded' swatch"
    assert len(np.unique(legend.reshape(-1, 3), axis=0)) > 50, "legend has the colour bar"


def _interior(pixels: np.ndarray, patch: int) -> np.ndarray:
    block = patch_block(pixels, patch)
    mid = block.shape[0] // 2
    return block[mid, mid]


def test_merge_groups_fill_and_distinct_borders(tiny, photo, records):
    _, crop, _ = photo
    grid = tiny.grid_size
    record = records["tome"][0][5]  # ToMe after block 6
    picture = ov.merge_groups_view(crop, record, grid, scale=SCALE)
    height = crop.height * SCALE
    assert picture.size[0] == crop.width * SCALE and picture.size[1] > height
    pixels = np.asarray(picture, dtype=np.float64)[:height]
    base = big(crop)
    p2t = record.patch_to_token
    patch_means = np.stack([patch_block(base, p).reshape(-1, 3).mean(0) for p in range(196)])
    sizes = np.bincount(p2t, minlength=record.n_tokens)
    merged = [t for t in range(1, record.n_tokens) if sizes[t] >= 2]
    assert len(merged) > 10
    for token in merged[:10]:
        members = np.flatnonzero(p2t == token)
        np.testing.assert_allclose(_interior(pixels, members[0]), patch_means[members].mean(0), atol=0.51)
    # every merged token's border is in a palette colour, and touching merged tokens differ
    colour_of = {}
    for token in merged:
        members = np.flatnonzero(p2t == token)
        corner = patch_block(pixels, members[0])[0, 0]
        assert tuple(int(v) for v in corner) in ov.PALETTE or not _is_border_corner(p2t, members[0], token, grid)
        colour_of[token] = tuple(int(v) for v in corner)
    colours = ov.distinct_colours(p2t, grid, merged)
    board = p2t.reshape(grid)
    pairs_checked = 0
    for a, b in [(board[:, :-1], board[:, 1:]), (board[:-1, :], board[1:, :])]:
        touching = (a != b) & np.isin(a, merged) & np.isin(b, merged)
        for u, v in zip(a[touching], b[touching]):
            assert colours[int(u)] != colours[int(v)]
            pairs_checked += 1
    assert pairs_checked > 0, "the picture must have touching merged tokens for this check to mean anything"
    # a single-patch token keeps its own mean colour inside, with a KEPT_BORDER outline
    single = int(np.flatnonzero(sizes[p2t] == 1)[0])
    np.testing.assert_allclose(_interior(pixels, single), patch_means[single], atol=0.51)
    assert tuple(int(v) for v in patch_block(pixels, single)[0, 0]) == ov.KEPT_BORDER


def _is_border_corner(p2t, patch, token, grid) -> bool:
    r, c = divmod(patch, grid[1])
    up = r == 0 or p2t[(r - 1) * grid[1] + c] != token
    left = c == 0 or p2t[r * grid[1] + c - 1] != token
    return up or left


def test_merge_groups_bat_kinds_told_apart(tiny, photo, records):
    _, crop, _ = photo
    record = records["bat"][0][0]
    kinds = set(record.token_kinds)
    assert {"kept", "pair", "cluster"} <= kinds
    picture = ov.merge_groups_view(crop, record, tiny.grid_size, scale=SCALE)
    height = crop.height * SCALE
    legend_items = 4  # kept / pair / cluster / what fill and border mean
    assert picture.size[1] - height >= ov.LEGEND_PAD * 2 + ov.LEGEND_ROW * legend_items
    pixels = np.asarray(picture)
    # pair markers are white circles, cluster markers black diamonds: both are drawn on the picture
    area = pixels[:height]
    assert (area == 255).all(axis=-1).sum() > 10 * record.token_kinds.count("pair")
    assert (area == 0).all(axis=-1).sum() > 10 * record.token_kinds.count("cluster")
    plain = ov.merge_groups_view(crop, records["tome"][0][2], tiny.grid_size, scale=SCALE)
    assert plain.size[1] < picture.size[1], "ToMe has no kinds to tell apart: a shorter legend"
    assert (np.asarray(plain)[:height] == 255).all(axis=-1).sum() < (area == 255).all(axis=-1).sum() / 4, "no markers on ToMe"


def test_dispatch_view_tints_outlines_and_arrows(tiny, photo, records):
    _, crop, _ = photo
    grid = tiny.grid_size
    record = records["etps"][0][0]
    assert record.patch_pruned.sum() == 196 - 138
    picture = ov.dispatch_view(crop, record, grid, scale=SCALE)
    no_arrows = ov.dispatch_view(crop, record, grid, scale=SCALE, arrows=False)
    height = crop.height * SCALE
    assert picture.size == no_arrows.size and picture.size[0] == crop.width * SCALE and picture.size[1] > height
    pixels = np.asarray(no_arrows, dtype=np.float64)[:height]
    base = big(crop)
    pruned = np.flatnonzero(record.patch_pruned)
    p2t = record.patch_to_token
    hosts = sorted(set(p2t[pruned].tolist()))
    own = np.where(record.patch_pruned, -1, np.where(np.isin(p2t, hosts), p2t, -1))
    colours = ov.distinct_colours(own, grid, hosts)
    for patch in pruned:
        expected = (1 - ov.TINT_ALPHA) * patch_block(base, patch) + ov.TINT_ALPHA * np.array(colours[int(p2t[patch])])
        np.testing.assert_allclose(patch_block(pixels, patch), expected, atol=0.51)
    for host in hosts:  # the host's own patch is outlined in the host colour
        members = np.flatnonzero(own == host)
        assert tuple(int(v) for v in patch_block(pixels, members[0])[0, 0]) == colours[host]
    # arrows change the picture at every pruned patch's centre (where each arrow starts)
    with_arrows = np.asarray(picture, dtype=np.float64)[:height]
    for patch in pruned:
        assert np.abs(_interior(with_arrows, patch) - _interior(pixels, patch)).max() > 5


def test_dispatch_arrow_opacity_is_the_squeeze_weight():
    crop = Image.new("RGB", (64, 64), (0, 0, 0))
    record = ov.StageRecord(
        layer=4, patch_to_token=np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 1]),
        token_kinds=("cls", "host") + ("kept",) * 14, token_sizes=np.array([0, 2] + [1] * 14),
        patch_pruned=np.array([False] * 15 + [True]), patch_weight=np.array([0.6] + [1.0] * 14 + [0.4]),
    )
    picture = np.asarray(ov.dispatch_view(crop, record, (4, 4), scale=4, legend=False), dtype=np.float64)
    plain = np.asarray(ov.dispatch_view(crop, record, (4, 4), scale=4, legend=False, arrows=False), dtype=np.float64)
    # the arrow runs from patch 15's centre (224, 224) to host 1's centre (32, 32) in a 256 px picture
    x = y = 128  # its midpoint: white core over black shadow, both at opacity 0.4
    shadow = (1 - 0.4) * plain[y, x]
    expected = (1 - 0.4) * shadow + 0.4 * np.array(ov.ARROW_COLOUR)
    np.testing.assert_allclose(picture[y, x], expected, atol=1.01)
    # a light arrow is drawn at the floor opacity
    assert ov.arrow_opacity(0.03) == ov.MIN_ARROW_OPACITY and ov.arrow_opacity(0.4) == 0.4 and ov.arrow_opacity(1.5) == 1.0


def test_dispatch_figure_hover_and_opacity(tiny, photo, records):
    _, crop, _ = photo
    record = records["etps"][0][1]
    figure = dispatch_figure(crop, record, tiny.grid_size, scale=SCALE)
    pruned = np.flatnonzero(record.patch_pruned)
    cores = [a for a in figure.layout.annotations if a.arrowcolor == "rgb(%d,%d,%d)" % ov.ARROW_COLOUR]
    assert len(cores) == len(pruned) and len(figure.layout.annotations) == 2 * len(pruned), "one shadowed arrow per pruned patch"
    np.testing.assert_allclose(sorted(a.opacity for a in cores), np.sort(np.clip(record.patch_weight[pruned], ov.MIN_ARROW_OPACITY, 1)), atol=1e-6)
    hover = figure.data[1].text
    assert len(hover) == len(pruned)
    first = pruned[0]
    assert f"patch {first}" in hover[0] and f"host token {record.patch_to_token[first]}" in hover[0]
    assert f"{record.patch_weight[first]:.3f}" in hover[0]
    assert figure.layout.width == crop.width * SCALE
    html = html_bytes(figure)
    assert html.lower().startswith(b"<!doctype html>") and b"plotly" in html and len(html) > 1_000_000  # plotly.js embedded: works offline


def test_dispatch_figure_adds_every_arrow_in_one_layout_update(monkeypatch):
    """A map whose pruned patches each go to several receivers (`edges`): two annotations per arrow,
    weakest first as `dispatch_arrows`, added in one layout update (not one `add_annotation` per
    arrow, which re-validates the growing list: quadratic)."""
    import plotly.graph_objects as go

    grid = (8, 8)
    p2t = np.arange(1, 65)
    pruned = np.zeros(64, dtype=bool)
    pruned[::4] = True  # 16 pruned patches, each held by the next patch's token
    p2t[pruned] = p2t[np.flatnonzero(pruned) + 1]
    weight = np.where(pruned, np.linspace(0.2, 0.5, 64), 1.0)
    edges = np.array([(p, t, 0.1 + 0.01 * i) for i, p in enumerate(np.flatnonzero(pruned)) for t in (3, 7, 11, 15, 19, 23)],
                     dtype=np.float64)
    kinds = ("cls",) + tuple("host" if t in set(p2t[pruned]) | {3, 7, 11, 15, 19, 23} else "kept" for t in range(1, 65))
    sizes = np.bincount(p2t, minlength=65)
    record = ov.StageRecord(layer=1, patch_to_token=p2t, token_kinds=kinds, token_sizes=sizes, patch_pruned=pruned,
                            patch_weight=weight, edges=edges)

    def refuse(*args, **kwargs):
        raise AssertionError("one add_annotation call per arrow")

    monkeypatch.setattr(go.Figure, "add_annotation", refuse)
    figure = dispatch_figure(Image.new("RGB", (64, 64)), record, grid, scale=2)
    arrows = ov.dispatch_arrows(record)
    assert len(arrows) == 16 * 7
    annotations = figure.layout.annotations
    assert len(annotations) == 2 * len(arrows)
    cores = [a for a in annotations if a.arrowcolor == "rgb(%d,%d,%d)" % ov.ARROW_COLOUR]
    np.testing.assert_allclose([a.opacity for a in cores], [max(w, ov.MIN_ARROW_OPACITY) for _, _, w in arrows], atol=1e-9)
    assert [a.arrowwidth for a in annotations[:2]] == [4, 2]  # the shadow under the core


def test_suggested_view_per_method(records):
    assert ov.suggested_view(records["evit"][0][0]) == "masked"
    assert ov.suggested_view(records["etps"][0][0]) == "dispatch"
    assert ov.suggested_view(records["bat"][0][0]) == "merge"
    assert ov.suggested_view(records["tome"][0][0]) == "merge"


def test_record_from_json_matches_from_stage(records):
    stages, result = records["etps"]
    json_records = [record.to_json() for record in stages]
    assert len(json_records) == len(stages) == 3
    for json_record, record in zip(json_records, stages):
        again = ov.StageRecord.from_json(json_record)
        np.testing.assert_array_equal(again.patch_to_token, record.patch_to_token)
        assert again.token_kinds == record.token_kinds
        np.testing.assert_array_equal(again.patch_pruned, record.patch_pruned)
        np.testing.assert_allclose(again.patch_weight[record.patch_pruned], record.patch_weight[record.patch_pruned], atol=1e-6)


def test_comparison_row_size_titles_and_note(photo, records, tiny):
    _, crop, _ = photo
    panels = [ov.Panel("(a) input", crop, "196 patches")] + [
        ov.Panel(f"({chr(98 + i)}) {name}", ov.stage_view(crop, records[name][0][-1], tiny.grid_size, legend=False), "69 tokens")
        for i, name in enumerate(["evit_drop", "bat", "etps"])
    ]
    row = ov.comparison_row(panels, panel_size=160)
    assert row.size == (4 * 160 + 3 * ov.PANEL_GAP, ov.TITLE_HEIGHT + 160 + ov.CAPTION_HEIGHT)
    pixels = np.asarray(row)
    assert (pixels[: ov.TITLE_HEIGHT, :160] != 255).any(), "title drawn"
    assert (pixels[ov.TITLE_HEIGHT + 160:, :160] != 255).any(), "caption drawn"
    noted = ov.comparison_row(panels, panel_size=160, note="ToMe: r matched")
    assert noted.size[1] > row.size[1]
    with pytest.raises(ValueError):
        ov.comparison_row([])


def test_png_bytes_and_banner(photo, records, tiny):
    _, crop, _ = photo
    picture = ov.masked_view(crop, records["evit"][0][0], tiny.grid_size)
    data = ov.png_bytes(picture)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(picture))
    labelled = ov.with_banner(picture, "RANDOM WEIGHTS")
    assert labelled.size == (picture.width, picture.height + ov.BANNER_HEIGHT)
    assert tuple(np.asarray(labelled)[1, 1]) == ov.BANNER_COLOUR


def test_bad_geometry_and_missing_dispatch(photo, records, tiny):
    _, crop, _ = photo
    record = records["evit"][0][0]
    with pytest.raises(ValueError, match="grid"):
        ov.masked_view(crop, record, (7, 7))
    with pytest.raises(ValueError, match="whole number"):
        ov.masked_view(crop.resize((230, 224)), record, tiny.grid_size)
    with pytest.raises(ValueError, match="dispatch"):
        ov.dispatch_view(crop, ov.StageRecord(4, record.patch_to_token, record.token_kinds, record.token_sizes), tiny.grid_size)


def test_merge_groups_over_the_photo(tiny, photo, records):
    """style="tint": the photo stays (a merged token's interior is the photo blended with its colour at
    GROUP_TINT_ALPHA, not its mean colour), single tokens are the photo itself, borders as before."""
    _, crop, _ = photo
    grid = tiny.grid_size
    record = records["tome"][0][5]
    picture = ov.merge_groups_view(crop, record, grid, scale=SCALE, style="tint", legend=False)
    pixels = np.asarray(picture, dtype=np.float64)
    base = big(crop)
    p2t = record.patch_to_token
    sizes = np.bincount(p2t, minlength=record.n_tokens)
    merged = [t for t in range(1, record.n_tokens) if sizes[t] >= 2]
    colours = ov.distinct_colours(p2t, grid, merged)
    token = merged[0]
    patch = int(np.flatnonzero(p2t == token)[0])
    inner = patch_block(pixels, patch)[SCALE * 4:-SCALE * 4, SCALE * 4:-SCALE * 4]
    want = (1 - ov.GROUP_TINT_ALPHA) * patch_block(base, patch)[SCALE * 4:-SCALE * 4, SCALE * 4:-SCALE * 4] + \
        ov.GROUP_TINT_ALPHA * np.asarray(colours[token], dtype=np.float64)
    np.testing.assert_allclose(inner, want, atol=0.51)
    single = int(np.flatnonzero(sizes[p2t] == 1)[0])
    np.testing.assert_allclose(_interior(pixels, single), _interior(base, single), atol=0.51)
    with pytest.raises(ValueError, match="style"):
        ov.merge_groups_view(crop, record, grid, style="sepia")


def test_pair_and_cluster_markers_differ_in_shape_and_fill(tiny, photo, records):
    """BAT's attentive pairs (white ring, hollow) and inattentive clusters (black triangle, filled) stay
    apart at small sizes: a ring's centre shows the picture, a triangle's centre is black."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (60, 30), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    ov._draw_marker(draw, "ring", 15, 15, 7)
    ov._draw_marker(draw, "triangle", 45, 15, 7)
    pixels = np.asarray(canvas)
    assert tuple(pixels[15, 15]) == (128, 128, 128)  # hollow ring: the background shows through
    assert tuple(pixels[17, 45]) == (0, 0, 0)        # filled triangle
    assert (pixels[:, :30] == 255).all(-1).sum() > 20 and (pixels[:, 30:] == 0).all(-1).sum() > 60


def test_per_image_budgets_get_horizontal_error_bars():
    """A method whose images keep different token counts is drawn at its mean GMACs with a
    horizontal error bar of one standard deviation; fixed-count methods get none."""
    from viz.charts import accuracy_vs_gmacs

    rows = [
        {"method": "evit", "label": "EViT", "keep_rate": 0.7, "top1": 70.0, "gmacs": 0.82, "gmacs_std": 0.0, "gmacs_min": 0.82, "gmacs_max": 0.82},
        {"method": "ats", "label": "ATS", "keep_rate": 0.7, "top1": 69.0, "gmacs": 0.76, "gmacs_std": 0.05, "gmacs_min": 0.69, "gmacs_max": 0.9},
        {"method": "ats", "label": "ATS", "keep_rate": 0.5, "top1": 60.0, "gmacs": 0.6, "gmacs_std": 0.04, "gmacs_min": 0.55, "gmacs_max": 0.7},
    ]
    fig = accuracy_vs_gmacs(rows)
    evit, ats = fig.data
    assert evit.error_x.array is None
    assert list(ats.error_x.array) == [0.04, 0.05] and "0.690-0.900" in ats.customdata[1][2]
