"""Pretrained weights for the built-in ImageNet backbones: torchvision's (and timm's) state dicts in and out.

``--init-weights FILE`` starts the global CNN and every local CNN from a standard state dict: torchvision's
``resnet18``, ``resnet50``, ``densenet121`` or ``densenet169`` (``model.state_dict()``, saved with ``torch.save``
and read back with ``weights_only=True``, or as safetensors). timm's models of the same names (``resnet18.a1_in1k``,
``resnet50.tv_in1k``, ``densenet121.ra_in1k``, ...) have exactly torchvision's key names and shapes and load as
they are; timm's variants with other stems or pooling (``resnet50d``, ``densenetblur121d``, ...) do not, and are
refused naming their first key that differs. Each of the N local CNNs gets the same weights; the classifier is not
taken from the file but starts fresh with the task's classes; the first convolution is adapted to 1-channel data
by summing its kernels over R, G and B (the usual rule, timm's too: on a gray image it computes what the RGB
kernels compute on that image repeated as R = G = B); 3-channel data take it as it is.

:func:`key_pairs` is the one correspondence between ddcnn's names and torchvision's, read off the built model, and
:data:`_RESHAPE` the one difference in shape (the classifier: ddcnn's :class:`~ddcnn.models.layers.GroupedLinear`
has a leading group axis): :func:`from_torchvision` and :func:`to_torchvision` (what ``ddcnn export
--per-local-cnn`` writes) are both made of them, so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointMismatchError, ConfigError
from .densenet import DenseBlock, DenseNet
from .local_cnns import LocalCNNs
from .resnet import BasicBlock, Bottleneck, ResNet

PRETRAINED_BACKBONES = ("resnet18", "resnet50", "densenet121", "densenet169")
# torchvision's DenseNet checkpoints of 2017 name their dense layers' modules norm.1, conv.2 (torchvision and timm
# rename them on loading with this pattern, and so does ddcnn)
_LEGACY_DENSE_LAYER = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_WRAPPERS = ("state_dict", "model")  # training checkpoints that hold the state dict under a key (timm's, ...)

T = TypeVar("T")


@dataclass(frozen=True)
class KeyPair:
    """One tensor of a built-in backbone's state dict under ddcnn's name and torchvision's, and its role:
    ``stem`` (the first convolution, adapted to the data's channels), ``classifier`` (not loaded: it starts fresh)
    or ``layer``."""

    ddcnn: str
    torchvision: str
    role: str


# torchvision's shape from ddcnn's (one local CNN, groups=1) and back, by role; roles not here have the same shape
_RESHAPE = {"classifier": (lambda t: t[0], lambda t: t.unsqueeze(0))}


def supports_torchvision_names(backbone: str, net: nn.Module) -> bool:
    """Whether ``net`` (built as ``backbone``) is a built-in backbone with a torchvision counterpart."""
    return backbone in PRETRAINED_BACKBONES and isinstance(net, (ResNet, DenseNet))


def key_pairs(net: nn.Module) -> list[KeyPair]:
    """Every key of ``net``'s state dict (a built-in ResNet-18/50 or DenseNet, any number of local CNNs) with its
    torchvision name, in ``net``'s order."""
    if isinstance(net, ResNet):
        modules = _resnet_modules(net)
    elif isinstance(net, DenseNet):
        modules = _densenet_modules(net)
    else:
        raise TypeError(f"{type(net).__name__} has no torchvision counterpart")
    pairs = []
    for key in net.state_dict():
        module, _, tensor = key.rpartition(".")
        if module not in modules:  # a layer added to the backbone without its torchvision name here
            raise RuntimeError(f"ddcnn knows no torchvision name for {key} of {type(net).__name__}")
        role = "stem" if module == "features.0" else "classifier" if module == "head.0" else "layer"
        pairs.append(KeyPair(key, f"{modules[module]}.{tensor}", role))
    return pairs


def _resnet_modules(net: ResNet) -> dict[str, str]:
    """ddcnn's module names -> torchvision's: features.0/1 the stem (conv1, bn1), the residual blocks in order
    (layer<stage>.<block>, a new stage at every strided block), the shortcut projection ``downsample``, head.0 fc."""
    names = {"features.0": "conv1", "features.1": "bn1", "head.0": "fc"}
    stage = block = 0
    for i, child in enumerate(net.features):
        if not isinstance(child, (BasicBlock, Bottleneck)):
            continue
        strided = max((*child.conv1.stride, *child.conv2.stride)) > 1
        stage, block = (stage + 1, 0) if stage == 0 or strided else (stage, block)
        for name, module in child.named_modules():
            if _holds_tensors(module):
                names[f"features.{i}.{name}"] = f"layer{stage}.{block}.{name.replace('shortcut', 'downsample')}"
        block += 1
    return names


def _densenet_modules(net: DenseNet) -> dict[str, str]:
    """ddcnn's module names -> torchvision's: the stem (features.conv0, norm0), denseblock<b>.denselayer<l>,
    transition<b> (its BN and conv: norm, conv), the last BN (norm5, as torchvision calls it whatever the blocks),
    head.0 classifier."""
    names = {"features.0": "features.conv0", "features.1": "features.norm0", "head.0": "classifier"}
    block = 0
    for i, child in enumerate(net.features):
        if isinstance(child, DenseBlock):
            block += 1
            for j, layer in enumerate(child.layers):
                for name in ("norm1", "conv1", "norm2", "conv2"):
                    names[f"features.{i}.layers.{j}.{name}"] = f"features.denseblock{block}.denselayer{j + 1}.{name}"
        elif isinstance(child, nn.Sequential):  # a transition: BN, ReLU, 1x1 conv, pooling
            names[f"features.{i}.0"] = f"features.transition{block}.norm"
            names[f"features.{i}.2"] = f"features.transition{block}.conv"
        elif i > 1 and _holds_tensors(child):  # the BN after the last dense block
            names[f"features.{i}"] = "features.norm5"
    return names


def _holds_tensors(module: nn.Module) -> bool:
    return bool(module._parameters or module._buffers)


def to_torchvision(state: Mapping[str, torch.Tensor], pairs: list[KeyPair]) -> dict[str, torch.Tensor]:
    """One local CNN's ddcnn state dict (``groups=1``, e.g. ``LocalCNNs.local_cnn(i).state_dict()``) under
    torchvision's names and shapes: ``torchvision.models.resnet18(num_classes=K).load_state_dict`` takes it when
    the first convolution has 3 channels."""
    return {p.torchvision: _RESHAPE.get(p.role, (_same, _same))[0](state[p.ddcnn]) for p in pairs}


def from_torchvision(state: Mapping[str, torch.Tensor], pairs: list[KeyPair]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_torchvision`: a torchvision state dict as one local CNN's ddcnn state dict
    (``LocalCNNs.load_local_cnn(i, ...)`` takes it). Names and shapes as they are: no check, no adaptation."""
    return {p.ddcnn: _RESHAPE.get(p.role, (_same, _same))[1](state[p.torchvision]) for p in pairs}


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# -- --init-weights ------------------------------------------------------------------------------------------------


def check_init_weights_supported(backbone: str, spatial_dims: int = 2, in_channels: int = 3) -> None:
    """A one-line :class:`ConfigError` unless ``--init-weights`` can load into ``backbone`` on such data."""
    if backbone not in PRETRAINED_BACKBONES:
        raise ConfigError(
            f"--init-weights loads torchvision or timm weights into the built-in {', '.join(PRETRAINED_BACKBONES)}, "
            f"not into {backbone}; choose one of those with --backbone (a factory of your own loads its own weights)"
        )
    if spatial_dims != 2:
        raise ConfigError(
            f"--init-weights loads 2D ImageNet weights, but these data are {spatial_dims}D volumes; drop "
            "--init-weights (or use a factory of your own that loads 3D weights)"
        )
    if in_channels not in (1, 3):
        raise ConfigError(
            f"--init-weights adapts the first convolution to 1 or 3 input channels, but the images have "
            f"{in_channels}; drop --init-weights or convert the images to gray or RGB"
        )


def file_sha256(path: str | Path) -> str:
    """The sha256 of file ``path`` (read in chunks); a one-line :class:`ConfigError` if it does not exist."""
    path = _existing(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pin_init_weights(cfg: T) -> T:
    """``cfg`` (a RunConfig or CompareConfig) with the sha256 of its ``--init-weights`` file recorded as
    ``model.init_weights_sha256``, the backbone checked first: checkpoints and config.yaml then record which
    file a run started from, and ``--resume`` refuses a changed one. A one-line :class:`ConfigError` if the file
    differs from a sha256 already given. ``cfg`` itself without ``--init-weights``."""
    model = cfg.model
    if model.init_weights is None:
        return cfg
    check_init_weights_supported(model.backbone)
    digest = file_sha256(model.init_weights)
    _check_digest(model.init_weights, digest, model.init_weights_sha256)
    return dataclasses.replace(cfg, model=dataclasses.replace(model, init_weights_sha256=digest))


def load_init_weights(local_cnns: LocalCNNs, path: str | Path, sha256: str | None = None) -> str:
    """Start every local CNN of ``local_cnns`` (one, on a ``1x1`` grid: the global CNN) from the weights in file
    ``path`` (see the module docstring); ``sha256``: what the file must hash to. Returns the file's sha256."""
    state, digest = read_state_dict(path)
    _check_digest(path, digest, sha256)
    init_from_state_dict(local_cnns, state, str(path))
    return digest


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """A standard state dict from a safetensors file or a torch file (``weights_only``), and the file's sha256."""
    path = _existing(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if _is_safetensors(data):
        try:
            from safetensors.torch import load
        except ImportError:
            raise CheckpointError(
                f"{path} is a safetensors file, which needs safetensors; pip install safetensors (or 'ddcnn[export]')"
            ) from None
        try:
            state = load(data)
        except Exception as e:  # noqa: BLE001 - untrusted input: whatever fails on reading it is the file's fault
            raise CheckpointError(
                f"{path} cannot be read as safetensors ({_first_line(e)}); it is corrupt or "
                "truncated, download it again"
            ) from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"{path} holds objects other than tensors (a pickled model?) and was refused by "
                "torch.load(weights_only=True); save model.state_dict() instead, or convert it to safetensors"
            ) from None
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{path} is neither a safetensors nor a torch file ({_first_line(e)}); pass a "
                ".safetensors, .pt or .pth file of a state dict"
            ) from None
    return standard_state_dict(state, str(path)), digest


def standard_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """``obj`` as a flat state dict of torchvision's names: unwrapped from a training checkpoint's ``state_dict``
    or ``model`` entry, without DistributedDataParallel's ``module.`` prefix, and with the dense layers of
    torchvision's 2017 DenseNet files renamed (``norm.1`` -> ``norm1``)."""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        obj = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping) or not obj or not _is_state_dict(obj):
        raise CheckpointError(
            f"{source} holds no state dict (a mapping of names to tensors); pass a torchvision or timm model's "
            "state_dict(), saved with torch.save or as safetensors"
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {_LEGACY_DENSE_LAYER.sub(r"\1\2", k): v for k, v in state.items()}


def init_from_state_dict(local_cnns: LocalCNNs, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy torchvision-named ``state`` into every local CNN of ``local_cnns``, checked whole first: its classifier
    stays as built (fresh, the task's classes), its first convolution takes the weights summed over RGB on
    1-channel data. A one-line :class:`CheckpointMismatchError` naming the first key that does not fit."""
    net, groups = local_cnns.net, local_cnns.num_local_cnns
    check_init_weights_supported(
        local_cnns.backbone_name, local_cnns.decomposition.spatial_dims, local_cnns.in_channels
    )
    pairs = key_pairs(net)
    own = net.state_dict()
    single = _fitted(state, pairs, own, groups, local_cnns, source)
    with torch.no_grad():
        for key, value in single.items():
            target = own[key]  # shares the parameter's (buffer's) storage
            if target.dim() == 0:
                target.copy_(value)
                continue
            n = len(value)
            for g in range(groups):  # each local CNN its copy, in place whatever the memory format
                target.narrow(0, g * n, n).copy_(value)


def _fitted(
    state: Mapping[str, torch.Tensor],
    pairs: list[KeyPair],
    own: Mapping[str, torch.Tensor],
    groups: int,
    local_cnns: LocalCNNs,
    source: str,
) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` for one local CNN, by ddcnn key, the stem adapted; the classifier left out."""
    backbone = local_cnns.backbone_name
    names = {p.torchvision for p in pairs}
    fix = f"pass the state dict of torchvision's or timm's {backbone}"
    single = {}
    for p in pairs:
        if p.role == "classifier":
            continue
        if p.torchvision not in state:
            if p.ddcnn.endswith("num_batches_tracked"):  # torchvision's older files have none
                continue
            raise CheckpointMismatchError(
                f"{source} lacks {p.torchvision}, a key of torchvision's {backbone}; {fix} (a ddcnn run's local CNNs: "
                "--pretrained)"
            )
        value = state[p.torchvision]
        if p.role == "stem" and value.dim() == 4 and value.shape[1] == 3 and local_cnns.in_channels == 1:
            value = value.sum(1, keepdim=True)  # a gray image as R = G = B
        target = own[p.ddcnn]
        want = tuple(target.shape) if target.dim() == 0 else (target.shape[0] // groups, *target.shape[1:])
        if tuple(value.shape) != want:
            raise CheckpointMismatchError(
                f"{source}: {p.torchvision} has shape {tuple(value.shape)}, but {backbone} at width "
                f"{local_cnns.width:g} with {local_cnns.in_channels} input channel(s) needs {want}; {fix} (at "
                "width 1)"
            )
        single[p.ddcnn] = value
    unexpected = next((k for k in state if k not in names), None)
    if unexpected is not None:
        raise CheckpointMismatchError(
            f"{source} has the key {unexpected}, which torchvision's {backbone} has not; {fix} (timm's variants "
            "such as resnet50d or densenetblur121d have other layers)"
        )
    return single


def _check_digest(path: str | Path, digest: str, expected: str | None) -> None:
    if expected is not None and digest != expected:
        raise ConfigError(
            f"--init-weights {path} has sha256 {digest}, not the {expected} this run's configuration records "
            "(--init-weights-sha256); pass the file the run started with, or start a new run without --resume"
        )


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--init-weights {path} does not exist; pass a .safetensors, .pt or .pth file")
    return path


def _is_safetensors(data: bytes) -> bool:
    """safetensors files start with the 8-byte little-endian size of their JSON header, then the header."""
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__
