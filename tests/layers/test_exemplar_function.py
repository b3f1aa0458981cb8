"""EN's one definition (``en_coefficients``) and its parts against plain PyTorch."""

from __future__ import annotations

import torch
from torch import nn

from enorm_cli.layers import ExemplarNorm2d
from enorm_cli.layers.exemplar_function import en_coefficients, ratio_logits, stacked_stats
from enorm_cli.layers.statistics import instance_stats


def layer(normalizers=("bn", "in", "ln", "gn"), **kw) -> ExemplarNorm2d:
    torch.manual_seed(0)
    en = ExemplarNorm2d(16, normalizers=normalizers, reduction=4, num_groups=4, **kw)
    with torch.no_grad():
        for p in en.parameters():
            p.normal_(0, 0.5)
        en.running_mean.normal_()
        en.running_var.uniform_(0.5, 2.0)
    return en


def test_grouped_conv_as_multiply_sum_equals_nn_conv1d() -> None:
    en = layer()
    xhat = torch.randn(4, 6, 16)  # K x N x C
    conv = en.ratio.conv
    logits, _h, _vv, zt = ratio_logits(
        xhat,
        conv.weight,
        en.ratio.fc1.weight,
        en.ratio.fc1.bias,
        en.ratio.fc2.weight,
        en.ratio.fc2.bias,
        False,
        en.logit_scale,
    )
    z = conv(xhat.permute(1, 2, 0)).transpose(1, 2)  # nn.Conv1d over the K axis: N x K x G
    torch.testing.assert_close(zt, z, rtol=1e-5, atol=1e-6)
    v = torch.bmm(z, z.transpose(1, 2)).flatten(1)
    expected = en.ratio.fc2.bias + en.logit_scale * nn.functional.linear(
        torch.tanh(en.ratio.fc1(v)), en.ratio.fc2.weight
    )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(en.ratio(xhat.transpose(0, 1)), logits)  # the module computes the same


def test_stacked_stats_follow_the_mode() -> None:
    en = layer()
    x = torch.randn(5, 16, 4, 4) * 3 + 2
    stats = instance_stats(x)
    cfg = en.kernel_settings()
    m, s, record, rd, samples = stacked_stats(
        cfg, stats.mean, stats.var, en.kernel_tensors(), stats.count
    )
    assert rd is None and samples is None  # no renorm, one process
    torch.testing.assert_close(m[0], x.mean((0, 2, 3)).expand(5, 16))  # bn: the batch's
    torch.testing.assert_close(s[2], x.var((1, 2, 3), correction=0)[:, None].expand(5, 16))  # ln
    # the running statistics average the unbiased variance, as BatchNorm's
    torch.testing.assert_close(record, torch.stack([x.mean((0, 2, 3)), x.var((0, 2, 3))]))
    en.eval()
    m, s, record, rd, _ = stacked_stats(
        en.kernel_settings(), stats.mean, stats.var, en.kernel_tensors(), stats.count
    )
    assert record is None and rd is None and torch.equal(m[0], en.running_mean.expand(5, 16))


def test_coefficients_mix_the_normalized_outputs() -> None:
    """Y = A X + B equals sum_k lambda_k (gamma_k Xhat_k + beta_k), written the paper's way."""
    en = layer().eval()
    x = torch.randn(3, 16, 5, 5).double()
    en = en.double()
    stats = instance_stats(x)
    a, b, _, saved = en_coefficients(
        en.kernel_settings(), stats.mean, stats.var, en.kernel_tensors(), stats.count
    )
    lam = saved[4]
    torch.testing.assert_close(lam, en.ratios(x))
    y = torch.zeros_like(x)
    means = [
        en.running_mean[None, :, None, None],
        x.mean((2, 3), keepdim=True),
        x.mean((1, 2, 3), keepdim=True),
        x.view(3, 4, 4, 5, 5)
        .mean((2, 3, 4), keepdim=True)
        .expand(3, 4, 4, 1, 1)
        .reshape(3, 16, 1, 1),
    ]
    variances = [
        en.running_var[None, :, None, None],
        x.var((2, 3), keepdim=True, correction=0),
        x.var((1, 2, 3), keepdim=True, correction=0),
        x.view(3, 4, 4, 5, 5)
        .var((2, 3, 4), keepdim=True, correction=0)
        .expand(3, 4, 4, 1, 1)
        .reshape(3, 16, 1, 1),
    ]
    for k, (mu, var) in enumerate(zip(means, variances)):
        xhat = (x - mu) / torch.sqrt(var + en.eps)
        y = y + lam[:, k, None, None, None] * (
            en.weight[k, None, :, None, None] * xhat + en.bias[k, None, :, None, None]
        )
    torch.testing.assert_close(a[..., None, None] * x + b[..., None, None], y)
    torch.testing.assert_close(en(x), y)
