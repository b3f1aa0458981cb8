"""SyncBatchNorm that also runs on CPU (gloo), so the BatchNorm baseline can follow EN's rule.

torch's ``nn.SyncBatchNorm`` raises on CPU tensors: its kernels are CUDA's. Where EN syncs
its bn statistics over processes, a BatchNorm that does not would be an unfair baseline
(each process normalizing over its own few images), so on CPU the converted layers take
this function instead. It is torch's algorithm on torch ops: the forward gathers every
process's per-channel mean, variance and count (one collective) and pools them; the
backward all-reduces the two per-channel gradient sums (one collective), as
``torch.nn.modules._functions.SyncBatchNorm`` does with its CUDA kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .statistics import running_average_factor


def _channel_view(t: Tensor, dim: int) -> Tensor:
    """1 x C x 1 ... so a per-channel vector broadcasts over an input of ``dim`` dimensions."""
    return t.reshape(1, -1, *([1] * (dim - 2)))


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalization over the whole distributed batch, with a hand-written backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        factor: float,
        group: Any,
        world_size: int,
    ) -> Tensor:
        import torch.distributed as dist

        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=mean.dtype)
        local = torch.cat([mean, var, count])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)
        c = x.shape[1]
        counts = table[:, -1:]
        total = counts.sum()
        mean = (table[:, :c] * counts).sum(0) / total
        var = ((table[:, c : 2 * c] + (table[:, :c] - mean).square()) * counts).sum(0) / total
        if running_mean is not None and running_var is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            unbiased = var * (total / (total - 1).clamp(min=1))
            running_var.lerp_(unbiased.to(running_var.dtype), factor)
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.group, ctx.eps = group, eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        """torch's eval-mode BatchNorm backward kernel (``dy / sigma`` scaled by gamma, and the
        local sums of dy and dy * xhat in the same call), then the global mean terms, per
        channel ``a * x + b``, subtracted in two in-place passes."""
        import torch.distributed as dist

        x, weight, mean, var, total = ctx.saved_tensors
        has_affine = weight is not None
        grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), x, weight, mean, var, None, None, False, ctx.eps, [True] * 3
        )
        grad_weight = sum_dy_xhat.clone() if has_affine else None
        grad_bias = sum_dy.clone() if has_affine and ctx.needs_input_grad[2] else None
        reduced = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(reduced, group=ctx.group)
        c = x.shape[1]
        invstd = (var + ctx.eps).rsqrt()
        scale = invstd * weight if has_affine else invstd
        mean_dy, mean_dy_xhat = reduced[:c] / total, reduced[c:] / total
        slope = scale * invstd * mean_dy_xhat  # xhat * mean(dy xhat) = slope * x + ...
        offset = scale * mean_dy - slope * mean
        grad_x = grad_x.sub_(_channel_view(offset, x.dim()))
        grad_x = grad_x.addcmul_(x, _channel_view(slope, x.dim()), value=-1)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def synced_forward(layer: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor | None:
    """``layer``'s batch normalization over every process, or None where nothing is synced
    (eval, one process, no process group, or a tensor not on CPU)."""
    import torch.distributed as dist

    if not (layer.training and x.device.type == "cpu" and dist.is_available()):
        return None
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    factor = 0.0
    if layer.track_running_stats and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.add_(1)
        factor = running_average_factor(layer.momentum, layer.num_batches_tracked)
    tracked = layer.track_running_stats
    return SyncBatchNormFunction.apply(
        x,
        layer.weight,
        layer.bias,
        layer.running_mean if tracked else None,
        layer.running_var if tracked else None,
        layer.eps,
        factor,
        dist.group.WORLD,
        dist.get_world_size(),
    )


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training step syncs its statistics over CPU processes.

    Not an ``nn.SyncBatchNorm``: DDP refuses those on CPU modules.
    """

    def forward(self, input: Tensor) -> Tensor:
        out = synced_forward(self, input)
        return super().forward(input) if out is None else out


@functools.cache
def _sync_act_class() -> type[nn.Module]:
    from timm.layers import BatchNormAct2d

    class CpuSyncBatchNormAct2d(BatchNormAct2d):
        """timm's ``BatchNormAct2d`` (norm, then drop and act) with ``synced_forward``."""

        def forward(self, x: Tensor) -> Tensor:
            out = synced_forward(self, x)
            if out is None:
                return super().forward(x)
            return self.act(self.drop(out))

    return CpuSyncBatchNormAct2d


def cpu_syncable(model: nn.Module) -> nn.Module:
    """Sync the model's BatchNorm2d and timm BatchNormAct2d layers over CPU processes.

    Only the class changes: parameters, buffers and state dict keys stay as they are.
    """
    from timm.layers import BatchNormAct2d

    act_class = _sync_act_class()
    for module in model.modules():
        if type(module) is BatchNormAct2d:
            module.__class__ = act_class
        elif type(module) is nn.BatchNorm2d:
            module.__class__ = CpuSyncBatchNorm2d
    return model
