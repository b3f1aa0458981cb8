"""``Y = A * X + B`` with coefficients computed from X's own statistics, as one autograd node.

EN and SN both normalize as ``Y = A * X + B``, where the N x C coefficients A, B are a
small function of X's per-(sample, channel) mean and variance (and of the layer's
parameters). Left to autograd, each big elementwise op over X records its own node and
temporaries: on CPU the backward then makes five or six X-sized passes and allocations
(``benchmarks/README.md``). ``_FusedAffine`` splits the work instead:

- the passes over X by hand: statistics (``statistics.moments``), the output, and in
  backward the two reductions ``sum(dY * X)``, ``sum(dY)`` and ``dX = A * dY + alpha * X + beta``;
- the small N x C math (pooled statistics, the ratio branch, the coefficients) by
  autograd, recorded on detached statistics inside forward and differentiated with
  ``torch.autograd.grad`` in backward.

Backward saves X, the N x C mean and A (as BatchNorm saves X, mean and invstd).
Double backward is not supported (``once_differentiable``). SN uses this node; EN runs the
whole-layer node of ``exemplar_function.py``, on one process and synced on many, and this one
only as the reference path (``set_fused_en(False)``).
The helpers here (``affine_apply``, ``affine_grads``, ``input_grad``, ``wide``) serve both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .statistics import InstanceStats, moments

Coefficients = Callable[[InstanceStats], tuple[Tensor, Tensor]]
"""Instance statistics -> (A, B), each N x C; may update running statistics (once per call)."""

BROADCAST_MIN_LENGTH = 16
"""From H * W = 16 up, multiply-then-add-in-place beats ``addcmul``'s broadcast loop on CPU
(measured in benchmarks/README.md); below it ``addcmul`` is faster."""


def affine_apply(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Y = A * X + B with per-(sample, channel) A, B (N x C), in X's dtype."""
    n, c = a.shape
    a = a.to(x.dtype).view(n, c, 1, 1)
    b = b.to(x.dtype).view(n, c, 1, 1)
    if x.shape[2] * x.shape[3] >= BROADCAST_MIN_LENGTH:
        return (x * a).add_(b)
    return torch.addcmul(b, a, x)


CHUNK_ELEMENTS = 1 << 20
"""Row-chunk size for ``row_dot``: temporaries of at most 4 MiB (float32), which the
allocator reuses, instead of one X-sized temporary that it maps and faults in each step."""


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) over the last axis of N x C x L, in chunks of samples so no X-sized temporary."""
    n = a.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, a[0].numel()))
    if step >= n:
        return (a * b).sum(-1)
    return torch.cat([(a[i : i + step] * b[i : i + step]).sum(-1) for i in range(0, n, step)])


def wide(t: Tensor) -> Tensor:
    """float32 or wider: statistics and reductions never run in half precision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def affine_grads(x: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """X and dY as N x C x L (float32+), and dL/dA = sum(dY X), dL/dB = sum(dY) per row."""
    xw, gw = wide(x).flatten(2), wide(grad_y).flatten(2)
    return xw, gw, row_dot(gw, xw), gw.sum(-1)


def input_grad(
    x: Tensor,
    xw: Tensor,
    gw: Tensor,
    a: Tensor,
    mean: Tensor,
    g_mean: Tensor | None,
    g_var: Tensor | None,
) -> Tensor:
    """dL/dX of ``Y = A X + B`` with A, B functions of X's instance mean and variance.

    dX = A dY + dL/dmean / L + 2 dL/dvar (X - mean) / L = A dY + alpha X + beta: two
    passes over X (``affine_apply``, then one in-place ``addcmul_``), in X's dtype.
    """
    length = xw.shape[-1]
    alpha = torch.zeros_like(mean) if g_var is None else g_var * (2.0 / length)
    beta = -alpha * mean
    if g_mean is not None:
        beta = beta + g_mean / length
    grad_x = affine_apply(gw.view(x.shape), a, beta)
    grad_x.view(xw.shape).addcmul_(alpha.unsqueeze(-1), xw)
    return grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)


class _FusedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, coefficients: Coefficients, *params: Tensor) -> Tensor:
        xw = wide(x).flatten(2)
        mean, var = moments(xw, one_pass=True)
        with torch.enable_grad():
            leaves = (mean.requires_grad_(), var.requires_grad_())
            a, b = coefficients(InstanceStats(mean=leaves[0], var=leaves[1], count=xw.shape[-1]))
        ctx.save_for_backward(x, mean.detach(), a.detach())
        ctx.graph = (a, b, leaves, params)
        return affine_apply(x, a.detach(), b.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, a = ctx.saved_tensors
        a_node, b_node, leaves, params = ctx.graph  # freed with ctx, when the outer graph goes
        xw, gw, grad_a, grad_b = affine_grads(x, grad_y)
        wanted = [t for t in (*leaves, *params) if t.requires_grad]
        found = torch.autograd.grad(
            (a_node, b_node), wanted, (grad_a, grad_b), retain_graph=True, allow_unused=True
        )
        by_id = {id(t): g for t, g in zip(wanted, found)}
        param_grads = tuple(by_id.get(id(p)) for p in params)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(
                x, xw, gw, a, mean, by_id.get(id(leaves[0])), by_id.get(id(leaves[1]))
            )
        return (grad_x, None, *param_grads)


# The nested autograd graph cannot be traced; compiled models call it eagerly.
@torch.compiler.disable
def fused_affine(x: Tensor, coefficients: Coefficients, params: Sequence[Tensor]) -> Tensor:
    """``A * X + B`` with (A, B) = coefficients(instance statistics of X).

    ``params`` are every tensor ``coefficients`` reads that may need a gradient (the
    layer's parameters). Without autograd (inference, ``no_grad``) nothing is recorded.
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _FusedAffine.apply(x, coefficients, *params)
    xw = wide(x).flatten(2)
    mean, var = moments(xw, one_pass=False)
    a, b = coefficients(InstanceStats(mean=mean, var=var, count=xw.shape[-1]))
    return affine_apply(x, a, b)
