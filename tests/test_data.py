"""Tests of ddcnn.data: every dataset form, the splits, the cache, the loaders and the archive/download safety.

All inputs are tiny files written to tmp_path; the download test serves them from a local http.server.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddcnn.cli import main
from ddcnn.config import DataConfig
from ddcnn.data import (
    ImageSet,
    crop_and_flip,
    decode,
    decode_image,
    describe_dataset,
    download,
    download_cifar10,
    list_datasets,
    load_dataset,
    make_loader,
    safe_extract,
)
from ddcnn.data.assemble import assemble
from ddcnn.data.dataset import RawDataset
from ddcnn.data.splits import stratified_sample
from ddcnn.errors import (
    ChecksumError,
    ConfigError,
    CorruptImageError,
    DatasetError,
    UnknownNameError,
    UnsafeArchiveError,
    UnsupportedImageModeError,
)


@pytest.fixture
def cfg(tmp_path: Path) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def mnist() -> tuple[DataConfig, object]:
    cfg = DataConfig()
    return cfg, load_dataset(cfg)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def cli_error(capsys, argv: list[str]) -> str:
    """The one line ``ddcnn ARGV`` prints on stderr, having exited with status 2 (and no traceback)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ddcnn: error: "), err
    return err


# ---------------------------------------------------------------------------------------------------- splits, mnist


def test_registry_names_and_unknown_name(cfg):
    assert list_datasets() == ["cifar10", "csv", "imagefolder", "mnist5k", "nifti", "npz"]
    with pytest.raises(UnknownNameError, match="choose one of: cifar10, csv, imagefolder, mnist5k, nifti, npz"):
        load_dataset(replace(cfg, dataset="svhn"))
    assert "imagefolder:PATH" in describe_dataset(None, cfg)


def test_mnist5k_shapes_stratified_and_deterministic(mnist):
    cfg, data = mnist
    assert (data.name, data.num_classes, data.in_channels, data.spatial_dims, data.image_shape) == (
        "mnist5k",
        10,
        1,
        2,
        (28, 28),
    )
    assert data.train.images.shape == (3600, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert (len(data.val), len(data.test)) == (400, 1000) and not data.streaming
    for split, per_class in ((data.train, 360), (data.val, 40), (data.test, 100)):
        assert split.labels.dtype == torch.int64
        assert torch.bincount(split.labels).tolist() == [per_class] * 10
    train = data.train.images.float() / 255
    assert data.mean[0] == pytest.approx(train.mean().item(), abs=1e-5)
    assert data.std[0] == pytest.approx(train.std(unbiased=False).item(), abs=1e-5)
    again = load_dataset(cfg)
    assert torch.equal(again.test.images, data.test.images) and torch.equal(again.val.labels, data.val.labels)
    other_seed = load_dataset(replace(cfg, split_seed=1))
    assert not torch.equal(other_seed.test.images, data.test.images)


def test_limit_train_keeps_a_stratified_subset(cfg):
    data = load_dataset(replace(cfg, limit_train=50))
    assert torch.bincount(data.train.labels).tolist() == [5] * 10
    assert (len(data.val), len(data.test)) == (400, 1000)


def test_stratified_sample_is_exact_and_proportional():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    taken = stratified_sample(labels, 10, seed=0)
    assert len(taken) == 10 and np.bincount(labels[taken]).tolist() == [7, 2, 1]
    assert np.array_equal(taken, stratified_sample(labels, 10, seed=0))
    assert not np.array_equal(taken, stratified_sample(labels, 10, seed=1))


def test_bad_split_fraction_is_a_config_error(cfg):
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset(replace(cfg, val_fraction=1.5))


def test_limit_train_below_the_classes_or_above_the_images(cfg, caplog):
    with pytest.raises(ConfigError, match=r"limit_train=5 is fewer images than the 10 classes, .*at least 10"):
        load_dataset(replace(cfg, limit_train=5))
    data = load_dataset(replace(cfg, limit_train=10**6))
    assert len(data.train) == 3600 and "limit_train=1000000 exceeds the 3600 training images" in caplog.text


def test_a_positive_fraction_carves_at_least_one_image(tmp_path, cfg, make_npz):
    file = make_npz(tmp_path / "few.npz", n=6, classes=2)  # test: 0.2 of 6 is 1 image; val: 0.1 of 5 rounds to none
    data = load_dataset(replace(cfg, dataset=f"npz:{file}", test_fraction=0.2, val_fraction=0.1))
    assert (len(data.train), len(data.val), len(data.test)) == (4, 1, 1)
    assert len(load_dataset(replace(cfg, dataset=f"npz:{file}", test_fraction=0.2, val_fraction=0.0)).val) == 0


def test_classes_left_without_training_images_are_named_in_a_warning(tmp_path, cfg, caplog):
    np.savez(tmp_path / "rare.npz", x=np.zeros((11, 4, 4), np.uint8), y=np.array([0] * 10 + [1]))
    # test: 6 of 11 images, 5.45 of class 0 and 0.55 of class 1, whose larger remainder wins it the 6th
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'rare.npz'}", test_fraction=0.55, val_fraction=0.0))
    assert 1 not in data.train.labels.tolist()
    assert "1 class(es) (1) have no training images after carving val and test" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_names": ["only"]}, r"has only 1 class \(only\); a classifier needs at least 2"),
        ({"labels": np.array([0, 1, 2, 1])}, r"its train split has labels in \[0, 2\], outside 0..1 for 2 classes"),
        ({"test": np.zeros((3, 1, 5, 5), np.uint8)}, r"its test split holds images of shape \(1, 5, 5\) but train"),
        ({"test": np.zeros((0, 1, 4, 4), np.uint8)}, r"its test split holds 0 images and 3 labels"),
    ],
    ids=["one class", "label beyond the classes", "test of another shape", "empty test"],
)
def test_assemble_checks_any_reader_s_dataset(cfg, change, message):
    labels = change.get("labels", np.array([0, 1, 0, 1]))
    raw = RawDataset(
        "custom",
        change.get("class_names", ["a", "b"]),
        {
            "train": (np.zeros((4, 1, 4, 4), np.uint8), labels),
            "test": (change.get("test", np.zeros((3, 1, 4, 4), np.uint8)), np.array([0, 1, 0])),
        },
        fingerprint="custom",
        location="memory",
    )
    with pytest.raises(DatasetError, match=message):
        assemble(raw, replace(cfg, val_fraction=0.0))


