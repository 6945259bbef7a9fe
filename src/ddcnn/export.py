"""``ddcnn export``: a checkpoint's model for other runtimes, as ONNX, TorchScript or safetensors.

ONNX and TorchScript hold the whole model (a CNN-DNN, local CNNs, or the global CNN) as :func:`ddcnn.load`'s
:class:`~ddcnn.inference.Classifier`: normalisation is inside the graph, so the input is **float32 images**
``(B, C, H, W)`` or ``(B, C, D, H, W)`` **in 0..255** (the pixels as stored, cast to float), with any batch size
``B``, and the output the class probabilities ``(B, K)``. The graph's input is named ``images`` and its output
``probabilities``. ONNX is written by ``torch.onnx.export(dynamo=True)`` (it needs ``ddcnn[export]``: onnx and
onnxscript; onnxruntime runs it); TorchScript by ``torch.jit.trace``.

safetensors holds the weights: the model's state dict in ddcnn's grouped layout (the N local CNNs stacked along
dim 0, as :class:`~ddcnn.models.LocalCNNs` holds them) with the checkpoint's spec, as JSON, in the metadata under
``"ddcnn_spec"``; :func:`load_safetensors` rebuilds the model from it. ``per_local_cnn=True`` writes instead one
file per local CNN (``local_cnn_<i>.safetensors``) holding that local CNN as an ordinary standalone network, which
takes subimages ``(B, C, *subimage_shape)`` normalised as the spec says, and, for a CNN-DNN,
``aggregator.safetensors``. The built-in resnet18, resnet50, densenet121 and densenet169 are written under
torchvision's key names and shapes (metadata ``"key_names": "torchvision"``, :func:`ddcnn.models.pretrained
.to_torchvision`): ``torchvision.models.resnet18(num_classes=K).load_state_dict(load_file(...))`` takes them for RGB
data (for gray data the first convolution has one input channel: replace ``conv1`` by a 1-channel one first), and so
does ``ddcnn train --init-weights``. torchvision computes the same on the subimage where every feature map that a
DenseNet transition pools has even sides (subimage sides that are multiples of 32); ddcnn's transitions keep the
last row of an odd map. Other backbones are written under ddcnn's keys (``"key_names": "ddcnn"``: those of
``LocalCNNs.local_cnn(i).state_dict()``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, DDCNNError
from .inference import Classifier, load
from .models.cnn_dnn import CNNDNN
from .models.local_cnns import LocalCNNs
from .models.pretrained import key_pairs, supports_torchvision_names, to_torchvision
from .models.spec import ModelSpec

FORMATS = ("onnx", "torchscript", "safetensors")
SPEC_KEY = "ddcnn_spec"  # the safetensors metadata key of the spec (JSON)
_EXAMPLE_BATCH = 2  # not 1: a batch of 1 would be specialised away by torch.export


class ExportError(DDCNNError):
    """An export its optional dependencies, or the exporter, could not write."""


def export(
    checkpoint: str | Path | Classifier, out: str | Path, format: str, per_local_cnn: bool = False
) -> list[Path]:
    """Write the model of ``checkpoint`` (a run folder, a ``.pt`` file or a loaded classifier) to ``out`` in
    ``format`` (see the module docstring); returns the files written."""
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {', '.join(FORMATS)}")
    if per_local_cnn and format != "safetensors":
        raise ConfigError("--per-local-cnn writes safetensors files; pass --format safetensors")
    classifier = checkpoint if isinstance(checkpoint, Classifier) else load(checkpoint, device="cpu")
    classifier = classifier.cpu().eval()
    out = Path(out)
    if per_local_cnn:
        return export_local_cnns(classifier, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    {"onnx": export_onnx, "torchscript": export_torchscript, "safetensors": export_safetensors}[format](classifier, out)
    return [out]


def example_input(classifier: Classifier, batch: int = _EXAMPLE_BATCH) -> torch.Tensor:
    """Float32 images in 0..255 of the shape ``classifier`` takes."""
    spec = classifier.spec
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, spec.in_channels, *spec.image_shape), generator=generator).float()


def export_onnx(classifier: Classifier, out: Path) -> None:
    """The classifier as ONNX, with a dynamic batch size (``torch.onnx.export(dynamo=True)``)."""
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"ONNX export needs {module}; pip install 'ddcnn[export]'") from None
    batch = torch.export.Dim("batch")
    quiet = {name: logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch._export")}
    levels = {name: logger.level for name, logger in quiet.items()}
    try:  # the optimiser's notes at INFO (ddcnn's CLI logs INFO) are no news to a user
        for logger in quiet.values():
            logger.setLevel(logging.ERROR)
        torch.onnx.export(
            classifier, (example_input(classifier),), str(out), dynamo=True, input_names=["images"],
            output_names=["probabilities"], dynamic_shapes={"images": {0: batch}}, verbose=False,
        )
    except Exception as e:  # the exporter's errors are many and long: one line, and the file is not left half made
        out.unlink(missing_ok=True)
        raise ExportError(f"torch.onnx.export could not export the model ({str(e).strip().splitlines()[0][:200]})"
                          ) from e
    finally:
        for name, logger in quiet.items():
            logger.setLevel(levels[name])


def export_torchscript(classifier: Classifier, out: Path) -> None:
    """The classifier traced to TorchScript; load it with ``torch.jit.load(out)``."""
    with torch.no_grad(), warnings.catch_warnings():
        # the models' shape checks become constants of the trace: right, since the exported shape is fixed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(classifier, example_input(classifier), check_trace=False)
    traced.save(str(out))


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ExportError("safetensors export needs safetensors; pip install 'ddcnn[export]'") from None
    return safetensors.torch


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def export_safetensors(classifier: Classifier, out: Path) -> None:
    """The model's state dict (grouped layout) with the spec as JSON metadata."""
    metadata = {SPEC_KEY: json.dumps(classifier.spec.to_dict()), "format": "pt"}
    _safetensors().save_file(_tensors(classifier.model), str(out), metadata=metadata)


