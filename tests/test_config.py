import dataclasses
from pathlib import Path

import pytest

from ddcnn.cli import COMPARE_SKIP, get_args_parser, resolve_config, resolve_run_config
from ddcnn.compare import RUN_ONLY, CompareConfig, _run_config
from ddcnn.config import (
    AGGREGATOR_INPUTS,
    DTYPES,
    GROUPS,
    METHOD_NAMES,
    OPTIMIZERS,
    PARALLEL_MODES,
    SCHEDULES,
    DataConfig,
    ModelConfig,
    RunConfig,
    SharedOptions,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    inapplicable_options,
    load_yaml,
    option,
    parse_grid,
)
from ddcnn.errors import ConfigError

STUDY = Path(__file__).resolve().parent.parent / "study"


def test_parse_grid():
    assert parse_grid("2x2") == (2, 2)
    assert parse_grid("2x3x4") == (2, 3, 4)
    assert parse_grid([4, 4]) == (4, 4)
    for bad in ["2", "2x", "0x2", "axb", "2x2x2x2"]:
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_round_trip_through_dict():
    cfg = RunConfig(method="local")
    cfg.model.grid = (4, 4)
    cfg.train.lr = 0.1
    again = config_from_dict(RunConfig, config_to_dict(cfg))
    assert again == cfg


def test_unknown_key_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.gird'; known keys of model: backbone"):
        config_from_dict(RunConfig, {"model": {"gird": "2x2"}})


def test_wrong_types_are_clear():
    with pytest.raises(ConfigError, match="train.epochs' must be an integer"):
        config_from_dict(RunConfig, {"train": {"epochs": 2.5}})
    with pytest.raises(ConfigError, match="must be true or false"):
        config_from_dict(RunConfig, {"data": {"augment": "maybe"}})


def _args(*argv):
    return get_args_parser().parse_args(["train", *argv])


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: local\nmodel:\n  grid: 4x4\n  backbone: resnet20\nepochs: 7\nlr: 0.2\n")
    args = _args("--lr", "0.01", "--no-augment", "--grid", "2x2")
    cfg = resolve_run_config(args, load_yaml(path))
    assert cfg.method == "local"
    assert cfg.model.backbone == "resnet20"
    assert cfg.model.grid == (2, 2)  # flag beats YAML
    assert cfg.train.epochs == 7  # flat YAML keys find their section
    assert cfg.train.lr == 0.01
    assert cfg.data.augment is False


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        resolve_run_config(_args(), load_yaml(path))
    path.write_text("learning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        resolve_run_config(_args(), load_yaml(path))


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)


# -- options that document themselves ---------------------------------------------------------------------------

SECTION_NAMES = ("data", "model", "train")


def _option_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.name not in SECTION_NAMES]


@pytest.mark.parametrize("cls", [DataConfig, ModelConfig, TrainConfig, RunConfig, CompareConfig])
def test_every_option_has_help_and_a_group(cls):
    for f in _option_fields(cls):
        assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help"
        assert f.metadata.get("group") in GROUPS, f"{cls.__name__}.{f.name} has no group"


