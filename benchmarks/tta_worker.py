"""The worker of the time-to-accuracy benchmark (``bench_time_to_accuracy.py``): trains one configuration with
ddcnn's library, evaluates the test split after every epoch and writes one record per epoch as JSON.

    python benchmarks/tta_worker.py SPEC.json                                                   # one process
    python -m torch.distributed.run --standalone --nproc-per-node=2 benchmarks/tta_worker.py SPEC.json

``SPEC.json`` holds ``config`` (a :class:`ddcnn.config.RunConfig` as a dict), ``target`` (the test accuracy that ends
training) and ``records`` (where rank 0 writes the output). A ``1x1`` grid trains the global CNN; any other grid
trains the CNN-DNN: the local phase and, after each of its epochs, the aggregation phase (``model.aggregator``) on
the local CNNs of that epoch's checkpoint, as :func:`ddcnn.phases.aggregation_phase` runs it after a finished local
phase. The aggregation works on the checkpoint (a snapshot) with the RNG states put back afterwards, so it leaves
the local training as it would have run without it.

Times, per epoch: ``train_seconds``, the training time of the epochs so far (the Trainer's, without evaluation,
checkpoints and start-up); for the CNN-DNN, ``aggregation_seconds``, what the aggregation phase at that epoch costs
(the local CNNs' probabilities on the training images and training the aggregator, as ddcnn counts it; not the
validation and test probabilities, which are evaluation). ``seconds`` is their sum: the time to that epoch's
accuracy. Evaluating the test split is not timed.

Optional keys of ``SPEC.json``, for the cluster benchmark (``cluster.py``): ``test_images`` (evaluate on a stratified
subset of the test split, for speed), ``max_epochs`` (stop after that many epochs whatever the accuracy, while the
schedule stays that of all ``config.train.epochs``), ``interface`` (a network interface of this process's node:
each record gets ``tx_bytes``, what it sent during that epoch's training steps, from its kernel counter), ``done``
(a path: each rank touches ``<done>.<rank>`` once the records are written, so that a launcher can tell a crash while
the process group is torn down from one during the measurement).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from ddcnn.checkpoint import rng_state, set_rng_state
from ddcnn.config import RunConfig, config_from_dict
from ddcnn.data import ImageSet
from ddcnn.data.splits import stratified_sample
from ddcnn.distributed import distributed_session
from ddcnn.phases import Experiment, aggregation_phase, count_parameters, train_local_cnns
from ddcnn.train.callbacks import Callback
from ddcnn.train.engine import Trainer
from ddcnn.train.evaluation import evaluate


class SentBytes(Callback):
    """What this node's ``interface`` sent during each epoch's training steps (its kernel's ``tx_bytes``), of the
    training of the global CNN or the local phase: counted from the start of training (then from the end of the
    last epoch's evaluation, :meth:`mark`) to the end of the epoch's last step."""

    def __init__(self, interface: str | None):
        self.path = Path(f"/sys/class/net/{interface}/statistics/tx_bytes") if interface else None
        self.start = self.last = 0

    def read(self) -> int:
        return int(self.path.read_text()) if self.path else 0

    def mark(self) -> None:
        self.start = self.last = self.read()

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.desc in ("global", "local"):
            self.mark()

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.desc in ("global", "local"):
            self.last = self.read()

    def epoch(self) -> int | None:
        return self.last - self.start if self.path else None


def global_cnn(exp: Experiment, target: float, stop: Stop) -> tuple[list[dict[str, Any]], int]:
    """Train the global CNN until its test accuracy reaches ``target`` (or for all epochs); the records and its
    parameter count."""
    decomposition = exp.decomposition((1,))
    parallel, test = exp.parallel(decomposition), exp.loader("test")
    records: list[dict[str, Any]] = []

    def epoch_end(trainer: Trainer, row: dict[str, Any]) -> bool:
        sent = stop.sent.epoch()
        accuracy = evaluate(trainer.model, test, exp.cfg.train, exp.device, parallel=parallel).accuracy
        records.append({**_record(row, trainer.train_seconds, accuracy), "tx_bytes": sent})
        stop.sent.mark()
        return accuracy >= target or stop.after(row["epoch"])

    model, _ = train_local_cnns(exp, decomposition, exp.cfg.train.epochs, "global", epoch_end)
    return records, count_parameters(model)


def cnn_dnn(exp: Experiment, target: float, stop: Stop) -> tuple[list[dict[str, Any]], int]:
    """Train the local phase, with the aggregation phase after every epoch, until the CNN-DNN's test accuracy
    reaches ``target`` (or for all epochs); the records and the CNN-DNN's parameter count."""
    decomposition = exp.decomposition()
    snapshot = dataclasses.replace(exp.cfg, pretrained=str(exp.run_dir / "local.pt"))  # written after every epoch
    records: list[dict[str, Any]] = []
    parameters = 0

    def epoch_end(trainer: Trainer, row: dict[str, Any]) -> bool:
        nonlocal parameters
        tx = stop.sent.epoch()
        aggregation = dataclasses.replace(exp, cfg=snapshot)  # its own Parallel: its own count of bytes sent
        rng = rng_state()
        (result,) = aggregation_phase(aggregation, [exp.cfg.model.aggregator])
        set_rng_state(rng)
        parameters = result.parameters
        # every process must stop at the same epoch: they agree on the mean of their (equal) accuracies
        _, accuracy = exp.parallel(decomposition).reduce_metrics(0.0, torch.tensor(result.test.accuracy))
        sent = aggregation.parallel(decomposition).communication.total
        records.append({**_record(row, trainer.train_seconds, float(accuracy), result.train_seconds, sent), "tx_bytes": tx})
        stop.sent.mark()
        return float(accuracy) >= target or stop.after(row["epoch"])

    train_local_cnns(exp, decomposition, exp.cfg.train.epochs, "local", epoch_end)
    return records, parameters


def _record(
    row: dict[str, Any], train_seconds: float, accuracy: float, aggregation_seconds: float = 0.0,
    aggregation_bytes: int = 0,
) -> dict[str, Any]:
    return {
        "epoch": row["epoch"],
        "train_seconds": train_seconds,
        "aggregation_seconds": aggregation_seconds,
        "seconds": train_seconds + aggregation_seconds,
        "test_accuracy": accuracy,
        "train_accuracy": row["train_accuracy"],
        "comm_bytes_per_step": row.get("comm_bytes_per_step", 0),
        "comm_bytes_per_epoch": row.get("comm_bytes_per_epoch", 0),  # training and the per-epoch validation numbers
        "aggregation_bytes": aggregation_bytes,  # the probabilities gathered for the aggregator (train, val, test)
    }


@dataclasses.dataclass
class Stop:
    """When to stop besides the target (``max_epochs``), and the bytes sent per epoch."""

    max_epochs: int | None = None
    sent: SentBytes = dataclasses.field(default_factory=lambda: SentBytes(None))

    def after(self, epoch: int) -> bool:
        return self.max_epochs is not None and epoch >= self.max_epochs


def test_subset(exp: Experiment, count: int | None) -> Experiment:
    """``exp`` evaluated on a stratified subset of ``count`` test images (all where None)."""
    test = exp.data.test
    if count is None or count >= len(test):
        return exp
    rows = torch.as_tensor(stratified_sample(test.labels.numpy(), count, exp.cfg.data.split_seed))
    return exp.with_data(test=ImageSet(torch.as_tensor(test.images[rows.numpy()]), test.labels[rows]))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(RunConfig, spec["config"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stop = Stop(spec.get("max_epochs"), SentBytes(spec.get("interface")))
    with distributed_session(cfg.train.device, cfg.train.dist_timeout) as dist:
        exp = test_subset(Experiment.from_config(cfg, dist=dist, callbacks=[stop.sent]), spec.get("test_images"))
        train = global_cnn if exp.decomposition().num_subdomains == 1 else cnn_dnn
        # start together: the other ranks load the data set after rank 0 (from its cache), and a model-parallel
        # local phase has no collective before its first epoch's end, which would count their lag as rank 0's time
        dist.barrier()
        records, parameters = train(exp, spec["target"], stop)
        if dist.is_primary:
            output = {
                "records": records,
                "parameters": parameters,
                "processes": dist.world_size,
                "threads": torch.get_num_threads(),
                "train_images": len(exp.data.train),
                "test_images": len(exp.data.test),
            }
            Path(spec["records"]).write_text(json.dumps(output, indent=2))
        if spec.get("done"):  # every rank says that the measurement is complete, before the process group ends
            dist.barrier()
            Path(f"{spec['done']}.{dist.rank}").touch()


if __name__ == "__main__":
    main(sys.argv[1])
