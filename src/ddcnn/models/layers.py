"""Grouped building blocks: one module computes ``groups`` independent copies of a layer at once.

A backbone built with ``groups=N`` holds the N local CNNs of a decomposition in one module: channel tensors are
laid out group-major, ``(B, N*C, *spatial)``, so group ``g`` owns channels ``[g*C, (g+1)*C)``. Convolutions are
grouped convolutions (one kernel launch for all subdomains; on maps with fewer pixels than the kernel has taps, one
batched matmul, :class:`SmallMapConv`), batch norm keeps separate statistics per channel and hence per subdomain,
and dense layers are batched matrix products. With ``groups=1`` these are the ordinary layers
of a single CNN, and every parameter of the grouped module is the concatenation (along dim 0) of the N single
modules' parameters, which is what :func:`split_state_dict` and :func:`stack_state_dicts` rely on.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import product

import torch
import torch.nn.functional as F
from torch import nn

_BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


class SmallMapConv:
    """A convolution that, on feature maps with fewer pixels than its kernel has taps, runs as a batched matmul.

    On a 2x2 map a 3x3 'same' convolution reads 4 input pixels per output pixel but a direct convolution pays for
    all 9 taps, most of them zero padding, and (on CPU) runs a poorly vectorised kernel. Written as one dense
    ``(C*Q) -> (C_out*P)`` map per group (``Q`` input and ``P`` output pixels; each entry is the kernel tap that
    connects the two pixels, or zero), it costs ``Q/taps`` of the nominal FLOPs (4/9 on 2x2 maps) and is a single
    ``bmm`` over all groups: 2-3x faster forward and backward on CPU (benchmarks/README.md). Larger maps use the
    ordinary (grouped) convolution. Parameters, their names and shapes are exactly those of
    :class:`torch.nn.Conv2d` / :class:`torch.nn.Conv3d`.

    ``enabled`` (a class attribute, default True) switches the fast path off for all instances, e.g. to measure it.
    """

    enabled: bool = True
    weight: nn.Parameter
    bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            SmallMapConv.enabled
            and math.prod(x.shape[2:]) < math.prod(self.kernel_size)
            and self.padding_mode == "zeros"
            and all(d == 1 for d in self.dilation)
            and not isinstance(self.padding, str)
        ):
            return small_map_conv(x, self.weight, self.bias, self.stride, self.padding, self.groups)
        if self._strided_pointwise_bug and x.dim() == 4 and not x.is_contiguous():
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)

    @property
    def _strided_pointwise_bug(self) -> bool:
        """PyTorch's CPU kernel (2.13, oneDNN) computes a wrong weight gradient, and can hang or crash, for an
        ungrouped 2D 1x1 convolution with stride > 1 and 2-7 input channels on a channels-last input (e.g. the
        shortcut of resnet20 at width 0.25); such layers run in the default layout (tests/test_layers.py)."""
        return (
            self.groups == 1
            and 2 <= self.in_channels < 8
            and all(k == 1 for k in self.kernel_size)
            and any(s > 1 for s in self.stride)
        )


class SmallMapConv2d(SmallMapConv, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with the small-map fast path of :class:`SmallMapConv`."""


