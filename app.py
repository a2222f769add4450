"""tokenscope: see what token pruning and merging do inside a Vision Transformer.

Run with `streamlit run app.py`. This script only wires things together: models come from
`ui.shared` (cached with st.cache_resource), the forward passes from `analysis`, the pictures from
`viz`. Every forward pass is cached with st.cache_data by one `ui.shared.AnalysisKey` (image hash,
model, weights, device, ReductionPlan, crop), so moving a slider re-runs only what changed and
never reloads the model. The page names no method: the method list, their parameters and the
comparison rows come from the registry (`analysis.registry`, `Method.comparison`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from analysis.engine import method_unavailable
from analysis.errors import ImageLoadError, PlanError, TokenscopeError
from analysis.inspect import ImageAnalysis as Analysis
from analysis.methods.base import COMPARISON_ROWS, ParamSpec, keep_rate_counts
from analysis.models import PAPER_CROP_PCT, LoadedModel, data_config, load_image
from analysis.plan import ReductionPlan, parse_layers
from analysis.registry import all_methods, get_method
from ui.shared import KEY_HASH, AnalysisKey, analyse_image, draw_in_parallel, image_diversity, model_crop, model_sidebar, weights_badge
from viz.charts import diversity_chart
from viz.interactive import dispatch_figure, html_bytes
from viz.overlays import (
    MERGE_STYLES,
    VIEW_NAMES,
    Panel,
    attention_view,
    comparison_row,
    png_bytes,
    stage_view,
    suggested_view,
    with_banner,
)

ASSETS = Path(__file__).resolve().parent / "assets"
# Sample photos (assets/CREDITS.md gives sources and licences); the first opens the page.
SAMPLES: dict[str, str] = {
    "Chelsea the cat": "cat.jpg",
    "Coffee cup": "coffee.jpg",
    "Rocket launch": "rocket.jpg",
    "Astronaut Eileen Collins": "astronaut.jpg",
}
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]
DEFAULT_LAYERS = "4,7,10"


# --- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What the sidebar chose."""

    methods: tuple[str, ...]
    keep_rate: float
    layers: tuple[int, ...] | None
    crop_pct: float | None
    params: dict[str, dict[str, Any]]
    merge_style: str = "tint"


def param_widget(container, method: str, spec: ParamSpec) -> Any:
    """One widget built from a method's ParamSpec; returns the parsed value (ValueError if bad)."""
    key = f"param_{method}_{spec.name}"
    label = spec.name.replace("_", " ")
    if spec.kind == "bool":
        return container.checkbox(label, value=bool(spec.default), help=spec.help, key=key)
    if spec.kind == "choice":
        return container.selectbox(label, spec.choices, index=spec.choices.index(spec.default), help=spec.help, key=key)
    if spec.kind == "int_list":
        default = ",".join(map(str, spec.default)) if isinstance(spec.default, tuple) else str(spec.default)
        return spec.parse(container.text_input(label, value=default, help=spec.help, key=key))
    if spec.kind == "int":
        return spec.parse(container.number_input(label, value=int(spec.default), step=1, help=spec.help, key=key,
                                                 min_value=None if spec.minimum is None else int(spec.minimum),
                                                 max_value=None if spec.maximum is None else int(spec.maximum)))
    return spec.parse(container.number_input(label, value=float(spec.default), help=spec.help, key=key, format="%.3f",
                                             min_value=None if spec.minimum is None else float(spec.minimum),
                                             max_value=None if spec.maximum is None else float(spec.maximum)))


