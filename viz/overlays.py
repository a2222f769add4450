"""Static pictures of token reduction, drawn over the model's input crop (methods.md §7).

Every function here is pure: it takes the crop as a PIL image and one stage's provenance as a
`StageRecord` of numpy arrays, and returns a new PIL image. Nothing here runs a model.

Geometry: the crop is the exact image the model sees (`analysis.models.crop_only_transform`),
`grid = (rows, cols)` is the patch grid (`model.patch_embed.grid_size`), patches are numbered
row-major. Pictures are drawn at `scale` times the crop's size (crisper lines and arrows); a
legend strip of `legend_height(...)` pixels is appended below the picture area, so a picture is
`(W * scale, H * scale + legend height)` pixels.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from analysis.provenance import StageRecord  # noqa: F401  (the record every picture draws)

# --- colours the pictures promise (tests check them) --------------------------------------------
DIM_FACTOR = 0.25                  # a discarded patch keeps 25 % of its brightness
FUSED_COLOUR = (255, 0, 255)       # magenta: patches inside EViT's fused token
FUSED_ALPHA = 0.55                 # tint strength of the fused colour
DISCARDED_SWATCH = (40, 40, 40)    # legend swatch of "discarded"
NAN_COLOUR = (128, 128, 128)       # class attention of an already-discarded patch
KEPT_BORDER = (235, 235, 235)      # thin outline of a single (unmerged) token
TINT_ALPHA = 0.6                   # tint strength of a pruned patch in its host's colour
ATTENTION_ALPHA = 0.65             # heatmap over the crop
ARROW_COLOUR = (255, 255, 255)     # dispatch arrows; opacity = squeeze weight (`arrow_opacity`)
MIN_ARROW_OPACITY = 0.2            # light arrows (GTP-ViT's graph weights, ~0.03) stay visible
ARROW_SHADOW = (0, 0, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)

# Distinct colours for groups and hosts (matplotlib's tab10 followed by the dark half of tab20b).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (57, 59, 121), (99, 121, 57), (140, 109, 49), (132, 60, 57), (123, 65, 115),
    (82, 84, 163), (181, 207, 107), (231, 186, 82), (214, 97, 107), (206, 109, 189),
)

FONT_SIZE = 16
LEGEND_ROW = 26     # pixels per legend row
LEGEND_PAD = 6


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


# --- geometry helpers --------------------------------------------------------------------------
def _check(crop: Image.Image, grid: tuple[int, int], n_patches: int) -> tuple[int, int]:
    rows, cols = grid
    if rows * cols != n_patches:
        raise ValueError(f"grid {rows}x{cols} does not match {n_patches} patches")
    if crop.width % cols or crop.height % rows:
        raise ValueError(f"crop {crop.width}x{crop.height} is not a whole number of {rows}x{cols} patches")
    return crop.height // rows, crop.width // cols


def _base(crop: Image.Image, scale: int) -> np.ndarray:
    """The crop upscaled by `scale` (nearest neighbour, so patch edges stay exact) as float [H, W, 3]."""
    rgb = crop.convert("RGB")
    if scale != 1:
        rgb = rgb.resize((rgb.width * scale, rgb.height * scale), Image.NEAREST)
    return np.asarray(rgb, dtype=np.float64)


def _patch_map(values: np.ndarray, grid: tuple[int, int], patch_px: tuple[int, int]) -> np.ndarray:
    """Per-patch values [P, ...] -> per-pixel [rows*ph, cols*pw, ...]."""
    rows, cols = grid
    grid_values = values.reshape(rows, cols, *values.shape[1:])
    return np.repeat(np.repeat(grid_values, patch_px[0], axis=0), patch_px[1], axis=1)


def patch_centres(grid: tuple[int, int], patch_px: tuple[int, int]) -> np.ndarray:
    """[P, 2] (x, y) pixel centres of the patches, row-major."""
    rows, cols = grid
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([(c + 0.5) * patch_px[1], (r + 0.5) * patch_px[0]], axis=1)


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _blend(pixels: np.ndarray, mask: np.ndarray, colour, alpha: float) -> None:
    """In place: pixels[mask] = (1 - alpha) * pixels + alpha * colour; colour is [3] or [n_mask, 3]."""
    pixels[mask] = (1.0 - alpha) * pixels[mask] + alpha * np.asarray(colour, dtype=np.float64)


def _boundary(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` px of a label change or of the image edge (inside their own region)."""
    edge = np.zeros(labels.shape, dtype=bool)
    h, w = labels.shape
    for shift in range(1, width + 1):
        edge[:, w - shift:] = True
        edge[:, :shift] = True
        edge[h - shift:, :] = True
        edge[:shift, :] = True
        edge[:, :-shift] |= labels[:, :-shift] != labels[:, shift:]
        edge[:, shift:] |= labels[:, shift:] != labels[:, :-shift]
        edge[:-shift, :] |= labels[:-shift, :] != labels[shift:, :]
        edge[shift:, :] |= labels[shift:, :] != labels[:-shift, :]
    return edge


