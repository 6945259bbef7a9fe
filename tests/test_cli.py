"""Every bad input a user can give gets one clear line on stderr and a non-zero exit, no traceback."""

import argparse
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ddcnn.cli import get_args_parser, main
from ddcnn.config import GROUPS


def _tree(root, classes=("a", "b"), per_class=4, size=16, splits=("train", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _npz(path, n=40, size=8, labels=None, dtype=np.uint8, nan=False):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, size, size)).astype(dtype)
    if nan:
        x = x.astype(np.float32)
        x[3, 2, 2] = np.nan
    y = np.arange(n) % 2 if labels is None else labels
    np.savez(path, x=x, y=y, class_names=np.array(["zero", "one"]))
    return path


def _fails(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ddcnn: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _train(tmp_path, dataset, *more):
    return ["-q", "train", "--dataset", dataset, "--out", str(tmp_path / "run"), "--epochs", "1", "--backbone",
            "vgg3", "--width", "0.25", "--no-progress", "--cache-dir", str(tmp_path / "cache"), *more]


def test_corrupt_image(tmp_path, capsys):
    root = _tree(tmp_path / "data")
    (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _fails(capsys, _train(tmp_path, f"imagefolder:{root}"), "1.png", "cannot be decoded")


def test_unsupported_image_mode(tmp_path, capsys):
    root = _tree(tmp_path / "data")
    Image.fromarray(np.zeros((16, 16), dtype=np.float32), mode="F").save(root / "train" / "a" / "9.tiff")
    _fails(capsys, _train(tmp_path, f"imagefolder:{root}"), "9.tiff", "mode F")


def test_empty_class_folder(tmp_path, capsys):
    root = _tree(tmp_path / "data")
    (root / "train" / "c").mkdir()
    (root / "test" / "c").mkdir()
    _fails(capsys, _train(tmp_path, f"imagefolder:{root}"), "holds no images")


def test_missing_train_split(tmp_path, capsys):
    root = _tree(tmp_path / "data", splits=("val", "test"))
    _fails(capsys, _train(tmp_path, f"imagefolder:{root}"), "no train/")


def test_images_smaller_than_the_grid_allows(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    _fails(capsys, _train(tmp_path, f"npz:{data}", "--method", "local", "--grid", "4x4"), "2x2 pixels", "coarser grid")


def test_more_subdomains_than_pixels(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    _fails(capsys, _train(tmp_path, f"npz:{data}", "--method", "local", "--grid", "9x9"), "do not fit")


def test_overlap_wider_than_subdomain(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    _fails(capsys, _train(tmp_path, f"npz:{data}", "--method", "local", "--grid", "2x2", "--overlap", "5"),
           "overlap 5 is wider than a subdomain")


def test_labels_out_of_range(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", labels=np.arange(40) % 3)  # 3 labels, 2 class names
    _fails(capsys, _train(tmp_path, f"npz:{data}"), "label")


def test_nan_in_data(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", nan=True)
    _fails(capsys, _train(tmp_path, f"npz:{data}"), "NaN")


@pytest.mark.parametrize(
    "flag, value, kind",
    [("--dataset", "mnist6k", "dataset"), ("--backbone", "vgg99", "backbone"), ("--method", "magic", "method")],
)
def test_unknown_names_list_the_known_ones(tmp_path, capsys, flag, value, kind):
    argv = _train(tmp_path, "mnist5k", "--limit-train", "40", flag, value)  # the last flag wins
    err = _fails(capsys, argv, f"unknown {kind} '{value}'", "choose one of")
    assert "mnist5k" in err or "vgg9" in err or "global" in err


def test_yaml_with_unknown_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: vgg3\n  grids: 2x2\n")
    _fails(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "run")], "unknown config key 'model.grids'")


def test_checkpoint_of_another_number_of_classes(tmp_path, capsys):
    two = _npz(tmp_path / "two.npz")
    assert main(_train(tmp_path, f"npz:{two}", "--method", "global", "--batch-size", "8")) == 0
    rng = np.random.default_rng(1)
    three = tmp_path / "three.npz"
    np.savez(three, x=rng.integers(0, 255, (30, 8, 8)).astype(np.uint8), y=np.arange(30) % 3)
    capsys.readouterr()
    _fails(capsys, ["evaluate", "--checkpoint", str(tmp_path / "run" / "global.pt"), "--dataset", f"npz:{three}"],
           "num_classes 2", "needs 3")


def test_missing_checkpoint(tmp_path, capsys):
    _fails(capsys, ["evaluate", "--checkpoint", str(tmp_path / "nothing.pt")], "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    from ddcnn.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        main(["--debug", *_train(tmp_path, "mnist6k")])


def test_output_folder_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder should go")
    argv = _train(tmp_path, "mnist5k", "--limit-train", "40")
    argv[argv.index("--out") + 1] = str(blocker / "run")
    _fails(capsys, argv, "is not writable", "choose another --out")


# -- --help: every option explains itself, in groups by what it means ----------------------------------------------


def _subparsers():
    parser = get_args_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def _described(action):
    return re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()


def test_every_option_of_every_command_has_a_description():
    parser, commands = _subparsers()
    for name, command in [("ddcnn", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert len(_described(action)) > 3, f"{name} {action.option_strings or action.dest} has no description"


@pytest.mark.parametrize("command", ["train", "compare"])
def test_train_and_compare_options_show_description_and_default(command):
    _, commands = _subparsers()
    flags = [a for a in commands[command]._actions if a.option_strings and a.dest not in ("help", "config", "quiet", "debug")]
    assert len(flags) > 50
    for action in flags:
        assert "(default: " in action.help, action.option_strings
        assert len(_described(action)) > 10, action.option_strings
    text = commands[command].format_help()
    assert "DataConfig" not in text and "TrainConfig" not in text


def _flag_groups(parser):
    return {a.option_strings[0]: group.title for group in parser._action_groups for a in group._group_actions
            if a.option_strings}


def test_options_are_grouped_by_what_they_mean_to_a_user():
    _, commands = _subparsers()
    for command in ("train", "compare"):
        groups = _flag_groups(commands[command])
        assert set(groups.values()) == {"options", *GROUPS}
        for flag in ("--out", "--resume", "--progress", "--checkpoint-every"):
            assert groups[flag] == "output", flag
        for flag in ("--parallel", "--dist-timeout"):
            assert groups[flag] == "distributed", flag
        for flag in ("--aggregator", "--dnn-hidden", "--aggregator-epochs", "--aggregator-inputs", "--crossfit-folds",
                     "--augmented-passes", "--transfer-aggregator"):
            assert groups[flag] == "aggregation", flag
        assert groups["--dataset"] == "data" and groups["--lr"] == "training" and groups["--device"] == "device"
    assert _flag_groups(commands["train"])["--method"] == "model"
    assert _flag_groups(commands["compare"])["--grids"] == "model"


def test_help_shows_choices_and_defaults_as_typed(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--optimizer {sgd,adamw}" in text and "--aggregator-inputs {train,crossfit,val,augmented}" in text
    assert "(default: 1x1)" in text and "(default: 128,128)" in text and "(default: unset)" in text
    assert "peak learning rate of the schedule (default: 0.05)" in text


# -- options that do not apply: one warning each ----------------------------------------------------------------


def test_train_warns_once_about_each_option_it_ignores(tmp_path, caplog):
    data = _npz(tmp_path / "d.npz")
    argv = _train(tmp_path, f"npz:{data}", "--method", "global", "--grid", "2x2", "--image-size", "32",
                  "--crossfit-folds", "5", "--batch-size", "8")
    with caplog.at_level(logging.WARNING, logger="ddcnn"):
        assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(warnings) == 3, warnings
    assert any("--grid 2x2" in w for w in warnings) and any("--image-size 32" in w for w in warnings)
    assert any("--crossfit-folds" in w for w in warnings)


def test_train_refuses_contradicting_options_before_any_work(tmp_path, capsys):
    _fails(capsys, _train(tmp_path, "mnist5k", "--amp", "--dtype", "float64"), "contradict")
    assert not (tmp_path / "run").exists()


def test_compare_warns_once_about_each_option_no_phase_reads(tmp_path, caplog, monkeypatch):
    import ddcnn.compare

    ran = []
    monkeypatch.setattr(ddcnn.compare, "_compare", lambda cc, *rest: ran.append(cc) or SimpleNamespace(markdown=""))
    argv = ["compare", "--out", str(tmp_path / "cmp"), "--methods", "global,local", "--transfer-aggregator",
            "--coherent-epochs", "3"]
    with caplog.at_level(logging.WARNING, logger="ddcnn"):
        assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(ran) == 1 and len(warnings) == 2, warnings
    assert any("--transfer-aggregator" in w for w in warnings) and any("--coherent-epochs" in w for w in warnings)


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("data: 5\n", "config section 'data' must be a mapping"),
        ("epochs: true\n", "config key 'train.epochs' must be int, got True"),
        ("model:\n  width: -1\n", "width must be a positive multiplier, got -1.0"),
        ("epochs: -2\n", "epochs must be at least 1, got -2"),
        ("train: [1, 2]\n", "config section 'train' must be a mapping"),
        ("lr: .nan\n", "lr must be a positive learning rate"),
        ("batch_size: 0\n", "batch_size must be at least 1"),
    ],
)
def test_bad_yaml_values_are_one_line_before_anything_is_written(tmp_path, capsys, yaml_text, fragment):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    _fails(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")], fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--method", "local", "--epochs", "0"], "epochs must be at least 1, got 0"),
        (["--width", "-0.5"], "width must be a positive multiplier"),
        (["--local-epochs", "0", "--method", "local"], "local_epochs must be at least 1"),
        (["--aggregator", "nope", "--method", "aggregation"], "unknown aggregator 'nope'"),
        (["--backbone", "nope"], "unknown backbone 'nope'"),
    ],
)
def test_bad_flags_are_one_line_before_anything_is_written(tmp_path, capsys, flags, fragment):
    _fails(capsys, ["train", *flags, "--out", str(tmp_path / "run")], fragment)
    assert not (tmp_path / "run").exists()


# -- what a user expects of the command line around a run ----------------------------------------------------------


def test_a_piped_run_writes_no_progress_bars(tmp_path):
    """Progress bars are on by default but only on a terminal: a log file or a SLURM .out gets no "\\r" updates,
    and still one plain line per epoch."""
    import subprocess
    import sys

    argv = [a for a in _train(tmp_path, "mnist5k", "--limit-train", "200") if a not in ("-q", "--no-progress")]
    done = subprocess.run([sys.executable, "-m", "ddcnn.cli", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    assert "epoch 1/1: loss" in done.stderr


@pytest.mark.parametrize("command", ["train", "compare", "predict", "evaluate", "datasets", "models", "aggregators"])
def test_quiet_and_debug_are_flags_of_every_command(command):
    parser = get_args_parser()
    needs = {"predict": ["--checkpoint", "x.pt", "a.png"], "evaluate": ["--checkpoint", "x.pt"]}.get(command, [])
    after = parser.parse_args([command, *needs, "--quiet", "--debug"])
    before = parser.parse_args(["-q", "--debug", command, *needs])
    neither = parser.parse_args([command, *needs])
    assert after.quiet and after.debug and before.quiet and before.debug
    assert not neither.quiet and not neither.debug


def test_quiet_turns_the_progress_bars_off(tmp_path, monkeypatch):
    seen = {}

    def fake_train(args):
        seen["progress"] = args.progress
        return 0

    monkeypatch.setattr("ddcnn.cli.cmd_train", fake_train)
    main(["train", "--quiet", "--out", str(tmp_path)])
    assert seen["progress"] is False
    main(["train", "--out", str(tmp_path)])
    assert seen["progress"] is None  # not set: the config's default (on, where stderr is a terminal)


def test_version_names_ddcnn_and_torch(capsys):
    import torch

    import ddcnn

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ddcnn {ddcnn.__version__} (torch {torch.__version__})"
