"""Function-preservation checks: the calibration batch and the agreement figures."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from enorm_cli.convert.verify import (
    agreement,
    calibration_batch,
    default_batch,
    eval_outputs,
    rounding_ulps,
)
from enorm_cli.errors import EnormError

CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def test_default_batch_is_deterministic_and_smooth() -> None:
    a, b = default_batch((3, 64, 48)), default_batch((3, 64, 48))
    assert a.shape == (8, 3, 64, 48) and torch.equal(a, b)
    neighbours = (a[..., 1:, :] - a[..., :-1, :]).abs().mean()
    assert neighbours < 0.5 * a.std()  # low-frequency, unlike white noise (about 1.1 std)


def test_calibration_batch_reads_images_with_the_eval_transform(photo_dir: Path) -> None:
    batch = calibration_batch(photo_dir, CONFIG)
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    assert calibration_batch(photo_dir, CONFIG, limit=2).shape[0] == 2


def test_calibration_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(EnormError, match="is not a directory"):
        calibration_batch(tmp_path / "none", CONFIG)
    with pytest.raises(EnormError, match="holds no images"):
        calibration_batch(tmp_path, CONFIG)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EnormError, match=r"cannot be read.*remove it"):
        calibration_batch(tmp_path, CONFIG)


def test_agreement_figures() -> None:
    expected = torch.tensor([[4.0, 1.0], [0.0, 2.0], [1.0, 0.5]])
    got = expected + torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.1]])
    result = agreement(expected, got, "three rows")
    assert result.samples == 3 and result.top1_agreement == pytest.approx(2 / 3)
    assert result.max_abs_delta == pytest.approx(3.0) and result.max_abs_logit == 4.0
    assert result.relative_delta == pytest.approx(0.75) and result.to_json()[
        "relative_delta"
    ] == pytest.approx(0.75)


def test_eval_outputs_run_the_model_in_eval_mode() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(1)
    )
    model.train()
    batch = default_batch((3, 4, 4), n=2)
    logits = eval_outputs(model, batch)
    assert not model.training and not logits.requires_grad
    result = agreement(logits, model(batch), "noise")  # eval mode: running statistics
    assert result.max_abs_delta == 0 and result.top1_agreement == 1.0


def test_rounding_ulps_tells_rounding_from_a_changed_value() -> None:
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
    with torch.no_grad():
        reference[0].weight.mul_(1 + 1e-3)  # values float32 cannot hold exactly
    rounded = copy.deepcopy(reference).float()
    assert rounding_ulps(copy.deepcopy(reference), reference) == 0.0
    assert 0.0 < rounding_ulps(rounded, reference) <= 0.5
    with torch.no_grad():
        rounded[0].weight[1, 2] *= 1.001
    assert rounding_ulps(rounded, reference) > 1e3
    zeros = copy.deepcopy(reference).float()
    with torch.no_grad():
        zeros[1].bias.fill_(1e-30)  # the reference's beta is exactly 0
    assert rounding_ulps(zeros, reference) == math.inf
    counted = copy.deepcopy(reference).float()
    counted[1].num_batches_tracked.add_(1)
    assert rounding_ulps(counted, reference) == math.inf
