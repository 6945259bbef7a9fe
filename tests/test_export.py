"""ddcnn export: ONNX (through onnxruntime), TorchScript and safetensors give back the model of ddcnn.load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_global_and_aggregation

import ddcnn
from ddcnn.cli import main
from ddcnn.export import SPEC_KEY, export, load_safetensors

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
    from safetensors.torch import load_file

    files = export(trained["aggregation"], tmp_path / "parts", "safetensors", per_local_cnn=True)
    assert [f.name for f in files] == [*(f"local_cnn_{i}.safetensors" for i in range(4)), "aggregator.safetensors"]
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


def test_export_command(trained, tmp_path, capsys):
    out = str(tmp_path / "g.pt")
    argv = ["export", "--checkpoint", str(trained["global"]), "--format", "torchscript", "--out", out]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "g.pt")
    argv = ["export", "--checkpoint", str(trained["global"]), "--format", "onnx", "--per-local-cnn", "--out", "x"]
    assert main(argv) == 2
    assert "--per-local-cnn writes safetensors files" in capsys.readouterr().err
