"""benchmarks/renorm_clips.py: the shares of channels where renorm's clips would bite."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import renorm_clips


def test_clip_shares_count_the_channels_beyond_r_max_and_d_max() -> None:
    """Two BatchNorms: the first's running statistics match the data (nothing clipped), the
    second's variance is 100x the data's in half the channels (r = 0.1 < 1/3) and its mean 10
    sigma off in one (d = -10 < -5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([100.0, 100.0, 1.0, 1.0]))
        model[1].running_mean.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
        model[0].running_mean.zero_()
        model[0].running_var.fill_(1.0)
    # BatchNorm 0 in eval maps N(0, 1) to itself, so BatchNorm 1 sees the data's statistics too
    data = [(torch.randn(256, 4, 2, 2), torch.zeros(256)) for _ in range(3)]
    shares = renorm_clips.clip_shares(model, data, batches=2)
    assert shares["0"]["values"] == 256 * 2 * 2
    assert shares["0"]["r_clipped"] == shares["0"]["d_clipped"] == 0.0
    assert abs(shares["0"]["median_r"] - 1.0) < 0.1
    assert shares["1"]["r_clipped"] == 0.5
    assert shares["1"]["d_clipped"] == 0.25
