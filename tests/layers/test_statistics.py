"""The one-pass statistics table against direct reductions over X."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_moments_match_float64

from enorm_cli.layers import check_normalizers, group_count
from enorm_cli.layers.statistics import (
    RENORM_LIMITS,
    batch_stats,
    group_stats,
    instance_stats,
    layer_stats,
    renorm_limits,
    renormalized_stats,
)


def direct(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
    return mean, var


def test_pooled_stats_equal_direct_reductions() -> None:
    x = torch.randn(5, 12, 6, 7) * torch.rand(1, 12, 1, 1) * 4 + torch.randn(5, 12, 1, 1)
    stats = instance_stats(x)
    assert stats.count == 42
    m, v = direct(x, (0, 2, 3))
    bm, bv = batch_stats(stats.mean, stats.var)
    torch.testing.assert_close(bm.squeeze(0).double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bv.squeeze(0).double(), v, rtol=1e-5, atol=1e-6)
    m, v = direct(x, (1, 2, 3))
    lm, lv = layer_stats(stats.mean, stats.var)
    torch.testing.assert_close(lm.squeeze(1).double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lv.squeeze(1).double(), v, rtol=1e-5, atol=1e-6)
    g = x.reshape(5, 3, 4, 6, 7)
    m, v = direct(g, (2, 3, 4))
    gm, gv = group_stats(stats.mean, stats.var, 3)
    torch.testing.assert_close(gm[:, ::4].double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gv[:, ::4].double(), v, rtol=1e-5, atol=1e-6)


def test_bf16_input_gets_float32_statistics() -> None:
    stats = instance_stats(torch.randn(2, 4, 3, 3).bfloat16())
    assert stats.mean.dtype == torch.float32 and stats.var.dtype == torch.float32


def test_check_normalizers() -> None:
    assert check_normalizers(["bn", "gn"]) == ("bn", "gn")
    for bad, match in ((["bn", "bn"], "repeat"), ([], "at least one"), (["bm"], "unknown")):
        with pytest.raises(ValueError, match=match):
            check_normalizers(bad)


def test_group_count() -> None:
    assert group_count(2048, 16) == 128
    assert group_count(30, 16) == 1
    assert group_count(24, 16) == 1
    assert group_count(96, 16) == 6
    assert group_count(3, 1) == 3


@pytest.mark.parametrize("hw", [1, 2, 4, 7])
@pytest.mark.parametrize("shift", [0.0, 1e3])
def test_moments_every_path_against_float64(hw: int, shift: float) -> None:
    """1x1 (exact zero variance), short rows (two-pass), long rows (one-pass: shift 0),
    |mean|/std 1e3 (long rows fall back to two passes)."""
    from enorm_cli.layers.statistics import moments

    x = (
        torch.randn(3, 5, hw, hw) * (1 + torch.rand(1, 5, 1, 1))
        + 0.1 * torch.randn(1, 5, 1, 1)
        + shift
    )
    mean, var = moments(x.flatten(2))
    assert_moments_match_float64(x.flatten(2), mean, var)


def test_renormalized_stats_normalize_as_the_running_ones_within_the_clips() -> None:
    """Batch Renormalization as statistics: (x - M)/sqrt(S + eps) = r (x - mean)/sigma + d,
    which is (x - mu_run)/sigma_run while r and d are inside their clips."""
    eps = 1e-5
    x = torch.randn(4, 6, 1, 1).double() * 2 + 1
    mean, var = direct(x, (0, 2, 3))
    mean, var = mean.unsqueeze(0), var.unsqueeze(0)
    run_mean = mean.squeeze(0) + torch.linspace(-1, 2, 6).double()
    run_var = var.squeeze(0) * torch.linspace(0.5, 2, 6).double()
    m, s, rd = renormalized_stats(mean, var, run_mean, run_var, eps)
    assert rd.shape == (2, 6)
    inside = (rd[0] < 3) & (rd[0] > 1 / 3) & (rd[1].abs() < 5)
    assert inside.all()
    ours = (x - m.view(1, 6, 1, 1)) / (s.view(1, 6, 1, 1) + eps).sqrt()
    running = (x - run_mean.view(1, 6, 1, 1)) / (run_var.view(1, 6, 1, 1) + eps).sqrt()
    torch.testing.assert_close(ours, running)
    # Far from the running statistics the clips hold: at most 3x the batch's scale, 5 sigma
    m, s, rd = renormalized_stats(mean, var, run_mean + 1e4, run_var * 1e4, eps)
    torch.testing.assert_close(rd[0], torch.full((6,), 1 / 3).double())
    torch.testing.assert_close(rd[1], torch.full((6,), -5.0).double())
    ours = (x - m.view(1, 6, 1, 1)) / (s.view(1, 6, 1, 1) + eps).sqrt()
    batch = (x - mean.view(1, 6, 1, 1)) / (var.view(1, 6, 1, 1) + eps).sqrt()
    torch.testing.assert_close(ours, batch / 3 - 5)


def test_renormalized_stats_unclipped_normalize_as_the_running_ones_anywhere() -> None:
    """Against frozen statistics renorm has no clips (``renorm_limits``): 100x off in scale and
    10^4 in mean, the statistics still normalize exactly as the running ones."""
    assert renorm_limits(frozen_stats=False) == (3.0, 5.0)
    assert renorm_limits(frozen_stats=True) is None
    eps = 1e-5
    x = torch.randn(4, 6, 1, 1).double() * 2 + 1
    mean, var = direct(x, (0, 2, 3))
    mean, var = mean.unsqueeze(0), var.unsqueeze(0)
    run_mean, run_var = mean.squeeze(0) + 1e4, var.squeeze(0) * 1e4
    m, s, rd = renormalized_stats(mean, var, run_mean, run_var, eps, renorm_limits(True))
    assert (rd[0] < 0.02).all() and (rd[1] < -30).all()  # r_max 3 and d_max 5 would clip
    ours = (x - m.view(1, 6, 1, 1)) / (s.view(1, 6, 1, 1) + eps).sqrt()
    running = (x - run_mean.view(1, 6, 1, 1)) / (run_var.view(1, 6, 1, 1) + eps).sqrt()
    torch.testing.assert_close(ours, running)


def test_frozen_share_scales_the_batch_statistics_gradient_and_keeps_the_forward() -> None:
    """``frozen_share`` s: the same M, S and r, d, and a gradient to the batch's mean and
    variance (1 - s) times the plain renorm's (s = 1 would be the frozen statistics': none)."""
    eps = 1e-5
    torch.manual_seed(0)
    mean = torch.randn(1, 6, dtype=torch.double)
    var = torch.rand(1, 6, dtype=torch.double) + 0.5
    run_mean, run_var = mean.squeeze(0) + 3.0, var.squeeze(0) * 40.0
    weights = torch.randn(2, 6, dtype=torch.double)

    def grads(share: float) -> tuple[torch.Tensor, ...]:
        m, v = mean.clone().requires_grad_(), var.clone().requires_grad_()
        big_m, big_s, rd = renormalized_stats(m, v, run_mean, run_var, eps, None, None, share)
        ((big_m * weights[0]).sum() + (big_s * weights[1]).sum()).backward()
        return big_m.detach(), big_s.detach(), rd, m.grad, v.grad

    plain, shared, frozen = grads(0.0), grads(0.3), grads(1.0)
    for a, b in zip(plain[:3], shared[:3]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(shared[3], 0.7 * plain[3])
    torch.testing.assert_close(shared[4], 0.7 * plain[4])
    assert frozen[3].abs().max() < 1e-9 and frozen[4].abs().max() < 1e-9
    with pytest.raises(ValueError, match="unclipped"):
        renormalized_stats(mean, var, run_mean, run_var, eps, RENORM_LIMITS, None, 0.3)
