"""What the trained aggregators read beyond the local probabilities: the local CNNs' pooled features
(``--local-output features``, ``--feature-dim``), and an aggregator with its input as a method of ``ddcnn compare``
(``dnn:logits``, ``linear:features``)."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ddcnn.compare import CompareConfig, compare
from ddcnn.config import DataConfig, ModelConfig, TrainConfig
from ddcnn.config.options import method_file_stem
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError, InputSizeError, UnknownNameError
from ddcnn.models import CNNDNN, LocalCNNs
from ddcnn.models.aggregators import (
    LinearAggregator,
    aggregator_class,
    aggregator_options,
    check_aggregator_input,
    create_aggregator,
    list_aggregator_inputs,
    list_aggregators,
)
from ddcnn.models.backbone import channel_bins, reduce_features
from ddcnn.tables import method_order
from ddcnn.train import load_checkpoint

N, K, D = 4, 3, 5
TRAINED = [a for a in list_aggregators() if aggregator_class(a).trainable]


# -- the aggregators ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINED)
def test_every_trained_aggregator_maps_features_to_class_scores(name):
    aggregator = create_aggregator(f"{name}:features", N, K, input_dim=D).eval()
    assert aggregator.local_output == "features" and aggregator.input_dim == D
    features = torch.randn(6, N, D, generator=torch.Generator().manual_seed(0))
    scores = aggregator(features)
    assert scores.shape == (6, K) and torch.isfinite(scores).all()
    assert not torch.allclose(scores[0], scores[1])
    with pytest.raises(InputSizeError, match=rf"local features \(B, {N}, {D}\)"):
        aggregator(features[..., :K])  # probabilities' shape: not what it reads


def test_a_features_aggregator_needs_their_number_and_the_closed_form_ones_refuse_them():
    with pytest.raises(ConfigError, match="input_dim"):
        create_aggregator("dnn", N, K, local_output="features")
    with pytest.raises(ConfigError, match="input_dim 7 is for local_output features"):
        create_aggregator("linear", N, K, local_output="logits", input_dim=7)
    for name in set(list_aggregators()) - set(TRAINED):
        with pytest.raises((ConfigError, TypeError)):
            create_aggregator(name, N, K, local_output="features", input_dim=D)


def test_the_linear_aggregator_on_features_is_the_affine_map_of_their_concatenation():
    linear = LinearAggregator(2, 2, local_output="features", input_dim=3).double()
    with torch.no_grad():
        linear.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 2], [0, -1, 0, 0.5, 0, 0]]))
        linear.linear.bias.copy_(torch.tensor([0.25, -0.5]))
    features = torch.tensor([[[1.0, 2, 3], [4, 5, 6]]], dtype=torch.float64)  # subdomain 0: 1 2 3; 1: 4 5 6
    # logit 0 = 1*1 + 2*6 + 0.25; logit 1 = -1*2 + 0.5*4 - 0.5
    torch.testing.assert_close(linear(features), torch.tensor([[13.25, -0.5]], dtype=torch.float64))


def test_aggregator_options_give_the_input_and_its_size():
    def eight() -> int:  # the local CNNs' channels, as a probe would find them
        return 8

    assert aggregator_options("dnn:features", ModelConfig(feature_dim=3), eight) == {
        **aggregator_options("dnn", ModelConfig()),
        "local_output": "features",
        "input_dim": 3,
    }
    assert aggregator_options("linear", ModelConfig(local_output="features"), eight) == {
        "local_output": "features",
        "input_dim": 8,  # unset: all C channels
    }
    assert aggregator_options("linear:logits", ModelConfig(local_output="features")) == {"local_output": "logits"}
    assert aggregator_options("linear:probabilities", ModelConfig(local_output="logits")) == {}
    for name in list_aggregators():  # probabilities: the options, and so the specs, of earlier checkpoints
        assert not {"local_output", "input_dim"} & set(aggregator_options(name, ModelConfig(feature_dim=4), eight))
    with pytest.raises(ConfigError, match=r"--feature-dim 9 is more than the 8 channels.*pass at most 8") as info:
        aggregator_options("attention:features", ModelConfig(feature_dim=9), eight)
    assert "\n" not in str(info.value)


def test_an_aggregator_with_its_input_is_checked_and_listed():
    assert check_aggregator_input("dnn") == ("dnn", None)
    assert check_aggregator_input("attention:features") == ("attention", "features")
    assert "linear:features" in list_aggregator_inputs() and "mean:logits" not in list_aggregator_inputs()
    with pytest.raises(ConfigError, match=r"method 'mean:logits': the mean aggregator is not trained; .* dnn:logits"):
        check_aggregator_input("mean:logits")
    with pytest.raises(ConfigError, match=r"method 'dnn:pixels': 'pixels' is no input; .*linear:features"):
        check_aggregator_input("dnn:pixels")
    with pytest.raises(UnknownNameError):
        check_aggregator_input("median:logits")
    assert method_file_stem("dnn:features") == "dnn-features" and method_file_stem("dnn") == "dnn"


# -- the pooled features --------------------------------------------------------------------------------------------


def test_the_channels_are_averaged_to_d_in_the_bins_of_adaptive_average_pooling():
    pooled = torch.tensor([[[1.0, 2, 3, 4, 5]]], dtype=torch.float64)
    # D=2 of C=5: channels 0-2 and 2-4 (bins floor(jC/D) to ceil((j+1)C/D)), overlapping in the middle one
    torch.testing.assert_close(reduce_features(pooled, 2), torch.tensor([[[2.0, 4.0]]], dtype=torch.float64))
    assert reduce_features(pooled, None) is pooled and reduce_features(pooled, 5) is pooled
    x = torch.randn(3, 4, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for dim in (1, 5, 16, 36):
        expected = F.adaptive_avg_pool1d(x.flatten(0, 1)[:, None], dim).view(3, 4, dim)
        torch.testing.assert_close(reduce_features(x, dim), expected)
    assert torch.allclose(channel_bins(37, 5).sum(0), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ConfigError, match="--feature-dim 6 is more than the 5 channels"):
        reduce_features(pooled, 6)


@pytest.mark.parametrize("backbone", ["vgg3", "resnet20", "densenet121"])
def test_the_pooled_features_are_the_last_feature_map_averaged_over_space(backbone):
    local_cnns = LocalCNNs(backbone, Decomposition((2, 2), (32, 32)), 3, K, 0.25).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, features = local_cnns.forward_with_features(x)
        feature_map = local_cnns.net.feature_map(local_cnns.decomposition.split(x).flatten(1, 2))
        expected = feature_map.mean((2, 3)).view(2, N, -1)  # (B, N*C, h, w): each subdomain's C channels
        torch.testing.assert_close(features, expected)
        torch.testing.assert_close(logits, local_cnns(x))  # the same pass gives the logits
        torch.testing.assert_close(local_cnns.forward_with_features(x, 3)[1], reduce_features(expected, 3))


def counting(local_cnns: LocalCNNs) -> list[int]:
    """How many times the local CNNs' convolutional part runs (a forward hook on ``features``)."""
    calls = [0]
    local_cnns.net.features.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_features_cnn_dnn_runs_the_local_cnns_once_and_trains_through_the_features():
    torch.manual_seed(0)
    local_cnns = LocalCNNs("vgg3", Decomposition((2, 2), (16, 16)), 1, K, 0.25)
    model = CNNDNN(local_cnns, create_aggregator("dnn", N, K, local_output="features", input_dim=D, hidden=(8,)))
    assert model.frozen == ["net.head.0.weight", "net.head.0.bias"]  # vgg3's one dense layer: not in the output
    calls, x = counting(local_cnns), torch.randn(4, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        scores, probabilities = model.forward_with_local(x)
    assert calls == [1]
    with torch.no_grad():
        torch.testing.assert_close(probabilities, local_cnns(x).softmax(-1))
        torch.testing.assert_close(scores, model.aggregator(local_cnns.forward_with_features(x, D)[1]))
        torch.testing.assert_close(model.forward_local(x), local_cnns.forward_with_features(x, D)[1])
    model.train()
    model(x).sum().backward()
    grads = {n: p.grad for n, p in local_cnns.named_parameters()}
    assert all(grads[n] is None for n in model.frozen)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "weight" in n and n not in model.frozen)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("factory", ["user_models:timm_style", "user_models:timm_style_flat"])