def test_describe_dataset_counts_classes(cfg):
    text = describe_dataset("mnist5k", cfg)
    assert "1 x 28 x 28" in text and "in memory" in text and "3600" in text


# ---------------------------------------------------------------------------------------------------- cifar10


def cifar_pixels(n: int, offset: int) -> np.ndarray:
    return ((np.arange(n * 3072).reshape(n, 3072) + offset) % 251).astype(np.uint8)


def write_cifar_batches(folder: Path) -> None:
    """The canonical layout with 2 images per training batch and 3 test images, pickled as Python 2 did."""
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    for i in range(1, 6):
        batch = {
            b"batch_label": b"training batch %d of 5" % i,
            b"labels": [2 * i - 2, 2 * i - 1],
            b"data": cifar_pixels(2, i),
            b"filenames": [b"a.png", b"b.png"],
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": [0, 1, 9], b"data": cifar_pixels(3, 0)}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def make_tar(source: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    return archive


def check_cifar(data) -> None:
    assert data.class_names[:3] == ["airplane", "automobile", "bird"] and data.num_classes == 10
    assert len(data.train) + len(data.val) == 10 and len(data.test) == 3
    assert data.test.images.shape == (3, 3, 32, 32) and data.test.labels.tolist() == [0, 1, 9]
    # rows are stored channel by channel, then row by row
    assert torch.equal(data.test.images[1].flatten(), torch.from_numpy(cifar_pixels(3, 0)[1]))


def test_cifar10_canonical_folder_and_archive(tmp_path, cfg):
    batches_dir = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(batches_dir)
    check_cifar(load_dataset(replace(cfg, dataset=f"cifar10:{batches_dir}", val_fraction=0.2)))
    check_cifar(load_dataset(replace(cfg, dataset=f"cifar10:{tmp_path}", val_fraction=0.2)))  # the folder above
    archive = make_tar(batches_dir, tmp_path / "cifar-10-python.tar.gz")
    check_cifar(load_dataset(replace(cfg, dataset=f"cifar10:{archive}", val_fraction=0.2)))


class _Exploit:
    """Unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_a_malicious_pickle(tmp_path, cfg):
    batches_dir = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(batches_dir)
    exploit = _Exploit(tmp_path / "pwned")
    (batches_dir / "data_batch_3").write_bytes(pickle.dumps({b"data": exploit}, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_3 asks to load (posix|nt)\.system"):
        load_dataset(replace(cfg, dataset=f"cifar10:{batches_dir}"))
    assert not exploit.marker.exists()


def test_cifar10_image_tree_archive(tmp_path, cfg):
    for split, n in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            write_images(tmp_path / "tree" / split / name, [("RGB", (32, 32))] * n)
    archive = make_tar(tmp_path / "tree", tmp_path / "cifar10-jpeg.tar.gz")
    data = load_dataset(replace(cfg, dataset=f"cifar10:{archive}", val_fraction=0.25))
    assert (data.name, data.class_names, data.image_shape) == ("cifar10", ["cat", "dog"], (32, 32))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 4)


# ---------------------------------------------------------------------------------------------------- imagefolder


def write_images(folder: Path, specs: list[tuple[str, tuple[int, int]]], ext: str = ".png") -> list[Path]:
    """One image per (mode, size) spec, with varied content."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (mode, size) in enumerate(specs):
        rgb = Image.fromarray(((np.indices((size[1], size[0])).sum(0) * (i + 7)) % 256).astype(np.uint8)).convert("RGB")
        img = rgb.convert(mode) if mode != "P" else rgb.quantize(8)
        paths.append(folder / f"img{i}{ext}")
        img.save(paths[-1])
    return paths


def test_imagefolder_mixed_modes_become_rgb_and_are_resized(tmp_path, cfg):
    root = tmp_path / "data"
    write_images(root / "train" / "a", [("L", (20, 12)), ("RGB", (16, 16)), ("1", (9, 9))])
    write_images(root / "train" / "b", [("P", (30, 30)), ("RGBA", (16, 16)), ("L", (16, 16))])
    write_images(root / "test" / "a", [("RGB", (16, 16))])
    write_images(root / "test" / "b", [("LA", (16, 16))])
    (root / "train" / "a" / "LICENSE.txt").write_text("not an image")
    transparent = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    transparent.putpixel((0, 0), (255, 0, 0, 255))
    transparent.save(root / "train" / "b" / "transparent.png")
    data = load_dataset(replace(cfg, dataset=f"imagefolder:{root}", image_size=16, val_fraction=0.0))
    assert (data.name, data.class_names, data.in_channels) == (f"imagefolder:{root.name}", ["a", "b"], 3)
    assert data.train.images.shape == (7, 3, 16, 16) and len(data.test) == 2
    gray = Image.open(root / "train" / "b" / "img2.png")  # 16x16 L, kept at its size
    expected = torch.from_numpy(np.array(gray)).expand(3, 16, 16)
    assert any(torch.equal(img, expected) for img in data.train.images)
    composited = next(img for img in data.train.images if img[0, 0, 0] == 255 and img[:, 1:, 1:].max() == 0)
    assert composited[:, 0, 0].tolist() == [255, 0, 0]  # the opaque pixel; transparent red became black


def test_imagefolder_all_gray_has_one_channel_and_keeps_first_size(tmp_path, cfg):
    root = tmp_path / "data"
    write_images(root / "x", [("L", (10, 8)), ("1", (10, 8))])
    write_images(root / "y", [("LA", (12, 12)), ("L", (4, 4))])
    Image.fromarray(np.full((8, 10), 0x1234, dtype=np.uint16)).save(root / "y" / "sixteen_bit.png")
    data = load_dataset(replace(cfg, dataset=f"imagefolder:{root}", test_fraction=0.0, val_fraction=0.0))
    assert data.train.images.shape == (5, 1, 8, 10)  # (H, W) of the first training image
    assert data.train.images.dtype == torch.uint16  # one 16-bit image: the gray dataset keeps 16 bits
    assert data.train.images[-1].unique().tolist() == [0x1234]  # all of them, not the high byte
    assert data.train.images[:-1].int().remainder(257).eq(0).all()  # 8-bit images in the 16-bit range (x 257)


def test_decode_image_converts_to_the_channels_asked_for(tmp_path):
    rgb, gray = write_images(tmp_path, [("RGB", (6, 4)), ("L", (6, 4))])
    assert decode_image(rgb, (6, 4)).shape == (3, 4, 6) and decode_image(rgb, (3, 2), channels=1).shape == (1, 2, 3)
    as_rgb = decode_image(gray, (6, 4), channels=3)
    assert np.array_equal(as_rgb, np.broadcast_to(decode_image(gray, (6, 4)), (3, 4, 6)))


def test_imagefolder_single_level_is_split_deterministically(tmp_path, cfg):
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        write_images(root / name, [("RGB", (8, 8))] * 10)
    spec = replace(cfg, dataset=f"imagefolder:{root}", test_fraction=0.2, val_fraction=0.25)
    first, second = load_dataset(spec), load_dataset(spec)
    assert (len(first.train), len(first.val), len(first.test)) == (18, 6, 6)
    assert torch.bincount(first.test.labels).tolist() == [2, 2, 2]
    assert torch.equal(first.val.images, second.val.images)


def test_imagefolder_decodes_once_then_reads_the_cache(tmp_path, cfg, monkeypatch):
    root = tmp_path / "data"
    paths = write_images(root / "a", [("RGB", (8, 8))] * 3)
    write_images(root / "b", [("RGB", (8, 8))] * 3)
    spec = replace(cfg, dataset=f"imagefolder:{root}")
    decoded = []
    real_decode = decode.decode_raw

    def counting_decode(path, *args):
        decoded.append(path)
        return real_decode(path, *args)

    monkeypatch.setattr(decode, "decode_raw", counting_decode)
    first = load_dataset(spec)
    assert len(decoded) == 6
    second = load_dataset(spec)
    assert len(decoded) == 6 and torch.equal(first.train.images, second.train.images)
    os.utime(paths[0], ns=(1, 1))  # an edited file invalidates the cache entry
    load_dataset(spec)
    assert len(decoded) == 12
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]  # nothing was written into the tree


