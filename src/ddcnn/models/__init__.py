"""Backbones (a registry, 2D and 3D, any number of local CNNs at once), aggregators (a registry), the models
built from them (the local CNNs of a decomposition and the CNN-DNN) and the spec every checkpoint holds to rebuild
its model (:class:`ModelSpec`, :func:`model_from_checkpoint`)."""

# register the backbones, and the closed-form aggregators (after the trained ones, which closed_form imports)
from . import closed_form, densenet, resnet, vgg  # noqa: F401
from .aggregators import Aggregator, create_aggregator, list_aggregators, register_aggregator
from .backbone import Backbone
from .cnn_dnn import CNNDNN
from .layers import GroupedLinear
from .local_cnns import LocalCNNs
from .registry import create_model, list_models, register_model
from .spec import ModelSpec, model_from_checkpoint, spec_of

__all__ = [
    "Aggregator",
    "Backbone",
    "CNNDNN",
    "GroupedLinear",
    "LocalCNNs",
    "ModelSpec",
    "create_aggregator",
    "create_model",
    "list_aggregators",
    "list_models",
    "model_from_checkpoint",
    "register_aggregator",
    "register_model",
    "spec_of",
]