def test_a_factory_with_forward_features_gives_its_pooled_features(factory, batching):
    import user_models

    local_cnns = LocalCNNs.from_factory(factory, (2, 2), 1, K, image_shape=(8, 8), batching=batching).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, features = local_cnns.forward_with_features(x)
        assert features.shape == (3, N, 6)
        torch.testing.assert_close(logits, local_cnns(x))
        for i, subimage in enumerate(local_cnns.decomposition.split(x).unbind(1)):
            one = local_cnns.local_cnn(i).eval()
            map_or_flat = one.forward_features(subimage)
            pooled = map_or_flat if map_or_flat.dim() == 2 else map_or_flat.mean((2, 3))
            torch.testing.assert_close(features[:, i], pooled)
    assert isinstance(local_cnns.local_cnn(0), user_models.TimmStyle)


def test_a_factory_without_forward_features_is_refused_in_one_line():
    local_cnns = LocalCNNs.from_factory("user_models:make_cnn", (2, 2), 1, K, image_shape=(8, 8))
    with pytest.raises(
        ConfigError,
        match=r"backbone user_models:make_cnn \(Sequential\) has no forward_features and "
        r"no forward_head, which --local-output features reads",
    ) as info:
        local_cnns.forward_with_features(torch.zeros(2, 1, 8, 8))
    assert "\n" not in str(info.value)


