"""SwitchableNorm2d against a float64 reference of the official SN semantics."""

from __future__ import annotations

import pytest
import torch
from reference import sn_reference
from torch import nn

from enorm_cli.layers import SwitchableNorm2d


def make_layer(**kwargs) -> SwitchableNorm2d:
    layer = SwitchableNorm2d(16, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    return layer


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"normalizers": ("bn", "in", "ln", "gn"), "num_groups": 4}, {"normalizers": ("in", "ln")}],
)
def test_matches_float64_reference(kwargs: dict, mode: str) -> None:
    layer = make_layer(**kwargs)
    for _ in range(3):
        layer(torch.randn(4, 16, 5, 5) * 2 + 1)
    layer.train(mode == "train")
    x = torch.randn(4, 16, 5, 5) * 3 - 2
    torch.testing.assert_close(layer(x).double(), sn_reference(layer, x), rtol=1e-4, atol=1e-4)


def test_ratios_are_static_softmax() -> None:
    layer = SwitchableNorm2d(16)
    x = torch.randn(3, 16, 4, 4)
    torch.testing.assert_close(layer.ratios(x), torch.full((3, 3), 1 / 3))
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([2.0, 0.0, -1.0]))
    assert layer.ratios(x).sum(1).allclose(torch.ones(3))
    assert torch.equal(layer.ratios(x)[0], layer.ratios(x)[2])


def test_running_stats_equal_batchnorm() -> None:
    layer = SwitchableNorm2d(8, momentum=None)
    bn = nn.BatchNorm2d(8, momentum=None)
    for step in range(4):
        x = torch.randn(3, 8, 4, 4) + step
        layer(x)
        bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)


def test_1x1_maps_are_finite() -> None:
    """The official code's unbiased instance variance is NaN here; ours is not."""
    layer = SwitchableNorm2d(8)
    x = torch.randn(2, 8, 1, 1, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_renorm_trains_on_the_eval_function() -> None:
    """SN's bn member batch-renormalized as EN's: training output = eval output within the
    clips, running statistics as BatchNorm's."""
    layer, bn = SwitchableNorm2d(8, normalizers=("bn",)), nn.BatchNorm2d(8)
    warm = torch.randn(64, 8, 2, 2) * 2 + 1
    layer(warm)
    bn(warm)
    layer.renorm = True
    x = torch.randn(4, 8, 2, 2) * 2 + 1
    y_eval = layer.eval()(x)
    torch.testing.assert_close(layer.train()(x), y_eval, rtol=1e-4, atol=1e-4)
    bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)


def test_renorm_frozen_trains_on_the_eval_function_beyond_the_clips() -> None:
    """renorm_frozen (SN too): batch spread a fifth of the running one, past r_max = 3, and the
    training output is still the eval output (no clip against frozen statistics)."""
    torch.manual_seed(0)
    layer = SwitchableNorm2d(8, normalizers=("bn", "ln"))
    with torch.no_grad():
        layer.running_var.fill_(25.0)
    layer.renorm = layer.frozen_stats = True
    x = torch.randn(4, 8, 1, 1)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(layer.train()(x), y_eval, rtol=1e-5, atol=1e-5)
    assert (layer.running_var == 25.0).all()
