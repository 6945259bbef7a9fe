"""The worker of the per-process memory benchmark (``bench_memory_grid.py``): one ``ddcnn train`` run, through the
library as the command line runs it, then this process's peak memory as JSON.

    python benchmarks/memory_worker.py SPEC.json                                                   # one process
    python -m torch.distributed.run --standalone --nproc-per-node=4 benchmarks/memory_worker.py SPEC.json

``SPEC.json`` holds ``config`` (a :class:`ddcnn.config.RunConfig` as a dict) and ``report`` (a path prefix: each
rank writes ``<report>.<rank>.json``). The report has ``peak_rss``, this process's peak resident set (``VmHWM``, in
bytes: the whole run, data loading, training, evaluation and checkpoints included; not ``ru_maxrss``, which Linux
carries over from the parent across fork and exec), ``peak_gpu`` (``torch.cuda.max_memory_allocated`` on a CUDA
device, else 0), the subdomains this rank held and what the run's training loader held of every image.

With ``whole_images`` true in ``SPEC.json``, the run's loaders yield whole images whatever the model (the loaders
every process held before a process of the local phase read only its own subimages), for the comparison.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
from common import peak_rss  # benchmarks/common.py: this script's folder is on the path

from ddcnn.config import RunConfig, config_from_dict
from ddcnn.data.subimages import OwnSubimages
from ddcnn.decomposition import Decomposition
from ddcnn.distributed import assign_subdomains, distributed_session
from ddcnn.methods import run
from ddcnn.phases import Experiment


def held_fraction(cfg: RunConfig, image_shape: list[int], subdomains: tuple[int, ...]) -> float:
    """What a training loader of ``subdomains`` reads of every image: the regions of those subdomains (with the
    crop margin and, with flips, their mirrors) where they are some of the grid's, else the whole image."""
    decomposition = Decomposition(cfg.model.grid, image_shape, cfg.model.overlap)
    if len(subdomains) == decomposition.num_subdomains:
        return 1.0
    own = OwnSubimages(
        decomposition, subdomains, cfg.data.crop_padding if cfg.data.augment else 0, cfg.data.flip and cfg.data.augment
    )
    return min(own.fraction, 1.0)


def whole_image_loaders() -> None:
    """Make every Experiment's loaders yield whole images (to local CNNs too, which split them themselves)."""
    loader = Experiment.loader

    def whole(self, split, *args, local_cnns=None, **kwargs):
        return loader(self, split, *args, **kwargs)

    Experiment.loader = whole


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(RunConfig, spec["config"])
    if spec.get("whole_images"):
        whole_image_loaders()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with distributed_session(cfg.train.device, cfg.train.dist_timeout) as dist:
        cuda = dist.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(dist.device)
        result = run(cfg, dist)
        n = math.prod(cfg.model.grid)
        model_parallel = cfg.train.parallel == "model"
        subdomains = assign_subdomains(n, dist.world_size)[dist.rank] if model_parallel else tuple(range(n))
        report = {
            "rank": dist.rank,
            "peak_rss": peak_rss(),
            "peak_gpu": torch.cuda.max_memory_allocated(dist.device) if cuda else 0,
            "subdomains": list(subdomains),
            "held_fraction": 1.0 if spec.get("whole_images") else held_fraction(cfg, spec["image_shape"], subdomains),
            "test_accuracy": result.test.accuracy,
        }
        Path(f"{spec['report']}.{dist.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
