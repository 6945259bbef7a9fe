"""Backbones the user brings: ``--backbone package.module:factory``, a function (or class) that builds one CNN.

The factory is imported by name (the current directory first on the path, as ``python -m`` has it), so that a
checkpoint's spec can name it and :func:`~ddcnn.models.spec.model_from_checkpoint` rebuild it by importing it again.
It is called with the keyword arguments of :data:`KEYWORDS` that it accepts (by its signature; a ``**kwargs``
factory gets all of them, and a keyword it then refuses with "unexpected keyword argument" is dropped), and must
return an ``nn.Module`` mapping ``(B, in_channels, *image_shape)`` to logits ``(B, num_classes)``; one probe forward
checks that before any training. ``width`` (``--width``, ``--local-width``) is passed only to a factory that takes
it; a width other than 1 for one that does not is an error. See docs/backbones.md.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError
from .backbone import spatial_mean
from .registry import list_models

SEPARATOR = ":"
# what a factory is called with (those it accepts); width only where it takes it
KEYWORDS = ("in_channels", "num_classes", "spatial_dims", "image_shape")
DOCS = "docs/backbones.md"
_IDENTIFIER = r"[A-Za-z_]\w*"
_NAME = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")

Factory = Callable[..., nn.Module]


def is_factory_name(name: str) -> bool:
    """Whether backbone ``name`` names a factory (``package.module:function``) rather than a registered backbone."""
    return SEPARATOR in name


def factory_name(factory: Factory) -> str:
    """The ``module:qualified.name`` a callable is imported by (what a spec records for it)."""
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    if not module or not qualname or "<" in qualname:  # a lambda, a local function, a functools.partial
        raise ConfigError(
            f"the backbone factory {factory!r} has no importable name; define it at the top level of a module (a "
            f"function or class; see {DOCS}) so that checkpoints can name it"
        )
    return f"{module}{SEPARATOR}{qualname}"


def resolve_factory(name: str) -> Factory:
    """The callable ``package.module:attribute`` names, imported with the current directory on the path; a
    one-line ConfigError when it cannot be imported or called."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"backbone {name!r} is not a factory name package.module:function (dotted names, one ':'); see {DOCS}"
        )
    module_name, _, attribute = name.partition(SEPARATOR)
    _put_current_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - ImportError, or any error the module raises while it is imported
        missing = isinstance(e, ModuleNotFoundError) and e.name is not None and module_name.startswith(e.name)
        where = (
            "put it on the Python path (the current directory is searched, as by python -m; or set PYTHONPATH) or "
            "pip install it"
            if missing
            else "fix the module so that it imports"
        )
        raise ConfigError(f"backbone {name}: cannot import {module_name} ({_first_line(e)}); {where}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"backbone {name}: {module_name} has no attribute {attribute!r}; name a function or class defined in it"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(
            f"backbone {name}: {attribute} is a {type(target).__name__}, not callable; name a function "
            "or class that builds an nn.Module"
        )
    return target


def check_backbone(name: str, widths: Sequence[float] = ()) -> None:
    """Raise a one-line ConfigError unless ``name`` is a registered backbone or an importable factory that can take
    the ``widths`` asked for (before any data loads)."""
    if is_factory_name(name):
        named, var_keyword = _accepts(resolve_factory(name))
        for width in widths:
            if width is not None and width != 1.0 and "width" not in named and not var_keyword:
                raise _no_width(name, width)
    elif name not in list_models():
        error = UnknownNameError("backbone", name, list_models())
        error.args = (f"{error.args[0]}; or name your own, package.module:function (see {DOCS})",)
        raise error


def build_factory_module(
    name: str,
    factory: Factory,
    *,
    in_channels: int,
    num_classes: int,
    image_shape: Sequence[int],
    width: float = 1.0,
    check: bool = True,
) -> nn.Module:
    """One module from ``factory``, called with the keywords it takes, checked on one probe forward (see the module
    docstring; ``check=False`` skips it, for more copies of a module already checked, unless the module has lazy
    parameters, which that forward initialises); ``name`` names it in errors."""
    image_shape = tuple(int(s) for s in image_shape)
    values: dict[str, Any] = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "spatial_dims": len(image_shape),
        "image_shape": image_shape,
    }
    named, var_keyword = _accepts(factory)
    kwargs = {k: v for k, v in values.items() if k in named or var_keyword}
    if "width" in named or (var_keyword and width != 1.0):
        kwargs["width"] = width
    elif width != 1.0:
        raise _no_width(name, width)
    optional = set(kwargs) - named  # given to **kwargs only: dropped if the factory turns out not to take them
    while True:
        try:
            module = factory(**kwargs)
            break
        except TypeError as e:
            refused = _UNEXPECTED.search(str(e))
            if refused is None or refused.group(1) not in optional:
                raise _failed(name, kwargs, e) from None
            if refused.group(1) == "width":
                raise _no_width(name, width) from None
            optional.discard(refused.group(1))
            del kwargs[refused.group(1)]
        except Exception as e:  # noqa: BLE001 - the user's code: its error, in one line
            raise _failed(name, kwargs, e) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"backbone {name} returned a {type(module).__name__}, not an nn.Module; return the model (see {DOCS})"
        )
    lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters())
    if check or lazy:
        check_factory_output(name, module, in_channels, num_classes, image_shape, "in_channels" in kwargs)
    return module


