"""``ddcnn compare``: every method on every grid and seed, as in the papers' tables.

For each seed the global CNN is trained once (grid ``1x1``); for each other grid, in its own folder
``<out>/<grid>/seed<seed>/``, the local phase, then every aggregator on its frozen local CNNs, then the coherent
CNN-DNN and transfer learning from the local phase. With ``resume`` every phase whose checkpoint is finished is
loaded, not trained again, so an interrupted comparison continues where it stopped.

Writes to ``out``: ``results.json`` (``{"config", "class_counts", "rows", "provenance"}``, one row per method, grid
and seed, and for ``local`` one row per subdomain; ``class_counts``: the training split's images per class),
``results.md`` (the tables; imbalanced classes add balanced accuracy and AUC), ``accuracy.png``, ``curves_<grid>.png``
and ``subdomains.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text, ensure_writable_folder
from .config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    SharedOptions,
    TrainConfig,
    changed_options,
    check,
    config_to_dict,
    format_grid,
    grid_order,
    inapplicable_aggregation,
    inapplicable_data_and_training,
    option,
    parse_grid,
)
from .config.options import split_input
from .data import DatasetSplits, load_dataset
from .distributed import DistContext, primary_first
from .errors import ConfigError, UnknownNameError
from .methods import check_names
from .models.aggregators import aggregator_class, check_aggregator_input, list_aggregator_inputs
from .models.pretrained import pin_init_weights
from .phases import Experiment, MethodResult, aggregation_phase, run_coherent, run_global, run_local, run_transfer
from .phases.local_outputs import reads
from .plots import plot_curves, plot_method_accuracy, plot_subdomain_heatmaps
from .run_folder import config_conflicts, run_folder_lock
from .tables import AGGREGATORS, COMPARE_METHODS, method_order, results_markdown, summarize
from .train.callbacks import Callback

log = logging.getLogger(__name__)

PHASE_EPOCHS = {"global": 1, "local": 2, "aggregator": 5, "coherent": 1}  # a phase's epochs per `epochs`, by default


# RunConfig's options that CompareConfig has not: compare sets them for each phase (see _run_config)
RUN_ONLY = ("method", "pretrained")


def _phase_epochs_help() -> str:
    return ", ".join(f"{phase} {n}x" for phase, n in PHASE_EPOCHS.items())


@dataclass
class CompareConfig(SharedOptions):
    """One comparison. Defaults: ``ddcnn compare --dataset mnist5k --grids 2x2`` (``make demo``) takes about five
    minutes on two CPU cores. The options shared with :class:`~ddcnn.config.RunConfig` come from
    :class:`~ddcnn.config.SharedOptions` and go to every phase."""

    out: str = option(
        "runs/compare", group="output", help="comparison folder: results.json, results.md and plots, and a run "
        "folder <out>/<grid>/seed<seed>/ per grid and seed",
    )
    grids: tuple[str, ...] = option(
        ("2x2", "4x4"), group="model", help="decompositions to compare, comma-separated; the global CNN (1x1) is "
        "trained once per seed anyway",
    )
    seeds: tuple[int, ...] = option(
        (0,), group="training", help="training seeds, comma-separated (initialisation and batch order; the data "
        "split is fixed by --split-seed)",
    )
    methods: tuple[str, ...] = option(
        COMPARE_METHODS, group="model", help=f"methods to run, comma-separated, of: {', '.join(COMPARE_METHODS)} "
        "(each aggregator is a method: the aggregation phase of that aggregator). A trained aggregator with its "
        "input, aggregator:input (dnn:logits, linear:features, attention:probabilities), is one more method, from "
        "the same local CNNs in the same aggregation phase; a plain dnn reads --local-output",
    )
    epochs: int = option(
        4, group="training", help="base epochs: a phase without its own --<phase>-epochs trains a multiple of it "
        f"({_phase_epochs_help()}), so --epochs scales them all",
    )
    global_epochs: int | None = option(None, group="training", help="epochs of the global CNN; unset: --epochs")
    local_epochs: int | None = option(
        None, group="training", help="epochs of the local phase; unset: 2 x --epochs (the papers pretrain the local "
        "CNNs much longer)",
    )
    aggregator_epochs: int | None = option(
        None, group="aggregation", help="epochs of every trained aggregator; unset: 5 x --epochs (an epoch on N*K "
        "probabilities costs next to nothing)",
    )
    coherent_epochs: int | None = option(
        None, group="training", help="epochs of coherent and transfer training; unset: --epochs"
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(backbone="vgg3", width=0.5))  # grid: see grids
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs: see the fields above; seed: see seeds

    def __post_init__(self) -> None:
        super().__post_init__()
        self.grids = tuple(format_grid(parse_grid(g)) for g in self.grids)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.methods = tuple(self.methods)
        for m in self.methods:
            if ":" in m:
                check_aggregator_input(m)  # a one-line error for an unknown input, or a closed-form aggregator's
            elif m not in COMPARE_METHODS:
                raise UnknownNameError("method", m, [*COMPARE_METHODS, *list_aggregator_inputs()])
        if not self.grids or not self.seeds or not self.methods:
            raise ConfigError("compare needs at least one grid, one seed and one method")
        for phase in PHASE_EPOCHS:
            check(self.phase_epochs(phase) >= 1, f"{phase}_epochs", self.phase_epochs(phase), "at least 1")

    def phase_epochs(self, phase: str) -> int:
        """Epochs of ``phase``: global, local, aggregator (every trained aggregator) or coherent (and transfer)."""
        value = getattr(self, f"{phase}_epochs")
        return PHASE_EPOCHS[phase] * self.epochs if value is None else value

    def inapplicable_options(self) -> list[str]:
        """One-line warnings about options that no phase of this comparison reads (the counterpart of
        :func:`ddcnn.config.inapplicable_options`); a ConfigError where two options contradict each other."""
        methods, model = set(self.methods), self.model
        grids = [g for g in self.grids if g != "1x1"]
        messages = inapplicable_data_and_training(self.data, self.train)
        changed = changed_options(self)
        messages += [f"--{name} has no effect: no method of this comparison decomposes the images"
                     for name in ("overlap", "coarse") if getattr(model, name) and not (grids and methods - {"global"})]
        coherent = methods & {"coherent", "transfer"}
        trained = [a for a in AGGREGATORS if a in methods and aggregator_class(a).trainable]  # read --local-output
        variants = [m for m in methods if ":" in m]  # trained aggregators that read the input they name
        if self.transfer_aggregator and "transfer" not in methods:
            messages.append("--transfer-aggregator has no effect: --methods has no transfer")
        elif self.transfer_aggregator and aggregator_class(model.aggregator).trainable:
            trained.append(model.aggregator)  # transfer's aggregation phase
        if "aggregator" in changed and not coherent:
            messages.append("--aggregator has no effect: it is the aggregator of coherent and transfer, and --methods "
                            "has neither (the aggregation phase runs the aggregators in --methods)")
        if not ("dnn" in {split_input(m)[0] for m in methods} or (coherent and model.aggregator == "dnn")):
            messages += [f"--{n.replace('_', '-')} has no effect: no method of this comparison has a dnn aggregator"
                         for n in ("dnn_hidden", "dnn_activation", "dnn_dropout", "dnn_batchnorm") if n in changed]
        coherent_reads = coherent and aggregator_class(model.aggregator).trainable  # coherent's reads --local-output
        if "local_output" in changed and not (trained or coherent_reads):
            messages.append("--local-output has no effect: no method of this comparison has a trained aggregator "
                            "that reads it (a plain dnn, linear or attention; dnn:logits reads the logits anyway)")
        features = (model.local_output == "features" and (trained or coherent_reads)) or any(
            m.endswith(":features") for m in variants)
        if "feature_dim" in changed and not features:
            messages.append("--feature-dim has no effect: no method of this comparison reads the local CNNs' "
                            "features (--local-output features, or a method such as dnn:features)")
        messages += inapplicable_aggregation(self, changed, bool(trained or variants), "no method of this comparison "
                                             "trains an aggregator on local probabilities", self.data.augment)
        for phase, needs in {"global": methods & {"global"}, "coherent": coherent}.items():
            if getattr(self, f"{phase}_epochs") is not None and not needs:
                messages.append(f"--{phase}-epochs has no effect: --methods has no {phase}")
        if self.local_epochs is not None and not (grids and methods - {"global", "coherent"}):
            messages.append("--local-epochs has no effect: no method of this comparison trains a local phase")
        return messages


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    markdown: str
    out: Path


def _run_config(cc: CompareConfig, grid: str, seed: int, folder: Path, epochs: int, pretrained: bool) -> RunConfig:
    """One phase's run configuration; ``pretrained``: it starts from the local phase in ``folder``. Every option
    of :class:`~ddcnn.config.SharedOptions` is passed on as it is."""
    shared = {f.name: getattr(cc, f.name) for f in fields(SharedOptions)}
    return RunConfig(
        **shared,
        out=str(folder),
        data=cc.data,
        model=replace(cc.model, grid=parse_grid(grid)),
        train=replace(cc.train, epochs=epochs, seed=seed),
        local_epochs=cc.phase_epochs("local"),
        aggregator_epochs=cc.phase_epochs("aggregator"),
        pretrained=str(folder) if pretrained else None,
    )


# what the local phase costs per image (ddcnn.models.summary.local_cnns_cost), in each local row
_COST_FIELDS = ("flops_per_image", "coarse_parameters", "coarse_flops", "flops_per_image_without_coarse")


def _rows(result: MethodResult, seed: int) -> list[dict[str, Any]]:
    """Result rows; the local phase gives one row per subdomain (each local CNN's own accuracies)."""
    if result.method != "local":
        return [result.row(seed=seed)]
    n = len(result.extra["test_subdomain_accuracy"])
    train = result.extra.get("train_subdomain_accuracy") or [None] * n
    balanced = result.test.extra.get("subdomain_balanced_accuracy") or [None] * n
    auc = result.test.extra.get("subdomain_auc") or [None] * n
    costs = {k: v for k, v in result.extra.items() if k in _COST_FIELDS}
    coarse = n - 1 if "coarse_flops" in costs else None  # the coarse level is the last local CNN (--coarse)
    return [
        {
            "method": "local",
            "grid": result.grid,
            "seed": seed,
            "subdomain": i,
            "test_accuracy": result.extra["test_subdomain_accuracy"][i],
            "test_balanced_accuracy": balanced[i],
            "test_auc": auc[i],
            "val_accuracy": result.extra["val_subdomain_accuracy"][i],
            "train_accuracy": train[i],
            "parameters": result.parameters // n,
            "train_seconds": result.train_seconds,  # of the whole local phase: all local CNNs at once
            "total_train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second,
            "ensemble_test_accuracy": result.test.accuracy,  # the local CNNs' mean probability
            "ensemble_test_balanced_accuracy": result.test.balanced_accuracy,
            "ensemble_test_auc": result.test.auc,
            "model_parallel_bytes_per_step": result.extra["model_parallel_bytes_per_step"],
            "data_parallel_bytes_per_step": result.extra["data_parallel_bytes_per_step"],
            **costs,
            **({"coarse": True} if i == coarse else {}),
        }
        for i in range(n)
    ]


def compare(
    cc: CompareConfig, data: DatasetSplits | None = None, dist: DistContext | None = None,
    callbacks: Sequence[Callback] = (),
) -> CompareResult:
    """Run the comparison (see the module docstring) and write its results; returns the rows and the table. In a
    distributed run (``dist``) every process calls this, each phase is distributed, and rank 0 writes.
    ``callbacks`` receive every phase's training events (:mod:`ddcnn.train.callbacks`). The folder ``cc.out`` is
    this comparison's alone while it runs; with ``cc.resume`` a changed configuration is refused, except for more
    grids, seeds or methods (:mod:`ddcnn.run_folder`)."""
    dist = dist or DistContext()
    with run_folder_lock(cc.out) if dist.is_primary else contextlib.nullcontext():
        for message in check_compare_config(cc):
            if dist.is_primary:
                log.warning("warning: %s", message)
        cc = pin_init_weights(cc)  # the --init-weights file's sha256 in the configuration: resume refuses another
        if cc.resume:
            check_compare_resume(cc)
        return _compare(cc, data, dist, callbacks)


def check_compare_config(cc: CompareConfig) -> list[str]:
    """Check ``cc``'s names and contradictions before any work; return the warnings about options no phase reads."""
    check_names(cc)
    return cc.inapplicable_options()


def check_compare_resume(cc: CompareConfig) -> None:
    """Refuse ``cc.resume`` where the comparison in ``cc.out`` was run with another configuration."""
    path = Path(cc.out) / "results.json"
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} cannot be read, so --resume cannot check it continues the same comparison; "
                          "remove it (the finished phases' checkpoints stay) or compare into another --out") from None
    conflicts = config_conflicts(
        recorded, config_to_dict(cc), ignored={"grids", "seeds", "methods"}, defaults=config_to_dict(CompareConfig())
    )
    if conflicts:
        raise ConfigError(
            f"--resume of the comparison in {cc.out} with a changed configuration ({', '.join(conflicts)}); run "
            "again with the options it was started with (only grids, seeds and methods may change), or compare "
            "into another --out"
        )


