"""Cached model loading and the model sidebar every page shares.

The model object from `cached_model` is shared by every browser session at once and is never
modified: reduction settings travel in the `ReductionPlan` passed to each forward call.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

from analysis.models import (
    DEFAULT_MODEL,
    MODEL_CHOICES,
    LoadedModel,
    TokenscopeError,
    first_cached_model,
    load_model,
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
    name = sidebar.selectbox("Model", MODEL_CHOICES, index=MODEL_CHOICES.index(default_name), key=f"{key}_name",
                             help="timm ViT with a class token")
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
                st.session_state[f"{key}_name"] = fallback
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
