"""The command line: ``ddcnn train | compare | evaluate | predict | export | datasets | models | aggregators``.
argparse lives here and nowhere else.

Every field of the config dataclasses is a flag (``--batch-size``, ``--grid 2x2``, ``--no-augment``...), with the
help and in the group its metadata gives (:func:`ddcnn.config.option`); a YAML file given with ``--config``
supplies values first and flags override it. Options that the run does not read are logged as warnings. Errors a
user can cause print one line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .config import (
    GROUPS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    field_default,
    format_grid,
    load_yaml,
)
from . import __version__
from .errors import ConfigError, DDCNNError

if typing.TYPE_CHECKING:
    from .train.callbacks import Callback

log = logging.getLogger("ddcnn")  # the package's logger: the CLI gives it its handlers
T = TypeVar("T")

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


# -- config flags -----------------------------------------------------------------------------------------------


def _flag_type(annotation: Any):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return str  # "2x2" or "128,128": parsed by config_from_dict
    return annotation


def _option_groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The parser's argument groups of :data:`~ddcnn.config.GROUPS`, made on first use, in that order (argparse
    leaves empty ones out of ``--help``)."""
    groups = getattr(parser, "_ddcnn_option_groups", None)
    if groups is None:
        groups = {name: parser.add_argument_group(name, description) for name, description in GROUPS.items()}
        parser._ddcnn_option_groups = groups  # type: ignore[attr-defined]
    return groups


def _shown(value: Any, name: str) -> str:
    """A default as it would be typed: ``2x2``, ``128,128``, ``true``, ``unset``."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return format_grid(value) if name == "grid" else ",".join(str(v) for v in value)
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), defaults: Any = None
) -> None:
    """One flag per dataclass field, default None so that only what the user typed overrides the YAML, in the
    group and with the help of the field's metadata (:func:`ddcnn.config.option`); the fields ``cls`` declares
    come before those it inherits. ``defaults``: an instance whose values the help shows (default: the field
    defaults)."""
    hints = typing.get_type_hints(cls)
    groups = _option_groups(parser)
    own = set(vars(cls).get("__annotations__", {}))
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        if "help" not in f.metadata or f.metadata.get("group") not in GROUPS:
            raise TypeError(f"{cls.__name__}.{f.name} has no help or group; declare it with ddcnn.config.option()")
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(hints[f.name])
        default = getattr(defaults, f.name) if defaults is not None else field_default(f)
        help_text = f"{f.metadata['help']} (default: {_shown(default, f.name)})".replace("%", "%%")
        group = groups[f.metadata["group"]]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            group.add_argument(flag, type=kind, default=None, help=help_text, metavar=metavar)


def _from_flags(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    values = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is None or f.name in skip:
            continue
        if isinstance(v, str) and _is_tuple(hints[f.name]) and f.name != "grid":
            v = [item.strip() for item in v.split(",") if item.strip()]  # "128,128", "0,1,2", "2x2,4x4"
        values[f.name] = v
    return values


def _is_tuple(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is tuple for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is tuple


def resolve_config(
    cls: type[T], args: argparse.Namespace, yaml_values: dict[str, Any] | None = None,
    skip: dict[str, tuple[str, ...]] | None = None,
) -> T:
    """Defaults <- YAML file (nested sections or flat keys) <- command-line flags, for a config class made of
    top-level fields and the ``data``, ``model`` and ``train`` sections (RunConfig, CompareConfig). Sections start
    from ``cls``'s own defaults; a flat key goes to the top level if ``cls`` has it, else to the section that has it.
    ``skip``: per section, fields that ``cls`` sets itself (their flags are not read)."""
    skip = skip or {}
    defaults = cls()
    merged: dict[str, Any] = {s: config_to_dict(getattr(defaults, s)) for s in SECTIONS}
    top = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS)
    for key, value in (yaml_values or {}).items():
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping of keys to values, got {value!r}")
        if key in SECTIONS:
            merged[key].update(value)
        elif key in top:
            merged[key] = value
        else:
            section = next((s for s, c in SECTIONS.items() if key in {f.name for f in dataclasses.fields(c)}), None)
            (merged[section] if section else merged)[key] = value
    for section, section_cls in SECTIONS.items():
        merged[section].update(_from_flags(args, section_cls, skip.get(section, ())))
    merged.update(_from_flags(args, cls))
    return config_from_dict(cls, merged)


def resolve_run_config(args: argparse.Namespace, yaml_values: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- YAML file (nested sections or flat keys) <- command-line flags."""
    return resolve_config(RunConfig, args, yaml_values)


# fields of the sections that `compare` sets per grid, seed and phase
COMPARE_SKIP = {"model": ("grid",), "train": ("epochs", "seed")}


