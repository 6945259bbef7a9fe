import json
from dataclasses import replace

import pytest
import yaml

from ddcnn.cli import COMPARE_SKIP, get_args_parser, main, resolve_config
from ddcnn.compare import COMPARE_METHODS, CompareConfig, compare
from ddcnn.config import DataConfig, ModelConfig, TrainConfig
from ddcnn.errors import ConfigError, UnknownNameError
from ddcnn.train import load_checkpoint

ROW_KEYS = {
    "method", "grid", "seed", "test_accuracy", "val_accuracy", "parameters", "train_seconds", "images_per_second",
}


def tiny_compare(out, data: DataConfig, **changes) -> CompareConfig:
    cfg = CompareConfig(
        out=str(out), grids=("2x2",), seeds=(0,), epochs=1, local_epochs=1, aggregator_epochs=2, data=data,
        model=ModelConfig(backbone="vgg3", width=0.25, dnn_hidden=(16,)), train=TrainConfig(progress=False),
    )
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def two_seeds(tiny_data_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cfg = tiny_compare(out, tiny_data_config, seeds=(0, 1))
    return cfg, compare(cfg)


def test_compare_writes_every_method_for_every_seed(two_seeds):
    cfg, result = two_seeds
    payload = json.loads((result.out / "results.json").read_text())
    assert set(payload) == {"config", "class_counts", "rows", "provenance"} and payload["config"]["grids"] == ["2x2"]
    assert payload["class_counts"] == [36, 36, 36]  # the training split's images per class
    rows = payload["rows"]
    assert all(ROW_KEYS <= set(row) for row in rows)
    for seed in (0, 1):
        mine = [r for r in rows if r["seed"] == seed]
        assert {r["method"] for r in mine} == set(COMPARE_METHODS)
        assert sorted(r["subdomain"] for r in mine if r["method"] == "local") == [0, 1, 2, 3]
        assert [r["grid"] for r in mine if r["method"] == "global"] == ["1x1"]
        assert all(r["grid"] == "2x2" for r in mine if r["method"] != "global")
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)


def test_compare_writes_the_table_and_plots(two_seeds):
    cfg, result = two_seeds
    table = (result.out / "results.md").read_text()
    assert table == result.markdown
    assert "| method | 1x1 | 2x2 |" in table and "mean ± std over 2 seeds" in table
    for method in COMPARE_METHODS:
        assert f"| {method} |" in table
    assert " ± " in table.split("| dnn |")[1].splitlines()[0]
    assert "incl. local phase" in table
    for png in ("accuracy.png", "curves_1x1.png", "curves_2x2.png", "subdomains.png"):
        assert (result.out / png).stat().st_size > 0


def test_compare_resume_does_not_train_finished_phases_again(two_seeds):
    cfg, result = two_seeds
    folder = result.out / "2x2" / "seed0"
    checkpoints = sorted(folder.glob("*.pt")) + [result.out / "1x1" / "seed0" / "global.pt"]
    assert all(load_checkpoint(p)["finished"] for p in checkpoints)
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    again = compare(replace(cfg, seeds=(0,), resume=True))
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps
    first = {(r["method"], r.get("subdomain")): r["test_accuracy"] for r in result.rows if r["seed"] == 0}
    assert {(r["method"], r.get("subdomain")): r["test_accuracy"] for r in again.rows} == first


def test_compare_from_the_command_line_with_a_yaml_file(tmp_path, tiny_data_config, capsys):
    config = {
        "grids": ["2x2"], "methods": ["global", "local", "mean", "vote"], "epochs": 1,
        "data": {"dataset": tiny_data_config.dataset, "batch_size": 16, "cache_dir": tiny_data_config.cache_dir},
        "model": {"width": 0.25}, "progress": False,
    }
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["compare", "--config", str(tmp_path / "compare.yaml"), "--seeds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method | 1x1 | 2x2 |" in printed and "| vote |" in printed and "| dnn |" not in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"global", "local", "mean", "vote"} and {r["seed"] for r in rows} == {3}
    assert load_checkpoint(out / "2x2" / "seed3" / "local.pt")["config"]["model"]["backbone"] == "vgg3"


def test_compare_flags_keep_the_compare_defaults_of_the_sections():
    args = get_args_parser().parse_args(["compare", "--width", "0.25", "--grids", "2x2,4x4", "--seeds", "0,1",
                                         "--epochs", "2", "--coherent-epochs", "5"])
    cfg = resolve_config(CompareConfig, args, None, COMPARE_SKIP)
    assert cfg.model.backbone == CompareConfig().model.backbone and cfg.model.width == 0.25
    assert cfg.grids == ("2x2", "4x4") and cfg.seeds == (0, 1)
    # --epochs scales the phases without their own value: local pretraining twice as long, the cheap DNN 5x
    assert [cfg.phase_epochs(p) for p in ("global", "local", "aggregator", "coherent")] == [2, 4, 10, 5]


def test_compare_refuses_unknown_methods_and_bad_grids(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown method 'median'"):
        CompareConfig(methods=("global", "median"))
    with pytest.raises(ConfigError, match="grid '2by2'"):
        CompareConfig(grids=("2by2",))


def test_compare_on_volumes(tmp_path, make_npz):
    spec = f"npz:{make_npz(tmp_path / 'volumes.npz', n=60, shape=(8, 8, 8))}"
    data = DataConfig(dataset=spec, batch_size=8, crop_padding=1, cache_dir=str(tmp_path / "cache"))
    cfg = tiny_compare(tmp_path / "out", data, grids=("2x2x2",), methods=("local", "mean", "dnn"))
    result = compare(cfg)
    assert sorted(r["subdomain"] for r in result.rows if r["method"] == "local") == list(range(8))
    assert {r["grid"] for r in result.rows} == {"2x2x2"}
    assert (result.out / "subdomains.png").stat().st_size > 0


def test_a_stopped_compare_keeps_the_results_of_its_finished_seeds(tmp_path, tiny_data_config, monkeypatch):
    import ddcnn.compare as compare_module

    run_global = compare_module.run_global

    def stop_at_seed_1(exp):
        if exp.cfg.train.seed == 1:
            raise KeyboardInterrupt  # as a SIGTERM or Ctrl-C during seed 1
        return run_global(exp)

    monkeypatch.setattr(compare_module, "run_global", stop_at_seed_1)
    cfg = tiny_compare(tmp_path, tiny_data_config, seeds=(0, 1), methods=("global", "local", "mean"))
    with pytest.raises(KeyboardInterrupt):
        compare(cfg)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["seed"] for r in rows} == {0} and {r["method"] for r in rows} == {"global", "local", "mean"}
    assert "| mean |" in (tmp_path / "results.md").read_text() and (tmp_path / "accuracy.png").is_file()
