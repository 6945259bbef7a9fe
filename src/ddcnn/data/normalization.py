"""The per-channel mean and std that inputs are normalised with (``--normalize``): the training split's, or ImageNet's.

Training (the loader) and the trained model (its :class:`~ddcnn.models.spec.ModelSpec`, which ``ddcnn.load``,
predict and export read) both take them from :func:`normalization`, so that a model sees new images as it saw its
training images. ImageNet's statistics are what pretrained weights (``--init-weights``) were trained with; for
1-channel images they are the mean of the three means and of the three stds, the gray counterpart of the first
convolution summed over R, G and B (:mod:`ddcnn.models.pretrained`).
"""

from __future__ import annotations

from ..errors import ConfigError
from .dataset import DatasetSplits

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # in [0, 1] units, as torchvision's and timm's ImageNet models expect
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std for RGB images, or for gray ones (the mean of the three); a one-line ConfigError for
    any other number of channels."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ConfigError(
        f"--normalize imagenet needs RGB or gray images, but these have {channels} channels; use --normalize data"
    )


def normalization(splits: DatasetSplits, how: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std (per channel, in [0, 1] units) of ``--normalize how``: ``data`` (the training split's
    statistics) or ``imagenet``."""
    if how == "data":
        return tuple(splits.mean), tuple(splits.std)
    if how == "imagenet":
        return imagenet_statistics(splits.in_channels)
    raise ConfigError(f"--normalize {how!r} is not one of data, imagenet")
