"""Paper-style figures and the results table from a sweep's `results.json` (matplotlib).

`write_figures` produces, in the output folder:
1. `accuracy.{pdf,svg,png}`: top-1 vs GMACs and top-1 vs keep rate, one line per method;
2. `diversity.{pdf,svg,png}`: mean r(Z) per block at one keep rate, beside top-1 vs keep rate;
3. `grid.{pdf,svg,png}`: rows images, columns methods, the merge groups after the last
   reduction stage (each output token's region filled with the mean colour of its patches,
   borders between groups, discarded patches dimmed), as in BAT's visualisation figure; drawn
   with `viz.overlays.merge_groups_view` from the engine's provenance;
4. `table.{csv,md,tex}`: method, keep rate, setting, top-1, top-5, params (M), GMACs, GMACs
   reduction (%), images/s, like the papers' tables.
Rows that differ only in a seed-like parameter (`ParamSpec.averaged`) are drawn and tabled as their
mean (`average_repeats`).
Vector PDF and SVG, and PNG at 300 dpi; one fixed colour per method (`viz.palette`).
"""
from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import FiguresError, TokenscopeError
from .sweep import gmacs_spread, load_results

FORMATS = ("pdf", "svg", "png")
DPI = 300


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "svg.fonttype": "none",
                         "pdf.fonttype": 42, "figure.dpi": 100})
    return plt


def model_rows(content: dict[str, Any], model: str | None = None) -> list[dict[str, Any]]:
    """The rows of one model (the given one, else the sweep config's, else the first row's).
    Raises FiguresError when there are none."""
    rows = content["rows"]
    if not rows:
        raise FiguresError("the results hold no rows: run a sweep first")
    model = model or content.get("config", {}).get("model") or rows[0]["model"]
    chosen = [row for row in rows if row["model"] == model]
    if not chosen:
        raise FiguresError(f"the results hold no rows for model {model} (they have: {', '.join(sorted({r['model'] for r in rows}))})")
    return chosen


def _averaged_params(method: str) -> set[str]:
    """The parameters of `method` marked `averaged` (a seed); none for a method not registered here."""
    from .registry import get_method

    try:
        return {spec.name for spec in get_method(method).params if spec.averaged}
    except TokenscopeError:
        return set()