def test_streamed_imagefolder_reuses_its_cache_for_whole_splits(tmp_path, cfg):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("a", "b"):
            write_images(root / split / name, [("RGB", (8, 8))] * 4)
    data = load_dataset(replace(cfg, dataset=f"imagefolder:{root}", val_fraction=0.25, max_memory_gb=1e-9))
    assert data.streaming and all(isinstance(s.images, np.memmap) for s in (data.train, data.val, data.test))
    assert Path(data.test.images.filename).parent.parent.name == "imagefolder"  # the decoded cache itself
    assert Path(data.train.images.filename).parent.parent.name == "streams"  # val was carved out of train


def test_imagefolder_archive_is_extracted_into_the_cache(tmp_path, cfg):
    write_images(tmp_path / "flowers" / "train" / "rose", [("RGB", (8, 8))] * 5)
    write_images(tmp_path / "flowers" / "train" / "tulip", [("RGB", (8, 8))] * 5)
    write_images(tmp_path / "flowers" / "val" / "rose", [("RGB", (8, 8))])
    write_images(tmp_path / "flowers" / "val" / "tulip", [("RGB", (8, 8))])
    archive = make_tar(tmp_path / "flowers", tmp_path / "flowers-8.tar.gz")
    data = load_dataset(replace(cfg, dataset=f"imagefolder:{archive}", test_fraction=0.2))
    assert (data.name, len(data.train), len(data.val), len(data.test)) == ("imagefolder:flowers-8", 8, 2, 2)
    assert (tmp_path / "cache" / "extracted").is_dir()


