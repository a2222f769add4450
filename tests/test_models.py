"""Images of every kind, checkpoints and weights errors (issue 2, points 3 and 10)."""
from __future__ import annotations


from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.models import (
    ImageLoadError,
    ModelError,
    TokenscopeError,
    WeightsError,
    data_config,
    load_image,
    load_model,
    preprocess,
    read_checkpoint,
)

TINY = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def photo(sample_files) -> Image.Image:
    with Image.open(sample_files[1]) as image:  # a robin
        return image.convert("RGB")


def _save(image: Image.Image, path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def test_modes_are_converted_not_rejected(photo, tmp_path):
    rgb = photo.resize((64, 48))
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    assert gray16.mode == "I;16"
    cases = {
        "gray.png": _save(rgb.convert("L"), tmp_path / "gray.png"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "palette.gif": _save(rgb.convert("P"), tmp_path / "palette.gif"),
        "gray16.png": _save(gray16, tmp_path / "gray16.png"),
        "rgba.png": _save(rgb.convert("RGBA"), tmp_path / "rgba.png"),
        "image.webp": _save(rgb, tmp_path / "image.webp"),
        "image.bmp": _save(rgb, tmp_path / "image.bmp"),
        "image.tiff": _save(rgb, tmp_path / "image.tiff"),
    }
    for name, path in cases.items():
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (64, 48), name
    # 16-bit keeps its brightness instead of clipping to white
    gray = np.asarray(load_image(cases["gray16.png"]))[..., 0]
    np.testing.assert_allclose(gray, np.asarray(rgb.convert("L")), atol=1)


def test_alpha_is_composited_on_white(tmp_path):
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image = load_image(_save(transparent, tmp_path / "clear.png"))
    assert image.getpixel((3, 3)) == (255, 255, 255)


def test_exif_rotation_is_applied(photo, tmp_path):
    wide = photo.resize((60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(wide, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(path).size == (30, 60)


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    red, green, blue = load_image(str(path)).getpixel((8, 8))
    assert red > 150 and blue < 50


def test_tiny_image_runs_through_the_model(tiny, tmp_path):
    path = _save(Image.new("RGB", (10, 10), (30, 120, 200)), tmp_path / "ten.png")
    batch = preprocess([load_image(path)], tiny.model)
    assert batch.shape == (1, 3, 224, 224)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("this is not an image"), "not an image"),
        (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64), "corrupt|not an image"),
    ],
    ids=["missing", "empty", "text", "truncated-jpeg"],
)
def test_bad_files_raise_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageLoadError, match=message):
        load_image(str(path))


def test_decompression_bomb_is_refused(photo, tmp_path, monkeypatch):
    path = _save(photo.resize((100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10 000 px: over twice the limit -> error
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9000)  # over the limit only: PIL warns; we refuse too
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(path)


def test_crop_pct_follows_the_timm_config_or_the_papers(tiny):
    assert data_config(tiny.model)["crop_pct"] == pytest.approx(0.9)  # DeiT's timm config
    assert data_config(tiny.model, 0.875)["crop_pct"] == 0.875
    with pytest.raises(TokenscopeError, match="crop_pct"):
        data_config(tiny.model, 1.5)


def test_checkpoint_formats_load_the_same_weights(tiny, tmp_path, sample_batch):
    state = tiny.model.state_dict()
    torch.save({"model": state}, tmp_path / "deit_release.pth")  # the DeiT release wrapper
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    with torch.inference_mode():
        expected = tiny.model(sample_batch[:2])
    for name in ("deit_release.pth", "plain.safetensors"):
        loaded = load_model(TINY, str(tmp_path / name), "cpu")
        assert not loaded.is_random and loaded.weights_label.endswith(name)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.model(sample_batch[:2]), expected)


def test_checkpoint_for_another_architecture_is_refused(tiny, tmp_path):
    torch.save(tiny.model.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(WeightsError, match="does not fit deit_small_patch16_224.*shape mismatch"):
        load_model("deit_small_patch16_224", str(tmp_path / "tiny.pth"), "cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read"):
        read_checkpoint(tmp_path / "junk.pth")


def test_missing_weights_name_the_model_and_three_ways_out():
    with pytest.raises(WeightsError) as info:
        load_model("deit_base_patch16_224", "pretrained", "cpu")  # not in the shared cache, hub offline
    message = str(info.value)
    assert "deit_base_patch16_224" in message
    assert "internet" in message and "checkpoint" in message and "random" in message


def test_random_weights_are_labelled():
    loaded = load_model(TINY, "random", "cpu")
    assert loaded.is_random and "random" in loaded.weights_label


def test_unknown_or_unsupported_models():
    with pytest.raises(ModelError, match="unknown timm model"):
        load_model("no_such_model_xyz", "random", "cpu")
    with pytest.raises(ModelError, match="not a timm VisionTransformer"):
        load_model("resnet18", "random", "cpu")


def touch_marker(path: str) -> None:
    """What the malicious pickle below calls when unpickled: creates a marker file."""
    Path(path).touch()


class _Marker:
    """A pickle payload that would create a file when unpickled (it must never run)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (touch_marker, (str(self.path),))


def test_training_checkpoints_load_safely(tiny, tmp_path, sample_batch):
    """EViT's / DeiT's main.py save {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler',
    'args'} with args an argparse.Namespace, often with numpy scalars (a best accuracy): they load with
    weights_only through an allow-list of those plain types; a pickle that would run code never runs,
    and the message names the refused type."""
    import argparse

    import numpy as np

    state = tiny.model.state_dict()
    checkpoint = {
        "model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "lr_scheduler": {"last_epoch": 29},
        "epoch": 29, "model_ema": None, "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="deit_tiny_patch16_224", base_keep_rate=0.7, drop_loc="(3, 6, 9)", lr=5e-4),
        "max_accuracy": np.float64(72.31), "best_epoch": np.int64(28), "dtype": np.dtype("float32"),
    }
    torch.save(checkpoint, tmp_path / "evit_checkpoint.pth")
    loaded = load_model(TINY, str(tmp_path / "evit_checkpoint.pth"), "cpu")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(sample_batch[:1]), tiny.model(sample_batch[:1]))

    marker = tmp_path / "pwned"
    torch.save({"model": state, "args": _Marker(marker)}, tmp_path / "malicious.pth")
    with pytest.raises(WeightsError, match=r"holds a [\w.]*touch_marker object.*could run code") as info:
        read_checkpoint(tmp_path / "malicious.pth")
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_checkpoint_folder_is_named_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path)
