"""Every file a fine-tuning run writes under its ``output_dir``, named in one place.

```
OUTPUT_DIR/
  config.yaml          the resolved recipe
  metrics.jsonl        one JSON object per logged step and per eval
  last.safetensors     the model after the latest eval; best.safetensors: the best top-1
  logs/                Accelerate trackers (tensorboard --logdir OUTPUT_DIR/logs)
  state/step_NNNNNNNN/ resumable states, each written into .step_NNNNNNNN.partial/ and
                       renamed when complete (progress.json in it)
```
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import EnormError

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run's outputs."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def logs(self) -> Path:
        """Trackers' local files (TensorBoard: ``tensorboard --logdir OUTPUT_DIR/logs``)."""
        return self.root / "logs"

    @property
    def states(self) -> Path:
        return self.root / "state"

    def state(self, global_step: int) -> Path:
        """The resumable state saved after ``global_step`` optimizer steps."""
        return self.states / f"step_{global_step:08d}"

    @staticmethod
    def progress_file(state: Path) -> Path:
        """A state's progress record; it is written last, so it marks the state complete."""
        return state / PROGRESS_FILE

    def partial_state(self, global_step: int) -> Path:
        """Where that state is written; renamed to ``state`` once complete, so a folder named
        step_* is always whole (older enorms marked completeness with the progress file alone,
        which ``latest_state`` still checks)."""
        return self.states / f".step_{global_step:08d}.partial"

    def remove_partial_states(self) -> None:
        """Remove the partial folders a kill during a save left."""
        for partial in self.states.glob(".step_*.partial"):
            self.remove(partial)

    @staticmethod
    def remove(path: Path) -> None:
        """Remove a folder or file if it is there."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def saved_states(self) -> list[Path]:
        """Every state folder, complete or not, oldest first."""
        return sorted(self.states.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))

    def latest_state(self) -> Path | None:
        """The newest complete state (a partial one, from a kill during a save, is passed over)."""
        complete = [p for p in self.saved_states() if self.progress_file(p).is_file()]
        return complete[-1] if complete else None

    def prune_states(self, keep: int) -> None:
        """Remove all but the newest ``keep`` states."""
        for old in self.saved_states()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def check(self, resume: bool, force: bool) -> None:
        """Resume needs a saved state; a new run does not overwrite an old one without force."""
        if resume:
            if self.latest_state() is None:
                raise EnormError(
                    f"--resume: no saved state under {str(self.states)!r}: start without --resume"
                )
        elif (self.config.exists() or self.states.exists()) and not force:
            raise EnormError(
                f"output_dir {str(self.root)!r} already holds a run: pass --resume to continue it, "
                "--force to start over, or set output_dir=another/path"
            )

    def clear(self) -> None:
        """Remove an earlier run's outputs (a forced new run); config.yaml is rewritten anyway."""
        for stale in (self.states, self.logs, self.metrics, self.last, self.best):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
