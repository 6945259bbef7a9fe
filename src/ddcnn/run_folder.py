"""The run folder (``--out``): one run at a time, resumed only with the configuration it was started with, its
outputs written atomically and kept across phases.

* **One run per folder.** A run holds an exclusive lock on ``<out>/.ddcnn.lock`` (``flock``) while it writes
  there; a second run in the same folder is refused with the first one's process id. The kernel releases the lock
  when the process ends, however it ends (SIGKILL, OOM), so a killed run never leaves the folder locked.
* **Resume refuses a changed configuration.** ``--resume`` compares the configuration recorded in the checkpoint it
  continues with the new one and refuses any difference, naming the keys, except those in :data:`SAFE_TO_CHANGE`
  (where the run happens and how it reports, not what it computes). The epochs may change too where the schedule
  is ``constant`` (then training longer is the same run continued); under any other schedule they fix the
  learning rate of every step and are refused. A phase that another one builds on (the local phase under the
  aggregation phase or transfer learning) is compared on the keys it depends on only.
* **Atomic outputs.** Every file is written whole or not at all (:func:`~ddcnn.checkpoint.atomic_file`):
  a full disk ends the run with one line and leaves the previous complete files.
* **Results kept across phases.** ``results.json`` has one row per phase run in the folder (``rows``, latest
  last), and each phase's configuration and per-epoch history (``phases``): ``train --method aggregation`` after
  ``train --method local`` into the same ``--out`` adds its row and keeps the local phase's.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, ensure_writable_folder
from .config import RunConfig, config_to_dict, upgrade_config_dict
from .errors import ConfigError, DDCNNError

log = logging.getLogger(__name__)

LOCK_NAME = ".ddcnn.lock"
RESULTS_SCHEMA = 2  # 1: the first release's results.json of one phase (read and converted)

# keys that do not change what a run computes: where it runs, how it reports, where it reads its cache
SAFE_TO_CHANGE = frozenset({
    "out", "resume", "train.device", "train.threads", "train.progress", "train.checkpoint_every",
    "train.dist_timeout", "data.cache_dir", "data.num_workers", "data.max_memory_gb", "data.eval_batch_size",
})
# keys that may change where the schedule is constant: more epochs continue the same run
EPOCH_KEYS = frozenset({"train.epochs", "local_epochs", "aggregator_epochs"})
# keys that only the phases after the local phase read: the local phase's checkpoint does not depend on them
LATER_PHASE_KEYS = frozenset({
    "method", "pretrained", "model.aggregator", "model.dnn_hidden", "model.dnn_activation", "model.dnn_dropout",
    "model.dnn_batchnorm", "aggregator_epochs", "aggregator_inputs", "augmented_passes", "transfer_aggregator",
    "aggregator_batch_size", "aggregator_lr",
})
FIRST_PHASES = ("global", "local")  # and crossfit<j>, local phases on folds of the training images

_held: dict[Path, tuple[int, int]] = {}  # lock path -> (file descriptor, nesting depth) of this process


# -- one run per folder -----------------------------------------------------------------------------------------


@contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the run folder ``folder`` (created if needed) for this process; a :class:`DDCNNError` if another
    process holds it. Re-entrant within a process (``ddcnn train`` locks before logging, then ``run`` again)."""
    folder = ensure_writable_folder(folder)
    path = (folder / LOCK_NAME).resolve()
    if path in _held:
        fd, depth = _held[path]
        _held[path] = fd, depth + 1
    else:
        _held[path] = _acquire(path), 1
    try:
        yield folder
    finally:
        fd, depth = _held[path]
        if depth > 1:
            _held[path] = fd, depth - 1
        else:
            del _held[path]
            os.close(fd)  # releases the lock


