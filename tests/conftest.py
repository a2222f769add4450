"""Test set-up: the real DeiT-Tiny weights from ../shared/hf-cache, offline, and the ImageNet sample."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ["HF_HUB_CACHE"] = str(SHARED / "hf-cache" / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENSCOPE_DEFAULT_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

SAMPLE_DIR = SHARED / "imagenet-sample" / "val"
TINY = "deit_tiny_patch16_224"


@pytest.fixture(scope="session")
def tiny():
    """DeiT-Tiny with the real ImageNet weights, on the CPU (a `LoadedModel`)."""
    from analysis.models import load_model

    return load_model(TINY, "pretrained", "cpu")


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    """The 100 real ImageNet validation photos of ../shared, sorted."""
    files = sorted(SAMPLE_DIR.glob("*/*.JPEG"))
    assert len(files) == 100, f"expected the 100-image sample in {SAMPLE_DIR}"
    return files


@pytest.fixture(scope="session")
def sample_batch(tiny, sample_files) -> torch.Tensor:
    """The first 8 sample photos preprocessed for DeiT-Tiny: [8, 3, 224, 224]."""
    from analysis.models import load_image, preprocess

    return preprocess([load_image(path) for path in sample_files[:8]], tiny.model)


def open_page(relative_path: str, timeout: float = 240):
    """Run one Streamlit page script through AppTest and check it raised nothing."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / relative_path), default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at
