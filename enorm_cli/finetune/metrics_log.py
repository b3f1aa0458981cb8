"""metrics.jsonl: one JSON object per line (train steps and evals), main process only."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..faults import write_fault
from ..fileio import write_text_atomic
from .progress import TrainingProgress
from .trackers import scalars


class MetricsLog:
    """Appends records to metrics.jsonl; ``tracker`` (Accelerate's ``log``) gets the same
    numbers (``trackers.scalars``).

    A new run starts the file afresh; a resumed one keeps the records its state had seen
    (``TrainingProgress.metrics_rows``; a state from an older enorm: those up to its step)
    and drops those the resumed run will write again. ``rows`` counts the file's records.
    """

    def __init__(
        self,
        path: Path,
        enabled: bool,
        resume: TrainingProgress | None,
        tracker: Callable[..., None] | None = None,
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.tracker = tracker
        self.rows = 0
        if not enabled or not path.exists():
            return
        if resume is None:
            path.unlink()
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if resume.metrics_rows is not None:
            kept = lines[: resume.metrics_rows]
        else:
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume.global_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.rows = len(kept)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record: whole, or not at all (a failed append is cut back off)."""
        self.rows += 1
        if self.enabled:
            line = json.dumps(record) + "\n"
            size = self.path.stat().st_size if self.path.exists() else 0
            try:
                with open(self.path, "a") as f:
                    try:
                        write_fault("metrics")
                    except OSError:  # tests: the disk fills mid-record
                        f.write(line[: len(line) // 2])
                        raise
                    f.write(line)
            except BaseException:
                self.rows -= 1
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
                raise
        if self.tracker is not None:  # Accelerate logs on the main process only
            self.tracker(scalars(record), step=record["step"])
