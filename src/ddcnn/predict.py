"""``ddcnn predict``: classify image files with a trained checkpoint.

Files are read the way the model's training data was: image files are decoded as ``imagefolder`` decodes them
(mode converted to gray or RGB after the checkpoint's ``in_channels``, alpha composited on black, resized bilinearly
to the checkpoint's ``image_shape``); ``.npy`` files (volumes, or images) are scaled to uint8 as ``npz`` datasets
are and must have the image shape already. The model is :func:`ddcnn.load`'s :class:`~ddcnn.inference.Classifier`,
which normalises them with the mean and std the model was trained with (``--normalize``) as the training loader
does. Arguments may be files, folders (their image and ``.npy`` files, sorted by name) and glob patterns; the files
are read, classified and reported ``batch_size`` at a time, never all held at once. For models with several local CNNs (a CNN-DNN, or local
CNNs alone) each subdomain's own vote (its local CNN's most probable class) is reported beside the prediction.

A model whose spec records an intensity transform (:mod:`ddcnn.data.intensity`) is given the files' raw values
instead, which it maps to its levels itself: ``.npy`` arrays as they are, 16-bit images kept (as its dataset read
them), and NIfTI volumes (``.nii``, ``.nii.gz``) read as ``nifti`` datasets read them (oriented to RAS and resampled
to the model's image shape).
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.decode import image_values
from .data.imagefolder import IMAGE_EXTENSIONS, decode_image
from .data.intensity import Intensity
from .data.nifti import is_nifti, read_volume
from .data.npz import pixels_to_uint8
from .errors import DatasetError
from .inference import Classifier, load, resolve_checkpoint  # noqa: F401  (resolve_checkpoint: public here too)

_GLOB_CHARACTERS = frozenset("*?[")
_SUFFIXES = IMAGE_EXTENSIONS | {".npy"}


@dataclass
class Vote:
    """A class and its probability, by the whole model or by one local CNN."""

    class_index: int
    class_name: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.class_name, "class_index": self.class_index, "probability": self.probability}


@dataclass
class Prediction:
    path: str
    prediction: Vote
    subdomain_votes: list[Vote] = field(default_factory=list)  # in subdomain order; empty for a global CNN
    # grid position of each subdomain; None for the coarse level (the whole image downsampled), which has none
    subdomain_positions: list[tuple[int, ...] | None] = field(default_factory=list)
    top: list[Vote] = field(default_factory=list)  # the most probable classes, most probable first

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``ddcnn predict --json`` prints for the image."""
        return {
            "file": self.path,
            **self.prediction.to_dict(),
            "top_k": [v.to_dict() for v in self.top],
            "subdomains": [
                {
                    "subdomain": "coarse" if position is None else i,
                    "position": None if position is None else list(position),
                    **v.to_dict(),
                }
                for i, (v, position) in enumerate(zip(self.subdomain_votes, self.subdomain_positions))
            ],
        }


def expand_images(arguments: Iterable[str | Path]) -> list[Path]:
    """The files ``arguments`` name, in order: a file as itself, a folder as its image and ``.npy`` files (sorted,
    not recursing), a glob pattern (``*``, ``?``, ``[``) as the files it matches (sorted). A path that does not
    exist is kept, for :func:`read_image` to say so."""
    files: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix.lower() in _SUFFIXES or is_nifti(p)))
            if not inside:
                raise DatasetError(f"{path} is a folder with no image files in it (.png, .jpg, ..., .npy)")
            files.extend(inside)
        elif not path.exists() and _GLOB_CHARACTERS & set(str(argument)):
            matches = sorted(Path(p) for p in glob.glob(str(argument)) if Path(p).is_file())
            if not matches:
                raise DatasetError(f"{argument} matches no files; pass image files (.png, .jpg, ...) or .npy arrays")
            files.extend(matches)
        else:
            files.append(path)
    return files


