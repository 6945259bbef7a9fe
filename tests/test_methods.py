import csv
import json

import pytest
import torch

from ddcnn.cli import main
from ddcnn.config import RunConfig
from ddcnn.errors import CheckpointMismatchError, ConfigError
from ddcnn.evaluate import evaluate_checkpoint
from ddcnn.methods import METHODS, run
from ddcnn.models import LocalCNNs
from ddcnn.models.aggregators import DNNAggregator, LinearAggregator, list_aggregators
from ddcnn.models.cnn_dnn import CNNDNN
from ddcnn.models.spec import ModelSpec, model_from_checkpoint, spec_of
from ddcnn.phases import (
    Experiment,
    aggregation,
    aggregation_phase,
    aggregator_training_inputs,
    pretrained_local_cnns,
    run_local,
    run_transfer,
    train_local_cnns,
)
from ddcnn.train import load_checkpoint
from ddcnn.train.evaluation import evaluate


@pytest.fixture(scope="module")
def local_phase(tiny_data_config, tmp_path_factory):
    """A finished local phase on the tiny dataset (2x2 grid), shared by the tests that start from one."""
    from ddcnn.config import ModelConfig, RunConfig, TrainConfig

    out = tmp_path_factory.mktemp("local")
    model = ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2), dnn_hidden=(16,))
    cfg = RunConfig(out=str(out), data=tiny_data_config, model=model, train=TrainConfig(epochs=2, progress=False))
    result = run_local(Experiment.from_config(cfg))
    return out, result


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_writes_a_loadable_checkpoint(tmp_path, tiny_run, method):
    result = run(tiny_run(tmp_path, method=method))
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["rows"][0]["method"] == result.method and payload["phases"][result.method]["history"] == result.history
    assert (tmp_path / f"confusion_{result.method}.png").is_file()
    path = tmp_path / f"{result.method}.pt"
    state = load_checkpoint(path)
    assert state["finished"] and "meta" not in state
    spec = spec_of(state, path)  # written whole, and what it says rebuilds the model
    assert ModelSpec.from_dict(state["spec"]).to_dict() == state["spec"] and spec.method == result.method
    assert {k: v.shape for k, v in spec.build().state_dict().items()} == {k: v.shape for k, v in state["model"].items()}
    model = model_from_checkpoint(state, path)
    assert isinstance(model, CNNDNN if method in ("aggregation", "coherent", "transfer") else LocalCNNs)
    assert spec.kind == ("cnn_dnn" if isinstance(model, CNNDNN) else "local_cnns") and not model.training
    not_in_the_model = ("class_names", "mean", "std", "aggregator_options", "method", "dataset", "local_checkpoint")
    assert spec == ModelSpec.of(model, **{k: getattr(spec, k) for k in not_in_the_model})
    assert result.parameters == sum(p.numel() for p in model.parameters())
    assert 0.0 <= result.test.accuracy <= 1.0


