"""The model spec: round trips, rebuilding, comparing, and the ``meta`` checkpoints of ddcnn 0.1."""

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddcnn.config import config_to_dict, format_grid
from ddcnn.decomposition import Decomposition
from ddcnn.errors import CheckpointError, CheckpointMismatchError
from ddcnn.evaluate import evaluate_checkpoint
from ddcnn.models import CNNDNN, LocalCNNs, ModelSpec, model_from_checkpoint, spec_of
from ddcnn.models.aggregators import aggregator_options, list_aggregators
from ddcnn.models.spec import LOCAL_CNNS_FIELDS
from ddcnn.phases import Experiment
from ddcnn.phases.context import build_aggregator, build_local_cnns
from ddcnn.predict import predict
from ddcnn.train import load_checkpoint, save_checkpoint

LOCAL = dict(kind="local_cnns", backbone="vgg3", grid=(2, 2), image_shape=(16, 16), in_channels=1, num_classes=3,
             width=0.25, overlap=1, class_names=("a", "b", "c"), mean=(0.3,), std=(0.2,), method="local",
             dataset="npz:tiny.npz")
SPECS = {
    "local": LOCAL,
    "global": LOCAL | dict(grid=(1, 1), overlap=0, method="global"),
    "dnn": LOCAL | dict(kind="cnn_dnn", aggregator="dnn", method="dnn", local_checkpoint="run/local.pt",
                        aggregator_options={"hidden": (16, 8), "activation": "gelu", "dropout": 0.0,
                                            "batchnorm": False}),
    "3d vote": LOCAL | dict(kind="cnn_dnn", grid=(2, 1, 2), image_shape=(8, 8, 8), aggregator="vote"),
    "coarse mean": LOCAL | dict(kind="cnn_dnn", coarse=True, aggregator="mean"),
}


@pytest.mark.parametrize("name", SPECS)
def test_to_dict_is_plain_and_from_dict_reads_it_back(name):
    spec = ModelSpec(**SPECS[name])
    d = spec.to_dict()
    # written whole, but for coarse where it is False: the specs of checkpoints from before it stay equal
    assert set(d) == {f.name for f in dataclasses.fields(ModelSpec)} - ({"coarse"} if not spec.coarse else set())
    assert yaml.safe_load(yaml.safe_dump(d)) == d and json.loads(json.dumps(d)) == d  # lists, not tuples
    assert ModelSpec.from_dict(d) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert spec.decomposition() == Decomposition(spec.grid, spec.image_shape, spec.overlap, spec.coarse)


@pytest.mark.parametrize("name", SPECS)
def test_build_gives_the_model_of_the_spec(name):
    spec = ModelSpec(**SPECS[name])
    model = spec.build()
    assert isinstance(model, CNNDNN if spec.kind == "cnn_dnn" else LocalCNNs)
    assert ModelSpec.of(model, **{k: v for k, v in SPECS[name].items() if k not in LOCAL_CNNS_FIELDS}) == spec
    x = torch.randn(2, 1, *spec.image_shape)
    assert model.eval()(x).shape == ((2, 3) if spec.kind == "cnn_dnn" else (2, spec.decomposition().num_subdomains, 3))


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_the_spec_of_every_phase_s_model_builds_that_model(tmp_path, tiny_run):
    exp = Experiment.from_config(tiny_run(tmp_path, model__overlap=1, model__dnn_hidden=(8, 4)))
    for grid in ((1,), (2, 2)):
        decomposition = exp.decomposition(grid)
        trained = build_local_cnns(exp, decomposition)
        assert shapes(exp.spec("local_cnns", decomposition).build().state_dict()) == shapes(trained.state_dict())
    for name in list_aggregators():
        trained = CNNDNN(build_local_cnns(exp, decomposition), build_aggregator(exp, name, decomposition))
        spec = exp.spec("cnn_dnn", decomposition, name, method=name)
        assert shapes(spec.build().state_dict()) == shapes(trained.state_dict()), name
        assert spec.aggregator_options == aggregator_options(name, exp.cfg.model)
        data = exp.data
        assert (spec.class_names, spec.mean, spec.std) == tuple(map(tuple, (data.class_names, data.mean, data.std)))


