"""What EN and SN share: running-statistics buffers, statistics in the current mode, forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fused_affine import fused_affine
from .statistics import (
    InstanceStats,
    check_normalizers,
    distributed_world_size,
    mode_bn_stats,
    normalizer_stats,
    running_average_factor,
    synced_batch_stats,
    update_running_stats,
)


class MixedNorm2d(nn.Module):
    """Base of layers that mix several normalizers of an N x C x H x W input.

    Buffers mirror ``nn.BatchNorm2d`` (``running_mean``, ``running_var``,
    ``num_batches_tracked``) so the "bn" member behaves exactly like it:
    batch statistics in training (updating the running ones), running ones in eval.
    With ``sync_stats`` set (a plain attribute, not saved) and torch.distributed
    running with more than one process, training batch statistics cover the
    whole distributed batch, as ``nn.SyncBatchNorm`` does.
    """

    sync_stats: bool = False

    def __init__(
        self,
        num_features: int,
        normalizers: tuple[str, ...],
        eps: float,
        momentum: float | None,
        num_groups: int,
    ) -> None:
        super().__init__()
        self.normalizers = check_normalizers(normalizers)
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if "gn" in self.normalizers and (num_groups < 1 or num_features % num_groups):
            raise ValueError(f"num_groups={num_groups} must divide num_features={num_features}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.num_groups = num_groups
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Zero means, unit variances, no batches seen (as ``nn.BatchNorm2d``)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (N x C x H x W), got {x.dim()}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")

    def _bn_stats(self, stats: InstanceStats) -> tuple[tuple[Tensor, Tensor] | None, int]:
        """The bn member's (mean, var), 1 x C, in the current mode, and the samples they cover.

        Training: the batch's, over every process with ``sync_stats``; eval: the running ones;
        None without a bn member.
        """
        if "bn" not in self.normalizers:
            return None, 0
        if self.training and self.sync_stats and distributed_world_size() > 1:
            mean, var, samples = synced_batch_stats(stats)
            return (mean, var), samples
        bn = mode_bn_stats(stats.mean, stats.var, self.training, self.running_mean, self.running_var)
        return bn, stats.mean.shape[0] if self.training else 0

    def _statistics(self, stats: InstanceStats, update: bool) -> list[tuple[Tensor, Tensor]]:
        """Every normalizer's (mean, variance) in the current mode (shapes: ``normalizer_stats``).

        ``update`` advances the running statistics (training only), as a BN forward does.
        """
        bn, samples = self._bn_stats(stats)
        if update and self.training and bn is not None:
            self._update_running_stats(*bn, stats.count * samples)
        return normalizer_stats(stats.mean, stats.var, self.normalizers, self.num_groups, bn)

    def _update_running_stats(self, batch_mean: Tensor, batch_var: Tensor, count: int) -> None:
        """One BatchNorm running-statistics step; ``count`` elements per channel (N * H * W)."""
        self.num_batches_tracked.add_(1)
        factor = running_average_factor(self.momentum, self.num_batches_tracked)
        update_running_stats(self.running_mean, self.running_var, batch_mean, batch_var, count, factor)

    def _coefficients(self, stats: InstanceStats, update: bool) -> tuple[Tensor, Tensor]:
        """A, B (N x C) of ``Y = A * X + B``; ``update`` advances the running statistics."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        params = [p for p in self.parameters() if p.requires_grad]
        return fused_affine(x, lambda stats: self._coefficients(stats, update=True), params)
