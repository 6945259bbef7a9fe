"""Intensities: how raw values (8-bit photos, 12-bit microscopy, int16 CT in Hounsfield units, float MRI) become the
levels that are stored and that the loader normalises, chosen by ``DataConfig.intensity`` (``--intensity``).

Every rule resolves to one :class:`Intensity`, a clipped linear map: a raw value ``v`` becomes the level ::

    q = rint(clip((v - low) * factor, 0, levels)),    factor = levels / (high - low)

computed in float32 (``low`` and ``factor`` are float32 constants), stored as uint8 (``levels`` 255) or uint16
(65535). The loader feeds the network ``(q / levels - mean) / std``; :class:`ddcnn.inference.Classifier` computes the
same ``q`` from raw images by the same float32 operations, so a model sees at predict time what it saw in training.
The rules:

``auto`` (the default)
    ``none`` where it applies; else the window ``min..max`` of all of the dataset's values (every level of integer
    data spanning up to 65,536 values is kept).
``none``
    a fixed range, chosen by the values alone: uint8 arrays, and values within [0, 1] (bool too) or [0, 255], are
    8-bit images as ddcnn has always read them (their range 0..255, or 0..1 times 255); whole values within
    [0, 65535] or [-32768, 32767] (12- and 16-bit images, int16 CT) that 16-bit range, so every level is kept. Other
    values are an error that names the rules taking them.
``window:LO,HI``
    CT windowing: ``LO..HI`` (Hounsfield units for CT, e.g. ``window:-1000,400``) mapped to [0, 1], values outside it
    clipped to its ends.
``percentile:P1,P99``
    the window from the ``P1``-th to the ``P99``-th percentile of the train split's values (the dataset's own train
    split, before val and test are carved from it; every value, or an evenly strided sample of 2^24 of them):
    percentile scaling for data without absolute units (MRI, microscopy), robust to a few extreme voxels.

Bits. 8 where they keep every level: whole values whose window spans at most 255 of them, or values that all fall on
the window's 8-bit grid (floats that were uint8 / 255); 16 otherwise. Datasets of uint8 images resolve to
:data:`IDENTITY` (0..255 at 8 bits: the stored levels are the raw values), as before this module existed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config.sections import INTENSITY_FORMS, parse_intensity
from ..errors import DatasetError

log = logging.getLogger(__name__)

_DTYPES = {255: np.dtype(np.uint8), 65535: np.dtype(np.uint16)}
_CHUNK_VALUES = 2**22  # values scanned (and transformed) at a time
_PERCENTILE_SAMPLE = 2**24  # at most this many train values are sorted for a percentile
_GRID_TOLERANCE = 1e-3  # of a level: how far from the 8-bit grid a value may lie and still count as on it
# the ranges of --intensity none, in order: (low, high, whether the values must be whole)
_FIXED_RANGES = ((0.0, 1.0, False), (0.0, 255.0, False), (0.0, 65535.0, True), (-32768.0, 32767.0, True))


@dataclass(frozen=True)
class Intensity:
    """A resolved ``--intensity``: raw values ``low..high`` mapped to the levels ``0..levels`` (see the module
    docstring). ``rule`` is the option as given, ``source_dtype`` the raw values' dtype (for summaries)."""

    rule: str
    low: float
    high: float
    levels: int  # 255: stored as uint8; 65535: as uint16
    source_dtype: str = "uint8"

    def __post_init__(self) -> None:
        if self.levels not in _DTYPES:
            raise ValueError(f"levels must be 255 or 65535, got {self.levels}")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"the window {self.low}..{self.high} is not a finite range with low < high")

    @property
    def dtype(self) -> np.dtype:
        """The dtype the levels are stored in."""
        return _DTYPES[self.levels]

    @property
    def is_identity(self) -> bool:
        """Whether the stored levels are the raw values themselves: uint8 images."""
        return (self.low, self.high, self.levels, self.source_dtype) == (0.0, 255.0, 255, "uint8")

    def constants(self) -> tuple[float, float]:
        """``low`` and ``factor`` as float32 numbers: the two constants the map is computed with."""
        return float(np.float32(self.low)), float(np.float32(self.levels / (self.high - self.low)))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """The levels of raw ``values`` (any numeric dtype, ``(n, ...)``), as :attr:`dtype`; a block of rows at a
        time, so the float32 copy it computes in stays small."""
        values = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if values.ndim == 0:
            return self.apply(values[None])[0]
        low, factor = (np.float32(c) for c in self.constants())
        levels = np.empty(values.shape, dtype=self.dtype)
        for start, block in _blocks(values):
            x = block.astype(np.float32)  # a copy, transformed in place
            x -= low
            x *= factor
            np.clip(x, 0, self.levels, out=x)
            np.rint(x, out=x)
            levels[start : start + len(block)] = x
        return levels

    def describe(self) -> str:
        """One line for ``ddcnn datasets``."""
        if self.is_identity:
            return f"{self.rule}: 8-bit values as they are (uint8)"
        return (
            f"{self.rule}: {self.source_dtype} values {self.low:g}..{self.high:g} -> levels 0..{self.levels} "
            f"({self.dtype}), clipped outside"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Intensity:
        return cls(str(d["rule"]), float(d["low"]), float(d["high"]), int(d["levels"]), str(d["source_dtype"]))


IDENTITY = Intensity("auto", 0.0, 255.0, 255, "uint8")


@dataclass
class _Scan:
    low: float
    high: float
    whole: bool  # every value is a whole number
    dtype: np.dtype


def resolve_intensity(
    rule: str,
    arrays: Mapping[str, np.ndarray],
    train: Sequence[str],
    source: str | Path,
    dtype: np.dtype | None = None,
) -> Intensity:
    """The :class:`Intensity` that ``rule`` (``DataConfig.intensity``) gives the raw ``arrays`` (by name, e.g.
    ``x_train``; any numeric dtype, memmaps welcome). ``train``: the names a percentile is taken from; ``source``: the
    file or folder named in errors; ``dtype``: the values' own dtype where the arrays hold them in another (float32
    staging of int16 volumes). :class:`DatasetError` for NaN/inf values and for values ``none`` has no range for."""
    name, window = parse_intensity(rule)
    scan = _scan(arrays, source, dtype)
    if window is not None and name == "window":
        low, high = window
    elif window is not None:
        low, high = _percentiles({k: arrays[k] for k in train}, window, rule, source)
    elif (fixed := _fixed_range(scan)) is not None:
        low, high = fixed
    elif name == "none":
        raise DatasetError(
            f"{source}: images have values in [{scan.low:g}, {scan.high:g}], which --intensity none has no fixed "
            f"range for; use --intensity auto (their min..max), window:LO,HI or percentile:P1,P99, or rescale them "
            "to [0, 1] or [0, 255]"
        )
    else:
        low, high = scan.low, scan.high if scan.high > scan.low else scan.low + 1
    levels = 255 if _keeps_levels_at_8_bits(arrays, scan, low, high) else 65535
    if levels == 65535 and scan.whole and min(high, scan.high) - max(low, scan.low) > 65535:
        log.warning(
            "%s: the intensity window %g..%g holds more whole values than 16 bits have levels; neighbouring values "
            "share a level (use a narrower --intensity window)",
            source,
            low,
            high,
        )
    return Intensity(rule, float(low), float(high), levels, str(scan.dtype))


def _blocks(array: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``array`` as ``(first row, block)`` of whole rows of about ``_CHUNK_VALUES`` values (views: a memmap is read
    block by block)."""
    rows = max(1, _CHUNK_VALUES // max(1, math.prod(array.shape[1:])))
    return [(start, array[start : start + rows]) for start in range(0, len(array), rows)]


def _chunks(array: np.ndarray) -> list[np.ndarray]:
    return [block for _, block in _blocks(array)]


def _scan(arrays: Mapping[str, np.ndarray], source: str | Path, dtype: np.dtype | None) -> _Scan:
    """The joint range of the values, whether all are whole numbers, and their dtype; errors for non-numbers."""
    if not all(x.dtype.kind in "biuf" for x in arrays.values()):
        dtypes = ", ".join(f"{name} {x.dtype}" for name, x in arrays.items())
        raise DatasetError(f"{source}: images of dtype {dtypes}; store numbers (uint8, uint16, int16 or floats)")
    low, high, whole = math.inf, -math.inf, True
    for name, x in arrays.items():
        for block in _chunks(x):
            if block.size == 0:
                continue
            if block.dtype.kind == "f":
                if not np.isfinite(block).all():
                    raise DatasetError(f"{source} contains NaN/inf values in {name}; clean the data")
                whole = whole and bool((block == np.rint(block)).all())
            low, high = min(low, float(block.min())), max(high, float(block.max()))
    if low > high:  # no values at all: the arrays were refused earlier, or are empty
        low = high = 0.0
    kind = np.dtype(dtype) if dtype is not None else np.result_type(*arrays.values())
    return _Scan(low, high, whole, kind)


def _fixed_range(scan: _Scan) -> tuple[float, float] | None:
    """The range ``none`` reads the values in, or None (see the module docstring)."""
    if scan.dtype == np.uint8:
        return 0.0, 255.0
    for low, high, needs_whole in _FIXED_RANGES:
        if low <= scan.low and scan.high <= high and (scan.whole or not needs_whole):
            return low, high
    return None


def _percentiles(
    arrays: Mapping[str, np.ndarray], percentiles: tuple[float, float], rule: str, source: str | Path
) -> tuple[float, float]:
    """The two percentiles of the values of ``arrays``, from every value or an evenly strided sample."""
    total = sum(x.size for x in arrays.values())
    stride = max(1, math.ceil(total / _PERCENTILE_SAMPLE))
    sample = np.concatenate([np.asarray(x).reshape(-1)[::stride].astype(np.float64) for x in arrays.values()])
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if not low < high:
        raise DatasetError(
            f"{source}: --intensity {rule} gives the window {low:g}..{high:g} (the train values are mostly {low:g}); "
            f"pass wider percentiles, window:LO,HI or auto ({INTENSITY_FORMS})"
        )
    return low, high


def _keeps_levels_at_8_bits(arrays: Mapping[str, np.ndarray], scan: _Scan, low: float, high: float) -> bool:
    """Whether 255 levels keep every value of ``low..high`` distinct: whole values spanning at most 255, or values
    that all lie on the 8-bit grid of the window."""
    if scan.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        return True
    if scan.whole and high - low <= 255:
        return True
    step = (high - low) / 255
    for x in arrays.values():
        for block in _chunks(x):
            levels = (np.clip(block.astype(np.float64), low, high) - low) / step
            if block.size and np.abs(levels - np.rint(levels)).max() > _GRID_TOLERANCE:
                return False
    return True