def test_local_phase_reports_each_subdomain_every_epoch(local_phase):
    out, result = local_phase
    for key in ("train_subdomain_accuracy", "val_subdomain_accuracy", "test_subdomain_accuracy"):
        assert len(result.extra[key]) == 4
    assert all(len(row["train_subdomain_accuracy"]) == 4 for row in result.history)
    with open(out / "local_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and len(rows[-1]["val_subdomain_accuracy"].split()) == 4


def test_train_local_cnns_passes_epoch_end_to_the_trainer(tmp_path, tiny_run):
    exp = Experiment.from_config(tiny_run(tmp_path))
    rows = []
    _, fit = train_local_cnns(exp, exp.decomposition(), 3, "local", epoch_end=lambda trainer, row: rows.append(row))
    assert rows == fit.history and len(rows) == 3
    _, fit = train_local_cnns(exp, exp.decomposition(), 3, "again", epoch_end=lambda trainer, row: True)
    assert len(fit.history) == 1


def test_aggregation_phase_fits_every_aggregator_on_one_set_of_probabilities(tmp_path, tiny_run, local_phase):
    local_dir, local = local_phase
    exp = Experiment.from_config(tiny_run(tmp_path, pretrained=str(local_dir)))
    results = {r.method: r for r in aggregation_phase(exp, list_aggregators())}
    assert set(results) == set(list_aggregators())
    # averaging the probabilities is what the local phase reports as its ensemble
    assert results["mean"].test.accuracy == pytest.approx(local.test.accuracy)
    # weighted: the local CNNs' validation accuracies above chance (1/3), normalised
    skill = (torch.tensor(local.extra["val_subdomain_accuracy"]) - 1 / 3).clamp_min(0)
    expected = skill / skill.sum() if skill.sum() > 0 else torch.full((4,), 0.25)
    torch.testing.assert_close(torch.tensor(results["weighted"].extra["subdomain_weights"]), expected)
    for name, result in results.items():
        assert result.extra["total_train_seconds"] == pytest.approx(result.train_seconds + local.train_seconds)
        state = load_checkpoint(tmp_path / f"{name}.pt")
        assert state["finished"] and state["spec"]["kind"] == "cnn_dnn" and state["spec"]["aggregator"] == name
        assert state["spec"]["local_checkpoint"] == str(local_dir / "local.pt")
    assert results["mean"].train_seconds == 0 and len(results["dnn"].history) == 3


def test_a_cnn_dnn_checkpoint_evaluates_to_its_reported_accuracy(tmp_path, tiny_run, local_phase, capsys):
    exp = Experiment.from_config(tiny_run(tmp_path, pretrained=str(local_phase[0])))
    (result,) = aggregation_phase(exp, ["dnn"])
    report = evaluate_checkpoint(tmp_path / "dnn.pt", device="cpu")
    assert report["method"] == "dnn" and report["accuracy"] == pytest.approx(result.test.accuracy)
    assert len(report["subdomain_accuracy"]) == 4

    assert main(["evaluate", "--checkpoint", str(tmp_path / "dnn.pt"), "--split", "val", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["split"] == "val" and printed["accuracy"] == pytest.approx(result.val_accuracy)


def test_resume_keeps_finished_aggregators(tmp_path, tiny_run, local_phase):
    cfg = tiny_run(tmp_path, pretrained=str(local_phase[0]), resume=True)
    first = aggregation_phase(Experiment.from_config(cfg), ["dnn", "mean"])
    stamps = {name: (tmp_path / f"{name}.pt").stat().st_mtime_ns for name in ("dnn", "mean")}
    again = aggregation_phase(Experiment.from_config(cfg), ["dnn", "mean"])
    assert {name: (tmp_path / f"{name}.pt").stat().st_mtime_ns for name in ("dnn", "mean")} == stamps
    assert [r.test.accuracy for r in again] == [r.test.accuracy for r in first]
    assert again[0].train_seconds == first[0].train_seconds and again[0].history == first[0].history


@pytest.mark.parametrize("mode, rows", [("train", 108), ("val", 12), ("augmented", 216), ("crossfit", 108)])
def test_aggregator_inputs(tmp_path, tiny_run, local_phase, mode, rows):
    cfg = tiny_run(tmp_path, pretrained=str(local_phase[0]), aggregator_inputs=mode, crossfit_folds=2)
    exp = Experiment.from_config(cfg)
    decomposition = exp.decomposition()
    local_cnns, _ = pretrained_local_cnns(exp, decomposition)
    inputs = aggregator_training_inputs(exp, local_cnns, decomposition)
    assert inputs.probabilities.shape == (rows, 4, 3) and len(inputs.labels) == rows
    torch.testing.assert_close(inputs.probabilities.sum(-1), torch.ones(rows, 4))
    if mode == "crossfit":  # two local phases, each on half of the training images
        for fold in (0, 1):
            assert load_checkpoint(tmp_path / f"crossfit{fold}.pt")["finished"]
        torch.testing.assert_close(inputs.labels, exp.data.train.labels)


def test_a_trained_aggregator_trains_with_adamw_at_its_own_batch_size_and_lr(tmp_path, tiny_run, local_phase):
    # 108 training probability vectors in steps of 40: 2 steps an epoch (a last partial batch is dropped)
    cfg = tiny_run(tmp_path, pretrained=str(local_phase[0]), aggregator_batch_size=40, train__schedule="constant")
    (dnn,) = aggregation_phase(Experiment.from_config(cfg), ["dnn"])
    assert [row["images"] for row in dnn.history] == [80, 80, 80]
    assert {row["lr"] for row in dnn.history} == {DNNAggregator.default_lr}
    assert 0 < dnn.extra["input_seconds"] <= dnn.train_seconds  # the inference pass is part of its cost
    train = aggregation.aggregator_train_config(cfg, LinearAggregator(4, 3))
    assert (train.optimizer, train.lr, train.schedule) == ("adamw", LinearAggregator.default_lr, "constant")
    cfg.aggregator_lr = 0.02
    assert aggregation.aggregator_train_config(cfg, LinearAggregator(4, 3)).lr == 0.02


def test_cpu_chunks_cut_the_batches_and_change_no_probability(tmp_path, tiny_run, local_phase):
    exp = Experiment.from_config(tiny_run(tmp_path, pretrained=str(local_phase[0])))
    local_cnns, _ = pretrained_local_cnns(exp, exp.decomposition())
    loader = exp.loader("train")  # 108 images in batches of 64 and 44
    chunks = aggregation._Chunks(loader, pixels=10 * 16 * 16, min_images=4)  # 10 images of 16x16 pixels
    assert [len(x) for x, _ in chunks] == [10] * 6 + [4] + [10] * 4 + [4]
    assert [len(x) for x, _ in aggregation._Chunks(loader, pixels=1, min_images=4)] == [4] * 27
    whole = evaluate(local_cnns, loader, exp.cfg.train, exp.device, collect=True)
    chunked = evaluate(local_cnns, chunks, exp.cfg.train, exp.device, collect=True)
    torch.testing.assert_close(chunked.probabilities, whole.probabilities, rtol=1e-4, atol=1e-5)
    assert torch.equal(chunked.labels, whole.labels)
    default = aggregation.local_probabilities(local_cnns, loader, exp.cfg.train, exp.device)  # chunked on the CPU
    torch.testing.assert_close(default.probabilities, whole.probabilities, rtol=1e-4, atol=1e-5)


def test_unknown_aggregator_inputs_is_a_config_error_before_anything_trains():
    with pytest.raises(ConfigError, match="aggregator_inputs must be one of train, crossfit, val, augmented, got 'test'"):
        RunConfig(aggregator_inputs="test")


def test_transfer_starts_from_the_pretrained_local_cnns_and_dnn(tmp_path, tiny_run, local_phase):
    local_dir = local_phase[0]
    aggregation_phase(Experiment.from_config(tiny_run(tmp_path / "dnn", pretrained=str(local_dir))), ["dnn"])
    # lr 0: an epoch of "training" leaves every parameter where the initialisation put it
    cfg = tiny_run(tmp_path / "transfer", pretrained=str(tmp_path / "dnn"), transfer_aggregator=True, train__lr=0.0)
    result = run_transfer(Experiment.from_config(cfg))
    state = load_checkpoint(tmp_path / "transfer" / "transfer.pt")
    dnn = load_checkpoint(tmp_path / "dnn" / "dnn.pt")["model"]
    local = load_checkpoint(local_dir / "local.pt")["model"]
    for name, _ in model_from_checkpoint(state).named_parameters():
        assert torch.equal(state["model"][name], dnn[name]), name
        if name.startswith("local_cnns."):
            assert torch.equal(state["model"][name], local[name.removeprefix("local_cnns.")]), name
    assert result.extra["local_train_seconds"] > 0


def test_transfer_refuses_local_cnns_of_another_grid(tmp_path, tiny_run, local_phase):
    cfg = tiny_run(tmp_path, pretrained=str(local_phase[0]), model__grid=(4, 4))
    with pytest.raises(CheckpointMismatchError, match=r"grid \(2, 2\) but this run needs \(4, 4\)"):
        run_transfer(Experiment.from_config(cfg))
