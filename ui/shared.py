"""Cached model loading and the model sidebar every page shares.

The model object from `cached_model` is shared by every browser session at once and is never
modified: reduction settings travel in the `ReductionPlan` passed to each forward call.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch
from PIL import Image

from analysis.models import (
    DEFAULT_MODEL,
    MODEL_CHOICES,
    LoadedModel,
    TokenscopeError,
    crop_only_transform,
    first_cached_model,
    load_model,
    preprocess,
    weights_cached,
)

WEIGHT_SOURCES = ("pretrained", "checkpoint file", "random")


@st.cache_resource(show_spinner="Loading the model…")
def cached_model(name: str, weights: str, device: str) -> LoadedModel:
    """One LoadedModel per (name, weights, device), shared by all sessions."""
    return load_model(name, weights, device)


@st.cache_data(show_spinner=False)
def _cached_ok(name: str) -> bool:
    return weights_cached(name)


def _save_checkpoint(upload) -> str:
    """Write an uploaded checkpoint to a stable temporary path (keyed by content) and return it."""
    data = upload.getvalue()
    digest = __import__("hashlib").sha1(data).hexdigest()[:16]
    suffix = Path(upload.name).suffix or ".pth"
    path = Path(tempfile.gettempdir()) / f"tokenscope-ckpt-{digest}{suffix}"
    if not path.exists():
        path.write_bytes(data)
    return str(path)


@dataclass
class ModelChoice:
    loaded: LoadedModel | None
    note: str | None


def model_sidebar(key: str = "model") -> ModelChoice:
    """Sidebar widgets for model, weights and device; returns the loaded model or None after an
    `st.error` that says what was wrong and what to do.

    If the default model's weights are neither cached nor downloadable, the page opens on the first
    listed model whose weights are cached and says so in one line.
    """
    sidebar = st.sidebar
    default_name = st.session_state.get(f"{key}_fallback", DEFAULT_MODEL)
    # A widget's state may only be set before the widget is created: the fallback is applied here,
    # on the rerun that follows the failed load.
    pending = st.session_state.pop(f"{key}_pending", None)
    if pending is not None:
        st.session_state[f"{key}_name"] = pending
    # The index is only a default: once the widget's state exists (or the fallback set it), passing
    # it as well makes Streamlit warn.
    index = {} if f"{key}_name" in st.session_state else {"index": MODEL_CHOICES.index(default_name)}
    name = sidebar.selectbox("Model", MODEL_CHOICES, key=f"{key}_name", help="timm ViT with a class token", **index)
    source = sidebar.radio("Weights", WEIGHT_SOURCES, key=f"{key}_weights", horizontal=True,
                           help="pretrained: timm's Hugging Face download and cache; checkpoint: a local .pth/.pt/.safetensors; random: untrained (shapes and GMACs only)")
    weights = source
    if source == "checkpoint file":
        upload = sidebar.file_uploader("Checkpoint (.pth, .pt, .safetensors)", type=["pth", "pt", "safetensors"], key=f"{key}_ckpt")
        if upload is None:
            st.info("Upload a checkpoint file in the sidebar, or pick pretrained or random weights.")
            return ModelChoice(None, None)
        weights = _save_checkpoint(upload)
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    device = sidebar.selectbox("Device", devices, key=f"{key}_device")
    note = None
    try:
        loaded = cached_model(name, weights, device)
    except TokenscopeError as err:
        if source == "pretrained" and name == DEFAULT_MODEL and f"{key}_fallback" not in st.session_state:
            fallback = first_cached_model()
            if fallback is not None:
                st.session_state[f"{key}_fallback"] = fallback
                st.session_state[f"{key}_pending"] = fallback
                st.session_state[f"{key}_fallback_note"] = (
                    f"{DEFAULT_MODEL}'s weights are not cached and cannot be downloaded; opened on {fallback}, whose weights are cached."
                )
                st.rerun()
        st.error(f"{err}. Pick another model or weights source in the sidebar.")
        return ModelChoice(None, None)
    note = st.session_state.get(f"{key}_fallback_note")
    if note and name == st.session_state.get(f"{key}_fallback"):
        sidebar.info(note)
    else:
        note = None
    return ModelChoice(loaded, note)


def weights_badge(loaded: LoadedModel) -> str:
    """One line for every output: model, weights (random spelt out) and device."""
    text = f"{loaded.name} · weights: {loaded.weights_label} · device: {loaded.device}"
    return f"⚠️ {text}" if loaded.is_random else text


# --- one image through one plan, cached (the main page's per-image results) ----------------------
@dataclass
class ImageAnalysis:
    """One image through one ReductionPlan, reduced to what a page draws (numpy and plain values).

    Defined here, not in a page script, so `st.cache_data` can pickle it across reruns.

    Attributes:
        plan: the plan that ran.
        token_counts: tokens (cls included) leaving each block.
        stages: one `viz.overlays.StageRecord` per reduction stage (provenance, methods.md §7).
        top5: the 5 most probable ImageNet classes as {index, label, prob}.
        gmacs: `analysis.gmacs.gmacs_report` of the plan with the actual token counts.
        block_outputs: per block, the [N_i, C] float32 tokens leaving it, cls token at index 0
            (what `diversity` computes r(Z) from).
        block_sizes: per block, the [N_i] patches held by each token (cls included).

    The diversity r(Z) is not part of the cached analysis: `diversity` computes it on demand for
    the options a page asks for, and `image_diversity` caches that across reruns.
    """

    plan: Any
    token_counts: list[int]
    stages: list[Any]
    top5: list[dict[str, Any]]
    gmacs: dict[str, float]
    block_outputs: list[np.ndarray]
    block_sizes: list[np.ndarray]

    @classmethod
    def from_result(cls, result: Any, plan: Any, gmacs: dict[str, float]) -> "ImageAnalysis":
        """The analysis of image 0 of an `analysis.engine.Result` run with keep_block_outputs=True."""
        from analysis.inspect import top_k
        from viz.overlays import StageRecord

        if result.block_outputs is None:
            raise ValueError("the result has no block outputs: run the engine with keep_block_outputs=True")
        return cls(
            plan=plan,
            token_counts=list(result.token_counts),
            stages=[StageRecord.from_stage(stage, 0) for stage in result.stages],
            top5=top_k(result.logits, 5)[0],
            gmacs=gmacs,
            block_outputs=[output[0].detach().float().cpu().numpy() for output in result.block_outputs],
            block_sizes=[sizes[0].detach().cpu().numpy() for sizes in result.block_sizes],
        )

    def diversity(self, centre: str = "medoid", size_weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(raw, per-token) r(Z) of each block's output (methods.md §5), each [depth] float64, by
        `analysis.diversity.diversity_of_blocks` on the stored block outputs.

        Args:
            centre: "medoid" (one of the tokens, BAT's definition) or "median" (free centre).
            size_weighted: a token counts once per patch it holds; per-token values then divide by
                the total size instead of the number of non-cls tokens.
        Raises:
            ValueError: an unknown centre.
        """
        from analysis.diversity import diversity_of_blocks

        outputs = [torch.from_numpy(output).unsqueeze(0) for output in self.block_outputs]
        sizes = [torch.from_numpy(size).unsqueeze(0) for size in self.block_sizes]
        raw, per_token = diversity_of_blocks(outputs, sizes, centre, bool(size_weighted))
        return raw[0], per_token[0]


