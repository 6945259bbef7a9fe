"""Signals: SIGTERM (a cluster's pre-emption) and SIGINT become a flag the training loop checks between steps, and
the loop ends with :class:`TrainingInterrupted` after saving a checkpoint."""

from __future__ import annotations

import signal
from typing import Any

from ..errors import DDCNNError


class TrainingInterrupted(DDCNNError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """Turns SIGTERM/SIGINT into a flag that the loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
