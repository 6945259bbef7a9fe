"""Backbones (a registry, 2D and 3D, any number of local CNNs at once) and the models built from them."""

from . import resnet, vgg  # noqa: F401  (register the backbones)
from .backbone import Backbone
from .layers import GroupedLinear
from .local_cnns import LocalCNNs
from .registry import create_model, list_models, register_model

__all__ = ["Backbone", "GroupedLinear", "LocalCNNs", "create_model", "list_models", "register_model"]