def distinct_colours(patch_labels: np.ndarray, grid: tuple[int, int], labels: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """A palette colour per label such that labels on neighbouring patches differ (greedy colouring).

    Args:
        patch_labels: [P] int label of each patch (e.g. its token), -1 for none.
        labels: the labels that need a colour.
    """
    rows, cols = grid
    board = patch_labels.reshape(rows, cols)
    neighbours: dict[int, set[int]] = {int(label): set() for label in labels}
    pairs = [(board[:, :-1], board[:, 1:]), (board[:-1, :], board[1:, :])]
    for a, b in pairs:
        differ = a != b
        for u, v in zip(a[differ].tolist(), b[differ].tolist()):
            if u in neighbours and v in neighbours:
                neighbours[u].add(v)
                neighbours[v].add(u)
    colours: dict[int, tuple[int, int, int]] = {}
    for rank, label in enumerate(sorted(neighbours)):
        used = {colours[n] for n in neighbours[label] if n in colours}
        free = [c for c in PALETTE if c not in used]
        colours[label] = free[rank % len(free)] if free else PALETTE[rank % len(PALETTE)]
    return colours


# --- legend ------------------------------------------------------------------------------------
LegendItem = tuple[str, Any]  # (text, swatch): swatch is an RGB tuple, ("outline", rgb, width), ("marker", shape) or ("gradient", cmap name)


def _item_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return 18 + 6 + int(draw.textlength(text, font=font)) + 14


def legend_height(items: Sequence[LegendItem], width: int) -> int:
    """Height in pixels of the legend strip for `items` on a picture `width` px wide (0 if no items)."""
    if not items:
        return 0
    return LEGEND_PAD * 2 + LEGEND_ROW * len(_legend_rows(items, width))


def _legend_rows(items: Sequence[LegendItem], width: int) -> list[list[LegendItem]]:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font()
    rows: list[list[LegendItem]] = [[]]
    used = LEGEND_PAD
    for item in items:
        w = 120 + int(draw.textlength(item[0], font=font)) if _is_gradient(item[1]) else _item_width(draw, item[0], font)
        if rows[-1] and used + w > width - LEGEND_PAD:
            rows.append([])
            used = LEGEND_PAD
        rows[-1].append(item)
        used += w
    return rows


def _is_gradient(swatch) -> bool:
    return isinstance(swatch, tuple) and len(swatch) >= 1 and swatch[0] == "gradient"


def _draw_marker(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float) -> None:
    """A marker of radius r px: "ring" (hollow white ring, black edges: attentive pairs), "triangle"
    (filled black triangle, white edge: inattentive clusters), "arrow". Ring and triangle differ in
    both shape and fill, so they stay apart at small sizes."""
    if shape == "ring":
        width = max(2, int(r / 2.5))
        draw.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], outline=(0, 0, 0), width=width + 2)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 255), width=width)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 2), (x + r + 2, y + r + 1), (x - r - 2, y + r + 1)], fill=(0, 0, 0), outline=(255, 255, 255), width=2)
    elif shape == "arrow":
        draw.line([(x - r - 4, y), (x + r, y)], fill=(0, 0, 0), width=2)
        draw.polygon([(x + r + 3, y), (x + r - 3, y - 4), (x + r - 3, y + 4)], fill=(0, 0, 0))