def method_sidebar(loaded: LoadedModel) -> Settings:
    """Method multiselect, keep rate, layers, crop and each chosen method's parameters."""
    sidebar = st.sidebar
    sidebar.header("Reduction")
    methods = all_methods()
    available = ["none"] + [name for name, m in methods.items() if method_unavailable(m, loaded.model, loaded.extras) is None]
    unavailable = {name: method_unavailable(m, loaded.model, loaded.extras) for name, m in methods.items() if name not in available}
    # ?method=evit&method=bat preselects methods (shareable links; the browser test uses it); else the first listed.
    wanted = [name for name in st.query_params.get_all("method") if name in available] or available[1:2]
    chosen = sidebar.multiselect(
        "Methods", available, default=wanted, key="methods",
        format_func=lambda name: "none (dense model only)" if name == "none" else get_method(name).label,
        help="One tab per method. 'none' shows only the dense model.",
    )
    # Methods that cannot run with these weights appear disabled, with the reason (grouped when shared).
    by_reason: dict[str, list[str]] = {}
    for name, reason in unavailable.items():
        sidebar.checkbox(f"{get_method(name).label} (unavailable)", value=False, disabled=True, key=f"off_{name}", help=reason)
        by_reason.setdefault(reason, []).append(get_method(name).label)
    for reason, labels in by_reason.items():
        sidebar.caption(f"{' and '.join(labels)} unavailable: {reason}")
    keep_rate = sidebar.slider("Keep rate", 0.05, 1.0, 0.7, 0.05, key="keep_rate",
                               help="rho: the fraction of non-cls tokens kept at each reducing layer, for the methods that have a keep rate "
                                    "(" + ", ".join(m.label for m in methods.values() if m.uses_keep_rate) + ")")
    layers_text = sidebar.text_input("Reduction layers (1-based)", DEFAULT_LAYERS, key="layers",
                                     help="Blocks where the keep-rate methods reduce, as the papers count (4,7,10). Methods that reduce in every "
                                          "block by default (" + ", ".join(m.label for m in methods.values() if m.default_layers is None) + ") keep doing so. "
                                          "Blank: every method uses its own default layers.")
    layers = parse_layers(layers_text)
    if layers is None:
        sidebar.caption("Layers blank: every method uses its own default layers (4,7,10 for most).")
    elif list(layers) != sorted(layers):
        sidebar.caption(f"Layers run in block order: {','.join(map(str, sorted(layers)))}.")
    default_crop = data_config(loaded.model)["crop_pct"]
    crop_choice = sidebar.radio("Crop", (f"model default ({default_crop:g})", f"papers ({PAPER_CROP_PCT})"), key="crop",
                                help="Resize + centre crop fraction: the model's timm data config, or the papers' 0.875")
    style_names = list(MERGE_STYLES)
    merge_style = sidebar.radio("Merge groups drawn", style_names, format_func=MERGE_STYLES.get, key="merge_style",
                                help="How merged tokens are drawn: the photo with each group tinted and outlined (legible), or each "
                                     "group filled with its mean colour (as in ToMe's figures).")
    params: dict[str, dict[str, Any]] = {}
    for name in chosen:
        if name == "none" or not get_method(name).params:
            continue
        box = sidebar.expander(f"{get_method(name).label} parameters")
        params[name] = {spec.name: param_widget(box, name, spec) for spec in get_method(name).params}
    return Settings(
        methods=tuple(name for name in chosen if name != "none"),
        keep_rate=float(keep_rate),
        layers=layers,
        crop_pct=None if crop_choice.startswith("model") else PAPER_CROP_PCT,
        params=params,
        merge_style=merge_style,
    )


def plan_for(method: str, settings: Settings, params: dict[str, Any] | None = None) -> ReductionPlan:
    """The ReductionPlan of one method under the sidebar's settings (ToMe keeps its every-block default)."""
    layers = settings.layers if get_method(method).default_layers is not None else None
    chosen = settings.params.get(method, {}) if params is None else params
    defaults = {spec.name: spec.default for spec in get_method(method).params}
    changed = {k: v for k, v in chosen.items() if defaults.get(k) != v}
    return ReductionPlan.make(method, settings.keep_rate if get_method(method).uses_keep_rate else 1.0, layers, **changed)


def read_input() -> tuple[bytes, str]:
    """The uploaded file's bytes and name, or the chosen sample photo's."""
    left, right = st.columns([1, 2])
    sample = left.selectbox("Sample photo", list(SAMPLES), key="sample")
    upload = right.file_uploader("…or upload an image (JPEG, PNG, WebP, BMP, TIFF, GIF: first frame)", type=UPLOAD_TYPES, key="upload")
    if upload is not None:
        return upload.getvalue(), upload.name
    return (ASSETS / SAMPLES[sample]).read_bytes(), SAMPLES[sample]