def _mean_value(values: list[Any]) -> Any:
    """The mean of numbers, the element-wise mean of equally long lists of numbers, else the first."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if all(number(v) for v in values):
        return float(np.mean(values))
    if all(isinstance(v, list) and v and all(number(x) for x in v) for v in values) and len({len(v) for v in values}) == 1:
        return [float(x) for x in np.mean(np.asarray(values, dtype=float), axis=0)]
    return values[0]


def average_repeats(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that differ only in `averaged` parameters (seeds, `ParamSpec.averaged`) of one method at
    one keep rate become one row: the mean of every number and of every list of numbers (top-1,
    GMACs, token counts, r(Z) per block), the parameter as the list of its values, the label with
    "(mean of n)", `n_repeats` = n. Other rows are returned as they are, in their order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        averaged = _averaged_params(row["method"])
        fixed = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in (row.get("params") or {}).items() if k not in averaged))
        groups.setdefault((row.get("model"), row["method"], row["keep_rate"], fixed), []).append(row)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        mean = {key: _mean_value([row.get(key) for row in group]) for key in group[0]}
        averaged = _averaged_params(group[0]["method"])
        params = dict(group[0].get("params") or {})
        for name in averaged:
            if any(name in (row.get("params") or {}) for row in group):
                params[name] = [(row.get("params") or {}).get(name) for row in group]
        mean.update(params=params, label=f"{_label(group[0])} (mean of {len(group)})", n_repeats=len(group),
                    method=group[0]["method"], keep_rate=group[0]["keep_rate"], n_images=group[0].get("n_images", 0))
        out.append(mean)
    return out


def _groups(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


def _label(row: dict[str, Any]) -> str:
    return row.get("label") or row["method"]


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, dpi=DPI if fmt == "png" else None, bbox_inches="tight")
        paths.append(path)
    return paths


def _title_note(rows: Sequence[dict[str, Any]]) -> str:
    row = rows[0]
    n = max(r.get("n_images", 0) for r in rows)
    weights = row.get("weights", "")
    note = f"{row['model']}, {n} images"
    if "random" in str(weights):
        note += ", RANDOM WEIGHTS"
    return note


def _legend_and_title(fig, ax, rows) -> None:
    """The note on top, one shared legend below the panels."""
    handles, labels = ax.get_legend_handles_labels()
    fig.suptitle(_title_note(rows), fontsize=8, y=0.99)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), bbox_to_anchor=(0.5, 0.0), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))


def figure_accuracy(rows: Sequence[dict[str, Any]]):
    """Top-1 vs GMACs (left) and vs keep rate (right). Returns a matplotlib Figure."""
    from viz.palette import method_colour, method_marker

    plt = _mpl()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for method, group in _groups(rows).items():
        colour, marker = method_colour(method), method_marker(method)
        by_gmacs = sorted(group, key=lambda r: r["gmacs"])
        left.plot([r["gmacs"] for r in by_gmacs], [r["top1"] for r in by_gmacs], marker=marker, color=colour, label=_label(group[0]), ms=4)
        spreads = [gmacs_spread(r) for r in by_gmacs]
        if any(spreads):  # per-image budgets: one standard deviation of the per-image GMACs
            left.errorbar([r["gmacs"] for r in by_gmacs], [r["top1"] for r in by_gmacs], xerr=spreads, fmt="none",
                          ecolor=colour, elinewidth=0.8, capsize=2)
        by_rate = sorted(group, key=lambda r: r["keep_rate"])
        right.plot([r["keep_rate"] for r in by_rate], [r["top1"] for r in by_rate], marker=marker, color=colour, label=_label(group[0]), ms=4)
    left.set_xlabel("GMACs per image")
    left.set_ylabel("top-1 (%)")
    right.set_xlabel("keep rate")
    right.set_ylabel("top-1 (%)")
    right.invert_xaxis()
    _legend_and_title(fig, left, rows)
    return fig


def pick_keep_rate(rows: Sequence[dict[str, Any]], wanted: float | None = None) -> float:
    """The keep rate a single-rate figure shows: `wanted` if present, else the one nearest 0.7 below 1."""
    rates = sorted({r["keep_rate"] for r in rows})
    if wanted is not None:
        match = [rate for rate in rates if abs(rate - wanted) < 1e-9]
        if not match:
            raise FiguresError(f"no rows at keep rate {wanted}: the results have {', '.join(map(str, rates))}")
        return match[0]
    reduced = [rate for rate in rates if rate < 1.0] or rates
    return min(reduced, key=lambda rate: (abs(rate - 0.7), -rate))


def _hollow(marker: str, colour: str) -> dict[str, Any]:
    """The open version of a marker: a filled marker's outline; a line marker ("x", "+"), which has
    no face, drawn faint instead (an edge colour alone would leave it invisible)."""
    from matplotlib.markers import MarkerStyle

    if MarkerStyle(marker).is_filled():
        return {"facecolors": "none", "edgecolors": colour}
    return {"color": colour, "alpha": 0.35}


def figure_diversity(rows: Sequence[dict[str, Any]], keep_rate: float | None = None, per_token: bool = False):
    """Mean r(Z) per block at one keep rate (left; reducing layers filled), top-1 vs keep rate (right)."""
    from viz.palette import method_colour, method_marker

    plt = _mpl()
    rate = pick_keep_rate(rows, keep_rate)
    key = "diversity_per_token" if per_token else "diversity"
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.2, 3.0), gridspec_kw={"width_ratios": [1.4, 1]})
    marked: set[int] = set()
    for method, group in _groups(rows).items():
        colour, marker = method_colour(method), method_marker(method)
        at_rate = [r for r in group if abs(r["keep_rate"] - rate) < 1e-9 and r.get(key)]
        for row in at_rate:
            values = np.asarray(row[key], dtype=float)
            blocks = np.arange(1, len(values) + 1)
            reducing = set(row.get("reducing_layers") or [])
            if reducing and len(reducing) < len(values):
                marked |= reducing
            left.plot(blocks, values, color=colour, label=_label(row), lw=1.2)
            filled = np.array([b in reducing for b in blocks])
            left.scatter(blocks[filled], values[filled], color=colour, marker=marker, s=18, zorder=3)
            left.scatter(blocks[~filled], values[~filled], marker=marker, s=14, zorder=3, **_hollow(marker, colour))
        by_rate = sorted(group, key=lambda r: r["keep_rate"])
        right.plot([r["keep_rate"] for r in by_rate], [r["top1"] for r in by_rate], marker=marker, color=colour, ms=4)
        right.axvline(rate, color="#999999", lw=0.6, ls=":")
    for layer in sorted(marked):
        left.axvline(layer, color="#999999", lw=0.6, ls=":")
    left.set_xlabel("block (filled marker = reducing layer)")
    left.set_ylabel("r(Z) per token" if per_token else "r(Z) (l1)")
    left.set_title(f"diversity at keep rate {rate:g}", fontsize=9)
    left.set_xticks(range(1, max((len(r.get(key) or []) for r in rows), default=12) + 1))
    right.set_xlabel("keep rate")
    right.set_ylabel("top-1 (%)")
    right.invert_xaxis()
    right.set_title("accuracy", fontsize=9)
    _legend_and_title(fig, left, rows)
    return fig


def _plan_for(row: dict[str, Any]):
    """The plan a results row ran: its `plan` record, or (older results files) rebuilt from its
    method, keep rate and params (a method without a keep rate ran at 1.0)."""
    from viz.charts import uses_keep_rate

    from .plan import ReductionPlan

    if row.get("plan"):
        return ReductionPlan.from_record(row["plan"])
    if row["method"] == "none":
        return ReductionPlan()
    rate = row["keep_rate"] if uses_keep_rate(row) else 1.0
    return ReductionPlan.make(row["method"], rate, None, **dict(row.get("params") or {}))


def grid_images(content: dict[str, Any], images: Sequence[str | Path] | None = None, count: int = 4) -> list[Path]:
    """The photos of the comparison grid: `images` (files, or folders searched for images), else
    `count` evenly spaced files of the sweep's data folder. Raises FiguresError when none is found."""
    from .datasets import resolve_dataset
    from .models import IMAGE_SUFFIXES

    if images:
        found: list[Path] = []
        for item in images:
            path = Path(item).expanduser()
            if path.is_dir():
                found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            elif path.is_file():
                found.append(path)
            else:
                raise FiguresError(f"--images: {path} does not exist")
        if not found:
            raise FiguresError("--images: no image files found there")
        return found if len(found) <= count else [found[i] for i in np.linspace(0, len(found) - 1, count).round().astype(int)]
    data = content.get("config", {}).get("data") or next((r.get("data") for r in content["rows"] if r.get("data")), None)
    if not data or not Path(data).is_dir():
        raise FiguresError(f"the sweep's data folder {data!r} is not available here: pass --images FILE_OR_FOLDER for the comparison grid")
    return list(resolve_dataset(data, content.get("config", {}).get("labels")).subset(count).files)


