"""Cached model loading and the model sidebar every page shares.

The model object from `cached_model` is shared by every browser session at once and is never
modified: reduction settings travel in the `ReductionPlan` passed to each forward call.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import streamlit as st
import torch
from PIL import Image

from analysis.errors import TokenscopeError, WeightsError
from analysis.inspect import ImageAnalysis, analyse_images
from analysis.registry import all_methods
from analysis.models import (
    DEFAULT_MODEL,
    MODEL_CHOICES,
    MODEL_FAMILIES,
    LoadedModel,
    crop_only_transform,
    first_cached_model,
    load_model,
    weights_cached,
)

WEIGHT_SOURCES = ("pretrained", "checkpoint file", "checkpoint path", "random")
UPLOADED = "upload:"  # the weights key of an uploaded checkpoint: "upload:<sha1 of its bytes>"
# Models held at once (all sessions share them): a ViT-B checkpoint is about 350 MB in memory, so
# uploads from sessions that have closed cannot pile up; an evicted model is simply loaded again.
MODEL_CACHE_ENTRIES = 4

# Pictures are drawn with numpy and PNG-encoded by PIL, whose heavy loops run outside the GIL: one
# small pool, shared by every session, draws a rerun's pictures side by side (a method's 6 stage
# pictures, EViT on DeiT-S at 2 threads: 156 -> 96 ms, median of 7 interleaved).
_DRAWING = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tokenscope-draw")
_T = TypeVar("_T")


def draw_in_parallel(jobs: Sequence[Callable[[], _T]]) -> list[_T]:
    """Run drawing jobs on the shared pool and return their results in job order.

    A job must be a plain function of its inputs (no Streamlit call: the pool's threads have no
    script context); an exception raised in a job is raised here.
    """
    return [future.result() for future in [_DRAWING.submit(job) for job in jobs]]


@st.cache_resource(show_spinner="Loading the model…", max_entries=MODEL_CACHE_ENTRIES)
def cached_model(name: str, weights: str, device: str, _display_name: str | None = None,
                 _checkpoint: bytes | None = None) -> LoadedModel:
    """One LoadedModel per (name, weights, device), shared by all sessions.

    For an uploaded checkpoint, `weights` is "upload:<sha1>" and `_checkpoint` its bytes (not hashed):
    they are written to a temporary folder, loaded, and the folder is deleted at once; outputs name
    the weights by `_display_name` (the upload's own file name).
    Raises TokenscopeError as `load_model`, and WeightsError when an upload is asked for again after
    its model left the cache (upload it again).
    """
    if weights.startswith(UPLOADED):
        if _checkpoint is None:
            raise WeightsError("the uploaded checkpoint is no longer in memory (the server keeps "
                               f"{MODEL_CACHE_ENTRIES} models at once): upload it again")
        with tempfile.TemporaryDirectory(prefix="tokenscope-ckpt-") as folder:
            path = Path(folder) / Path(_display_name or "checkpoint.pth").name
            path.write_bytes(_checkpoint)
            loaded = load_model(name, str(path), device, display_name=_display_name)
        return dataclasses.replace(loaded, weights=weights)
    return load_model(name, weights, device, display_name=_display_name)


@st.cache_data(show_spinner=False)
def _cached_ok(name: str) -> bool:
    return weights_cached(name)


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
    name = sidebar.selectbox("Model", (*MODEL_CHOICES, OTHER_MODEL), key=f"{key}_name", format_func=model_label, **index,
                             help="timm ViTs by family; ✓ marks pretrained weights already in the local cache. Any other timm "
                                  "ViT name can be typed in (the last entry); unsupported architectures say why.")
    if name == OTHER_MODEL:
        name = sidebar.text_input("timm model name", key=f"{key}_other", placeholder="e.g. vit_base_patch16_384.augreg_in21k_ft_in1k").strip()
        if not name:
            st.info("Type a timm model name in the sidebar (e.g. vit_base_patch16_384.augreg_in21k_ft_in1k).")
            return ModelChoice(None, None)
    source = sidebar.radio("Weights", WEIGHT_SOURCES, key=f"{key}_weights", horizontal=True,
                           help="pretrained: timm's Hugging Face download and cache; checkpoint file: upload a .pth/.pt/.safetensors "
                                "(up to the server's upload limit, .streamlit/config.toml); checkpoint path: a file on the server; "
                                "random: untrained (shapes and GMACs only)")
    weights, display, data = source, None, None
    if source == "checkpoint file":
        upload = sidebar.file_uploader("Checkpoint (.pth, .pt, .safetensors)", type=["pth", "pt", "safetensors"], key=f"{key}_ckpt")
        if upload is None:
            st.info("Upload a checkpoint file in the sidebar, or give its path on the server (checkpoint path), or pick "
                    "pretrained or random weights.")
            return ModelChoice(None, None)
        data = upload.getvalue()
        weights, display = UPLOADED + hashlib.sha1(data).hexdigest(), upload.name
    elif source == "checkpoint path":
        text = sidebar.text_input("Checkpoint path on the server", key=f"{key}_ckpt_path",
                                  help="A .pth/.pt/.safetensors file the server can read, e.g. a ViT-B checkpoint too large to upload.")
        if not text.strip():
            st.info("Type the checkpoint's path on the server in the sidebar.")
            return ModelChoice(None, None)
        weights = str(Path(text.strip()).expanduser())
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    device = sidebar.selectbox("Device", devices, key=f"{key}_device")
    note = None
    try:
        loaded = cached_model(name, weights, device, display, data)
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


OTHER_MODEL = "other…"
_FAMILY_OF = {name: family for family, names in MODEL_FAMILIES.items() for name in names}


def model_label(name: str) -> str:
    """How the model list shows a name: its family, the name, and ✓ when its weights are cached."""
    if name == OTHER_MODEL:
        return "another timm model (type its name)…"
    return f"{_FAMILY_OF.get(name, 'other')} · {name}{' ✓' if _cached_ok(name) else ''}"


def default_methods(runnable: list[str]) -> list[str]:
    """The methods a page preselects: the first one with a keep rate and the first without (in the
    registry's order), among `runnable`."""
    methods = all_methods()
    picks = [next((n for n in runnable if methods[n].uses_keep_rate == flag), None) for flag in (True, False)]
    return [name for name in picks if name]


def weights_badge(loaded: LoadedModel) -> str:
    """One line for every output: model, weights (random spelt out) and device."""
    text = f"{loaded.name} · weights: {loaded.weights_label} · device: {loaded.device}"
    return f"⚠️ {text}" if loaded.is_random else text


# --- one image through one plan, cached (the main page's per-image results) ----------------------
@dataclass(frozen=True)
class AnalysisKey:
    """What identifies one image through one plan: the app's one hashable cache key.

    Attributes:
        digest: SHA-256 of the image file's bytes (it stands for the image).
        model, weights, device: as `cached_model`.
        plan: the `analysis.plan.ReductionPlan`.
        crop_pct: the centre-crop fraction (None: the model's timm data config).
    """

    digest: str
    model: str
    weights: str
    device: str
    plan: Any
    crop_pct: float | None

    def loaded(self) -> LoadedModel:
        return cached_model(self.model, self.weights, self.device)

    def with_plan(self, plan: Any) -> "AnalysisKey":
        return AnalysisKey(self.digest, self.model, self.weights, self.device, plan, self.crop_pct)

    def token(self) -> str:
        """The key as one string: what the caches hash (cheaper than hashing the dataclass)."""
        return f"{self.digest}|{self.model}|{self.weights}|{self.device}|{self.plan!r}|{self.crop_pct!r}"


# st.cache_data hashes an AnalysisKey by its token string.
KEY_HASH = {AnalysisKey: AnalysisKey.token}


@st.cache_data(show_spinner=False, max_entries=16, hash_funcs=KEY_HASH)
def model_crop(key: AnalysisKey, _image) -> Image.Image:
    """The exact crop the model sees (resize + centre crop, no normalisation) of the image whose
    bytes hash to `key.digest` (`_image` is not hashed: the digest stands for it; the plan is ignored)."""
    return crop_only_transform(key.loaded().model, key.crop_pct)(_image).convert("RGB")


# 24 entries: two or three main-page views (dense, the chosen methods and the comparison rows' own
# plans); each holds its block outputs (DeiT-S about 3.6 MB, DeiT-B 7 MB), so the cache stays
# under about 200 MB on a shared server.
@st.cache_data(show_spinner=False, max_entries=24, hash_funcs=KEY_HASH)
def analyse_image(key: AnalysisKey, _image) -> ImageAnalysis:
    """`analysis.inspect.analyse_images` of one PIL image under `key.plan`, cached by `key`.

    The analysis keeps the image's block outputs and sizes; the diversity r(Z) is computed only
    when a page asks for it (`image_diversity`), for the options it asks for.

    Raises PlanError / TokenscopeError when the plan cannot run on this model.
    """
    return analyse_images(key.loaded(), [_image], key.plan, key.crop_pct, dense=False)[0]


@st.cache_data(show_spinner=False, max_entries=512, hash_funcs=KEY_HASH)
def image_diversity(key: AnalysisKey, centre: str, size_weighted: bool, _image) -> tuple[np.ndarray, np.ndarray]:
    """(raw, per-token) r(Z) per block (methods.md §5), each [depth] float64, of `key`'s analysis for
    one centre and weighting, cached across reruns by the key plus the two options (a few hundred
    bytes each): redrawing the chart after another widget changes, or toggling per-token, computes
    nothing.

    Raises ValueError for an unknown centre, PlanError / TokenscopeError as `analyse_image`.
    """
    return analyse_image(key, _image).diversity(centre, size_weighted)


def results_source(key: str, upload_label: str, hint: str) -> dict | None:
    """A sweep's results from an upload or a typed path (`<key>_upload`, `<key>_path` widgets), or
    None after an `st.error` saying what was wrong (not JSON, not a results file) or `st.info(hint)`
    when nothing was given yet."""
    from analysis.sweep import load_results, validate_results

    upload = st.file_uploader(upload_label, type=["json"], key=f"{key}_upload")
    path = st.text_input("…or the path of a results.json (or of the sweep's --out folder)", key=f"{key}_path")
    try:
        if upload is not None:
            try:
                content = json.loads(upload.getvalue().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                st.error(f"{upload.name} is not JSON ({err}). Upload the results.json a sweep wrote.")
                return None
            return validate_results(content, upload.name)
        if path.strip():
            return load_results(path.strip())
    except TokenscopeError as err:
        st.error(f"{err}")
        return None
    st.info(hint)
    return None
