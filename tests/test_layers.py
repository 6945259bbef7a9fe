"""The fast paths of the grouped layers compute exactly what the plain torch layers compute."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddcnn.models import layers
from ddcnn.models.layers import CHANNELS_LAST, SmallMapConv, adaptive_avgpool, conv, small_map_conv


@pytest.mark.parametrize(
    "in_shape, kernel, stride, groups, bias",
    [
        ((2, 2), 3, 1, 4, False),  # the common case: 3x3 kernels on 2x2 maps
        ((1, 1), 3, 1, 2, True),
        ((2, 3), 3, 1, 3, True),  # some (output, input) pixel pairs are not connected
        ((3, 3), 5, 2, 2, False),
        ((2, 2), 7, 2, 2, False),
        ((2, 2, 2), 3, 1, 2, True),
        ((1, 2, 3), 3, 2, 1, True),
    ],
)
def test_small_map_conv_equals_the_convolution(in_shape, kernel, stride, groups, bias):
    torch.manual_seed(0)
    dims = len(in_shape)
    x = torch.randn(3, groups * 5, *in_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(groups * 4, 5, *([kernel] * dims), dtype=torch.float64, requires_grad=True)
    b = torch.randn(groups * 4, dtype=torch.float64, requires_grad=True) if bias else None
    args = ((stride,) * dims, (kernel // 2,) * dims)
    expected = getattr(F, f"conv{dims}d")(x, w, b, *args, 1, groups)
    out = small_map_conv(x, w, b, *args, groups)
    torch.testing.assert_close(out, expected)
    inputs = [x, w] + ([b] if bias else [])
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "in_shape, memory_format", [((2, 2), "channels_last"), ((2, 3), "contiguous"), ((2, 1, 2), "")]
)
def test_small_map_conv_in_chunks_of_groups_equals_the_convolution(monkeypatch, in_shape, memory_format):
    """Groups whose dense matrices exceed SMALL_MAP_CHUNK_BYTES are done a chunk at a time (here 2, 2 and 1 of 5)."""
    torch.manual_seed(0)
    dims, groups, cin, cout = len(in_shape), 5, 3, 4
    pixels = math.prod(in_shape)  # stride 1, 'same' padding: as many output pixels
    monkeypatch.setattr(layers, "SMALL_MAP_CHUNK_BYTES", 2 * pixels * pixels * cin * cout * 8)  # 2 groups, float64
    products = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: products.append(len(a)) or bmm(a, b))
    x = torch.randn(3, groups * cin, *in_shape, dtype=torch.float64)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=CHANNELS_LAST[dims])
    x.requires_grad_()
    w = torch.randn(groups * cout, cin, *([3] * dims), dtype=torch.float64, requires_grad=True)
    b = torch.randn(groups * cout, dtype=torch.float64, requires_grad=True)
    args = ((1,) * dims, (1,) * dims)
    expected = getattr(F, f"conv{dims}d")(x, w, b, *args, 1, groups)
    out = small_map_conv(x, w, b, *args, groups)
    assert products == [2, 2, 1]
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=CHANNELS_LAST[dims]) == (memory_format == "channels_last")
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, [x, w, b], grad), torch.autograd.grad(expected, [x, w, b], grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_grouped_conv_module_takes_the_fast_path_only_on_small_maps(memory_format):
    torch.manual_seed(0)
    layer = conv(2, 3, 4, 3, groups=2)
    for size in (2, 4):  # 4 pixels < 9 taps: fast path; 16 pixels: the ordinary convolution
        x = torch.randn(2, 6, size, size)
        if memory_format == "channels_last":
            x = x.contiguous(memory_format=CHANNELS_LAST[2])
        expected = F.conv2d(x, layer.weight, None, 1, 1, 1, 2)
        torch.testing.assert_close(layer(x), expected)
        SmallMapConv.enabled = False
        try:
            torch.testing.assert_close(layer(x), expected)
        finally:
            SmallMapConv.enabled = True


def test_adaptive_avgpool_passes_through_when_the_size_already_fits():
    pool = adaptive_avgpool(2, (2, 2))
    x = torch.randn(2, 3, 2, 2)
    assert pool(x) is x
    torch.testing.assert_close(pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("cin, cout", [(4, 8), (2, 4), (3, 8), (16, 32)])
def test_strided_pointwise_conv_gradient_is_right_in_channels_last(cin, cout):
    # PyTorch 2.13's CPU kernel gets the weight gradient of this layer wrong (or hangs) for 2-7 input channels on a
    # channels-last input; the layer must give the float64 reference gradient whatever the input layout
    torch.manual_seed(0)
    layer = conv(2, cin, cout, kernel=1, groups=1, stride=2)
    x = torch.randn(32, cin, 12, 12)
    reference = F.conv2d(x.double(), layer.weight.double(), stride=2)
    grad_out = torch.randn_like(reference)
    (expected,) = torch.autograd.grad(reference, layer.weight, grad_out)
    out = layer(x.contiguous(memory_format=CHANNELS_LAST[2]))
    (grad,) = torch.autograd.grad(out, layer.weight, grad_out.float())
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)


def test_small_map_conv_trains_after_its_first_call_in_inference_mode():
    # the cached tap index must not be an inference tensor: evaluating a freshly shaped model before training it
    # (a resumed run evaluates finished phases first) must not break the backward pass
    layer = conv(2, 4, 4, kernel=3, groups=2)
    x = torch.randn(3, 8, 1, 3)  # a shape no other test uses, so the first call below builds the index
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