def test_corrupt_image_names_the_file(tmp_path, cfg):
    root = tmp_path / "data"
    write_images(root / "a", [("RGB", (8, 8))] * 2)
    good = write_images(root / "b", [("RGB", (8, 8))] * 2, ext=".jpg")
    good[1].write_bytes(good[1].read_bytes()[:100])  # truncated JPEG
    with pytest.raises(CorruptImageError, match=r"img1\.jpg cannot be decoded .*delete or replace it"):
        load_dataset(replace(cfg, dataset=f"imagefolder:{root}"))


def test_unsupported_mode_names_file_and_mode(tmp_path, cfg):
    root = tmp_path / "data"
    write_images(root / "a", [("RGB", (8, 8))] * 2)
    write_images(root / "b", [("RGB", (8, 8))])
    Image.new("F", (8, 8)).save(root / "b" / "float.tif")
    with pytest.raises(UnsupportedImageModeError, match=r"float\.tif has image mode F"):
        load_dataset(replace(cfg, dataset=f"imagefolder:{root}"))


@pytest.mark.parametrize(
    "problem, message",
    [
        ("empty class", r"class folder .*train/b holds no images"),
        ("no train", r"has split folders \(test, val\) but no train/"),
        ("different classes", r"class folders differ between splits.*test lacks \['b'\] and has \['c'\]"),
    ],
)
def test_bad_image_trees_are_dataset_errors(tmp_path, cfg, problem, message):
    root = tmp_path / "data"
    write_images(root / "train" / "a", [("RGB", (8, 8))])
    write_images(root / "train" / "b", [("RGB", (8, 8))])
    write_images(root / "test" / "a", [("RGB", (8, 8))])
    write_images(root / "test" / "b", [("RGB", (8, 8))])
    if problem == "empty class":
        for file in (root / "train" / "b").iterdir():
            file.unlink()
        (root / "train" / "b" / "notes.txt").write_text("no images here")
    elif problem == "no train":
        (root / "train").rename(root / "val")
    else:
        (root / "test" / "b").rename(root / "test" / "c")
    with pytest.raises(DatasetError, match=message):
        load_dataset(replace(cfg, dataset=f"imagefolder:{root}"))


def test_a_link_to_a_containing_folder_is_skipped_with_a_warning(tmp_path, cfg, caplog):
    root = tmp_path / "data"
    write_images(root / "a", [("RGB", (8, 8))] * 3)
    write_images(root / "b", [("RGB", (8, 8))] * 3)
    (root / "a" / "self").symlink_to(".")
    (root / "b" / "up").symlink_to("..")
    (root / "b" / "deep").mkdir()
    (root / "b" / "deep" / "back").symlink_to("../../b")
    data = load_dataset(replace(cfg, dataset=f"imagefolder:{root}", test_fraction=0.0, val_fraction=0.0))
    assert data.class_names == ["a", "b"] and torch.bincount(data.train.labels).tolist() == [3, 3]
    for link in ("a/self", "b/up", "b/deep/back"):
        assert f"skipping {root / link}: a link to " in caplog.text
    assert caplog.text.count("skipping") == 3  # each folder is listed once


