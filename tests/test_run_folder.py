"""ddcnn.run_folder: one run per folder, resume refuses a changed configuration, atomic outputs that survive a
full disk, and results kept across the phases written into one folder."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddcnn.cli import main
from ddcnn.compare import CompareConfig, compare
from ddcnn.config import ModelConfig, TrainConfig
from ddcnn.errors import ConfigError, DiskFullError
from ddcnn.methods import run
from ddcnn.run_folder import LOCK_NAME, read_results, resume_conflicts, run_folder_lock
from ddcnn import checkpoint

from conftest import tmpfs

ROOT = Path(__file__).resolve().parents[1]


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (not the lock), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture
def local_run(tmp_path, tiny_run):
    """A finished local phase in ``tmp_path / "run"``: (its config, the folder's files)."""
    cfg = tiny_run(tmp_path / "run", method="local")
    run(cfg)
    return cfg, _contents(tmp_path / "run")


# -- resume -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, key",
    [
        ({"train": {"lr": 0.2}}, "train.lr"),
        ({"model": {"grid": (4, 4)}}, "model.grid"),
        ({"model": {"backbone": "vgg9"}}, "model.backbone"),
        ({"data": {"dataset": "mnist5k"}}, "data.dataset"),
        ({"train": {"epochs": 3}}, "train.epochs"),  # the onecycle schedule depends on them
    ],
)
def test_resume_refuses_a_changed_configuration_before_writing_anything(local_run, change, key):
    cfg, before = local_run
    changed = dataclasses.replace(cfg, resume=True)
    for section, values in change.items():
        setattr(changed, section, dataclasses.replace(getattr(cfg, section), **values))
    with pytest.raises(ConfigError, match=rf"--resume of .*local.pt with a changed configuration: {key} "):
        run(changed)
    assert _contents(Path(cfg.out)) == before  # config.yaml, results, logs and plots as they were


def test_resume_accepts_what_does_not_change_the_run(local_run):
    cfg, _ = local_run
    resumed = dataclasses.replace(
        cfg, resume=True, train=dataclasses.replace(cfg.train, threads=1, checkpoint_every=2, progress=False),
        data=dataclasses.replace(cfg.data, eval_batch_size=7),
    )
    assert run(resumed).method == "local"


def test_resume_takes_more_epochs_under_a_constant_schedule():
    recorded = {"train": {"schedule": "constant", "epochs": 1, "lr": 0.1}, "local_epochs": None}
    assert resume_conflicts(recorded, {"train": {"schedule": "constant", "epochs": 4, "lr": 0.1}}, "local") == []
    onecycle = {"train": {"schedule": "onecycle", "epochs": 1}}
    assert resume_conflicts(onecycle, {"train": {"schedule": "onecycle", "epochs": 4}}, "local") == ["train.epochs"]


def test_the_local_phase_is_compared_on_the_keys_it_depends_on():
    recorded = {"method": "local", "model": {"aggregator": "dnn", "grid": [2, 2]}}
    aggregation = {"method": "aggregation", "model": {"aggregator": "linear", "grid": [2, 2]}}
    assert resume_conflicts(recorded, aggregation, "local") == []
    assert resume_conflicts(recorded, aggregation, "coherent") == ["method", "model.aggregator"]


def test_resume_of_a_phase_built_on_the_local_phase_checks_the_local_checkpoint(local_run):
    cfg, before = local_run
    aggregation = dataclasses.replace(
        cfg, method="aggregation", resume=True, model=dataclasses.replace(cfg.model, width=0.5)
    )
    with pytest.raises(ConfigError, match="model.width 0.25 -> 0.5"):
        run(aggregation)
    assert _contents(Path(cfg.out)) == before


def test_compare_resume_refuses_a_changed_configuration_but_takes_more_seeds(tmp_path, tiny_data_config):
    cc = CompareConfig(
        out=str(tmp_path / "cmp"), grids=("2x2",), methods=("local", "mean"), epochs=1, data=tiny_data_config,
        model=ModelConfig(backbone="vgg3", width=0.25), train=TrainConfig(progress=False),
    )
    compare(cc)
    with pytest.raises(ConfigError, match=r"changed configuration \(train.lr\)"):
        compare(dataclasses.replace(cc, resume=True, train=TrainConfig(progress=False, lr=0.2)))
    more = compare(dataclasses.replace(cc, resume=True, seeds=(0, 1)))
    assert {row["seed"] for row in more.rows} == {0, 1}


