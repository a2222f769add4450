"""Tables and paper figures of the dataset-level analysis (`sweep --patterns`), issue 12.

`write_compare(results, out)` (what `python -m analysis compare RESULTS_DIR --out DIR` runs) writes:
Tables (each as .csv, .md and .tex):
- `fidelity`: per method x keep rate: top-1, its gap to the dense model, top-1 agreement with the
  dense prediction, KL(dense || reduced), cosine of the final class-token features, CKA at the last
  block, the mean share of patches with a token of their own after the last block, mean survival depth;
- `agreement`: per keep rate and pair of methods, at the last block: IoU of the kept-patch sets,
  NMI, V-measure, homogeneity, completeness (mean and std over images), and which of them is the
  pair's measure (IoU for two pruning methods, NMI for two merging methods, both otherwise);
- `map_similarity`: per keep rate and ordered pair, KL, JS, CC, SCC, EMD and SIM between the
  keep-frequency maps after the last block (KL(a || b): a is the reference) and between the
  survival-depth maps;
- `correlation`: Spearman's rho and Kendall's tau (with p-values) of each measure against the
  top-1 gap, over the reduced settings.
Figures (each as .pdf, .svg and a 300-dpi .png):
- `keep_frequency_<method>`: per keep rate (rows) and reduction stage (columns), the keep
  frequency on the model's patch grid, and the mean survival depth (last column);
- `keep_frequency`: all methods at one keep rate (last block, and survival depth);
- `agreement`: method x method matrices at one keep rate, per stage: IoU among pruning methods,
  NMI among merging methods;
- `map_similarity`: method x method matrices of the six map metrics at one keep rate;
- `fidelity`: agreement, KL and cosine vs keep rate, and CKA per block at one keep rate;
- `correlation`: each measure against the top-1 gap, with rho and tau.

Nothing here names a method: families come from `patterns.method_family`, colours from `viz.palette`.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import FiguresError
from .figures import _latex_escape, _mpl, _save, _title_note, model_rows, pick_keep_rate
from .patterns import MAP_METRICS, map_similarity, method_family, rank_correlations
from .sweep import load_results

AGREEMENT_MEASURES = ("iou", "nmi", "v_measure", "homogeneity", "completeness")
FIDELITY_MEASURES = ("dense_agreement", "dense_kl", "dense_cosine", "cka_final")
MEASURE_LABELS = {
    "dense_agreement": "top-1 agreement with dense (%)", "dense_kl": "KL(dense || reduced)", "dense_cosine": "cosine to dense",
    "cka_final": "CKA at the last block", "own_share": "patches with own token (last block)",
    "survival_mean": "mean survival depth", "iou_mean": "mean IoU with other methods", "nmi_mean": "mean NMI with other methods",
}


# ----------------------------------------------------------------------------------------------
# Data: what the tables, the figures and the Compare page share
# ----------------------------------------------------------------------------------------------

def pattern_rows(content: dict[str, Any], model: str | None = None) -> list[dict[str, Any]]:
    """The rows of one model that hold the --patterns measures. Raises FiguresError when none does."""
    rows = [row for row in model_rows(content, model) if row.get("keep_frequency")]
    if not rows:
        raise FiguresError("the results hold no dataset-level measures: run the sweep with --patterns")
    return rows


def label_of(rows: Sequence[dict[str, Any]], method: str) -> str:
    for row in rows:
        if row["method"] == method:
            return row.get("label") or method
    return "Dense" if method == "none" else method


def methods_of(rows: Sequence[dict[str, Any]], reduced_only: bool = True) -> list[str]:
    """The methods in row order (the dense model left out with `reduced_only`)."""
    return [m for m in dict.fromkeys(r["method"] for r in rows) if not (reduced_only and m == "none")]


def families(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """{method: "pruning" | "merging"} from the rows' declared family and the token kinds seen."""
    out: dict[str, str] = {}
    for method in methods_of(rows):
        group = [r for r in rows if r["method"] == method]
        declared = next((r.get("pattern_family") for r in group if r.get("pattern_family")), "")
        kinds = sorted({k for r in group for k in r.get("token_kinds_seen", [])})
        out[method] = method_family(declared, kinds)
    return out


