"""What a source norm layer hands to its EN/SN replacement: normalizer, statistics, affine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SourceNorm:
    """A BatchNorm/GroupNorm layer's contribution, read by ``surgery``'s policies."""

    normalizer: str
    num_features: int
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    momentum: float | None = 0.1
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_groups: int = 32
    drop: nn.Module | None = None
    act: nn.Module | None = None

    @property
    def has_tail(self) -> bool:
        """Whether a drop or an activation follows the norm (timm's *NormAct2d layers)."""
        return self.act is not None or self.drop is not None

    def factory_kwargs(self) -> dict[str, torch.device | torch.dtype]:
        """``device``/``dtype`` of the source's tensors, for the replacement's constructor."""
        ref = self.weight if self.weight is not None else self.running_mean
        if ref is None:
            return {}
        if ref.dtype.is_floating_point:
            return {"device": ref.device, "dtype": ref.dtype}
        return {"device": ref.device}

    @property
    def untrained(self) -> bool:
        """Whether the source still holds what a new layer is built with: a BatchNorm's running
        mean 0 and variance 1 (it has seen no batch), or, without running statistics, gamma 1
        (or 0: timm zero-initializes a residual's last) and beta 0. Then there is no trained
        function for the replacement to keep the other normalizers out of (``anchored``)."""
        if self.running_mean is not None and self.running_var is not None:
            return bool((self.running_mean == 0).all() and (self.running_var == 1).all())
        gamma, beta = self.gamma(), self.beta()
        flat = bool((gamma == 1).all() or (gamma == 0).all())
        return flat and bool((beta == 0).all())

    def gamma(self) -> Tensor:
        """The source's scale (ones without an affine)."""
        if self.weight is not None:
            return self.weight.detach()
        return torch.ones(self.num_features)

    def beta(self) -> Tensor:
        """The source's shift (zeros without an affine)."""
        if self.bias is not None:
            return self.bias.detach()
        return torch.zeros(self.num_features)


def source_prior(normalizers: tuple[str, ...], source: str, margin: float) -> tuple[Tensor, float]:
    """The ratio logits a replacement starts from (``margin`` on the source normalizer, 0
    elsewhere) and the source's ratio under them, e^m / (e^m + K - 1)."""
    k = len(normalizers)
    prior = torch.zeros(k)
    prior[normalizers.index(source)] = margin
    return prior, source_share(k, margin)


def source_share(num_normalizers: int, margin: float) -> float:
    """The source normalizer's prior ratio among K: e^m / (e^m + K - 1)."""
    return math.exp(margin) / (math.exp(margin) + num_normalizers - 1)