def _compare(
    cc: CompareConfig, data: DatasetSplits | None, dist: DistContext, callbacks: Sequence[Callback]
) -> CompareResult:
    out = Path(cc.out)
    ensure_writable_folder(out)
    if data is None:
        with primary_first(dist):
            data = load_dataset(cc.data)
    methods = set(cc.methods)
    aggregators = [m for m in method_order(methods) if split_input(m)[0] in AGGREGATORS]  # dnn:logits after dnn
    if "transfer" in methods and cc.transfer_aggregator and cc.model.aggregator not in aggregators:
        aggregators.append(cc.model.aggregator)  # transfer starts from it (its row is left out)
    grids = [g for g in cc.grids if g != "1x1"]
    rows: list[dict[str, Any]] = []
    histories: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)  # first seed's curves, per grid

    def phase(grid: str, seed: int, name: str, epochs: int, pretrained: bool = False) -> Experiment:
        folder = out / grid / f"seed{seed}"
        log.info("== seed %d, grid %s: %s ==", seed, grid, name)
        cfg = _run_config(cc, grid, seed, folder, epochs, pretrained)
        return Experiment.from_config(cfg, data=data, dist=dist, callbacks=callbacks)

    def record(results: Sequence[MethodResult], seed: int) -> None:
        for result in results:
            if result.method not in methods:
                continue
            rows.extend(_rows(result, seed))
            if seed == cc.seeds[0] and result.history:
                histories[result.grid][result.method] = result.history

    features = cc.model.local_output == "features" or any(m.endswith(":features") for m in methods)
    for grid in grids if features else ():  # before anything trains
        folder = out / grid / f"seed{cc.seeds[0]}"
        exp = Experiment.from_config(_run_config(cc, grid, cc.seeds[0], folder, 1, True), data=data, dist=dist)
        _check_feature_dim(exp, aggregators, methods)
    for seed in cc.seeds:
        if "global" in methods:
            record([run_global(phase("1x1", seed, "global CNN", cc.phase_epochs("global")))], seed)
        for grid in grids:
            if methods & {"local", "transfer", *aggregators}:
                record([run_local(phase(grid, seed, "local phase", cc.phase_epochs("local")))], seed)
            if aggregators:
                name = f"aggregators {', '.join(aggregators)}"
                exp = phase(grid, seed, name, cc.phase_epochs("aggregator"), pretrained=True)
                record(aggregation_phase(exp, aggregators), seed)
            if "coherent" in methods:
                record([run_coherent(phase(grid, seed, "coherent CNN-DNN", cc.phase_epochs("coherent")))], seed)
            if "transfer" in methods:
                exp = phase(grid, seed, "transfer learning", cc.phase_epochs("coherent"), pretrained=True)
                record([run_transfer(exp)], seed)
        # after every seed, so that a long comparison that is stopped keeps the tables of its finished seeds
        markdown = _write_results(rows, histories, cc, data, out, dist)
    log.info("results in %s", out)
    return CompareResult(rows, markdown, out)