def keep_rates(rows: Sequence[dict[str, Any]], reduced_only: bool = False) -> list[float]:
    return sorted({r["keep_rate"] for r in rows if r["method"] != "none" and (not reduced_only or r["keep_rate"] < 1.0)},
                  reverse=True)


def row_at(rows: Sequence[dict[str, Any]], method: str, keep_rate: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and abs(r["keep_rate"] - keep_rate) < 1e-9), None)


def grid_of(row: dict[str, Any]) -> tuple[int, int]:
    grid = row.get("patch_grid") or []
    p = len(row["keep_frequency"][0])
    if len(grid) == 2 and grid[0] * grid[1] == p:
        return int(grid[0]), int(grid[1])
    side = int(round(math.sqrt(p)))
    return (side, side) if side * side == p else (1, p)


def stage_blocks(row: dict[str, Any]) -> list[int]:
    """1-based blocks where the row's keep frequency changes (its reduction stages), else its
    reducing layers, else the last block."""
    freq = np.asarray(row["keep_frequency"])
    changed = [d + 1 for d in range(freq.shape[0]) if not np.allclose(freq[d], freq[d - 1] if d else 1.0)]
    return changed or [int(x) for x in row.get("reducing_layers") or []] or [freq.shape[0]]


def dense_top1(rows: Sequence[dict[str, Any]]) -> float:
    """The dense model's top-1: its own row, else the mean top-1 of the rows at keep rate 1."""
    dense = [r["top1"] for r in rows if r["method"] == "none"]
    if dense:
        return float(dense[0])
    full = [r["top1"] for r in rows if abs(r["keep_rate"] - 1.0) < 1e-9]
    return float(np.mean(full)) if full else float("nan")


def _pair(rows, keep_rate: float, a: str, b: str) -> dict[str, Any] | None:
    """The agreement entry of (a, b) at a keep rate, from whichever row holds it."""
    for mine, other in ((a, b), (b, a)):
        row = row_at(rows, mine, keep_rate)
        entry = (row or {}).get("agreement", {}).get(other)
        if entry:
            return entry if mine == a else _swap(entry)
    return None


def _swap(entry: dict[str, Any]) -> dict[str, Any]:
    """The same pair seen from the other side: homogeneity and completeness exchange."""
    out = dict(entry)
    for x, y in (("homogeneity", "completeness"), ("homogeneity_std", "completeness_std")):
        out[x], out[y] = entry.get(y), entry.get(x)
    return out


def primary_measures(family_a: str, family_b: str) -> tuple[str, ...]:
    """A pair's agreement measure: IoU for two pruning methods, NMI for two merging ones, both otherwise."""
    if family_a == family_b == "pruning":
        return ("iou",)
    if family_a == family_b == "merging":
        return ("nmi",)
    return ("iou", "nmi")


