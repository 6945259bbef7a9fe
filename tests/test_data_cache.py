"""Tests of ddcnn.data.cache: entries check themselves (size, sha256) and are rebuilt when damaged; a full disk, a
read-only or impossible cache folder and runs killed mid-write end in one-line errors and leave nothing behind.

The real full-disk tests mount a 256 KiB tmpfs (root only, skipped otherwise); the others inject the errors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddcnn.config import DataConfig
from ddcnn.data import cache, decode, load_dataset, manifest
from ddcnn.data.loader import _MemmapBatches
from ddcnn.errors import CacheNotWritableError, DatasetError, DiskFullError

from conftest import is_root, tmpfs



def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_tree(root: Path, per_class: int = 4, size: int = 8) -> Path:
    """An ImageFolder tree ``root/<a|b>/<i>.png`` of random RGB images."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "tree")


@pytest.fixture
def cfg(tmp_path: Path, tree: Path) -> DataConfig:
    return DataConfig(dataset=f"imagefolder:{tree}", cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The paths of the images decoded, in order."""
    paths: list[str] = []
    real = decode.decode_raw

    def counting(path, *args):
        paths.append(path)
        return real(path, *args)

    monkeypatch.setattr(decode, "decode_raw", counting)
    return paths


def only_entry(folder: Path) -> Path:
    (entry,) = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return entry


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


def all_images(data) -> torch.Tensor:
    """Every split's images, copied (a streamed split is a memmap of the cache file)."""
    splits = (data.train.images, data.val.images, data.test.images)
    return torch.cat([x.clone() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x)) for x in splits])


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 256 KiB tmpfs."""
    with tmpfs(tmp_path / "full", "size=256k") as folder:
        yield folder


# ------------------------------------------------------------------------------------------------ the manifest


def test_entry_records_every_file_size_and_sha256(cfg, tmp_path, decoded, caplog):
    first = load_dataset(cfg)
    entry = only_entry(tmp_path / "cache" / "imagefolder")
    files = json.loads((entry / manifest.MANIFEST).read_text())["files"]
    assert sorted(files) == ["meta.json", "train_images.npy", "train_labels.npy"]
    for name, record in files.items():
        content = (entry / name).read_bytes()
        assert (record["size"], record["sha256"]) == (len(content), hashlib.sha256(content).hexdigest())
    assert manifest.entry_problem(entry) is None
    assert temporaries(tmp_path / "cache") == []
    with caplog.at_level(logging.WARNING):
        again = load_dataset(cfg)  # an intact entry is read: not decoded again, no warning
    assert len(decoded) == 8 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert torch.equal(all_images(again), all_images(first))


def _truncate(entry: Path) -> None:
    path = entry / "train_images.npy"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_byte(entry: Path) -> None:
    path = entry / "train_images.npy"
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF
    path.write_bytes(content)


def _zero(entry: Path) -> None:
    path = entry / "train_images.npy"
    content = path.read_bytes()
    path.write_bytes(content[:128] + bytes(len(content) - 128))  # the header kept, every pixel black


DAMAGE = {
    "truncated": (_truncate, "train_images.npy has"),
    "edited": (_flip_a_byte, "train_images.npy does not match the sha256"),
    "zeroed": (_zero, "train_images.npy does not match the sha256"),
    "meta.json removed": (lambda entry: (entry / "meta.json").unlink(), "meta.json is missing"),
    "manifest removed": (lambda entry: (entry / manifest.MANIFEST).unlink(), f"has no {manifest.MANIFEST}"),
    "manifest garbled": (lambda entry: (entry / manifest.MANIFEST).write_text("{"), "cannot be read"),
    "file added": (lambda entry: (entry / "x.npy").write_bytes(b"x"), "x.npy was added"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_named_removed_and_rebuilt_never_read(damage, cfg, tmp_path, decoded, caplog):
    damage_entry, problem = DAMAGE[damage]
    expected = all_images(load_dataset(cfg))
    entry = only_entry(tmp_path / "cache" / "imagefolder")
    damage_entry(entry)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load_dataset(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and problem in warnings[0]
    assert len(decoded) == 2 * 8  # decoded again from the source
    assert torch.equal(all_images(again), expected)
    assert manifest.entry_problem(entry) is None and temporaries(tmp_path / "cache") == []


def test_streamed_split_entry_is_checked_too(make_npz, tmp_path, caplog):
    cfg = DataConfig(
        dataset=f"npz:{make_npz(tmp_path / 'tiny.npz')}", cache_dir=str(tmp_path / "cache"), max_memory_gb=1e-9
    )
    expected = all_images(load_dataset(cfg))
    entry = only_entry(tmp_path / "cache" / "streams")
    _zero(entry)
    with caplog.at_level(logging.WARNING):
        again = load_dataset(cfg)
    assert any(str(entry) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert torch.equal(all_images(again), expected)


def test_extracted_archive_entry_is_checked_too(tree, tmp_path, caplog):
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="tree")
    cfg = DataConfig(dataset=f"imagefolder:{archive}", cache_dir=str(tmp_path / "cache"))
    expected = all_images(load_dataset(cfg))
    extracted = only_entry(tmp_path / "cache" / "extracted")
    image = next(extracted.rglob("*.png"))
    image.write_bytes(image.read_bytes()[:20])
    with caplog.at_level(logging.WARNING):
        again = load_dataset(cfg)
    assert any(str(extracted) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert torch.equal(all_images(again), expected)


def test_large_entries_hash_only_files_whose_stamp_changed(cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(manifest, "FULL_CHECK_BYTES", 0)
    hashed: list[Path] = []
    real_sha256 = manifest._sha256
    monkeypatch.setattr(manifest, "_sha256", lambda path: hashed.append(path) or real_sha256(path))
    expected = all_images(load_dataset(cfg))
    entry = only_entry(tmp_path / "cache" / "imagefolder")
    hashed.clear()
    load_dataset(cfg)
    assert hashed == []  # sizes and stamps only
    copy = entry / ".copy"
    shutil.copyfile(entry / "meta.json", copy)
    os.replace(copy, entry / "meta.json")  # the same content in a new inode: hashed once, then its stamp renewed
    load_dataset(cfg)
    assert hashed == [entry / "meta.json"]
    load_dataset(cfg)
    assert hashed == [entry / "meta.json"]
    content = bytearray((entry / "train_images.npy").read_bytes())
    content[-1] ^= 0xFF
    copy.write_bytes(content)
    os.replace(copy, entry / "train_images.npy")
    with caplog.at_level(logging.WARNING):
        again = load_dataset(cfg)
    assert any("does not match the sha256" in r.getMessage() for r in caplog.records)
    assert torch.equal(all_images(again), expected)


# --------------------------------------------------------------------------------------------------- full disk


_STREAM_ONTO = """
import sys
from ddcnn.config import DataConfig
from ddcnn.data import load_dataset
from ddcnn.errors import DDCNNError
try:
    load_dataset(DataConfig(dataset="npz:" + sys.argv[1], cache_dir=sys.argv[2], max_memory_gb=1e-9))
