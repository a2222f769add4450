"""Models, weights, images and preprocessing.

Everything that turns a model name, a weights choice and an image file into a ready model and an
input tensor lives here. The reduction engine (`analysis.engine`) never loads anything itself.
"""
from __future__ import annotations

import functools
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import timm
import timm.data

from .errors import ImageLoadError, ModelError, TokenscopeError, WeightsError  # noqa: F401  (re-exported)

# The model families tokenscope supports, as the app groups them (any timm name of a supported
# architecture is accepted too; `check_architecture` decides).
MODEL_FAMILIES: dict[str, tuple[str, ...]] = {
    "DeiT": ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384"),
    "DeiT distilled": ("deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224"),
    "DeiT-III (LayerScale)": ("deit3_small_patch16_224.fb_in1k", "deit3_base_patch16_224.fb_in1k", "deit3_small_patch16_384.fb_in1k"),
    "AugReg ViT": ("vit_small_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k",
                   "vit_small_patch16_384.augreg_in21k_ft_in1k", "vit_base_patch16_384.augreg_in21k_ft_in1k",
                   "vit_large_patch16_224.augreg_in21k_ft_in1k", "vit_large_patch16_384.augreg_in21k_ft_in1k"),
    "MAE (global pool)": ("vit_base_patch16_224.mae", "vit_large_patch16_224.mae"),
    "CLIP": ("vit_base_patch16_clip_224.openai_ft_in1k", "vit_base_patch16_clip_224.laion2b_ft_in1k",
             "vit_base_patch16_clip_quickgelu_224.openai"),
    "DINOv2": ("vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_dinov2.lvd142m"),
    "SigLIP (attention-pool head)": ("vit_base_patch16_siglip_224.webli",),
    "Global-average-pool ViT": ("vit_base_patch16_gap_224", "vit_wee_patch16_reg1_gap_256.sbb_in1k"),
}
MODEL_CHOICES: tuple[str, ...] = tuple(name for names in MODEL_FAMILIES.values() for name in names)
DEFAULT_MODEL = "deit_small_patch16_224"
PAPER_CROP_PCT = 0.875  # DeiT / EViT / ToMe evaluate with Resize(256) -> CenterCrop(224)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class LoadedModel:
    """A ready model and what the outputs must say about it.

    Attributes:
        model: the timm VisionTransformer in eval mode on `device`; shared, never mutated.
        name: the timm model name.
        weights: a label for the weights: "pretrained", a checkpoint path, or "random".
        is_random: True when the weights are random (every output must say so).
        device: "cpu" or "cuda".
        extras: state dicts the backbone does not hold, keyed by prefix (e.g. "score_predictor"
            for the dTPS / DynamicViT predictor), loaded later by the methods that need them.
        display_name: how the weights are named to a user when `weights` is an internal path (an
            uploaded checkpoint's own file name), else None.
    """

    model: torch.nn.Module
    name: str
    weights: str
    is_random: bool
    device: str
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, hash=False, compare=False)
    display_name: str | None = None

    @property
    def weights_label(self) -> str:
        """The weights as every output shows them; random weights are always spelt out."""
        if self.is_random:
            return "random (untrained; predictions are meaningless)"
        return self.display_name or self.weights

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of the model's input, e.g. (14, 14) for DeiT at 224 px, (37, 37)
        for DINOv2 at 518 px (patch 14)."""
        return tuple(self.model.patch_embed.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class token, distillation token, registers (0 for SigLIP)."""
        return int(getattr(self.model, "num_prefix_tokens", 1))

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols


def default_device() -> str:
    """'cuda' when a CUDA GPU is visible to torch, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """Validate a device choice. Raises TokenscopeError for 'cuda' without a GPU or an unknown name."""
    if device in (None, "", "auto"):
        return default_device()
    if device not in ("cpu", "cuda"):
        raise TokenscopeError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise TokenscopeError("device 'cuda' was asked for but torch sees no CUDA GPU: use --device cpu")
    return device


def hub_repo_id(name: str) -> str | None:
    """The Hugging Face repository that timm downloads `name`'s pretrained weights from, or None."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - timm raises different errors across versions
        cfg = None
    if cfg is None:
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def weights_cached(name: str) -> bool:
    """True when timm's pretrained weights of `name` are already in the local Hugging Face cache."""
    repo = hub_repo_id(name)
    if repo is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str) and os.path.exists(hit):
            return True
    return False


def first_cached_model(choices: tuple[str, ...] = MODEL_CHOICES) -> str | None:
    """The first model of `choices` whose pretrained weights are cached, or None."""
    return next((name for name in choices if weights_cached(name)), None)


# Architectures refused, with the reason (class name -> why); anything else that is not a timm
# VisionTransformer of plain blocks is refused with its class named.
UNSUPPORTED: dict[str, str] = {
    "SwinTransformer": "windowed attention (tokens attend within shifted windows, so there is no global sequence to prune or merge)",
    "SwinTransformerV2": "windowed attention (tokens attend within shifted windows, so there is no global sequence to prune or merge)",
    "SwinTransformerV2Cr": "windowed attention (tokens attend within shifted windows, so there is no global sequence to prune or merge)",
    "Eva": "rotary position embeddings (RoPE, EVA / EVA-02): the rotation depends on each token's grid position, which merging loses",
    "Beit": "BEiT's relative position bias: a bias per pair of grid positions, undefined between merged tokens",
    "VisionTransformerRelPos": "a relative position bias: a bias per pair of grid positions, undefined between merged tokens",
}
SUPPORTED_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")


def check_architecture(model: torch.nn.Module, name: str) -> None:
    """Accept timm VisionTransformers (and DeiT's distilled variant) built of plain pre-norm blocks
    (`Block`: norm1 -> Attention -> LayerScale -> residual, norm2 -> Mlp -> LayerScale -> residual)
    with absolute position embeddings; any number of prefix tokens (class, distillation, registers)
    or none; token, average, max or attention-pool (MAP) heads.

    Raises ModelError with one line that names the reason for anything else (windowed attention,
    rotary or relative position encodings, parallel or post-norm blocks, another model type).
    """
    kind = type(model).__name__
    if kind in UNSUPPORTED:
        raise ModelError(f"{name} ({kind}) is not supported: {UNSUPPORTED[kind]}")
    if kind not in SUPPORTED_CLASSES or not hasattr(model, "patch_embed") or getattr(model, "blocks", None) is None:
        raise ModelError(f"{name} ({kind}) is not a timm VisionTransformer: tokenscope supports ViT, DeiT, DeiT-III, CLIP, "
                         "DINOv2, MAE, SigLIP and global-pool ViTs (e.g. deit_small_patch16_224)")
    for block in model.blocks:
        if type(block).__name__ != "Block":
            raise ModelError(f"{name}: its blocks are {type(block).__name__}, not timm's plain pre-norm Block "
                             "(parallel or post-norm blocks are not supported)")
        if type(block.attn).__name__ != "Attention" or not hasattr(block.attn, "qkv"):
            raise ModelError(f"{name}: its attention is {type(block.attn).__name__}, not timm's Attention "
                             "(rotary or relative position attention is not supported)")
    if getattr(model, "pos_embed", None) is None:
        raise ModelError(f"{name} has no absolute position embedding (its positions are encoded inside attention); not supported")


def _create(name: str, pretrained: bool) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
            raise ModelError(f"unknown timm model {name!r}: give a timm model name, e.g. one of {', '.join(MODEL_CHOICES[:4])}") from None
        raise


def _download_failure(name: str) -> WeightsError:
    return WeightsError(
        f"the pretrained weights of {name} could not be downloaded and are not in the Hugging Face cache; "
        "ways out: (1) connect to the internet once (or set HF_HUB_CACHE to a cache that holds them), "
        "(2) pass a local checkpoint file (.pth/.pt/.safetensors) as the weights, "
        "(3) choose 'random' weights explicitly (shapes and GMACs only)"
    )