def export_local_cnns(classifier: Classifier, folder: Path) -> list[Path]:
    """Each local CNN as a standalone network's state dict, ``local_cnn_<i>.safetensors`` in ``folder`` (under
    torchvision's names for the built-in ImageNet backbones), with the spec, the subdomain's index and grid position
    (``null`` for the coarse level, which reads the whole image averaged down to the subimage shape: its ``input``
    says so), the subimage shape and the key names as metadata; and a CNN-DNN's aggregator."""
    st = _safetensors()
    model = classifier.model
    local_cnns: LocalCNNs = model.local_cnns if isinstance(model, CNNDNN) else model
    d = local_cnns.decomposition
    spec = json.dumps(classifier.spec.to_dict())
    torchvision = supports_torchvision_names(local_cnns.backbone_name, local_cnns.net)
    pairs = key_pairs(local_cnns.net) if torchvision else None
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    positions: list[tuple[int, ...] | None] = [*d.subdomain_coordinates(), *([None] if d.coarse else [])]
    for i, position in enumerate(positions):
        metadata = {SPEC_KEY: spec, "format": "pt", "subdomain": str(i),
                    "position": json.dumps(None if position is None else list(position)),
                    "input": "window" if position is not None else "coarse: the whole image, area-averaged",
                    "subimage_shape": json.dumps(list(d.subimage_shape)),
                    "key_names": "torchvision" if torchvision else "ddcnn"}
        tensors = _tensors(local_cnns.local_cnn(i))
        if pairs is not None:
            tensors = {k: v.contiguous() for k, v in to_torchvision(tensors, pairs).items()}
        written.append(folder / f"local_cnn_{i}.safetensors")
        st.save_file(tensors, str(written[-1]), metadata=metadata)
    if isinstance(model, CNNDNN):
        written.append(folder / "aggregator.safetensors")
        st.save_file(_tensors(model.aggregator), str(written[-1]), metadata={SPEC_KEY: spec, "format": "pt"})
    return written


def load_safetensors(path: str | Path) -> Classifier:
    """The :class:`Classifier` of a file :func:`export_safetensors` wrote (not of a ``--per-local-cnn`` file)."""
    st = _safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if SPEC_KEY not in metadata:
        raise ExportError(f"{path} has no {SPEC_KEY!r} metadata; pass a file written by ddcnn export")
    spec = ModelSpec.from_dict(json.loads(metadata[SPEC_KEY]), f"{path} (its {SPEC_KEY})")
    model = spec.build()
    model.load_state_dict(st.load_file(str(path)))
    return Classifier(model.eval(), spec).eval()
