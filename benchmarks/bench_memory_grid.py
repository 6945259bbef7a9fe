"""Memory per process: the peak of a process of the model-parallel local phase against the global CNN's, for grids
of 1x1, 2x2 and 4x4 (2x2x2 in 3D) on 1, 2 and 4 processes, and a resolution at which the global CNN exceeds a
memory cap that the 4x4 CNN-DNN trains within.

Every configuration is one ``ddcnn train`` (``memory_worker.py``: the library's whole run, data loading, one epoch,
evaluation and checkpoints) in fresh processes: plain ``python`` for one, ``torchrun`` with gloo for more, one
thread each (``common.run_processes``). Each process reports its peak resident set (``VmHWM``) and, on CUDA,
``torch.cuda.max_memory_allocated``; a row shows the largest over the processes. The data are synthetic gray
images (a bright block whose place is the class) written to an .npz: 2D 512x512 and 3D 96^3, vgg3 at width 0.5,
the training images' batch the same for every grid and process count (a process of the local phase trains its
subdomains on the whole batch).

*Fixed cost* ``F(P)``: the peak of a process of the same run on ``P`` processes with a tiny data set (16x16 images)
and a tiny model (vgg3 at width 1/8, some hundred parameters): the interpreter, torch, ddcnn, the process group and
the allocator's baseline, which no decomposition can shrink. The goal of the issue, for every local-phase row of
``P`` processes: ``peak <= 1.3 x G / P + F(P)``, ``G`` the peak of the global CNN on one process. Beside it,
*scaling*: ``(peak - F(P)) / ((G - F(1)) / P)``, the part that grows with the data and the model against a perfect
split of the global CNN's (1.0; the overlap and the local CNNs' own weights add to it).

The cap: ``CAP_MB`` per process (1100 MB of resident set on the CPU; 600 MB of ``max_memory_allocated`` on CUDA,
where the interpreter is not in it), stated before the run and checked against the measured peaks (not enforced
with ``setrlimit``: ``RLIMIT_AS`` limits address space, of which torch and glibc's arenas reserve far more than
they touch). At 2D ``CAP_SIDE`` x ``CAP_SIDE``, vgg3 at width 0.25, batch 2: the global CNN on one process and on
two data-parallel processes (one image each: the least any process of a global CNN can hold) against the 4x4
CNN-DNN (method ``aggregation``: the local phase, then the DNN on the local CNNs' probabilities) on 4 processes.

One more row, of the default run: the 3D local phase on 4 processes with the loaders of whole images that every
process held before it read only its own subimages (``whole_images``, the worker restores that behaviour), to
show what reading only them saves. ``--quick``: the global CNNs, the finest grid on 4 processes, and of the cap
the global CNN's least and the CNN-DNN (about 2 minutes on 2 cores). On CUDA (written, not run here): every goal
is on ``max_memory_allocated``, and only as many processes as GPUs.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import Goal, Result, Settings, run_processes

NAME = "memory_grid"
HERE = Path(__file__).resolve().parent
BATCH = 8
FACTOR = 1.3  # the allowance over a perfect split
# the cap per process: of the resident set on the CPU, of max_memory_allocated on CUDA (no interpreter in it)
CAP_MB = {"RSS": 1100, "GPU": 600}
CAP_SIDE, CAP_BATCH, CAP_WIDTH = 2048, 2, 0.25
PROCESSES = (1, 2, 4)


@dataclass(frozen=True)
class Case:
    """One run: a data set, a method, a grid, a process count, the batch size."""

    data: str  # key of the data sets written
    method: str
    grid: tuple[int, ...]
    processes: int
    batch: int = BATCH
    width: float = 0.5
    whole_images: bool = False  # the loaders of whole images every process held before (see memory_worker.py)

    @property
    def label(self) -> str:
        if math.prod(self.grid) == 1:
            return "global CNN" + (", data parallel" if self.processes > 1 else "")
        what = "CNN-DNN" if self.method == "aggregation" else "local phase"
        whole = ", whole-image loaders" if self.whole_images else ""
        return f"{what} {'x'.join(map(str, self.grid))}{whole}"


# image shape and batch size of each data set: two batches of training images, one of val and of test images
DATASETS = {
    "tiny": ((16, 16), BATCH),
    "2D": ((512, 512), BATCH),
    "3D": ((96, 96, 96), BATCH),
    "cap": ((CAP_SIDE, CAP_SIDE), CAP_BATCH),
}
EVAL_BATCH = 4  # evaluation: no gradients, a smaller peak than training's; a smaller batch, for time


def _cases(quick: bool) -> tuple[list[Case], list[Case]]:
    """The cases of the grids and process counts, and those of the cap. ``quick``: the global CNNs on one process,
    the finest grids on 4 processes, and of the cap the global CNN's least (one image per process) and the CNN-DNN."""
    locals_ = {"2D": [(2, 2), (4, 4)], "3D": [(2, 2, 2)]}
    cases = []
    for data, grids in locals_.items():
        ones, processes = (1,) * len(grids[0]), (4,) if quick else PROCESSES
        cases += [Case(data, "global", ones, p) for p in ((1,) if quick or data == "3D" else PROCESSES)]
        cases += [Case(data, "local", grid, p) for grid in (grids[-1:] if quick else grids) for p in processes]
    if not quick:
        cases.append(Case("3D", "local", (2, 2, 2), 4, whole_images=True))
    cap = [
        Case("cap", "global", (1, 1), 2, CAP_BATCH, CAP_WIDTH),
        Case("cap", "aggregation", (4, 4), 4, CAP_BATCH, CAP_WIDTH),
    ]
    if not quick:
        cap.insert(0, Case("cap", "global", (1, 1), 1, CAP_BATCH, CAP_WIDTH))
    return cases, cap


