import dataclasses

import pytest
import torch

from ddcnn.config import ModelConfig, SharedOptions
from ddcnn.errors import ConfigError, InputSizeError, UnknownNameError
from ddcnn.models.aggregators import (
    Aggregator,
    AttentionAggregator,
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
    assert set(list_aggregators()) == {"dnn", "linear", "attention", "mean", "logmean", "vote", "weighted"}


def test_unknown_aggregator_names_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown aggregator 'median'; choose one of: attention, dnn") as info:
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
    assert trained == ["dnn", "linear", "attention"]
    for name in trained:
        lr = aggregator_class(name).default_lr
        assert lr > 0 and f"{name} {lr:g}" in help_text, (name, lr, help_text)


def test_attention_maps_hand_made_inputs_to_logits():
    attention = create_aggregator("attention", N, K, **aggregator_options("attention", ModelConfig()))
    assert (attention.encoder.num_layers, attention.position.shape, attention.head.out_features) == (2, (N, 32), K)
    p = torch.tensor([[[0.7, 0.1, 0.1, 0.05, 0.05]] * N, [[0.05, 0.05, 0.1, 0.1, 0.7]] * N])
    scores = attention.eval()(p)
    assert scores.shape == (2, K) and torch.isfinite(scores).all()
    assert not torch.allclose(scores[0], scores[1])  # other inputs, other logits
    with pytest.raises(InputSizeError, match=rf"\(B, {N}, {K}\)"):
        attention(probabilities(k=K + 1))


def test_attention_tells_subdomains_apart_only_by_their_position_embeddings():
    """Attention and mean pooling treat the tokens as a set: with the position embeddings zeroed, any permutation of
    the subdomains gives the same logits; with them, it does not."""
    torch.manual_seed(0)
    attention = AttentionAggregator(N, K).double().eval()
    p = probabilities(batch=3).double()
    order = torch.tensor([2, 0, 3, 1])
    assert not torch.allclose(attention(p), attention(p[:, order]), atol=1e-6)
    with torch.no_grad():
        attention.position.zero_()
    torch.testing.assert_close(attention(p), attention(p[:, order]), rtol=1e-10, atol=1e-10)


def test_attention_refuses_bad_options():
    with pytest.raises(ConfigError, match="multiple of heads 3"):
        AttentionAggregator(N, K, dim=32, heads=3)
    with pytest.raises(ConfigError, match="dropout"):
        AttentionAggregator(N, K, dropout=1.0)


def test_only_trained_aggregators_read_logits_and_the_default_keeps_the_options():
    logits = ModelConfig(local_output="logits")
    for name in list_aggregators():
        options = aggregator_options(name, logits)
        aggregator = create_aggregator(name, N, K, **options)
        trained = aggregator_class(name).trainable
        assert aggregator.local_output == ("logits" if trained else "probabilities"), name
        assert "local_output" not in aggregator_options(name, ModelConfig())  # earlier specs stay equal
    with pytest.raises(ConfigError, match="the mean aggregator combines probabilities"):
        create_aggregator("mean", N, K, local_output="logits")
    with pytest.raises(ConfigError, match="local_output"):
        ModelConfig(local_output="embeddings")
    with pytest.raises(ConfigError, match="feature_dim"):
        ModelConfig(local_output="features", feature_dim=0)


# -- in the aggregation phase, end to end, and in ddcnn compare ---------------------------------------------------


def test_attention_learns_a_tiny_separable_problem_from_logits():
    """The class is in subdomain 2's logits only (the others are noise): attention must find it by position."""
    from ddcnn.config import TrainConfig
    from ddcnn.phases.aggregation import LocalProbabilities, fit_aggregator

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 3
    logits = torch.randn(96, N, 3, generator=g)
    logits[:, 2] += 4 * torch.nn.functional.one_hot(labels, 3)
    data = LocalProbabilities(logits.softmax(-1), labels, logits)
    torch.manual_seed(0)
    attention = AttentionAggregator(N, 3, local_output="logits")
    cfg = TrainConfig(epochs=15, optimizer="adamw", lr=AttentionAggregator.default_lr, progress=False, threads=None)
    fit = fit_aggregator(attention, data, data, cfg, torch.device("cpu"), epochs=15, batch_size=16)
    losses = [row["train_loss"] for row in fit.history]
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]
    assert fit.history[-1]["val_accuracy"] > 0.5  # chance is 1/3; a separable problem, whatever the CPU's rounding


