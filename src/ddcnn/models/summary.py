"""Parameter counts of a global CNN and of its local CNNs for a decomposition, of registered backbones and of
factories (``package.module:function``) alike; and the cost of a coarse level (:mod:`ddcnn.decomposition`) in
parameters and forward FLOPs per image (:func:`forward_flops`, :func:`local_cnns_cost`).

FLOPs are counted as ``benchmarks/bench_flops.py`` counts them, by ``torch.utils.flop_counter.FlopCounterMode`` on a
forward pass (2 per multiply-add of the convolutions and matrix products, what the code executes; elementwise
operations, pooling included, count nothing). The coarse CNN is one more copy of the local CNN on an input of the
same shape, so it costs exactly one local CNN's parameters and FLOPs, and its subimage's area averaging (about one
addition per input pixel) is left out as the counter leaves pooling out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import format_grid, parse_grid
from ..decomposition import Decomposition
from ..errors import InputSizeError
from .factory import build_factory_module, check_backbone, is_factory_name, resolve_factory
from .local_cnns import LocalCNNs
from .registry import create_model, list_models


@dataclass
class ParameterCounts:
    backbone: str
    global_cnn: int
    local_cnn: int  # one local CNN (and the coarse CNN, where there is one: the same network)
    num_subdomains: int  # the grid's, and the coarse one
    coarse: bool = False
    local_cnn_flops: int | None = None  # forward FLOPs per image of one local CNN, where counted
    global_cnn_flops: int | None = None

    @property
    def local_total(self) -> int:
        return self.local_cnn * self.num_subdomains


def count_backbone_parameters(
    backbone: str,
    image_shape: Sequence[int],
    in_channels: int,
    num_classes: int,
    grid: Sequence[int],
    overlap: int = 0,
    width: float = 1.0,
    local_width: float | None = None,
    coarse: bool = False,
    flops: bool = False,
) -> ParameterCounts:
    """Parameters of the global CNN on ``image_shape`` (at ``width``) and of one local CNN on a subimage of ``grid``
    (at ``local_width``, default ``width``), with a ``coarse`` level one more; with ``flops``, also the forward
    FLOPs per image of each (:func:`forward_flops`)."""
    dims = len(image_shape)
    decomposition = Decomposition(tuple(grid), tuple(image_shape), overlap, coarse)

    def build(shape: tuple[int, ...], w: float) -> nn.Module:
        if is_factory_name(backbone):
            model = build_factory_module(
                backbone, resolve_factory(backbone), in_channels=in_channels, num_classes=num_classes,
                image_shape=shape, width=w,
            )
        else:
            model = create_model(
                backbone, in_channels=in_channels, num_classes=num_classes, spatial_dims=dims, width=w,
                input_shape=shape,
            )
        return model

    local = width if local_width is None else local_width
    global_cnn, local_cnn = build(tuple(image_shape), width), build(decomposition.subimage_shape, local)
    return ParameterCounts(
        backbone, _parameters(global_cnn), _parameters(local_cnn), decomposition.num_subdomains, coarse,
        forward_flops(local_cnn, (in_channels, *decomposition.subimage_shape)) if flops else None,
        forward_flops(global_cnn, (in_channels, *image_shape)) if flops else None,
    )


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """The FLOPs of ``model``'s forward pass on one input of ``input_shape`` (channels first, no batch axis), on the
    model's device and dtype, by ``FlopCounterMode``; the model's mode and the random state are left as they were."""
    first = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=first.device, dtype=first.dtype)
    training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(x)
    finally:
        model.train(training)
    return int(counter.get_total_flops())


def local_cnns_cost(local_cnns: LocalCNNs) -> dict[str, Any]:
    """What the local CNNs cost per image, for a result row: ``flops_per_image`` (forward, all local CNNs, the coarse
    one included) and ``local_cnn_flops`` (one of them); with a coarse level also ``coarse_parameters`` and
    ``coarse_flops`` (one local CNN's, the same network on an input of the same shape) and
    ``flops_per_image_without_coarse``. Counted on one local CNN (:meth:`LocalCNNs.local_cnn`), so that a process's
    share gives the whole model's numbers."""
    d = local_cnns.decomposition
    one = local_cnns.local_cnn(0)
    flops = forward_flops(one, (local_cnns.in_channels, *d.subimage_shape))
    cost: dict[str, Any] = {"flops_per_image": flops * d.num_subdomains, "local_cnn_flops": flops}
    if d.coarse:
        cost |= {"coarse_parameters": _parameters(one), "coarse_flops": flops,
                 "flops_per_image_without_coarse": flops * d.num_grid_subdomains}
    return cost


def parameter_report(
    backbones: Sequence[str], image_size: str, in_channels: int, num_classes: int, grid: str, width: float = 1.0,
    local_width: float | None = None, coarse: bool = False,
) -> str:
    """A markdown table of :func:`count_backbone_parameters` for several backbones (each name, or comma-separated
    names; none: every registered one), each checked first (:func:`~ddcnn.models.factory.check_backbone`); with
    ``coarse``, a table of the coarse level's cost in parameters and forward FLOPs per image after it."""
    backbones = [name.strip() for given in backbones for name in given.split(",") if name.strip()] or list_models()
    for name in backbones:
        check_backbone(name, (width, local_width))
    shape = parse_grid(image_size)  # same "AxB(xC)" syntax
    grid_t = parse_grid(grid)
    widths = f"width {width:g}" + ("" if local_width is None else f", local CNNs at width {local_width:g}")
    with_coarse = " and the coarse CNN" if coarse else ""
    lines = [
        (
            f"parameters for {format_grid(shape)} inputs, {in_channels} channels, {num_classes} classes, grid "
            f"{format_grid(grid_t)}{' with a coarse level' if coarse else ''}, {widths}"
        ),
        "",
        f"| backbone | global CNN | one local CNN | all local CNNs{with_coarse} | local / global |",
        "|---|---:|---:|---:|---:|",
    ]
    costs = []
    for name in backbones:
        try:
            c = count_backbone_parameters(name, shape, in_channels, num_classes, grid_t, width=width,
                                          local_width=local_width, coarse=coarse, flops=coarse)
        except InputSizeError as e:
            lines.append(f"| {name} | - | - | - | {e} |")
            continue
        costs.append(c)
        lines.append(
            f"| {name} | {c.global_cnn:,} | {c.local_cnn:,} | {c.local_total:,} | {c.local_cnn / c.global_cnn:.3f} |"
        )
    return "\n".join(lines + (_coarse_table(costs) if coarse else []))


def _coarse_table(costs: Sequence[ParameterCounts]) -> list[str]:
    """The coarse level's cost: its parameters (one local CNN's) and forward MFLOPs per image, of the local CNNs
    without and with it and of the global CNN."""
    lines = [
        "",
        (
            "coarse level: the whole image averaged down to the subimage shape, read by one more local CNN; forward "
            "MFLOPs per image (FlopCounterMode)"
        ),
        "",
        "| backbone | coarse CNN parameters | coarse CNN MFLOPs | local CNNs MFLOPs | with it | global CNN MFLOPs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in costs:
        assert c.local_cnn_flops is not None and c.global_cnn_flops is not None
        grid_flops = c.local_cnn_flops * (c.num_subdomains - 1)
        lines.append(
            f"| {c.backbone} | {c.local_cnn:,} | {c.local_cnn_flops / 1e6:,.1f} | {grid_flops / 1e6:,.1f} | "
            f"{(grid_flops + c.local_cnn_flops) / 1e6:,.1f} | {c.global_cnn_flops / 1e6:,.1f} |"
        )
    return lines
