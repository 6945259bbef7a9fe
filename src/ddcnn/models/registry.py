"""Backbone registry: ``@register_model`` on a factory, ``create_model(name, **kw)``, ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UnknownNameError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a backbone factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"backbone {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build backbone ``name``; keyword arguments as :class:`~ddcnn.models.backbone.Backbone` takes them.

    ``in_channels``, ``num_classes``, ``spatial_dims`` (2 or 3), ``width`` (channel multiplier), ``groups``
    (number of local CNNs computed together), ``input_shape`` (spatial size, checked against the backbone's
    minimum).
    """
    if name not in _MODELS:
        raise UnknownNameError("backbone", name, _MODELS)
    return _MODELS[name](**kwargs)