@pytest.fixture(scope="module")
def local_dir(tiny_data_config, tmp_path_factory):
    from ddcnn.config import RunConfig, TrainConfig
    from ddcnn.phases import Experiment, run_local

    out = tmp_path_factory.mktemp("local")
    model = ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2), dnn_hidden=(16,))
    run_local(Experiment.from_config(RunConfig(out=str(out), data=tiny_data_config, model=model,
                                               train=TrainConfig(epochs=2, progress=False))))
    return out


def test_the_aggregation_phase_trains_on_local_logits_as_the_cnn_dnn_computes_them(tmp_path, tiny_run, local_dir):
    import ddcnn
    from ddcnn.evaluate import evaluate_checkpoint
    from ddcnn.phases import Experiment, aggregation_phase
    from ddcnn.train import load_checkpoint

    cfg = tiny_run(tmp_path, pretrained=str(local_dir), model__local_output="logits", aggregator_batch_size=32)
    results = {r.method: r for r in aggregation_phase(Experiment.from_config(cfg), ["attention", "linear", "mean"])}
    for name in ("attention", "linear"):
        result = results[name]
        assert result.extra["local_output"] == "logits" and len(result.history) == 3
        options = load_checkpoint(tmp_path / f"{name}.pt")["spec"]["aggregator_options"]
        assert options["local_output"] == "logits"
        # the checkpoint's CNN-DNN, fed images, scores what the phase scored from the local logits it computed
        report = evaluate_checkpoint(tmp_path / f"{name}.pt", device="cpu")
        assert report["accuracy"] == pytest.approx(result.test.accuracy)
        assert ddcnn.load(tmp_path / f"{name}.pt").model.aggregator.local_output == "logits"
    assert results["attention"].extra["aggregator_parameters"] == sum(
        p.numel() for p in AttentionAggregator(4, 3).parameters()
    )
    assert "local_output" not in results["mean"].extra  # it reads probabilities, as always


def test_an_attention_cnn_dnn_reading_logits_exports_to_onnx_and_torchscript(tmp_path, tiny_run, local_dir):
    import numpy as np

    import ddcnn
    from ddcnn.export import export
    from ddcnn.phases import Experiment, aggregation_phase

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cfg = tiny_run(tmp_path, pretrained=str(local_dir), model__local_output="logits", aggregator_epochs=1)
    aggregation_phase(Experiment.from_config(cfg), ["attention"])
    model = ddcnn.load(tmp_path / "attention.pt")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8))
    with torch.no_grad():
        expected = model(x)
    export(model, tmp_path / "model.onnx", "onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.float().numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)
    export(model, tmp_path / "model.ts", "torchscript")
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x.float()), expected, atol=1e-5, rtol=0)


def test_coherent_training_of_an_attention_cnn_dnn_on_logits(tmp_path, tiny_run):
    from ddcnn.methods import run
    from ddcnn.models.spec import model_from_checkpoint

    result = run(tiny_run(tmp_path, method="coherent", model__aggregator="attention", model__local_output="logits"))
    model = model_from_checkpoint(tmp_path / "coherent.pt")
    assert isinstance(model.aggregator, AttentionAggregator) and model.aggregator.local_output == "logits"
    assert result.extra["aggregator_parameters"] == sum(p.numel() for p in model.aggregator.parameters())


def test_compare_runs_dnn_and_attention_on_mnist5k(tmp_path, capsys):
    from ddcnn.cli import main

    argv = ["compare", "--dataset", "mnist5k", "--limit-train", "200", "--methods", "dnn,attention", "--grids",
            "2x2", "--epochs", "1", "--backbone", "vgg3", "--width", "0.25", "--local-output", "logits",
            "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| dnn |" in printed and "| attention |" in printed


def test_local_output_is_reported_where_no_trained_aggregator_reads_it():
    from ddcnn.config import RunConfig, inapplicable_options

    def warnings(method, aggregator):
        cfg = RunConfig(method=method, model=ModelConfig(aggregator=aggregator, local_output="logits"))
        return [m for m in inapplicable_options(cfg) if "--local-output" in m]

    assert warnings("aggregation", "attention") == [] and warnings("coherent", "linear") == []
    assert "--aggregator mean: it combines the local probabilities" in warnings("aggregation", "mean")[0]
    assert "which has no aggregator" in warnings("local", "dnn")[0]
