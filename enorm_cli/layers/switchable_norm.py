"""Switchable Normalization (SN; Luo et al., ICLR 2019), the baseline EN is measured against.

Official semantics (switchablenorms/Switchable-Normalization, ``SwitchNorm2d``):
one static softmax over the normalizers' means and a separate one over their
variances, the mixed statistics normalize X, then one affine pair. Two
deliberate differences from that code, both shared with EN through
``statistics.py``: variances are biased everywhere (the official code's unbiased
instance variance is NaN on 1x1 maps), and running statistics follow PyTorch's
``momentum`` convention (0.1 here is the official 0.9/0.997 "keep" factor's complement).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import MixedNorm2d
from .source import SourceNorm
from .statistics import InstanceStats


class SwitchableNorm2d(MixedNorm2d):
    """Switchable Normalization for N x C x H x W inputs.

    Parameters: ``weight``, ``bias`` (C,), ``mean_weight`` and ``var_weight`` (K,),
    the softmax logits of the static mixing ratios (ones at init: uniform ratios).
    Buffers as ``nn.BatchNorm2d``.
    """

    _version = 2
    """2: the frozen-statistics guard's buffers (``MixedNorm2d._load_from_state_dict``)."""
    kind = "sn"

    def __init__(
        self,
        num_features: int,
        normalizers: tuple[str, ...] = ("bn", "in", "ln"),
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        num_groups: int = 32,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, normalizers, eps, momentum, num_groups, device, dtype)
        k = len(self.normalizers)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.mean_weight = nn.Parameter(torch.empty(k, **factory))
        self.var_weight = nn.Parameter(torch.empty(k, **factory))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.mean_weight.fill_(1.0)
            self.var_weight.fill_(1.0)

    def reset_parameters(self) -> None:
        """Unit gamma, zero beta, uniform ratios, fresh running statistics."""
        self.reset_running_stats()
        self._reset_parameters()

    def _start_as(self, src: SourceNorm, prior: Tensor, lam_src: float) -> None:
        """The source's affine, and the prior as both ratio logits (near the source, not at it)."""
        self.weight.copy_(src.gamma())
        self.bias.copy_(src.beta())
        self.mean_weight.copy_(prior)
        self.var_weight.copy_(prior)

    def ratio_parameters(self) -> list[nn.Parameter]:
        return [self.mean_weight, self.var_weight]

    @staticmethod
    def prior_ratio_logits(read: Callable[[str], Tensor]) -> tuple[Tensor, bool]:
        """The mean ratios' logits: SN's ratios never depend on the input."""
        return read("mean_weight"), True

    def mean_ratios(self) -> Tensor:
        """Softmax of ``mean_weight``: how the means are mixed (K,)."""
        return torch.softmax(self.mean_weight, dim=0)

    def var_ratios(self) -> Tensor:
        """Softmax of ``var_weight``: how the variances are mixed (K,)."""
        return torch.softmax(self.var_weight, dim=0)

    def ratios(self, x: Tensor) -> Tensor:
        """The mean ratios, the same for every sample (N x K): SN's ratios are static."""
        return self.mean_ratios().unsqueeze(0).expand(x.shape[0], -1)

    def _coefficients(self, stats: InstanceStats) -> tuple[Tensor, Tensor, Tensor | None]:
        """A = gamma / sqrt(sum_k w_k var_k + eps), B = beta - A sum_k w'_k mu_k."""
        pairs, record = self._statistics(stats)
        mw = self.mean_ratios().to(stats.mean.dtype)
        vw = self.var_ratios().to(stats.mean.dtype)
        mean = sum(w * m for w, (m, _) in zip(mw, pairs))
        var = sum(w * v for w, (_, v) in zip(vw, pairs))
        a = (self.weight.to(var.dtype) * torch.rsqrt(var + self.eps)).expand_as(stats.mean)
        return a, torch.addcmul(self.bias.to(var.dtype), a, mean, value=-1.0).expand_as(a), record

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, normalizers={self.normalizers}, "
            f"eps={self.eps}, momentum={self.momentum}"
        )
