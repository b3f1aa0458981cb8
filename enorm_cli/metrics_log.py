"""metrics.jsonl: one JSON object per line (train steps and evals), main process only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fileio import write_text_atomic
from .trackers import scalars


class MetricsLog:
    """Appends records to metrics.jsonl; ``tracker`` (Accelerate's ``log``) gets the same
    numbers (``trackers.scalars``).

    A new run starts the file afresh; a resumed one keeps the records up to the step it
    resumes from and drops those the resumed run will write again.
    """

    def __init__(
        self,
        path: Path,
        enabled: bool,
        keep_until_step: int | None,
        tracker: Callable[..., None] | None = None,
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.tracker = tracker
        if enabled and keep_until_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
            ]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        elif enabled and keep_until_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracker is not None:  # Accelerate logs on the main process only
            self.tracker(scalars(record), step=record["step"])
