"""Curves: accuracy, GMACs and diversity per method and keep rate over a labelled image folder.

Either load the results of `python -m analysis sweep` (upload or path), or run a sweep here on a
folder (the same `analysis.sweep.run_sweep`, with a progress bar). Then: top-1 vs keep rate and vs
GMACs, mean diversity r(Z) per layer, the results table, and the paper figures as a zip.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.figures import model_rows, pick_keep_rate, write_figures, zip_bytes
from analysis.engine import method_unavailable
from analysis.registry import all_methods
from analysis.errors import TokenscopeError
from analysis.models import PAPER_CROP_PCT
from analysis.sweep import CSV_COLUMNS, SweepConfig, load_results, run_sweep
from ui.shared import cached_model, default_methods, model_sidebar, results_source, weights_badge
from viz.charts import accuracy_vs_gmacs, accuracy_vs_keep_rate, diversity_chart, diversity_series_from_rows

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "imagenet-sample" / "val"
KEEP_RATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
SOURCES = ("Load a results file", "Run a sweep on a folder")


def _label(name: str) -> str:
    methods = all_methods()
    return methods[name].label if name in methods else ("Dense" if name == "none" else name)


def load_source() -> dict | None:
    """Results from an upload or a path, or None (after st.info / st.error)."""
    return results_source("curves", "results.json from `python -m analysis sweep`", "Upload a results.json or type its path; or choose “Run a sweep on a folder” above.")


def run_source() -> dict | None:
    """Sweep settings, the Run button and its progress bar; returns the results once there are some."""
    choice = model_sidebar(key="model")
    loaded = choice.loaded
    if loaded is None:
        return None
    st.caption(weights_badge(loaded))
    runnable = [name for name, method in all_methods().items() if method_unavailable(method, loaded.model, loaded.extras) is None]
    left, middle, right = st.columns(3)
    data = left.text_input("Image folder (WordNet-id folders, index folders, or flat + ground-truth file)",
                           value=str(SAMPLE) if SAMPLE.is_dir() else "", key="curves_data")
    labels = left.text_input("Ground-truth file for a flat folder (optional)", key="curves_labels")
    methods = middle.multiselect("Methods", runnable, default=default_methods(runnable),
                                 format_func=_label, key="curves_methods")
    keep_rates = middle.multiselect("Keep rates (methods without one meet each rate's token budget)", KEEP_RATES, default=[1.0, 0.7, 0.5], key="curves_keep_rates")
    limit = right.number_input("Images (0 = all)", min_value=0, value=100, step=50, key="curves_limit")
    batch_size = right.number_input("Batch size", min_value=1, max_value=512, value=32, key="curves_batch")
    crop = right.radio("Crop", ("model's timm config", f"papers' {PAPER_CROP_PCT}"), horizontal=True, key="curves_crop")
    centre = middle.radio("Diversity centre", ("medoid", "median"), horizontal=True, key="curves_centre",
                          help="medoid: one of the tokens (BAT's r(Z)); median: the channel-wise median (free centre)")
    size_weighted = middle.checkbox("Size-weighted diversity (a token counts once per patch it holds)", key="curves_size_weighted")
    out = st.text_input("Output folder (results.json, results.csv; finished settings are not rerun)",
                        value=str(Path("runs") / "curves" / loaded.name), key="curves_out")
    if st.button("Run sweep", type="primary", key="curves_run"):
        if not methods or not keep_rates:
            st.error("Pick at least one method and one keep rate.")
            return None
        bar = st.progress(0.0, text="starting…")
        config = SweepConfig(
            data=data.strip(), labels=labels.strip() or None, model=loaded.name, weights=loaded.weights, device=loaded.device,
            methods=tuple(methods), keep_rates=tuple(sorted(keep_rates, reverse=True)), limit=int(limit) or None,
            batch_size=int(batch_size), workers=2, out=out.strip(), crop_pct=None if crop.startswith("model") else PAPER_CROP_PCT,
            diversity_centre=centre, diversity_size_weighted=size_weighted,
        )
        try:
            outcome = run_sweep(config, loaded=loaded, progress=lambda fraction, text: bar.progress(fraction, text=text), show_bar=False)
        except TokenscopeError as err:
            bar.empty()
            st.error(f"{err}. Fix the folder or the settings and run again.")
            return None
        st.success(f"{outcome.ran} settings run, {outcome.skipped_settings} already done · {outcome.out / 'results.json'}")
        st.session_state["curves_results_path"] = str(outcome.out)
    saved = st.session_state.get("curves_results_path")
    if saved:
        try:
            return load_results(saved)
        except TokenscopeError as err:
            st.error(f"{err}")
    return None


@st.cache_data(show_spinner="Drawing the paper figures…", max_entries=4)
def figures_zip(content_text: str, keep_rate: float) -> tuple[bytes, dict[str, str]]:
    """The paper figures (PDF, SVG, PNG) and tables of these results, zipped; and what was skipped."""
    content = json.loads(content_text)
    rows = model_rows(content)
    config = content.get("config", {})
    loaded = None
    try:
        loaded = cached_model(rows[0]["model"], config.get("weights", "pretrained"), "cpu")
    except TokenscopeError:
        pass  # the grid is then skipped with its reason
    with tempfile.TemporaryDirectory() as folder:
        outcome = write_figures(content, folder, keep_rate=keep_rate, loaded=loaded)
        if loaded is None and "grid" not in outcome["skipped"]:
            outcome["skipped"]["grid"] = "the sweep's model could not be loaded here"
        return zip_bytes(outcome["written"]), outcome["skipped"]


def show(content: dict) -> None:
    """Charts, table and the figures download for loaded results."""
    try:
        rows = model_rows(content)
    except TokenscopeError as err:
        st.error(f"{err}")
        return
    models = sorted({row["model"] for row in content["rows"]})
    if len(models) > 1:
        chosen = st.selectbox("Model", models, index=models.index(rows[0]["model"]), key="curves_model_rows")
        rows = model_rows(content, chosen)
    first = rows[0]
    note = f"{first['model']} · weights: {first.get('weights', '?')} · {max(r.get('n_images', 0) for r in rows)} images"
    note += f" ({first.get('n_skipped', 0)} unreadable, skipped) · crop {first.get('crop_pct', '?')} · {first.get('device', '?')}"
    if "random" in str(first.get("weights", "")):
        st.warning("Random weights: these accuracies are meaningless.")
    st.caption(note)

    left, right = st.columns(2)
    left.plotly_chart(accuracy_vs_keep_rate(rows), width="stretch", key="curves_chart_keep")
    right.plotly_chart(accuracy_vs_gmacs(rows), width="stretch", key="curves_chart_gmacs")

    if any(row.get("diversity") for row in rows):
        rates = sorted({row["keep_rate"] for row in rows}, reverse=True)
        default = pick_keep_rate(rows)
        a, b = st.columns([1, 3])
        rate = a.selectbox("Diversity at keep rate", rates, index=rates.index(default), key="curves_div_rate")
        per_token = a.toggle("Per token (divide by the token count)", value=True, key="curves_div_per_token")
        a.caption("r(Z) = min_j Σ_i ‖Z_i − Z_j‖₁ over the non-cls tokens of each block's output (BAT), averaged over "
                  f"{first.get('diversity_images', 'the')} images; centre: {first.get('diversity_centre', 'medoid')}"
                  + (", size-weighted." if first.get("diversity_size_weighted") else "."))
        series = diversity_series_from_rows(rows, rate, per_token)
        b.plotly_chart(diversity_chart(series, per_token=per_token, title=f"Diversity per layer at keep rate {rate:g}"),
                       width="stretch", key="curves_chart_diversity")
    else:
        st.info("These results hold no diversity values (the sweep ran with --diversity-images 0).")

    notes = sorted({row["timing_note"] for row in rows if row.get("timing_note")})
    for text in notes:
        st.warning(f"Throughput column: {text}.")
    frame = pd.DataFrame([{**{c: row.get(c) for c in CSV_COLUMNS}, "params": json.dumps(row.get("params", {}))} for row in rows])
    frame["method"] = [_label(m) for m in frame["method"]]
    st.dataframe(frame.drop(columns=["label"]), hide_index=True, width="stretch", key="curves_table")

    rate = pick_keep_rate(rows)
    if st.button("Prepare the paper figures (zip)", key="curves_figures"):
        try:
            data, skipped = figures_zip(json.dumps(content, sort_keys=True), rate)
        except TokenscopeError as err:
            st.error(f"{err}")
            return
        for name, reason in skipped.items():
            st.info(f"Figure “{name}” skipped: {reason}")
        st.download_button("Download the paper figures (PDF, SVG, PNG) and tables", data=data,
                           file_name="tokenscope-figures.zip", mime="application/zip", key="curves_download")


def main() -> None:
    st.set_page_config(page_title="tokenscope · Curves", layout="wide")
    st.title("Curves")
    st.caption("Top-1 and GMACs per method and keep rate over a labelled ImageNet-style folder, and how diverse the "
               "tokens stay layer by layer. Same code as `python -m analysis sweep` and `python -m analysis figures`.")
    source = st.radio("Results", SOURCES, horizontal=True, key="curves_source")
    content = load_source() if source == SOURCES[0] else run_source()
    if content is not None:
        show(content)


main()