def read_image(
    path: str | Path, in_channels: int, image_shape: tuple[int, ...], intensity: Intensity | None = None
) -> np.ndarray:
    """One file as uint8 ``(C, *image_shape)``, converted as the training data was (see the module docstring); for a
    model with an ``intensity`` transform, its raw values."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; pass the image files in it (.png, .jpg, ...) or .npy arrays")
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; pass image files (.png, .jpg, ...) or .npy arrays")
    if path.suffix.lower() == ".npy":
        return _read_array(path, in_channels, image_shape, intensity)
    if is_nifti(path):
        volume = read_volume(path, image_shape)[0] if len(image_shape) == 3 else None
        if volume is None or volume.shape[0] != in_channels:
            want = f"{in_channels}-channel {len(image_shape)}D inputs"
            raise DatasetError(f"{path} is a NIfTI volume, but the model takes {want}; pass files of its kind")
        return volume if intensity is not None else pixels_to_uint8({"volume": volume}, path)["volume"]
    if len(image_shape) != 2:
        raise DatasetError(f"{path} is an image file, but the model takes {len(image_shape)}D volumes; pass .npy files")
    size = (image_shape[1], image_shape[0])
    if intensity is not None:
        return image_values(path, size, in_channels, intensity)
    return decode_image(path, size=size, channels=in_channels)


def _read_array(path: Path, in_channels: int, image_shape: tuple[int, ...], intensity: Intensity | None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path} is not a readable .npy array without pickled objects ({e})") from None
    shape = tuple(image_shape)
    if array.shape == shape:
        array = array[None]
    elif array.shape == (*shape, in_channels) and in_channels != shape[0]:
        array = np.moveaxis(array, -1, 0)
    if array.shape != (in_channels, *shape):
        raise DatasetError(
            f"{path} has shape {array.shape}; the model takes {'x'.join(map(str, shape))} inputs with {in_channels} "
            f"channel(s): store {shape} or {(in_channels, *shape)}"
        )
    return array if intensity is not None else pixels_to_uint8({"image": array}, path)["image"]


def iter_predictions(
    checkpoint: str | Path | Classifier,
    images: Iterable[str | Path],
    device: str = "auto",
    batch_size: int = 64,
    top_k: int = 3,
) -> Iterator[Prediction]:
    """The class (and probability) of each image by the model of ``checkpoint`` (a run folder, a ``.pt`` file or a
    loaded :class:`~ddcnn.inference.Classifier`), its ``top_k`` classes and each subdomain's vote; ``images`` as
    :func:`expand_images` takes them, read and classified ``batch_size`` at a time."""
    if batch_size < 1:
        raise DatasetError(f"batch size must be positive, got {batch_size}")
    if top_k < 1:
        raise DatasetError(f"top-k must be positive, got {top_k}")
    files = expand_images(images)
    if not files:
        raise DatasetError("no images given; pass image files (.png, .jpg, ...) or .npy arrays")
    model = checkpoint if isinstance(checkpoint, Classifier) else load(checkpoint, device=device)
    spec, names = model.spec, model.class_names
    torch_device = next(model.buffers()).device
    decomposition = spec.decomposition()
    coarse: list[tuple[int, ...] | None] = [None] if decomposition.coarse else []  # the coarse level votes last
    positions = [*decomposition.subdomain_coordinates(), *coarse] if model.num_subdomains > 1 else []
    k = min(top_k, spec.num_classes)

    def vote(p: torch.Tensor, index: int | None = None) -> Vote:
        i = int(p.argmax()) if index is None else index
        return Vote(i, names[i], float(p[i]))

    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        pixels = np.stack([read_image(p, spec.in_channels, spec.image_shape, model.intensity) for p in batch])
        with torch.inference_mode():
            probabilities, local = model.forward_with_subdomains(torch.from_numpy(pixels).to(torch_device))
        probabilities, local = probabilities.cpu(), local.cpu()
        top = probabilities.topk(k, dim=-1).indices
        for i, path in enumerate(batch):
            yield Prediction(
                str(path),
                vote(probabilities[i]),
                [vote(p) for p in local[i]] if positions else [],
                list(positions),
                [vote(probabilities[i], int(j)) for j in top[i]],
            )


def predict(
    checkpoint: str | Path | Classifier,
    images: Iterable[str | Path],
    device: str = "auto",
    batch_size: int = 64,
    top_k: int = 3,
) -> list[Prediction]:
    """:func:`iter_predictions` as a list."""
    return list(iter_predictions(checkpoint, images, device, batch_size, top_k))


def format_prediction(p: Prediction) -> str:
    """One line for the image, then one indented line per subdomain vote."""
    lines = [f"{p.path}: {p.prediction.class_name} (probability {p.prediction.probability:.3f})"]
    for i, (v, position) in enumerate(zip(p.subdomain_votes, p.subdomain_positions)):
        where = f"subdomain {i} at ({', '.join(map(str, position))})" if position else "coarse level (the whole image)"
        lines.append(f"  {where}: {v.class_name} (probability {v.probability:.3f})")
    return "\n".join(lines)


def format_predictions(predictions: Iterable[Prediction]) -> str:
    """:func:`format_prediction` of each, one after the other."""
    return "\n".join(format_prediction(p) for p in predictions)
