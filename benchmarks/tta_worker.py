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
from ddcnn.distributed import distributed_session
from ddcnn.phases import Experiment, aggregation_phase, count_parameters, train_local_cnns
from ddcnn.train.engine import Trainer
from ddcnn.train.evaluation import evaluate


def global_cnn(exp: Experiment, target: float) -> tuple[list[dict[str, Any]], int]:
    """Train the global CNN until its test accuracy reaches ``target`` (or for all epochs); the records and its
    parameter count."""
    decomposition = exp.decomposition((1,))
    parallel, test = exp.parallel(decomposition), exp.loader("test")
    records: list[dict[str, Any]] = []

    def epoch_end(trainer: Trainer, row: dict[str, Any]) -> bool:
        accuracy = evaluate(trainer.model, test, exp.cfg.train, exp.device, parallel=parallel).accuracy
        records.append(_record(row, trainer.train_seconds, accuracy))
        return accuracy >= target

    model, _ = train_local_cnns(exp, decomposition, exp.cfg.train.epochs, "global", epoch_end)
    return records, count_parameters(model)


def cnn_dnn(exp: Experiment, target: float) -> tuple[list[dict[str, Any]], int]:
    """Train the local phase, with the aggregation phase after every epoch, until the CNN-DNN's test accuracy
    reaches ``target`` (or for all epochs); the records and the CNN-DNN's parameter count."""
    decomposition = exp.decomposition()
    snapshot = dataclasses.replace(exp.cfg, pretrained=str(exp.run_dir / "local.pt"))  # written after every epoch
    records: list[dict[str, Any]] = []
    parameters = 0

    def epoch_end(trainer: Trainer, row: dict[str, Any]) -> bool:
        nonlocal parameters
        aggregation = dataclasses.replace(exp, cfg=snapshot)  # its own Parallel: its own count of bytes sent
        rng = rng_state()
        (result,) = aggregation_phase(aggregation, [exp.cfg.model.aggregator])
        set_rng_state(rng)
        parameters = result.parameters
        # every process must stop at the same epoch: they agree on the mean of their (equal) accuracies
        _, accuracy = exp.parallel(decomposition).reduce_metrics(0.0, torch.tensor(result.test.accuracy))
        sent = aggregation.parallel(decomposition).communication.total
        records.append(_record(row, trainer.train_seconds, float(accuracy), result.train_seconds, sent))
        return float(accuracy) >= target

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


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(RunConfig, spec["config"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with distributed_session(cfg.train.device, cfg.train.dist_timeout) as dist:
        exp = Experiment.from_config(cfg, dist=dist)
        train = global_cnn if exp.decomposition().num_subdomains == 1 else cnn_dnn
        records, parameters = train(exp, spec["target"])
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


if __name__ == "__main__":
    main(sys.argv[1])