def test_a_tree_that_is_only_a_loop_is_a_dataset_error(tmp_path, cfg):
    (tmp_path / "data" / "only").mkdir(parents=True)
    (tmp_path / "data" / "only" / "loop").symlink_to("..")
    with pytest.raises(DatasetError, match=r"only holds no class folders"):
        load_dataset(replace(cfg, dataset=f"imagefolder:{tmp_path / 'data'}"))


@pytest.mark.parametrize("problem", ["loop", "dangling"])
def test_an_image_link_that_cannot_be_followed_names_the_file(tmp_path, cfg, capsys, problem):
    root = tmp_path / "data"
    write_images(root / "a", [("RGB", (8, 8))] * 2)
    write_images(root / "b", [("RGB", (8, 8))] * 2)
    (root / "b" / "x.png").symlink_to("y.png" if problem == "loop" else "missing.png")
    if problem == "loop":
        (root / "b" / "y.png").symlink_to("x.png")
    with pytest.raises(DatasetError, match=r"b/x\.png is a symbolic link to .*\.png that cannot be followed"):
        load_dataset(replace(cfg, dataset=f"imagefolder:{root}"))
    assert "x.png is a symbolic link" in cli_error(capsys, ["datasets", f"imagefolder:{root}"])


def test_a_single_class_is_a_dataset_error(tmp_path, cfg):
    write_images(tmp_path / "data" / "train" / "cat", [("RGB", (8, 8))] * 4)
    with pytest.raises(DatasetError, match=r"has only 1 class \(cat\); a classifier needs at least 2"):
        load_dataset(replace(cfg, dataset=f"imagefolder:{tmp_path / 'data'}"))


# ---------------------------------------------------------------------------------------------------- npz


def test_npz_2d_with_column_labels_class_names_and_float_pixels(tmp_path, cfg):
    x_train = np.random.default_rng(0).random((20, 6, 5)).astype(np.float32)
    y_train = np.repeat([[0], [1]], 10, axis=0)
    file = tmp_path / "digits.npz"
    np.savez(
        file,
        x_train=x_train,
        y_train=y_train,
        x_test=x_train[:4],
        y_test=y_train[:4],
        class_names=np.array(["zero", "one", "two"]),
    )
    data = load_dataset(replace(cfg, dataset=f"npz:{file}", val_fraction=0.2))
    assert (data.name, data.class_names, data.image_shape, data.in_channels) == (
        "npz:digits",
        ["zero", "one", "two"],
        (6, 5),
        1,
    )
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 4)
    # floats between the levels of 8 bits: stored at 16, so that they keep their levels
    expected = torch.from_numpy(np.rint(x_train[:4] * np.float32(65535)).astype(np.uint16))[:, None]
    assert torch.equal(data.test.images, expected)
    assert (data.intensity.low, data.intensity.high, data.intensity.levels) == (0.0, 1.0, 65535)
    np.savez(file, x=np.rint(x_train * 255) / 255, y=y_train)  # floats on the 8-bit grid: 8 bits keep them all
    data = load_dataset(replace(cfg, dataset=f"npz:{file}"))
    assert data.train.images.dtype == torch.uint8 and data.intensity.levels == 255


def test_npz_channels_last_layout_and_unsplit_arrays(tmp_path, cfg):
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=images, y=np.arange(12) % 2)
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'rgb.npz'}", val_fraction=0.0, test_fraction=0.0))
    assert torch.equal(data.train.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    np.savez(
        tmp_path / "cf.npz", images=images.transpose(0, 3, 1, 2), labels=np.arange(12) % 2, layout=np.array("NCHW")
    )
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'cf.npz'}", val_fraction=0.0, test_fraction=0.0))
    assert torch.equal(data.train.images, torch.from_numpy(images).permute(0, 3, 1, 2))