def open_image(data: bytes, name: str) -> Image.Image:
    """Decode an image for the app. Raises ImageLoadError (empty, corrupt, not an image, too large)."""
    return load_image(data, name)


# --- drawing -----------------------------------------------------------------------------------
def labelled(image: Image.Image, loaded: LoadedModel) -> Image.Image:
    """Every picture of random weights carries a banner saying so (also in its downloads)."""
    return with_banner(image, "RANDOM WEIGHTS: untrained model, the pictures are meaningless") if loaded.is_random else image


def download_png(container, label: str, image: Image.Image | bytes, file_name: str, key: str) -> None:
    # a callable: the bytes are handed over only when the button is pressed, not hashed on every rerun
    data = (lambda: image) if isinstance(image, bytes) else (lambda: png_bytes(image))
    container.download_button(label, data=data, file_name=file_name, mime="image/png", key=key, on_click="ignore")


@st.cache_data(show_spinner=False, max_entries=16, hash_funcs=KEY_HASH)
def crop_picture(key: AnalysisKey, _image) -> bytes:
    """PNG bytes of the input crop the model sees (with the random-weights banner when it applies)."""
    return png_bytes(labelled(model_crop(key, _image), key.loaded()))


# The stage pictures, drawn once per (image, plan, stages, rendering) and kept as PNG bytes, so a
# rerun that changes something else (another widget, a diversity option) draws and encodes nothing again.
@st.cache_data(show_spinner=False, max_entries=64, hash_funcs=KEY_HASH)
def stage_pictures(key: AnalysisKey, layers: tuple[int, ...], merge_style: str, _image) -> dict[tuple[int, bool], bytes]:
    """PNG bytes of the pictures of the stages at `layers`: (layer, False) the stage's picture
    (`viz.overlays.stage_view`), (layer, True) its class-attention map where the stage records one;
    drawn side by side (`ui.shared.draw_in_parallel`)."""
    loaded = key.loaded()
    crop = model_crop(key, _image)
    jobs: dict[tuple[int, bool], Any] = {}
    for record in analyse_image(key, _image).stages:
        if record.layer not in layers:
            continue
        jobs[record.layer, False] = lambda r=record: png_bytes(labelled(stage_view(crop, r, loaded.grid_size, merge_style=merge_style), loaded))
        if record.cls_attention is not None:
            jobs[record.layer, True] = lambda r=record: png_bytes(labelled(attention_view(crop, r.cls_attention, loaded.grid_size), loaded))
    return dict(zip(jobs, draw_in_parallel(list(jobs.values()))))


