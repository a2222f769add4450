"""Labelled image folders in the three ImageNet layouts (methods.md §9).

1. ImageFolder with WordNet-id folder names (`val/n01440764/*.JPEG`): the class index is the
   position of the folder's id among timm's 1000 sorted ids (`timm.data.ImageNetInfo`), never the
   folder's position among the folders present (100 folders are not classes 0..99).
2. A flat folder of images plus a ground-truth file of `filename index` lines (the ILSVRC2012 val
   layout; the index 0-based in timm's order, or a WordNet id in its place). The file is given
   explicitly or found in the folder (a `.txt`/`.csv` file whose lines all parse that way).
3. Folders named by class index (`val/0/`, `val/1/`, ...).

Unreadable images are skipped and counted, never dropped silently: the loader returns a flag per
image and `collate_skipping` filters them out of the batch, reporting their paths. A folder whose
labels cannot be resolved raises `DatasetError`, naming why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DatasetError, ImageLoadError
from .models import IMAGE_SUFFIXES, imagenet_wnids, load_image

WNID = re.compile(r"^n\d{8}$")
NUM_CLASSES = 1000


@dataclass(frozen=True)
class LabelledFiles:
    """The images of a dataset folder with their ImageNet class indices.

    Attributes:
        root: the folder.
        layout: "wnid-folders", "ground-truth-file" or "index-folders".
        files: image paths, sorted.
        labels: class index (0..999, timm's order) of each file.
        ground_truth: the ground-truth file used by the flat layout, else None.
    """

    root: Path
    layout: str
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    ground_truth: Path | None = None

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, limit: int | None) -> "LabelledFiles":
        """At most `limit` files, evenly spaced over the sorted list (deterministic, and it spans
        every class of a folder-per-class layout rather than only the first few classes)."""
        if limit is None or limit >= len(self.files):
            return self
        if limit <= 0:
            raise DatasetError(f"--limit must be a positive number of images, got {limit}")
        picks = np.unique(np.linspace(0, len(self.files) - 1, limit).round().astype(int))
        return LabelledFiles(self.root, self.layout, tuple(self.files[i] for i in picks),
                             tuple(self.labels[i] for i in picks), self.ground_truth)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _parse_ground_truth(path: Path, wnid_index: dict[str, int]) -> dict[str, int]:
    """`filename index` lines (whitespace or comma separated; blank and # lines ignored) -> {name: index}.
    Raises DatasetError naming the first bad line."""
    table: dict[str, int] = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"ground-truth file {path} cannot be read ({err})") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise DatasetError(f"{path}:{number}: expected 'filename index', got {line!r}")
        name, value = parts
        if value in wnid_index:
            index = wnid_index[value]
        else:
            try:
                index = int(value)
            except ValueError:
                raise DatasetError(f"{path}:{number}: {value!r} is neither a class index 0..999 nor an ImageNet WordNet id") from None
            if not 0 <= index < NUM_CLASSES:
                raise DatasetError(f"{path}:{number}: class index {index} is outside 0..999")
        table[Path(name).name] = index
    if not table:
        raise DatasetError(f"ground-truth file {path} holds no 'filename index' lines")
    return table


def _find_ground_truth(root: Path, wnid_index: dict[str, int]) -> Path | None:
    candidates = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".csv"))
    for candidate in candidates:
        try:
            _parse_ground_truth(candidate, wnid_index)
        except DatasetError:
            continue
        return candidate
    return None


def resolve_dataset(root: str | Path, ground_truth: str | Path | None = None) -> LabelledFiles:
    """Find the images of `root` and their ImageNet class indices, whichever of the three layouts it uses.

    Args:
        root: the dataset folder.
        ground_truth: a `filename index` file for the flat layout (optional: found in `root` otherwise).
    Returns:
        `LabelledFiles` (sorted paths and labels).
    Raises:
        DatasetError: missing folder, no images, mixed or unknown folder names (not ImageNet WordNet
            ids nor indices 0..999), or images the ground-truth file does not list.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder: give the folder that holds the images")
    wnids = imagenet_wnids()
    wnid_index = {wnid: index for index, wnid in enumerate(wnids)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = _images_in(root)

    if ground_truth is not None or (loose and not folders):
        gt = Path(ground_truth).expanduser() if ground_truth is not None else _find_ground_truth(root, wnid_index)
        if gt is None:
            raise DatasetError(
                f"{root} holds images but no class folders and no ground-truth file: add a text file of "
                "'filename index' lines (or pass it with --labels), or sort the images into WordNet-id folders")
        if not gt.is_file():
            raise DatasetError(f"ground-truth file {gt} does not exist")
        table = _parse_ground_truth(gt, wnid_index)
        if not loose:
            raise DatasetError(f"{root} holds no image files ({', '.join(IMAGE_SUFFIXES)}) next to the ground-truth file")
        unlisted = [p.name for p in loose if p.name not in table]
        if unlisted:
            raise DatasetError(
                f"{len(unlisted)} of {len(loose)} images in {root} are not listed in {gt.name} (e.g. {unlisted[0]}): "
                "every image needs a 'filename index' line")
        return LabelledFiles(root, "ground-truth-file", tuple(loose), tuple(table[p.name] for p in loose), gt)

    if not folders:
        raise DatasetError(f"{root} holds no images and no class folders")
    names = [p.name for p in folders]
    if all(WNID.match(name) for name in names):
        unknown = [name for name in names if name not in wnid_index]
        if unknown:
            raise DatasetError(f"folder {unknown[0]} in {root} is not one of the 1000 ImageNet-1k WordNet ids ({len(unknown)} unknown)")
        layout, index_of = "wnid-folders", wnid_index
    elif all(name.isdigit() for name in names):
        bad = [name for name in names if int(name) >= NUM_CLASSES]
        if bad:
            raise DatasetError(f"folder {bad[0]} in {root} is not a class index 0..999")
        layout, index_of = "index-folders", {name: int(name) for name in names}
    else:
        odd = next(name for name in names if not (WNID.match(name) or name.isdigit()))
        raise DatasetError(
            f"cannot tell the classes of {root}: folder {odd!r} is neither an ImageNet WordNet id (n01440764) nor a class "
            "index 0..999, and the folders must all use one of these")
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        for path in _images_in(folder):
            files.append(path)
            labels.append(index_of[folder.name])
    if not files:
        raise DatasetError(f"the class folders of {root} hold no image files ({', '.join(IMAGE_SUFFIXES)})")
    return LabelledFiles(root, layout, tuple(files), tuple(labels))


class ImageDataset(Dataset):
    """Map-style dataset of `LabelledFiles`: item i -> (image tensor or None, label, index, error or None).

    Decoding happens in the DataLoader workers; an unreadable file yields `None` and its error
    message, which `collate_skipping` turns into a skip count instead of an exception.
    """

    def __init__(self, files: LabelledFiles, transform: Callable[[Any], torch.Tensor]):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = self.transform(load_image(self.files.files[index]))
            return image, self.files.labels[index], index, None
        except ImageLoadError as err:
            return None, self.files.labels[index], index, str(err)
        except (OSError, ValueError) as err:  # a decoder failing inside the transform
            return None, self.files.labels[index], index, f"{self.files.files[index]}: {err}"


@dataclass
class Batch:
    """A batch with the unreadable images already removed.

    Attributes:
        images: [b, 3, H, W] float (b may be 0 when every image of the batch was unreadable).
        labels: [b] long class indices.
        indices: [b] long positions in the dataset.
        skipped: error messages of the images left out.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[str]


def collate_skipping(items: list[tuple]) -> Batch:
    """Stack the readable items of a batch; count and report the unreadable ones."""
    good = [item for item in items if item[0] is not None]
    skipped = [item[3] for item in items if item[0] is None]
    if good:
        images = torch.stack([item[0] for item in good])
    else:
        images = torch.empty(0)
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return Batch(images, labels, indices, skipped)


def make_loader(files: LabelledFiles, transform, batch_size: int = 64, workers: int = 2,
                indices: Sequence[int] | None = None) -> DataLoader:
    """The one deterministic (unshuffled) DataLoader of `Batch`es that the sweep and the app use,
    with `workers` decoding processes.

    Args:
        indices: the dataset positions to load, in order (default all; e.g. the rest of an
            interrupted pass, or one process's shard).
    Raises:
        DatasetError: a batch size below 1 or a negative worker count.
    """
    if batch_size < 1:
        raise DatasetError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise DatasetError(f"--workers must be 0 or more, got {workers}")
    return DataLoader(
        ImageDataset(files, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
        sampler=None if indices is None else list(indices), collate_fn=collate_skipping, persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
