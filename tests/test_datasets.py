"""The three ImageNet layouts (methods.md §9), skipped files, and folders whose labels cannot be resolved.

Layouts are built in tmp_path from symlinks to the shared sample (no ImageNet photo is copied)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analysis.datasets import DatasetError, make_loader, resolve_dataset
from analysis.models import imagenet_wnids, make_transform

from conftest import SAMPLE_DIR


@pytest.fixture(scope="module")
def wnid_index():
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)


def test_wnid_folders_use_timms_class_order(sample_files, wnid_index):
    data = resolve_dataset(SAMPLE_DIR)
    assert data.layout == "wnid-folders"
    assert len(data) == 100 and list(data.files) == sample_files
    expected = [wnid_index[path.parent.name] for path in sample_files]
    assert list(data.labels) == expected
    # the subset pitfall: 100 folders must not become classes 0..99
    assert list(data.labels) != list(range(100))
    assert max(data.labels) > 900 and len(set(data.labels)) == 100
    assert data.labels[0] == imagenet_wnids().index("n01496331")  # electric ray, class 5


def test_wnid_subset_keeps_true_indices(tmp_path, sample_files, wnid_index):
    chosen = sample_files[40:43]
    for path in chosen:
        _link(path, tmp_path / path.parent.name / path.name)
    data = resolve_dataset(tmp_path)
    assert list(data.labels) == [wnid_index[p.parent.name] for p in chosen]
    assert list(data.labels) != [0, 1, 2]


def test_flat_folder_with_ground_truth_file(tmp_path, sample_files, wnid_index):
    chosen = sample_files[::10]
    lines = []
    for number, path in enumerate(chosen):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        _link(path, tmp_path / name)
        # mix numeric indices and WordNet ids, as both appear in the wild
        value = path.parent.name if number % 2 else str(wnid_index[path.parent.name])
        lines.append(f"{name} {value}")
    (tmp_path / "val_ground_truth.txt").write_text("\n".join(lines) + "\n")
    data = resolve_dataset(tmp_path)
    assert data.layout == "ground-truth-file" and data.ground_truth.name == "val_ground_truth.txt"
    assert list(data.labels) == [wnid_index[p.parent.name] for p in chosen]
    # the same file passed explicitly from elsewhere
    elsewhere = tmp_path.parent / (tmp_path.name + "_gt.txt")
    elsewhere.write_text("\n".join(lines))
    assert resolve_dataset(tmp_path, ground_truth=elsewhere).labels == data.labels


def test_index_folders(tmp_path, sample_files, wnid_index):
    for path in sample_files[:5]:
        _link(path, tmp_path / str(wnid_index[path.parent.name]) / path.name)
    data = resolve_dataset(tmp_path)
    assert data.layout == "index-folders"
    assert sorted(data.labels) == sorted(wnid_index[p.parent.name] for p in sample_files[:5])
    for path, label in zip(data.files, data.labels):
        assert int(path.parent.name) == label


def test_unreadable_files_are_skipped_and_counted(tmp_path, tiny, sample_files, wnid_index):
    for path in sample_files[:6]:
        _link(path, tmp_path / path.parent.name / path.name)
    folder = tmp_path / sample_files[0].parent.name
    (folder / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: ignored, not skipped")
    data = resolve_dataset(tmp_path)
    assert len(data) == 8
    loader = make_loader(data, make_transform(tiny.model), batch_size=3, workers=2)
    seen, skipped = [], []
    for batch in loader:
        assert batch.images.shape[0] == batch.labels.shape[0] == batch.indices.shape[0]
        seen += batch.indices.tolist()
        skipped += batch.skipped
    assert len(seen) == 6 and len(skipped) == 2
    assert any("broken.JPEG" in message for message in skipped) and any("empty.png" in message for message in skipped)
    assert [data.labels[i] for i in seen] == [wnid_index[data.files[i].parent.name] for i in seen]


def test_limit_spans_the_classes():
    data = resolve_dataset(SAMPLE_DIR).subset(10)
    assert len(data) == 10
    assert data.files[0].parent.name == "n01496331" and data.files[-1] == resolve_dataset(SAMPLE_DIR).files[-1]
    assert len(set(data.labels)) == 10


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("mixed", "neither an ImageNet WordNet id"),
    ("unknown-wnid", "not one of the 1000"),
    ("big-index", "not a class index"),
    ("flat-no-gt", "no ground-truth file"),
    ("gt-incomplete", "not listed"),
    ("gt-bad-index", "outside 0..999"),
    ("empty-folders", "hold no image files"),
])
def test_unresolvable_folders_say_why(tmp_path, sample_files, case, message):
    image = sample_files[0]
    root = tmp_path / "data"
    if case == "mixed":
        _link(image, root / "n01496331" / "a.JPEG")
        _link(image, root / "cats" / "b.JPEG")
    elif case == "unknown-wnid":
        _link(image, root / "n99999999" / "a.JPEG")
    elif case == "big-index":
        _link(image, root / "1000" / "a.JPEG")
    elif case == "flat-no-gt":
        _link(image, root / "a.JPEG")
    elif case == "gt-incomplete":
        _link(image, root / "a.JPEG")
        _link(image, root / "b.JPEG")
        (root / "gt.txt").write_text("a.JPEG 5\n")
    elif case == "gt-bad-index":
        _link(image, root / "a.JPEG")
        (root / "gt.txt").write_text("a.JPEG 5000\n")
    elif case == "empty-folders":
        (root / "n01496331").mkdir(parents=True)
    ground_truth = root / "gt.txt" if case == "gt-bad-index" else None
    with pytest.raises(DatasetError, match=message):
        resolve_dataset(root, ground_truth=ground_truth)


def _write_shards(folder, photos, per_shard: int, with_cls: bool):
    """WebDataset shards of real photos: `<key>.jpg` + `<key>.cls`, or `<wnid>/<key>.jpg`."""
    import io
    import tarfile

    from analysis.models import imagenet_wnids

    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    shards = []
    for start in range(0, len(photos), per_shard):
        shard = folder / f"val-{start // per_shard:03d}.tar"
        with tarfile.open(shard, "w") as archive:
            for number, photo in enumerate(photos[start:start + per_shard], start):
                members = [(f"{photo.parent.name}/s{number:04d}.jpg", photo.read_bytes())]
                if with_cls:
                    members = [(f"s{number:04d}.jpg", photo.read_bytes()), (f"s{number:04d}.cls", str(index[photo.parent.name]).encode())]
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


@pytest.mark.parametrize("with_cls", [True, False])
def test_tar_shards_read_in_place_give_the_folder_results(tmp_path, sample_files, with_cls):
    """Tar shards (WebDataset layout) give the same images, labels and pixels as the folder, as a
    folder of shards, a brace pattern and a single shard."""
    from analysis.datasets import ImageDataset, expand_shards
    from analysis.models import make_transform

    photos = sample_files[:7]
    shards = _write_shards(tmp_path, photos, 3, with_cls)
    assert [p.name for p in expand_shards(str(tmp_path / "val-{000..002}.tar"))] == ["val-000.tar", "val-001.tar", "val-002.tar"]
    folder = resolve_dataset(SAMPLE_DIR)
    expected = [folder.labels[folder.files.index(p)] for p in photos]
    for source in (tmp_path, str(tmp_path / "val-{000..002}.tar")):
        files = resolve_dataset(source)
        assert files.layout == "tar-shards" and list(files.labels) == expected
    one = resolve_dataset(shards[0])
    assert list(one.labels) == expected[:3]
    import timm

    transform = make_transform(timm.create_model("deit_tiny_patch16_224", pretrained=False), None)
    from_tar = ImageDataset(resolve_dataset(tmp_path), transform)[4]
    from_folder = ImageDataset(folder, transform)[folder.files.index(photos[4])]
    assert torch.equal(from_tar[0], from_folder[0]) and from_tar[1] == from_folder[1]


def test_bad_tar_shards_are_named(tmp_path, sample_files):
    _write_shards(tmp_path, sample_files[:2], 2, True)
    with pytest.raises(DatasetError, match=r"val-001.tar does not exist \(1 of 2 shards missing\)"):
        resolve_dataset(str(tmp_path / "val-{000..001}.tar"))
    (tmp_path / "val-000.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DatasetError, match="not a readable tar file"):
        resolve_dataset(tmp_path / "val-000.tar")
