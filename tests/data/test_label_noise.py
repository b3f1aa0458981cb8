"""Symmetric label noise: how many labels flip, to what, and that only the train split flips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from enorm_cli.config.recipe import DataConfig
from enorm_cli.data.datasets import load_split
from enorm_cli.data.label_noise import noisy_targets


def test_exactly_the_rate_flips_each_to_another_class() -> None:
    targets = [i % 10 for i in range(2000)]
    noisy = noisy_targets(targets, 0.4, 10, seed=3)
    flipped = [(a, b) for a, b in zip(targets, noisy, strict=True) if a != b]
    assert len(flipped) == 800  # round(0.4 * 2000), and no flip lands on its own class
    offsets = Counter((b - a) % 10 for a, b in flipped)
    assert set(offsets) == set(range(1, 10))  # every other class is reached ...
    assert max(offsets.values()) < 2 * min(offsets.values())  # ... about evenly
    assert noisy == noisy_targets(targets, 0.4, 10, seed=3)
    assert noisy != noisy_targets(targets, 0.4, 10, seed=4)
    assert noisy_targets(targets, 0.0, 10, seed=3) == targets


def test_the_train_split_returns_its_noisy_labels_and_val_stays_clean(
    image_classes: Path,
) -> None:
    base = DataConfig(kind="imagefolder", root=str(image_classes))
    cfg = base.model_copy(update={"label_noise": 0.5})
    clean = load_split(base, "train", None, None)
    train = load_split(cfg, "train", None, None)
    assert sum(a != b for a, b in zip(clean.targets, train.targets, strict=True)) == round(
        0.5 * len(clean.targets)
    )
    assert [train.dataset[i][1] for i in range(len(train.targets))] == train.targets
    val = load_split(cfg, "val", None, None)
    clean_val = load_split(base, "val", None, None)
    assert val.targets == clean_val.targets


def test_rate_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="label_noise"):
        DataConfig(kind="fashion_mnist", label_noise=1.0)
