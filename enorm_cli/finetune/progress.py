"""Where a run stands, saved with each resumable state (as torchtune's ``TrainingProgress``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..fileio import write_text_atomic


@dataclass
class TrainingProgress:
    """The loop's position and what it has learned of the run so far.

    ``epoch`` and ``batch`` say where a saved state resumes: ``batch`` counts the batches of
    ``epoch`` already done, so a state saved at an epoch's last batch resumes into that
    epoch with no batches left, and its eval and checkpoints still happen.
    """

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    metrics_rows: int | None = None
    """Lines of metrics.jsonl written so far: a resumed run keeps exactly these."""
    loss_window: list[float] = field(default_factory=list)
    """Step losses since the last metrics record (its mean is the next record's loss)."""

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> TrainingProgress:
        """A saved record; fields a state from an older enorm lacks keep their defaults."""
        data = json.loads(Path(path).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