def _check_feature_dim(exp: Experiment, aggregators: Sequence[str], methods: set[str]) -> None:
    """Refuse a ``--feature-dim`` above the local CNNs' channels before any phase trains (the aggregators and those
    of coherent and transfer that read features)."""
    names = [*aggregators, *([exp.cfg.model.aggregator] if methods & {"coherent", "transfer"} else [])]
    decomposition = exp.decomposition()
    for name in names:
        if reads(exp, name) == "features":
            exp.aggregator_options(name, decomposition)
            return


def _write_results(
    rows: list[dict[str, Any]],
    histories: dict[str, dict[str, list[dict[str, Any]]]],
    cc: CompareConfig,
    data: DatasetSplits,
    out: Path,
    dist: DistContext,
) -> str:
    """Write results.json, results.md and the plots of ``rows`` (rank 0 only); returns the markdown. The training
    split's images per class go into both (imbalanced classes add tables of balanced accuracy and AUC)."""
    class_counts = torch.bincount(data.train.labels, minlength=data.num_classes).tolist()
    markdown = results_markdown(rows, cc, data.name, class_counts)
    if dist.is_primary:
        from .runtime import provenance

        payload = {
            "provenance": provenance(cc.train.device), "config": config_to_dict(cc), "class_counts": class_counts,
            "rows": rows,
        }
        atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
        atomic_write_text(out / "results.md", markdown)
        _plots(rows, histories, out)
    return markdown


def _plots(rows: Sequence[dict[str, Any]], histories: dict[str, dict[str, list[dict[str, Any]]]], out: Path) -> None:
    accuracy = summarize(rows)
    summary = {
        m: {g: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None) for g, v in cells.items()}
        for m, cells in accuracy.items()
    }
    plot_method_accuracy(summary, out / "accuracy.png")
    for grid, curves in histories.items():
        plot_curves(curves, out / f"curves_{grid}.png", title=f"training curves, grid {grid} (first seed)")
    per_subdomain: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        if row["method"] == "local":
            per_subdomain[row["grid"], row["subdomain"]].append(row["test_accuracy"])
    heatmaps = {}
    for grid in sorted({g for g, _ in per_subdomain}, key=grid_order):
        n = math.prod(parse_grid(grid))
        n += (grid, n) in per_subdomain  # the coarse level's, which the heatmap names
        heatmaps[grid] = (parse_grid(grid), [statistics.mean(per_subdomain[grid, i]) for i in range(n)])
    if heatmaps:
        plot_subdomain_heatmaps(heatmaps, out / "subdomains.png")
