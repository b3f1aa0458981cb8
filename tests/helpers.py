"""Helpers shared by the conversion tests."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters.

    Freshly built models have mean 0, var 1, gamma 1, beta 0, under which a
    conversion that forgot to copy something would still look right.
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name, None)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or "Norm" not in type(module).__name__:
                continue
            noise = torch.rand(t.shape, generator=g)
            if name == "weight":
                t.copy_(0.5 + noise)
            elif name == "running_var":
                t.copy_(0.5 + noise)
            else:
                t.copy_((noise - 0.5) * 0.4)
    return model


def max_relative_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