except DDCNNError as e:
    sys.exit(f"ddcnn: error: {e}")
"""


@pytest.mark.parametrize("writer", ["decoding", "streaming"])
def test_writing_onto_a_full_disk_is_one_line_and_leaves_nothing(writer, full_disk, make_npz, tmp_path):
    """In a child process, as before the fix both died of SIGBUS (and left their temporary folder behind)."""
    if writer == "decoding":  # through the CLI; its default cache, ~/.cache/ddcnn, on the tmpfs
        write_tree(tmp_path / "big", per_class=20)  # 40 images of 3 x 64 x 64: 480 KiB of staging > 256 KiB
        command = ["-m", "ddcnn", "datasets", f"imagefolder:{tmp_path / 'big'}", "--image-size", "64"]
        full_folder = full_disk / ".cache" / "ddcnn" / "imagefolder"
    else:
        npz = make_npz(tmp_path / "big.npz", n=2000)  # 2000 x 16 x 16: 512 KB of images to stream
        command, full_folder = ["-c", _STREAM_ONTO, str(npz), str(full_disk)], full_disk / "streams"
    env = {**os.environ, "HOME": str(full_disk), "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    done = subprocess.run([sys.executable, *command], check=False, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("ddcnn: error:")]
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-3000:]
    assert f"the cache folder {full_folder} is full (No space left on device)" in errors[0]
    assert "free space" in errors[0] and "--cache-dir" in errors[0]
    assert list(full_folder.iterdir()) == [] and shutil.disk_usage(full_disk).used < 16 * 1024


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_while_decoding_is_one_line_and_leaves_nothing(code, cfg, tmp_path, monkeypatch):
    def full(f, size):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache, "_allocate", full)
    with pytest.raises(DiskFullError) as caught:
        load_dataset(cfg)
    message = str(caught.value)
    assert "\n" not in message and f"{tmp_path / 'cache' / 'imagefolder'} is full ({os.strerror(code)})" in message
    assert "free space" in message and "--cache-dir" in message
    assert list((tmp_path / "cache" / "imagefolder").iterdir()) == []


def test_disk_full_while_streaming_leaves_nothing(make_npz, tmp_path, monkeypatch):
    cfg = DataConfig(dataset=f"npz:{make_npz(tmp_path / 'tiny.npz')}", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_write_block", no_space)
    with pytest.raises(DiskFullError, match="streams is full"):
        load_dataset(replace(cfg, max_memory_gb=1e-9))
    assert list((tmp_path / "cache" / "streams").iterdir()) == []


def test_disk_full_while_extracting_is_disk_full_not_a_damaged_archive(tree, tmp_path, monkeypatch):
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="tree")
    monkeypatch.setattr(tarfile.TarFile, "extractall", no_space)
    cfg = DataConfig(dataset=f"imagefolder:{archive}", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DiskFullError, match="extracted is full"):
        load_dataset(cfg)
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []


def test_staging_files_are_allocated_not_sparse(tmp_path):
    array = cache.allocate_npy(tmp_path / "a.npy", np.uint8, (64, 3, 32, 32))
    assert array.shape == (64, 3, 32, 32) and not array.any()
    assert os.stat(tmp_path / "a.npy").st_blocks * 512 >= array.nbytes
    source = np.arange(5 * 7, dtype=np.int32).reshape(5, 7)
    cache.save_rows(tmp_path / "b.npy", source, np.array([4, 0, 2]))
    assert np.array_equal(np.load(tmp_path / "b.npy"), source[[4, 0, 2]])


# ------------------------------------------------------------------------------------------ unwritable caches


def test_cache_dir_below_a_file_is_one_line_before_decoding(tmp_path, tree, decoded):
    (tmp_path / "file").write_text("not a folder")
    cfg = DataConfig(dataset=f"imagefolder:{tree}", cache_dir=str(tmp_path / "file" / "cache"))
    expected = r"is not writable \(part of that path is a file\); pass a writable --cache-dir"
    with pytest.raises(CacheNotWritableError, match=expected):
        load_dataset(cfg)
    assert decoded == []


def test_read_only_file_system_is_one_line_before_decoding(tmp_path, tree, decoded):
    """What root, which ignores permission bits, meets: a read-only mount."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        cfg = DataConfig(dataset=f"imagefolder:{tree}", cache_dir=str(folder))
        with pytest.raises(CacheNotWritableError, match=r"ro/imagefolder is not writable \(Read-only file system"):
            load_dataset(cfg)
    assert decoded == []