def checkpoint_safe_globals() -> list[Any]:
    """The plain types that training checkpoints (EViT's, DeiT's and timm's `main.py` / `train.py`)
    hold besides tensors, allow-listed for `torch.load(weights_only=True)`: the run's
    `argparse.Namespace` and numpy scalars with their dtypes (e.g. a saved best accuracy). Nothing
    here can run code when unpickled."""
    import argparse

    allowed: list[Any] = [argparse.Namespace, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
        except ImportError:
            continue
        allowed.append(module.scalar)
        break
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


def _refused_type(message: str) -> str | None:
    """The type torch's weights-only unpickler refused, from its message, or None (another failure)."""
    import re

    match = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"but got <class '([^']+)'>", message)
    return match.group(1) if match else None


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a .pth/.pt (torch.load, weights_only) or .safetensors file.

    Training checkpoints are accepted: the `{"model": state_dict}` wrapper (and `{"state_dict": ...}`)
    is unwrapped, and the plain types they also hold (`checkpoint_safe_globals`: argparse.Namespace,
    numpy scalars and dtypes) are allowed while unpickling; nothing that could run code is.
    Raises WeightsError when the file is missing, a folder, unreadable, holds a refused type (the
    message names it) or holds no state dict.
    """
    import pickle

    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"checkpoint {path} is a folder, not a checkpoint file: give the .pth/.pt/.safetensors file in it")
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with torch.serialization.safe_globals(checkpoint_safe_globals()):
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_type(str(err))
        if refused is None:
            raise WeightsError(f"checkpoint {path} could not be read (UnpicklingError): is it a .pth/.pt/.safetensors state dict?") from None
        raise WeightsError(
            f"checkpoint {path} holds a {refused} object, which tokenscope does not unpickle because loading it could run code: "
            "save the model's state dict (torch.save(model.state_dict(), path)) or a .safetensors file") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"checkpoint {path} could not be read ({type(err).__name__}): is it a .pth/.pt/.safetensors state dict?") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


# Prefixes of weights that belong to a method, not to the backbone (dTPS / DynamicViT predictor).
EXTRA_PREFIXES = ("score_predictor",)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: str) -> dict[str, dict[str, torch.Tensor]]:
    extras: dict[str, dict[str, torch.Tensor]] = {}
    backbone: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = key.split(".", 1)[0]
        if prefix in EXTRA_PREFIXES:
            extras.setdefault(prefix, {})[key.split(".", 1)[1]] = value
        else:
            backbone[key] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(backbone) if expected[k].shape != backbone[k].shape)
    if missing or unexpected or mismatched:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches, e.g. {k}: checkpoint {tuple(backbone[k].shape)} vs model {tuple(expected[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
        raise WeightsError(f"checkpoint {path} does not fit {name} (another architecture?): " + "; ".join(parts))
    model.load_state_dict(backbone, strict=True)
    return extras


def load_model(name: str = DEFAULT_MODEL, weights: str = "pretrained", device: str | None = None,
               display_name: str | None = None) -> LoadedModel:
    """Build a timm ViT with the chosen weights, in eval mode on `device`.

    Args:
        name: a timm model name (a ViT with one class token).
        weights: "pretrained" (timm's Hugging Face path and cache), a checkpoint path
            (.pth/.pt/.safetensors; `{"model": state_dict}` accepted), or "random".
        device: "cpu", "cuda" or None (CUDA when available).
        display_name: the name outputs show for a checkpoint (e.g. an upload's own file name).
    Raises:
        ModelError: unknown name or not a ViT with a class token.
        WeightsError: pretrained weights neither cached nor downloadable (the message names the
            model and the three ways out), or a checkpoint that does not fit the architecture.
    """
    device = resolve_device(device)
    extras: dict[str, dict[str, torch.Tensor]] = {}
    if weights == "pretrained":
        try:
            model = _create(name, pretrained=True)
        except (ModelError, TokenscopeError):
            raise
        except Exception as err:  # noqa: BLE001 - hub, network and cache errors all mean "not obtainable"
            if "Unknown model" in str(err):
                raise ModelError(f"unknown timm model {name!r}") from None
            raise _download_failure(name) from None
        check_architecture(model, name)
    elif weights == "random":
        torch.manual_seed(0)
        model = _create(name, pretrained=False)
        check_architecture(model, name)
    else:
        model = _create(name, pretrained=False)
        check_architecture(model, name)
        extras = _load_state(model, read_checkpoint(weights), name, weights)
    model.eval().requires_grad_(False).to(device)
    return LoadedModel(model=model, name=name, weights=weights, is_random=weights == "random", device=device, extras=extras,
                       display_name=display_name)


def data_config(model: torch.nn.Module, crop_pct: float | None = None) -> dict[str, Any]:
    """timm's data config of `model` (input size, interpolation, mean, std, crop_pct), with an
    optional `crop_pct` override (the papers use 0.875). Raises TokenscopeError for crop_pct
    outside (0, 1]."""
    cfg = timm.data.resolve_data_config({}, model=model)
    if crop_pct is not None:
        if not (0 < crop_pct <= 1) or math.isnan(crop_pct):
            raise TokenscopeError(f"crop_pct must be in (0, 1], got {crop_pct}")
        cfg["crop_pct"] = float(crop_pct)
    return cfg


def make_transform(model: torch.nn.Module, crop_pct: float | None = None):
    """The eval transform PIL RGB image -> [3, H, W] float tensor, from the model's data config."""
    return timm.data.create_transform(**data_config(model, crop_pct), is_training=False)


def crop_only_transform(model: torch.nn.Module, crop_pct: float | None = None):
    """Resize + centre crop only (no normalisation): the exact crop the model sees, for drawing."""
    import torchvision.transforms as T

    full = make_transform(model, crop_pct)
    keep = [t for t in full.transforms if not isinstance(t, (T.ToTensor, T.Normalize)) and type(t).__name__ not in ("MaybeToTensor",)]
    return T.Compose(keep)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: EXIF rotation applied, alpha composited on white,
    16-bit and float images rescaled, CMYK / palette / grayscale converted."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(source: str | os.PathLike | bytes | io.IOBase, name: str | None = None) -> Image.Image:
    """Open an image (path, bytes or file object) as 8-bit RGB; GIFs give their first frame.

    Raises ImageLoadError, naming the file, for a missing, empty, corrupt or non-image file and for
    an image over PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`).
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "the uploaded file")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(f"{label}: no such file")
        if path.is_dir():
            raise ImageLoadError(f"{label}: is a folder, not an image")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{label}: the file is empty")
        source = str(path)
    elif isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageLoadError(f"{label}: the file is empty")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.seek(0)
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(
            f"{label}: the image is larger than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels; "
            "downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not an image PIL can read (use JPEG, PNG, WebP, BMP, TIFF or GIF)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageLoadError(f"{label}: the image is corrupt or truncated ({err})") from None


def preprocess(images: list[Image.Image], model: torch.nn.Module, crop_pct: float | None = None) -> torch.Tensor:
    """Stack RGB images into the model's input batch [B, 3, H, W] (float32, CPU)."""
    transform = make_transform(model, crop_pct)
    return torch.stack([transform(image) for image in images])


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class descriptions from timm, in class-index order (a fresh list; timm's
    table is read once per process: reading it took 34 ms, once per model run before)."""
    return list(_imagenet_labels())


@functools.cache
def _imagenet_labels() -> tuple[str, ...]:
    info = timm.data.ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def imagenet_wnids() -> list[str]:
    """The 1000 sorted ImageNet WordNet ids; a class index is a position in this list."""
    return list(timm.data.ImageNetInfo().label_names())