def test_npz_3d_volumes(tmp_path, cfg):
    volumes = np.random.default_rng(0).integers(0, 2, (10, 5, 6, 7)).astype(bool)
    labels = np.arange(10) % 2
    np.savez(
        tmp_path / "masks.npz",
        x_train=volumes,
        y_train=labels,
        x_val=volumes[:2],
        y_val=labels[:2],
        x_test=volumes[:2],
        y_test=labels[:2],
    )
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'masks.npz'}"))
    assert (data.spatial_dims, data.image_shape, data.in_channels, data.num_classes) == (3, (5, 6, 7), 1, 2)
    assert set(data.train.images.unique().tolist()) == {0, 255}
    two_channels = np.zeros((4, 2, 3, 4, 5), dtype=np.uint8)  # last size not 1 or 3: (n, C, D, H, W)
    np.savez(tmp_path / "ncdhw.npz", x=two_channels, y=np.array([0, 1, 0, 1]))
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'ncdhw.npz'}", val_fraction=0.0, test_fraction=0.5))
    assert data.train.images.shape == (2, 2, 3, 4, 5)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            {"x": np.zeros((4, 3, 3)), "y": np.array([0, 1, 2, 3]), "class_names": np.array(["a", "b"])},
            r"labels in \[0, 3\], outside 0..1 for 2 classes",
        ),
        ({"x": np.zeros((4, 3, 3)), "y": np.array([0, 1, -1, 0])}, r"y holds negative labels \(down to -1\)"),
        (
            {"x": np.full((4, 3, 3), np.nan), "y": np.zeros(4, int)},
            r"contains NaN/inf values in x; clean the data",
        ),
        ({"x": np.full((4, 3, 3), 300.5), "y": np.zeros(4, int)}, r"values in \[300.5, 300.5\], which --intensity"),
        ({"pixels": np.zeros((4, 3, 3))}, r"expected train_images, train_labels \(MedMNIST.*x_train, y_train"),
    ],
)
def test_bad_npz_contents_are_dataset_errors(tmp_path, cfg, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        dataset = f"npz:{tmp_path / 'bad.npz'}"
        load_dataset(replace(cfg, dataset=dataset, val_fraction=0.0, test_fraction=0.0, intensity="none"))


X, Y = np.zeros((20, 4, 4), np.uint8), np.arange(20) % 2


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": X, "y": np.array([0, 100000] * 10)}, r"y holds label 100000, but the dataset has only 20 images"),
        (
            {"x": np.zeros((300, 2, 2), np.uint8), "y": np.array([0, 150] * 150)},
            r"labels run up to 150 but classes 1, 2, 3, 4, 5, ... \(149 of 151\) have no images; relabel",
        ),
        ({"x": X, "y": Y - 1}, r"y holds negative labels \(down to -1\)"),
        ({"x": X, "y": Y / 2}, r"y holds non-integer labels \(e.g. 0.5\)"),
        ({"x": X, "y": np.where(Y == 0, np.nan, 1.0)}, r"y contains NaN/inf labels"),
        ({"x": X, "y": Y.astype(str)}, r"y is a <U21 array; store integer class indices"),
        ({"x": X, "y": np.eye(2)[Y]}, r"y has shape \(20, 2\); store one class index per image"),
        ({"x_train": X, "y_train": Y[:10]}, r"y_train holds 10 labels for 20 images"),
        ({"x": X, "y": Y, "class_names": np.array([], dtype=str)}, r"class_names is empty"),
    ],
    ids=[
        "label far beyond",
        "missing classes",
        "negative",
        "fractional",
        "nan",
        "strings",
        "one-hot",
        "length",
        "no names",
    ],
)
def test_bad_npz_labels_are_refused_before_anything_per_class(tmp_path, cfg, capsys, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'bad.npz'}"))
    assert "bad.npz: " in cli_error(capsys, ["datasets", f"npz:{tmp_path / 'bad.npz'}"])


def test_npz_labels_may_be_whole_floats(tmp_path, cfg):
    np.savez(tmp_path / "floats.npz", x=X, y=Y.astype(np.float32))
    assert load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'floats.npz'}")).class_names == ["0", "1"]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_test": X[:0], "y_test": Y[:0]}, r"x_test holds no images; store at least one image in it or leave"),
        (
            {"x_val": np.zeros((4, 5, 5), np.uint8), "y_val": Y[:4]},
            r"x_val holds images of shape 1 x 5 x 5 but x_train 1 x 4 x 4",
        ),
        ({"x_val": np.zeros((4, 4, 4)), "y_val": Y[:4]}, r"x_val is float64 but x_train uint8; store every split"),
        ({"x_test": X[:4], "y_test": Y[:3]}, r"y_test holds 3 labels for 4 images"),
        ({"x_train": np.zeros(20)}, r"x_train has shape \(20,\), which is not an image or volume batch"),
        ({"x_train": np.zeros((20, 0, 4))}, r"x_train holds images of shape 1 x 0 x 4, without pixels"),
    ],
    ids=["empty test", "val of another shape", "val of another dtype", "test labels", "1-d x", "no pixels"],
)
def test_every_npz_split_is_checked_at_load_time(tmp_path, cfg, arrays, message):
    np.savez(tmp_path / "bad.npz", **({"x_train": X, "y_train": Y} | arrays))
    with pytest.raises(DatasetError, match=message):
        load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'bad.npz'}"))


def test_a_file_that_is_not_npz_is_a_dataset_error(tmp_path, cfg):
    (tmp_path / "x.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(DatasetError, match=r"is not a valid \.npz file"):
        load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'x.npz'}"))


# ---------------------------------------------------------------------------------------------------- loaders