# -- one run per folder -----------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from ddcnn.run_folder import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_in_a_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"  # the event: the other process holds the folder
        argv = ["train", "--method", "global", "--dataset", f"npz:{tiny_npz}", "--backbone", "vgg3", "--width",
                "0.25", "--epochs", "1", "--batch-size", "16", "--no-progress", "--cache-dir",
                str(tmp_path / "cache"), "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"ddcnn: error: run folder {out.resolve()} is in use by another ddcnn run (process "
                       f"{holder.pid}); wait for it to end, or choose another --out"]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no log, no config, nothing
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert main(argv) == 0  # the kernel released the lock of the killed process


def test_the_lock_is_re_entrant_within_a_process(tmp_path):
    with run_folder_lock(tmp_path / "run"), run_folder_lock(tmp_path / "run"):
        pass
    with run_folder_lock(tmp_path / "run"):  # released by the outer block
        pass


# -- atomic outputs and a full disk -----------------------------------------------------------------------------


class _NoSpace:
    """A file whose writes fail as on a full disk."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_an_atomic_file_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("previous")
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _NoSpace(fdopen(fd, mode)))
    with pytest.raises(DiskFullError, match=f"cannot write {path}: its disk is full"):
        checkpoint.atomic_write_text(path, "new")
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_checkpoint_on_a_full_disk_is_a_disk_full_error(tmp_path):
    torch = pytest.importorskip("torch")
    with tmpfs(tmp_path / "small", "size=64k") as folder:
        (folder / "local.pt").write_bytes(b"previous")
        with pytest.raises(DiskFullError, match="local.pt: its disk is full"):
            checkpoint.save_checkpoint({"model": torch.zeros(100_000)}, folder / "local.pt")  # 400 kB
        assert [p.name for p in folder.iterdir()] == ["local.pt"]
        assert (folder / "local.pt").read_bytes() == b"previous"


FILL_DISK_AFTER_FIRST_EPOCH = """
import pathlib, sys
from ddcnn.cli import main
from ddcnn.train import Callback

class FillDisk(Callback):
    def on_epoch_end(self, trainer, row):
        with open(pathlib.Path(sys.argv[1]) / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:  # full
                pass

sys.exit(main(sys.argv[2:], callbacks=[FillDisk()]))
"""


def test_a_full_disk_ends_a_run_with_one_line_and_keeps_the_previous_results(tmp_path, tiny_npz):
    """A first run fits on a small disk; a second phase in the same folder fills it up mid-training: it ends with
    one line, and the first run's results.json, config.yaml and plots are as they were, none of them torn."""
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        out = disk / "run"
        base = ["train", "--dataset", f"npz:{tiny_npz}", "--backbone", "vgg3", "--width", "0.25", "--batch-size",
                "16", "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--grid", "2x2"]
        assert main([*base, "--method", "local", "--epochs", "1"]) == 0
        before = _contents(out)
        command = [sys.executable, "-c", FILL_DISK_AFTER_FIRST_EPOCH, str(disk), *base, "--method", "coherent",
                   "--epochs", "2"]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        (disk / "filler").unlink()
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]  # the log goes there too
        assert len(errors) == 1 and errors[0].startswith("ddcnn: error: ") and "disk is full" in errors[0], errors
        assert "Traceback" not in done.stderr
        after = _contents(out)
        for name in ("results.json", "local.pt", "local_log.csv", "confusion_local.png", "curves_local.png"):
            assert after[name] == before[name], name
        assert after["train.log"].startswith(before["train.log"])
        assert yaml.safe_load(after["config.yaml"])["method"] == "coherent"  # rewritten whole before training
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# -- results of every phase -------------------------------------------------------------------------------------


def test_a_later_phase_keeps_the_earlier_phases_results(local_run):
    cfg, _ = local_run
    out = Path(cfg.out)
    run(dataclasses.replace(cfg, method="aggregation", pretrained=str(out), model=dataclasses.replace(cfg.model,
                                                                                                aggregator="mean")))
    results = read_results(out)
    assert [row["method"] for row in results["rows"]] == ["local", "mean"]
    assert set(results["phases"]) == {"local", "mean"} and results["phases"]["local"]["history"]
    run(cfg)  # the local phase again: its row is replaced, the aggregator's kept
    assert [row["method"] for row in read_results(out)["rows"]] == ["mean", "local"]


def test_results_of_the_first_release_are_converted(tmp_path):
    old = {"config": {"method": "local"}, "rows": [{"method": "local", "grid": "2x2"}], "history": [{"epoch": 1}]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    results = read_results(tmp_path)
    assert results["phases"] == {"local": {"config": {"method": "local"}, "history": [{"epoch": 1}]}}


def test_an_unreadable_results_json_is_set_aside_not_lost(tmp_path, caplog):
    (tmp_path / "results.json").write_text('{"rows": [')
    assert read_results(tmp_path) == {"rows": [], "phases": {}}
    assert (tmp_path / "results.json.unreadable").read_text() == '{"rows": ['
    assert "could not be read" in caplog.text


def test_a_configuration_of_the_first_release_resumes_under_today_s_names():
    recorded = {"method": "cnn_dnn", "dnn_epochs": 3, "train": {"schedule": "onecycle"}}
    current = {"method": "aggregation", "aggregator_epochs": 3, "crossfit_folds": 3, "train": {"schedule": "onecycle"}}
    assert resume_conflicts(recorded, current, "dnn") == []  # renamed keys, and an option added since at its default
    assert resume_conflicts(recorded, {**current, "crossfit_folds": 5}, "dnn") == ["crossfit_folds"]


def test_results_record_where_they_were_made(tmp_path):
    import platform

    import torch

    import ddcnn
    from ddcnn.run_folder import RESULTS_SCHEMA, write_results

    config = {"train": {"device": "cpu"}}
    write_results(tmp_path, {"method": "local", "grid": "2x2"}, config, [], {"name": "mnist5k"})
    results = json.loads((tmp_path / "results.json").read_text())
    made = results["provenance"]
    assert results["schema"] == RESULTS_SCHEMA and results["phases"]["local"]["provenance"] == made
    assert made["ddcnn"] == ddcnn.__version__ and made["torch"] == torch.__version__
    assert made["python"] == platform.python_version() and made["device"] == "cpu"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert made["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)


@pytest.mark.parametrize("failure", [FileNotFoundError("git"), subprocess.TimeoutExpired("git", 2)])
def test_provenance_without_git_is_none_not_an_error(monkeypatch, failure):
    from ddcnn import runtime

    def no_git(*args, **kwargs):
        raise failure

    runtime._git_commit.cache_clear()
    monkeypatch.setattr(runtime.subprocess, "run", no_git)
    try:
        assert runtime.provenance("cpu")["git_commit"] is None
    finally:
        runtime._git_commit.cache_clear()