def check_factory_output(
    name: str,
    module: nn.Module,
    in_channels: int,
    num_classes: int,
    image_shape: tuple[int, ...],
    took_channels: bool = True,
) -> None:
    """One forward of two zero images ``(2, in_channels, *image_shape)`` in eval mode (no statistics change): a
    one-line ConfigError unless the output is ``(2, num_classes)`` floating-point logits."""
    shape = (2, in_channels, *image_shape)
    training = module.training
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with torch.no_grad():
            out = module.eval()(torch.zeros(shape, device=device, dtype=dtype))
    except Exception as e:  # noqa: BLE001 - the user's module failing on the inputs it will get
        hint = (
            f"; it takes no in_channels keyword, so it keeps its own first layer: wrap it in a factory that builds it "
            f"for {in_channels} channel(s) (see {DOCS})"
            if not took_channels
            else f"; it must take (B, C, *image_shape) inputs of the image_shape it is given (see {DOCS})"
        )
        raise ConfigError(f"backbone {name} fails on inputs of shape {shape} ({_first_line(e)}){hint}") from None
    finally:
        module.train(training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes) or not out.is_floating_point():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(
            f"backbone {name} maps inputs of shape {shape} to {got}, not logits of shape (2, {num_classes}); return "
            f"a module whose forward gives (B, num_classes) (see {DOCS})"
        )


def check_features_interface(name: str, module: nn.Module) -> None:
    """A one-line ConfigError unless ``module`` has timm's ``forward_features`` and ``forward_head``, which
    ``--local-output features`` needs of a factory's module (:func:`pooled_forward`)."""
    missing = [m for m in ("forward_features", "forward_head") if not callable(getattr(module, m, None))]
    if missing:
        raise ConfigError(
            f"backbone {name} ({type(module).__name__}) has no {' and no '.join(missing)}, which --local-output "
            "features reads; give its module forward_features(x) (the features before the classifier) and "
            "forward_head(features) with forward(x) == forward_head(forward_features(x)), as timm's models have "
            f"(see {DOCS}), or use --local-output probabilities or logits"
        )


def pooled_forward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A factory module's logits ``(B, K)`` and pooled features ``(B, C)`` from one pass, timm's way: ``f =
    module.forward_features(x)``, logits ``module.forward_head(f)``; ``f`` itself where it is ``(B, C)``, averaged
    over its spatial axes where it is a feature map ``(B, C, *spatial)`` of ``x``'s spatial dimensions."""
    features = module.forward_features(x)
    logits = module.forward_head(features)
    if features.dim() == x.dim():  # a feature map (B, C, *spatial): 4D for images, 5D for volumes
        pooled = spatial_mean(features)
    elif features.dim() == 2:
        pooled = features
    else:
        raise ConfigError(
            f"{type(module).__name__}.forward_features gives shape {tuple(features.shape)} for inputs "
            f"{tuple(x.shape)}; --local-output features pools (B, C) features or (B, C, *spatial) feature maps "
            f"(see {DOCS})"
        )
    return logits, pooled


def _accepts(factory: Factory) -> tuple[set[str], bool]:
    """The keyword names ``factory`` takes, and whether it takes ``**kwargs`` (True where its signature is
    unknown)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C extension without a signature: try everything
        return set(), True
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in parameters if p.kind in keyword}
    return named, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def _no_width(name: str, width: float) -> ConfigError:
    return ConfigError(
        f"backbone {name} takes no width keyword, so width {width:g} (--width or --local-width) cannot be applied; "
        "give the factory a width parameter or leave both at 1"
    )


def _failed(name: str, kwargs: dict[str, Any], error: BaseException) -> ConfigError:
    given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return ConfigError(
        f"backbone {name}({given}) failed: {_first_line(error)}; see {DOCS} for what a factory is called with"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _put_current_directory_on_path() -> None:
    """The current directory on ``sys.path``, as ``python -m`` puts it there (and a console script such as ``ddcnn``
    does not), for the rest of the process: a factory may import more of its package when it is called."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
