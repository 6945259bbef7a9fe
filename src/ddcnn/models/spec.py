"""The model specification: everything needed to rebuild a trained model, written whole into every checkpoint.

A :class:`ModelSpec` says what a checkpoint's weights belong to: local CNNs (``kind`` ``local_cnns``; the global CNN
is local CNNs on a ``1x1`` grid) or a CNN-DNN (``cnn_dnn``, with its aggregator and the aggregator's options), the
backbone and width, the decomposition (grid, overlap, coarse level, image shape), the channels and classes, and the
normalisation new images need. Its provenance fields (method, dataset, local checkpoint) do not affect the model.

Every phase stores ``spec.to_dict()`` under the checkpoint's ``"spec"`` key; :func:`spec_of` is the one reader and
:func:`model_from_checkpoint` the one rebuilder. Checkpoints of ddcnn 0.1 stored the same fields, under the same
names, as a ``"meta"`` dict: :func:`spec_of` reads those too. Fields added later are written only where they differ
from their default (``coarse`` only when True), so that the spec of a model without them is the one it always was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint, require_keys
from ..decomposition import Decomposition
from ..errors import CheckpointError, CheckpointMismatchError
from .aggregators import create_aggregator
from .factory import is_factory_name
from .local_cnns import LocalCNNs, _check_compatible

KINDS = ("local_cnns", "cnn_dnn")

# the fields that decide the local CNNs' parameters: a checkpoint's local CNNs fit a model that agrees on all of them
LOCAL_CNNS_FIELDS = ("backbone", "width", "grid", "overlap", "coarse", "in_channels", "num_classes", "image_shape")

# fields written only where they are not their default, so that older checkpoints' specs stay what they were
_OMITTED_AT_DEFAULT = {"coarse": False}

# the fields that decide the whole model (the rest is how to preprocess images, and provenance)
MODEL_FIELDS = ("kind", *LOCAL_CNNS_FIELDS, "aggregator", "aggregator_options")


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a trained model (:meth:`build`) and preprocess images for it. Sequences are tuples here and
    lists in :meth:`to_dict`; ``None`` is "not recorded"."""

    kind: str  # "local_cnns" (the global CNN is local CNNs on a 1x1 grid) or "cnn_dnn"
    backbone: str  # a registered backbone (ddcnn.models.list_models), or a factory package.module:function
    grid: tuple[int, ...]  # subdomains per spatial axis
    image_shape: tuple[int, ...]  # spatial shape of the whole images, pixels (voxels) per axis
    in_channels: int
    num_classes: int
    width: float = 1.0  # the channel multiplier these CNNs were built with (a local-phase model's: --local-width)
    overlap: int = 0  # pixels each subimage reaches into its neighbours (ddcnn.decomposition)
    coarse: bool = False  # a coarse level: one more local CNN, on the whole image downsampled (ddcnn.decomposition)
    class_names: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None  # per channel, of the training split's pixels scaled to [0, 1]
    std: tuple[float, ...] | None = None
    aggregator: str | None = None  # a registered aggregator, for a CNN-DNN
    aggregator_options: dict[str, Any] = field(default_factory=dict, hash=False)  # its constructor options
    # how raw values became the stored levels the model was trained on (ddcnn.data.intensity.Intensity.to_dict());
    # None: 8-bit values as they are (so in every checkpoint written before it was recorded)
    intensity: dict[str, Any] | None = field(default=None, hash=False)
    # provenance: what made the model, not what it is
    method: str | None = None  # the ddcnn train method whose phase wrote the checkpoint
    dataset: str | None = None
    local_checkpoint: str | None = None  # the local phase an aggregation phase started from

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("grid", tuple(int(n) for n in self.grid))
        put("image_shape", tuple(int(n) for n in self.image_shape))
        put("in_channels", int(self.in_channels))
        put("num_classes", int(self.num_classes))
        put("width", float(self.width))
        put("overlap", int(self.overlap))
        put("coarse", bool(self.coarse))
        for name, kind in (("class_names", str), ("mean", float), ("std", float)):
            if getattr(self, name) is not None:
                put(name, tuple(kind(v) for v in getattr(self, name)))
        put("aggregator_options", {str(k): _frozen(v) for k, v in dict(self.aggregator_options).items()})
        if self.intensity is not None:
            put("intensity", dict(self.intensity))
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == "cnn_dnn") != (self.aggregator is not None):
            raise ValueError("a cnn_dnn has an aggregator and local CNNs have none")
        if len(self.grid) != len(self.image_shape):
            raise ValueError(f"grid {self.grid} and image shape {self.image_shape} differ in their number of axes")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.in_channels:
                raise ValueError(f"{name} has {len(values)} values for {self.in_channels} channel(s)")

    @classmethod
    def of(cls, model: nn.Module, **fields: Any) -> ModelSpec:
        """The spec of a built :class:`LocalCNNs` or CNN-DNN as far as the model knows it; the rest (class names,
        normalisation, the aggregator's options, provenance) from ``fields``."""
        local_cnns: LocalCNNs = getattr(model, "local_cnns", model)
        aggregator = getattr(model, "aggregator", None)
        d = local_cnns.decomposition
        known: dict[str, Any] = {
            "kind": "local_cnns" if aggregator is None else "cnn_dnn",
            "backbone": local_cnns.backbone_name,
            "width": local_cnns.width,
            "grid": d.grid,
            "overlap": d.overlap,
            "coarse": d.coarse,
            "image_shape": d.image_shape,
            "in_channels": local_cnns.in_channels,
            "num_classes": local_cnns.num_classes,
            "aggregator": None if aggregator is None else aggregator.name,
        }
        return cls(**(known | fields))

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain values (lists, not tuples) for a checkpoint, JSON or YAML; those of
        ``_OMITTED_AT_DEFAULT`` only where they are not their default."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {k: v for k, v in values.items() if k not in _OMITTED_AT_DEFAULT or v != _OMITTED_AT_DEFAULT[k]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "the spec") -> ModelSpec:
        """The spec :meth:`to_dict` wrote; a one-line :class:`CheckpointError` naming ``source`` (e.g. ``"x.pt (its
        spec)"``) for a key it does not know, a required one it lacks, or values that make no model."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{source} is a {type(d).__name__}, not a mapping; pass a .pt file written by ddcnn")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - fields))
        if unknown:
            raise CheckpointError(
                f"{source} has unknown key(s) {', '.join(map(repr, unknown))}; it was written by a newer ddcnn "
                "(use that version) or edited by hand"
            )
        given = {k: v for k, v in d.items() if v is not None}  # None: not recorded, the field's default
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        require_keys(given, source, required)
        try:
            return cls(**given)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source} describes no model ({_first_line(e)}); pass a .pt file written by "
                                  "ddcnn train") from None

    def decomposition(self) -> Decomposition:
        return Decomposition(self.grid, self.image_shape, self.overlap, self.coarse)

    def build(self) -> nn.Module:
        """The model this spec describes, untrained: :class:`LocalCNNs` or a CNN-DNN."""
        from .cnn_dnn import CNNDNN  # here: cnn_dnn imports this module to check the checkpoints it loads

        local_cnns = LocalCNNs(self.backbone, self.decomposition(), self.in_channels, self.num_classes, self.width)
        if self.kind == "local_cnns":
            return local_cnns
        n = local_cnns.decomposition.num_subdomains
        return CNNDNN(local_cnns, create_aggregator(self.aggregator, n, self.num_classes, **self.aggregator_options))

    def check_compatible(
        self, needed: ModelSpec | Mapping[str, Any], path: str | Path, keys: Iterable[str] | None = None
    ) -> None:
        """Raise :class:`CheckpointMismatchError` naming the first of ``keys`` in which this spec (of checkpoint
        ``path``) differs from ``needed``: another spec (``keys`` default: :data:`MODEL_FIELDS`) or the values a run
        needs by field name (``keys`` default: its keys)."""
        if isinstance(needed, ModelSpec):
            keys, needed = MODEL_FIELDS if keys is None else keys, needed.to_dict()
        for key in needed if keys is None else keys:
            want = _frozen(_plain(needed.get(key, _OMITTED_AT_DEFAULT.get(key))))  # a field omitted: its default
            have = _frozen(_plain(getattr(self, key)))
            if have != want and key == "coarse":
                has, lacks = ("has a", "without") if have else ("has no", "with")
                raise CheckpointMismatchError(
                    f"checkpoint {path} {has} coarse level but this run's model is {lacks} one; train the local phase "
                    f"{lacks} --coarse, or run {'with' if have else 'without'} --coarse"
                )
            if have != want:
                raise CheckpointMismatchError(
                    f"checkpoint {path} has {key} {have!r} but this run needs {want!r}; "
                    f"use a checkpoint trained with the same {key} or change the configuration"
                )


def spec_of(state: Mapping[str, Any], path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` of checkpoint ``state`` (read from ``path``): its ``"spec"``, or the ``"meta"`` of a
    ddcnn 0.1 checkpoint (the same fields under the same names). A one-line :class:`CheckpointError` if it has
    neither, or one that makes no spec."""
    key = "meta" if "meta" in state and "spec" not in state else "spec"  # "meta": written by ddcnn 0.1
    require_keys(state, path, (key,))
    return ModelSpec.from_dict(state[key], f"{path} (its {key})")


