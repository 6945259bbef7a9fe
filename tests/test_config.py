import pytest

from ddcnn.cli import get_args_parser, resolve_run_config
from ddcnn.config import RunConfig, config_from_dict, config_to_dict, load_yaml, parse_grid
from ddcnn.errors import ConfigError


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
