"""Fault injection for the resume tests: ``ENORM_CRASH_AT=POINT:N`` kills this process with
SIGKILL the N-th time it reaches POINT, as a cluster's OOM killer or a lost node would.

Points: ``step`` (after an optimizer step), ``eval`` (after the first eval batch), ``save``
(inside a state save, after Accelerate's files and before the progress file that marks the
state complete). Unset (always, outside tests), ``crash_point`` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "ENORM_CRASH_AT"
_reached: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Die here if ``ENORM_CRASH_AT`` names this point and this is its N-th visit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