def test_choices_come_from_the_constants_and_are_checked():
    choices = {f.name: f.metadata.get("choices") for cls in (TrainConfig, RunConfig) for f in _option_fields(cls)}
    assert choices["optimizer"] == OPTIMIZERS and choices["schedule"] == SCHEDULES
    assert choices["parallel"] == PARALLEL_MODES and choices["dtype"] == DTYPES
    assert choices["aggregator_inputs"] == AGGREGATOR_INPUTS
    with pytest.raises(ConfigError, match="optimizer must be one of sgd, adamw, got 'adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="normalize must be one of data, imagenet, got 'unit'"):
        DataConfig(normalize="unit")
    with pytest.raises(ConfigError, match="aggregator_inputs must be one of train, crossfit, val, augmented"):
        CompareConfig(aggregator_inputs="test")


def test_method_names_are_the_methods():
    from ddcnn.methods import list_methods

    assert list(METHOD_NAMES) == list_methods()
    assert all(m in _help(RunConfig, "method") for m in METHOD_NAMES)


def test_dnn_activation_help_names_every_activation():
    from ddcnn.models.aggregators import _ACTIVATIONS

    assert all(name in _help(ModelConfig, "dnn_activation") for name in _ACTIVATIONS)


def _help(cls, name):
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def _groups(cls):
    return {f.name: f.metadata["group"] for f in _option_fields(cls)}


def test_options_are_grouped_by_what_they_mean():
    groups = {**_groups(DataConfig), **_groups(ModelConfig), **_groups(TrainConfig), **_groups(RunConfig)}
    expected = {
        "output": {"out", "resume", "progress", "checkpoint_every"},
        "distributed": {"parallel", "dist_timeout", "ddp_hook", "powersgd_rank"},
        "aggregation": {"aggregator", "dnn_hidden", "dnn_activation", "dnn_dropout", "dnn_batchnorm", "aggregator_epochs",
                        "aggregator_inputs", "crossfit_folds", "augmented_passes", "transfer_aggregator",
                        "aggregator_batch_size", "aggregator_lr", "local_output", "feature_dim"},
        "model": {"method", "backbone", "width", "local_width", "grid", "overlap", "coarse", "pretrained",
                  "init_weights", "init_weights_sha256"},
        "device": {"device", "channels_last", "amp", "amp_dtype", "compile", "threads", "dtype"},
    }
    for group, names in expected.items():
        assert {n for n, g in groups.items() if g == group} == names, group
    assert {"dataset", "image_size", "augment", "val_fraction"} <= {n for n, g in groups.items() if g == "data"}
    assert {"epochs", "lr", "optimizer", "seed", "local_epochs"} <= {n for n, g in groups.items() if g == "training"}
    compare = _groups(CompareConfig)
    assert compare["grids"] == compare["methods"] == "model" and compare["aggregator_epochs"] == "aggregation"


def test_option_refuses_an_unknown_group():
    with pytest.raises(ValueError, match="option group 'speed'"):
        option(1, help="x", group="speed")


# -- one definition of the options train and compare share -------------------------------------------------------


def test_compare_has_every_option_of_a_run_but_those_it_sets_per_phase():
    run = {f.name for f in dataclasses.fields(RunConfig)}
    compare = {f.name for f in dataclasses.fields(CompareConfig)}
    assert run - compare == set(RUN_ONLY)  # a new RunConfig option must be compare's too, or be set per phase
    shared = {f.name for f in dataclasses.fields(SharedOptions)}
    assert {"resume", "aggregator_inputs", "crossfit_folds", "augmented_passes", "transfer_aggregator"} <= shared
    assert issubclass(RunConfig, SharedOptions) and issubclass(CompareConfig, SharedOptions)


def test_compare_passes_the_shared_options_to_every_phase(tmp_path):
    changed = {"resume": True, "aggregator_inputs": "crossfit", "crossfit_folds": 5, "augmented_passes": 4,
               "transfer_aggregator": True, "aggregator_batch_size": 64, "aggregator_lr": 0.05}
    assert set(changed) == {f.name for f in dataclasses.fields(SharedOptions)}  # every shared option is changed
    cc = CompareConfig(**changed)
    for pretrained in (False, True):
        cfg = _run_config(cc, "2x2", 3, tmp_path, epochs=2, pretrained=pretrained)
        assert {name: getattr(cfg, name) for name in changed} == changed
        assert cfg.model.grid == (2, 2) and cfg.train.seed == 3 and cfg.train.epochs == 2
        assert cfg.pretrained == (str(tmp_path) if pretrained else None)


# -- options that do not apply ------------------------------------------------------------------------------------


def _warnings(**changes):
    cfg = RunConfig()
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    return inapplicable_options(cfg)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"model__grid": (2, 2)}, "--grid 2x2 has no effect with --method global"),
        ({"model__overlap": 2, "method": "local"}, "--overlap has no effect on the grid 1x1"),
        ({"data__dataset": "npz:x.npz", "data__image_size": 64}, "--image-size 64 has no effect on the dataset npz"),
        ({"data__dataset": "mnist5k", "data__image_size": 64}, "--image-size 64 has no effect"),
        ({"train__amp": True, "train__device": "cpu"}, "--amp has no effect on the device cpu"),
        ({"pretrained": "runs/x", "method": "coherent"}, "--pretrained has no effect with --method coherent"),
        ({"method": "local", "aggregator_inputs": "val"}, "--aggregator-inputs has no effect: --method local trains "
         "no aggregator"),
        ({"method": "coherent", "crossfit_folds": 5}, "--crossfit-folds has no effect"),
        ({"method": "global", "augmented_passes": 5}, "--augmented-passes has no effect"),
        ({"method": "aggregation", "crossfit_folds": 5}, "--crossfit-folds has no effect with --aggregator-inputs train"),
        ({"method": "aggregation", "model__aggregator": "mean", "aggregator_epochs": 3}, "--aggregator-epochs has no effect: "
         "--aggregator mean is not trained"),
        ({"method": "aggregation", "model__aggregator": "linear", "model__dnn_hidden": (8,)}, "--dnn-hidden has no "
         "effect with --aggregator linear"),
        ({"method": "local", "model__aggregator": "mean"}, "--aggregator has no effect with --method local"),
        ({"method": "coherent", "transfer_aggregator": True}, "--transfer-aggregator has no effect with --method "
         "coherent"),
        ({"method": "transfer", "transfer_aggregator": True, "model__aggregator": "vote"}, "it learns nothing"),
        ({"method": "transfer", "aggregator_inputs": "val"}, "--aggregator-inputs has no effect"),
        ({"method": "coherent", "local_epochs": 3}, "--local-epochs has no effect with --method coherent"),
        ({"method": "aggregation", "pretrained": "runs/x", "local_epochs": 3}, "--local-epochs has no effect with "
         "--pretrained"),
        ({"method": "transfer", "pretrained": "runs/x", "model__init_weights": "w.pt"}, "--init-weights has no effect "
         "with --method transfer and --pretrained"),
        ({"data__augment": False, "data__flip": True}, "--flip has no effect with --no-augment"),
        ({"train__schedule": "constant", "train__warmup_fraction": 0.5}, "--warmup-fraction has no effect"),
        ({"train__optimizer": "adamw", "train__momentum": 0.5}, "--momentum has no effect with --optimizer adamw"),
        ({"method": "local", "aggregator_batch_size": 64}, "--aggregator-batch-size has no effect: --method local"),
        ({"method": "aggregation", "model__aggregator": "vote", "aggregator_lr": 0.1}, "--aggregator-lr has no "
         "effect: --aggregator vote is not trained"),
        ({"method": "aggregation", "pretrained": "runs/x", "train__lr": 0.1}, "--lr has no effect with --method "
         "aggregation --pretrained: a trained aggregator trains with adamw at --aggregator-lr"),
    ],
)
def test_options_that_do_not_apply_are_named(changes, fragment):
    messages = _warnings(**changes)
    assert any(fragment in m for m in messages), messages
    assert all("\n" not in m for m in messages)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"method": "local", "model__grid": (2, 2), "model__overlap": 2, "local_epochs": 3},
        {"method": "aggregation", "model__grid": (2, 2), "aggregator_inputs": "crossfit", "crossfit_folds": 5,
         "aggregator_epochs": 3, "local_epochs": 2, "pretrained": "runs/x"},  # crossfit trains local phases of its own
        {"method": "aggregation", "aggregator_inputs": "augmented", "augmented_passes": 4},
        {"method": "aggregation", "aggregator_batch_size": 64, "aggregator_lr": 0.1, "train__lr": 0.1},  # + local
        {"method": "transfer", "transfer_aggregator": True, "aggregator_epochs": 3, "aggregator_inputs": "val"},
        {"method": "coherent", "model__aggregator": "linear"},
        {"data__dataset": "imagefolder:x", "data__image_size": 64},
        {"data__dataset": "cifar10", "data__image_size": 64},  # an image tree in the cache may be resized
        {"train__amp": False, "train__dtype": "float64"},
        {"method": "transfer", "model__init_weights": "w.pt"},  # its local phase starts from them
        {"method": "aggregation", "pretrained": "runs/x", "aggregator_inputs": "crossfit", "model__init_weights": "w"},
    ],
)
def test_options_that_apply_give_no_warning(changes):
    assert _warnings(**changes) == []


