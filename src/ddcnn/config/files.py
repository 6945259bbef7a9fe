"""A configuration as a dict and back: :func:`config_to_dict` (written next to a run's results and into every
checkpoint), :func:`config_from_dict` (which refuses unknown keys and coerces YAML values to the fields' types) and
:func:`load_yaml`."""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError
from .options import RENAMED_KEYS, RENAMED_METHODS, parse_grid

T = TypeVar("T")
log = logging.getLogger(__name__)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a YAML/JSON value to a field's annotated type; raise ConfigError when it cannot be."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if isinstance(value, str) and key.endswith("grid"):
            return parse_grid(value)
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
        return config_from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if annotation in (int, float, str):
        if isinstance(value, bool) and annotation is not str:
            raise ConfigError(f"config key {key!r} must be {annotation.__name__}, got {value!r}")
        if annotation is not str and isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r} must be {annotation.__name__}, got {value!r}")
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} must be {annotation.__name__}, got {value!r}") from None
    return value


def upgrade_config_dict(values: dict[str, Any], warn: bool = False) -> dict[str, Any]:
    """A (top-level) configuration dict with the names of today for those of ddcnn 0.1 (:data:`RENAMED_KEYS`,
    :data:`RENAMED_METHODS`), so that its YAML files and checkpoints still load and resume."""
    upgraded = {}
    for key, value in values.items():
        if key in RENAMED_KEYS and warn:
            log.warning("warning: config key %s is called %s now; rename it", key, RENAMED_KEYS[key])
        upgraded[RENAMED_KEYS.get(key, key)] = value
    if upgraded.get("method") in RENAMED_METHODS:
        if warn:
            log.warning("warning: method %s is called %s now", upgraded["method"], RENAMED_METHODS[upgraded["method"]])
        upgraded["method"] = RENAMED_METHODS[upgraded["method"]]
    return upgraded


def config_from_dict(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are a ConfigError naming the known ones; names of
    ddcnn 0.1 are read as today's (:func:`upgrade_config_dict`)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not prefix:
        values = upgrade_config_dict(values, warn=True)
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys{' of ' + prefix[:-1] if prefix else ''}: "
            f"{', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated later by :func:`config_from_dict`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data
