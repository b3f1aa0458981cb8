"""``enorm inspect`` as a user calls it: tables, files, figures and bad inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, invoke, one_error_line
from PIL import Image
from safetensors.torch import save_file


def test_without_data_shows_stored_ratios(finetuned: Path) -> None:
    result = invoke("inspect", str(finetuned))
    assert result.exit_code == 0, result.stderr
    assert "mean±std" in result.stdout and "stored at the checkpoint's last eval" in result.stdout
    assert "dominant normalizer: bn (" in result.stdout


def test_with_data_writes_json_csv_and_plot(
    finetuned: Path, image_classes: Path, tmp_path: Path
) -> None:
    files = {name: tmp_path / name for name in ("rows.json", "rows.csv", "ratios.png")}
    args = [
        "inspect",
        str(finetuned),
        "--data",
        str(image_classes / "val"),
        "--samples",
        "12",
        "--workers",
        "0",
        "--by-class",
        "--json",
        str(files["rows.json"]),
        "--csv",
        str(files["rows.csv"]),
        "--plot",
        str(files["ratios.png"]),
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    assert "classes whose ratios differ most: class" in result.stdout
    rows = json.loads(files["rows.json"].read_text())
    assert {row["class_name"] for row in rows} == {"class0", "class1", "class2"}
    assert all(abs(row["bn"] + row["in"] + row["ln"] - 1) < 1e-4 for row in rows)
    with open(files["rows.csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with Image.open(files["ratios.png"]) as image:
        assert (
            image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 900
        )  # three panels
    again = invoke(*args)  # files exist: refused without --force, and left alone
    one_error_line(again, "--force")
    assert json.loads(files["rows.json"].read_text()) == rows


def test_json_to_stdout_is_only_json(finetuned: Path) -> None:
    result = invoke("inspect", str(finetuned), "--json", "-")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows and all(abs(sum(row[n] for n in ("bn", "in", "ln")) - 1) < 1e-4 for row in rows)


def test_bad_inputs(finetuned: Path, tmp_path: Path) -> None:
    import torch

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        (["inspect", str(foreign)], "not an enorm checkpoint"),
        (["inspect", str(corrupt)], "not a readable .safetensors"),
        (["inspect", str(tmp_path / "none.safetensors")], "not found"),
        (["inspect", str(finetuned), "--samples", "0"], "--samples must be a positive integer"),
        (["inspect", str(finetuned), "--by-class"], "--by-class needs images"),
        (["inspect", str(finetuned), "--data", str(tmp_path / "nowhere")], "is not a directory"),
        (["inspect", str(finetuned), "--data", str(empty_dir)], "holds no images"),
        (["inspect", str(finetuned), "--plot", str(tmp_path / "p.jpg")], "must end in .png"),
    ]
    for args, expected in cases:
        one_error_line(invoke(*args), expected)


@pytest.mark.slow
def test_subprocess_without_data(finetuned: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "enorm_cli", "inspect", str(finetuned), "--csv", "-"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert (
        rows
        and rows[0]["layer"]
        and abs(sum(float(rows[0][n]) for n in ("bn", "in", "ln")) - 1) < 1e-4
    )
    assert not (ROOT / "-").exists()


@pytest.mark.slow
def test_piped_output_at_80_columns_keeps_every_ratio(tmp_path: Path, image_classes: Path) -> None:
    """``enorm inspect ... | cat``: rich renders 80 columns; no ratio may be cut to '0.9…'."""
    import os
    import re

    ckpt = tmp_path / "gn.safetensors"  # K = 4 and long layer names: the widest table there is
    invoke(
        "convert",
        "test_efficientnet_gn",
        "--no-pretrained",
        "--normalizers",
        "bn,in,ln,gn",
        "--out",
        str(ckpt),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    for extra in (
        [],
        ["--data", str(image_classes / "val"), "--samples", "6", "--workers", "0", "--by-class"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "enorm_cli", "inspect", str(ckpt), *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        table = [
            line
            for line in proc.stdout.splitlines()
            if "blocks." in line or line.startswith(" bn1")
        ]
        assert table and max(len(line) for line in proc.stdout.splitlines() if "±" in line) <= 80
        assert "…" not in "\n".join(table), proc.stdout
        cells = re.findall(r"\d\.\d+±\d\.\d+", proc.stdout)
        assert len(cells) == 13 * 4  # every layer, every normalizer
        assert all(len(c.split("±")[0].split(".")[1]) >= 2 for c in cells)