# -- commands ---------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import distributed_session
    from .methods import check_run_config, run

    cfg = resolve_run_config(args, load_yaml(args.config) if args.config else None)
    check_run_config(cfg)  # before the run folder is made (run() checks again, for library users, and warns)
    with distributed_session(cfg.train.device, cfg.train.dist_timeout) as dist:  # one process, or torchrun's
        with _run_folder(Path(cfg.out), dist.is_primary, "train.log"):
            from .train.tensorboard import with_tensorboard

            result = run(cfg, dist, callbacks=with_tensorboard(args.callbacks, args.tensorboard, cfg.out))
    if dist.is_primary:
        print(f"{result.method} {result.grid}: test {result.test.summary()} ({result.train_seconds:.1f} s training)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, check_compare_config, compare
    from .distributed import distributed_session

    cc = resolve_config(CompareConfig, args, load_yaml(args.config) if args.config else None, COMPARE_SKIP)
    check_compare_config(cc)  # before the folder is made (compare() checks again, for library users, and warns)
    with distributed_session(cc.train.device, cc.train.dist_timeout) as dist:
        with _run_folder(Path(cc.out), dist.is_primary, "compare.log"):
            from .train.tensorboard import with_tensorboard

            result = compare(cc, dist=dist, callbacks=with_tensorboard(args.callbacks, args.tensorboard, cc.out))
    if dist.is_primary:
        print(result.markdown)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import format_prediction, iter_predictions

    for p in iter_predictions(args.checkpoint, args.images, args.device, args.batch_size, args.top_k):
        print(json.dumps(p.to_dict()) if args.json else format_prediction(p), flush=True)  # each batch as done
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    print(*export(args.checkpoint, args.out, args.format, per_local_cnn=args.per_local_cnn), sep="\n")
    return 0


def cmd_aggregators(args: argparse.Namespace) -> int:
    from .models.aggregators import aggregator_class, list_aggregators

    for name in list_aggregators():
        cls = aggregator_class(name)
        kind = "trained" if cls.trainable else "fitted on val" if cls.fitted else "no training"
        print(f"{name:10s} {kind:14s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    print("\ntrained ones read --local-output; in ddcnn compare --methods also aggregator:input, e.g. dnn:features")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, split=args.split, device=args.device)
    print(json.dumps({k: v for k, v in report.items() if k != "confusion"}, indent=2))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import describe_dataset

    options = {"image_size": args.image_size, "intensity": args.intensity, "volume_shape": args.volume_shape}
    print(describe_dataset(args.spec, DataConfig(**options) if args.spec else None))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.summary import parameter_report

    print(parameter_report(args.backbone or [], args.image_size, args.in_channels, args.num_classes, args.grid,
                           args.width, args.local_width, args.coarse))  # no --backbone: every registered one
    return 0


_CONFIG_HELP = (
    "YAML file of options: the keys are the option names below with _ for - (e.g. batch_size: 32), flat or in "
    "sections data, model and train; flags override it"
)
_TENSORBOARD_HELP = "write each epoch's numbers as TensorBoard scalars below DIR (ddcnn[tensorboard]) (default: none)"
_DEVICE_HELP = "auto (CUDA if available, else the CPU), cpu, cuda or cuda:N (default: auto)"


def _add_common_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--debug``, ``-q``: before the command (default False) and after it (SUPPRESS: keeps what came before)."""
    parser.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="log warnings only; no bars")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddcnn", description="Domain-decomposition CNN-DNN training.")
    parser.add_argument("--version", action="version", help="print the versions of ddcnn and torch and exit",
                        version=f"ddcnn {__version__} (torch {importlib.metadata.version('torch')})")
    _add_common_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    train = sub.add_parser("train", help="train one method on one dataset", usage="%(prog)s [--config FILE] [options]",
                           description="Train one method on one dataset; results go to --out.")
    train.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    for cls in SECTIONS.values():
        add_config_flags(train, cls)
    add_config_flags(train, RunConfig)
    train.add_argument("--tensorboard", metavar="DIR", help=_TENSORBOARD_HELP)
    train.set_defaults(func=cmd_train)

    from .compare import CompareConfig

    cmp = sub.add_parser("compare", help="train every method on every grid and seed; write tables and plots",
                         usage="%(prog)s [--config FILE] [options]", description="Train every method on every grid and seed, as in the papers' tables; results "
                         "go to --out.")
    cmp.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    compare_defaults = CompareConfig()
    for name, cls in SECTIONS.items():
        add_config_flags(cmp, cls, skip=COMPARE_SKIP.get(name, ()), defaults=getattr(compare_defaults, name))
    add_config_flags(cmp, CompareConfig, defaults=compare_defaults)
    cmp.add_argument("--tensorboard", metavar="DIR", help=_TENSORBOARD_HELP)
    cmp.set_defaults(func=cmd_compare)

    pr = sub.add_parser("predict", help="classify image files (.png, .jpg, ..., .npy volumes) with a checkpoint")
    pr.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder holding one")
    pr.add_argument("images", nargs="+", help="image files, folders of them (sorted by name) or glob patterns")
    pr.add_argument("--device", default="auto", help=_DEVICE_HELP)
    pr.add_argument("--json", action="store_true", help="one JSON object per image (class, top_k, subdomains...)")
    pr.add_argument("--top-k", type=int, default=3, metavar="K", help="classes listed in top_k of --json (default: 3)")
    pr.add_argument("--batch-size", type=int, default=64, help="images read and classified at a time (default: 64)")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="write a model as ONNX or TorchScript (float32 images in 0..255 -> "
                        "probabilities, any batch size) or safetensors (weights, spec as metadata)")
    ex.add_argument("--checkpoint", required=True, help="a .pt file, or a run folder holding one")
    ex.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"],
                    help="onnx needs ddcnn[export]")
    ex.add_argument("--out", required=True, metavar="FILE", help="the file (with --per-local-cnn: the folder) to write")
    ex.add_argument("--per-local-cnn", action="store_true", help="safetensors: each local CNN as a standalone backbone")
    ex.set_defaults(func=cmd_export)

    ag = sub.add_parser("aggregators", help="list the aggregators")
    ag.set_defaults(func=cmd_aggregators)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on its dataset's test split")
    ev.add_argument("--checkpoint", required=True, help="a .pt file written by ddcnn train")
    ev.add_argument("--dataset", help="another dataset spec (same classes and image shape; default: the checkpoint's)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"],
                    help="the split of the dataset to evaluate on (default: test)")
    ev.add_argument("--device", default="auto", help=_DEVICE_HELP)
    ev.set_defaults(func=cmd_evaluate)

    ds = sub.add_parser("datasets", help="list the datasets, or describe what a dataset spec contains")
    ds.add_argument("spec", nargs="?", help="e.g. mnist5k, cifar10:PATH, imagefolder:PATH, csv:FILE, npz:PATH, "
                    "nifti:PATH")
    ds.add_argument("--image-size", type=int, default=None,
                    help="side length imagefolder and csv images are resized to, as in train (default: their own "
                    "size)")
    ds.add_argument("--intensity", default="auto", help="how raw values become stored levels, as in train: auto, "
                    "none, window:LO,HI or percentile:P1,P99 (default: auto)")
    ds.add_argument("--volume-shape", default=None, help="DxHxW grid nifti volumes are resampled to, as in train "
                    "(default: their own shape)")
    ds.set_defaults(func=cmd_datasets)

    md = sub.add_parser("models", help="list the backbones with their parameter counts, global and local for a grid")
    md.add_argument("--image-size", default="32x32", help="image shape, e.g. 32x32 or 28x28x28 (default: 32x32)")
    md.add_argument("--in-channels", type=int, default=3, help="image channels (default: 3)")
    md.add_argument("--num-classes", type=int, default=10, help="classes (default: 10)")
    md.add_argument("--grid", default="2x2", help="decomposition for the local CNNs' counts (default: 2x2)")
    md.add_argument("--backbone", action="append", metavar="NAME", help="only these (repeat or comma-separate), "
                    "registered or your own package.module:function (default: every registered backbone)")
    md.add_argument("--width", type=float, default=1.0, help="channel-width multiplier (default: 1)")
    md.add_argument("--local-width", type=float, help="width multiplier of the local CNNs (default: --width)")
    md.add_argument("--coarse", action="store_true", help="with a coarse level: its parameters and forward FLOPs too")
    md.set_defaults(func=cmd_models)
    for command in sub.choices.values():  # every command, also those added above this line
        _add_common_flags(command, default=argparse.SUPPRESS)
    return parser


@contextlib.contextmanager
def _run_folder(folder: Path, primary: bool, log_name: str) -> Iterator[None]:
    """On the primary process: hold the run folder (one run at a time, :mod:`ddcnn.run_folder`) and log to
    ``log_name`` in it; elsewhere, nothing."""
    if not primary:
        yield
        return
    from .run_folder import run_folder_lock

    with run_folder_lock(folder):
        handler = logging.FileHandler(folder / log_name)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        try:
            yield
        finally:
            log.removeHandler(handler)
            handler.close()


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """The command line; ``callbacks`` (:mod:`ddcnn.train.callbacks`) receive the training events of ``train``
    and ``compare``, for a script that adds a logger to the CLI: ``main(sys.argv[1:], callbacks=[MyLogger()])``."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.callbacks = tuple(callbacks)
    if args.quiet and hasattr(args, "progress"):
        args.progress = False  # --quiet: no progress bars either
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.raiseExceptions = args.debug  # a log line that cannot be written (a full disk) is no traceback
    try:
        return args.func(args)
    except DDCNNError as e:
        if args.debug:
            raise
        from .train.signals import TrainingInterrupted

        print(f"ddcnn: error: {e}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, TrainingInterrupted) else 2
    except OSError as e:
        from .checkpoint import DISK_FULL

        if args.debug or e.errno not in DISK_FULL:
            raise
        print(f"ddcnn: error: {e.filename or 'a file'}: the disk is full ({e.strerror}); free space and run "
              "again (with --resume to continue from the last checkpoint)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
