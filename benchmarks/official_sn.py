"""The official Switchable Normalization forward, re-expressed for timing only.

What ``switchablenorms/Switchable-Normalization`` (``devkit/ops/switchable_norm.py``,
``SwitchNorm2d``) computes, written here from its description so that ``bench_norm.py``
can time the baseline the issue names next to enorm's own SN and EN: instance mean and
unbiased variance with ``Tensor.mean``/``Tensor.var`` over (H, W); ln and bn statistics
from E[x^2] - E[x]^2 of the instance table; softmax-mixed means and variances; then
``(x - mean) / sqrt(var + eps) * weight + bias``, all plain autograd. Not used by enorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class OfficialSwitchNorm2d(nn.Module):
    """SwitchNorm2d as the official code computes it (moving average, momentum 0.9 kept)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        flat = x.view(n, c, -1)
        mean_in = flat.mean(-1, keepdim=True)
        var_in = flat.var(-1, keepdim=True)  # unbiased, as the official code (NaN on 1x1 maps)
        second = var_in + mean_in**2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second.mean(1, keepdim=True) - mean_ln**2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn**2
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mw = torch.softmax(self.mean_weight, 0)
        vw = torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        out = ((flat - mean) / (var + self.eps).sqrt()).view(n, c, h, w)
        return out * self.weight + self.bias


def swap_in_official_sn(model: nn.Module) -> nn.Module:
    """Every BatchNorm/GroupNorm (timm's fused norm+act kept: its drop and act follow) -> official
    SN."""
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.BatchNorm2d, nn.GroupNorm)):
                channels = (
                    child.num_features if isinstance(child, nn.BatchNorm2d) else child.num_channels
                )
                tail = [
                    m
                    for m in (getattr(child, "drop", None), getattr(child, "act", None))
                    if m is not None
                ]
                replacement = OfficialSwitchNorm2d(channels)
                setattr(
                    module, child_name, nn.Sequential(replacement, *tail) if tail else replacement
                )
    return model
