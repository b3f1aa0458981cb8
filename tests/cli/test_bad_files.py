"""Bad files, as users hand them to every command: one line each, nothing written.

Checkpoints cut short or not enorm's, a newer format, image folders with files that are not
images (skipped and counted) or in CMYK / 16 bits (converted), an empty class folder, a
recipe that is a directory, an output path that cannot be written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUICK, invoke, one_error_line, tiny_recipe, write_crops
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good enorm checkpoint and its bad siblings."""
    root = tmp_path_factory.mktemp("bad_ckpt")
    good = root / "good.safetensors"
    assert invoke("convert", "test_resnet", "--no-pretrained", "--out", str(good)).exit_code == 0
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"w": torch.zeros(2)}, str(root / "foreign.safetensors"))
    meta = dict(safe_open(str(good), framework="pt").metadata())
    newer = {**meta, "enorm.format_version": "99"}
    save_file(load_file(str(good)), str(root / "newer.safetensors"), metadata=newer)
    return {p.stem: p for p in root.glob("*.safetensors")}


BAD = [
    ("truncated", "re-create it"),
    ("garbage", "not a readable .safetensors"),
    ("foreign", "not an enorm checkpoint"),
    ("newer", "upgrade enorm"),
]


@pytest.mark.parametrize(("name", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoints_are_one_line_for_every_command(
    name: str, expected: str, checkpoints: dict[str, Path], tmp_path: Path, image_classes: Path
) -> None:
    ckpt = str(checkpoints[name])
    out = tmp_path / "out.onnx"
    one_error_line(invoke("inspect", ckpt), expected)
    one_error_line(invoke("eval", ckpt, "--data", str(image_classes / "val")), expected)
    one_error_line(invoke("export", ckpt, "--out", str(out)), expected)
    run = tmp_path / "run"
    one_error_line(
        invoke(
            "finetune",
            "--recipe",
            str(QUICK),
            "--no-progress",
            *tiny_recipe(image_classes, run, "imagefolder", f"model.name={ckpt}"),
        ),
        expected,
    )
    assert not out.exists() and not (run / "last.safetensors").exists()


def test_image_folder_with_odd_files_trains_converting_and_skipping(
    photo_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "odd"
    write_crops(photo_dir, root, per_class=4)
    train0 = root / "train" / "class0"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(train0 / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(train0 / "grey16.png")
    (train0 / "broken.png").write_bytes(b"this is not a png")
    (train0 / "notes.txt").write_text("not an image, and not named like one: never listed")
    run = tmp_path / "run"
    result = invoke(
        "finetune",
        "--recipe",
        str(QUICK),
        "--no-progress",
        *tiny_recipe(root, run, "imagefolder", "schedule.epochs=1"),
    )
    assert result.exit_code == 0, result.output
    assert "data.train: skipped 1 file(s) that are not readable images" in result.stdout
    assert "broken.png" in result.stdout and (run / "last.safetensors").is_file()
    summary = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["samples"] == 6  # val: 2 per class, nothing skipped there


def test_empty_class_folder_is_named(photo_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "gap"
    write_crops(photo_dir, root, per_class=4)
    (root / "train" / "class1b").mkdir()
    run = tmp_path / "run"
    result = invoke(
        "finetune", "--recipe", str(QUICK), "--no-progress", *tiny_recipe(root, run, "imagefolder")
    )
    one_error_line(result, "class1b")
    assert "holds no images" in result.stderr and not run.exists()


def test_recipe_directory_and_unwritable_outputs(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    one_error_line(invoke("finetune", "--recipe", str(tmp_path)), "is a directory")
    missing = tmp_path / "no" / "such" / "dir" / "x.safetensors"
    one_error_line(
        invoke("convert", "test_resnet", "--no-pretrained", "--out", str(missing)), "does not exist"
    )
    one_error_line(
        invoke("export", str(checkpoints["good"]), "--out", str(missing.with_suffix(".onnx"))),
        "does not exist",
    )
    one_error_line(
        invoke("convert", "test_resnet", "--no-pretrained", "--out", "/proc/x.safetensors"),
        "not writable",
    )
    assert not missing.parent.exists()
