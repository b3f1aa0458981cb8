"""Preemption: SIGTERM or SIGUSR1 (what SLURM and spot instances send before they kill a
job) asks training to finish its step, save a resumable state and exit with
``Preempted.exit_code``; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after saving a state; the message says how to resume."""

    exit_code = 75  # EX_TEMPFAIL: try again later (with --resume)


class PreemptionGuard:
    """Within the block, the first SIGTERM/SIGUSR1 sets ``signal_name``; the loop polls it."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None:  # the second signal: no more waiting
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
