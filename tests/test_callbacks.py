"""ddcnn.train.callbacks: every phase's training reports its events to the callbacks given to run()."""

from __future__ import annotations

from ddcnn.methods import run
from ddcnn.train import Callback


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None):
        self.events: list[tuple] = []
        self.stop_after = stop_after

    def on_fit_start(self, trainer):
        self.events.append(("start", trainer.desc))

    def on_step_end(self, trainer):
        self.events.append(("step", trainer.desc, trainer.epoch, trainer.step))

    def on_epoch_end(self, trainer, row):
        self.events.append(("epoch", trainer.desc, row["epoch"]))
        return self.stop_after is not None and row["epoch"] >= self.stop_after

    def on_fit_end(self, trainer, result):
        self.events.append(("end", trainer.desc, len(result.history)))


def test_callbacks_receive_every_phase_epoch_and_step(tmp_path, tiny_run):
    recorder = Recorder()
    cfg = tiny_run(tmp_path, method="transfer", train__epochs=2, local_epochs=1, aggregator_epochs=2, transfer_aggregator=True)
    run(cfg, callbacks=[recorder])
    phases = [e[1] for e in recorder.events if e[0] == "start"]
    assert phases == ["local", "dnn", "transfer"]  # the local phase, the aggregator it transfers, the whole model
    epochs = [(e[1], e[2]) for e in recorder.events if e[0] == "epoch"]
    assert epochs == [("local", 1), ("dnn", 1), ("dnn", 2), ("transfer", 1), ("transfer", 2)]
    assert [e for e in recorder.events if e[0] == "end"] == [("end", "local", 1), ("end", "dnn", 2),
                                                           ("end", "transfer", 2)]
    local_steps = [e[3] for e in recorder.events if e[:3] == ("step", "local", 0)]
    assert local_steps == list(range(1, len(local_steps) + 1)) and local_steps  # every step, in order


def test_a_callback_can_end_training_after_an_epoch(tmp_path, tiny_run):
    recorder = Recorder(stop_after=1)
    result = run(tiny_run(tmp_path, method="local", train__epochs=3), callbacks=[recorder, Recorder()])
    assert [e[2] for e in recorder.events if e[0] == "epoch"] == [1] and len(result.history) == 1
