"""ddcnn.train.tensorboard: every epoch's numbers as TensorBoard scalars, from the library and from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddcnn.cli import main
from ddcnn.methods import run
from ddcnn.train.tensorboard import TensorBoard, scalars

pytest.importorskip("tensorboard")


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files in ``folder``, by tag, as (step, value); skips without tensorboard's reader."""
    files = list(folder.glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.skip("tensorboard's event_accumulator cannot be imported: the event files exist, their content unread")
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_epoch_of_every_phase_is_written(tmp_path, tiny_run):
    cfg = tiny_run(tmp_path / "run", method="aggregation", aggregator="dnn", aggregator_epochs=2)
    run(cfg, callbacks=[TensorBoard(tmp_path / "tb")])
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["dnn", "local"]
    local = read_scalars(tmp_path / "tb" / "local")
    for tag in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_second"):
        assert [step for step, _ in local[tag]] == [1], tag
    assert {f"train_subdomain_accuracy/{i}" for i in range(4)} <= set(local)
    assert {f"val_subdomain_accuracy/{i}" for i in range(4)} <= set(local)
    assert 0 <= local["val_accuracy"][0][1] <= 1
    dnn = read_scalars(tmp_path / "tb" / "dnn")
    assert [step for step, _ in dnn["train_loss"]] == [1, 2]


def test_the_tensorboard_flag_of_train_names_runs_after_the_run_folder(tmp_path, tiny_data_config):
    argv = ["train", "--method", "global", "--dataset", tiny_data_config.dataset, "--cache-dir",
            tiny_data_config.cache_dir, "--backbone", "vgg3", "--width", "0.25", "--epochs", "1", "--no-progress",
            "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]
    assert main(argv) == 0
    assert "train_loss" in read_scalars(tmp_path / "tb" / "global")


def test_scalars_of_a_row():
    row = {"phase": "local", "epoch": 3, "train_loss": 0.5, "lr": 0.1, "train_subdomain_accuracy": [0.25, 0.75],
           "early_stop": True, "note": "text"}
    assert scalars(row) == {"train_loss": 0.5, "lr": 0.1, "train_subdomain_accuracy/0": 0.25,
                            "train_subdomain_accuracy/1": 0.75}