def figure_grid(loaded, rows: Sequence[dict[str, Any]], image_paths: Sequence[Path], keep_rate: float | None = None,
                crop_pct: float | None = None, style: str = "tint", skipped: list[str] | None = None):
    """Rows images, columns "input" then each method at one keep rate: merge groups after the last
    reduction stage (BAT's visualisation figure). Runs the model (provenance), draws with viz.

    Args:
        style: the merge-group rendering (`viz.overlays.merge_groups_view`): "tint" (the photo with
            each group tinted and outlined) or "mean" (each group filled with its mean colour).
        skipped: a list that receives "path: reason" for every image that cannot be read (left out
            of the grid; the rest are drawn).
    Raises:
        FiguresError: no reducing method at that keep rate, or no readable image at all.
    """
    import torch

    from viz.charts import setting_label
    from viz.overlays import merge_groups_view
    from viz.palette import method_colour

    from .engine import run
    from .errors import ImageLoadError
    from .models import crop_only_transform, load_image, make_transform
    from .provenance import StageRecord

    plt = _mpl()
    rate = pick_keep_rate(rows, keep_rate)
    columns = [r for r in rows if abs(r["keep_rate"] - rate) < 1e-9 and r["method"] != "none"]
    seen: set[str] = set()
    columns = [r for r in columns if not (r["method"] in seen or seen.add(r["method"]))]
    if not columns:
        raise FiguresError(f"no reducing method at keep rate {rate} to draw")
    model = loaded.model
    grid = tuple(model.patch_embed.grid_size)
    crop_t = crop_only_transform(model, crop_pct)
    norm_t = make_transform(model, crop_pct)
    pictures, readable = [], []
    for path in image_paths:
        try:
            pictures.append(load_image(path))
            readable.append(path)
        except ImageLoadError as err:
            if skipped is not None:
                skipped.append(str(err))
    if not pictures:
        raise FiguresError("none of the grid's images could be read: pass --images FILE_OR_FOLDER")
    image_paths = readable
    crops = [crop_t(picture) for picture in pictures]
    batch = torch.stack([norm_t(picture) for picture in pictures]).to(loaded.device)
    drawn: list[list[np.ndarray]] = [[np.asarray(crop)] for crop in crops]
    titles = ["input"]
    for row in columns:
        result = run(model, batch, _plan_for(row), extras=loaded.extras, track=True)
        titles.append(setting_label(row))
        for index, crop in enumerate(crops):
            if result.stages:
                record = StageRecord.from_stage(result.stages[-1], index)
                picture = merge_groups_view(crop, record, grid, scale=1, legend=False, style=style)
            else:
                picture = crop
            drawn[index].append(np.asarray(picture))
    n_rows, n_cols = len(drawn), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.35 * n_cols, 1.35 * n_rows + 0.3), squeeze=False)
    for i, row_pictures in enumerate(drawn):
        for j, picture in enumerate(row_pictures):
            ax = axes[i][j]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if i == 0:
                colour = "#000000" if j == 0 else method_colour(columns[j - 1]["method"])
                ax.set_title(textwrap.fill(titles[j], 18), fontsize=7, color=colour)
            if j == 0:
                ax.set_ylabel(textwrap.fill(Path(image_paths[i]).stem, 16), fontsize=6)
    fig.suptitle(f"merge groups after the last reduction stage, keep rate {rate:g} ({loaded.name})", fontsize=7, y=1.0)
    fig.tight_layout(pad=0.3)
    return fig