def loader_for(split, data, cfg, **kwargs):
    options = dict(batch_size=64, train=True, cfg=cfg, mean=data.mean, std=data.std, device="cpu")
    return make_loader(split, **(options | kwargs))


def test_streaming_fallback_yields_the_same_batches(mnist, tmp_path):
    cfg, data = mnist
    stream_cfg = replace(cfg, cache_dir=str(tmp_path), max_memory_gb=1e-4, num_workers=1)
    streamed = load_dataset(stream_cfg)
    assert streamed.streaming and isinstance(streamed.train.images, np.memmap)
    assert streamed.mean == pytest.approx(data.mean) and streamed.std == pytest.approx(data.std)
    for train in (True, False):
        expected = batches(loader_for(data.val, data, cfg, train=train))
        got = batches(loader_for(streamed.val, streamed, stream_cfg, train=train))
        assert len(got) == len(expected) and all(torch.equal(a[0], b[0]) for a, b in zip(got, expected))


def test_same_seed_and_epoch_replay_exactly_and_epochs_differ(mnist):
    cfg, data = mnist
    loader = loader_for(data.val, data, replace(cfg, flip=True))
    rng_before = torch.get_rng_state()
    loader.set_epoch(3)
    first, again = batches(loader), batches(loader)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never drawn from
    loader.set_epoch(4)
    other = batches(loader)
    assert len(first) == len(loader) == 6 and loader.num_samples == 384
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    fresh = loader_for(data.val, data, replace(cfg, flip=True))
    fresh.set_epoch(3)
    assert torch.equal(batches(fresh)[2][0], first[2][0])


def test_shards_are_disjoint_equal_and_cover_the_permutation():
    split = ImageSet(
        torch.arange(103, dtype=torch.uint8).view(103, 1, 1, 1).expand(103, 1, 4, 4).contiguous(), torch.arange(103)
    )
    args = dict(
        batch_size=5, train=True, cfg=DataConfig(augment=False), mean=(0.0,), std=(1.0,), device="cpu", drop_last=False
    )
    seen = []
    for rank in range(4):
        shard = make_loader(split, shard=(rank, 4), **args)
        shard.set_epoch(1)
        seen.append(torch.cat([y for _, y in shard]))
    assert [len(s) for s in seen] == [25] * 4
    assert len(set(torch.cat(seen).tolist())) == 100
    whole = make_loader(split, **args)
    whole.set_epoch(1)
    permutation = torch.cat([y for _, y in whole])
    assert sorted(torch.cat(seen).tolist()) == sorted(permutation[:100].tolist())


def test_eval_loader_covers_every_sample_once_in_order(mnist):
    cfg, data = mnist
    loader = loader_for(data.test, data, cfg, train=False, batch_size=300)
    got = batches(loader)
    assert [len(y) for _, y in got] == [300, 300, 300, 100] and len(loader) == 4
    assert torch.equal(torch.cat([y for _, y in got]), data.test.labels)
    x = torch.cat([x for x, _ in got])
    expected = (data.test.images.float() / 255 - data.mean[0]) / data.std[0]
    assert torch.allclose(x, expected, atol=1e-5)
    ranks = [torch.cat([y for _, y in loader_for(data.test, data, cfg, train=False, shard=(r, 3))]) for r in range(3)]
    assert sum(len(r) for r in ranks) == 1000


@pytest.mark.parametrize("shape", [(16, 2, 12, 10), (16, 1, 6, 7, 8)])
def test_augmentation_keeps_shape_and_moves_pixels(shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    split = ImageSet(images, torch.zeros(shape[0], dtype=torch.int64))
    cfg = DataConfig(crop_padding=2, flip=True)
    channels = shape[1]
    loader = make_loader(
        split, batch_size=16, train=True, cfg=cfg, mean=(0.0,) * channels, std=(1.0,) * channels, device="cpu"
    )
    x, _ = next(iter(loader))
    assert x.shape == shape and x.dtype == torch.float32
    plain = make_loader(
        split,
        batch_size=16,
        train=True,
        cfg=replace(cfg, augment=False),
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        device="cpu",
    )
    unaugmented, _ = next(iter(plain))
    moved = (x != unaugmented).flatten(1).any(1)
    assert moved.float().mean() > 0.75


@pytest.mark.parametrize("spatial", [(9, 7), (5, 6, 7)])
def test_crop_and_flip_matches_reflect_padding_and_slicing(spatial):
    x = torch.randint(0, 256, (6, 2, *spatial), dtype=torch.uint8)
    padding = 2
    shifts = torch.randint(0, 2 * padding + 1, (6, len(spatial)))
    flips = torch.tensor([True, False, True, False, False, True])
    out = crop_and_flip(x, shifts, flips, padding)
    padded = F.pad(x.float(), (padding,) * 2 * len(spatial), mode="reflect")
    for b in range(6):
        window = tuple(slice(int(s), int(s) + size) for s, size in zip(shifts[b], spatial))
        expected = padded[(b, slice(None), *window)]
        expected = expected.flip(-1) if flips[b] else expected
        assert torch.equal(out[b].float(), expected)


def test_batch_larger_than_the_training_set_is_a_config_error(mnist):
    cfg, data = mnist
    with pytest.raises(ConfigError, match="exceeds the 400 images per rank"):
        loader_for(data.val, data, cfg, batch_size=512)


def test_in_memory_split_is_copied_to_the_device_once(mnist):
    _, data = mnist
    assert data.val.on_device(torch.device("cpu"))[0] is data.val.on_device(torch.device("cpu"))[0]


# ---------------------------------------------------------------------------------------------------- archives


def tar_with(path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("fine.txt")
        tar.addfile(ok, io.BytesIO(b""))
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload))
    return path


