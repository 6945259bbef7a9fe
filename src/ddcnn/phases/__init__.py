"""The phases of the method (docs/method.md), one module each:

=====================  ========================================================================================
module                 phase
=====================  ========================================================================================
``context``            what every phase needs: the :class:`Experiment`, the :class:`MethodResult`, fitting a model
``local``              the local phase (every local CNN at once, no communication) and the global CNN (``1x1``)
``aggregation``        the aggregation phase: an aggregator fitted or trained on the frozen local probabilities
``end_to_end``         the whole CNN-DNN trained end to end: ``coherent`` (from scratch) and ``transfer``
=====================  ========================================================================================

:mod:`ddcnn.methods` maps the method names of ``ddcnn train --method`` to these phases.
"""

from .aggregation import (
    AggregatorFit,
    LocalProbabilities,
    TensorLoader,
    aggregation_phase,
    aggregator_training_inputs,
    fit_aggregator,
    local_probabilities,
    run_aggregation,
)
from .context import Experiment, MethodResult, count_parameters, fit_phase, method_report
from .end_to_end import run_coherent, run_transfer
from .local import local_phase_checkpoint, pretrained_local_cnns, run_global, run_local, train_local_cnns

__all__ = [
    "AggregatorFit",
    "Experiment",
    "LocalProbabilities",
    "MethodResult",
    "TensorLoader",
    "aggregation_phase",
    "aggregator_training_inputs",
    "count_parameters",
    "fit_aggregator",
    "fit_phase",
    "local_phase_checkpoint",
    "local_probabilities",
    "method_report",
    "pretrained_local_cnns",
    "run_aggregation",
    "run_coherent",
    "run_global",
    "run_local",
    "run_transfer",
    "train_local_cnns",
]