def _acquire(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DDCNNError(
            f"run folder {path.parent} is in use by another ddcnn run (process {holder}); wait for it to end, "
            "or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


# -- resume -----------------------------------------------------------------------------------------------------


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_conflicts(
    recorded: dict[str, Any], current: dict[str, Any], ignored: Iterable[str] = (), defaults: dict[str, Any] | None = None
) -> list[str]:
    """The (flat) keys whose values differ between two configurations, less :data:`SAFE_TO_CHANGE` and
    ``ignored``. A key the ``recorded`` one lacks (an option added since) counts as its value in ``defaults``."""
    old, new = flat_config(upgrade_config_dict(recorded)), flat_config(current)
    old = {**{k: v for k, v in flat_config(defaults or {}).items() if k in new}, **old}
    skip = SAFE_TO_CHANGE | set(ignored)
    return sorted(k for k in old.keys() | new.keys() if k not in skip and old.get(k) != new.get(k))


def resume_conflicts(recorded: dict[str, Any], current: dict[str, Any], phase: str) -> list[str]:
    """The keys that differ between the ``recorded`` configuration of a checkpoint of ``phase`` and the
    ``current`` one and that the checkpoint depends on (see the module docstring)."""
    ignored: set[str] = set()
    if phase in FIRST_PHASES or phase.startswith("crossfit"):
        ignored |= LATER_PHASE_KEYS
    if recorded.get("train", {}).get("schedule") == current.get("train", {}).get("schedule") == "constant":
        ignored |= EPOCH_KEYS
    return config_conflicts(recorded, current, ignored, defaults=config_to_dict(RunConfig()))


def check_resume(recorded: dict[str, Any] | None, cfg: RunConfig, phase: str, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` (of ``phase``) under ``cfg`` if a key it depends on changed."""
    if not recorded:
        raise ConfigError(
            f"{checkpoint} records no configuration, so --resume cannot check that it continues the same run; "
            "start a new run without --resume"
        )
    current = config_to_dict(cfg)
    conflicts = resume_conflicts(recorded, current, phase)
    if conflicts:
        old, new = flat_config(upgrade_config_dict(recorded)), flat_config(current)
        changes = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in conflicts[:4])
        more = f" and {len(conflicts) - 4} more" if len(conflicts) > 4 else ""
        raise ConfigError(
            f"--resume of {checkpoint} with a changed configuration: {changes}{more}; run again with the options it "
            "was started with (see config.yaml there), or without --resume into another --out"
        )


# -- outputs ----------------------------------------------------------------------------------------------------


def write_config(cfg: RunConfig, run_dir: Path) -> Path:
    """``config.yaml``: the resolved configuration of the latest run in the folder."""
    import yaml

    path = run_dir / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def read_results(run_dir: Path) -> dict[str, Any]:
    """The folder's ``results.json`` as ``{"rows", "phases", ...}``; empty if there is none, and converted if it
    is of the first release (one phase). An unreadable one is set aside as ``results.json.unreadable``."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {"rows": [], "phases": {}}
    try:
        results = json.loads(path.read_text())
        if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
            raise ValueError("no rows")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        aside = path.with_name("results.json.unreadable")
        os.replace(path, aside)
        log.warning("%s could not be read (%s); moved to %s, starting a new one", path, e, aside.name)
        return {"rows": [], "phases": {}}
    if "phases" not in results:  # the first release: one phase, its config and history at the top
        rows = results["rows"]
        name = rows[0]["method"] if rows else "unknown"
        results["phases"] = {name: {"config": results.pop("config", {}), "history": results.pop("history", [])}}
    return results


def write_results(
    run_dir: Path, row: dict[str, Any], config: dict[str, Any], history: list[dict[str, Any]], dataset: dict
) -> Path:
    """Add one phase's ``row`` (and its configuration and history) to the folder's ``results.json``, replacing
    the row of an earlier run of the same phase and grid and keeping every other phase's."""
    results = read_results(run_dir)
    rows = [r for r in results["rows"] if (r.get("method"), r.get("grid")) != (row["method"], row["grid"])]
    phases = {k: v for k, v in results["phases"].items() if k != row["method"]}
    from .runtime import provenance  # torch: imported where a result is written, not with the resume checks

    made = provenance(config.get("train", {}).get("device"))  # of this phase, and at the top of the last written
    phases[row["method"]] = {"config": config, "history": history, "provenance": made}
    payload = {
        "schema": RESULTS_SCHEMA, "provenance": made, "dataset": dataset, "rows": [*rows, row], "phases": phases
    }
    path = run_dir / "results.json"
    atomic_write_text(path, json.dumps(payload, indent=2))
    return path
