"""Configuration as dataclasses. The library takes these; argparse and YAML exist only at the CLI edge.

A run's resolved configuration is written next to its results and into every checkpoint
(:func:`config_to_dict`), and can be read back (:func:`config_from_dict`), which refuses unknown keys.

Every option is declared once, with :func:`option`: its default, its help (meaning, unit, choices) and its group
(:data:`GROUPS`) live in the field's metadata, which the command line's flags and ``--help`` are made from.
:func:`inapplicable_options` names the options a run sets but does not read.

The package: :mod:`~ddcnn.config.options` (``option``, the checks, the choices, grids as text),
:mod:`~ddcnn.config.sections` (the dataclasses; the data section's in :mod:`~ddcnn.config.data_section`),
:mod:`~ddcnn.config.files` (to and from dicts and YAML) and :mod:`~ddcnn.config.applicable` (the options a run does
not read); import every name from ``ddcnn.config``.
"""

from .applicable import (
    changed_options,
    inapplicable_aggregation,
    inapplicable_data_and_training,
    inapplicable_options,
)
from .files import config_from_dict, config_to_dict, load_yaml, upgrade_config_dict
from .options import (
    AGGREGATOR_INPUTS,
    AMP_DTYPES,
    CLASS_WEIGHTS,
    DTYPES,
    GROUPS,
    METHOD_NAMES,
    OPTIMIZERS,
    PARALLEL_MODES,
    RENAMED_KEYS,
    RENAMED_METHODS,
    SAMPLERS,
    SCHEDULES,
    check,
    check_choice,
    check_choices,
    field_default,
    format_grid,
    grid_order,
    option,
    parse_grid,
)
from .sections import DataConfig, ModelConfig, RunConfig, SharedOptions, TrainConfig

__all__ = [
    "AGGREGATOR_INPUTS",
    "AMP_DTYPES",
    "CLASS_WEIGHTS",
    "DTYPES",
    "GROUPS",
    "METHOD_NAMES",
    "OPTIMIZERS",
    "PARALLEL_MODES",
    "RENAMED_KEYS",
    "RENAMED_METHODS",
    "SAMPLERS",
    "SCHEDULES",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "SharedOptions",
    "TrainConfig",
    "changed_options",
    "check",
    "check_choice",
    "check_choices",
    "config_from_dict",
    "config_to_dict",
    "field_default",
    "format_grid",
    "grid_order",
    "inapplicable_aggregation",
    "inapplicable_data_and_training",
    "inapplicable_options",
    "load_yaml",
    "option",
    "parse_grid",
    "upgrade_config_dict",
]
