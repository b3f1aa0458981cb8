"""The selection benchmark's pieces: the shifted split, the AUC, and a tiny run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import selection  # noqa: E402


def test_auc_is_the_rank_statistic() -> None:
    positive = torch.tensor([False, False, True, True])
    assert selection.auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), positive) == 1.0
    assert selection.auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), positive) == 0.0
    assert selection.auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), positive) == 0.5


def test_half_of_the_images_are_shifted_the_same_way_every_time() -> None:
    a = selection.shifted_split(False, 64)
    b = selection.shifted_split(False, 64)
    assert torch.equal(a["x"], b["x"]) and int(a["shifted"].sum()) == 32
    assert (a["a"][~a["shifted"]] == 1).all() and (a["b"][~a["shifted"]] == 0).all()
    assert a["x"].shape == (64, 3, 32, 32)


@pytest.mark.slow
def test_a_tiny_run_writes_its_record_and_figure(tmp_path: Path) -> None:
    out, figure = tmp_path / "s.json", tmp_path / "s.png"
    args = ["--variants", "bn", "en", "--regimes", "finetune", "scratch", "--train", "128"]
    args += ["--test", "64", "--epochs", "1", "1", "--json", str(out), "--figure", str(figure)]
    assert selection.main([*args, "--save", str(tmp_path / "models")]) == 0
    record = json.loads(out.read_text())
    assert {(r["regime"], r["variant"]) for r in record["runs"]} == {
        (g, v) for g in ("finetune", "scratch") for v in ("bn", "en")
    }
    en = next(r for r in record["runs"] if r["variant"] == "en")
    assert len(en["layers"]) == 52 and 0 <= en["best_auc_in"] <= 1
    assert {"logit_std", "saturated", "gamma_rel", "gap_in_ln"} <= set(en["layers"][0])
    assert figure.stat().st_size > 0
    from enorm_cli import ExemplarNorm2d, load_model

    saved = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert saved == ["finetune-en-s0.safetensors", "scratch-en-s0.safetensors"]  # not BN
    layers = [
        m
        for m in load_model(tmp_path / "models" / saved[1]).modules()
        if isinstance(m, ExemplarNorm2d)
    ]
    assert len(layers) == 52 and all(m.anchored for m in layers)  # from scratch: anchored
