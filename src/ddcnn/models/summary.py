"""Parameter counts of a global CNN and of its local CNNs for a decomposition."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import format_grid, parse_grid
from ..decomposition import Decomposition
from ..errors import InputSizeError
from .registry import create_model


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
) -> ParameterCounts:
    """Parameters of the global CNN on ``image_shape`` and of one local CNN on a subimage of ``grid``."""
    dims = len(image_shape)
    decomposition = Decomposition(tuple(grid), tuple(image_shape), overlap)

    def count(shape: tuple[int, ...]) -> int:
        model = create_model(
            backbone, in_channels=in_channels, num_classes=num_classes, spatial_dims=dims, width=width,
            input_shape=shape,
        )
        return sum(p.numel() for p in model.parameters())

    return ParameterCounts(
        backbone, count(tuple(image_shape)), count(decomposition.subimage_shape), decomposition.num_subdomains
    )


def parameter_report(
    backbones: Sequence[str], image_size: str, in_channels: int, num_classes: int, grid: str
) -> str:
    """A markdown table of :func:`count_backbone_parameters` for several backbones."""
    shape = parse_grid(image_size)  # same "AxB(xC)" syntax
    grid_t = parse_grid(grid)
    lines = [
        f"parameters for {format_grid(shape)} inputs, {in_channels} channels, {num_classes} classes, grid "
        f"{format_grid(grid_t)}",
        "",
        "| backbone | global CNN | one local CNN | all local CNNs | local / global |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in backbones:
        try:
            c = count_backbone_parameters(name, shape, in_channels, num_classes, grid_t)
        except InputSizeError as e:
            lines.append(f"| {name} | - | - | - | {e} |")
            continue
        lines.append(
            f"| {name} | {c.global_cnn:,} | {c.local_cnn:,} | {c.local_total:,} | {c.local_cnn / c.global_cnn:.3f} |"
        )
    return "\n".join(lines)
