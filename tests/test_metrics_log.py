"""metrics.jsonl: a new run starts afresh, a resumed one keeps what it will not redo."""

from __future__ import annotations

import json
from pathlib import Path

from enorm_cli.metrics_log import MetricsLog


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_keeps_records_up_to_its_step_and_trackers_get_the_same(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True, keep_until_step=None)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step})
    seen: list[tuple[dict, int]] = []
    resumed = MetricsLog(
        path, enabled=True, keep_until_step=20, tracker=lambda d, step: seen.append((d, step))
    )
    assert _steps(path) == [10, 20]
    resumed.write({"step": 30, "loss": 0.5, "eval": True, "top1": 50.0})
    assert _steps(path) == [10, 20, 30] and seen and seen[0][1] == 30
    MetricsLog(path, enabled=True, keep_until_step=None)
    assert not path.exists()
    quiet = MetricsLog(tmp_path / "other.jsonl", enabled=False, keep_until_step=None)
    quiet.write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()
