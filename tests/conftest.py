"""Test set-up: the real DeiT-Tiny weights from ../shared/hf-cache, offline, and the ImageNet sample.

The tests need (README, "Tests"): a Hugging Face hub cache holding `timm/deit_tiny_patch16_224.fb_in1k`
at `<shared>/hf-cache/hub`, and an ImageNet-layout sample of 100 photos, one per class folder named
by WordNet id, at `<shared>/imagenet-sample/val`. `<shared>` is `../shared` beside the checkout, or
the folder named by TOKENSCOPE_TEST_DATA. Without them the session stops at once with one message.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENSCOPE_TEST_DATA", ROOT.parent / "shared")).expanduser()
os.environ["HF_HUB_CACHE"] = str(SHARED / "hf-cache" / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENSCOPE_DEFAULT_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

SAMPLE_DIR = SHARED / "imagenet-sample" / "val"
TINY = "deit_tiny_patch16_224"
WEIGHTS_DIR = SHARED / "hf-cache" / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"


def missing_test_data() -> str | None:
    """Why the test data is not usable, or None when the weights and the 100-photo sample are there."""
    problems = []
    if not any(WEIGHTS_DIR.glob("snapshots/*/model.safetensors")):
        problems.append(f"the DeiT-Tiny weights (a Hugging Face cache with {WEIGHTS_DIR.name})")
    photos = len(list(SAMPLE_DIR.glob("*/*.JPEG"))) if SAMPLE_DIR.is_dir() else 0
    if photos != 100:
        problems.append(f"the 100-photo ImageNet sample at {SAMPLE_DIR} (found {photos})")
    if not problems:
        return None
    return (f"tokenscope's tests need {' and '.join(problems)} in {SHARED}: put the shared test data beside the checkout "
            "as ../shared, or set TOKENSCOPE_TEST_DATA to its folder (README, 'Tests')")


def pytest_sessionstart(session):
    reason = missing_test_data()
    if reason:
        pytest.exit(reason, returncode=4)


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
