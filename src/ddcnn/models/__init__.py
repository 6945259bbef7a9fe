"""Backbones (a registry, 2D and 3D, any number of local CNNs at once), aggregators (a registry) and the models
built from them: the local CNNs of a decomposition and the CNN-DNN."""

from . import resnet, vgg  # noqa: F401  (register the backbones)
from .aggregators import Aggregator, create_aggregator, list_aggregators, register_aggregator
from .backbone import Backbone
from .cnn_dnn import CNNDNN
from .layers import GroupedLinear
from .local_cnns import LocalCNNs
from .registry import create_model, list_models, register_model

__all__ = [
    "Aggregator",
    "Backbone",
    "CNNDNN",
    "GroupedLinear",
    "LocalCNNs",
    "create_aggregator",
    "create_model",
    "list_aggregators",
    "list_models",
    "register_aggregator",
    "register_model",
]