def fidelity_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per setting (the dense model included) with the fidelity and pattern summaries."""
    base = dense_top1(rows)
    out = []
    for row in rows:
        freq = np.asarray(row["keep_frequency"])
        out.append({
            "method": row["method"], "label": row.get("label") or row["method"], "keep_rate": row["keep_rate"],
            "top1": row["top1"], "top1_gap": base - row["top1"], "dense_agreement": row.get("dense_agreement", float("nan")),
            "dense_kl": row.get("dense_kl", float("nan")), "dense_cosine": row.get("dense_cosine", float("nan")),
            "cka_final": row.get("cka_final", float("nan")), "own_share": float(freq[-1].mean()),
            "survival_mean": float(np.mean(row["survival_depth"])), "n_images": row.get("n_images", 0),
        })
    return out


def agreement_table(rows: Sequence[dict[str, Any]], block: int | None = None) -> list[dict[str, Any]]:
    """One dict per keep rate and unordered pair of methods (in row order), at `block` (1-based,
    default the last): every agreement measure's mean and std, and the pair's measure(s)."""
    fam = families(rows)
    methods = methods_of(rows)
    out = []
    for rate in keep_rates(rows):
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                entry = _pair(rows, rate, a, b)
                if entry is None:
                    continue
                index = (block or len(entry["iou"])) - 1
                record = {"keep_rate": rate, "method_a": a, "method_b": b, "label_a": label_of(rows, a), "label_b": label_of(rows, b),
                          "family_a": fam[a], "family_b": fam[b], "measure": "+".join(primary_measures(fam[a], fam[b])),
                          "block": index + 1, "n": entry["n"]}
                for name in AGREEMENT_MEASURES:
                    record[name] = entry[name][index]
                    record[f"{name}_std"] = entry[f"{name}_std"][index]
                out.append(record)
    return out


def agreement_matrix(rows: Sequence[dict[str, Any]], keep_rate: float, measure: str, block: int,
                     methods: Sequence[str]) -> np.ndarray:
    """[M, M] means of `measure` at a keep rate and block (1-based); the diagonal is 1, NaN for a pair
    the sweep did not compare."""
    m = len(methods)
    matrix = np.full((m, m), np.nan)
    for i, a in enumerate(methods):
        matrix[i, i] = 1.0
        for j, b in enumerate(methods):
            if i != j:
                entry = _pair(rows, keep_rate, a, b)
                if entry is not None:
                    matrix[i, j] = entry[measure][block - 1]
    return matrix


def map_of(row: dict[str, Any], which: str = "keep_frequency", block: int | None = None) -> np.ndarray:
    """The row's map on its patch grid: keep frequency after `block` (default the last), or the
    mean survival depth."""
    grid = grid_of(row)
    if which == "survival_depth":
        return np.asarray(row["survival_depth"], float).reshape(grid)
    freq = np.asarray(row["keep_frequency"], float)
    return freq[(block or freq.shape[0]) - 1].reshape(grid)


def map_table(rows: Sequence[dict[str, Any]], which: str = "keep_frequency") -> list[dict[str, Any]]:
    """Per reduced keep rate and ordered pair of methods (a != b), the six map metrics between their
    maps (`which`: "keep_frequency" after the last block, or "survival_depth")."""
    from .patterns import map_kl

    methods = methods_of(rows)
    out = []
    for rate in keep_rates(rows, reduced_only=True):
        done: dict[tuple[str, str], dict[str, float]] = {}
        for a in methods:
            for b in methods:
                ra, rb = row_at(rows, a, rate), row_at(rows, b, rate)
                if a == b or ra is None or rb is None:
                    continue
                if (b, a) in done:  # every metric but KL is symmetric: computed once per pair (EMD is a linear programme)
                    metrics = {**done[(b, a)], "KL": map_kl(map_of(ra, which), map_of(rb, which))}
                else:
                    metrics = done[(a, b)] = map_similarity(map_of(ra, which), map_of(rb, which), grid_of(ra))
                out.append({"keep_rate": rate, "map": which, "method_a": a, "method_b": b, "label_a": label_of(rows, a),
                            "label_b": label_of(rows, b), **metrics})
    return out


def map_matrix(table: Sequence[dict[str, Any]], keep_rate: float, metric: str, methods: Sequence[str],
               which: str = "keep_frequency") -> np.ndarray:
    index = {m: i for i, m in enumerate(methods)}
    identity = {"KL": 0.0, "JS": 0.0, "EMD": 0.0, "CC": 1.0, "SCC": 1.0, "SIM": 1.0}[metric]
    matrix = np.full((len(methods), len(methods)), np.nan)
    np.fill_diagonal(matrix, identity)
    for record in table:
        if abs(record["keep_rate"] - keep_rate) < 1e-9 and record["map"] == which and record["method_a"] in index and record["method_b"] in index:
            matrix[index[record["method_a"]], index[record["method_b"]]] = record[metric]
    return matrix


def setting_measures(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reduced setting (keep rate < 1, not dense): the top-1 gap and every scalar measure,
    including its mean IoU and NMI with the other methods at the same keep rate (last block)."""
    table = {(r["method"], r["keep_rate"]): r for r in fidelity_table(rows)}
    pairs = agreement_table(rows)
    out = []
    for (method, rate), record in table.items():
        if method == "none" or rate >= 1.0:
            continue
        mine = [p for p in pairs if abs(p["keep_rate"] - rate) < 1e-9 and method in (p["method_a"], p["method_b"])]
        record = dict(record)
        record["iou_mean"] = float(np.mean([p["iou"] for p in mine])) if mine else float("nan")
        record["nmi_mean"] = float(np.mean([p["nmi"] for p in mine])) if mine else float("nan")
        out.append(record)
    return out


