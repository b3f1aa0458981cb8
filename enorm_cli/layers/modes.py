"""How EN/SN layers take their bn statistics while a model trains: one call each, for the
CLI's loop and for users' own loops (as timm's ``freeze_batch_norm_2d`` and torch's
``SyncBatchNorm.convert_sync_batchnorm`` are one call)."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from .base import MixedNorm2d

BN_STATS = ("batch", "running", "renorm", "renorm_frozen")
"""The bn statistics modes (a recipe's ``model.bn_stats``; docs/stability.md)."""

RUNNING_STATS_LAYERS = (nn.modules.batchnorm._BatchNorm, MixedNorm2d)
"""The layer types that keep running statistics: torch's BatchNorms and EN/SN layers."""

M = TypeVar("M", bound=nn.Module)


def set_bn_stats(model: M, mode: str) -> M:
    """``model.train()`` with the bn statistics ``mode``; returns the model, as ``train()``.

    - "batch": the batch's statistics, as BatchNorm trains.
    - "running": every BatchNorm and EN/SN layer in eval mode. There these layers normalize
      with their running statistics and leave them as they are, while gradients still reach
      their affines (and EN's ratio branch; IN and LN are the same in both modes): BatchNorm
      becomes a frozen-statistics BatchNorm with a trainable affine, EN a per-sample
      normalizer with no batch dependence. ``model.train()`` undoes this: call
      ``set_bn_stats`` where you would call ``model.train()``.
    - "renorm": EN/SN layers batch-renormalize their bn member (``MixedNorm2d.renorm``).
    - "renorm_frozen": the same against running statistics that training leaves as they are
      (``MixedNorm2d.frozen_stats``), the source's: what small batches (detection,
      segmentation) want, and what ``model.bn_stats: auto`` picks for them.

    The renorm flags are attributes of the layers and survive ``train()``/``eval()``.
    """
    if mode not in BN_STATS:
        raise ValueError(f"bn statistics mode must be one of {', '.join(BN_STATS)}, got {mode!r}")
    model.train()
    for module in model.modules():
        if isinstance(module, MixedNorm2d):
            module.renorm = mode in ("renorm", "renorm_frozen")
            module.frozen_stats = mode == "renorm_frozen"
        if mode == "running" and isinstance(module, RUNNING_STATS_LAYERS):
            module.eval()
    return model


def set_sync_stats(model: M, enabled: bool = True) -> M:
    """Cross-process bn statistics on or off in every EN/SN layer (as ``nn.SyncBatchNorm``;
    in effect only with torch.distributed running more than one process); returns the model."""
    for module in model.modules():
        if isinstance(module, MixedNorm2d):
            module.sync_stats = enabled
    return model
