"""Interrupted runs lose nothing: SIGKILL mid-epoch then --resume, and SIGTERM, give the uninterrupted model."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddcnn.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    rng = np.random.default_rng(0)
    n = 800
    y = np.arange(n) % 2
    x = rng.integers(0, 100, (n, 16, 16)).astype(np.uint8)
    x[y == 1, 4:12, 4:12] = 255
    np.savez(path, x=x, y=y)
    return path


# Runs ddcnn's command line with a callback that, at step 3 of epoch 2, writes a marker file and then waits for
# SIGTERM or SIGKILL: the test interrupts the run exactly there, on that event, however fast or slow the machine.
# SIGTERM is blocked while the marker is written, so it cannot arrive before the wait; once it has, it is raised
# again, unblocked, for the Trainer's own handler (which saves the checkpoint at the end of that step).
PAUSING_RUN = """
import pathlib, signal, sys
from ddcnn.cli import main
from ddcnn.train import Callback

class PauseMidEpoch(Callback):
    def on_step_end(self, trainer):
        if (trainer.epoch, trainer.step) == (1, 3):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            pathlib.Path(sys.argv[1]).write_text("paused")
            signal.sigwait({signal.SIGTERM})
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.raise_signal(signal.SIGTERM)

sys.exit(main(sys.argv[2:], callbacks=[PauseMidEpoch()]))
"""


def _arguments(dataset, out, *more):
    return ["train", "--method", "local", "--grid", "2x2", "--dataset", f"npz:{dataset}", "--backbone", "vgg3",
            "--width", "0.5", "--epochs", "3", "--batch-size", "16", "--threads", "1", "--out", str(out),
            "--no-progress", "--cache-dir", str(out.parent / "cache"), *more]


def _command(dataset, out, *more):
    return [sys.executable, "-m", "ddcnn", *_arguments(dataset, out, *more)]


def _paused_run(dataset, out, marker: Path, **popen) -> subprocess.Popen:
    """The run of :func:`_command`, which pauses at step 3 of epoch 2 once ``marker`` exists."""
    return subprocess.Popen(
        [sys.executable, "-c", PAUSING_RUN, str(marker), *_arguments(dataset, out)], env=_env(), **popen
    )


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll for the event ``path`` (the run writes it and then waits); ``timeout`` only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before it paused"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _weights(run: Path) -> dict:
    state = load_checkpoint(run / "local.pt")
    assert state["finished"]
    return state["model"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_command(dataset, out), env=_env(), check=True, capture_output=True)
    return _weights(out)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_sigkill_mid_epoch_then_resume(dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = _paused_run(dataset, out, tmp_path / "paused", stderr=subprocess.DEVNULL)
    _wait_for(tmp_path / "paused", process)  # step 3 of epoch 2: epoch 1's checkpoint is the last one
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = load_checkpoint(out / "local.pt")
    assert not state["finished"] and (state["epoch"], state["step"]) == (1, 0)
    subprocess.run(_command(dataset, out, "--resume"), env=_env(), check=True, capture_output=True)
    _assert_same(uninterrupted, _weights(out))


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = _paused_run(dataset, out, tmp_path / "paused", stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "paused", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "run again with --resume" in err
    state = load_checkpoint(out / "local.pt")
    assert (state["epoch"], state["step"]) == (1, 3)  # saved where it stopped, mid-epoch
    subprocess.run(_command(dataset, out, "--resume"), env=_env(), check=True, capture_output=True)
    _assert_same(uninterrupted, _weights(out))
