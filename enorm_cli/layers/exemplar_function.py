"""The whole EN layer as one autograd node with a hand-written backward (the fast path).

On CPU a small op costs a few microseconds whatever its size, and EN's math is a few
hundred of them when autograd records every one (the ratio branch, the coefficients,
the pooled statistics, their backward): about 1.4 ms per layer, against 0.1-0.2 ms for
BatchNorm on MobileNetV2's small maps (benchmarks/README.md). This function does the
same math in some 35 ops forward and 60 backward, batched over the K normalizers as
K x N x C tensors, and touches X only in the passes it must: statistics (2 reads),
output (1 write), and in backward ``sum(dY X)``, ``sum(dY)`` and ``dX = A dY + alpha X + beta``.

Notation (``docs/en-layer.md``): m, v are the per-(n, c) mean and variance of X; M, S
(K x N x C) every normalizer's mean and variance broadcast to N x C; R = (S + eps)^-1/2;
D = m - M; Xhat = D R; z the grouped conv of Xhat; lambda = softmax(FC2(act(FC1(z z^T))));
A = sum_k lambda_k gamma_k R_k; B = lambda beta - sum_k lambda_k gamma_k R_k M_k. FC2 is
``b + s W h`` with the layer's ``logit_scale`` s (``exemplar_norm.default_logit_scale``).

Used in every mode except distributed synced statistics (``MixedNorm2d.sync_stats``),
which runs the plain autograd path of ``ExemplarNorm2d._coefficients``; both are
checked against the float64 reference and by gradcheck in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused_affine import affine_apply, affine_grads, input_grad, wide
from .statistics import moments, pool_stats


@dataclass(frozen=True)
class ENConfig:
    """The layer's settings the math reads."""

    normalizers: tuple[str, ...]
    eps: float
    relu: bool
    shared_affine: bool
    num_groups: int
    training: bool
    logit_scale: float = 1.0


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _group_view(t: Tensor, groups: int) -> Tensor:
    return t.unflatten(1, (groups, t.shape[1] // groups))


def _stack_stats(
    cfg: ENConfig, m: Tensor, v: Tensor, running: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """M, S (K x N x C) and the bn batch statistics (2 x C) for the running update, or None."""
    n, c = m.shape
    means, variances, batch = [], [], None
    for name in cfg.normalizers:
        if name == "bn" and cfg.training:
            mean, var = pool_stats(m, v, 0)
            batch = torch.cat([mean, var])
        elif name == "bn":
            mean, var = running[0].unsqueeze(0), running[1].unsqueeze(0)
        elif name == "ln":
            mean, var = pool_stats(m, v, 1)
        elif name == "gn":
            mean, var = pool_stats(
                _group_view(m, cfg.num_groups), _group_view(v, cfg.num_groups), 2
            )
            mean, var = (
                mean.expand(-1, -1, c // cfg.num_groups).flatten(1),
                var.expand(-1, -1, c // cfg.num_groups).flatten(1),
            )
        else:  # "in"
            mean, var = m, v
        means.append(_to(mean, m.dtype).expand(n, c))
        variances.append(_to(var, m.dtype).expand(n, c))
    return torch.stack(means), torch.stack(variances), batch


class ENTensors(NamedTuple):
    """Every tensor the math reads besides x, in ``ExemplarNormFunction.apply``'s order."""

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor
    bias: Tensor
    conv: Tensor | None
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor


def exemplar_norm(
    x: Tensor, cfg: ENConfig, p: ENTensors
) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
    """EN(x) without autograd: y, the bn batch statistics (2 x C, training) and what backward needs."""
    xw = wide(x).flatten(2)
    m, v = moments(xw, one_pass=cfg.training)
    dt = m.dtype
    n, c = m.shape
    big_m, big_s, batch = _stack_stats(cfg, m, v, (p.running_mean, p.running_var))
    rstd = big_s.add_(cfg.eps).rsqrt_()  # K x N x C
    dev = m - big_m
    xhat = dev * rstd
    if p.conv is None:
        z = xhat
    else:
        groups = p.conv.shape[0]
        z = (xhat * _to(p.conv, dt).view(c)).unflatten(2, (groups, c // groups)).sum(-1)  # K x N x G
    zt = z.transpose(0, 1)  # N x K x G
    vv = torch.bmm(zt, zt.transpose(1, 2)).flatten(1)  # N x K^2
    h = torch.addmm(_to(p.fc1_b, dt), vv, _to(p.fc1_w, dt).t())
    h = h.relu_() if cfg.relu else h.tanh_()
    logits = torch.addmm(_to(p.fc2_b, dt), h, _to(p.fc2_w, dt).t(), alpha=cfg.logit_scale)
    lam = torch.softmax(logits, dim=1)  # N x K
    gamma, beta = _to(p.weight, dt), _to(p.bias, dt)
    # lambda_k gamma_k R_k, K x N x C
    mixed = (lam.t().unsqueeze(-1) * gamma.unsqueeze(1)).mul_(rstd)
    a = mixed.sum(0)
    b = (beta.expand(n, c) if cfg.shared_affine else lam @ beta) - (mixed.mul_(big_m)).sum(0)
    return affine_apply(x, a, b), batch, (m, big_m, rstd, dev, lam, h, vv, zt, a)


class ExemplarNormFunction(torch.autograd.Function):
    """y, bn batch statistics (2 x C or empty) = EN(x), as one node with a hand-written backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cfg: ENConfig, *tensors: Tensor | None) -> tuple[Tensor, Tensor]:
        p = ENTensors(*tensors)
        y, batch, saved = exemplar_norm(x, cfg, p)
        ctx.cfg = cfg
        ctx.save_for_backward(x, *saved, p.weight, p.bias, p.conv, p.fc1_w, p.fc2_w)
        batch = batch if batch is not None else saved[0].new_empty(0)
        ctx.mark_non_differentiable(batch)
        return y, batch

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, _grad_batch: Tensor | None) -> tuple[Tensor | None, ...]:
        cfg: ENConfig = ctx.cfg
        x, m, big_m, rstd, dev, lam, h, vv, zt, a, weight, bias, conv, fc1_w, fc2_w = (
            ctx.saved_tensors
        )
        dt = m.dtype
        n, c = m.shape
        k = len(cfg.normalizers)
        xw, gw, da, db = affine_grads(x, grad_y)  # dL/dA, dL/dB: N x C
        gamma, beta = _to(weight, dt), _to(bias, dt)
        lam_t = lam.t().unsqueeze(-1)  # K x N x 1
        scale = gamma.unsqueeze(1) * rstd

        # A = sum_k lambda_k scale_k, B = lambda beta - sum_k lambda_k scale_k M_k.
        g_mixed = torch.addcmul(da, db, big_m, value=-1.0)  # K x N x C
        g_lam = (g_mixed * scale).sum(-1).t()  # N x K
        if cfg.shared_affine:
            g_beta = db.sum(0, keepdim=True)
        else:
            g_lam = g_lam + db @ beta.t()
            g_beta = lam.t() @ db
        g_scale = g_mixed * lam_t
        g_gamma = (g_scale * rstd).sum(1)
        if cfg.shared_affine:
            g_gamma = g_gamma.sum(0, keepdim=True)
        g_rstd = g_scale * gamma.unsqueeze(1)
        g_big_m = (lam_t * scale).mul_(db).neg_()

        # lambda -> softmax -> FC2 -> act -> FC1 -> z z^T -> z.
        g_logits = lam * (g_lam - (lam * g_lam).sum(1, keepdim=True))
        g_fc2_w, g_fc2_b = (g_logits.t() @ h).mul_(cfg.logit_scale), g_logits.sum(0)
        g_h = (g_logits @ _to(fc2_w, dt)).mul_(cfg.logit_scale)
        g_h = g_h * (h > 0) if cfg.relu else g_h * (1 - h * h)
        g_fc1_w, g_fc1_b = g_h.t() @ vv, g_h.sum(0)
        g_vv = (g_h @ _to(fc1_w, dt)).view(n, k, k)
        g_z = torch.bmm(g_vv + g_vv.transpose(1, 2), zt).transpose(0, 1)  # K x N x G

        # z -> Xhat = D R -> m, M, R (and the conv weight).
        xhat = dev * rstd
        g_conv = None
        if conv is None:
            g_xhat = g_z
        else:
            groups = conv.shape[0]
            g_zx = g_z.unsqueeze(-1)  # K x N x G x 1
            g_conv = (xhat.unflatten(2, (groups, c // groups)) * g_zx).sum((0, 1)).view(conv.shape)
            g_xhat = (g_zx * _to(conv, dt).view(groups, c // groups)).flatten(2)
        g_rstd = g_rstd.addcmul_(g_xhat, dev)
        g_dev = g_xhat * rstd
        g_m = g_dev.sum(0)
        g_big_m = g_big_m.sub_(g_dev)
        g_big_s = g_rstd.mul_(rstd.pow(3)).mul_(-0.5)

        # M, S -> each normalizer's statistics -> m, v. Pooled ones (law of total variance):
        # d mean/dm = 1/count, d var/dv = 1/count, d var/dm = 2 (m - mean)/count.
        g_v = torch.zeros_like(m)
        for i, name in enumerate(cfg.normalizers):
            if name == "bn" and not cfg.training:
                continue  # running statistics are constants
            if name == "in":
                g_m += g_big_m[i]
                g_v += g_big_s[i]
                continue
            dim = {"bn": 0, "ln": 1, "gn": 2}[name]

            def view(t: Tensor, grouped: bool = name == "gn") -> Tensor:
                return _group_view(t, cfg.num_groups) if grouped else t

            count = view(m).shape[dim]
            g_mean = view(g_big_m[i]).sum(dim, keepdim=True) / count
            g_var = view(g_big_s[i]).sum(dim, keepdim=True) / count
            view(g_m).add_(g_mean).addcmul_(view(dev[i]), g_var, value=2.0)
            view(g_v).add_(g_var)

        grad_x = input_grad(x, xw, gw, a, m, g_m, g_v) if ctx.needs_input_grad[0] else None

        def cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if g is None or like is None else _to(g, like.dtype)

        return (
            grad_x,
            None,
            None,
            None,
            cast(g_gamma, weight),
            cast(g_beta, bias),
            cast(g_conv, conv),
            cast(g_fc1_w, fc1_w),
            cast(g_fc1_b, fc1_w),
            cast(g_fc2_w, fc2_w),
            cast(g_fc2_b, fc2_w),
        )
