"""Shared fixtures: a tiny learnable dataset as an .npz file, and run configurations that train in seconds."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ddcnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig


def write_tiny_npz(
    path: Path, n: int = 150, shape: tuple[int, ...] = (16, 16), classes: int = 3, seed: int = 0
) -> Path:
    """``n`` noisy gray images (or volumes) whose class is a bright block at a class-dependent place."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 80, size=(n, *shape), dtype=np.uint8)
    block = [s // 4 for s in shape]
    for k in range(classes):
        corner = [(k * s // classes) for s in shape]
        where = tuple(slice(c, c + b) for c, b in zip(corner, block))
        images[(labels == k, *where)] = 255
    np.savez(path, x=images, y=labels, class_names=np.array(["a", "b", "c"][:classes]))
    return path


@pytest.fixture(scope="session")
def make_npz():
    """:func:`write_tiny_npz`, for tests that need other sizes or volumes."""
    return write_tiny_npz


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    return write_tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="session")
def tiny_data_config(tiny_npz, tmp_path_factory) -> DataConfig:
    """150 images of 16x16: 108 train, 12 val, 30 test."""
    return DataConfig(
        dataset=f"npz:{tiny_npz}", batch_size=16, eval_batch_size=64, crop_padding=1,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )


@pytest.fixture
def tiny_run(tiny_data_config):
    """``tiny_run(out, **changes)``: a RunConfig of a vgg3 at width 0.25 on a 2x2 grid, 1 epoch per phase."""

    def make(out: Path, **changes) -> RunConfig:
        model = ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2), dnn_hidden=(16,))
        train = TrainConfig(epochs=1, progress=False, threads=None)
        cfg = RunConfig(out=str(out), data=tiny_data_config, model=model, train=train, aggregator_epochs=3)
        for key, value in changes.items():
            section, _, field = key.rpartition("__")  # model__grid=(4, 4) sets cfg.model.grid
            setattr(getattr(cfg, section) if section else cfg, field, value)
        return cfg

    return make


def one_phase_results(run_dir: Path) -> dict:
    """The ``results.json`` of a run folder that holds one phase, as ``{"rows", "config", "history"}``."""
    import json

    results = json.loads((Path(run_dir) / "results.json").read_text())
    ((phase,),) = [list(results["phases"].values())]
    return {"rows": results["rows"], "config": phase["config"], "history": phase["history"]}


is_root = getattr(os, "geteuid", lambda: -1)() == 0


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``folder`` (created) for the block, unmounted after it; skips the test unless root may
    mount one."""
    if not is_root or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    folder.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def train_global_and_aggregation(data: DataConfig, tmp_path_factory) -> dict[str, Path]:
    """Run folders of a global CNN and of a CNN-DNN (dnn aggregator on 2x2 local CNNs, 1 epoch) on ``data``, for
    the tests of what reads trained models (evaluate, predict, load, export); a module fixture each, as some
    tests change the folders."""
    from ddcnn.methods import run

    folders = {}
    for method in ("global", "aggregation"):
        out = tmp_path_factory.mktemp(method)
        run(RunConfig(method=method, out=str(out), data=data, train=TrainConfig(epochs=1, progress=False),
                      model=ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2), dnn_hidden=(16,))))
        folders[method] = out
    return folders