TABLE_COLUMNS = ("Method", "Keep rate", "Setting", "Top-1 (%)", "Top-5 (%)", "Params (M)", "GMACs", "GMACs reduction (%)", "Images/s")


def table_rows(rows: Sequence[dict[str, Any]], n_parameters: int | None) -> list[list[str]]:
    """The papers' table as strings: one line per method x keep rate, methods in sweep order, keep rate descending."""
    params_m = f"{n_parameters / 1e6:.1f}" if n_parameters else ""
    lines = []
    for method, group in _groups(rows).items():
        for row in sorted(group, key=lambda r: -r["keep_rate"]):
            setting = ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items())
            lines.append([
                _label(row), f"{row['keep_rate']:g}", setting, f"{row['top1']:.2f}", f"{row.get('top5', float('nan')):.2f}",
                params_m, f"{row['gmacs']:.2f}", f"{row.get('gmacs_reduction_pct', float('nan')):.1f}".replace("-0.0", "0.0"),
                f"{row.get('images_per_s', float('nan')):.1f}" + ("*" if row.get("timing_note") else ""),
            ])
    return lines


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return text


def write_table(rows: Sequence[dict[str, Any]], out: Path, n_parameters: int | None, caption: str = "") -> list[Path]:
    """`table.csv`, `table.md` and `table.tex` in `out`. Returns their paths."""
    lines = table_rows(rows, n_parameters)
    csv_path, md_path, tex_path = out / "table.csv", out / "table.md", out / "table.tex"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(lines)
    md = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(TABLE_COLUMNS))) + "|"]
    md += ["| " + " | ".join(line) + " |" for line in lines]
    if caption:
        md = [caption, ""] + md
    md_path.write_text("\n".join(md) + "\n")
    tex = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{lll" + "r" * (len(TABLE_COLUMNS) - 3) + "}", r"\toprule",
           " & ".join(_latex_escape(c) for c in TABLE_COLUMNS) + r" \\", r"\midrule"]
    tex += [" & ".join(_latex_escape(cell) for cell in line) + r" \\" for line in lines]
    tex += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        tex.append(r"\caption{" + _latex_escape(caption) + "}")
    tex.append(r"\end{table}")
    tex_path.write_text("\n".join(tex) + "\n")
    return [csv_path, md_path, tex_path]


