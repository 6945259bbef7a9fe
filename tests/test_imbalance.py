"""Class imbalance: the balanced class weights and the weighted loss, the class-balanced sampler (its frequencies,
seeding and sharding), the options' warnings, the balanced accuracy and AUC tables, and a tiny class-weighted run on
AdrenalMNIST3D (77/23)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from test_distributed import assert_same_run
from test_distributed import train as train_in_processes
from torch import nn

from ddcnn.cli import main
from ddcnn.compare import CompareConfig
from ddcnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, inapplicable_options
from ddcnn.data import ImageSet, make_loader
from ddcnn.data.sampling import epoch_order
from ddcnn.errors import ConfigError, DatasetError
from ddcnn.methods import run
from ddcnn.models import model_from_checkpoint
from ddcnn.models.aggregators import create_aggregator
from ddcnn.phases import Experiment
from ddcnn.phases.aggregation import LocalProbabilities, TensorLoader, fit_aggregator
from ddcnn.tables import is_imbalanced, results_markdown
from ddcnn.train import Trainer, evaluate, load_checkpoint
from ddcnn.train.evaluation import balanced_class_weights, classification_loss, training_class_weights
from ddcnn.train.metrics import classification_report

CPU = torch.device("cpu")
ADRENAL = Path(__file__).parents[2] / "shared/data/adrenalmnist3d/adrenalmnist3d_28.npz"
SIGMAS = 5  # bounds of binomial counts: 5 standard deviations (a true failure once in ~1.7 million per count)


# -- class weights and the weighted loss ---------------------------------------------------------------------------


def test_balanced_weights_are_n_over_k_times_the_class_count():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])  # n = 6, K = 3, counts 3, 1, 2
    weights = balanced_class_weights(labels, 3)
    assert weights.tolist() == pytest.approx([6 / 9, 6 / 3, 6 / 6], rel=1e-15)
    assert float(weights[labels].mean()) == pytest.approx(1.0, rel=1e-15)  # the images' weights average 1
    sklearn = compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy())
    assert weights.tolist() == pytest.approx(sklearn.tolist(), rel=1e-15)
    assert training_class_weights(TrainConfig(), labels, 3) is None
    assert torch.equal(training_class_weights(TrainConfig(class_weights="balanced"), labels, 3), weights)


def test_balanced_weights_need_every_class():
    with pytest.raises(DatasetError, match=r"class\(es\) \[1\] have none"):
        balanced_class_weights(torch.tensor([0, 0, 2]), 3)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_the_weighted_loss_is_each_images_loss_times_its_weight_over_the_batch(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 2, 1, 0])
    weights = torch.tensor([0.5, 3.0, 1.25], dtype=torch.float64)
    log_p = logits.log_softmax(-1)
    per_image = [
        (1 - smoothing) * -log_p[i, y[i]] + smoothing / 3 * -log_p[i].sum() for i in range(5)
    ]  # cross-entropy with label smoothing, by hand
    expected = sum(weights[y[i]] * per_image[i] for i in range(5)) / 5
    loss = classification_loss(logits, y, smoothing, weights)
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    # weights of one are the unweighted loss; (B, N, K) logits: the sum over the subdomains of each one's loss
    ones = torch.ones(3, dtype=torch.float64)
    assert float(classification_loss(logits, y, smoothing, ones)) == pytest.approx(
        float(classification_loss(logits, y, smoothing)), rel=1e-12
    )
    local = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    by_subdomain = sum(classification_loss(local[:, i], y, smoothing, weights) for i in range(4))
    assert float(classification_loss(local, y, smoothing, weights)) == pytest.approx(float(by_subdomain), rel=1e-12)


def _linear_trainer(cfg: TrainConfig, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double()
    return Trainer(model, cfg, CPU, cfg.epochs, **kwargs)


def test_the_trainer_logs_the_weighted_loss_and_refuses_missing_weights():
    images = torch.randint(0, 256, (12, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.tensor([0] * 9 + [1] * 3)
    split = ImageSet(images, labels)
    cfg = TrainConfig(epochs=1, progress=False, dtype="float64", class_weights="balanced")
    weights = balanced_class_weights(labels, 2)
    with pytest.raises(ConfigError, match="needs the Trainer's class_weights"):
        _linear_trainer(cfg)
    with pytest.raises(ConfigError, match="needs the Trainer's class_weights"):
        _linear_trainer(TrainConfig(epochs=1), class_weights=weights)
    trainer = _linear_trainer(cfg, class_weights=weights)
    loader = make_loader(
        split, batch_size=12, train=True, cfg=DataConfig(augment=False), mean=(0.5,), std=(0.25,), device=CPU
    )
    x, y = next(iter(loader))  # the one batch of epoch 0, as the trainer will see it
    with torch.no_grad():
        expected = classification_loss(trainer.model(x.double()), y, 0.0, weights)
    row = trainer.fit(loader).history[0]  # one step: the logged loss is that of the model before it
    assert row["train_loss"] == pytest.approx(float(expected), rel=1e-12)


# -- the class-balanced sampler --------------------------------------------------------------------------------------


def _indexed(labels: torch.Tensor) -> ImageSet:
    """Images whose one level is their index, so that a batch says which images it holds."""
    n = len(labels)
    return ImageSet(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(), labels)


def _drawn(loader) -> torch.Tensor:
    """The indices of the images of one epoch of ``loader`` (images of :func:`_indexed`, mean 0 and std 1)."""
    return torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in loader])


def _loader(split: ImageSet, **kwargs):
    options = {
        "batch_size": 10,
        "train": True,
        "cfg": DataConfig(augment=False),
        "mean": (0.0,),
        "std": (1.0,),
        "device": CPU,
        "sampler": "balanced",
    }
    return make_loader(split, **(options | kwargs))


LABELS = torch.tensor([0] * 90 + [1] * 9 + [2])  # 90/9/1: class 2 is one image


def test_balanced_epochs_draw_every_class_and_every_image_of_a_class_equally():
    loader, epochs = _loader(_indexed(LABELS)), 200
    counts = torch.zeros(len(LABELS), dtype=torch.long)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        drawn = _drawn(loader)
        assert len(drawn) == len(LABELS)  # an epoch is as long as a uniform one
        counts += torch.bincount(drawn, minlength=len(LABELS))
    total = epochs * len(LABELS)  # independent draws: a class's count is Binomial(total, 1/3)
    for k in range(3):
        assert abs(int(counts[LABELS == k].sum()) - total / 3) <= SIGMAS * math.sqrt(total / 3 * (2 / 3)), k
    p = 1 / 3 / 9  # an image of class 1: its class, then it among 9
    assert (counts[LABELS == 1] - total * p).abs().max() <= SIGMAS * math.sqrt(total * p * (1 - p))


def test_balanced_epochs_are_seeded_by_seed_and_epoch_and_uniform_is_the_permutation():
    split = _indexed(LABELS)
    first, again, other_seed = _loader(split, seed=3), _loader(split, seed=3), _loader(split, seed=4)
    for loader in (first, again, other_seed):
        loader.set_epoch(2)
    assert torch.equal(_drawn(first), _drawn(again))
    assert not torch.equal(_drawn(first), _drawn(other_seed))
    first.set_epoch(3)
    assert not torch.equal(_drawn(first), _drawn(again))
    generator = torch.Generator().manual_seed(7)
    permutation = torch.randperm(100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(epoch_order(LABELS, generator, "uniform"), permutation)  # uniform: the loaders' order of old
    with pytest.raises(ConfigError, match="draws training epochs"):
        _loader(split, train=False)


def test_two_ranks_take_disjoint_equal_shards_of_the_one_process_draw():
    labels = torch.cat([LABELS, torch.tensor([1])])  # 101 images: the last draw is left out with 2 ranks
    split = _indexed(labels)
    whole = _loader(split, drop_last=False)
    shards = [_loader(split, drop_last=False, shard=(rank, 2)) for rank in range(2)]
    for loader in (whole, *shards):
        loader.set_epoch(5)
    single, (even, odd) = _drawn(whole), [_drawn(s) for s in shards]
    assert len(single) == 101 and len(even) == len(odd) == 50
    assert torch.equal(torch.stack([even, odd], 1).flatten(), single[:100])  # rank r: draws r, r + 2, ...


def test_the_aggregators_loader_samples_balanced_too_and_trains_weighted():
    y = torch.tensor([0] * 180 + [1] * 20)
    probabilities = torch.rand(200, 4, 2, generator=torch.Generator().manual_seed(0)).softmax(-1)
    loader = TensorLoader(probabilities, y, 50, shuffle=True, seed=1, sampler="balanced")
    drawn = []
    for epoch in range(50):
        loader.set_epoch(epoch)
        drawn += [labels for _, labels in loader]
    total, ones = 50 * 200, int(torch.cat(drawn).sum())
    assert abs(ones - total / 2) <= SIGMAS * math.sqrt(total / 4)
    data = LocalProbabilities(probabilities, y)
    cfg = TrainConfig(
        epochs=2, progress=False, optimizer="adamw", lr=0.01, class_weights="balanced", sampler="balanced"
    )
    fit = fit_aggregator(create_aggregator("linear", 4, 2), data, data, cfg, CPU, epochs=2, batch_size=50)
    assert len(fit.history) == 2 and all(math.isfinite(row["train_loss"]) for row in fit.history)


# -- every training of a run: local phase, aggregator, end to end ---------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced_data(tmp_path_factory) -> DataConfig:
    """90 images of 16x16 in classes of 60, 20 and 10 (72 train, 8 val, 18 test)."""
    folder = tmp_path_factory.mktemp("imbalanced")
    labels = torch.tensor([0] * 60 + [1] * 20 + [2] * 10)
    images = torch.randint(0, 80, (90, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for k in range(3):  # a learnable signal: a bright block whose place depends on the class
        images[labels == k, 4 * k : 4 * k + 4, 4:8] = 255
    np.savez(folder / "imbalanced.npz", x=images.numpy(), y=labels.numpy())
    return DataConfig(dataset=f"npz:{folder / 'imbalanced.npz'}", batch_size=16, cache_dir=str(folder / "cache"))


@pytest.fixture(scope="module")
def imbalanced(imbalanced_data, tmp_path_factory):
    """``run(name, **train)``: transfer learning with --transfer-aggregator (local phase, dnn aggregator, then the
    CNN-DNN end to end) on :func:`imbalanced_data`; returns each phase's first train loss."""
    folder = tmp_path_factory.mktemp("transfer")

    def run_transfer(name: str, **train) -> dict[str, float]:
        out = folder / name
        model = ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2), dnn_hidden=(16,))
        run(
            RunConfig(
                method="transfer",
                transfer_aggregator=True,
                out=str(out),
                data=imbalanced_data,
                model=model,
                aggregator_epochs=1,
                train=TrainConfig(epochs=1, progress=False, **train),
            )
        )
        return {
            phase: float(next(csv.DictReader((out / f"{phase}_log.csv").open()))["train_loss"])
            for phase in ("local", "dnn", "transfer")
        }

    return run_transfer, run_transfer("plain")


