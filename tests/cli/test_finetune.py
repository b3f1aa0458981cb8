"""``enorm finetune`` and ``enorm eval`` as a user calls them, bad inputs included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import QUICK, invoke, one_error_line, tiny_recipe


def test_finetune_then_eval_agree(crops: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke(
        "finetune",
        "--recipe",
        str(QUICK),
        "--no-progress",
        *tiny_recipe(crops, out, "imagefolder", "schedule.epochs=1", "train.precise_bn=8"),
    )
    assert result.exit_code == 0, result.stderr
    assert "val top-1" in result.stdout
    # batch 4: the default bn_stats (auto) batch-renormalizes EN's bn member against the
    # source's statistics, says so, and keeps them (no precise BN)
    chose = "model.bn_stats=auto: renorm_frozen (bn statistics over 4 images per step, at most 8"
    assert chose in result.stdout
    assert result.stdout.count("precise BN: off with model.bn_stats=renorm_frozen") == 1
    assert "precise BN: running statistics" not in result.stdout
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    result = invoke("eval", str(out / "last.safetensors"), "--data", str(crops / "val"), "--json")
    assert result.exit_code == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["samples"] == 12 and evaluated["top1"] == pytest.approx(final["top1"])
    result = invoke(
        "eval",
        str(out / "last.safetensors"),
        "--recipe",
        str(QUICK),
        *tiny_recipe(crops, out, "filelist"),
    )
    assert result.exit_code == 0 and "top-1" in result.stdout


def test_finetune_bad_inputs(crops: Path, tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [")
    (crops / "info" / "gone.txt").write_text("train/none/1.png 0\n")
    (crops / "info" / "empty.txt").write_text("")
    out = str(tmp_path / "o")
    base = ["finetune", "--recipe", str(QUICK), "--no-progress"]
    cases = [
        (["finetune", "--recipe", str(tmp_path / "none.yaml")], "not found"),
        (["finetune", "--recipe", str(bad_yaml)], "not valid YAML"),
        ([*base, "optim.lrr=0.1"], "unknown override key"),
        ([*base, "optim.lr=fast"], "optim.lr"),
        (
            [*base, "data.kind=imagefolder", "data.root=/no/such", f"output_dir={out}"],
            "not a directory",
        ),
        ([*base, *tiny_recipe(crops, out, "filelist"), "data.train=info/missing.txt"], "not found"),
        (
            [*base, *tiny_recipe(crops, out, "filelist"), "data.train=info/gone.txt"],
            "1 of 1 listed images are missing",
        ),
        (
            [*base, *tiny_recipe(crops, out, "filelist"), "model.num_classes=2"],
            "labels outside 0..1",
        ),
        (
            [*base, *tiny_recipe(crops, out, "filelist"), "data.val=info/empty.txt"],
            "data.val is empty",
        ),
        ([*base, *tiny_recipe(crops, out, "filelist"), "--resume"], "no saved state"),
    ]
    for args, expected in cases:
        one_error_line(invoke(*args), expected)
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_eval_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    one_error_line(
        invoke("eval", str(tmp_path / "junk.safetensors"), "--data", "fashion_mnist"), "safetensors"
    )
    one_error_line(invoke("eval", str(tmp_path / "x.safetensors")), "exactly one of --data")
    one_error_line(
        invoke("eval", str(tmp_path / "x.safetensors"), "--data", str(tmp_path / "nodir")),
        "not a directory",
    )
