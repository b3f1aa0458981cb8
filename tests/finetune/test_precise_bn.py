"""Precise BN: running statistics rebuilt from many batches, nothing else touched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from enorm_cli.finetune.precise_bn import norm_layers, recompute_running_stats
from enorm_cli.layers import ExemplarNorm2d


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        ExemplarNorm2d(8, reduction=4),
        nn.Dropout(0.5),
        nn.Flatten(),
    )


def batches(count: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 7, 7, generator=g) * 2 + 1, torch.zeros(size)) for _ in range(count)
    ]


def test_statistics_are_the_average_over_the_batches_and_nothing_else_moves() -> None:
    net = small_net()
    net.train()
    en = net[4]
    en.renorm = True
    data = batches(6)
    params = [p.clone() for p in net.parameters()]
    # What BatchNorm's cumulative average (momentum None) records over the same 5 batches
    expected = copy.deepcopy(net)
    for m in norm_layers(expected):
        m.reset_running_stats()
        m.momentum = None
    expected[4].renorm = False
    expected.eval()
    for m in norm_layers(expected):
        m.train()
    with torch.no_grad():
        for x, _ in data[:5]:
            expected(x)
    rng = torch.get_rng_state()
    seen = recompute_running_stats(net, data, images=20)
    assert seen == 20
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew nothing
    for ours, ref in zip(norm_layers(net), norm_layers(expected)):
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert ours.momentum == 0.1
    assert net.training and en.renorm
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))


def test_recomputed_statistics_are_what_the_last_weights_produce() -> None:
    """After the first layer's weights change, its successor's statistics follow (the stale
    moving average does not)."""
    net = small_net()
    data = batches(20)
    with torch.no_grad():
        for x, _ in data:
            net(x)
        net[0].weight.mul_(3.0)
    stale = net[1].running_var.clone()
    recompute_running_stats(net, data, images=80)
    fresh = net[1].running_var
    assert (fresh / stale).mean() > 5  # 3x the weights, 9x the variance
