"""``ddcnn predict``: classify image files with a trained checkpoint.

Files are read the way the model's training data was: image files are decoded as ``imagefolder`` decodes them
(mode converted to gray or RGB after the checkpoint's ``in_channels``, alpha composited on black, resized bilinearly
to the checkpoint's ``image_shape``); ``.npy`` files (volumes, or images) are scaled to uint8 as ``npz`` datasets
are and must have the image shape already. Both are then normalised with the training split's mean and std from the
checkpoint's spec (:class:`~ddcnn.models.spec.ModelSpec`), by the same loader as in training. For models with
several local CNNs (a CNN-DNN, or local CNNs alone) each subdomain's own vote (its local CNN's most probable class)
is reported beside the prediction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import DataConfig
from .data import ImageSet, make_loader
from .data.imagefolder import decode_image
from .data.npz import pixels_to_uint8
from .errors import CheckpointError, DatasetError
from .models.cnn_dnn import CNNDNN
from .models.spec import model_from_checkpoint, spec_of
from .runtime import resolve_device

# what predict needs of a checkpoint's spec beyond the model: how to name the classes and normalise new images
_PREPROCESSING = ("class_names", "mean", "std")


@dataclass
class Vote:
    """A class and its probability, by the whole model or by one local CNN."""

    class_index: int
    class_name: str
    probability: float


@dataclass
class Prediction:
    path: str
    prediction: Vote
    subdomain_votes: list[Vote] = field(default_factory=list)  # in subdomain order; empty for a global CNN
    subdomain_positions: list[tuple[int, ...]] = field(default_factory=list)  # grid position of each subdomain


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if a file; in a run folder, the checkpoint of the method its ``results.json`` names, or its
    only ``.pt`` file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file or a run folder holding one")
    method = _results_method(path / "results.json")
    if method is not None and (candidate := path / f"{method}.pt").is_file():
        return candidate
    checkpoints = sorted(p.name for p in path.glob("*.pt"))
    if len(checkpoints) == 1:
        return path / checkpoints[0]
    if not checkpoints:
        raise CheckpointError(f"{path} holds no checkpoint (.pt); pass a run folder of ddcnn train or a .pt file")
    raise CheckpointError(f"{path} holds several checkpoints ({', '.join(checkpoints)}); pass one of them")


def _results_method(results: Path) -> str | None:
    """The one method a run folder's ``results.json`` names; None if it names several, or is missing or unreadable
    (it only helps choose among the folder's checkpoints)."""
    try:
        methods = {row["method"] for row in json.loads(results.read_text()).get("rows", [])}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return methods.pop() if len(methods) == 1 else None


def read_image(path: str | Path, in_channels: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """One file as uint8 ``(C, *image_shape)``, converted as the training data was (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; pass the image files in it (.png, .jpg, ...) or .npy arrays")
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; pass image files (.png, .jpg, ...) or .npy arrays")
    if path.suffix.lower() == ".npy":
        return _read_array(path, in_channels, image_shape)
    if len(image_shape) != 2:
        raise DatasetError(f"{path} is an image file, but the model takes {len(image_shape)}D volumes; pass .npy files")
    return decode_image(path, size=(image_shape[1], image_shape[0]), channels=in_channels)


def _read_array(path: Path, in_channels: int, image_shape: tuple[int, ...]) -> np.ndarray:
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
    return pixels_to_uint8({"image": array}, path)["image"]


def predict(checkpoint: str | Path, images: list[str | Path], device: str = "auto") -> list[Prediction]:
    """The class (and probability) of each image by the model of ``checkpoint``, and each subdomain's vote."""
    if not images:
        raise DatasetError("no images given; pass image files (.png, .jpg, ...) or .npy arrays")
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    spec = spec_of(state, path)
    missing = [name for name in _PREPROCESSING if getattr(spec, name) is None]
    if missing:
        raise CheckpointError(
            f"{path} (its spec) lacks {', '.join(map(repr, missing))}, which predict needs to read new images as the "
            "training data was; pass a checkpoint written by ddcnn train"
        )
    class_names, image_shape = spec.class_names, spec.image_shape
    pixels = np.stack([read_image(p, spec.in_channels, image_shape) for p in images])
    torch_device = resolve_device(device)
    model = model_from_checkpoint(state, path).to(torch_device)
    loader = make_loader(
        ImageSet(torch.from_numpy(pixels), torch.zeros(len(pixels), dtype=torch.int64)),
        batch_size=64, train=False, cfg=DataConfig(), mean=spec.mean, std=spec.std, device=torch_device,
    )
    scores, local = [], []
    with torch.inference_mode():
        for x, _ in loader:
            if isinstance(model, CNNDNN):
                s, p = model.forward_with_local(x)
                scores.append(s.float().softmax(-1))
            else:  # local CNNs, a global CNN included: their mean probability, as in training reports
                p = model(x).float().softmax(-1)
                scores.append(p.mean(1))
            local.append(p)
    probabilities, local_probabilities = torch.cat(scores).cpu(), torch.cat(local).cpu()
    positions = spec.decomposition().subdomain_coordinates()

    def vote(p: torch.Tensor) -> Vote:
        k = int(p.argmax())
        return Vote(k, class_names[k], float(p[k]))

    return [
        Prediction(
            str(image),
            vote(probabilities[i]),
            [vote(p) for p in local_probabilities[i]] if len(positions) > 1 else [],
            positions if len(positions) > 1 else [],
        )
        for i, image in enumerate(images)
    ]


def format_predictions(predictions: list[Prediction]) -> str:
    """One line per image, then one indented line per subdomain vote."""
    lines = []
    for p in predictions:
        lines.append(f"{p.path}: {p.prediction.class_name} (probability {p.prediction.probability:.3f})")
        for i, (v, position) in enumerate(zip(p.subdomain_votes, p.subdomain_positions)):
            where = ", ".join(str(c) for c in position)
            lines.append(f"  subdomain {i} at ({where}): {v.class_name} (probability {v.probability:.3f})")
    return "\n".join(lines)