def test_model_from_checkpoint_gives_a_ready_model(tmp_path):
    spec = ModelSpec(**SPECS["dnn"])
    torch.manual_seed(0)
    model = spec.build().eval()
    path = save_checkpoint({"model": model.state_dict(), "spec": spec.to_dict()}, tmp_path / "dnn.pt")
    x = torch.randn(4, 1, 16, 16)
    for rebuilt in (model_from_checkpoint(load_checkpoint(path)), model_from_checkpoint(path)):
        assert not rebuilt.training
        torch.testing.assert_close(rebuilt(x), model(x))


# -- refusals ---------------------------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_unknown_keys_are_refused():
    d = ModelSpec(**LOCAL).to_dict() | {"colour": "red", "depth": 3}
    with pytest.raises(CheckpointError, match=r"x\.pt \(its spec\) has unknown key\(s\) 'colour', 'depth'") as e:
        spec_of({"model": {}, "spec": d}, "x.pt")
    one_line(e)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kind="forest"), r"describes no model \(kind 'forest' is not one of local_cnns, cnn_dnn\)"),
        (dict(kind="cnn_dnn"), r"describes no model \(a cnn_dnn has an aggregator"),
        (dict(class_names=["a", "b"]), r"describes no model \(2 class names for 3 classes\)"),
        (dict(grid=[2, 2, 2]), r"describes no model \(grid \(2, 2, 2\) and image shape \(16, 16\) differ"),
        (dict(in_channels="many"), r"describes no model \(invalid literal"),
    ],
)
def test_a_spec_that_makes_no_model_is_a_one_line_error(change, message):
    with pytest.raises(CheckpointError, match=message) as e:
        spec_of({"model": {}, "spec": ModelSpec(**LOCAL).to_dict() | change}, "x.pt")
    one_line(e)


def test_a_checkpoint_without_a_spec_says_what_it_lacks():
    with pytest.raises(CheckpointError, match=r"x\.pt lacks 'spec', so it is not a ddcnn checkpoint") as e:
        spec_of({"model": {}, "epoch": 3}, "x.pt")
    one_line(e)
    with pytest.raises(CheckpointError, match=r"x\.pt \(its spec\) is a list, not a mapping"):
        spec_of({"model": {}, "spec": [1, 2]}, "x.pt")


def test_weights_or_names_that_do_not_fit_the_spec_are_refused(tmp_path):
    spec = ModelSpec(**SPECS["dnn"])
    other = dataclasses.replace(spec, num_classes=4, class_names=None).build()
    with pytest.raises(CheckpointMismatchError, match=r"the cnn_dnn model of x\.pt does not fit: .* has shape") as e:
        model_from_checkpoint({"model": other.state_dict(), "spec": spec.to_dict()}, "x.pt")
    one_line(e)
    unknown = spec.to_dict() | {"backbone": "vgg99"}
    with pytest.raises(CheckpointError, match=r"x\.pt describes a model ddcnn cannot build \(unknown backbone 'vgg99'"):
        model_from_checkpoint({"model": {}, "spec": unknown}, "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt holds no weights"):
        model_from_checkpoint({"model": [1], "spec": spec.to_dict()}, "x.pt")


def test_check_compatible_names_the_first_differing_field_and_what_to_do():
    spec = ModelSpec(**LOCAL)
    with pytest.raises(CheckpointMismatchError) as e:
        spec.check_compatible(dataclasses.replace(spec, backbone="vgg5", grid=(4, 4)), "x.pt")
    assert one_line(e) == (
        "checkpoint x.pt has backbone 'vgg3' but this run needs 'vgg5'; use a checkpoint trained with the same "
        "backbone or change the configuration"
    )
    with pytest.raises(CheckpointMismatchError, match=r"has grid \(2, 2\) but this run needs \(4, 4\)"):
        spec.check_compatible(dataclasses.replace(spec, grid=(4, 4)), "x.pt", keys=LOCAL_CNNS_FIELDS)
    with pytest.raises(CheckpointMismatchError, match=r"has image_shape \(16, 16\) but this run needs \(32, 32\)"):
        spec.check_compatible({"in_channels": 1, "image_shape": [32, 32]}, "x.pt")
    # what does not make the model (names, normalisation, provenance) is not compared
    spec.check_compatible(dataclasses.replace(spec, class_names=None, mean=(0.5,), method="global"), "x.pt")
    spec.check_compatible({"grid": [2, 2], "aggregator": None}, "x.pt")


# -- checkpoints of ddcnn 0.1: "meta" instead of "spec" ---------------------------------------------------------


