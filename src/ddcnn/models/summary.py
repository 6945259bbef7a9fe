"""Parameter counts of a global CNN and of its local CNNs for a decomposition, of registered backbones and of
factories (``package.module:function``) alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import format_grid, parse_grid
from ..decomposition import Decomposition
from ..errors import InputSizeError
from .factory import build_factory_module, check_backbone, is_factory_name, resolve_factory
from .registry import create_model, list_models


@dataclass
class ParameterCounts:
    backbone: str
    global_cnn: int
    local_cnn: int  # one local CNN
    num_subdomains: int

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
) -> ParameterCounts:
    """Parameters of the global CNN on ``image_shape`` (at ``width``) and of one local CNN on a subimage of ``grid``
    (at ``local_width``, default ``width``)."""
    dims = len(image_shape)
    decomposition = Decomposition(tuple(grid), tuple(image_shape), overlap)

    def count(shape: tuple[int, ...], w: float) -> int:
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
        return sum(p.numel() for p in model.parameters())

    local = width if local_width is None else local_width
    return ParameterCounts(
        backbone, count(tuple(image_shape), width), count(decomposition.subimage_shape, local),
        decomposition.num_subdomains,
    )


def parameter_report(
    backbones: Sequence[str], image_size: str, in_channels: int, num_classes: int, grid: str, width: float = 1.0,
    local_width: float | None = None,
) -> str:
    """A markdown table of :func:`count_backbone_parameters` for several backbones (none: every registered one),
    each checked first (:func:`~ddcnn.models.factory.check_backbone`)."""
    backbones = [name.strip() for name in backbones if name.strip()] or list_models()
    for name in backbones:
        check_backbone(name, (width, local_width))
    shape = parse_grid(image_size)  # same "AxB(xC)" syntax
    grid_t = parse_grid(grid)
    widths = f"width {width:g}" + ("" if local_width is None else f", local CNNs at width {local_width:g}")
    lines = [
        (
            f"parameters for {format_grid(shape)} inputs, {in_channels} channels, {num_classes} classes, grid "
            f"{format_grid(grid_t)}, {widths}"
        ),
        "",
        "| backbone | global CNN | one local CNN | all local CNNs | local / global |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in backbones:
        try:
            c = count_backbone_parameters(name, shape, in_channels, num_classes, grid_t, width=width,
                                          local_width=local_width)
        except InputSizeError as e:
            lines.append(f"| {name} | - | - | - | {e} |")
            continue
        lines.append(
            f"| {name} | {c.global_cnn:,} | {c.local_cnn:,} | {c.local_total:,} | {c.local_cnn / c.global_cnn:.3f} |"
        )
    return "\n".join(lines)