@pytest.mark.parametrize("option", ["class_weights", "sampler"])
def test_the_options_reach_the_local_phase_the_aggregator_and_end_to_end_training(imbalanced, option):
    run_transfer, plain = imbalanced
    balanced = run_transfer(option, **{option: "balanced"})
    assert all(balanced[phase] != plain[phase] for phase in plain), (balanced, plain)


@pytest.mark.slow
def test_a_balanced_local_phase_on_two_processes_is_the_one_process_run(tmp_path, imbalanced_data):
    """Model parallel: every process draws the same class-balanced epochs and weighs the loss alike, so that 2
    processes train exactly the local CNNs of 1 (in float64, see test_distributed.assert_same_run)."""

    def local(out: Path) -> RunConfig:
        train = TrainConfig(
            epochs=1,
            schedule="constant",
            lr=0.02,
            progress=False,
            device="cpu",
            threads=1,
            dtype="float64",
            class_weights="balanced",
            sampler="balanced",
        )
        model = ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2))
        return RunConfig(method="local", out=str(out), data=imbalanced_data, model=model, train=train)

    reference = train_in_processes(local(tmp_path / "one"))
    assert_same_run(train_in_processes(local(tmp_path / "two"), processes=2), reference, "local.pt")


# -- options, metrics and tables -------------------------------------------------------------------------------------