CORRELATED = ("dense_agreement", "dense_kl", "dense_cosine", "cka_final", "iou_mean", "nmi_mean", "own_share", "survival_mean")


def correlation_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman's rho and Kendall's tau (p-values) of each measure against the top-1 gap (dense top-1
    minus the setting's), over the reduced settings."""
    settings = setting_measures(rows)
    gap = [s["top1_gap"] for s in settings]
    return [{"measure": name, "label": MEASURE_LABELS[name], **rank_correlations([s[name] for s in settings], gap)}
            for name in CORRELATED]


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def write_table(records: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], out: Path, stem: str,
                caption: str = "") -> list[Path]:
    """`stem`.csv (full precision), .md and .tex (rounded) with the given (key, header) columns."""
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.tex"]
    with open(paths[0], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _ in columns])
        for record in records:
            writer.writerow([record.get(key, "") for key, _ in columns])
    cells = [[_fmt(record.get(key, "")).replace("|", "\\|") for key, _ in columns] for record in records]
    headers = [header for _, header in columns]
    md = ([caption.replace("|", "\\|"), ""] if caption else []) + ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    md += ["| " + " | ".join(line) + " |" for line in cells]
    paths[1].write_text("\n".join(md) + "\n")
    tex = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "l" * 2 + "r" * (len(columns) - 2) + "}", r"\toprule",
           " & ".join(_latex_escape(h) for h in headers) + r" \\", r"\midrule"]
    tex += [" & ".join(_latex_escape(c) for c in line) + r" \\" for line in cells]
    tex += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        tex.append(r"\caption{" + _latex_escape(caption) + "}")
    tex.append(r"\end{table}")
    paths[2].write_text("\n".join(tex) + "\n")
    return paths


FIDELITY_COLUMNS = (("label", "Method"), ("keep_rate", "Keep rate"), ("top1", "Top-1 (%)"), ("top1_gap", "Top-1 gap"),
                    ("dense_agreement", "Agreement (%)"), ("dense_kl", "KL"), ("dense_cosine", "Cosine"), ("cka_final", "CKA (last)"),
                    ("own_share", "Own tokens"), ("survival_mean", "Survival depth"))
AGREEMENT_COLUMNS = (("label_a", "Method A"), ("label_b", "Method B"), ("keep_rate", "Keep rate"), ("measure", "Measure"),
                     ("iou", "IoU"), ("iou_std", "IoU std"), ("nmi", "NMI"), ("nmi_std", "NMI std"), ("v_measure", "V-measure"),
                     ("homogeneity", "Homogeneity"), ("completeness", "Completeness"), ("n", "Images"))
MAP_COLUMNS = (("label_a", "Method A"), ("label_b", "Method B"), ("keep_rate", "Keep rate"), ("map", "Map"),
               *((m, m) for m in MAP_METRICS))
CORRELATION_COLUMNS = (("label", "Measure"), ("n", "Settings"), ("spearman_rho", "Spearman rho"), ("spearman_p", "p"),
                       ("kendall_tau", "Kendall tau"), ("kendall_p", "p (tau)"))


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib)
# ----------------------------------------------------------------------------------------------

