"""benchmarks/compile_finetune.py end to end, on a few steps (aot_eager: no kernel builds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compile_finetune  # noqa: E402


@pytest.mark.slow
def test_eager_and_compiled_runs_give_rates_and_a_compile_time(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    out = tmp_path / "compile.json"
    args = ["--norms", "bn", "--images", "64", "--batch", "16", "--backend", "aot_eager"]
    assert compile_finetune.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["norm"], r["compile"], r["steps"]) for r in result["runs"]] == [
        ("bn", False, 4),
        ("bn", True, 4),
    ]
    (summary,) = result["summary"]
    assert summary["eager_images_per_s"] > 0 and summary["compiled_images_per_s"] > 0
    assert summary["speedup"] > 0 and summary["compile_s"] > 0  # tracing takes time
