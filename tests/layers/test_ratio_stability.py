"""The mechanism behind EN's collapse (docs/stability.md), at the layer level.

A converted layer's ratios act as a gain on the whole layer: its non-source gammas start
at 0, so moving lambda off the source normalizer scales the output down. On a wide layer
the ratio branch's hidden units saturate, and without ``logit_scale`` one SGD step on FC2
moves every sample's ratio logits by about pi K times what it moves a plain logit (SN's).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from enorm_cli.config.settings import ENSettings
from enorm_cli.convert.surgery import _bn, build_norm
from enorm_cli.layers import ExemplarNorm2d
from enorm_cli.layers.exemplar_norm import default_logit_scale


def converted_wide_layer(
    logit_scale: float | None, channels: int = 1280, centered: bool = False
) -> ExemplarNorm2d:
    """A BatchNorm with trained-looking statistics, converted as ``enorm convert`` does (with the
    paper's uncentered branch unless ``centered``)."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    settings = ENSettings(normalizers=("bn", "ln"), logit_scale=logit_scale, centered=centered)
    layer = build_norm(_bn(bn), settings)
    assert isinstance(layer, ExemplarNorm2d)
    return layer


def step_logit_change(layer: ExemplarNorm2d, lr: float) -> tuple[float, float]:
    """One SGD step on FC2 alone: how far the mean ratio logit moves through W h, and through b."""
    x = torch.randn(8, layer.num_features, 1, 1) * 1.5 + 0.3
    before = layer.ratios(x).detach()
    y = layer(x)
    (y.square().mean()).backward()  # asks every layer for less gain, as a fresh head often does
    fc2 = layer.ratio.fc2
    with torch.no_grad():
        bias_move = (lr * fc2.bias.grad).abs().max().item()
        fc2.weight.sub_(lr * fc2.weight.grad)
        fc2.bias.sub_(lr * fc2.bias.grad)
    after = layer.ratios(x).detach()
    logit = lambda lam: (lam[:, 0].log() - lam[:, 1].log()).mean().item()  # noqa: E731
    return abs(logit(after) - logit(before)), bias_move


def test_default_logit_scale_is_one_over_sqrt_pi_k() -> None:
    assert default_logit_scale(2, 50) == pytest.approx(0.1)
    assert ExemplarNorm2d(16, normalizers=("bn", "in", "ln"), pi=50).logit_scale == pytest.approx(
        150**-0.5
    )


def test_unscaled_branch_moves_ratio_logits_far_more_than_a_plain_logit() -> None:
    """The mechanism on the code as it was (logit_scale=1): the weight path amplifies ~pi K
    times."""
    total, bias_part = step_logit_change(converted_wide_layer(1.0), lr=0.01)
    assert total > 20 * 2 * bias_part  # the two logits' biases move apart by 2 * bias_part at most


def test_default_branch_moves_ratio_logits_like_a_plain_logit() -> None:
    total, bias_part = step_logit_change(converted_wide_layer(None), lr=0.01)
    assert total < 4 * 2 * bias_part


def test_centered_branch_moves_samples_apart_not_the_mean() -> None:
    """Centered, a step on W moves the samples' logits apart and leaves their mean: where the
    paper's branch moves the whole layer (above), the per-sample term can learn fast without
    throwing the layer onto a normalizer."""

    def step_on_w(centered: bool) -> torch.Tensor:
        torch.manual_seed(0)
        layer = converted_wide_layer(1.0, centered=centered)
        x = torch.randn(8, layer.num_features, 1, 1) * 1.5 + 0.3
        (layer(x).square().mean()).backward()
        before = layer.branch(x).logits.detach()
        with torch.no_grad():
            layer.ratio.fc2.weight.sub_(0.01 * layer.ratio.fc2.weight.grad)
        moved = layer.branch(x).logits.detach() - before
        return moved[:, 0] - moved[:, 1]  # the bn-ln logit gap's move, per sample

    paper, centered = step_on_w(False), step_on_w(True)
    assert paper.mean().abs() > 0.5 * paper.abs().max()  # the whole layer moves
    assert centered.abs().max() > 1e-5  # the samples move
    assert centered.mean().abs() < 1e-2 * centered.abs().max()  # their mean does not