class SmallMapConv3d(SmallMapConv, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with the small-map fast path of :class:`SmallMapConv`."""


_SMALL_MAP_CONV = {2: SmallMapConv2d, 3: SmallMapConv3d}

# The small-map path builds its dense matrices for at most this many bytes of groups at a time: on 64 local CNNs
# (vgg9 on 8x8 grids) their 67 MB overflowed the 32 MB last-level cache, and the train step of the batched module
# was 0.83x a loop over the 64 single CNNs on one core; in chunks of 8 MB that layer ran 1.6x faster and the step
# 1.07x the loop's. Below 8 MB chunks gained nothing, so smaller layers run in one piece (benchmarks/README.md).
SMALL_MAP_CHUNK_BYTES = 8 * 2**20


@lru_cache(maxsize=256)
def _tap_table(
    in_shape: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Which kernel tap (row-major flat index) connects output pixel ``p`` to input pixel ``q``, for all ``(p, q)``
    in row-major order (``prod(kernel)`` where none does); the output shape; whether any pair is unconnected.

    Plain Python on shapes, so that ``torch.compile`` folds it into a constant.
    """
    out_shape = tuple((n + 2 * pad - k) // s + 1 for n, k, s, pad in zip(in_shape, kernel, stride, padding))
    none = math.prod(kernel)
    table = []
    for out in product(*map(range, out_shape)):
        for inp in product(*map(range, in_shape)):
            offsets = [i - o * s + pad for i, o, s, pad in zip(inp, out, stride, padding)]
            tap = 0
            for offset, k in zip(offsets, kernel):
                tap = tap * k + offset
            table.append(tap if all(0 <= t < k for t, k in zip(offsets, kernel)) else none)
    return tuple(table), out_shape, none in table


@lru_cache(maxsize=256)
def _tap_index(
    in_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """:func:`_tap_table` as a long tensor on ``device``, made once per shape and device. Made outside inference
    mode even when first asked for in it (an evaluation), as training later saves it for the backward pass."""
    with torch.inference_mode(False):
        return torch.tensor(_tap_table(in_shape, kernel, stride, padding)[0], device=device)


def small_map_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """The grouped convolution of ``x`` (``(B, G*C, *in_shape)``) as one batched matmul with a dense per-group
    matrix; equal to ``F.conv{2,3}d(x, weight, bias, stride, padding, groups=groups)``.

    Pays off when the map has fewer pixels than the kernel has taps (see :class:`SmallMapConv`). Where the dense
    matrices of all groups would take more than :data:`SMALL_MAP_CHUNK_BYTES`, they are built and multiplied for
    chunks of groups in turn (``split``, so that the backward pass concatenates the chunks' gradients once).
    """
    batch = x.shape[0]
    in_shape, kernel = tuple(x.shape[2:]), tuple(weight.shape[2:])
    stride, padding = tuple(stride), tuple(padding)
    _, out_shape, unconnected = _tap_table(in_shape, kernel, stride, padding)
    table = _tap_index(in_shape, kernel, stride, padding, x.device)
    cout, cin, taps = weight.shape[0] // groups, weight.shape[1], math.prod(kernel)
    p, q = math.prod(out_shape), math.prod(in_shape)
    chunk = max(1, SMALL_MAP_CHUNK_BYTES // (p * q * cout * cin * weight.element_size()))
    # (B, G*C, *in_shape) -> (B, Q, G, C): pixel-major, channel-minor within each group
    pixels = x.movedim(1, -1).reshape(batch, q, groups, cin)
    outs = []
    for w, xs in zip(weight.reshape(groups, cout, cin, taps).split(chunk), pixels.split(chunk, dim=2)):
        g = w.shape[0]
        # dense[g, (p, o), (q, c)] = weight[g, o, c, tap(p, q)]: gather whole (C_out, C) blocks per (p, q) pair
        blocks = w.permute(0, 3, 1, 2)  # (g, taps, C_out, C)
        blocks = torch.cat([blocks, blocks.new_zeros(g, 1, cout, cin)], 1) if unconnected else blocks.contiguous()
        dense = blocks.index_select(1, table).view(g, p, q, cout, cin)
        dense = dense.permute(0, 1, 3, 2, 4).reshape(g, p * cout, q * cin)
        xg = xs.permute(2, 0, 1, 3).reshape(g, batch, q * cin)  # (g, B, Q*C)
        outs.append(torch.bmm(xg, dense.transpose(1, 2)).view(g, batch, p, cout))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if bias is not None:
        out = out + bias.view(groups, 1, 1, cout)
    # (G, B, P, C_out) -> (B, G*C_out, *out_shape), channels-last unless the input was contiguous
    out = out.permute(1, 2, 0, 3).reshape(batch, *out_shape, groups * cout).movedim(-1, 1)
    return out.contiguous() if x.is_contiguous() else out


def conv(dims: int, cin: int, cout: int, kernel: int, groups: int, stride: int = 1, bias: bool = False) -> nn.Module:
    """``groups`` independent ``cin -> cout`` convolutions with 'same'-style padding."""
    return _SMALL_MAP_CONV[dims](
        groups * cin, groups * cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias
    )


def batchnorm(dims: int, channels: int, groups: int) -> nn.Module:
    return _BATCHNORM[dims](groups * channels)


def maxpool(dims: int, kernel: int = 2, stride: int | None = None, padding: int = 0) -> nn.Module:
    return _MAXPOOL[dims](kernel, stride=stride, padding=padding)


class _AdaptiveAvgPool:
    """Adaptive average pooling that passes the input through when it already has the output size."""

    output_size: int | tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        size = self.output_size
        target = (size,) * len(spatial) if isinstance(size, int) else tuple(size)
        if all(t is None or t == s for t, s in zip(target, spatial)):
            return x
        return super().forward(x)


class AdaptiveAvgPool2d(_AdaptiveAvgPool, nn.AdaptiveAvgPool2d):
    """:class:`torch.nn.AdaptiveAvgPool2d`, free when the input already has the output size."""


class AdaptiveAvgPool3d(_AdaptiveAvgPool, nn.AdaptiveAvgPool3d):
    """:class:`torch.nn.AdaptiveAvgPool3d`, free when the input already has the output size."""


_ADAPTIVE_AVGPOOL = {2: AdaptiveAvgPool2d, 3: AdaptiveAvgPool3d}


def adaptive_avgpool(dims: int, size: int | tuple[int, ...]) -> nn.Module:
    return _ADAPTIVE_AVGPOOL[dims](size)


class GroupedLinear(nn.Module):
    """``groups`` independent dense layers: ``(B, G, in) -> (B, G, out)``; weight ``(G, out, in)``."""

    def __init__(self, in_features: int, out_features: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's bias bound; the weight's kaiming bound reads the (groups, out, in) tensor's fan-in as out * in,
        # so it is sqrt(out) times narrower than nn.Linear's 1/sqrt(in): kept, because every published number of
        # ddcnn was trained with it (changing it is a deliberate, versioned change)
        bound = 1 / math.sqrt(self.in_features)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight[0], None if self.bias is None else self.bias[0])
        out = torch.einsum("bgi,goi->bgo", x, self.weight)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


def grouped_flatten(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, G*C, *spatial)`` -> ``(B, G, C*prod(spatial))``: each group's features in a single model's order."""
    return x.reshape(x.shape[0], groups, -1)


def split_state_dict(state: dict[str, torch.Tensor], groups: int, index: int) -> dict[str, torch.Tensor]:
    """The state dict of group ``index`` of a grouped module, as a ``groups=1`` module expects it."""
    return {k: (v.chunk(groups)[index].clone() if v.dim() > 0 else v.clone()) for k, v in state.items()}


def stack_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_state_dict`: N ``groups=1`` state dicts -> one ``groups=N`` state dict."""
    return {k: (torch.cat([s[k] for s in states]) if v.dim() > 0 else v.clone()) for k, v in states[0].items()}


def grouped_cat(tensors: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate group-major tensors ``(B, G*C_i, *spatial)`` along the channels of each group:
    ``(B, G*sum(C_i), *spatial)``, group ``g`` holding its own channels of every tensor in order (DenseNet's
    concatenation, for each local CNN). Keeps the channels-last layout of channels-last inputs."""
    if groups == 1:
        return torch.cat(tensors, 1)
    if tensors[0].is_contiguous():
        return torch.cat([t.unflatten(1, (groups, -1)) for t in tensors], 2).flatten(1, 2)
    # channels-last: the channels are the innermost axis, so concatenate there without leaving the layout
    return torch.cat([t.movedim(1, -1).unflatten(-1, (groups, -1)) for t in tensors], -1).flatten(-2).movedim(-1, 1)


class HalvingAvgPool(nn.Module):
    """2x2(x2) average pooling with stride 2 that halves every axis, rounding up: an odd axis keeps its last
    pixel (averaged alone), a 1-pixel axis stays 1 pixel. On even sizes this is ``nn.AvgPool{2,3}d(2, 2)``."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(min(2, s) for s in x.shape[2:])
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        return pool(x, kernel, stride=2, ceil_mode=True)


def halving_avgpool(dims: int) -> nn.Module:
    return HalvingAvgPool(dims)