def release_0_1_meta(exp: Experiment, kind: str, decomposition: Decomposition, **extra: Any) -> dict[str, Any]:
    """``Experiment.meta`` of ddcnn 0.1, as it wrote every checkpoint's ``"meta"``."""
    m = exp.cfg.model
    return {
        "kind": kind,
        "backbone": m.backbone,
        "width": m.width,
        "grid": list(decomposition.grid),
        "overlap": decomposition.overlap,
        "in_channels": exp.data.in_channels,
        "num_classes": exp.data.num_classes,
        "image_shape": list(exp.data.image_shape),
        "class_names": list(exp.data.class_names),
        "mean": list(exp.data.mean),
        "std": list(exp.data.std),
        "dataset": exp.data.name,
        **extra,
    }


@pytest.mark.parametrize("method", ["global", "dnn"])
def test_a_release_0_1_checkpoint_loads_through_evaluate_and_predict(tmp_path, tiny_run, method):
    exp = Experiment.from_config(tiny_run(tmp_path))
    torch.manual_seed(0)
    if method == "global":
        decomposition = exp.decomposition((1,))
        model: torch.nn.Module = build_local_cnns(exp, decomposition)
        meta = release_0_1_meta(exp, "local_cnns", decomposition, method="global")
        spec = exp.spec("local_cnns", decomposition, method="global")
    else:
        decomposition = exp.decomposition()
        model = CNNDNN(build_local_cnns(exp, decomposition), build_aggregator(exp, "dnn", decomposition))
        options = aggregator_options("dnn", exp.cfg.model)
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
        meta = release_0_1_meta(exp, "cnn_dnn", decomposition, method="dnn", local_checkpoint="local.pt",
                                aggregator="dnn", aggregator_options=options)
        spec = exp.spec("cnn_dnn", decomposition, "dnn", method="dnn", local_checkpoint="local.pt")
    state = {"model": model.state_dict(), "meta": meta, "config": config_to_dict(exp.cfg), "history": [], "epoch": 1,
             "train_seconds": 1.0, "finished": True}
    path = save_checkpoint(state, tmp_path / f"{method}.pt")
    assert spec_of(load_checkpoint(path), path) == spec

    x, y = next(iter(exp.loader("test")))
    with torch.no_grad():
        scores = model.eval()(x).float().softmax(-1)
    probabilities = scores if method == "dnn" else scores.mean(1)
    report = evaluate_checkpoint(path, device="cpu")
    assert report["method"] == method and report["grid"] == format_grid(decomposition.grid)
    assert report["accuracy"] == pytest.approx(float((probabilities.argmax(-1) == y).float().mean()))

    images = []
    for i, image in enumerate(exp.data.test.images[:4]):
        images.append(tmp_path / f"test{i}.png")
        Image.fromarray(image[0].numpy()).save(images[-1])
    predictions = predict(path, images, device="cpu")
    assert [p.prediction.class_index for p in predictions] == probabilities[:4].argmax(-1).tolist()
    assert [p.prediction.probability for p in predictions] == pytest.approx(probabilities[:4].amax(-1).tolist())
    assert {p.prediction.class_name for p in predictions} <= set(exp.data.class_names)


def test_a_release_0_1_meta_may_lack_what_has_a_default_but_not_what_makes_the_model():
    meta = {"kind": "local_cnns", "backbone": "vgg3", "grid": [2, 2], "image_shape": [16, 16], "in_channels": 1,
            "num_classes": 3}
    spec = spec_of({"model": {}, "meta": meta}, "old.pt")
    assert (spec.width, spec.overlap, spec.class_names, spec.aggregator_options) == (1.0, 0, None, {})
    assert isinstance(spec.build(), LocalCNNs)
    with pytest.raises(CheckpointError, match=r"old\.pt \(its meta\) lacks 'backbone', 'grid'") as e:
        spec_of({"model": {}, "meta": {k: v for k, v in meta.items() if k not in ("backbone", "grid")}}, "old.pt")
    one_line(e)


def test_predict_says_what_a_spec_without_normalisation_lacks(tmp_path):
    spec = ModelSpec(**LOCAL | dict(mean=None, std=None))
    path = save_checkpoint({"model": spec.build().state_dict(), "spec": spec.to_dict()}, tmp_path / "x.pt")
    np.save(tmp_path / "image.npy", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(CheckpointError, match=r"x\.pt \(its spec\) lacks 'mean', 'std', which predict needs"):
        predict(path, [tmp_path / "image.npy"])
