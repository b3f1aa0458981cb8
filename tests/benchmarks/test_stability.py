"""Smoke run of the stability grid: the real fine-tuning code, one cell per variant, tiny data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import stability  # noqa: E402


@pytest.mark.slow
def test_smoke_grid_writes_json_checks_and_heat_map(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    assert stability.main(["--grid", "smoke", "--out", str(out)]) == 0
    data = json.loads((out / "stability.json").read_text())
    assert sorted(r["variant"] for r in data["runs"]) == sorted(stability.DEFAULT_VARIANTS)
    assert all(0 <= r["top1"] <= 100 and r["steps"] == 4 for r in data["runs"])
    assert len(data["checks"]) == 3 and all(c.startswith(("PASS", "FAIL")) for c in data["checks"])
    config = (out / "bn_frozen-b4-lr0.01-s0" / "config.yaml").read_text()
    assert "bn_stats: running" in config and "norm: bn" in config
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checks_flag_collapse_and_a_small_batch_gap() -> None:
    runs = [
        {"variant": "bn", "batch": 4, "lr": 0.01, "top1": 60.0},
        {"variant": "en", "batch": 4, "lr": 0.01, "top1": 12.0},
        {"variant": "bn_frozen", "batch": 4, "lr": 0.01, "top1": 30.0},
        {"variant": "bn", "batch": 128, "lr": 0.05, "top1": 70.0},
        {"variant": "en", "batch": 128, "lr": 0.05, "top1": 69.5},
    ]
    lines = stability.check(runs)
    assert lines[0].startswith("FAIL") and "(4, 0.01)" in lines[0]
    assert lines[1].startswith("FAIL") and "(4, 0.01, -48.0)" in lines[1]
    assert lines[2].startswith("FAIL batch 4")
    runs[1]["top1"] = 64.0
    assert [line[:4] for line in stability.check(runs)] == ["PASS", "PASS", "PASS"]


def test_a_diverged_run_counts_as_not_learning() -> None:
    runs = [
        {
            "variant": "bn",
            "batch": 4,
            "lr": 0.05,
            "top1": None,
            "diverged": "loss became nan at step 61",
        },
        {"variant": "en", "batch": 4, "lr": 0.05, "top1": 11.0},
        {"variant": "bn", "batch": 16, "lr": 0.05, "top1": 40.0},
        {"variant": "en", "batch": 16, "lr": 0.05, "top1": None},
    ]
    lines = stability.check(runs)
    assert lines[0].startswith("FAIL") and "(16, 0.05)" in lines[0] and "(4, 0.05)" not in lines[0]
    assert "NaN loss" in stability.table(runs, ["bn", "en"])


def test_the_heat_map_title_counts_runs_per_cell_not_seeds_overall() -> None:
    def run(variant: str, batch: int, seed: int) -> dict[str, object]:
        return {"variant": variant, "batch": batch, "lr": 0.01, "seed": seed, "top1": 50.0}

    three = [run(v, 4, s) for v in ("bn", "en") for s in range(3)]
    assert stability.seeds_label(three) == ", mean of 3 seeds"
    five_at_8 = three + [run(v, 8, s) for v in ("bn", "en") for s in range(5)]
    assert stability.seeds_label(five_at_8) == ", mean of 3-5 seeds per cell"
    assert stability.seeds_label([run("bn", 4, 0)]) == ""


@pytest.mark.parametrize("variant", sorted(stability.VARIANTS))
def test_every_variant_loads_on_the_minimal_recipe_with_adamw(variant: str) -> None:
    """A variant's overrides go through the schema, beside the grid's extra overrides (the
    AdamW grid's ``optim.name=adamw``), and keep the norm they name."""
    from enorm_cli.config.recipe import load_recipe

    overrides = ["optim.name=adamw", *stability.VARIANTS[variant]]
    recipe = load_recipe(ROOT / "benchmarks" / "recipes" / "minimal.yaml", overrides)
    assert recipe.optim.name == "adamw"
    assert f"model.norm={recipe.model.norm}" in stability.VARIANTS[variant]