def _with_legend(picture: Image.Image, items: Sequence[LegendItem]) -> Image.Image:
    """Append a legend strip below `picture` (same width)."""
    if not items:
        return picture
    width = picture.width
    height = legend_height(items, width)
    out = Image.new("RGB", (width, picture.height + height), BACKGROUND)
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    font = _font()
    y = picture.height + LEGEND_PAD
    for row in _legend_rows(items, width):
        x = LEGEND_PAD
        for text, swatch in row:
            top, mid = y + 5, y + LEGEND_ROW // 2
            if _is_gradient(swatch):
                import matplotlib

                cmap = matplotlib.colormaps[swatch[1]]
                bar = (np.asarray([cmap(v)[:3] for v in np.linspace(0, 1, 100)]) * 255).astype(np.uint8)
                strip = Image.fromarray(np.repeat(bar[None], 12, axis=0), "RGB")
                out.paste(strip, (x, top + 1))
                x += 106
            elif isinstance(swatch, tuple) and swatch and swatch[0] == "outline":
                draw.rectangle([x, top, x + 17, top + 13], outline=swatch[1], width=swatch[2])
                x += 24
            elif isinstance(swatch, tuple) and swatch and swatch[0] == "marker":
                draw.rectangle([x, top, x + 17, top + 13], fill=(160, 160, 160))
                _draw_marker(draw, swatch[1], x + 9, mid, 5)
                x += 24
            else:
                draw.rectangle([x, top, x + 17, top + 13], fill=tuple(swatch), outline=(90, 90, 90))
                x += 24
            draw.text((x, mid), text, fill=TEXT_COLOUR, font=font, anchor="lm")
            x += int(draw.textlength(text, font=font)) + 14
        y += LEGEND_ROW
    return out


