"""Compare: where each method keeps tokens over a dataset, how methods agree at equal budget, how far
each strays from the dense model, and how these relate to the accuracy drop.

Reads the results of `python -m analysis sweep --patterns` (upload or path); the same tables and
figures as `python -m analysis compare` (analysis/compare.py), drawn with plotly; every chart can be
downloaded (interactive HTML and its data as CSV), and the paper figures as a zip.
"""
from __future__ import annotations

import json
import tempfile

import pandas as pd
import streamlit as st

from analysis.compare import (CORRELATED, MEASURE_LABELS, agreement_blocks, agreement_groups, agreement_table,
                              correlation_table, fidelity_table, keep_rates, map_table, methods_of,
                              pattern_rows, pick_keep_rate, row_at, write_compare)
from analysis.errors import TokenscopeError
from analysis.figures import zip_bytes
from analysis.patterns import MAP_METRICS

from ui.shared import results_source
from viz.compare_charts import (agreement_chart, cka_chart, correlation_chart, fidelity_chart, keep_frequency_maps,
                                map_similarity_chart)


def load_source() -> dict | None:
    """Results from an upload or a path, or None (after st.info / st.error)."""
    return results_source("compare", "results.json from `python -m analysis sweep --patterns`", "Upload a results.json or type its path. Run the sweep with `--patterns` to have the measures this page shows.")


def chart(fig, key: str, frame: pd.DataFrame | None = None) -> None:
    """A plotly chart with its downloads (interactive HTML, and the data as CSV when given)."""
    st.plotly_chart(fig, width="stretch", key=key)
    a, b, _ = st.columns([1, 1, 4])
    a.download_button("Download chart (HTML)", data=fig.to_html(include_plotlyjs="cdn"), file_name=f"{key}.html",
                      mime="text/html", key=f"{key}_html")
    if frame is not None:
        b.download_button("Download data (CSV)", data=frame.to_csv(index=False), file_name=f"{key}.csv", mime="text/csv",
                          key=f"{key}_csv")


@st.cache_data(show_spinner="Comparing the maps…", max_entries=16)
def cached_map_table(content_text: str, which: str) -> list[dict]:
    """`analysis.compare.map_table` of these results (its EMDs are linear programmes: computed once)."""
    return map_table(pattern_rows(json.loads(content_text)), which)


@st.cache_data(show_spinner="Drawing the paper figures…", max_entries=4)
def figures_zip(content_text: str, keep_rate: float) -> tuple[bytes, dict[str, str]]:
    with tempfile.TemporaryDirectory() as folder:
        outcome = write_compare(json.loads(content_text), folder, keep_rate=keep_rate)
        return zip_bytes(outcome["written"]), outcome["skipped"]


def show(content: dict) -> None:
    try:
        rows = pattern_rows(content)
    except TokenscopeError as err:
        st.error(f"{err}")
        return
    first = rows[0]
    st.caption(f"{first['model']} · weights: {first.get('weights', '?')} · {max(r.get('n_images', 0) for r in rows)} images")
    rates = keep_rates(rows)
    default = pick_keep_rate([r for r in rows if r["method"] != "none"] or rows)
    rate = st.selectbox("Keep rate (equal budget)", rates, index=rates.index(default) if default in rates else 0, key="compare_rate")

    st.subheader("Where each method keeps tokens")
    st.caption("Keep frequency: the share of images in which a patch still has a token of its own (neither discarded, fused "
               "nor merged) after each reduction stage; survival depth: the last block at which it had one (mean over images).")
    methods = [m for m in methods_of(rows) if row_at(rows, m, rate)]
    for method in methods:
        row = row_at(rows, method, rate)
        frame = pd.DataFrame(row["keep_frequency"]).T.rename(columns=lambda d: f"block_{d + 1}")
        frame.insert(0, "patch", range(len(frame)))
        frame["survival_depth"] = row["survival_depth"]
        chart(keep_frequency_maps(rows, method, rate), f"compare_maps_{method}", frame)

    st.subheader("Agreement between methods at equal budget")
    st.caption("Per image and stage, then the mean over the folder: IoU of the kept-patch sets among pruning methods; "
               "normalised mutual information between the patch partitions among merging methods.")
    groups = agreement_groups(rows)
    blocks = agreement_blocks(rows, rate, limit=12)
    if groups:
        block = st.select_slider("After block", blocks, value=blocks[-1], key="compare_block") if len(blocks) > 1 else blocks[0]
        pairs = pd.DataFrame(agreement_table(rows, block))
        columns = st.columns(len(groups))
        for column, (measure, title, chosen) in zip(columns, groups):
            with column:
                chart(agreement_chart(rows, rate, measure, block, chosen, title), f"compare_agreement_{measure}", pairs)
        st.dataframe(pairs, hide_index=True, width="stretch", key="compare_agreement_table")
    else:
        st.info("Agreement needs at least two reduced methods in the sweep.")

    st.subheader("Similarity of the keep-frequency maps")
    st.caption("MIT saliency benchmark definitions (Bylinskii et al.): KL, CC (Pearson), SIM (histogram intersection), EMD "
               "(exact, scipy, ground distance in patches); plus JS and Spearman's SCC.")
    a, b = st.columns([1, 3])
    metric = a.selectbox("Metric", MAP_METRICS, key="compare_metric")
    which = a.radio("Map", ("keep_frequency", "survival_depth"), key="compare_which",
                    format_func=lambda w: "keep frequency (last block)" if w == "keep_frequency" else "survival depth")
    maps = pd.DataFrame(cached_map_table(json.dumps(content, sort_keys=True), which))
    with b:
        chart(map_similarity_chart(rows, maps.to_dict("records"), rate, metric, which), "compare_map_similarity", maps)

    st.subheader("Fidelity to the dense model")
    left, right = st.columns(2)
    fidelity = pd.DataFrame(fidelity_table(rows))
    with left:
        measure = st.selectbox("Measure", ("dense_agreement", "dense_kl", "dense_cosine", "cka_final"),
                               format_func=MEASURE_LABELS.get, key="compare_fidelity_measure")
        chart(fidelity_chart(rows, measure), "compare_fidelity", fidelity)
    with right:
        chart(cka_chart(rows, rate), "compare_cka")

    st.subheader("Correlation with the accuracy drop")
    correlations = pd.DataFrame(correlation_table(rows))
    st.dataframe(correlations, hide_index=True, width="stretch", key="compare_correlation_table")
    chosen = st.selectbox("Scatter", CORRELATED, format_func=MEASURE_LABELS.get, key="compare_scatter")
    chart(correlation_chart(rows, chosen), "compare_correlation", correlations)

    if st.button("Prepare the paper figures and tables (zip)", key="compare_figures"):
        try:
            data, skipped = figures_zip(json.dumps(content, sort_keys=True), rate)
        except TokenscopeError as err:
            st.error(f"{err}")
            return
        for name, reason in skipped.items():
            st.info(f"Figure “{name}” skipped: {reason}")
        st.download_button("Download the figures (PDF, SVG, PNG) and tables (CSV, Markdown, LaTeX)", data=data,
                           file_name="tokenscope-compare.zip", mime="application/zip", key="compare_download")


def main() -> None:
    st.set_page_config(page_title="tokenscope · Compare", layout="wide")
    st.title("Compare")
    st.caption("Dataset-level analysis of a `python -m analysis sweep --patterns`: the same measures as "
               "`python -m analysis compare RESULTS_DIR --out DIR`.")
    content = load_source()
    if content is not None:
        show(content)


main()
