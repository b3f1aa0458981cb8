"""Per-image appearance shift: parsing, the per-image draw, and where it sits in the pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke, one_error_line

from enorm_cli.config.recipe import DataConfig
from enorm_cli.data.datasets import load_split
from enorm_cli.data.shift import STEP, parse_shift
from enorm_cli.errors import EnormError


@pytest.mark.parametrize("spec", ["contrast", "blur:2", "gamma:6", "gamma:-1", "brightness:x"])
def test_bad_specs_get_one_line(spec: str) -> None:
    with pytest.raises(EnormError, match="KIND:SEVERITY"):
        parse_shift(spec)


def test_each_image_draws_its_own_factor_in_range() -> None:
    shift = parse_shift("contrast:4")
    factors = [shift.factor(i) for i in range(500)]
    m = STEP["contrast"] * 4
    assert all(math.exp(-m) <= f <= math.exp(m) for f in factors)
    assert min(factors) < 0.5 < 2 < max(factors)  # both directions, far apart
    assert factors == [parse_shift("contrast:4").factor(i) for i in range(500)]  # same draw
    assert parse_shift("contrast:0").factor(7) == 1.0


def test_val_images_are_shifted_before_the_transform(image_classes: Path) -> None:
    """Brightness multiplies pixel values: each val image's mean moves by its own factor (up
    to clipping at 255), and the train split is untouched."""
    base = DataConfig(kind="imagefolder", root=str(image_classes))
    shifted = base.model_copy(update={"shift": "brightness:2"})
    clean_val = load_split(base, "val", np.asarray, None)
    val = load_split(shifted, "val", np.asarray, None)
    shift = parse_shift("brightness:2")
    ratios = [
        val.dataset[i][0].astype(float).mean() / clean_val.dataset[i][0].astype(float).mean()
        for i in range(len(val.targets))
    ]
    for i, ratio in enumerate(ratios):
        f = shift.factor(i)
        assert ratio == pytest.approx(f, rel=0.02) or (f > 1 and 1 < ratio < f)  # clipped
    train = load_split(shifted, "train", None, None)
    clean_train = load_split(base, "train", None, None)
    a, b = np.asarray(train.dataset[0][0]), np.asarray(clean_train.dataset[0][0])
    assert np.array_equal(a, b)


def test_recipe_key_is_checked() -> None:
    with pytest.raises(ValueError, match="SEVERITY"):
        DataConfig(kind="fashion_mnist", shift="contrast:9")


def test_eval_and_inspect_take_shift(finetuned: Path, image_classes: Path) -> None:
    val = str(image_classes / "val")
    clean = invoke("eval", str(finetuned), "--data", val, "--workers", "0", "--json")
    shifted = invoke(
        "eval", str(finetuned), "--data", val, "--workers", "0", "--json", "--shift", "gamma:5"
    )
    assert clean.exit_code == 0 and shifted.exit_code == 0, shifted.stderr
    assert clean.stdout != shifted.stdout  # the loss moves with the images
    one_error_line(invoke("eval", str(finetuned), "--data", val, "--shift", "gamma:9"), "0-5")
    one_error_line(invoke("inspect", str(finetuned), "--shift", "gamma:1"), "--data")
    result = invoke(
        "inspect", str(finetuned), "--data", val, "--workers", "0", "--samples", "6",
        "--shift", "contrast:5",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