# --- the pictures ------------------------------------------------------------------------------
def masked_view(crop: Image.Image, record: StageRecord, grid: tuple[int, int], *, scale: int = 2, legend: bool = True) -> Image.Image:
    """Masked-token view of one stage: discarded patches dimmed to `DIM_FACTOR` of their brightness,
    patches inside a fused token (EViT, methods.md §2; also an earlier fused token kept at this
    stage, i.e. any non-cls token holding several patches) tinted `FUSED_COLOUR`, every other
    patch as in the crop.

    Args:
        crop: the model's input crop, W x H pixels (a whole number of patches).
        record: the stage's provenance; `patch_to_token` [P] and `token_kinds`.
        grid: (rows, cols) patch grid, rows * cols = P.
    Returns:
        RGB image of (W * scale, H * scale + legend) pixels.
    Raises:
        ValueError: the grid does not match the crop or the record.
    """
    _check(crop, grid, record.patch_to_token.size)
    pixels = _base(crop, scale)
    patch_px = (pixels.shape[0] // grid[0], pixels.shape[1] // grid[1])
    kinds = np.asarray(record.token_kinds + ("",))  # index -1 (discarded) reads the sentinel
    patch_kind = kinds[record.patch_to_token]
    discarded = _patch_map(record.patch_to_token < 0, grid, patch_px)
    # A fused token that survives a later stage is "kept" there but still holds many patches: it
    # is tinted too (in EViT only fused tokens ever hold more than one patch).
    sizes = np.append(np.bincount(record.patch_to_token[record.patch_to_token >= 0], minlength=record.n_tokens), 0)
    in_fused = (patch_kind == "fused") | ((record.patch_to_token > 0) & (sizes[record.patch_to_token] > 1))
    fused = _patch_map(in_fused, grid, patch_px)
    pixels[discarded] *= DIM_FACTOR
    _blend(pixels, fused, FUSED_COLOUR, FUSED_ALPHA)
    picture = _to_image(pixels)
    if not legend:
        return picture
    kept = int(((record.patch_to_token > 0) & ~in_fused).sum())
    items: list[LegendItem] = [(f"kept ({kept} patches)", ("outline", (120, 120, 120), 1))]
    if (record.patch_to_token < 0).any():
        items.append((f"discarded ({int((record.patch_to_token < 0).sum())})", DISCARDED_SWATCH))
    if in_fused.any():
        items.append((f"in a fused token ({int(in_fused.sum())})", FUSED_COLOUR))
    return _with_legend(picture, items)


def attention_view(crop: Image.Image, cls_attention: np.ndarray, grid: tuple[int, int], *, scale: int = 2,
                   cmap: str = "inferno", legend: bool = True) -> Image.Image:
    """Class-attention heatmap of one reducing block (methods.md §1) over the crop.

    Args:
        cls_attention: [P] head-averaged class attention of each patch's token (NaN = patch already
            discarded, drawn `NAN_COLOUR`). Colours are min-max normalised over the finite values.
    Returns:
        RGB image of (W * scale, H * scale + legend) pixels; the legend gives the value range.
    """
    values = np.asarray(cls_attention, dtype=np.float64)
    _check(crop, grid, values.size)
    import matplotlib

    pixels = _base(crop, scale)
    patch_px = (pixels.shape[0] // grid[0], pixels.shape[1] // grid[1])
    finite = np.isfinite(values)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 1.0)
    norm = np.where(finite, (values - lo) / (hi - lo) if hi > lo else 0.5, 0.0)
    colours = np.asarray(matplotlib.colormaps[cmap](norm))[:, :3] * 255.0
    colours[~finite] = NAN_COLOUR
    heat = _patch_map(colours, grid, patch_px)
    missing = _patch_map(~finite, grid, patch_px)
    pixels = (1 - ATTENTION_ALPHA) * pixels + ATTENTION_ALPHA * heat
    pixels[missing] = NAN_COLOUR
    picture = _to_image(pixels)
    if not legend:
        return picture
    items: list[LegendItem] = [(f"class attention {lo:.2g} … {hi:.2g}", ("gradient", cmap))]
    if (~finite).any():
        items.append(("already discarded", NAN_COLOUR))
    return _with_legend(picture, items)


MERGE_KINDS = ("pair", "cluster", "merged")


MERGE_STYLES = {"tint": "over the photo (groups tinted and outlined)", "mean": "mean colour per group (ToMe's figures)"}
GROUP_TINT_ALPHA = 0.35  # "tint" style: strength of a merged group's colour over the photo


def merge_groups_view(crop: Image.Image, record: StageRecord, grid: tuple[int, int], *, scale: int = 2,
                      legend: bool = True, style: str = "mean") -> Image.Image:
    """Merge groups of one stage, in one of two renderings (`MERGE_STYLES`): "mean", each output
    token's region filled with the mean colour of its patches (ToMe's figures); "tint", the photo
    itself with each merged token's region tinted in its colour (`GROUP_TINT_ALPHA`), so the image
    stays legible (BAT's figures colour the groups over the image). In both, a merged token's
    border is drawn in a colour distinct from its neighbours'.

    Tokens holding one patch get a thin `KEPT_BORDER` outline; merged tokens a 2-px border per
    scale unit in their palette colour. When the record mixes kinds (BAT, methods.md §4), a marker
    tells them apart: a white ring on attentive pairs, a black triangle on inattentive clusters,
    no marker on kept single tokens. Discarded patches are dimmed.

    Returns:
        RGB image of (W * scale, H * scale + legend) pixels.
    Raises:
        ValueError: an unknown style, or a grid that does not match the crop or the record.
    """
    if style not in MERGE_STYLES:
        raise ValueError(f"merge-group style must be one of {', '.join(MERGE_STYLES)}, got {style!r}")
    _check(crop, grid, record.patch_to_token.size)
    rows, cols = grid
    pixels = _base(crop, scale)
    photo = pixels.copy()
    patch_px = (pixels.shape[0] // rows, pixels.shape[1] // cols)
    p2t = record.patch_to_token
    n_out = record.n_tokens
    # mean colour of each patch, then of each token (patches are equal-sized, so a plain mean)
    patch_means = pixels.reshape(rows, patch_px[0], cols, patch_px[1], 3).mean(axis=(1, 3)).reshape(-1, 3)
    present = p2t >= 0
    counts = np.bincount(p2t[present], minlength=n_out).astype(np.float64)
    sums = np.stack([np.bincount(p2t[present], weights=patch_means[present, ch], minlength=n_out) for ch in range(3)], 1)
    token_mean = sums / np.maximum(counts, 1)[:, None]
    fill = np.where(present[:, None], token_mean[np.maximum(p2t, 0)], patch_means * DIM_FACTOR)
    label_pixels = _patch_map(p2t, grid, patch_px)
    sizes = np.bincount(p2t[present], minlength=n_out)
    groups = [t for t in range(1, n_out) if sizes[t] >= 2]
    colours = distinct_colours(p2t, grid, groups)
    if style == "mean":
        pixels = _patch_map(fill, grid, patch_px).copy()
    else:
        pixels = photo
        pixels[_patch_map(~present, grid, patch_px)] *= DIM_FACTOR
        if groups:
            tint_table = np.zeros((n_out + 1, 3))
            for t, c in colours.items():
                tint_table[t] = c
            grouped_px = np.isin(label_pixels, groups)
            _blend(pixels, grouped_px, tint_table[label_pixels[grouped_px]], GROUP_TINT_ALPHA)
    thin = _boundary(label_pixels, max(1, scale // 2))
    thick = _boundary(label_pixels, 2 * scale)
    single_px = np.isin(label_pixels, [t for t in range(1, n_out) if sizes[t] == 1])
    pixels[thin & single_px] = KEPT_BORDER
    if groups:
        colour_table = np.zeros((n_out + 1, 3))
        for t, c in colours.items():
            colour_table[t] = c
        grouped = np.isin(label_pixels, groups) & thick
        pixels[grouped] = colour_table[label_pixels[grouped]]
    picture = _to_image(pixels)
    kinds = record.token_kinds
    present_kinds = {kinds[t] for t in range(1, n_out) if sizes[t] >= 1}
    # BAT's stages hold kept singles, attentive pairs and inattentive clusters side by side; only
    # there do markers tell the kinds apart (DPC's "kept" is just a cluster of one).
    mixed = "pair" in present_kinds and len(present_kinds & {"kept", "pair", "cluster"}) >= 2
    if mixed:
        draw = ImageDraw.Draw(picture)
        centres = patch_centres(grid, patch_px)
        for t in range(1, n_out):
            shape = {"pair": "ring", "cluster": "triangle"}.get(kinds[t]) if sizes[t] else None
            if shape is None:
                continue
            members = np.flatnonzero(p2t == t)
            centroid = centres[members].mean(axis=0)
            anchor = centres[members[np.argmin(((centres[members] - centroid) ** 2).sum(1))]]
            _draw_marker(draw, shape, anchor[0], anchor[1], 3.5 * scale)
    if not legend:
        return picture
    items: list[LegendItem] = []
    n_single = int(sum(1 for t in range(1, n_out) if sizes[t] == 1))
    if mixed:
        count = {k: sum(1 for t in range(1, n_out) if kinds[t] == k and sizes[t]) for k in ("pair", "cluster")}
        n_kept = sum(1 for t in range(1, n_out) if kinds[t] == "kept" and sizes[t])
        items += [(f"kept single token ({n_kept}): thin light outline", ("outline", KEPT_BORDER, 2)),
                  (f"attentive pair ({count['pair']}): white ring", ("marker", "ring")),
                  (f"inattentive cluster ({count['cluster']}): black triangle", ("marker", "triangle"))]
        fill_text = "fill = mean colour" if style == "mean" else "tint"
        items.append((f"{fill_text}; coloured border = one merged token", ("outline", PALETTE[0], 3)))
    else:
        what = "border colour per token" if style == "mean" else "tinted and outlined per token"
        items.append((f"merged token ({len(groups)}), {what}", ("outline", PALETTE[0], 3)))
        items.append((f"single patch ({n_single})", ("outline", KEPT_BORDER, 2)))
    if (~present).any():
        items.append((f"discarded ({int((~present).sum())})", DISCARDED_SWATCH))
    return _with_legend(picture, items)


def host_locations(record: StageRecord, grid: tuple[int, int], patch_px: tuple[int, int]) -> dict[int, np.ndarray]:
    """(x, y) pixel location of every token that received pruned patches at this stage (TPS host).

    The location is the centroid of the patches the host holds that were not pruned at this stage
    (its own region); if it has none, the centroid of all its patches. Hosts that only received a
    share of a patch tied between several hosts (`record.edges`) are included.
    """
    pruned = record.patch_pruned if record.patch_pruned is not None else np.zeros(record.patch_to_token.shape, bool)
    centres = patch_centres(grid, patch_px)
    extra = [token for pairs in record.other_hosts().values() for token, _ in pairs]
    hosts = np.unique(np.concatenate([record.patch_to_token[pruned], np.asarray(extra, dtype=np.int64)]))
    out = {}
    for host in hosts.tolist():
        own = (record.patch_to_token == host) & ~pruned
        members = own if own.any() else record.patch_to_token == host
        out[int(host)] = centres[members].mean(axis=0)
    return out


def dispatch_arrows(record: StageRecord) -> list[tuple[int, int, float]]:
    """(pruned patch, host token, squeeze weight) of every arrow of a dispatch map, weakest first (so
    the strongest are drawn on top): one per pruned patch to the token that holds it, and one more
    to every further host of a patch tied between several (`record.edges`)."""
    pruned = record.patch_pruned & (record.patch_to_token >= 0)
    arrows = [(int(p), int(record.patch_to_token[p]), float(record.patch_weight[p])) for p in np.flatnonzero(pruned)]
    arrows += [(patch, token, share) for patch, pairs in record.other_hosts().items() for token, share in pairs]
    return sorted(arrows, key=lambda arrow: arrow[2])


def _draw_arrow(draw: ImageDraw.ImageDraw, start, end, colour, alpha: int, width: int, head: float) -> None:
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    if length < 1e-6:
        return
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    bx, by = x1 - ux * head, y1 - uy * head
    draw.line([(x0, y0), (bx, by)], fill=colour + (alpha,), width=width)
    draw.polygon([(x1, y1), (bx - uy * head * 0.5, by + ux * head * 0.5), (bx + uy * head * 0.5, by - ux * head * 0.5)],
                 fill=colour + (alpha,))


def arrow_opacity(weight: float) -> float:
    """A dispatch arrow's opacity: its weight, clipped to [MIN_ARROW_OPACITY, 1], so that arrows of
    small weight (a pruned token spread over many receivers, e.g. over GTP-ViT's graph) stay
    visible; the hover and the JSON give the weight itself."""
    return float(np.clip(weight, MIN_ARROW_OPACITY, 1.0))


def dispatch_view(crop: Image.Image, record: StageRecord, grid: tuple[int, int], *, scale: int = 2,
                  legend: bool = True, arrows: bool = True) -> Image.Image:
    """TPS dispatch map of one stage (methods.md §3): every pruned patch tinted with its host's
    colour (`TINT_ALPHA`), an arrow from the pruned patch to its host with opacity = the squeeze
    weight `e^{c_jh} / den_h` (`patch_weight`), and each host's own region outlined in its colour.

    Patches discarded at an earlier stage are dimmed. Host location: `host_locations`. Each arrow
    is a white core over a black shadow, both at opacity = weight. `arrows=False` leaves them out
    (the plotly version draws its own).

    Returns:
        RGB image of (W * scale, H * scale + legend) pixels.
    Raises:
        ValueError: the record has no `patch_pruned` / `patch_weight` (not a squeezing stage).
    """
    if record.patch_pruned is None or record.patch_weight is None:
        raise ValueError(f"stage at layer {record.layer} has no dispatch record (patch_pruned / patch_weight)")
    _check(crop, grid, record.patch_to_token.size)
    rows, cols = grid
    pixels = _base(crop, scale)
    patch_px = (pixels.shape[0] // rows, pixels.shape[1] // cols)
    p2t = record.patch_to_token
    pruned = record.patch_pruned & (p2t >= 0)
    hosts = host_locations(record, grid, patch_px)
    host_region = np.where(np.isin(p2t, list(hosts)) & ~pruned, p2t, -1)
    colours = distinct_colours(np.where(pruned, -1, host_region), grid, list(hosts))
    colour_table = np.zeros((record.n_tokens + 1, 3))
    for t, c in colours.items():
        colour_table[t] = c
    pixels[_patch_map(p2t < 0, grid, patch_px)] *= DIM_FACTOR
    tint = _patch_map(pruned, grid, patch_px)
    label_pixels = _patch_map(p2t, grid, patch_px)
    _blend(pixels, tint, colour_table[label_pixels[tint]], TINT_ALPHA)
    region_pixels = _patch_map(host_region, grid, patch_px)
    outline = _boundary(region_pixels, scale + 1) & (region_pixels >= 0)
    pixels[outline] = colour_table[region_pixels[outline]]
    picture = _to_image(pixels).convert("RGBA")
    layer = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    centres = patch_centres(grid, patch_px)
    for patch, host, weight in (dispatch_arrows(record) if arrows else []):
        alpha = int(round(255 * arrow_opacity(weight)))
        start, end = centres[patch], hosts[host]
        _draw_arrow(draw, start, end, ARROW_SHADOW, alpha, scale + 2, 4 * scale)
        _draw_arrow(draw, start, end, ARROW_COLOUR, alpha, max(1, scale - 1), 4 * scale - 1)
    picture = Image.alpha_composite(picture, layer).convert("RGB")
    if not legend:
        return picture
    w = record.patch_weight[pruned]
    items: list[LegendItem] = [
        (f"pruned patch ({int(pruned.sum())}), tinted as its host", PALETTE[1]),
        (f"host token ({len(hosts)}), outlined", ("outline", PALETTE[0], 3)),
        (f"arrow opacity = weight ({w.min():.2f} … {w.max():.2f}; at least {MIN_ARROW_OPACITY:g})" if w.size
         else "arrow opacity = weight", ("marker", "arrow")),
    ]
    if (p2t < 0).any():
        items.append((f"discarded earlier ({int((p2t < 0).sum())})", DISCARDED_SWATCH))
    return _with_legend(picture, items)


VIEW_NAMES = {"masked": "masked tokens", "merge": "merge groups", "dispatch": "dispatch map"}


def suggested_view(record: StageRecord) -> str:
    """Which picture fits a stage: "dispatch" (pruned tokens squeezed into hosts: TPS), "merge"
    (pairs, clusters or merged tokens: BAT, DPC, ToMe) or "masked" (kept / fused / discarded: EViT,
    DynamicViT)."""
    kinds = set(record.token_kinds)
    if record.squeezes and record.patch_weight is not None:
        return "dispatch"
    if kinds & set(MERGE_KINDS):
        return "merge"
    return "masked"


def stage_view(crop: Image.Image, record: StageRecord, grid: tuple[int, int], *, scale: int = 2, legend: bool = True,
               merge_style: str = "tint") -> Image.Image:
    """The picture `suggested_view` picks for this stage (merge groups in `merge_style`)."""
    kind = suggested_view(record)
    if kind == "merge":
        return merge_groups_view(crop, record, grid, scale=scale, legend=legend, style=merge_style)
    draw_fn = {"dispatch": dispatch_view, "masked": masked_view}[kind]
    return draw_fn(crop, record, grid, scale=scale, legend=legend)


# --- comparison row ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    """One picture of a comparison row: a title above, a caption (e.g. token counts) below."""

    title: str
    image: Image.Image
    caption: str = ""


TITLE_HEIGHT = 26
CAPTION_HEIGHT = 36
PANEL_GAP = 8


def comparison_row(panels: Sequence[Panel], panel_size: int = 224, note: str = "") -> Image.Image:
    """Panels side by side (BAT's comparison figure: (a) input, (b) importance-based, (c)
    diversity-based, (d) BAT, ...), each resized to `panel_size` x `panel_size`, with its title
    above and its caption below; `note` (e.g. how the budgets differ) in a strip under the row.

    Returns:
        RGB image of (n * panel_size + (n - 1) * PANEL_GAP, TITLE_HEIGHT + panel_size +
        CAPTION_HEIGHT [+ note strip]) pixels.
    Raises:
        ValueError: no panels.
    """
    if not panels:
        raise ValueError("a comparison row needs at least one panel")
    n = len(panels)
    width = n * panel_size + (n - 1) * PANEL_GAP
    font, small = _font(14), _font(12)
    note_lines = _wrap(note, width - 2 * LEGEND_PAD, small) if note else []
    height = TITLE_HEIGHT + panel_size + CAPTION_HEIGHT + (len(note_lines) * 16 + LEGEND_PAD if note_lines else 0)
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for i, panel in enumerate(panels):
        x = i * (panel_size + PANEL_GAP)
        image = panel.image.convert("RGB").resize((panel_size, panel_size), Image.LANCZOS)
        out.paste(image, (x, TITLE_HEIGHT))
        draw.text((x + panel_size / 2, TITLE_HEIGHT / 2), _fit(panel.title, panel_size, font, draw), fill=TEXT_COLOUR, font=font, anchor="mm")
        for j, line in enumerate(_wrap(panel.caption, panel_size, small)[:2]):
            draw.text((x + panel_size / 2, TITLE_HEIGHT + panel_size + 4 + 15 * j), line, fill=(70, 70, 70), font=small, anchor="ma")
    y = TITLE_HEIGHT + panel_size + CAPTION_HEIGHT
    for line in note_lines:
        draw.text((LEGEND_PAD, y), line, fill=(70, 70, 70), font=small)
        y += 16
    return out


def _fit(text: str, width: int, font, draw) -> str:
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…"
    return text


def _wrap(text: str, width: int, font) -> list[str]:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return [line for line in lines if line]


# --- downloads ---------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    """The picture as PNG file bytes (shown in the app and handed to its download buttons).

    zlib level 1: the app encodes every new picture on a slider move. On DeiT-T's 448 px stage
    pictures `optimize=True` took 208 ms a picture against 8 ms, for files 14 % smaller (106 against
    123 KB; 15 pictures of EViT, eTPS and ToMe on the sample cat)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


BANNER_COLOUR = (200, 30, 30)
BANNER_HEIGHT = 22


def with_banner(image: Image.Image, text: str) -> Image.Image:
    """`image` with a `BANNER_COLOUR` strip of `BANNER_HEIGHT` px on top carrying `text` in white
    (e.g. "random weights", so the label survives a download)."""
    out = Image.new("RGB", (image.width, image.height + BANNER_HEIGHT), BANNER_COLOUR)
    out.paste(image.convert("RGB"), (0, BANNER_HEIGHT))
    draw = ImageDraw.Draw(out)
    font = _font(12)
    draw.text((image.width / 2, BANNER_HEIGHT / 2), _fit(text, image.width, font, draw), fill=(255, 255, 255), font=font, anchor="mm")
    return out
