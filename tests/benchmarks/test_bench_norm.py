"""Smoke runs of the cost benchmarks: they run and report every variant (no timing is checked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_norm  # noqa: E402
from benchmarks.official_sn import OfficialSwitchNorm2d, swap_in_official_sn  # noqa: E402


def test_layer_microbenchmark_reports_every_variant(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_norm, "LAYER_SHAPES", [(2, 8, 4, 4), (4, 16, 1, 1)])
    out = tmp_path / "layers.json"
    assert bench_norm.main(["--layers", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["layers"]
    assert [r["shape"] for r in rows] == [[2, 8, 4, 4], [4, 16, 1, 1]]
    for row in rows:
        assert all(row[f"{k}_ms"] > 0 for k in ("bn", "sn", "sn_official", "en"))


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_interleaving_is_balanced_so_no_variant_always_follows_the_same_one(n: int) -> None:
    from collections import Counter

    keys = [f"v{i}" for i in range(n)]
    cycle = n if n % 2 == 0 else 2 * n
    orders = [bench_norm.balanced_order(keys, rep) for rep in range(cycle)]
    assert all(sorted(order) == keys for order in orders)
    leads = Counter(order[0] for order in orders)
    assert set(leads) == set(keys) and len(set(leads.values())) == 1
    pairs = Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1


def test_official_sn_swap_keeps_timm_norm_act_tails() -> None:
    import timm

    model = swap_in_official_sn(timm.create_model("test_efficientnet", num_classes=5))
    assert any(isinstance(m, OfficialSwitchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.train()
    out = model(torch.randn(2, 3, 64, 64))  # no 1x1 maps: there the official code gives NaN
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.slow  # two torchrun processes
def test_synced_benchmark_under_torchrun(tmp_path: Path) -> None:
    """Two real gloo processes: BN and EN, per-process and synced, all four timed."""
    import os
    import subprocess

    out = tmp_path / "synced.json"
    from helpers import torchrun

    cmd = [
        *torchrun(2),
        str(ROOT / "benchmarks" / "bench_norm.py"),
        "--synced",
        "--mode",
        "smoke",
        "--reps",
        "2",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["processes"] == 2
    (row,) = data["synced"]
    assert set(row["train_s"]) == {"bn", "bn_synced", "en", "en_synced"}
    assert all(t > 0 for t in row["train_s"].values())
    assert "excess" in row and "EN / BN per process" in proc.stdout


def test_synced_mode_says_how_to_launch() -> None:
    assert bench_norm.main(["--synced"]) == 2
