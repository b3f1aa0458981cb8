"""The results record: one schema for every file, and every results block renders from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results  # noqa: E402

RECORDS = sorted(results.RESULTS.glob("*.json"))


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_every_record_has_the_schema(path: Path) -> None:
    record = json.loads(path.read_text())
    assert record["schema"] == results.SCHEMA and record["benchmark"] == path.stem
    assert record["command"] and record["commit"] and record["date"] and record["figures"]
    assert {"cpu", "cores", "threads", "torch"} <= set(record["machine"])


@pytest.mark.parametrize("block", sorted(results.BLOCKS))
def test_every_block_renders_a_table_naming_its_record(block: str) -> None:
    text = results.render(block)
    record = results.BLOCKS[block][0]
    assert text.startswith("|") and f"benchmarks/results/{record}.json" in text


def test_a_record_from_a_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 1, "loss": 2.0, "images_per_s": 100.0},
        {"step": 2, "loss": 1.0, "images_per_s": 300.0},
        {"step": 2, "eval": True, "top1": 55.5, "samples": 64},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr(results, "RESULTS", tmp_path / "results")
    assert results.main(["quickstart", "--command", "x", "--run", str(run), "--threads", "1"]) == 0
    record = results.load("quickstart")
    assert record["figures"]["top1"] == 55.5 and record["figures"]["images_per_s"] == 200.0
    assert record["machine"]["threads"] == 1 and results.quickstart_table(record).startswith("|")