def symlink_member(name: str, target: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = tarfile.SYMTYPE, target
    return member


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("/tmp/absolute.txt"),
        tarfile.TarInfo("sub/../../escape.txt"),
        symlink_member("link", "../../etc"),
        symlink_member("abs_link", "/etc/passwd"),
        symlink_member("train/up", ".."),
        symlink_member("train/self", "."),
        symlink_member("a.png", "a.png"),
    ],
    ids=["absolute", "dotdot", "escaping symlink", "absolute symlink", "link up", "link to its folder", "self link"],
)
def test_safe_extract_refuses_members_outside_the_target(tmp_path, member):
    archive = tar_with(tmp_path / "evil.tar", member, b"x")
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafeArchiveError, match="refusing to extract this archive"):
        safe_extract(archive, dest)
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


def test_safe_extract_refuses_zip_traversal_and_extracts_good_archives(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(UnsafeArchiveError):
        safe_extract(tmp_path / "evil.zip", tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()
    archive = tar_with(tmp_path / "good.tar", symlink_member("inner/link", "../fine.txt"))
    safe_extract(archive, tmp_path / "good")
    assert (tmp_path / "good" / "fine.txt").is_file() and (tmp_path / "good" / "inner" / "link").is_symlink()


@pytest.mark.parametrize("target", ["missing.txt", "sub", "link"])
def test_safe_extract_refuses_a_hard_link_to_anything_but_an_earlier_file(tmp_path, target):
    archive = tmp_path / "odd.tar"
    with tarfile.open(archive, "w") as tar:
        sub = tarfile.TarInfo("sub")
        sub.type = tarfile.DIRTYPE
        tar.addfile(sub)
        hard = tarfile.TarInfo("link")
        hard.type, hard.linkname = tarfile.LNKTYPE, target
        tar.addfile(hard)
    with pytest.raises(DatasetError, match=rf"hard link 'link' points to '{target}', which is not a regular file"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_an_image_tree_archive_with_a_loop_leaves_nothing_in_the_cache(tmp_path, cfg, capsys):
    write_images(tmp_path / "tree" / "train" / "a", [("RGB", (8, 8))] * 2)
    write_images(tmp_path / "tree" / "train" / "b", [("RGB", (8, 8))] * 2)
    (tmp_path / "tree" / "train" / "up").symlink_to("..")
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    with pytest.raises(UnsafeArchiveError, match=r"symbolic link 'tree/train/up' points to '..'.*makes the tree loop"):
        load_dataset(replace(cfg, dataset=f"imagefolder:{archive}"))
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []
    assert "refusing to extract" in cli_error(capsys, ["datasets", f"imagefolder:{archive}"])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path):
    """A folder served on 127.0.0.1; yields (folder, base url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_the_checksum(tmp_path, http_root):
    folder, url = http_root
    (folder / "file.bin").write_bytes(b"payload" * 1000)
    digest = hashlib.sha256(b"payload" * 1000).hexdigest()
    dest = tmp_path / "downloads" / "file.bin"
    assert download(f"{url}/file.bin", dest, digest).read_bytes() == b"payload" * 1000
    dest.unlink()
    with pytest.raises(ChecksumError, match="expected 0000"):
        download(f"{url}/file.bin", dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []  # neither the file nor a partial download is left
    with pytest.raises(DatasetError, match="could not download"):
        download(f"{url}/missing.bin", dest, digest)


def test_download_cifar10_then_load_it(tmp_path, cfg, http_root):
    folder, url = http_root
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    archive = make_tar(tmp_path / "cifar-10-batches-py", folder / "cifar-10-python.tar.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    path = download_cifar10(tmp_path / "cache" / "cifar10", url=f"{url}/cifar-10-python.tar.gz", sha256=digest)
    assert path == tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz"
    check_cifar(load_dataset(replace(cfg, dataset="cifar10", val_fraction=0.2)))
