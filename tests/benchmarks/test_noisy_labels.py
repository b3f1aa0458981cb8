"""Smoke run of the noisy-label grid and the appearance-shift evaluation of its clean models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import appearance_shift  # noqa: E402
import noisy_labels  # noqa: E402


@pytest.mark.slow
def test_smoke_noisy_labels_then_shift(tmp_path: Path) -> None:
    runs, grid = tmp_path / "runs", tmp_path / "noisy.json"
    args = ["--setting", "smoke", "--seeds", "0", "--rates", "0", "0.6", "--variants", "bn", "en"]
    assert noisy_labels.main([*args, "--out", str(runs), "--json", str(grid)]) == 0
    record = json.loads(grid.read_text())
    assert len(record["runs"]) == 4 and len(record["summary"]) == 4
    for run in record["runs"]:
        assert len(run["top1_per_epoch"]) == 2  # an eval per epoch: last and best come from them
        assert run["top1_best"] == max(run["top1_per_epoch"])
        assert run["top1_last"] == run["top1_per_epoch"][-1]
    merged = tmp_path / "merged.json"
    figure = tmp_path / "noisy.png"
    merge = ["--merge", str(grid), "--json", str(merged), "--figure", str(figure)]
    assert noisy_labels.main(merge) == 0
    assert figure.stat().st_size > 10_000
    assert json.loads(merged.read_text())["summary"] == record["summary"]

    shift = tmp_path / "shift.json"
    args = ["--runs", str(runs), "--variants", "bn", "en", "--seeds", "0", "--kinds", "gamma"]
    args += ["--severities", "0", "5", "--limit", "16", "--samples", "8", "--json", str(shift)]
    assert appearance_shift.main([*args, "--figure", str(tmp_path / "shift.png")]) == 0
    result = json.loads(shift.read_text())
    assert {(r["variant"], r["severity"]) for r in result["runs"]} == {
        (v, s) for v in ("bn", "en") for s in (0, 5)
    }
    assert [r["severity"] for r in result["en_ratios"]] == [0, 5]
    assert "corr_ln_vs_shift" in result["en_ratios"][1]


@pytest.mark.slow  # one subprocess per script
def test_gpu_scripts_say_so_without_a_gpu() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the scripts measure instead")
    for cmd in (["bash", "benchmarks/gpu.sh"], [sys.executable, "benchmarks/cuda_check.py"]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "no CUDA device here" in proc.stdout, proc.stderr
