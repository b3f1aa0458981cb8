"""metrics.jsonl: a new run starts afresh, a resumed one keeps what its state had seen."""

from __future__ import annotations

import json
from pathlib import Path

from enorm_cli.finetune.metrics_log import MetricsLog
from enorm_cli.finetune.progress import TrainingProgress


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_keeps_the_rows_its_state_counted_and_trackers_get_the_same(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True, resume=None)
    for step in (10, 20, 20, 30):  # a train record and an eval record at step 20
        log.write({"step": step, "loss": 1.0 / step})
    assert log.rows == 4
    seen: list[tuple[dict, int]] = []
    state = TrainingProgress(global_step=20, metrics_rows=2)  # saved before step 20's eval
    resumed = MetricsLog(path, True, state, tracker=lambda d, step: seen.append((d, step)))
    assert _steps(path) == [10, 20] and resumed.rows == 2
    resumed.write({"step": 20, "loss": 0.5, "eval": True, "top1": 50.0})
    assert _steps(path) == [10, 20, 20] and seen and seen[0][1] == 20 and resumed.rows == 3
    older = MetricsLog(path, True, TrainingProgress(global_step=10))  # no row count: by step
    assert _steps(path) == [10] and older.rows == 1
    MetricsLog(path, enabled=True, resume=None)
    assert not path.exists()
    quiet = MetricsLog(tmp_path / "other.jsonl", enabled=False, resume=None)
    quiet.write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()