@pytest.mark.skipif(is_root, reason="root ignores permission bits: a chmod 0o500 folder stays writable to it")
def test_read_only_cache_dir_is_one_line_before_decoding(tmp_path, tree, decoded):
    (tmp_path / "ro").mkdir(mode=0o500)
    cfg = DataConfig(dataset=f"imagefolder:{tree}", cache_dir=str(tmp_path / "ro"))
    try:
        with pytest.raises(CacheNotWritableError, match=r"ro/imagefolder is not writable.*--cache-dir"):
            load_dataset(cfg)
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert decoded == []


# ---------------------------------------------------------------------------------------- killed runs' leftovers


def _temporary(folder: Path, name: str, *, lock: bool, days_old: float = 0) -> Path:
    tmp = folder / f".{name}.abc123.tmp"
    tmp.mkdir(parents=True)
    (tmp / "train_staging.npy").write_bytes(b"partial")
    if lock:
        (tmp / ".ddcnn-lock").touch()
    for path in (tmp / "train_staging.npy", tmp):
        when = os.stat(path).st_mtime - days_old * 86400
        os.utime(path, (when, when))
    return tmp


def test_temporaries_of_killed_runs_are_removed_when_the_cache_is_next_used(cfg, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    folder = tmp_path / "cache" / "imagefolder"
    killed = _temporary(folder, "killed", lock=True)  # its run died, so nobody holds the lock
    running = _temporary(folder, "running", lock=True)
    old = _temporary(folder, "old", lock=False, days_old=2)  # an older ddcnn's, untouched for two days
    recent = _temporary(folder, "recent", lock=False, days_old=0.5)
    fd = os.open(running / ".ddcnn-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as its (live) run does
        load_dataset(cfg)
        assert not killed.exists() and not old.exists()
        assert running.is_dir() and recent.is_dir()
    finally:
        os.close(fd)
    cache.remove_stale_temporaries(folder)
    assert not running.exists() and recent.is_dir()


def test_a_writing_run_holds_its_lock_and_leaves_it_out_of_the_entry(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    final = tmp_path / "cache" / "streams" / "entry"
    with cache.atomic_dir(final) as tmp:
        (tmp / "x.npy").write_bytes(b"x")
        assert cache.remove_stale_temporaries(final.parent) == []
        fd = os.open(tmp / ".ddcnn-lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert sorted(p.name for p in final.iterdir()) == [manifest.MANIFEST, "x.npy"]
    assert cache.verified_entry(final) and temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------ loader workers


def test_a_worker_reopening_a_vanished_cache_file_gets_a_dataset_error(tmp_path):
    cache.save_rows(tmp_path / "x.npy", np.zeros((4, 1, 2, 2), np.uint8), np.arange(4))
    batches = _MemmapBatches(np.load(tmp_path / "x.npy", mmap_mode="r"), torch.zeros(4, dtype=torch.int64))
    in_worker = pickle.loads(pickle.dumps(batches))  # what a spawned worker receives: the path, not the array
    (tmp_path / "x.npy").unlink()
    with pytest.raises(DatasetError, match="vanished or was damaged while in use"):
        in_worker[torch.tensor([0, 1])]
