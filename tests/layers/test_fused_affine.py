"""``Y = A X + B`` as one node: its hand-written X passes against plain autograd."""

from __future__ import annotations

import pytest
import torch

import enorm_cli.layers.fused_affine as fa
from enorm_cli.layers.fused_affine import affine_apply, fused_affine, row_dot
from enorm_cli.layers.statistics import InstanceStats


def instance_norm_coefficients(weight: torch.Tensor, bias: torch.Tensor):
    def coefficients(stats: InstanceStats) -> tuple[torch.Tensor, torch.Tensor]:
        a = weight * torch.rsqrt(stats.var + 1e-5)
        return a, bias - a * stats.mean

    return coefficients


@pytest.mark.parametrize("size", [3, 8])  # below and above BROADCAST_MIN_LENGTH (16 values)
def test_gradients_equal_plain_autograd(size: int) -> None:
    torch.manual_seed(0)
    x = (torch.randn(3, 5, size, size) * 2 + 1).double().requires_grad_()
    weight = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = fused_affine(x, instance_norm_coefficients(weight, bias), [weight, bias])
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    expected = (x - mean[..., None, None]) * torch.rsqrt(var + 1e-5)[..., None, None] * weight[
        ..., None, None
    ] + bias[..., None, None]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, weight, bias), g)
    want = torch.autograd.grad(expected, (x, weight, bias), g)
    torch.testing.assert_close(y, expected)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_without_autograd_nothing_is_recorded() -> None:
    weight, bias = torch.ones(2, 4, requires_grad=True), torch.zeros(2, 4, requires_grad=True)
    with torch.no_grad():
        y = fused_affine(
            torch.randn(2, 4, 5, 5), instance_norm_coefficients(weight, bias), [weight, bias]
        )
    assert y.grad_fn is None and torch.allclose(y.mean((2, 3)), torch.zeros(2, 4), atol=1e-6)


def test_affine_apply_paths_agree() -> None:
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    for size in (2, 4, 6):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(
            affine_apply(x, a, b), x * a[..., None, None] + b[..., None, None]
        )


def test_row_dot_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = torch.randn(7, 3, 50), torch.randn(7, 3, 50)
    whole = row_dot(a, b)
    monkeypatch.setattr(fa, "CHUNK_ELEMENTS", 300)  # two samples per chunk
    torch.testing.assert_close(row_dot(a, b), whole)
    torch.testing.assert_close(whole, (a * b).sum(-1))
