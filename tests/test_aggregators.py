import dataclasses

import pytest
import torch

from ddcnn.config import ModelConfig, SharedOptions
from ddcnn.errors import ConfigError, InputSizeError, UnknownNameError
from ddcnn.models.aggregators import (
    Aggregator,
    DNNAggregator,
    aggregator_class,
    aggregator_options,
    create_aggregator,
    list_aggregators,
    register_aggregator,
)

N, K = 4, 5


def probabilities(batch: int = 6, n: int = N, k: int = K, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(batch, n, k, generator=g)).softmax(-1)


def predict(name: str, p: torch.Tensor) -> torch.Tensor:
    aggregator = create_aggregator(name, p.shape[1], p.shape[2]).eval()
    return aggregator(p).argmax(-1)


def test_registry_lists_every_aggregator():
    assert set(list_aggregators()) == {"dnn", "linear", "mean", "logmean", "vote", "weighted"}


def test_unknown_aggregator_names_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown aggregator 'median'; choose one of: dnn") as info:
        create_aggregator("median", N, K)
    assert info.value.kind == "aggregator"


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_aggregator("mean")(type("Again", (Aggregator,), {}))


@pytest.mark.parametrize("name", list_aggregators())
def test_every_aggregator_gives_class_scores(name):
    aggregator = create_aggregator(name, N, K, **aggregator_options(name, ModelConfig()))
    p = probabilities().requires_grad_(True)
    scores = aggregator(p)
    assert scores.shape == (6, K) and torch.isfinite(scores).all()
    scores.logsumexp(-1).sum().backward()  # differentiable: usable inside a coherent CNN-DNN
    assert torch.isfinite(p.grad).all()
    if not aggregator.trainable:  # the closed-form ones return log-probabilities
        torch.testing.assert_close(scores.exp().sum(-1), torch.ones(6))
    with pytest.raises(InputSizeError, match=rf"\(B, {N}, {K}\)"):
        aggregator(probabilities(n=N + 1))


def test_mean_logmean_and_vote_on_hand_made_probabilities():
    p = torch.tensor([[[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.0, 0.3, 0.7]]])
    assert predict("mean", p).item() == 0  # mean (0.4, 0.37, 0.23)
    assert predict("logmean", p).item() == 1  # a zero vetoes classes 0 and 2 in the geometric mean
    assert predict("vote", p).item() == 0  # votes 0, 0, 2
    torch.testing.assert_close(create_aggregator("mean", 3, 3)(p).exp(), p.mean(1))


@pytest.mark.parametrize(
    "p, winner",
    [
        ([[0.9, 0.1, 0.0], [0.0, 0.45, 0.55]], 0),  # one vote each for 0 and 2: summed probability 0.9 > 0.55
        ([[0.5, 0.1, 0.4], [0.0, 0.45, 0.55]], 2),  # one vote each for 0 and 2: summed probability 0.5 < 0.95
        ([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], 0),  # votes and sums tie too: the lowest class index
    ],
)
def test_vote_ties_go_to_the_highest_summed_probability(p, winner):
    assert predict("vote", torch.tensor([p])).item() == winner


def test_one_more_vote_outweighs_any_probability_sum():
    p = torch.tensor([[[0.34, 0.33, 0.33], [0.34, 0.33, 0.33], [0.0, 0.0, 1.0]]])
    assert predict("vote", p).item() == 0  # 2 votes beat 1, although class 2 sums to 1.66 against 0.68
    assert predict("mean", p).item() == 2


def test_weighted_fits_weights_from_validation_accuracy_above_chance():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    right = torch.nn.functional.one_hot(labels, 3).float()
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float()
    # local CNN 0 always right (accuracy 1), 1 right on 4 of 6 (accuracy 2/3), 2 never right (below chance)
    second = torch.where(torch.arange(6)[:, None] < 4, right, wrong)
    p = torch.stack([right, second, wrong], 1)
    aggregator = create_aggregator("weighted", 3, 3)
    aggregator.fit(p, labels)
    torch.testing.assert_close(aggregator.accuracies, torch.tensor([1.0, 4 / 6, 0.0]))
    torch.testing.assert_close(aggregator.weights, torch.tensor([2 / 3, 1 / 3, 0.0]))  # skills 2/3, 1/3, 0
    assert "weights" in aggregator.state_dict()  # saved with the CNN-DNN checkpoint

    # a local CNN that is wrong everywhere has no say: the weighted vote follows the others
    test = torch.tensor([[[0.45, 0.55, 0.0], [0.3, 0.7, 0.0], [1.0, 0.0, 0.0]]])
    assert predict("mean", test).item() == 0
    assert aggregator(test).argmax(-1).item() == 1


def test_weighted_is_uniform_when_every_local_cnn_is_at_chance():
    aggregator = create_aggregator("weighted", 2, 2)
    p = torch.tensor([[[0.9, 0.1], [0.9, 0.1]], [[0.9, 0.1], [0.9, 0.1]]])  # always class 0; labels half and half
    aggregator.fit(p, torch.tensor([0, 1]))
    torch.testing.assert_close(aggregator.weights, torch.tensor([0.5, 0.5]))


def test_dnn_takes_its_options_from_the_model_config():
    cfg = ModelConfig(dnn_hidden=(16, 8), dnn_activation="tanh", dnn_dropout=0.0, dnn_batchnorm=False)
    dnn = create_aggregator("dnn", N, K, **aggregator_options("dnn", cfg))
    linears = [m for m in dnn.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(N * K, 16), (16, 8), (8, K)]
    assert any(isinstance(m, torch.nn.Tanh) for m in dnn.modules())
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.Dropout)) for m in dnn.modules())
    default = DNNAggregator(N, K)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in default.modules())
    assert aggregator_options("mean", cfg) == {}


def test_dnn_refuses_bad_options():
    with pytest.raises(UnknownNameError, match="unknown DNN activation 'swish'"):
        DNNAggregator(N, K, activation="swish")
    with pytest.raises(ConfigError, match="dnn_dropout"):
        DNNAggregator(N, K, dropout=1.0)


def test_every_trained_aggregator_has_the_learning_rate_the_help_names():
    help_text = next(f.metadata["help"] for f in dataclasses.fields(SharedOptions) if f.name == "aggregator_lr")
    trained = [name for name in list_aggregators() if aggregator_class(name).trainable]
    assert trained == ["dnn", "linear"]
    for name in trained:
        lr = aggregator_class(name).default_lr
        assert lr > 0 and f"{name} {lr:g}" in help_text, (name, lr, help_text)
