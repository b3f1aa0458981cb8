"""A run's output names, its complete states, and the checks before a run starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from enorm_cli.errors import EnormError
from enorm_cli.finetune.progress import TrainingProgress
from enorm_cli.finetune.run_layout import RunLayout


def _state(layout: RunLayout, step: int, complete: bool = True) -> Path:
    state = layout.state(step)
    state.mkdir(parents=True)
    if complete:
        TrainingProgress(global_step=step).save(layout.progress_file(state))
    return state


def test_latest_state_passes_over_a_partial_one(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.latest_state() is None
    _state(layout, 9)
    newest = _state(layout, 10)
    _state(layout, 11, complete=False)  # killed while saving
    assert layout.state(10).name == "step_00000010"
    assert layout.latest_state() == newest
    layout.prune_states(keep=2)
    assert [p.name for p in layout.saved_states()] == ["step_00000010", "step_00000011"]


def test_check_and_clear(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(EnormError, match="no saved state"):
        layout.check(resume=True, force=False)
    layout.check(resume=False, force=False)  # a new folder
    layout.root.mkdir()
    layout.config.write_text("x: 1\n")
    layout.metrics.write_text("{}\n")
    _state(layout, 3)
    with pytest.raises(EnormError, match="already holds a run"):
        layout.check(resume=False, force=False)
    layout.check(resume=True, force=False)
    layout.clear()
    assert not layout.metrics.exists() and not layout.states.exists() and layout.config.exists()


def test_training_progress_round_trip(tmp_path: Path) -> None:
    progress = TrainingProgress(epoch=2, batch=5, global_step=41, best_top1=77.5)
    progress.save(tmp_path / "progress.json")
    assert TrainingProgress.load(tmp_path / "progress.json") == progress
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temp file left
