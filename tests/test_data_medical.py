"""Tests of the medical data forms and of intensities: MedMNIST's npz files as downloaded, NIfTI folders, CSV lists
of image paths, --intensity (CT windows, percentiles, 16-bit levels kept through the cache) and the same transform at
predict time. Every input is a tiny file the test writes (NIfTI ones with nibabel) into tmp_path."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddcnn.config import DataConfig
from ddcnn.data import describe_dataset, load_dataset, make_loader, manifest
from ddcnn.data.intensity import Intensity, resolve_intensity
from ddcnn.errors import ConfigError, DatasetError
from ddcnn.inference import Classifier
from ddcnn.models import ModelSpec
from ddcnn.predict import read_image

nib = pytest.importorskip("nibabel")

RAS = np.eye(4)


@pytest.fixture
def cfg(tmp_path: Path) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), val_fraction=0.25, test_fraction=0.25)


def save_nifti(path: Path, volume: np.ndarray, affine: np.ndarray = RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def ct_volumes(n: int = 8, shape: tuple[int, ...] = (6, 5, 4), seed: int = 0) -> list[np.ndarray]:
    """int16 volumes in Hounsfield units, (x, y, z) as NIfTI stores them."""
    rng = np.random.default_rng(seed)
    return [rng.integers(-1024, 3000, shape).astype(np.int16) for _ in range(n)]


def entry_of(cache: Path, form: str) -> Path:
    (entry,) = [p for p in (cache / form).iterdir() if not p.name.startswith(".")]
    return entry


# ------------------------------------------------------------------------------------------------ MedMNIST npz


@pytest.mark.parametrize(
    "shape, channels, spatial",
    [((28, 28), 1, (28, 28)), ((28, 28, 3), 3, (28, 28)), ((28, 28, 28), 1, (28, 28, 28))],
    ids=["2d-gray", "2d-rgb", "3d"],
)
def test_medmnist_npz_as_downloaded(tmp_path, cfg, shape, channels, spatial):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None].astype(np.uint8)  # MedMNIST's (n, 1)
    np.savez(tmp_path / "organmnist.npz", **arrays)
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'organmnist.npz'}"))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 3)  # the file's own splits
    assert (data.in_channels, data.image_shape, data.class_names) == (channels, spatial, ["0", "1"])
    assert data.train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    images = torch.from_numpy(arrays["test_images"])
    expected = images.permute(0, 3, 1, 2) if channels == 3 else images[:, None]
    assert data.test.images.dtype == torch.uint8 and torch.equal(data.test.images, expected)


def test_medmnist_multi_label_task_is_refused_in_one_line(tmp_path, cfg):
    np.savez(
        tmp_path / "chestmnist.npz",
        train_images=np.zeros((4, 28, 28), np.uint8),
        train_labels=np.zeros((4, 14), np.uint8),
    )
    with pytest.raises(DatasetError, match=r"train_labels holds 14 labels per image, a multi-label MedMNIST task") as e:
        load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'chestmnist.npz'}"))
    assert "not supported" in str(e.value) and "\n" not in str(e.value)
    np.savez(tmp_path / "half.npz", train_images=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match="has train_images but not its partner; store train_images and train_labels"):
        load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'half.npz'}"))


# ------------------------------------------------------------------------------------------------------- nifti


def write_ct_folder(root: Path, volumes: list[np.ndarray], splits: bool = True) -> Path:
    """``root/labels.csv`` and the volumes, alternately .nii and .nii.gz; classes by index."""
    rows = ["file,label,split" if splits else "file,label"]
    for i, volume in enumerate(volumes):
        name = f"scan{i}.nii" if i % 2 else f"scan{i}.nii.gz"
        save_nifti(root / name, volume)
        split = "train" if i < len(volumes) - 2 else ("val" if i == len(volumes) - 2 else "test")
        rows.append(f"{name},{'lesion' if i % 2 else 'normal'}" + (f",{split}" if splits else ""))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_nifti_folder_with_labels_csv_keeps_int16_levels_and_its_splits(tmp_path, cfg):
    volumes = ct_volumes()
    root = write_ct_folder(tmp_path / "ct", volumes)
    data = load_dataset(replace(cfg, dataset=f"nifti:{root}"))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 1, 1)
    assert (data.class_names, data.image_shape, data.in_channels) == (["lesion", "normal"], (4, 5, 6), 1)
    # auto: int16 in its 16-bit range, every level kept: the level is the HU value + 32768, axes (z, y, x)
    assert data.intensity == Intensity("auto", -32768.0, 32767.0, 65535, "int16")
    expected = torch.from_numpy((volumes[0].astype(np.int32) + 32768).astype(np.uint16).transpose(2, 1, 0))
    assert data.train.images.dtype == torch.uint16 and torch.equal(data.train.images[0, 0], expected)
    assert data.train.labels.tolist() == [1, 0, 1, 0, 1, 0]


def test_nifti_class_folders_carve_splits_and_orient_to_ras(tmp_path, cfg):
    volumes = ct_volumes(n=8)
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS: x runs right to left
    for i, volume in enumerate(volumes):
        folder = tmp_path / "ct" / ("b" if i % 2 else "a")
        if i == 0:  # stored mirrored, with an affine that says so: read as the others are
            save_nifti(folder / "s0.nii.gz", volume[::-1].copy(), flip_x)
        else:
            save_nifti(folder / f"s{i}.nii{'.gz' if i % 3 else ''}", volume)
    (tmp_path / "ct" / "a" / "notes.txt").write_text("ignored")
    data = load_dataset(replace(cfg, dataset=f"nifti:{tmp_path / 'ct'}", intensity="window:-1000,400"))
    assert data.class_names == ["a", "b"] and (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)
    everything = torch.cat([data.train.images, data.val.images, data.test.images])
    level = Intensity("window:-1000,400", -1000.0, 400.0, 65535, "int16").apply
    assert any(torch.equal(image[0], torch.from_numpy(level(volumes[0].transpose(2, 1, 0)))) for image in everything)
    summary = describe_dataset(f"nifti:{tmp_path / 'ct'}", replace(cfg, intensity="window:-1000,400"))
    assert "images     3D volumes, gray (1 x 4 x 5 x 6), uint16" in summary
    assert "intensity  window:-1000,400: int16 values -1000..400 -> levels 0..65535 (uint16)" in summary
    assert "splits     4 train, 2 val, 2 test" in summary


def test_nifti_split_folders_give_the_splits(tmp_path, cfg):
    for i, volume in enumerate(ct_volumes(n=6)):
        save_nifti(tmp_path / "ct" / ("test" if i >= 4 else "train") / "ab"[i % 2] / f"s{i}.nii.gz", volume)
    data = load_dataset(replace(cfg, dataset=f"nifti:{tmp_path / 'ct'}", val_fraction=0.0))
    assert (data.class_names, len(data.train), len(data.val), len(data.test)) == (["a", "b"], 4, 0, 2)
    (tmp_path / "ct" / "c").mkdir()
    with pytest.raises(DatasetError, match=r"mixes split folders \(test, train\) with class folders"):
        load_dataset(replace(cfg, dataset=f"nifti:{tmp_path / 'ct'}"))


def test_nifti_volumes_of_other_shapes_are_resampled_or_refused(tmp_path, cfg):
    small = np.arange(2 * 2 * 2, dtype=np.int16).reshape(2, 2, 2) * 100
    volumes = [small, small + 1, np.zeros((4, 4, 4), np.int16), np.ones((4, 4, 4), np.int16)]
    root = tmp_path / "mixed"
    for i, volume in enumerate(volumes):
        save_nifti(root / ("x" if i % 2 else "y") / f"v{i}.nii.gz", volume)
    with pytest.raises(DatasetError, match=r"v3.nii.gz has 4x4x4 voxels .* but .*v1.nii.gz 2x2x2; pass --volume-shape"):
        load_dataset(replace(cfg, dataset=f"nifti:{root}"))
    data = load_dataset(replace(cfg, dataset=f"nifti:{root}", volume_shape="4x4x4", val_fraction=0, test_fraction=0))
    assert data.image_shape == (4, 4, 4)
    zyx = torch.from_numpy(small.transpose(2, 1, 0).astype(np.float32))[None, None]
    resampled = torch.nn.functional.interpolate(zyx, size=(4, 4, 4), mode="trilinear", align_corners=False)[0, 0]
    expected = torch.from_numpy(np.rint(resampled.numpy()).astype(np.int32))  # whole values stay whole; levels 0..
    assert any(torch.equal(image[0].int(), expected) for image in data.train.images)


def test_nifti_bad_files_are_one_line_errors(tmp_path, cfg, monkeypatch):
    def fails(root: Path, pattern: str, **changes) -> None:
        with pytest.raises(DatasetError, match=pattern) as e:
            load_dataset(replace(cfg, dataset=f"nifti:{root}", **changes))
        assert "\n" not in str(e.value)

    root = write_ct_folder(tmp_path / "ct", ct_volumes(n=4))
    (root / "scan1.nii").write_bytes(b"not a nifti file at all" * 20)
    fails(root, r"scan1.nii is not a readable NIfTI volume .*; replace it or remove it")
    save_nifti(root / "scan1.nii", np.zeros((6, 5, 4, 2), np.int16))  # two channels among one-channel volumes
    fails(root, r"scan1.nii has 2 channel\(s\) but .*scan0.nii.gz 1; store every volume with the same channels")
    (root / "scan1.nii").unlink()
    fails(root, r"labels.csv line 3 lists scan1.nii, which does not exist \(paths are relative to")
    (root / "labels.csv").write_text("file,class\nscan0.nii.gz,a\n")
    fails(root, r"labels.csv has the columns file, class; its first line must name the columns path \(or file\), label")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", r"holds neither labels.csv \(file,label\[,split\]\) nor class folders")
    (tmp_path / "empty" / "a").mkdir()
    fails(tmp_path / "empty", r"class folder .*a holds no .nii or .nii.gz volumes")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # as if ddcnn[medical] were not installed
    fails(root, r"read with nibabel, which is not installed: pip install ddcnn\[medical\]")


# --------------------------------------------------------------------------------------------------------- csv


def write_png16(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def test_csv_of_paths_keeps_12_bit_levels_through_the_cache(tmp_path, cfg):
    rng = np.random.default_rng(0)
    twelve_bit = [rng.integers(0, 4096, (8, 8)) for _ in range(6)]
    twelve_bit[0] = np.arange(4096).reshape(64, 64)[::8, ::8]  # 64 of the 4,096 levels; their high bytes: 16
    rows = ["path,label,split"]
    for i, values in enumerate(twelve_bit):
        write_png16(tmp_path / "xray" / f"{i}.png", values)
        rows.append(f"xray/{i}.png,{'b' if i % 2 else 'a'},{'test' if i == 5 else 'train'}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    spec = replace(cfg, dataset=f"csv:{tmp_path / 'list.csv'}")
    data = load_dataset(spec)
    assert (len(data.train) + len(data.val), len(data.test), data.class_names) == (5, 1, ["a", "b"])
    stored = np.load(entry_of(tmp_path / "cache", "csv") / "train_images.npy")
    assert stored.dtype == np.uint16 and data.intensity.levels == 65535
    assert sorted(map(tuple, stored.reshape(len(stored), -1))) == sorted(tuple(v.reshape(-1)) for v in twelve_bit[:5])
    assert len(np.unique(stored[0])) == 64  # not squashed to the 16 levels of their high byte
    recorded = json.loads((entry_of(tmp_path / "cache", "csv") / manifest.MANIFEST).read_text())["meta"]
    assert (recorded["intensity"], recorded["dtype"]) == ("auto", "uint16")
    assert "uint16" in describe_dataset(spec.dataset, spec)


def test_csv_bad_rows_are_one_line_errors(tmp_path, cfg):
    write_png16(tmp_path / "a.png", np.zeros((4, 4)))

    def fails(text: str, pattern: str) -> None:
        (tmp_path / "list.csv").write_text(text)
        with pytest.raises(DatasetError, match=pattern) as e:
            load_dataset(replace(cfg, dataset=f"csv:{tmp_path / 'list.csv'}"))
        assert "\n" not in str(e.value)

    fails("", r"list.csv has no header; its first line must name the columns path \(or file\), label")
    fails("path,diagnosis\na.png,x\n", r"has the columns path, diagnosis; its first line must name")
    fails("path,label\n", r"list.csv lists no images; add one row per image")
    fails("path,label\nmissing.png,x\n", r"line 2 lists missing.png, which does not exist")
    fails("path,label\na.png,\n", r"line 2 has no label; fill it in or remove the line")
    fails("path,label,split\na.png,x,training\n", r"line 2 has the split 'training'; use train, val")
    fails("path,label,split\na.png,x,test\n", r"has no row of split train")


# ------------------------------------------------------------------------------------------------- intensities


def test_int16_hounsfield_window_gives_exact_levels(tmp_path, cfg):
    hu = np.array([-3000, -1000, -650, -300 + 350, 400, 2500], dtype=np.int16)  # below, at and inside, above
    x = np.tile(hu, (8, 6, 1)).reshape(8, 6, 6)
    np.savez(tmp_path / "ct.npz", x=x, y=np.arange(8) % 2)
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'ct.npz'}", intensity="window:-1000,400"))
    # (hu + 1000) / 1400 of 65535 levels, clipped: -650 HU is a quarter (16383.75), 50 HU three quarters (49151.25)
    assert data.train.images[0, 0, 0].tolist() == [0, 0, 16384, 49151, 65535, 65535]
    assert data.intensity == Intensity("window:-1000,400", -1000.0, 400.0, 65535, "int16")
    narrow = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'ct.npz'}", intensity="window:-100,155"))
    assert narrow.train.images.dtype == torch.uint8  # 255 whole values in the window: 8 bits keep every level
    assert narrow.train.images[0, 0, 0].tolist() == [0, 0, 0, 150, 255, 255]
    assert load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'ct.npz'}", intensity="none")).intensity.low == -32768
    np.savez(tmp_path / "float.npz", x=x + np.float32(0.5), y=np.arange(8) % 2)  # not whole: no 16-bit range fits
    with pytest.raises(DatasetError, match=r"values in \[-2999.5, 2500.5\], which --intensity none has no fixed"):
        load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'float.npz'}", intensity="none"))
    big = np.concatenate([x.astype(np.int32), np.full((1, 6, 6), 70000)])  # beyond 16 bits: auto takes min..max
    got = resolve_intensity("auto", {"x": big}, ["x"], "big")
    assert (got.low, got.high, got.levels) == (-3000.0, 70000.0, 65535)


def test_percentile_window_from_the_train_values(tmp_path, cfg):
    values = np.random.default_rng(0).normal(300.0, 50.0, (10, 8, 8)).astype(np.float32)
    got = resolve_intensity("percentile:1,99", {"train": values, "test": values * 10}, ["train"], "mri")
    assert (got.low, got.high) == tuple(np.percentile(values.astype(np.float64), [1, 99]))
    assert got.levels == 65535 and got.source_dtype == "float32"
    with pytest.raises(DatasetError, match=r"gives the window 0..0 \(the train values are mostly 0\)"):
        resolve_intensity("percentile:1,99", {"train": np.zeros((4, 4))}, ["train"], "masks")
    for bad in ("window:400,-1000", "percentile:1,101", "gamma", "window:a,b"):
        with pytest.raises(ConfigError, match="intensity must be one of auto, none, window:LO,HI"):
            DataConfig(intensity=bad)
    with pytest.raises(ConfigError, match="volume_shape must be three positive voxel counts"):
        DataConfig(volume_shape="64x64")
    with pytest.raises(ConfigError, match=r"--intensity window:0,100 has no effect on mnist5k"):
        load_dataset(replace(cfg, intensity="window:0,100"))


def test_a_changed_transform_rebuilds_the_cache_and_a_stale_entry_is_refused(tmp_path, cfg, caplog):
    root = write_ct_folder(tmp_path / "ct", ct_volumes(n=4))
    auto = load_dataset(replace(cfg, dataset=f"nifti:{root}"))
    window = load_dataset(replace(cfg, dataset=f"nifti:{root}", intensity="window:-1000,400"))
    assert not torch.equal(auto.train.images, window.train.images)
    entries = sorted((tmp_path / "cache" / "nifti").iterdir())
    made_with = [json.loads((e / manifest.MANIFEST).read_text())["meta"] for e in entries]
    assert sorted(m["intensity"] for m in made_with) == ["auto", "window:-1000,400"]
    assert {m["dtype"] for m in made_with} == {"uint16"}
    # an entry whose manifest records another transform than its key promises is stale: rebuilt, never read
    (auto_entry,) = [e for e, m in zip(entries, made_with) if m["intensity"] == "auto"]
    record = json.loads((auto_entry / manifest.MANIFEST).read_text())
    record["meta"]["intensity"] = "window:0,1"
    (auto_entry / manifest.MANIFEST).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        again = load_dataset(replace(cfg, dataset=f"nifti:{root}"))
    assert any("stale" in r.getMessage() and str(auto_entry) in r.getMessage() for r in caplog.records)
    assert torch.equal(again.train.images, auto.train.images)


def test_inference_on_raw_int16_equals_the_training_transform(tmp_path, cfg):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1200, 1500, (24, 16, 16)).astype(np.int16)
    np.savez(tmp_path / "ct.npz", x=hu, y=np.arange(24) % 2)
    data = load_dataset(replace(cfg, dataset=f"npz:{tmp_path / 'ct.npz'}", intensity="window:-1000,400"))
    spec = ModelSpec(
        kind="local_cnns",
        backbone="vgg3",
        grid=(1, 1),
        image_shape=data.image_shape,
        in_channels=1,
        num_classes=2,
        width=0.25,
        class_names=tuple(data.class_names),
        mean=data.mean,
        std=data.std,
        intensity=data.intensity.to_dict(),
    )
    torch.manual_seed(0)
    classifier = Classifier(spec.build().eval(), spec)
    loader = make_loader(data.test, batch_size=64, train=False, cfg=cfg, mean=data.mean, std=data.std, device="cpu")
    ((x, _),) = list(loader)
    test_rows = _rows_of(hu, data)  # in the order of the split, as the loader yields them
    raw = torch.from_numpy(hu[test_rows][:, None])
    assert torch.equal(classifier.normalise(raw), x)  # to the bit: the same float32 operations
    with torch.no_grad():
        assert torch.equal(classifier(raw), classifier.model(x).softmax(-1).mean(1))
    np.save(tmp_path / "scan.npy", hu[test_rows[0]])  # predict reads .npy files raw for such a model
    pixels = read_image(tmp_path / "scan.npy", 1, data.image_shape, classifier.intensity)
    assert pixels.dtype == np.int16 and torch.equal(classifier.normalise(torch.from_numpy(pixels[None])), x[:1])


def _rows_of(hu: np.ndarray, data) -> list[int]:
    """The rows of ``hu`` that became the test split (found by their levels)."""
    levels = data.intensity.apply(hu[:, None])
    return [i for i in range(len(hu)) if any(torch.equal(torch.from_numpy(levels[i]), t) for t in data.test.images)]
