"""Inference from Python: ``ddcnn.load(path)``, a trained model that takes raw images and returns probabilities.

::

    model = ddcnn.load("runs/demo/2x2/seed0")   # a run folder, or a .pt checkpoint
    probs = model(images)                       # uint8 (B, C, H, W) or (B, C, D, H, W), 0..255 -> (B, K)
    model.class_names

The :class:`Classifier` normalises inside, as the training loader does (``(x / 255 - mean) / std`` with the
per-channel mean and std the model was trained with, from the checkpoint's :class:`~ddcnn.models.spec.ModelSpec`: the
training split's, or ImageNet's with ``--normalize imagenet``), so it is also what
``ddcnn export`` puts into an ONNX or TorchScript graph. Float input in the same 0..255 range gives the same
probabilities as uint8 input. A model whose spec records an intensity transform (16-bit images, int16 CT, a window
or percentile scaling, floats: :mod:`ddcnn.data.intensity`) takes raw images in the data's own range instead (e.g.
int16 Hounsfield units) and maps them to the stored levels first, by the float32 operations the dataset was stored
with, so it sees what training saw. The probabilities are those ddcnn reports: the softmax of a CNN-DNN's class
scores, or, for local CNNs alone (the global CNN is one local CNN on a ``1x1`` grid), the mean of their
probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .data.intensity import Intensity
from .errors import CheckpointError
from .models.cnn_dnn import CNNDNN
from .models.spec import ModelSpec, model_from_checkpoint, spec_of
from .runtime import resolve_device

# what inference needs of a checkpoint's spec beyond the model: how to name the classes and normalise new images
PREPROCESSING = ("class_names", "mean", "std")


class Classifier(nn.Module):
    """Raw images ``(B, C, *image_shape)`` in 0..255 (uint8, or float) -> class probabilities ``(B, K)``, float32.

    ``model`` is what :func:`~ddcnn.models.spec.model_from_checkpoint` rebuilds (:class:`~ddcnn.models.LocalCNNs`
    or a CNN-DNN) and ``spec`` its checkpoint's spec, which must record ``class_names``, ``mean`` and ``std``.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        missing = [name for name in PREPROCESSING if getattr(spec, name) is None]
        if missing:
            raise CheckpointError(
                f"the spec lacks {', '.join(map(repr, missing))}, which inference needs to read new images as the "
                "training data was; pass a checkpoint written by ddcnn train"
            )
        self.model, self.spec = model, spec
        self.class_names: list[str] = list(spec.class_names)
        view = (1, spec.in_channels) + (1,) * len(spec.image_shape)
        std = torch.tensor(spec.std, dtype=torch.float32)
        intensity = _intensity(spec)
        self.intensity = None if intensity.is_identity else intensity  # None: the pixels are the stored levels
        self.levels = float(intensity.levels)
        low, factor = intensity.constants()
        self.register_buffer("low", torch.tensor(low, dtype=torch.float32), persistent=False)
        self.register_buffer("factor", torch.tensor(factor, dtype=torch.float32), persistent=False)
        # the same two float32 constants as the training loader (data/loader.py), so the inputs match to the bit
        self.register_buffer("scale", (1.0 / (self.levels * std)).view(view), persistent=False)
        self.register_buffer("shift", (torch.tensor(spec.mean, dtype=torch.float32) / std).view(view), persistent=False)

    @property
    def num_subdomains(self) -> int:
        return self.spec.decomposition().num_subdomains

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` as float32 (the raw values mapped to the stored levels first, where the spec
        records an intensity transform), checking the shape (outside tracing and export)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check(images)
        x = images.float()
        if self.intensity is not None:  # as Intensity.apply: subtract, scale, clip, round, in float32
            x = ((x - self.low) * self.factor).clamp(0, self.levels).round()
        return x * self.scale - self.shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_subdomains(images)[0]

    def subdomain_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Each local CNN's class probabilities ``(B, N, K)``, in subdomain order (``N`` is 1 for a global CNN)."""
        return self.forward_with_subdomains(images)[1]

    def forward_with_subdomains(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The probabilities ``(B, K)`` and each local CNN's ``(B, N, K)``, in one pass."""
        x = self.normalise(images)
        if isinstance(self.model, CNNDNN):
            scores, local = self.model.forward_with_local(x)
            return scores.float().softmax(-1), local.float()
        local = self.model(x).float().softmax(-1)  # local CNNs (a global CNN too): their mean, as ddcnn reports
        return local.mean(1), local

    def _check(self, images: torch.Tensor) -> None:
        want = (self.spec.in_channels, *self.spec.image_shape)
        if images.dim() != len(want) + 1 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images of shape {tuple(images.shape)}; the model takes (B, {', '.join(map(str, want))}) in 0..255"
            )
        if images.is_floating_point() or images.dtype == torch.uint8:
            return
        if self.intensity is not None and not images.is_complex():
            return  # raw integers (int16 CT, uint16 images, bool masks) in the data's own range
        raise TypeError(f"images of dtype {images.dtype}; pass uint8 or float pixels in 0..255")


def _intensity(spec: ModelSpec) -> Intensity:
    """The intensity transform the spec records (8-bit values as they are where it records none)."""
    if spec.intensity is None:
        return Intensity("auto", 0.0, 255.0, 255)
    try:
        return Intensity.from_dict(spec.intensity)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"the spec's intensity {spec.intensity!r} is malformed ({e}); pass a checkpoint written by ddcnn train"
        ) from None


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


def load(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The trained model of a run folder or ``.pt`` checkpoint, as a :class:`Classifier` in eval mode on
    ``device`` (``"auto"``: CUDA if available)."""
    checkpoint = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint)
    spec = spec_of(state, checkpoint)
    missing = [name for name in PREPROCESSING if getattr(spec, name) is None]
    if missing:
        raise CheckpointError(
            f"{checkpoint} (its spec) lacks {', '.join(map(repr, missing))}, which predict needs (as do ddcnn.load "
            "and export) to read new images as the training data was; pass a checkpoint written by ddcnn train"
        )
    model = model_from_checkpoint(state, checkpoint)
    target = resolve_device(device) if isinstance(device, str) else device
    return Classifier(model, spec).to(target).eval()