def predictions_table(top5: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame({"class": [p["label"].split(",")[0] for p in top5], "probability": [round(p["prob"], 4) for p in top5]},
                        index=range(1, len(top5) + 1))


# A method that reduces in more blocks than this shows a chosen few stages (default: the sidebar's layers).
MAX_STAGES_SHOWN = 6


def stage_panels(method: str, analysis: Analysis, crop: Image.Image, loaded: LoadedModel, slug: str, settings: Settings,
                 key: AnalysisKey, image: Image.Image) -> None:
    """One panel per stage, three to a row: the picture that fits the method, then its class-attention
    map. A method reducing in many blocks (ToMe: 12) shows the stages the user picks."""
    stages = analysis.stages
    if not stages:
        st.info("This plan changed no tokens (keep rate 1 or r = 0): nothing to draw.")
        return
    if len(stages) > MAX_STAGES_SHOWN:
        layers = [record.layer for record in stages]
        wanted = [layer for layer in (settings.layers or (4, 7, 10)) if layer in layers] or layers[-3:]
        shown = st.multiselect(f"Stages to show ({len(stages)} reducing blocks)", layers, default=wanted, key=f"stages_{method}")
        stages = [record for record in stages if record.layer in shown]
    pictures = stage_pictures(key.with_plan(analysis.plan), tuple(record.layer for record in stages), settings.merge_style, image)
    per_row = 3
    for start in range(0, len(stages), per_row):
        columns = st.columns(per_row)
        for column, record in zip(columns, stages[start:start + per_row]):
            view = suggested_view(record)
            picture = pictures[record.layer, False]
            note = f" ({record.note})" if record.note else ""
            column.image(picture, caption=f"layer {record.layer}: {VIEW_NAMES[view]}, {record.n_tokens} tokens out{note}",
                         width="stretch", output_format="PNG")
            download_png(column, "PNG", picture, f"{slug}_{method}_layer{record.layer}_{view}.png", f"dl_{method}_{record.layer}_{view}")
            if view == "dispatch" and column.toggle("interactive dispatch map", key=f"show_plot_{method}_{record.layer}",
                                                    help="patch, host token and squeeze weight on hover; built when opened"):
                figure = dispatch_figure_cached(key.with_plan(analysis.plan), record.layer, f"{get_method(method).label}, layer {record.layer}",
                                                image)
                column.plotly_chart(figure, key=f"plot_{method}_{record.layer}")
                column.download_button("HTML", data=lambda f=figure: html_bytes(f), file_name=f"{slug}_{method}_layer{record.layer}_dispatch.html",
                                       mime="text/html", key=f"dlh_{method}_{record.layer}", on_click="ignore")
            if record.cls_attention is not None:
                heat = pictures[record.layer, True]
                column.image(heat, caption=f"layer {record.layer}: class attention", width="stretch", output_format="PNG")
                download_png(column, "PNG", heat, f"{slug}_{method}_layer{record.layer}_attention.png", f"dl_{method}_{record.layer}_att")


@st.cache_data(show_spinner=False, max_entries=32, hash_funcs=KEY_HASH)
def dispatch_figure_cached(key: AnalysisKey, layer: int, title: str, _image) -> Any:
    """The interactive dispatch map of one stage, built once per (image, plan, layer)."""
    analysis = analyse_image(key, _image)
    record = next(r for r in analysis.stages if r.layer == layer)
    return dispatch_figure(model_crop(key, _image), record, key.loaded().grid_size, title=title)


def plan_caption(plan: ReductionPlan, depth: int) -> str:
    """The plan in words: the keep rate (only for methods that have one), the layers, the parameters."""
    spec = plan.spec()
    parts = [f"keep rate {plan.keep_rate:g}"] if spec.uses_keep_rate else []
    parts.append(f"layers {','.join(map(str, plan.reducing_layers(depth)))}")
    parts += [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in plan.param_dict().items()]
    return ", ".join(parts)


@st.cache_data(show_spinner="Rolling the attention out…", max_entries=32, hash_funcs=KEY_HASH)
def rollout_values(key: AnalysisKey, fusion: str, discard_ratio: float, _image) -> dict[str, Any]:
    """`analysis.patterns.image_rollout` of one image under `key.plan`, as numpy arrays and floats."""
    from analysis.models import preprocess
    from analysis.patterns import image_rollout

    loaded = key.loaded()
    batch = preprocess([_image], loaded.model, key.crop_pct).to(loaded.device)
    out = image_rollout(loaded.model, batch, key.plan, loaded.extras, fusion, discard_ratio)
    return {"rollout": out["rollout"][0].cpu().numpy(), "dense_rollout": out["dense_rollout"][0].cpu().numpy(),
            "overlap": float(out["overlap"][0]), "dense_overlap": float(out["dense_overlap"][0]),
            "kept": int(out["kept"][0].sum())}


def rollout_panel(method: str, analysis: Analysis, loaded: LoadedModel, slug: str, key: AnalysisKey, image: Image.Image) -> None:
    """Attention rollout (Abnar & Zuidema 2020) through the method's reductions beside the dense
    rollout, and how many of the rollout's top patches the method kept (built when opened)."""
    from analysis.patterns import HEAD_FUSIONS

    if not st.toggle("Attention rollout through the reductions", key=f"rollout_{method}",
                     help="merged or fused tokens spread over their patches, a pruned patch stops receiving"):
        return
    left, middle, right = st.columns(3)
    fusion = left.selectbox("Head fusion", HEAD_FUSIONS, key=f"rollout_fusion_{method}")
    ratio = left.slider("Discard ratio (lowest attention zeroed)", 0.0, 0.95, 0.0, 0.05, key=f"rollout_ratio_{method}")
    plan_key = key.with_plan(analysis.plan)
    try:
        values = rollout_values(plan_key, fusion, float(ratio), image)
    except TokenscopeError as err:
        st.error(f"{err}")
        return
    left.metric("Overlap: kept patches among the rollout's top patches", f"{values['overlap']:.2f}",
                help=f"share of the {values['kept']} highest-rollout patches that kept a token of their own after the last "
                     f"block (with the dense rollout: {values['dense_overlap']:.2f})")
    crop = model_crop(plan_key, image)
    for column, name, title in ((middle, "rollout", f"rollout through {get_method(method).label}'s reductions"),
                                (right, "dense_rollout", "rollout of the dense model")):
        picture = png_bytes(labelled(attention_view(crop, values[name], loaded.grid_size, legend=False), loaded))
        column.image(picture, caption=f"{title} ({fusion} over heads, discard {ratio:g})", width="stretch", output_format="PNG")
        download_png(column, "PNG", picture, f"{slug}_{method}_{name}.png", f"dl_{method}_{name}")


def method_tab(method: str, analysis: Analysis, dense: Analysis, crop: Image.Image, loaded: LoadedModel, slug: str,
               settings: Settings, key: AnalysisKey, image: Image.Image) -> None:
    spec = get_method(method)
    g = analysis.gmacs
    st.caption(f"{spec.describe()} · plan: {plan_caption(analysis.plan, len(loaded.model.blocks))}")
    st.markdown(f"**{g['gmacs']:.2f} GMACs** per image (dense {g['dense_gmacs']:.2f}, {g['reduction_pct']:.0f} % fewer) · "
                f"tokens after the last block: {analysis.token_counts[-1]}")
    stage_panels(method, analysis, crop, loaded, slug, settings, key, image)
    rollout_panel(method, analysis, loaded, slug, key, image)
    left, right = st.columns(2)
    suffix = " (random weights)" if loaded.is_random else ""
    left.markdown(f"**Top-5, {spec.label}**{suffix}")
    left.dataframe(predictions_table(analysis.top5), width="stretch")
    right.markdown(f"**Top-5, dense model**{suffix}")
    right.dataframe(predictions_table(dense.top5), width="stretch")


def comparison_entries(row: str) -> list[tuple[Any, Any]]:
    """(method, entry) of every registered method that joins comparison `row`, in the row's order."""
    entries = [(method, entry) for method in all_methods().values() for entry in method.comparison if entry.row == row]
    return sorted(entries, key=lambda item: item[1].order)


def comparison_plan(method, entry, settings: Settings, depth: int, n0: int, target: list[int]) -> ReductionPlan:
    """The method's plan at the row's budget (`Method.budget` with the target counts), with the
    row's parameter overrides."""
    layers = settings.layers if method.default_layers is not None else None
    plan = method.budget(settings.keep_rate, depth, n0, layers=settings.layers, target_counts=target)
    if layers is not None and plan.layers is None and method.uses_keep_rate:
        plan = ReductionPlan.make(plan.method, plan.keep_rate, layers, **dict(plan.params))
    overrides = dict(entry.params)
    if overrides:
        plan = ReductionPlan.make(plan.method, plan.keep_rate, plan.layers, **{**dict(plan.params), **overrides})
    return plan


def comparison_section(key: AnalysisKey, image: Image.Image, crop: Image.Image, loaded: LoadedModel, settings: Settings, slug: str) -> None:
    """Every comparison row (`COMPARISON_ROWS`, e.g. BAT's figure): (a) input, then each method that
    joins the row at the same token count per stage (methods meet it through `Method.budget`)."""
    depth, n0 = len(loaded.model.blocks), loaded.num_patches + 1
    target = keep_rate_counts(settings.keep_rate, depth, n0, settings.layers or (4, 7, 10))
    for row_index, (row, heading) in enumerate(COMPARISON_ROWS.items()):
        entries = comparison_entries(row)
        runnable = [(m, e) for m, e in entries if method_unavailable(m, loaded.model, loaded.extras) is None]
        if len(runnable) < 2:
            continue  # one method is no comparison
        st.subheader(heading)
        titles = ", ".join(entry.title for _, entry in runnable)
        # Drawn when opened: a row runs each of its methods once per setting (on DeiT-S on the CPU the
        # three rows took 2.3 s of a 2.8 s rerun after a keep-rate move); the choice persists in the session.
        if not st.toggle(f"draw this row ({len(runnable)} methods at the same budget)", key=f"compare_show_{row}",
                         help=f"{titles}. Each method runs once per image and setting (cached), so with the row open a "
                              "keep-rate or layer change costs one forward pass per method more."):
            st.caption(f"Methods in this row: {titles}.")
            continue
        runs = [(method, entry, analyse_image(key.with_plan(comparison_plan(method, entry, settings, depth, n0, target)), image))
                for method, entry in runnable]
        layers = sorted({record.layer for _, _, analysis in runs for record in analysis.stages
                         if record.layer in (settings.layers or (4, 7, 10))})
        if not layers:
            st.info("At this keep rate no method reduces anything, so there is nothing to compare.")
            continue
        layer = st.select_slider("Stage (layer) to compare", layers, value=layers[-1], key=f"compare_layer_{row}")
        picture, caption = comparison_picture(key, row, layer, tuple(layers), settings, image)
        st.image(picture, caption=caption, width="stretch", output_format="PNG")
        download_png(st, "PNG", picture, f"{slug}_comparison_{row}_layer{layer}.png", f"dl_comparison_{row_index}")


@st.cache_data(show_spinner=False, max_entries=32, hash_funcs=KEY_HASH)
def comparison_picture(key: AnalysisKey, row: str, layer: int, layers: tuple[int, ...], settings: Settings, _image) -> tuple[bytes, str]:
    """PNG bytes and caption of one comparison row at one stage, drawn once per (image, row, stage,
    settings) (the runs themselves are `analyse_image`'s, cached)."""
    loaded = key.loaded()
    crop = model_crop(key, _image)
    depth, n0 = len(loaded.model.blocks), loaded.num_patches + 1
    target = keep_rate_counts(settings.keep_rate, depth, n0, settings.layers or (4, 7, 10))
    targets = {block: count for block, count in enumerate(target, 1)}
    runs = [(method, entry, analyse_image(key.with_plan(comparison_plan(method, entry, settings, depth, n0, target)), _image))
            for method, entry in comparison_entries(row) if method_unavailable(method, loaded.model, loaded.extras) is None]
    shown = []  # (title, stage record, caption) per method that has reduced by this layer
    counts_line = []
    for index, (method, entry, analysis) in enumerate(runs):
        # a method reducing in more blocks than the row's layers: its last stage up to this layer
        record = max((r for r in analysis.stages if r.layer <= layer), key=lambda r: r.layer, default=None)
        if record is None:
            continue
        caption = f"{record.n_tokens} tokens after layer {layer}"
        if record.n_tokens != targets[layer]:
            caption += f" (budget {targets[layer]}: not met exactly)"
        shown.append((f"({chr(ord('b') + index)}) {entry.title}", record, caption))
        counts_line.append(f"{entry.title.split(':')[-1].strip()}: "
                           f"{', '.join(str(analysis.token_counts[block - 1]) for block in layers)}")
    views = draw_in_parallel([lambda r=record: stage_view(crop, r, loaded.grid_size, legend=False, merge_style=settings.merge_style)
                              for _, record, _ in shown])
    panels = [Panel("(a) input", crop, f"{loaded.num_patches} patches")]
    panels += [Panel(title, view, caption) for (title, _, caption), view in zip(shown, views)]
    overrides = [f"{method.label} with {', '.join(f'{k}={v}' for k, v in entry.params)}" for method, entry, _ in runs if entry.params]
    note = (f"Tokens (cls included) after layers {', '.join(map(str, layers))}: " + "; ".join(counts_line) +
            f". Budget: keep rate {settings.keep_rate:g}, ceil(rho n) tokens per stage ({', '.join(str(targets[b]) for b in layers)}); "
            "methods without a keep rate follow these counts block by block through their own budget parameter"
            + (f"; {'; '.join(overrides)}" if overrides else "") + ".")
    picture = labelled(comparison_row(panels, panel_size=224, note=note), loaded)
    return png_bytes(picture), " · ".join(panel.title for panel in panels)


def counts_table(analyses: dict[str, Analysis], dense: Analysis) -> pd.DataFrame:
    """Tokens (cls included) leaving each block, one column per method."""
    columns = {"dense": dense.token_counts}
    columns.update({get_method(name).label: analysis.token_counts for name, analysis in analyses.items()})
    return pd.DataFrame(columns, index=pd.Index(range(1, len(dense.token_counts) + 1), name="block"))


def summary_table(analyses: dict[str, Analysis], dense: Analysis) -> pd.DataFrame:
    """GMACs, tokens after the last block and top-1 prediction of the dense model and each method."""
    rows = {"dense": dense, **{get_method(name).label: analysis for name, analysis in analyses.items()}}
    return pd.DataFrame({
        "GMACs": [round(a.gmacs["gmacs"], 3) for a in rows.values()],
        "tokens after last block": [a.token_counts[-1] for a in rows.values()],
        "top-1": [a.top5[0]["label"].split(",")[0] for a in rows.values()],
        "prob": [round(a.top5[0]["prob"], 3) for a in rows.values()],
    }, index=list(rows))


def diversity_section(analyses: dict[str, Analysis], dense: Analysis, loaded: LoadedModel, key: AnalysisKey,
                      image: Image.Image) -> None:
    """Diversity r(Z) of every block's output (methods.md §5), one line per method (viz.charts),
    with the options of §5: medoid (BAT's definition) or median centre, per-token normalisation
    (so methods with different token counts compare) and size weighting."""
    depth = len(loaded.model.blocks)
    left, middle, right = st.columns(3)
    centre = left.radio("Diversity centre", ("medoid", "median"), horizontal=True, key="diversity_centre",
                        help="medoid: the centre is one of the tokens (BAT's r(Z)); median: any vector, the channel-wise "
                             "median (median <= medoid <= 2 median)")
    per_token = middle.checkbox("Per token (divide by the token count)", value=True, key="diversity_per_token",
                                help="Methods keep different numbers of tokens; per token they compare.")
    size_weighted = right.checkbox("Size-weighted (a token counts once per patch it holds)", key="diversity_size_weighted")

    def values(analysis: Analysis) -> list[float]:  # cached across reruns (ui.shared.image_diversity)
        raw, normalised = image_diversity(key.with_plan(analysis.plan), centre, size_weighted, image)
        return (normalised if per_token else raw).tolist()

    series = [{"method": "none", "label": "dense", "values": values(dense), "reducing_layers": []}]
    series += [{"method": name, "label": get_method(name).label, "values": values(a),
                "reducing_layers": list(a.plan.reducing_layers(depth))} for name, a in analyses.items()]
    title = "Token diversity r(Z) per block, this image" + (" (random weights)" if loaded.is_random else "")
    series_json = json.dumps(series)
    shown = diversity_figure(series_json, per_token)
    centre_text = "the medoid token" if centre == "medoid" else "the channel-wise median"
    st.markdown(f"**{title}** (l1 distance to {centre_text}{', per token' if per_token else ''}"
                f"{', size-weighted' if size_weighted else ''}; methods.md §5)")
    st.plotly_chart(shown, key="diversity_chart")
    # the download (the chart with its title) is built only when pressed
    st.download_button("HTML", data=lambda: html_bytes(diversity_chart(json.loads(series_json), title=title, per_token=per_token)),
                       file_name="diversity_per_block.html", mime="text/html", key="dl_diversity", on_click="ignore")


# Figures are built once per data and shared as they are (never mutated): building a plotly figure
# costs tens of milliseconds, a visible part of a rerun.
@st.cache_resource(show_spinner=False, max_entries=64)
def diversity_figure(series_json: str, per_token: bool) -> go.Figure:
    """The diversity chart as the page shows it: under Streamlit's theme the chart's title and its top
    legend overlap, so the page puts the title above and the chart has none."""
    return diversity_chart(json.loads(series_json), title=None, per_token=per_token).update_layout(margin=dict(t=40))


# --- the page ----------------------------------------------------------------------------------
def main() -> None:
    st.set_page_config(page_title="tokenscope", layout="wide")
    st.title("tokenscope")
    st.caption("What token pruning and merging do inside a Vision Transformer: which tokens are dropped, fused, "
               "squeezed into a host token or merged, where the class attention goes, and what it changes.")
    choice = model_sidebar()
    loaded = choice.loaded
    if loaded is None:
        st.stop()
    try:
        settings = method_sidebar(loaded)
    except (PlanError, ValueError) as err:
        st.error(f"{err}. Fix the setting in the sidebar.")
        st.stop()
    badge = weights_badge(loaded)
    (st.warning if loaded.is_random else st.caption)(badge)

    data, name = read_input()
    try:
        image = open_image(data, name)
    except ImageLoadError as err:
        st.error(f"{err}. Upload a JPEG, PNG, WebP, BMP, TIFF or GIF image, or clear the upload to use a sample photo.")
        st.stop()
    digest = hashlib.sha256(data).hexdigest()
    slug = Path(name).stem.replace(" ", "_")[:40]

    # Compute everything first, so a bad setting shows one error and nothing half-drawn.
    try:
        plans = {method: plan_for(method, settings) for method in settings.methods}
        for plan in plans.values():
            plan.validate(len(loaded.model.blocks))
        with st.spinner("Running the model…"):
            key = AnalysisKey(digest, loaded.name, loaded.weights, loaded.device, ReductionPlan(), settings.crop_pct)
            crop = model_crop(key, image)
            dense = analyse_image(key, image)
            analyses = {method: analyse_image(key.with_plan(plan), image) for method, plan in plans.items()}
    except TokenscopeError as err:
        st.error(f"{err}. Change the keep rate, layers or method parameters in the sidebar.")
        st.stop()

    left, right = st.columns([1, 2.2])
    left.image(crop_picture(key, image), caption=f"input crop the model sees ({crop.width}×{crop.height}, "
                                               f"{loaded.grid_size[0]}×{loaded.grid_size[1]} patches)", width="stretch", output_format="PNG")
    if analyses:
        right.markdown("**Summary per method**" + (" (random weights)" if loaded.is_random else ""))
        right.dataframe(summary_table(analyses, dense), width="stretch")
    else:
        right.markdown("**Dense model, top-5**" + (" (random weights)" if loaded.is_random else ""))
        right.dataframe(predictions_table(dense.top5), width="stretch")
    st.markdown("**Tokens leaving each block** (cls included)")
    st.dataframe(counts_table(analyses, dense).T, width="stretch")

    if analyses:
        tabs = st.tabs([get_method(method).label for method in analyses])
        for tab, (method, analysis) in zip(tabs, analyses.items()):
            with tab:
                method_tab(method, analysis, dense, crop, loaded, slug, settings, key, image)
        diversity_section(analyses, dense, loaded, key, image)
    else:
        st.info("Choose one or more methods in the sidebar to see their pictures.")
    try:
        comparison_section(key, image, crop, loaded, settings, slug)
    except TokenscopeError as err:
        st.error(f"The comparison row cannot run: {err}. Change the keep rate or layers in the sidebar.")
    st.caption(badge)


main()
