"""Datasets on real image files the tests write, and Fashion-MNIST from Debian's package."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import crop_dataset

from enorm_cli.config.recipe import DataConfig
from enorm_cli.data.datasets import build_transform, infer_num_classes, load_split, parse_data_spec
from enorm_cli.errors import EnormError

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture()
def image_root(tmp_path: Path, photo_dir: Path) -> Path:
    return crop_dataset(photo_dir, tmp_path)


def test_imagefolder_and_filelist_read_the_same_images(image_root: Path) -> None:
    folder = DataConfig(kind="imagefolder", root=str(image_root), image_size=32)
    listed = DataConfig(
        kind="filelist",
        root=str(image_root),
        train="info/train_list.txt",
        val="info/val_list.txt",
        image_size=32,
    )
    for cfg in (folder, listed):
        tf = build_transform(cfg, MEAN, STD, training=False)
        train = load_split(cfg, "train", tf, None, 3)
        val = load_split(cfg, "val", tf, None, 3)
        assert len(train.targets) == 18 and len(val.targets) == 9
        assert infer_num_classes(train) == 3
        x, y = train.dataset[0]
        assert tuple(x.shape) == (3, 32, 32) and y == 0


def test_filelist_problems_are_counted_and_named(image_root: Path) -> None:
    lines = (image_root / "info" / "train_list.txt").read_text().splitlines()
    (image_root / "info" / "broken.txt").write_text(
        "\n".join([*lines, "train/gone/1.png 0", "train/gone/2.png 1"])
    )
    cfg = DataConfig(kind="filelist", root=str(image_root), train="info/broken.txt")
    with pytest.raises(
        EnormError, match=r"2 of 20 listed images are missing \(first: '.*gone/1.png'\)"
    ):
        load_split(cfg, "train", None, None, 3)
    cfg = DataConfig(kind="filelist", root=str(image_root), train="info/train_list.txt")
    with pytest.raises(EnormError, match=r"6 labels outside 0..1 \(first: 2\)"):
        load_split(cfg, "train", None, None, 2)
    (image_root / "info" / "bad.txt").write_text("just-a-path\n")
    with pytest.raises(EnormError, match="line 1 is not 'relative/path label'"):
        load_split(
            DataConfig(kind="filelist", root=str(image_root), train="info/bad.txt"),
            "train",
            None,
            None,
        )
    with pytest.raises(EnormError, match="not found"):
        load_split(
            DataConfig(kind="filelist", root=str(image_root), train="info/nope.txt"),
            "train",
            None,
            None,
        )
    (image_root / "info" / "empty.txt").write_text("\n")
    with pytest.raises(EnormError, match=r"data\.val is empty"):
        load_split(
            DataConfig(kind="filelist", root=str(image_root), val="info/empty.txt"),
            "val",
            None,
            None,
        )


def test_missing_roots() -> None:
    with pytest.raises(EnormError, match=r"data\.root is not set"):
        load_split(DataConfig(kind="imagefolder"), "train", None, None)
    with pytest.raises(EnormError, match="not a directory"):
        load_split(DataConfig(kind="imagefolder", root="/no/such/dir"), "train", None, None)


def test_first_classes_and_limit(image_root: Path) -> None:
    cfg = DataConfig(kind="imagefolder", root=str(image_root), first_classes=2, limit_train=5)
    split = load_split(cfg, "train", None, cfg.limit_train, None)
    assert len(split.targets) == 5 and set(split.targets) <= {0, 1} and len(set(split.targets)) == 2
    assert split.classes == ["class0", "class1"]


def test_fashion_mnist_from_the_debian_package() -> None:
    cfg = DataConfig(kind="fashion_mnist", image_size=32)
    tf = build_transform(cfg, MEAN, STD, training=True)
    train = load_split(cfg, "train", tf, 100, 10)
    val = load_split(cfg, "val", None, None, 10)
    assert len(train.targets) == 100 and len(val.targets) == 10000
    x, _ = train.dataset[0]
    assert tuple(x.shape) == (3, 32, 32)


def test_data_specs(tmp_path: Path) -> None:
    assert parse_data_spec("fashion_mnist").kind == "fashion_mnist"
    assert parse_data_spec("fashion_mnist:train").val == "train"
    spec = parse_data_spec(f"filelist:{tmp_path}/info/val.txt@{tmp_path}/images")
    assert (spec.root, spec.val, spec.val_prefix) == (
        str(tmp_path / "info"),
        "val.txt",
        "../images",
    )
    (tmp_path / "val").mkdir()
    spec = parse_data_spec(str(tmp_path / "val"))
    assert (spec.kind, spec.root, spec.val) == ("imagefolder", str(tmp_path), "val")
    with pytest.raises(EnormError, match="not a directory"):
        parse_data_spec(str(tmp_path / "nope"))
