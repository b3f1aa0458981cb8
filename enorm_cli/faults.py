"""Fault injection for the resume and fault-matrix tests; unset (always, outside tests), each
point is one dictionary lookup.

``ENORM_CRASH_AT=POINT:N`` kills this process with SIGKILL the N-th time it reaches POINT, as
a cluster's OOM killer or a lost node would. Points: ``step`` (after an optimizer step),
``eval`` (after the first eval batch), ``save`` (inside a state save, after Accelerate's
files and before the progress file that marks the state complete).

``ENORM_WRITE_FAULT=KIND:N:ERRNO[:RANK]`` makes the N-th write of KIND fail with ERRNO
(``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``, ``EIO``), as a full disk, a quota or a
read-only remount would, after part of it is written; with RANK, on that process only.
Kinds: ``state`` (a state save, after Accelerate's files), ``checkpoint`` (last/best
.safetensors, half written), ``metrics`` (a metrics.jsonl record, half appended).
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "ENORM_CRASH_AT"
WRITE_ENV = "ENORM_WRITE_FAULT"
_reached: dict[str, int] = {}
_writes: dict[str, int] = {}


def write_fault(kind: str) -> None:
    """Raise the ``OSError`` that ``ENORM_WRITE_FAULT`` names, if this is its write."""
    spec = os.environ.get(WRITE_ENV)
    if not spec:
        return
    name, nth, code, *rank = spec.split(":")
    if name != kind or (rank and rank[0] != os.environ.get("RANK", "0")):
        return
    _writes[kind] = _writes.get(kind, 0) + 1
    if _writes[kind] == int(nth):
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number))


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
