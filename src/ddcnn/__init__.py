"""ddcnn: training convolutional neural networks by domain decomposition (the CNN-DNN of Klawonn, Lanser and
Weber). Each image is cut into a grid of subimages, one local CNN per subimage is trained with no communication,
and a small dense network (or averaging, or voting) combines their class probabilities."""

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig, config_from_dict, config_to_dict
from .decomposition import Decomposition
from .errors import DDCNNError
from .inference import Classifier, load
from .models import CNNDNN, LocalCNNs, create_aggregator, create_model, list_aggregators, list_models

__version__ = "0.1.0"

__all__ = [
    "CNNDNN",
    "Classifier",
    "DDCNNError",
    "DataConfig",
    "Decomposition",
    "LocalCNNs",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "create_aggregator",
    "create_model",
    "list_aggregators",
    "list_models",
    "load",
]
