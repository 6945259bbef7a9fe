import pytest
import torch

from ddcnn.decomposition import Decomposition
from ddcnn.errors import InputSizeError, UnknownNameError
from ddcnn.models import LocalCNNs, create_model, list_models
from ddcnn.models.summary import count_backbone_parameters

SHAPES = {2: (32, 32), 3: (16, 16, 16)}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("dims", [2, 3])
def test_every_backbone_forward_backward(name, dims):
    torch.manual_seed(0)
    shape = SHAPES[dims]
    model = create_model(name, in_channels=2, num_classes=5, spatial_dims=dims, width=0.25, input_shape=shape)
    x = torch.randn(2, 2, *shape)
    out = model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list_models())
def test_every_backbone_grouped(name):
    """groups=N computes N independent CNNs: (B, N, C, *S) -> (B, N, K)."""
    model = create_model(name, in_channels=1, num_classes=3, width=0.25, groups=4, input_shape=(16, 16))
    out = model(torch.randn(2, 4, 1, 16, 16))
    assert out.shape == (2, 4, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vgg3", "vgg9", "resnet20"])
def test_any_input_size_that_is_large_enough(name):
    for shape in [(4, 4), (7, 9), (28, 28), (40, 24)]:
        model = create_model(name, in_channels=1, num_classes=2, width=0.25, input_shape=shape)
        assert model(torch.randn(2, 1, *shape)).shape == (2, 2)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(InputSizeError, match="smaller than the 16x16 that ResNet needs"):
        create_model("resnet18", in_channels=1, num_classes=2, input_shape=(8, 8))
    with pytest.raises(InputSizeError, match="coarser grid"):
        LocalCNNs("vgg9", Decomposition((8, 8), (16, 16)), 1, 10)  # 2x2 subimages


@pytest.mark.parametrize(
    "name, expected",
    [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("densenet121", 7_978_856), ("densenet169", 14_149_480)],
)
def test_imagenet_backbones_have_torchvisions_parameter_counts(name, expected):
    """2D, width 1, 3 channels, 1000 classes, one group: the parameters of torchvision's model of that name."""
    c = count_backbone_parameters(name, (224, 224), 3, 1000, (1, 1))
    assert c.global_cnn == expected


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
@pytest.mark.parametrize("dims, shape", [(2, (32, 32)), (3, (32, 32, 32)), (2, (16, 16)), (2, (17, 23))])
def test_imagenet_backbones_forward_shapes(name, dims, shape):
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_classes=7, spatial_dims=dims, width=0.25, groups=3,
                         input_shape=shape).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 2, *shape))
    assert out.shape == (2, 3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "densenet169"])
def test_imagenet_backbones_refuse_too_small_inputs(name):
    cls = "DenseNet" if name.startswith("densenet") else "ResNet"
    for shape in [(8, 8), (16, 15, 16)]:
        with pytest.raises(InputSizeError, match=f"smaller than the 16x16(x16)? that {cls} needs") as info:
            create_model(name, in_channels=1, num_classes=2, spatial_dims=len(shape), input_shape=shape)
        assert "\n" not in str(info.value)


def test_densenet_options_and_grouped_concatenation():
    """growth_rate and block_config are options; with groups=N each group's dense layers read only that group's
    channels: changing the input of group 0 leaves the other groups' outputs unchanged."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    small = create_model("densenet121", growth_rate=8, block_config=(2, 2), num_classes=3, input_shape=(16, 16))
    assert n(small) < n(create_model("densenet121", growth_rate=8, block_config=(2, 3), num_classes=3))
    torch.manual_seed(0)
    model = create_model("densenet121", in_channels=1, num_classes=3, width=0.25, groups=3,
                         input_shape=(16, 16)).eval()
    x = torch.randn(2, 3, 1, 16, 16)
    y = x.clone()
    y[:, 0] += 1
    with torch.no_grad():
        a, b = model(x), model(y)
    assert not torch.allclose(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, 1:], b[:, 1:], rtol=0, atol=0)


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(UnknownNameError, match="unknown backbone 'vgg99'; choose one of: densenet121, densenet169"):
        create_model("vgg99")


def test_width_multiplier_scales_parameters():
    small = create_model("vgg9", in_channels=3, num_classes=10, width=0.5)
    full = create_model("vgg9", in_channels=3, num_classes=10, width=1.0)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < 0.35 * n(full)


def test_local_cnns_have_fewer_parameters():
    c = count_backbone_parameters("vgg9", (32, 32), 3, 10, (4, 4))
    assert c.num_subdomains == 16
    assert c.local_cnn < c.global_cnn  # the dense part shrinks with the subimage
    assert c.local_total == 16 * c.local_cnn


def test_local_cnn_export_and_load_round_trip():
    torch.manual_seed(0)
    d = Decomposition((2, 2), (16, 16), 1)
    model = LocalCNNs("resnet20", d, 1, 3, width=0.25).eval()
    x = torch.randn(3, 1, 16, 16)
    subimages = d.split(x)
    out = model(x)
    for i in range(4):
        single = model.local_cnn(i).eval()
        torch.testing.assert_close(single(subimages[:, i]), out[:, i])
    other = LocalCNNs("resnet20", d, 1, 3, width=0.25).eval()
    for i in range(4):
        other.load_local_cnn(i, model.local_cnn(i))
    torch.testing.assert_close(other(x), out)


def test_local_cnns_subset_of_subdomains():
    torch.manual_seed(0)
    d = Decomposition((2, 2), (16, 16))
    full = LocalCNNs("vgg3", d, 1, 3).eval()
    part = LocalCNNs("vgg3", d, 1, 3, subdomains=[1, 3]).eval()
    for pos, i in enumerate([1, 3]):
        part.load_local_cnn(pos, full.local_cnn(i))
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(part(x), full(x)[:, [1, 3]])


@pytest.mark.parametrize("dims", [2, 3])
def test_grouped_cat_is_per_group_in_either_memory_format(dims):
    from ddcnn.models.layers import CHANNELS_LAST, grouped_cat

    a, b = torch.randn(2, 3 * 4, *(3,) * dims), torch.randn(2, 3 * 2, *(3,) * dims)
    expected = torch.cat([torch.cat([a[:, 4 * g:4 * g + 4], b[:, 2 * g:2 * g + 2]], 1) for g in range(3)], 1)
    assert torch.equal(grouped_cat([a, b], 3), expected)
    fmt = CHANNELS_LAST[dims]
    out = grouped_cat([a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)], 3)
    assert torch.equal(out, expected) and out.is_contiguous(memory_format=fmt)
