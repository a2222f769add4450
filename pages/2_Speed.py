"""Speed: the throughput benchmark of `python -m analysis bench`, in the app.

The same `analysis.bench.run_benchmark` as the CLI (random input, provenance off, inference mode,
interleaved rounds, median with IQR), with a progress bar; the table and a chart of the measured
speedup against the GMACs ratio. Nothing runs until the button is pressed.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from analysis.bench import CSV_COLUMNS, BenchConfig, contention_note, dtype_label, make_settings, run_benchmark
from analysis.engine import method_unavailable
from analysis.registry import all_methods
from analysis.errors import TokenscopeError
from ui.shared import default_methods, model_sidebar, weights_badge

KEEP_RATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The speedups first, so they stay on screen; device, precision and threads go in the caption.
TABLE_COLUMNS = ["setting", "batch_size", "speedup_vs_dense", "gmacs_ratio", "images_per_s", "latency_ms", "latency_ms_q1",
                 "latency_ms_q3", "gmacs"]


BOUND_COLUMNS = ["speedup_bound", "method_overhead_pct"]


def _label(name: str) -> str:
    methods = all_methods()
    return methods[name].label if name in methods else name


def _setting(keep_rate: float, r: float) -> str:
    return f"r={int(r)}" if pd.notna(r) and r != "" else f"keep {keep_rate:g}"


def speedup_figure(frame: pd.DataFrame) -> go.Figure:
    """Measured speedup (median, whiskers from the IQR of the setting's latency) against the GMACs
    ratio, one trace per method and batch size, with the line where speedup equals the GMACs ratio
    and, when the run timed them, the token-count bounds (`speedup_bound`) as open circles."""
    figure = go.Figure()
    reduced = frame[frame["method"] != "none"]
    for (method, batch), group in reduced.groupby(["method", "batch_size"], sort=False):
        dense_latency = frame[(frame["method"] == "none") & (frame["batch_size"] == batch)]["latency_ms"].iloc[0]
        upper = dense_latency / group["latency_ms_q1"] - group["speedup_vs_dense"]
        lower = group["speedup_vs_dense"] - dense_latency / group["latency_ms_q3"]
        setting = [_setting(k, r) for k, r in zip(group["keep_rate"], group["r"])]
        figure.add_trace(go.Scatter(
            x=group["gmacs_ratio"], y=group["speedup_vs_dense"], mode="markers", name=f"{_label(method)}, batch {batch}",
            text=setting, marker={"size": 11},
            error_y={"type": "data", "array": upper.clip(lower=0), "arrayminus": lower.clip(lower=0)},
            hovertemplate="%{text}<br>GMACs ratio %{x:.2f}x<br>speedup %{y:.2f}x<extra>%{fullData.name}</extra>",
        ))
    bound = reduced[reduced["speedup_bound"].notna()]
    if len(bound):
        figure.add_trace(go.Scatter(
            x=bound["gmacs_ratio"], y=bound["speedup_bound"], mode="markers",
            name="token-count bound (same counts, no method work)", marker={"size": 13, "symbol": "circle-open", "color": "black"},
            text=[f"{_label(m)} {_setting(k, r)}, batch {b}" for m, k, r, b in zip(bound["method"], bound["keep_rate"], bound["r"], bound["batch_size"])],
            hovertemplate="%{text}<br>GMACs ratio %{x:.2f}x<br>bound %{y:.2f}x<extra>token-count bound</extra>",
        ))
    highest = [float(reduced["gmacs_ratio"].max()), float(reduced["speedup_vs_dense"].max())] if len(reduced) else [1.0]
    if len(bound):
        highest.append(float(bound["speedup_bound"].max()))
    top = max(2.0, *highest) * 1.05
    figure.add_trace(go.Scatter(x=[1.0, top], y=[1.0, top], mode="lines", name="speedup = GMACs ratio",
                                line={"dash": "dot", "color": "grey"}))
    figure.update_layout(xaxis_title="GMACs ratio (dense / reduced)", yaxis_title="measured speedup over dense (median)",
                         height=480, legend={"orientation": "h", "y": -0.2})
    return figure


def main() -> None:
    st.set_page_config(page_title="tokenscope · Speed", layout="wide")
    st.title("Speed: does token reduction make the model faster?")
    st.caption("Seeded random input, provenance off, torch.inference_mode; each setting is warmed up, then timed in "
               "interleaved rounds. Median latency per batch with its interquartile range (IQR); speedup = dense "
               "median / reduced median from the same run. Same code as `python -m analysis bench` with the system "
               "memory allocator (the CLI's `--allocator steady` removes page faults; see the README's Speed section).")
    choice = model_sidebar()
    loaded = choice.loaded
    if loaded is None:
        return
    st.caption(weights_badge(loaded))

    runnable = [name for name, method in all_methods().items() if method_unavailable(method, loaded.model, loaded.extras) is None]
    unavailable = [name for name in all_methods() if name not in runnable]
    left, middle, right = st.columns(3)
    methods = left.multiselect("Methods (the dense model is always timed)", runnable,
                               default=default_methods(runnable), format_func=_label, key="speed_methods")
    keep_rates = left.multiselect("Keep rates", KEEP_RATES, default=[0.7, 0.5], key="speed_keep_rates")
    with_r = [_label(name) for name in runnable if all_methods()[name].param("r") is not None and not all_methods()[name].uses_keep_rate]
    fixed_r = left.checkbox(f"Methods with an r parameter ({', '.join(with_r) or 'none'}) at a fixed r", value=True, key="speed_fixed_r",
                            help="On: they merge r tokens per block; off: every method without a keep rate meets each keep rate's token budget.")
    r_value = left.number_input("r, tokens merged per block", min_value=0, max_value=98, value=13, step=1, key="speed_r",
                                disabled=not fixed_r)
    batch_sizes = middle.multiselect("Batch sizes", BATCH_SIZES, default=[32], key="speed_batch_sizes")
    amp = middle.checkbox("Autocast (float16 on CUDA, bfloat16 on CPU)", key="speed_amp")
    bound = middle.checkbox("Token-count bound (method overhead)", key="speed_bound",
                            help="Also time each setting's token-count twin: the same blocks at the same token counts, reached by "
                                 "cutting the sequence, with no scoring and no merging. Its speedup is the most any method "
                                 "with these counts can gain here; the table adds the method's own overhead.")
    warmup = right.number_input("Warm-up calls per setting", min_value=0, max_value=20, value=2, key="speed_warmup")
    repeats = right.number_input("Timed repeats per setting", min_value=1, max_value=200, value=10, key="speed_repeats")
    st.caption(f"Runs on {loaded.device}, {dtype_label(loaded.device, amp)}, {torch.get_num_threads()} threads. "
               + (f"Not offered here: {', '.join(_label(m) for m in unavailable)} (need weights this model does not have)." if unavailable else ""))

    if st.button("Run benchmark", type="primary", key="speed_run"):
        try:
            if not batch_sizes:
                raise TokenscopeError("choose at least one batch size")
            if any(all_methods()[m].uses_keep_rate for m in methods) and not keep_rates:
                raise TokenscopeError("choose at least one keep rate for the keep-rate methods")
            settings = make_settings(methods, keep_rates, [int(r_value)] if fixed_r else None, len(loaded.model.blocks),
                                     loaded.num_patches + 1)
            config = BenchConfig(batch_sizes=tuple(sorted(batch_sizes)), warmup=int(warmup), repeats=int(repeats), amp=amp,
                                 bound=bound)
            bar = st.progress(0.0, text="starting")
            rows = run_benchmark(loaded, settings, config, progress=lambda fraction, text: bar.progress(min(1.0, fraction), text=text))
            bar.progress(1.0, text="done")
        except TokenscopeError as err:
            st.error(f"{err}. Change the settings above and run again.")
            return
        st.session_state["speed_result"] = (loaded.name, loaded.weights_label, [row.csv_record() for row in rows], contention_note(rows))

    result = st.session_state.get("speed_result")
    if result is None:
        st.info("Choose the settings and press **Run benchmark**. On a CPU, DeiT-S at batch 32 takes about a second per forward.")
        return
    name, weights, records, note = result
    frame = pd.DataFrame(records, columns=list(CSV_COLUMNS))
    for column in ["r", "bound_latency_ms", *BOUND_COLUMNS]:  # "" (not measured) becomes NaN
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    st.subheader(f"{name} · weights: {weights}")
    if note:
        st.warning(note[0].upper() + note[1:] + ".")
    frame["setting"] = ["dense" if m == "none" else f"{_label(m)} {_setting(k, r)}" for m, k, r in
                        zip(frame["method"], frame["keep_rate"], frame["r"])]
    first = frame.iloc[0]
    st.caption(f"{first['device']} · {first['dtype']} · {first['threads']} threads · {first['repeats']} timed repeats; "
               "latency in ms per batch (median, IQR q1-q3), images/s median")
    columns = TABLE_COLUMNS + (BOUND_COLUMNS if frame["speedup_bound"].notna().any() else [])
    st.dataframe(frame[columns].round(3), hide_index=True, width="stretch")
    st.plotly_chart(speedup_figure(frame), width="stretch")
    st.download_button("Download results.csv", frame.to_csv(index=False).encode(), file_name="results.csv", mime="text/csv")


main()
