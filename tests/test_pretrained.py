"""--init-weights: torchvision-named state dicts load into the global CNN and every local CNN of the built-in
backbones and compute what torchvision's model computes; the classifier starts fresh, gray data get the first
convolution summed over RGB, a mismatch is one line naming the key; both file formats; a run end to end."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torchvision_reference import features, key_shape_digest, randomized, reference

import ddcnn
from ddcnn.checkpoint import load_checkpoint
from ddcnn.cli import main
from ddcnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ddcnn.data.normalization import IMAGENET_MEAN, IMAGENET_STD, imagenet_statistics
from ddcnn.decomposition import Decomposition
from ddcnn.errors import CheckpointError, CheckpointMismatchError, ConfigError
from ddcnn.methods import run
from ddcnn.models import LocalCNNs
from ddcnn.models.pretrained import (
    from_torchvision,
    init_from_state_dict,
    key_pairs,
    load_init_weights,
    pin_init_weights,
    read_state_dict,
    to_torchvision,
)

# torchvision's own models at 1000 classes (torchvision 0.29's resnet.py and densenet.py, built from that source
# with its helper imports stubbed): state-dict keys, parameters (batch-norm buffers not counted), and the sha256 of
# the lines "<key> <shape>" of the state dict in its order (torchvision_reference.key_shape_digest)
TORCHVISION = {
    "resnet18": (122, 11_689_512, "84fb10d9c6905a1cbb020b284537dc97c4f4ec55fb2a780a41152a23a2dd0e9d"),
    "resnet50": (320, 25_557_032, "d7e4f8bb0a5363446a59c81c3887ccf66900a11651a0ae2dec96d1bb1eb6ea81"),
    "densenet121": (727, 7_978_856, "aa0fd9923b0003b813430af55d9350bcf2555273dedae08042b92025727ccac8"),
    "densenet169": (1015, 14_149_480, "e2d0f02d9c0ce650d84c9133534205af8eb2a087753b55f791533e72fa5b4f92"),
}
SHAPES = {  # a few of them by hand, from torchvision's source
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
    },
    "resnet50": {
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    },
    "densenet121": {
        "features.conv0.weight": (64, 3, 7, 7),
        "features.transition3.conv.weight": (512, 1024, 1, 1),
        "features.denseblock4.denselayer16.conv1.weight": (128, 992, 1, 1),
        "features.norm5.running_var": (1024,),
        "classifier.weight": (1000, 1024),
    },
    "densenet169": {
        "features.denseblock4.denselayer32.conv2.weight": (32, 128, 3, 3),
        "classifier.weight": (1000, 1664),
    },
}


def float64_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float64 rounding: ~100 layers of sums of <= 10^4 products each leave well under 1e-10 of the
    largest value (measured: ~1e-15)."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


def local_cnns(name: str, grid=(1, 1), shape=(32, 32), channels: int = 3, classes: int = 10, width: float = 1.0):
    return LocalCNNs(name, Decomposition(grid, shape), channels, classes, width)


@pytest.mark.parametrize("name", TORCHVISION)
def test_the_reference_has_torchvision_keys_and_shapes(name):
    model = reference(name)
    state = model.state_dict()
    keys, parameters, digest = TORCHVISION[name]
    assert len(state) == keys and sum(p.numel() for p in model.parameters()) == parameters
    assert key_shape_digest(state) == digest
    assert {k: tuple(state[k].shape) for k in SHAPES[name]} == SHAPES[name]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_torchvision_weights_at_1000_classes_load_into_the_global_cnn_with_a_fresh_classifier(name):
    tv = randomized(reference(name)).state_dict()  # torchvision's model: random weights and statistics
    model = local_cnns(name)  # the global CNN of a 10-class task
    classifier = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    init_from_state_dict(model, tv, "the test's weights")
    assert all(torch.equal(v, model.net.head.state_dict()[k]) for k, v in classifier.items())  # as built: fresh
    assert model.net.head[0].weight.shape[1] == 10  # the task's classes, not ImageNet's
    loaded = to_torchvision(model.net.state_dict(), key_pairs(model.net))
    assert set(loaded) == set(tv)
    assert all(torch.equal(loaded[k], v) for k, v in tv.items() if not k.startswith(("fc.", "classifier.")))


@pytest.mark.parametrize("name", list(TORCHVISION))
@pytest.mark.parametrize("grid, channels", [((1, 1), 3), ((2, 2), 3), ((2, 2), 1)])
def test_the_global_and_every_local_cnn_compute_what_torchvision_computes(name, grid, channels):
    tv = randomized(reference(name, width=0.25), seed=1)  # the mapping does not depend on the width: small is fast
    if channels == 1:  # weights in 1/4096ths: their sum over RGB is exact in float32, as is torchvision's in float64
        stem = tv.conv1 if name.startswith("resnet") else tv.features.conv0
        with torch.no_grad():
            stem.weight.copy_(torch.round(stem.weight * 4096) / 4096)
    side = 32 * grid[0]  # subimages of 32x32: torchvision's DenseNet needs that much
    model = local_cnns(name, grid, (side, side), channels, width=0.25)
    init_from_state_dict(model, tv.state_dict(), "the test's weights")
    x = torch.randn(2, channels, side, side, dtype=torch.float64)
    with torch.no_grad():
        subimages = model.double().eval().decomposition.split(x)
        got = model.net.forward_features(subimages.flatten(1, 2))
        for i in range(model.num_local_cnns):
            rgb = subimages[:, i].expand(-1, 3, -1, -1)  # a gray image as R = G = B: what the summed kernel sees
            float64_close(got[:, i], features(tv.double(), rgb))


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_torchvision_names_to_a_local_cnn_and_back_are_the_same_tensors(name):
    tv = randomized(reference(name, num_classes=5, width=0.25), seed=2).state_dict()
    model = local_cnns(name, (2, 2), classes=5, width=0.25)
    pairs = key_pairs(model.net)
    model.load_local_cnn(2, from_torchvision(tv, pairs))
    back = to_torchvision(model.local_cnn(2).state_dict(), pairs)
    assert list(back) == list(tv)  # torchvision's order too
    # all but the batch counts, which the local CNNs of a grouped batch norm share (they count steps only)
    assert all(torch.equal(back[k], tv[k]) for k in tv if not k.endswith("num_batches_tracked"))


# -- mismatches: one line, naming the key -----------------------------------------------------------------------


def small_resnet18(**changes) -> dict[str, torch.Tensor]:
    return randomized(reference("resnet18", width=0.25)).state_dict() | changes


def refusal(state, model=None) -> str:
    with pytest.raises((CheckpointMismatchError, ConfigError)) as e:
        init_from_state_dict(model or local_cnns("resnet18", width=0.25), state, "w.pt")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_missing_key_is_named():
    state = small_resnet18()
    del state["layer2.0.downsample.1.running_var"]
    assert "w.pt lacks layer2.0.downsample.1.running_var, a key of torchvision's resnet18" in refusal(state)


def test_a_wrong_shape_is_named():
    message = refusal(small_resnet18(**{"layer3.1.conv2.weight": torch.zeros(64, 64, 1, 1)}))
    assert "w.pt: layer3.1.conv2.weight has shape (64, 64, 1, 1), but resnet18 at width 0.25" in message
    assert "needs (64, 64, 3, 3)" in message


def test_an_unexpected_key_is_named():
    message = refusal(small_resnet18(**{"layer5.0.conv1.weight": torch.zeros(1)}))
    assert "w.pt has the key layer5.0.conv1.weight, which torchvision's resnet18 has not" in message


def test_weights_of_another_width_or_backbone_are_refused_at_the_first_key():
    full = randomized(reference("resnet18")).state_dict()
    assert "conv1.weight has shape (64, 3, 7, 7), but resnet18 at width 0.25" in refusal(full)
    assert "w.pt lacks features.conv0.weight, a key of torchvision's densenet121" in refusal(
        full, local_cnns("densenet121", width=0.25)
    )
    grouped = local_cnns("resnet18", (2, 2), width=0.25).state_dict()  # a ddcnn checkpoint: --pretrained
    assert "lacks conv1.weight" in refusal(grouped) and "--pretrained" in refusal(grouped)


def test_unsupported_backbones_volumes_and_channels_are_refused():
    state = small_resnet18()
    assert "not into vgg3" in refusal(state, local_cnns("vgg3"))
    volumes = LocalCNNs("resnet18", Decomposition((1, 1, 1), (16, 16, 16)), 1, 3, 0.25)
    assert "3D volumes" in refusal(state, volumes)
    assert "to 1 or 3 input channels, but the images have 2" in refusal(state, local_cnns("resnet18", channels=2))


# -- files ------------------------------------------------------------------------------------------------------


def test_safetensors_and_weights_only_torch_files_load_alike(tmp_path):
    from safetensors.torch import save_file

    state = small_resnet18()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}  # a DDP training checkpoint
    torch.save(wrapped, tmp_path / "wrapped.pt")
    for name in ("w.safetensors", "w.pth", "wrapped.pt"):
        got, digest = read_state_dict(tmp_path / name)
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state), name


def test_torchvision_2017_densenet_names_and_files_without_batch_counts_load(tmp_path):
    tv = randomized(reference("densenet121", width=0.25)).state_dict()
    legacy = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
        for k, v in tv.items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save(legacy, tmp_path / "densenet121-a639ec97.pth")
    model, again = local_cnns("densenet121", width=0.25), local_cnns("densenet121", width=0.25)
    load_init_weights(model, tmp_path / "densenet121-a639ec97.pth")
    init_from_state_dict(again, tv, "the same, named today")
    own = model.state_dict()
    assert all(
        torch.equal(v, own[k])
        for k, v in again.state_dict().items()
        if "head" not in k and not k.endswith("num_batches_tracked")
    )


def test_pickled_models_and_a_changed_file_are_refused(tmp_path):
    torch.save(reference("resnet18", width=0.25), tmp_path / "model.pt")  # the module, not its state dict
    with pytest.raises(CheckpointError, match="save model.state_dict"):
        read_state_dict(tmp_path / "model.pt")
    torch.save(small_resnet18(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="has sha256 .* not the 0{64} this run's configuration records"):
        load_init_weights(local_cnns("resnet18", width=0.25), tmp_path / "w.pt", sha256="0" * 64)
    with pytest.raises(ConfigError, match="does not exist"):
        load_init_weights(local_cnns("resnet18", width=0.25), tmp_path / "none.pt")


def test_the_configuration_records_the_file_sha256(tmp_path):
    torch.save(small_resnet18(), tmp_path / "w.pt")
    cfg = RunConfig(model=ModelConfig(backbone="resnet18", init_weights=str(tmp_path / "w.pt")))
    pinned = pin_init_weights(cfg)
    assert pinned.model.init_weights_sha256 == hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    assert cfg.model.init_weights_sha256 is None and pin_init_weights(RunConfig()) == RunConfig()
    with pytest.raises(ConfigError, match="init_weights_sha256 must be given with --init-weights"):
        ModelConfig(init_weights_sha256="a" * 64)
    with pytest.raises(ConfigError, match="not into vgg9"):
        pin_init_weights(RunConfig(model=ModelConfig(init_weights=str(tmp_path / "w.pt"))))


def test_imagenet_statistics_for_rgb_and_gray():
    assert imagenet_statistics(3) == (IMAGENET_MEAN, IMAGENET_STD)
    (mean,), (std,) = imagenet_statistics(1)
    assert mean == pytest.approx(0.449) and std == pytest.approx(0.226)
    with pytest.raises(ConfigError, match="--normalize imagenet needs RGB or gray images, but these have 2"):
        imagenet_statistics(2)


# -- a run ------------------------------------------------------------------------------------------------------


def test_train_with_init_weights_and_imagenet_normalisation(tmp_path, make_npz, capsys):
    npz = make_npz(tmp_path / "d.npz", n=60, shape=(32, 32))
    tv = small_resnet18()
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file(tv, str(weights))
    out = tmp_path / "run"
    argv = [
        "train",
        "--dataset",
        f"npz:{npz}",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--method",
        "local",
        "--backbone",
        "resnet18",
        "--width",
        "0.25",
        "--grid",
        "2x2",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "1e-9",
        "--init-weights",
        str(weights),
        "--normalize",
        "imagenet",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    state = load_checkpoint(out / "local.pt")
    assert state["config"]["model"]["init_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    (mean,), (std,) = imagenet_statistics(1)
    assert state["spec"]["mean"] == [mean] and state["spec"]["std"] == [std]
    stem = state["model"]["net.features.0.weight"]  # 4 local CNNs, each from the file (a step of lr 1e-9 since)
    torch.testing.assert_close(stem, tv["conv1.weight"].sum(1, keepdim=True).repeat(4, 1, 1, 1), atol=1e-6, rtol=0)
    model = ddcnn.load(out)  # inference normalises as training did
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8))
    torch.testing.assert_close(model.normalise(x), (x.float() / 255 - mean) / std, atol=1e-5, rtol=0)

    save_file(small_resnet18(**{"fc.bias": torch.zeros(1000)}), str(weights))  # another file under the same name
    capsys.readouterr()
    assert main([*argv, "--resume"]) != 0
    assert "model.init_weights_sha256" in capsys.readouterr().err

    data = DataConfig(dataset=f"npz:{npz}", cache_dir=str(tmp_path / "cache"), batch_size=32)
    cfg = RunConfig(
        method="aggregation",
        out=str(tmp_path / "agg"),
        pretrained=str(out),
        data=data,
        model=ModelConfig(backbone="resnet18", width=0.25, grid=(2, 2), aggregator="mean"),
        train=TrainConfig(epochs=1, progress=False),
    )
    with pytest.raises(CheckpointMismatchError, match="pass the --normalize it was trained with"):
        run(cfg)  # local CNNs trained on ImageNet-normalised inputs, fed the data's statistics


def test_coherent_training_starts_from_init_weights(tmp_path, make_npz):
    npz = make_npz(tmp_path / "d.npz", n=60, shape=(32, 32))
    weights = tmp_path / "w.pt"
    tv = small_resnet18()
    torch.save(tv, weights)
    cfg = RunConfig(
        method="coherent",
        out=str(tmp_path / "run"),
        data=DataConfig(dataset=f"npz:{npz}", cache_dir=str(tmp_path / "cache"), batch_size=32),
        model=ModelConfig(backbone="resnet18", width=0.25, grid=(2, 2), dnn_hidden=(8,), init_weights=str(weights)),
        train=TrainConfig(epochs=1, lr=1e-9, progress=False),
    )
    run(cfg)
    state = load_checkpoint(tmp_path / "run" / "coherent.pt")
    got = state["model"]["local_cnns.net.features.7.conv2.weight"]  # the second block of the second stage
    want = tv["layer2.1.conv2.weight"].repeat(4, 1, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