@st.cache_data(show_spinner=False, max_entries=16)
def model_crop(digest: str, name: str, weights: str, device: str, crop_pct: float | None, _image) -> Image.Image:
    """The exact crop the model sees (resize + centre crop, no normalisation) of the image whose
    bytes hash to `digest` (`_image` is not hashed: the digest stands for it)."""
    loaded = cached_model(name, weights, device)
    return crop_only_transform(loaded.model, crop_pct)(_image).convert("RGB")


# 24 entries: two or three main-page views (dense, the chosen methods and the comparison row's own
# plans); each holds its block outputs (DeiT-S about 3.6 MB, DeiT-B 7 MB), so the cache stays
# under about 200 MB on a shared server.
@st.cache_data(show_spinner=False, max_entries=24)
def analyse_image(digest: str, name: str, weights: str, device: str, plan, crop_pct: float | None, _image) -> ImageAnalysis:
    """Run `plan` (an `analysis.engine.ReductionPlan`) on one PIL image, cached by (image bytes
    hash `digest`, model, weights, device, plan, crop).

    The analysis keeps the image's block outputs and sizes; the diversity r(Z) is computed only
    when a page asks for it (`image_diversity`), for the options it asks for.

    Raises PlanError / TokenscopeError when the plan cannot run on this model.
    """
    from analysis.engine import run
    from analysis.gmacs import gmacs_report

    loaded = cached_model(name, weights, device)
    batch = preprocess([_image], loaded.model, crop_pct).to(loaded.device)
    result = run(loaded.model, batch, plan, extras=loaded.extras, keep_block_outputs=True)
    gmacs = gmacs_report(loaded.model, plan, loaded.extras, list(result.token_counts))
    return ImageAnalysis.from_result(result, plan, gmacs)


@st.cache_data(show_spinner=False, max_entries=512)
def image_diversity(digest: str, name: str, weights: str, device: str, plan, crop_pct: float | None,
                    centre: str, size_weighted: bool, _image) -> tuple[np.ndarray, np.ndarray]:
    """(raw, per-token) r(Z) per block (methods.md §5), each [depth] float64, of `plan` on one image
    for one centre and weighting, cached across reruns by `analyse_image`'s key plus the two
    options (a few hundred bytes each): redrawing the chart after another widget changes, or
    toggling per-token, computes nothing.

    Raises ValueError for an unknown centre, PlanError / TokenscopeError as `analyse_image`.
    """
    return analyse_image(digest, name, weights, device, plan, crop_pct, _image).diversity(centre, size_weighted)