def test_the_options_warn_where_they_do_nothing_or_correct_twice(tmp_path):
    pretrained = RunConfig(
        method="aggregation",
        pretrained=str(tmp_path),
        model=ModelConfig(aggregator="mean"),
        train=TrainConfig(class_weights="balanced"),
    )
    assert any("--class-weights balanced has no effect" in m for m in inapplicable_options(pretrained))
    trained = RunConfig(method="aggregation", pretrained=str(tmp_path), train=TrainConfig(sampler="balanced"))
    assert not any("--sampler" in m for m in inapplicable_options(trained))  # the dnn aggregator is trained
    both = RunConfig(method="local", train=TrainConfig(class_weights="balanced", sampler="balanced"))
    assert any("corrects the class imbalance twice" in m for m in inapplicable_options(both))


def test_local_cnns_report_their_own_balanced_accuracy_and_auc():
    y = torch.tensor([0, 0, 0, 1])
    probabilities = torch.tensor(
        [[[0.9, 0.1], [0.4, 0.6]], [[0.8, 0.2], [0.3, 0.7]], [[0.7, 0.3], [0.6, 0.4]], [[0.6, 0.4], [0.2, 0.8]]]
    )  # (4 images, 2 local CNNs, 2 classes)
    report = classification_report(y, probabilities)
    assert report.extra["subdomain_balanced_accuracy"] == [0.5, pytest.approx((1 / 3 + 1) / 2)]
    assert report.extra["subdomain_auc"] == [1.0, 1.0]  # the positive image has each CNN's highest probability
    assert report.accuracy == classification_report(y, probabilities.mean(1)).accuracy