# -- in ddcnn compare, and the checkpoints it writes ----------------------------------------------------------------

METHODS = ("local", "dnn", "dnn:logits", "dnn:features", "linear:features", "attention:features", "transfer")


def tiny_compare(out, data: DataConfig, **changes) -> CompareConfig:
    cfg = CompareConfig(
        out=str(out),
        grids=("2x2",),
        seeds=(0,),
        epochs=1,
        local_epochs=1,
        aggregator_epochs=2,
        data=data,
        methods=METHODS,
        model=ModelConfig(backbone="vgg3", width=0.25, dnn_hidden=(16,), feature_dim=8),
        train=TrainConfig(progress=False),
    )
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def variants(tiny_data_config, tmp_path_factory):
    cfg = tiny_compare(tmp_path_factory.mktemp("variants"), tiny_data_config)
    return cfg, compare(cfg)


def test_compare_runs_every_input_from_the_same_local_cnns(variants):
    _, result = variants
    rows = {r["method"]: r for r in result.rows if r["method"] != "local"}
    assert set(rows) == set(METHODS) - {"local"}
    assert [rows[m]["local_output"] for m in ("dnn", "dnn:logits", "dnn:features")] == [
        "probabilities",
        "logits",
        "features",
    ]
    assert rows["linear:features"]["feature_dim"] == 8 and "feature_dim" not in rows["dnn"]
    folder = result.out / "2x2" / "seed0"
    for method in METHODS[1:6]:
        assert (folder / f"{method_file_stem(method)}.pt").is_file()
        assert (folder / f"{method_file_stem(method)}_log.csv").is_file()
    assert not list(folder.glob("*:*"))
    for method in METHODS[1:6]:  # every aggregator started from the one local phase
        spec = load_checkpoint(folder / f"{method_file_stem(method)}.pt")["spec"]
        assert spec["local_checkpoint"] == str(folder / "local.pt") and spec["method"] == method
    table = result.markdown
    order = [line.split("|")[1].strip() for line in table.split("| method | 2x2 |")[1].splitlines()[2:9]]
    assert order == ["local", *METHODS[1:6], "transfer"]  # each input after its plain aggregator
    payload = json.loads((result.out / "results.json").read_text())
    assert {r["method"] for r in payload["rows"]} == set(METHODS)


def test_a_features_cnn_dnn_rebuilds_from_its_spec_and_scores_what_compare_scored(variants):
    from ddcnn.evaluate import evaluate_checkpoint
    from ddcnn.models.spec import model_from_checkpoint

    _, result = variants
    path = result.out / "2x2" / "seed0" / "dnn-features.pt"
    spec = load_checkpoint(path)["spec"]
    assert spec["aggregator"] == "dnn" and spec["method"] == "dnn:features"
    assert spec["aggregator_options"]["local_output"] == "features" and spec["aggregator_options"]["input_dim"] == 8
    model = model_from_checkpoint(path)
    assert isinstance(model, CNNDNN) and model.aggregator.input_dim == 8
    row = next(r for r in result.rows if r["method"] == "dnn:features")
    assert evaluate_checkpoint(path, device="cpu")["accuracy"] == pytest.approx(row["test_accuracy"])


