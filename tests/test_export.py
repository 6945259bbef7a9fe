"""ddcnn export: ONNX (through onnxruntime), TorchScript and safetensors give back the model of ddcnn.load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_global_and_aggregation
from torchvision_reference import randomized, reference

import ddcnn
from ddcnn.cli import main
from ddcnn.export import SPEC_KEY, export, load_safetensors
from ddcnn.inference import Classifier
from ddcnn.models import ModelSpec
from ddcnn.models.pretrained import from_torchvision, key_pairs

# float32 probabilities in [0, 1] of the same network by two runtimes: a few units in the last place (6e-8)
ATOL = 1e-5


@pytest.fixture(scope="module")
def trained(tiny_data_config, tmp_path_factory):
    return train_global_and_aggregation(tiny_data_config, tmp_path_factory)


def images(batch: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(batch).integers(0, 256, (batch, 1, 16, 16), dtype=np.uint8))


@pytest.mark.parametrize("method", ["aggregation", "global"])
def test_onnx_through_onnxruntime_matches_torch_at_any_batch_size(trained, tmp_path, method):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "model.onnx"
    assert export(trained[method], path, "onnx") == [path]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    model = ddcnn.load(trained[method])
    for batch in (1, 7):  # neither is the batch of 2 exported with: the batch size is dynamic
        x = images(batch)
        (got,) = session.run(None, {"images": x.float().numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_torchscript_round_trip(trained, tmp_path):
    export(trained["aggregation"], tmp_path / "model.pt", "torchscript")
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    model = ddcnn.load(trained["aggregation"])
    with torch.no_grad():
        for batch in (1, 5):
            x = images(batch)
            torch.testing.assert_close(scripted(x.float()), model(x), atol=ATOL, rtol=0)


def test_safetensors_round_trip_with_the_spec_as_metadata(trained, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    export(trained["aggregation"], path, "safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[SPEC_KEY])["class_names"] == ["a", "b", "c"]
    model, again = ddcnn.load(trained["aggregation"]), load_safetensors(path)
    assert again.class_names == model.class_names
    with torch.no_grad():
        assert torch.equal(again(images(3)), model(images(3)))


def test_safetensors_per_local_cnn_are_standalone_backbones(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = export(trained["aggregation"], tmp_path / "parts", "safetensors", per_local_cnn=True)
    assert [f.name for f in files] == [*(f"local_cnn_{i}.safetensors" for i in range(4)), "aggregator.safetensors"]
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata()["key_names"] == "ddcnn"  # vgg3 has no torchvision counterpart
    model = ddcnn.load(trained["aggregation"])
    local_cnns = model.model.local_cnns
    x = images(3)
    subimages = local_cnns.decomposition.split(model.normalise(x))
    with torch.no_grad():
        local = model.subdomain_probabilities(x)
        for i in range(4):
            backbone = local_cnns.local_cnn(i).eval()  # a fresh module: in training mode
            weights = load_file(str(files[i]))
            assert set(weights) == set(backbone.state_dict())  # ordinary keys, not the grouped layout
            backbone.load_state_dict(weights)
            probabilities = backbone(subimages[:, i : i + 1]).softmax(-1)[:, 0]
            torch.testing.assert_close(probabilities, local[:, i], atol=1e-6, rtol=0)


def built_in(name: str, classes: int = 5) -> Classifier:
    """An untrained classifier of built-in backbone ``name`` at width 0.25 on 2x2 subdomains of 64x64 RGB images
    (subimages of 32x32, as torchvision's DenseNet needs), with random batch-norm statistics."""
    spec = ModelSpec(
        kind="local_cnns", backbone=name, grid=(2, 2), image_shape=(64, 64), in_channels=3, num_classes=classes,
        width=0.25, class_names=tuple("abcdefgh"[:classes]), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
    )
    model = spec.build()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return Classifier(model.eval(), spec).eval()


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_per_local_cnn_files_of_built_in_backbones_load_into_torchvision_models(name, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    classifier = built_in(name)
    files = export(classifier, tmp_path / "parts", "safetensors", per_local_cnn=True)
    assert [f.name for f in files] == [f"local_cnn_{i}.safetensors" for i in range(4)]
    local_cnns = classifier.model.double()
    tv = reference(name, num_classes=5, width=0.25).double().eval()  # torchvision's (at width 1: models.resnet18)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits, subimages = local_cnns(x), local_cnns.decomposition.split(x)
        for i, path in enumerate(files):
            with safe_open(str(path), framework="pt") as f:
                assert f.metadata()["key_names"] == "torchvision"
            tv.load_state_dict(load_file(str(path)))  # strict: exactly torchvision's names and shapes
            want = tv(subimages[:, i])
            torch.testing.assert_close(logits[:, i], want, rtol=0, atol=1e-10 * float(want.abs().max()))


def test_torchvision_weights_in_a_local_cnn_come_back_out_of_export_as_they_went_in(tmp_path):
    from safetensors.torch import load_file

    classifier = built_in("resnet50")
    tv = randomized(reference("resnet50", num_classes=5, width=0.25)).state_dict()
    local_cnns = classifier.model
    local_cnns.load_local_cnn(2, from_torchvision(tv, key_pairs(local_cnns.net)))
    out = load_file(str(export(classifier, tmp_path / "parts", "safetensors", per_local_cnn=True)[2]))
    assert set(out) == set(tv)
    # all but the batch counts, which the local CNNs of a grouped batch norm share (they count steps only)
    assert all(torch.equal(out[k], v) for k, v in tv.items() if not k.endswith("num_batches_tracked"))


def test_export_command(trained, tmp_path, capsys):
    out = str(tmp_path / "g.pt")
    argv = ["export", "--checkpoint", str(trained["global"]), "--format", "torchscript", "--out", out]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "g.pt")
    argv = ["export", "--checkpoint", str(trained["global"]), "--format", "onnx", "--per-local-cnn", "--out", "x"]
    assert main(argv) == 2
    assert "--per-local-cnn writes safetensors files" in capsys.readouterr().err