def figure_method_maps(rows: Sequence[dict[str, Any]], method: str):
    """Keep frequency per keep rate (rows) and stage (columns) on the patch grid, survival depth last."""
    plt = _mpl()
    group = sorted([r for r in rows if r["method"] == method], key=lambda r: -r["keep_rate"])
    stages = sorted({b for r in group if r["keep_rate"] < 1.0 for b in stage_blocks(r)}) or [len(group[0]["keep_frequency"])]
    if len(stages) > 8:  # every block (e.g. ToMe): eight evenly spaced ones, the last included
        stages = sorted({stages[int(round(i))] for i in np.linspace(0, len(stages) - 1, 8)})
    depth = len(group[0]["keep_frequency"])
    cols = len(stages) + 1
    fig, axes = plt.subplots(len(group), cols, figsize=(1.25 * cols + 0.8, 1.25 * len(group) + 0.7), squeeze=False, layout="constrained")
    image = None
    for r_index, row in enumerate(group):
        for c_index, block in enumerate(stages):
            ax = axes[r_index, c_index]
            image = ax.imshow(map_of(row, "keep_frequency", block), vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if r_index == 0:
                ax.set_title(f"after block {block}", fontsize=7)
            if c_index == 0:
                ax.set_ylabel(f"keep {row['keep_rate']:g}", fontsize=7)
        ax = axes[r_index, -1]
        depth_image = ax.imshow(map_of(row, "survival_depth"), vmin=0, vmax=depth, cmap="magma")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        if r_index == 0:
            ax.set_title("survival depth", fontsize=7)
    fig.suptitle(f"{label_of(rows, method)}: keep frequency per patch ({grid_of(group[0])[0]}x{grid_of(group[0])[1]} grid); "
                 f"{_title_note(group)}", fontsize=8)
    fig.colorbar(image, ax=axes[:, :-1], shrink=0.8, label="keep frequency")
    fig.colorbar(depth_image, ax=axes[:, -1], shrink=0.8, label="survival depth (blocks)")
    return fig


def figure_overview_maps(rows: Sequence[dict[str, Any]], keep_rate: float):
    """All methods at one keep rate: keep frequency after the last block (top) and survival depth (bottom)."""
    plt = _mpl()
    methods = [m for m in methods_of(rows) if row_at(rows, m, keep_rate)]
    fig, axes = plt.subplots(2, len(methods), figsize=(1.5 * len(methods) + 0.8, 3.4), squeeze=False, layout="constrained")
    top = bottom = None
    for i, method in enumerate(methods):
        row = row_at(rows, method, keep_rate)
        top = axes[0, i].imshow(map_of(row), vmin=0, vmax=1, cmap="viridis")
        bottom = axes[1, i].imshow(map_of(row, "survival_depth"), vmin=0, vmax=len(row["keep_frequency"]), cmap="magma")
        axes[0, i].set_title(label_of(rows, method), fontsize=7)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    axes[0, 0].set_ylabel("keep frequency\n(last block)", fontsize=7)
    axes[1, 0].set_ylabel("survival depth", fontsize=7)
    fig.colorbar(top, ax=axes[0], shrink=0.9)
    fig.colorbar(bottom, ax=axes[1], shrink=0.9)
    fig.suptitle(f"keep rate {keep_rate:g}; {_title_note(rows)}", fontsize=8)
    return fig


def _matrix_panel(ax, matrix: np.ndarray, labels: Sequence[str], title: str, vmin=None, vmax=None, cmap="viridis"):
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
    ax.set_yticklabels(labels, fontsize=6)
    ax.grid(False)
    ax.set_title(title, fontsize=7)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                r, g, b, _ = image.cmap(image.norm(matrix[i, j]))
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    return image


def agreement_blocks(rows: Sequence[dict[str, Any]], keep_rate: float, limit: int = 5) -> list[int]:
    """The stages to draw: blocks where some method at the keep rate reduces (at most `limit`, last included)."""
    blocks = sorted({b for m in methods_of(rows) if (row := row_at(rows, m, keep_rate)) for b in stage_blocks(row)})
    depth = len(rows[0]["keep_frequency"])
    if len(blocks) > limit:
        blocks = sorted({blocks[int(round(i))] for i in np.linspace(0, len(blocks) - 1, limit)})
    return blocks or [depth]


def agreement_groups(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(measure, title, methods) of the agreement figure: IoU among pruning methods, NMI among merging
    methods; a family with fewer than two methods gives way to all methods."""
    fam = families(rows)
    methods = methods_of(rows)
    out = []
    for measure, family in (("iou", "pruning"), ("nmi", "merging")):
        chosen = [m for m in methods if fam[m] == family]
        if len(chosen) >= 2:
            out.append((measure, f"{measure.upper()} ({family} methods)", chosen))
        elif len(methods) >= 2:
            out.append((measure, f"{measure.upper()} (all methods)", methods))
    return out


def figure_agreement(rows: Sequence[dict[str, Any]], keep_rate: float):
    plt = _mpl()
    blocks = agreement_blocks(rows, keep_rate)
    groups = agreement_groups(rows)
    if not groups:
        raise FiguresError("agreement needs at least two reduced methods in the sweep")
    fig, axes = plt.subplots(len(groups), len(blocks), figsize=(2.1 * len(blocks) + 0.6, 2.3 * len(groups) + 0.4), squeeze=False, layout="constrained")
    image = None
    for g, (measure, title, methods) in enumerate(groups):
        labels = [label_of(rows, m) for m in methods]
        for b, block in enumerate(blocks):
            matrix = agreement_matrix(rows, keep_rate, measure, block, methods)
            image = _matrix_panel(axes[g, b], matrix, labels, f"{title}\nafter block {block}", 0.0, 1.0)
            if b:
                axes[g, b].set_yticklabels([])
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.suptitle(f"agreement at keep rate {keep_rate:g} (mean over images); {_title_note(rows)}", fontsize=8)
    return fig


def figure_map_similarity(rows: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]], keep_rate: float):
    plt = _mpl()
    methods = [m for m in methods_of(rows) if row_at(rows, m, keep_rate)]
    labels = [label_of(rows, m) for m in methods]
    side = max(2.4, 0.45 * len(methods) + 1.2)
    fig, axes = plt.subplots(2, 3, figsize=(3 * side + 1.5, 2 * side + 0.8), squeeze=False, layout="constrained")
    for ax, metric in zip(axes.ravel(), MAP_METRICS):
        matrix = map_matrix(table, keep_rate, metric, methods)
        bounded = metric in ("CC", "SCC", "SIM")
        image = _matrix_panel(ax, matrix, labels, metric + (" (row = reference a in KL(a || b))" if metric == "KL" else ""),
                              -1.0 if metric in ("CC", "SCC") else (0.0 if bounded else None), 1.0 if bounded else None,
                              "viridis" if bounded else "viridis_r")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"keep-frequency maps after the last block, keep rate {keep_rate:g}; {_title_note(rows)}", fontsize=8)
    return fig


def figure_fidelity(rows: Sequence[dict[str, Any]], keep_rate: float):
    from viz.palette import method_colour, method_marker

    plt = _mpl()
    table = fidelity_table(rows)
    fig, axes = plt.subplots(1, 4, figsize=(10.0, 3.0), layout="constrained")
    for method in methods_of(rows):
        records = sorted([t for t in table if t["method"] == method], key=lambda t: t["keep_rate"])
        style = dict(color=method_colour(method), marker=method_marker(method), ms=3.5, label=label_of(rows, method))
        for ax, key in zip(axes[:3], ("dense_agreement", "dense_kl", "dense_cosine")):
            ax.plot([t["keep_rate"] for t in records], [t[key] for t in records], **style)
        row = row_at(rows, method, keep_rate)
        if row and row.get("cka"):
            axes[3].plot(range(1, len(row["cka"]) + 1), row["cka"], **style)
    for ax, key in zip(axes[:3], ("dense_agreement", "dense_kl", "dense_cosine")):
        ax.set_xlabel("keep rate")
        ax.set_ylabel(MEASURE_LABELS[key], fontsize=7)
        ax.invert_xaxis()
    axes[3].set_xlabel("block")
    from matplotlib.ticker import MaxNLocator

    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].set_ylabel(f"linear CKA to dense (keep {keep_rate:g})", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), frameon=False, fontsize=7)
    fig.suptitle(f"fidelity to the dense model; {_title_note(rows)}", fontsize=8)
    return fig


def figure_correlation(rows: Sequence[dict[str, Any]]):
    from viz.palette import method_colour, method_marker

    plt = _mpl()
    settings = setting_measures(rows)
    correlations = {c["measure"]: c for c in correlation_table(rows)}
    fig, axes = plt.subplots(2, 4, figsize=(10.0, 5.0), squeeze=False, layout="constrained")
    for ax, name in zip(axes.ravel(), CORRELATED):
        for method in methods_of(rows):
            mine = [s for s in settings if s["method"] == method]
            ax.scatter([s[name] for s in mine], [s["top1_gap"] for s in mine], color=method_colour(method),
                       marker=method_marker(method), s=14, label=label_of(rows, method))
        c = correlations[name]
        ax.set_title(f"rho={c['spearman_rho']:.2f} (p={c['spearman_p']:.2g})\ntau={c['kendall_tau']:.2f} (p={c['kendall_p']:.2g})",
                     fontsize=7)
        ax.set_xlabel(MEASURE_LABELS[name], fontsize=7)
        ax.set_ylabel("top-1 gap to dense (points)", fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), frameon=False, fontsize=7)
    fig.suptitle(f"measures against the top-1 gap, over the reduced settings; {_title_note(rows)}", fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------------

def write_compare(results: str | Path | dict[str, Any], out: str | Path, keep_rate: float | None = None,
                  model: str | None = None) -> dict[str, Any]:
    """Write every table and figure of the dataset-level analysis (see the module docstring).

    Args:
        results: a results.json, its folder, or the loaded content.
        out: the output folder (created).
        keep_rate: the keep rate of the single-rate figures (default: the one nearest 0.7).
        model: which model's rows, when the results hold several.
    Returns:
        {"written": [paths], "skipped": {name: reason}}.
    Raises:
        SweepError / FiguresError: unreadable results, no --patterns measures, a keep rate not swept.
    """
    content = results if isinstance(results, dict) else load_results(results)
    rows = pattern_rows(content, model)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rate = pick_keep_rate([r for r in rows if r["method"] != "none"] or rows, keep_rate)
    plt = _mpl()
    written: list[Path] = []
    skipped: dict[str, str] = {}
    note = _title_note(rows)
    maps = map_table(rows, "keep_frequency") + map_table(rows, "survival_depth")
    written += write_table(fidelity_table(rows), FIDELITY_COLUMNS, out, "fidelity", f"Fidelity to the dense model; {note}")
    written += write_table(agreement_table(rows), AGREEMENT_COLUMNS, out, "agreement",
                           f"Agreement between methods at equal keep rate, after the last block (mean and std over images); {note}")
    written += write_table(maps, MAP_COLUMNS, out, "map_similarity", f"Similarity of the keep-frequency and survival-depth maps; {note}")
    written += write_table(correlation_table(rows), CORRELATION_COLUMNS, out, "correlation",
                           f"Rank correlation of each measure with the top-1 gap over the reduced settings; {note}")
    figures: list[tuple[str, Any]] = [(f"keep_frequency_{m}", lambda m=m: figure_method_maps(rows, m)) for m in methods_of(rows)]
    figures += [("keep_frequency", lambda: figure_overview_maps(rows, rate)), ("agreement", lambda: figure_agreement(rows, rate)),
                ("map_similarity", lambda: figure_map_similarity(rows, maps, rate)), ("fidelity", lambda: figure_fidelity(rows, rate)),
                ("correlation", lambda: figure_correlation(rows))]
    for stem, make in figures:
        try:
            fig = make()
        except FiguresError as err:
            skipped[stem] = str(err)
            continue
        written += _save(fig, out, stem)
        plt.close(fig)
    (out / "compare.json").write_text(json.dumps({"keep_rate": rate, "written": [p.name for p in written], "skipped": skipped}, indent=1))
    return {"written": written, "skipped": skipped, "keep_rate": rate}