def test_the_compare_table_adds_balanced_accuracy_and_auc_for_imbalanced_classes():
    rows = [
        {
            "method": "global",
            "grid": "1x1",
            "seed": s,
            "test_accuracy": 0.77,
            "test_balanced_accuracy": b,
            "test_auc": a,
            "parameters": 10,
            "train_seconds": 1.0,
            "total_train_seconds": 1.0,
        }
        for s, b, a in ((0, 0.5, 0.6), (1, 0.7, 0.8))
    ]
    cc = CompareConfig(seeds=(0, 1), train=TrainConfig(class_weights="balanced"))
    assert is_imbalanced([929, 259]) and not is_imbalanced([5421, 6742]) and not is_imbalanced(None)
    table = results_markdown(rows, cc, "adrenal", class_counts=[929, 259])
    assert "class weights: balanced" in table and "## Balanced accuracy and ROC AUC" in table
    assert "| global | 0.6000 ± 0.1414 |" in table and "| global | 0.7000 ± 0.1414 |" in table
    assert "0.78 accuracy, but 0.50 balanced accuracy" in table
    assert "Balanced accuracy" not in results_markdown(rows, cc, "balanced data", class_counts=[500, 500])


# -- a class-weighted run on AdrenalMNIST3D --------------------------------------------------------------------------


@pytest.mark.skipif(not ADRENAL.is_file(), reason=f"AdrenalMNIST3D is not at {ADRENAL}")
def test_a_class_weighted_global_cnn_on_adrenalmnist3d_predicts_both_classes(tmp_path):
    """64 training volumes of 28^3 (50 normal, 14 hyperplasia): the weighted loss makes the minority class worth as
    much as the majority, so that after 4 epochs the CNN's predictions on its training images are not all the
    majority class (a majority-only CNN scores balanced accuracy 0.5)."""
    out = tmp_path / "run"
    main(
        [
            "train",
            "--method",
            "global",
            "--dataset",
            f"npz:{ADRENAL}",
            "--limit-train",
            "64",
            "--backbone",
            "vgg3",
            "--width",
            "0.25",
            "--epochs",
            "4",
            "--batch-size",
            "16",
            "--optimizer",
            "adamw",
            "--lr",
            "0.003",
            "--no-augment",
            "--class-weights",
            "balanced",
            "--threads",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert 0 <= row["test_balanced_accuracy"] <= 1 and 0 <= row["test_auc"] <= 1
    state = load_checkpoint(out / "global.pt")
    assert state["config"]["train"]["class_weights"] == "balanced"
    cfg = RunConfig(
        method="global",
        out=str(out),
        data=DataConfig(dataset=f"npz:{ADRENAL}", limit_train=64, cache_dir=str(tmp_path / "cache")),
    )
    exp = Experiment.from_config(cfg)
    train = evaluate(model_from_checkpoint(state), exp.loader("train"), cfg.train, CPU, collect=True)
    predicted = torch.bincount(train.probabilities.reshape(len(train.labels), -1).argmax(-1), minlength=2)
    assert torch.bincount(train.labels).tolist() == [50, 14] and predicted.min() > 0, predicted.tolist()