def test_a_features_cnn_dnn_exports_to_onnx_and_torchscript(variants, tmp_path):
    import numpy as np

    import ddcnn
    from ddcnn.export import export

    _, result = variants
    model = ddcnn.load(result.out / "2x2" / "seed0" / "linear-features.pt")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8))
    with torch.no_grad():
        expected = model(x)
    export(model, tmp_path / "model.ts", "torchscript")
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x.float()), expected, atol=1e-5, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    export(model, tmp_path / "model.onnx", "onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.float().numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_resume_adds_an_input_without_training_the_local_cnns_again(variants):
    cfg, result = variants
    folder = result.out / "2x2" / "seed0"
    kept = sorted(folder.glob("*.pt")) + sorted(folder.glob("*_log.csv"))
    stamps = {p.name: p.stat().st_mtime_ns for p in kept}
    more = replace(cfg, methods=(*METHODS, "linear:logits"), resume=True)
    again = compare(more)
    assert {p.name: p.stat().st_mtime_ns for p in kept} == stamps  # local.pt and every finished phase untouched
    assert load_checkpoint(folder / "linear-logits.pt")["finished"]
    assert load_checkpoint(folder / "linear-logits.pt")["spec"]["aggregator_options"] == {"local_output": "logits"}
    first = {r["method"]: r["test_accuracy"] for r in result.rows if r["method"] != "local"}
    assert {r["method"]: r["test_accuracy"] for r in again.rows if r["method"] in first} == first
    assert "| linear:logits |" in again.markdown


def test_compare_refuses_a_bad_input_or_a_feature_dim_above_the_channels_before_training(tiny_data_config, tmp_path):
    with pytest.raises(ConfigError, match="method 'vote:features': the vote aggregator is not trained"):
        tiny_compare(tmp_path, tiny_data_config, methods=("vote:features",))
    with pytest.raises(UnknownNameError, match="dnn:features"):
        tiny_compare(tmp_path, tiny_data_config, methods=("dnnn",))
    cfg = tiny_compare(
        tmp_path / "out", tiny_data_config, model=ModelConfig(backbone="vgg3", width=0.25, feature_dim=1000)
    )
    with pytest.raises(ConfigError, match="--feature-dim 1000 is more than the 16 channels"):
        compare(cfg)
    assert not list((tmp_path / "out").rglob("*.pt"))  # refused before the local phase


def test_coherent_training_through_the_features_trains_the_convolutions_and_not_the_heads(tmp_path, tiny_run):
    from ddcnn.methods import run
    from ddcnn.models.spec import model_from_checkpoint
    from ddcnn.phases import Experiment
    from ddcnn.phases.context import initial_local_cnns
    from ddcnn.runtime import seed_everything

    cfg = tiny_run(tmp_path, method="coherent", model__local_output="features", model__feature_dim=4)
    run(cfg)
    model = model_from_checkpoint(tmp_path / "coherent.pt")
    assert model.aggregator.local_output == "features" and model.aggregator.input_dim == 4
    exp = Experiment.from_config(cfg)
    seed_everything(cfg.train.seed)
    start = initial_local_cnns(exp, exp.decomposition()).state_dict()  # coherent's initialisation
    trained = model.local_cnns.state_dict()
    assert torch.equal(trained["net.head.0.weight"], start["net.head.0.weight"])  # frozen: not in the output
    assert not torch.equal(trained["net.features.0.weight"], start["net.features.0.weight"])


def test_method_order_puts_each_input_after_its_aggregator():
    assert method_order(["transfer", "linear:features", "dnn:features", "dnn", "global", "dnn:logits", "mean"]) == [
        "global",
        "dnn",
        "dnn:logits",
        "dnn:features",
        "linear:features",
        "mean",
        "transfer",
    ]


def test_feature_dim_and_local_output_are_reported_where_nothing_reads_them(tiny_data_config, tmp_path):
    from ddcnn.config import RunConfig, inapplicable_options

    def warnings(method="aggregation", **model):
        cfg = RunConfig(method=method, model=ModelConfig(**model))
        return [m for m in inapplicable_options(cfg) if "--feature-dim" in m]

    assert warnings(feature_dim=4, local_output="features") == []
    assert "--local-output probabilities" in warnings(feature_dim=4)[0]
    assert "which has no aggregator" in warnings("local", feature_dim=4)[0]

    def compare_warnings(methods, **model):
        model = ModelConfig(backbone="vgg3", **model)
        return [
            m
            for m in tiny_compare(tmp_path, tiny_data_config, methods=methods, model=model).inapplicable_options()
            if "--feature-dim" in m or "--local-output" in m
        ]

    assert compare_warnings(("local", "dnn:features"), feature_dim=8) == []
    assert (
        "no method of this comparison reads the local CNNs' features"
        in compare_warnings(("local", "dnn:logits"), feature_dim=8)[0]
    )
    assert "--local-output has no effect" in compare_warnings(("local", "dnn:features"), local_output="logits")[0]
    assert compare_warnings(("local", "dnn", "dnn:features"), local_output="logits") == []
