"""Smoke run of the evidence comparison: real enorm finetune subprocesses, one seed, tiny subset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_norms  # noqa: E402
import plot_evidence  # noqa: E402


@pytest.mark.slow
def test_smoke_compare_bn_sn_en_and_plot(tmp_path: Path) -> None:
    results = tmp_path / "smoke.json"
    assert (
        compare_norms.main(
            [
                "--setting",
                "smoke",
                "--seeds",
                "0",
                "--variants",
                "bn",
                "sn",
                "en",
                "en_relu",
                "--out",
                str(tmp_path / "runs"),
                "--json",
                str(results),
            ]
        )
        == 0
    )
    summary = json.loads(results.read_text())["summary"]
    assert [r["variant"] for r in summary] == ["bn", "sn", "en", "en_relu"]
    assert all(0 <= r["top1_mean"] <= 100 and len(r["top1"]) == 1 for r in summary)
    config = (tmp_path / "runs" / "smoke-sn-seed0" / "config.yaml").read_text()
    assert "norm: sn" in config
    png = tmp_path / "e.png"
    assert plot_evidence.main([str(results), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