def model_from_checkpoint(state: Mapping[str, Any] | str | Path, path: str | Path | None = None) -> nn.Module:
    """The model checkpoint ``state`` (or the checkpoint file ``state``) was written from, rebuilt from its spec
    with its weights, in eval mode: :class:`LocalCNNs` (the global CNN included) or a CNN-DNN. ``path`` names the
    checkpoint in errors (default: the file, or ``state["path"]``)."""
    if isinstance(state, (str, Path)):
        path, state = state if path is None else path, load_checkpoint(state)
    path = state.get("path", "(loaded)") if path is None else path
    spec = spec_of(state, path)
    try:
        model = spec.build()
    except (TypeError, ValueError, KeyError) as e:  # an unknown backbone or aggregator, a grid too fine...
        if is_factory_name(spec.backbone):  # the user's module: it must import here as it did where it trained
            raise CheckpointError(
                f"checkpoint {path} was trained with the backbone factory {spec.backbone}, which does not build here "
                f"({str(e).strip().splitlines()[0]}); run where its module imports (the current directory, or "
                "PYTHONPATH)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} describes a model ddcnn cannot build ({_first_line(e)}); pass a .pt file written by "
            "ddcnn train"
        ) from None
    weights = state["model"]
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path} holds no weights ('model' is not a state dict); pass a .pt file "
                              "written by ddcnn train")
    _check_compatible(model.state_dict(), dict(weights), what=f"the {spec.kind} model of {path}")
    model.load_state_dict(weights)
    return model.eval()


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (recursively), as JSON and YAML hold it."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _frozen(value: Any) -> Any:
    """``value`` with lists as tuples (recursively): the form compared, and the one aggregators are built with."""
    if isinstance(value, (tuple, list)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _first_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip().splitlines()[0][:160] if text.strip() else type(error).__name__
