"""``enorm recipes`` and ``--recipe NAME`` as a user calls them, outside the checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from enorm_cli.cli.main import app
from enorm_cli.config.registry import list_recipes

runner = CliRunner()


def test_recipes_lists_every_packaged_recipe() -> None:
    for args in (["recipes"], ["recipes", "ls"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        for entry in list_recipes():
            assert entry.name in result.stdout
        assert "8 GPUs" in result.stdout and "2 CPU cores" in result.stdout


def test_recipes_cp(tmp_path: Path) -> None:
    result = runner.invoke(app, ["recipes", "cp", "small_batch", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "small_batch.yaml").is_file()
    result = runner.invoke(app, ["recipes", "cp", "small_batch", str(tmp_path)])
    assert result.exit_code != 0 and result.stderr.count("\n") == 1 and "--force" in result.stderr
    result = runner.invoke(app, ["recipes", "cp", "smallbatch", str(tmp_path / "x.yaml")])
    assert result.exit_code != 0 and "did you mean small_batch?" in result.stderr
    assert "Traceback" not in result.output


def webvision_folder(root: Path, photos: Path) -> Path:
    """The official WebVision 1.0 layout, in miniature: lists under info/, val images apart."""
    images = sorted(photos.rglob("*.jpg")) + sorted(photos.rglob("*.png"))
    (root / "info").mkdir(parents=True)
    lists: dict[str, list[str]] = {"google": [], "flickr": [], "val": []}
    for i, src in enumerate(images * 2):
        label = i % 3 * 400  # ImageNet class ids, 1000 classes
        for split, folder in (
            ("google", f"google/q{label:04d}"),
            ("flickr", f"flickr/q{label:04d}"),
            ("val", "val_images_256"),
        ):
            name = f"{i:08d}.jpg" if split != "val" else f"val{i:08d}.jpg"
            (root / folder).mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                im.convert("RGB").resize((48, 40)).save(root / folder / name)
            lists[split].append(f"{folder + '/' if split != 'val' else ''}{name} {label}")
    for split, lines in lists.items():
        target = f"train_filelist_{split}.txt" if split != "val" else "val_filelist.txt"
        (root / "info" / target).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_webvision_recipe_by_name_starts_from_another_directory(
    tmp_path: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = webvision_folder(tmp_path / "webvision", photo_dir)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # The recipe as shipped (ResNet-50 with EN from scratch, 1000 classes, bf16, filelists);
    # only what makes one short epoch on a CPU is overridden.
    result = runner.invoke(
        app,
        [
            "finetune",
            "--recipe",
            "webvision.yaml",
            f"data.root={data}",
            "--no-progress",
            "data.image_size=64",
            "data.batch_size=4",
            "data.workers=0",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
        ],
    )
    assert result.exit_code == 0, result.output
    out = work / "runs" / "webvision_en_r50"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval"] and rows[-1]["samples"] == 12
    assert (out / "last.safetensors").is_file()