def test_contradicting_options_are_an_error():
    with pytest.raises(ConfigError, match="amp .* and dtype float64 contradict"):
        _warnings(train__amp=True, train__dtype="float64")


def test_an_unknown_method_is_left_to_the_run():
    assert _warnings(method="magic", model__grid=(2, 2)) == []


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"methods": ("global", "local"), "transfer_aggregator": True}, "--transfer-aggregator has no effect"),
        ({"methods": ("global", "local", "mean"), "aggregator_inputs": "val"}, "--aggregator-inputs has no effect"),
        ({"methods": ("global", "local", "dnn"), "crossfit_folds": 4}, "--crossfit-folds has no effect with "
         "--aggregator-inputs train"),
        ({"methods": ("global",), "coherent_epochs": 3}, "--coherent-epochs has no effect"),
        ({"methods": ("local", "dnn"), "global_epochs": 3}, "--global-epochs has no effect"),
        ({"methods": ("global", "coherent"), "local_epochs": 3}, "--local-epochs has no effect"),
        ({"methods": ("global", "mean"), "model": ModelConfig(aggregator="linear")}, "--aggregator has no effect"),
        ({"grids": ("1x1",), "model": ModelConfig(overlap=2)}, "--overlap has no effect"),
        ({"methods": ("local", "linear"), "model": ModelConfig(dnn_dropout=0.5)}, "--dnn-dropout has no effect"),
    ],
)
def test_compare_names_the_options_no_phase_reads(changes, fragment):
    messages = CompareConfig(**changes).inapplicable_options()
    assert any(fragment in m for m in messages), messages


def test_compare_defaults_and_the_study_configs_give_no_warning():
    assert CompareConfig().inapplicable_options() == []
    cc = CompareConfig(methods=("local", "transfer"), transfer_aggregator=True, aggregator_epochs=3)
    assert cc.inapplicable_options() == []  # transfer's aggregation phase trains the dnn
    args = get_args_parser().parse_args(["compare"])
    for path in sorted(STUDY.glob("*.yaml")):
        cc = resolve_config(CompareConfig, args, load_yaml(path), COMPARE_SKIP)
        assert cc.inapplicable_options() == [], path.name