def run(settings: Settings) -> Result:
    cases, cap = _cases(settings.quick)
    if settings.cuda:  # one GPU per process
        gpus = torch.cuda.device_count()
        cases, cap = [c for c in cases if c.processes <= gpus], [c for c in cap if c.processes <= gpus]
    metric, what = ("peak_gpu", "GPU") if settings.cuda else ("peak_rss", "RSS")
    cap_mb = CAP_MB[what]
    result = Result(
        NAME,
        f"Peak memory per process of the local phase against the global CNN (vgg3 width 0.5, batch {BATCH})",
        ["data", "model", "processes", "subdomains per process", "held of every image", "peak RSS MB"]
        + (["peak GPU MB"] if settings.cuda else [])
        + [f"{what} bound MB", "scaling", "met"],
    )
    with tempfile.TemporaryDirectory(prefix="ddcnn-memory-") as tmp:
        root = Path(tmp)
        sets = {key: _write_npz(root / f"{key}.npz", shape, batch) for key, (shape, batch) in DATASETS.items()}
        counts = sorted({c.processes for c in cases} | {1})
        fixed = {
            p: _measure(root, sets, Case("tiny", "local", (2, 2), p, width=0.125), settings)[metric] for p in counts
        }
        global_peak: dict[str, float] = {}
        worst, met_all = 0.0, True
        for case in cases:
            measured = _measure(root, sets, case, settings)
            if case.method == "global" and case.processes == 1:
                global_peak[case.data] = measured[metric]
            row = _row(case, measured, sets, settings)
            if case.method == "local":
                g, f, peak = global_peak[case.data], fixed[case.processes], measured[metric]
                bound = FACTOR * g / case.processes + f
                scaling = (peak - f) / ((g - fixed[1]) / case.processes)
                worst, met_all = max(worst, peak / bound), met_all and peak <= bound
                row |= {f"{what} bound MB": _mb(bound), "scaling": f"{scaling:.2f}", "met": _yes(peak <= bound)}
            result.rows.append(row)
        cap_peaks = {}
        for case in cap:
            measured = _measure(root, sets, case, settings)
            cap_peaks[case] = measured[metric]
            row = _row(case, measured, sets, settings)
            row |= {
                f"{what} bound MB": f"cap {cap_mb}",
                "met": "within" if measured[metric] <= cap_mb * 1e6 else "exceeds",
            }
            result.rows.append(row)
    result.notes.append(
        "Fixed cost F(P) (tiny data set and model): "
        + ", ".join(f"F({p}) = {_mb(f)} MB" for p, f in fixed.items())
        + f" ({what})."
    )
    result.goals.append(
        Goal(
            f"local phase's peak per process ({what})",
            f"<= {FACTOR} x global / P + fixed cost",
            f"{worst:.2f} of the bound (worst)",
            met_all,
        )
    )
    over = [c for c in cap if c.method == "global"]
    within = cap_peaks[cap[-1]] <= cap_mb * 1e6 and all(cap_peaks[c] > cap_mb * 1e6 for c in over)
    peaks = ", ".join(f"{c.label} on {c.processes}: {_mb(cap_peaks[c])} MB" for c in cap)
    result.goals.append(
        Goal(
            f"{CAP_SIDE}x{CAP_SIDE}: global CNN over a {cap_mb} MB cap per process ({what}), 4x4 CNN-DNN within",
            f"global > {cap_mb} MB >= CNN-DNN",
            peaks,
            within,
        )
    )
    result.notes.append(
        "Each run: one epoch of two batches, evaluation of a batch of val and of test images (at most "
        f"{EVAL_BATCH}), checkpoints; crops of 4 pixels and flips; the peak is the largest over the run's processes. "
        f"Cap: {CAP_SIDE}x{CAP_SIDE}, vgg3 at width {CAP_WIDTH}, batch {CAP_BATCH}; checked against the measured "
        "peaks, not enforced."
    )
    return result


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _row(case: Case, measured: dict[str, Any], sets: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    shape = sets[case.data]["shape"]
    row = {
        "data": f"{len(shape)}D {'x'.join(map(str, shape))}",
        "model": case.label + (f", batch {case.batch}" if case.batch != BATCH else ""),
        "processes": case.processes,
        "subdomains per process": _subdomains(measured["subdomains"]),
        "held of every image": f"{measured['held_fraction']:.2f}",
        "peak RSS MB": _mb(measured["peak_rss"]),
    }
    if settings.cuda:
        row["peak GPU MB"] = _mb(measured["peak_gpu"])
    return row


def _subdomains(held: list[int]) -> str:
    return str(held[0]) if len(held) == 1 else f"{held[0]}-{held[-1]}"


def _mb(b: float) -> int:
    return round(b / 1e6)


def _write_npz(path: Path, shape: tuple[int, ...], batch: int) -> dict[str, Any]:
    """Gray images (volumes) of two classes, a bright block in one half or the other, noisy: two batches of
    training images and an evaluation batch of val and of test images."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 2 * batch), ("val", min(batch, EVAL_BATCH)), ("test", min(batch, EVAL_BATCH))):
        labels = np.arange(n) % 2
        images = rng.integers(0, 80, size=(n, *shape), dtype=np.uint8)
        for i, k in enumerate(labels):
            images[(i, *(slice(k * s // 2, k * s // 2 + s // 4) for s in shape))] = 255
        arrays |= {f"x_{split}": images, f"y_{split}": labels}
    np.savez(path, layout=np.array(["NHW" if len(shape) == 2 else "NDHW"]), **arrays)
    return {"path": str(path), "shape": shape}


def _measure(root: Path, sets: dict[str, dict[str, Any]], case: Case, settings: Settings) -> dict[str, Any]:
    """Run ``case`` and return the largest of its processes' reports (peaks; the subdomains of the process of the
    largest resident peak)."""
    tag = f"{case.data}-{case.method}-{'x'.join(map(str, case.grid))}-p{case.processes}-b{case.batch}"
    tag += "-whole" if case.whole_images else ""
    out = root / tag
    out.mkdir()
    spec = {
        "config": _config(case, sets[case.data]["path"], out, settings),
        "report": str(out / "memory"),
        "image_shape": sets[case.data]["shape"],
        "whole_images": case.whole_images,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    print(f"[memory] {tag}", file=sys.stderr, flush=True)
    run_processes([str(HERE / "memory_worker.py"), str(out / "spec.json")], case.processes, threads=1, timeout=1800)
    reports = [json.loads((out / f"memory.{r}.json").read_text()) for r in range(case.processes)]
    largest = max(reports, key=lambda r: r["peak_rss"])
    return largest | {"peak_gpu": max(r["peak_gpu"] for r in reports)}


def _config(case: Case, dataset: str, out: Path, settings: Settings) -> dict[str, Any]:
    return {
        "method": case.method,
        "out": str(out / "run"),
        "aggregator_epochs": 1,
        "data": {
            "dataset": f"npz:{dataset}",
            "batch_size": case.batch,
            "eval_batch_size": min(case.batch, EVAL_BATCH),
            "cache_dir": str(out.parent / "cache"),
            "crop_padding": 4,
            "flip": True,
        },
        "model": {"backbone": "vgg3", "width": case.width, "grid": list(case.grid)},
        "train": {
            "epochs": 1,
            "progress": False,
            "threads": 1,
            "device": str(settings.device),
        },
    }
