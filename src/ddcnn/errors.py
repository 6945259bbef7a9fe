"""Exception types. Every error a user can cause is a :class:`DDCNNError` with a one-line message that says what
is wrong and what to do; the CLI prints that line (no traceback unless ``--debug``) and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterable


class DDCNNError(Exception):
    """Base class of every error ddcnn raises on bad input or a failed run."""


class ConfigError(DDCNNError, ValueError):
    """A configuration value or YAML key is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """An unknown dataset, backbone, aggregator or method name."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DecompositionError(DDCNNError, ValueError):
    """A grid or overlap that cannot decompose the given image."""


class InputSizeError(DDCNNError, ValueError):
    """An input (image or subimage) too small, or of the wrong shape, for a model."""


class DatasetError(DDCNNError):
    """A dataset that cannot be read: missing folders, empty classes, bad arrays."""


class CorruptImageError(DatasetError):
    """An image file that cannot be decoded."""


class UnsupportedImageModeError(DatasetError):
    """An image whose mode (e.g. CMYK, I;16) ddcnn does not convert."""


class CheckpointError(DDCNNError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint of another backbone, grid or number of classes."""


class TrainingDivergedError(DDCNNError):
    """The loss became NaN or infinite."""


class UnsafeArchiveError(DatasetError):
    """An archive member that would be written outside the target folder."""


class ChecksumError(DatasetError):
    """A downloaded or given file whose checksum does not match."""


class DistributedError(DDCNNError):
    """A distributed run cannot start, or a process lost contact with the others (one died or hung)."""


class CacheNotWritableError(DDCNNError):
    """The cache folder (``--cache-dir``) cannot be created or written to."""


class DiskFullError(DDCNNError):
    """The disk or quota holding a folder ddcnn writes to is full (ENOSPC, EDQUOT)."""
