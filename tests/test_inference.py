"""ddcnn.load: a trained model that takes raw images (0..255), normalises inside and returns probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_global_and_aggregation

import ddcnn
from ddcnn.checkpoint import load_checkpoint
from ddcnn.errors import CheckpointError
from ddcnn.models import model_from_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_data_config, tmp_path_factory):
    return train_global_and_aggregation(tiny_data_config, tmp_path_factory)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 1, 16, 16), dtype=np.uint8))


def by_hand(checkpoint, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities and local probabilities of the checkpoint's model on images normalised by hand."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint)
    mean, std = (torch.tensor(state["spec"][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        if hasattr(model, "aggregator"):
            scores, local = model.forward_with_local(x)
            return scores.softmax(-1), local
        local = model(x).softmax(-1)
        return local.mean(1), local


@pytest.mark.parametrize("method, file", [("aggregation", "dnn.pt"), ("aggregation", "local.pt"), ("global", None)])
def test_load_gives_the_probabilities_of_normalising_by_hand(trained, images, method, file):
    path = trained[method] / file if file else trained[method]  # a checkpoint, or a run folder
    model = ddcnn.load(path)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.class_names == ["a", "b", "c"]
    with torch.no_grad():
        probs = model(images)
        local = model.subdomain_probabilities(images)
    expected, expected_local = by_hand(path if file else trained[method] / "global.pt", images)
    assert probs.shape == (5, 3) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    assert local.shape == (5, 1 if method == "global" else 4, 3)
    torch.testing.assert_close(local, expected_local, atol=1e-6, rtol=0)


def test_uint8_and_float_input_give_the_same_probabilities(trained, images):
    model = ddcnn.load(trained["aggregation"])
    with torch.no_grad():
        assert torch.equal(model(images), model(images.float()))
        assert torch.equal(model(images.double()), model(images))


def test_the_run_folder_s_checkpoint_is_the_one_its_results_name(trained, images):
    with torch.no_grad():
        by_folder = ddcnn.load(trained["aggregation"])(images)
        assert torch.equal(by_folder, ddcnn.load(trained["aggregation"] / "dnn.pt")(images))


def test_wrong_input_is_a_clear_error(trained, images):
    model = ddcnn.load(trained["global"])
    with pytest.raises(ValueError, match=r"images of shape \(5, 16, 16\); the model takes \(B, 1, 16, 16\)"):
        model(images[:, 0])
    with pytest.raises(TypeError, match="int64"):
        model(images.long())


def test_a_checkpoint_without_normalisation_cannot_be_loaded(trained, tmp_path):
    state = load_checkpoint(trained["global"] / "global.pt")
    state["spec"]["mean"] = None
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare\.pt \(its spec\) lacks 'mean'"):
        ddcnn.load(tmp_path / "bare.pt")
