"""Labelled image folders in the three ImageNet layouts (methods.md §9).

1. ImageFolder with WordNet-id folder names (`val/n01440764/*.JPEG`): the class index is the
   position of the folder's id among timm's 1000 sorted ids (`timm.data.ImageNetInfo`), never the
   folder's position among the folders present (100 folders are not classes 0..99).
2. A flat folder of images plus a ground-truth file of `filename index` lines (the ILSVRC2012 val
   layout; the index 0-based in timm's order, or a WordNet id in its place). The file is given
   explicitly or found in the folder (a `.txt`/`.csv` file whose lines all parse that way).
3. Folders named by class index (`val/0/`, `val/1/`, ...).
4. Tar shards in the WebDataset layout, read in place (50,000 files need not be unpacked): a
   `.tar` file, a folder of `.tar` files, or a brace pattern (`val-{000000..000049}.tar`). A sample
   is the members sharing a key (the member name up to its first dot, WebDataset's rule): one image
   (`.jpg`, `.png`, ...) and its class index in a `.cls` member; without `.cls`, the image's folder
   inside the tar names the class (a WordNet id or an index, as layouts 1 and 3).

Unreadable images are skipped and counted, never dropped silently: the loader returns a flag per
image and `collate_skipping` filters them out of the batch, reporting their paths. A folder whose
labels cannot be resolved raises `DatasetError`, naming why.
"""
from __future__ import annotations

import itertools
import re
import tarfile
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
class ShardMember:
    """One image inside a tar shard, read in place by its byte range.

    Attributes:
        shard: the tar file; name: the member's name; offset / size: its data's byte range.
    """

    shard: Path
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


@dataclass(frozen=True)
class LabelledFiles:
    """The images of a dataset folder with their ImageNet class indices.

    Attributes:
        root: the folder.
        layout: "wnid-folders", "ground-truth-file", "index-folders" or "tar-shards".
        files: image paths, sorted (`ShardMember`s for tar shards, in shard and member order).
        labels: class index (0..999, timm's order) of each file.
        ground_truth: the ground-truth file used by the flat layout, else None.
    """

    root: Path
    layout: str
    files: tuple[Path | ShardMember, ...]
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


BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(pattern: str) -> list[Path]:
    """The tar files a WebDataset brace pattern names, in order: `val-{000..002}.tar` ->
    val-000.tar, val-001.tar, val-002.tar (the numbers keep the pattern's zero padding; several
    brace groups expand as a product)."""
    groups = list(BRACES.finditer(pattern))
    if not groups:
        return [Path(pattern).expanduser()]
    ranges = []
    for group in groups:
        first, last = group.group(1), group.group(2)
        if int(last) < int(first):
            raise DatasetError(f"shard pattern {pattern}: the range {{{first}..{last}}} runs backwards")
        ranges.append([str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)])
    parts = BRACES.split(pattern)[::3]  # the text around the brace groups
    return [Path("".join(itertools.chain.from_iterable(zip(parts, numbers + ("",))))).expanduser()
            for numbers in itertools.product(*ranges)]


def _is_shard_source(text: str) -> bool:
    path = Path(text).expanduser()
    if BRACES.search(text) or path.suffix == ".tar":
        return True
    return path.is_dir() and any(path.glob("*.tar")) and not any(p.is_dir() for p in path.iterdir() if not p.name.startswith("."))


def _resolve_shards(source: str, wnid_index: dict[str, int]) -> LabelledFiles:
    """The images of tar shards with their labels (layout 4 above)."""
    path = Path(source).expanduser()
    shards = sorted(path.glob("*.tar")) if path.is_dir() else expand_shards(source)
    missing = [shard for shard in shards if not shard.is_file()]
    if missing:
        raise DatasetError(f"tar shard {missing[0]} does not exist ({len(missing)} of {len(shards)} shards missing)")
    files: list[ShardMember] = []
    labels: list[int] = []
    for shard in shards:
        try:
            with tarfile.open(shard, "r:") as archive:
                members = [m for m in archive.getmembers() if m.isfile()]
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in members:
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, extension = base.partition(".")
                    if stem and dot:
                        samples.setdefault(f"{folder}/{stem}", {})[extension.lower()] = member
                for key, parts in samples.items():
                    image = next((parts[ext] for ext in parts if "." + ext.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)
                    if image is None:
                        continue
                    if "cls" in parts:
                        handle = archive.extractfile(parts["cls"])
                        text = handle.read().decode("utf-8", "replace").strip() if handle else ""
                        if not text.isdigit() or int(text) >= NUM_CLASSES:
                            raise DatasetError(f"{shard}: {parts['cls'].name} holds {text[:20]!r}, not a class index 0..999")
                        label = int(text)
                    else:
                        folder = key.rpartition("/")[0].rpartition("/")[2]
                        if folder in wnid_index:
                            label = wnid_index[folder]
                        elif folder.isdigit() and int(folder) < NUM_CLASSES:
                            label = int(folder)
                        else:
                            raise DatasetError(f"{shard}: sample {key} has no .cls member and its folder {folder!r} names no class: "
                                               "add '<key>.cls' members holding the class index (WebDataset layout)")
                    files.append(ShardMember(shard, image.name, image.offset_data, image.size))
                    labels.append(label)
        except tarfile.TarError as err:
            raise DatasetError(f"{shard} is not a readable tar file: {err}") from None
    if not files:
        raise DatasetError(f"the tar shards {source} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return LabelledFiles(path, "tar-shards", tuple(files), tuple(labels))


def resolve_dataset(root: str | Path, ground_truth: str | Path | None = None) -> LabelledFiles:
    """Find the images of `root` and their ImageNet class indices, whichever of the four layouts it uses.

    Args:
        root: the dataset folder, or tar shards (a .tar file, a folder of them, or a brace pattern).
        ground_truth: a `filename index` file for the flat layout (optional: found in `root` otherwise).
    Returns:
        `LabelledFiles` (sorted paths and labels).
    Raises:
        DatasetError: missing folder, no images, mixed or unknown folder names (not ImageNet WordNet
            ids nor indices 0..999), or images the ground-truth file does not list.
    """
    if _is_shard_source(str(root)):
        return _resolve_shards(str(root), {wnid: index for index, wnid in enumerate(imagenet_wnids())})
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
            entry = self.files.files[index]
            picture = load_image(entry.read(), name=str(entry)) if isinstance(entry, ShardMember) else load_image(entry)
            image = self.transform(picture)
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