def write_figures(results: str | Path | dict[str, Any], out: str | Path, images: Sequence[str | Path] | None = None,
                  keep_rate: float | None = None, n_images: int = 4, loaded=None, model: str | None = None,
                  per_token: bool = False) -> dict[str, Any]:
    """Write every figure and the table for a sweep's results.

    Args:
        results: a results.json path, its folder, or the loaded content ({"config", "rows"}).
        out: output folder (created).
        images: photos for the comparison grid (files or folders); default: the sweep's data folder.
        keep_rate: the keep rate of the diversity and grid figures (default: the one nearest 0.7).
        n_images: rows of the comparison grid.
        loaded: a `LoadedModel` for the grid (default: loaded from the results' model and weights).
        model: which model's rows to draw, when the results hold several.
        per_token: plot r(Z) per token instead of the total.
    Returns:
        {"written": [paths], "skipped": {figure: reason}, "skipped_images": ["path: reason", ...] (images
        left out of the grid because they cannot be read)}.
    Raises:
        SweepError / FiguresError for unreadable results or bad options.
    """
    content = results if isinstance(results, dict) else load_results(results)
    all_rows = model_rows(content, model)
    rows = average_repeats(all_rows)  # several seeds of one setting: their mean (the grid draws the first)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    plt = _mpl()
    written: list[Path] = []
    skipped: dict[str, str] = {}
    skipped_images: list[str] = []
    for stem, make in (("accuracy", lambda: figure_accuracy(rows)),
                       ("diversity", lambda: figure_diversity(rows, keep_rate, per_token))):
        if stem == "diversity" and not any(r.get("diversity") for r in rows):
            skipped[stem] = "the results hold no diversity values (sweep ran with --diversity-images 0)"
            continue
        fig = make()
        written += _save(fig, out, stem)
        plt.close(fig)
    config = content.get("config", {})
    n_parameters = config.get("n_parameters") if config.get("model") == rows[0]["model"] else None
    caption = f"{_title_note(rows)}; crop {rows[0].get('crop_pct')}"
    notes = sorted({row["timing_note"] for row in rows if row.get("timing_note")})
    if notes:
        caption += "; * " + "; ".join(notes)
    written += write_table(rows, out, n_parameters, caption=caption)
    try:
        paths = grid_images(content, images, n_images)
        if loaded is None:
            from .models import load_model

            loaded = load_model(rows[0]["model"], config.get("weights", "pretrained"))
        unreadable: list[str] = []
        fig = figure_grid(loaded, all_rows, paths, keep_rate, rows[0].get("crop_pct"), skipped=unreadable)
        skipped_images += unreadable
        written += _save(fig, out, "grid")
        plt.close(fig)
    except TokenscopeError as err:
        if images:
            raise
        skipped["grid"] = str(err)
    (out / "figures.json").write_text(json.dumps({"written": [p.name for p in written], "skipped": skipped,
                                                  "skipped_images": skipped_images}, indent=1))
    return {"written": written, "skipped": skipped, "skipped_images": skipped_images}


def zip_bytes(paths: Sequence[Path]) -> bytes:
    """The given files in one zip archive (for the app's download button)."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in paths:
            archive.write(path, arcname=Path(path).name)
    return buffer.getvalue()
