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
A = sum_k w_k gamma_k R_k; B = w beta - sum_k w_k gamma_k R_k M_k with the mixing weights
w = lambda + o (o: the layer's ``mix_offset``, 0 unless an anchored conversion set it). FC2
is ``b + s W h`` with the layer's ``logit_scale`` s (``exemplar_norm.default_logit_scale``).

The forward math is defined once, ``en_coefficients`` (the bn member from
``statistics.bn_member_stats``, the others from ``statistics.normalizer_stats``, the ratio
branch ``ratio_logits``, the coefficients). This node runs it without autograd and
differentiates it by hand, on one process and, with synced statistics, on many: the bn
member's sums are all-reduced in the forward and its two gradient sums in the backward, as
torch's SyncBatchNorm does. ``ratios()`` and ``set_fused_en(False)`` (the test reference)
run the same function under autograd. Both paths are checked against the float64
reference, against each other, and by gradcheck in the tests.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native, triton_ops
from .fused_affine import affine_apply, affine_grads, input_grad, wide
from .kernel_inputs import ENTensors, KernelSettings
from .statistics import (
    BnMember,
    all_reduce_sum,
    bn_member_stats,
    frozen_gradient_scale,
    frozen_gradient_share,
    mixed_stats,
    moments,
)


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _group_view(t: Tensor, groups: int) -> Tensor:
    return t.unflatten(1, (groups, t.shape[1] // groups))


def bn_member(
    cfg: KernelSettings, m: Tensor, v: Tensor, p: ENTensors, count: int
) -> BnMember | None:
    """The bn member's statistics in the current mode (``statistics.bn_member_stats``), None
    without bn."""
    return bn_member_stats(cfg, m, v, count, p.running_mean, p.running_var, p.stale)


def stacked_stats(
    cfg: KernelSettings, m: Tensor, v: Tensor, p: ENTensors, count: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """M, S (K x N x C) from the instance table (count: H * W), with the bn member's record
    for the running statistics (2 x C, training), Batch Renormalization's r, d (2 x C, with
    ``cfg.renorm`` in training) and the samples synced statistics cover (``cfg.synced``):
    ``statistics.mixed_stats``, stacked.
    """
    n, c = m.shape
    pairs, member = mixed_stats(cfg, m, v, count, p.running_mean, p.running_var, p.stale)
    means = torch.stack([mean.expand(n, c) for mean, _ in pairs])
    variances = torch.stack([var.expand(n, c) for _, var in pairs])
    if member is None:
        return means, variances, None, None, None
    return means, variances, member.record, member.rd, member.samples


def ratio_logits(
    xhat: Tensor,
    conv: Tensor | None,
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
    relu: bool,
    logit_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ratio branch: xhat (K x N x C) -> logits (N x K), with h, v = z z^T and z^T (N x K x G).

    z = the grouped kernel-1 conv of xhat over the K axis, as a multiply and a sum per group
    (the conv's G x C/G x 1 weights; CPU's grouped conv is slow), v = z z^T,
    h = act(FC1(v)), logits = b + s W h with s = ``logit_scale``.
    """
    dt = xhat.dtype
    c = xhat.shape[2]
    if conv is None:
        z = xhat
    else:
        groups = conv.shape[0]
        z = (xhat * _to(conv, dt).view(c)).unflatten(2, (groups, c // groups)).sum(-1)  # K x N x G
    zt = z.transpose(0, 1)  # N x K x G
    vv = torch.bmm(zt, zt.transpose(1, 2)).flatten(1)  # N x K^2
    h = torch.addmm(_to(fc1_b, dt), vv, _to(fc1_w, dt).t())
    if torch.is_grad_enabled():
        h = h.relu() if relu else h.tanh()
    else:  # in place where autograd is not recording (the fused node, inference)
        h = h.relu_() if relu else h.tanh_()
    logits = torch.addmm(_to(fc2_b, dt), h, _to(fc2_w, dt).t(), alpha=logit_scale)
    return logits, h, vv, zt


def en_coefficients(
    cfg: KernelSettings, m: Tensor, v: Tensor, p: ENTensors, count: int
) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor | None, ...]]:
    """EN's math from the instance table (count: H * W): A, B (N x C), the bn member's record
    for the running statistics (``stacked_stats``), and saved.

    The one definition: the one-node path runs it without autograd and differentiates it by
    hand (``ExemplarNormFunction.backward``); ``ratios()`` and the reference path
    (``fused_en(False)``) run it under autograd (out-of-place ops then, in place otherwise).
    ``saved`` is (m, M, R, D, lambda, h, v, z^T, A, rd, samples), what the hand-written
    backward reads (rd: Batch Renormalization's r, d, or None; samples: the synced bn
    statistics' sample count, or None).
    """
    dt = m.dtype
    n, c = m.shape
    # In place where autograd is not recording (the fused node's forward, inference): the
    # K x N x C temporaries are what this math allocates, and fresh ones cost on CPU.
    inplace = not torch.is_grad_enabled()
    big_m, big_s, batch, rd, samples = stacked_stats(cfg, m, v, p, count)
    rstd = big_s.add_(cfg.eps).rsqrt_() if inplace else (big_s + cfg.eps).rsqrt()  # K x N x C
    dev = m - big_m
    logits, h, vv, zt = ratio_logits(
        dev * rstd, p.conv, p.fc1_w, p.fc1_b, p.fc2_w, p.fc2_b, cfg.relu, cfg.logit_scale
    )
    lam = torch.softmax(logits, dim=1)  # N x K
    mix = mixing_weights(lam, p.offset)
    gamma, beta = _to(p.weight, dt), _to(p.bias, dt)
    mixed = mix.t().unsqueeze(-1) * gamma.unsqueeze(1)  # w_k gamma_k R_k, K x N x C
    mixed = mixed.mul_(rstd) if inplace else mixed * rstd
    a = mixed.sum(0)
    mixed = mixed.mul_(big_m) if inplace else mixed * big_m
    b = (beta.expand(n, c) if cfg.shared_affine else mix @ beta) - mixed.sum(0)
    return a, b, batch, (m, big_m, rstd, dev, lam, h, vv, zt, a, rd, samples)


def mixing_weights(lam: Tensor, offset: Tensor | None) -> Tensor:
    """w = lambda + o (N x K): what multiplies each normalizer's output. o is an anchored
    conversion's e_src - prior (``ExemplarNorm2d.mix_offset``), so w starts one-hot on the
    source normalizer while every gamma carries the source's; zero (None) for a fresh layer
    and the paper's start, where w = lambda. Its sum is 1 either way."""
    return lam if offset is None else lam + _to(offset, lam.dtype)


Kernel = tuple[ModuleType, list[Any]]
"""The C++ kernel a node ran and the arguments it gave it (``native.layer_arguments``)."""


def native_exemplar_norm(
    module: ModuleType, x: Tensor, cfg: KernelSettings, p: ENTensors
) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...], list[Any]]:
    """``exemplar_norm`` through the C++ kernel (``native``): the instance table, the bn
    member's statistics as ``bn_member`` takes them (synced, renormalized), then the
    coefficients and Y in one call. saved = (m, v, the bn member's mean and variance, A, v,
    h, lambda, rd, samples), with the kernel's arguments: ``native.en_backward`` recomputes
    the rest."""
    m, v = native.en_moments(module, x)
    member = bn_member(cfg, m, v, p, x.shape[2] * x.shape[3])
    bn_mean, bn_var = (None, None) if member is None else (member.mean, member.var)
    args = native.layer_arguments(cfg, p, x, bn_mean, bn_var)
    out = native.en_forward(module, x, m, v, args)
    saved = (m, v, bn_mean, bn_var, out.a, out.vv, out.h, out.lam)
    if member is None:
        return out.y, None, (*saved, None, None), args
    return out.y, member.record, (*saved, member.rd, member.samples), args


def exemplar_norm(
    x: Tensor,
    cfg: KernelSettings,
    p: ENTensors,
    module: ModuleType | None = None,
    triton: bool = False,
) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...], Kernel | None]:
    """EN(x) without autograd: y, the bn member's record for the running statistics (2 x C,
    training), what backward needs, and the C++ kernel that ran with its arguments. ``module``
    is the C++ kernel ``runtime.choose`` picked (None: the tensor ops, ``en_coefficients``);
    ``triton``: the passes over X as Triton kernels (``triton_ops``) around the same math."""
    if module is not None:
        y, batch, saved, args = native_exemplar_norm(module, x, cfg, p)
        return y, batch, saved, (module, args)
    if triton:
        m, v = triton_ops.moments(x)
        a, b, batch, saved = en_coefficients(cfg, m, v, p, x.shape[2] * x.shape[3])
        return triton_ops.affine_apply(x, a, b), batch, saved, None
    xw = wide(x).flatten(2)
    m, v = moments(xw, one_pass=cfg.training)
    a, b, batch, saved = en_coefficients(cfg, m, v, p, xw.shape[-1])
    return affine_apply(x, a, b), batch, saved, None


def hidden_mean(saved: tuple[Tensor | None, ...], kernel: Kernel | ModuleType | None) -> Tensor:
    """The batch's mean of the ratio branch's hidden units h (pi K), from what a forward saved
    (the C++ kernel's layout where ``kernel`` ran, ``en_coefficients``' otherwise): what a
    centered branch's running mean follows."""
    h = saved[6] if kernel is not None else saved[5]
    return h.detach().mean(0)


def bn_member_grad(
    cfg: KernelSettings,
    sums: Tensor,
    m: Tensor,
    bn_mean: Tensor,
    bn_rstd: Tensor,
    rd: Tensor | None,
    samples: Tensor | None,
    stale: Tensor | None,
    count: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The bn member's batch statistics in the hand-written backward: from ``sums`` (2 x C, the
    gradients of M_bn and S_bn summed over the local samples) to dL/dmean, dL/dvar (1 x C) and
    m minus the batch mean (N x C); the caller adds ``g_mean + 2 dev g_var`` to dL/dm and
    ``g_var`` to dL/dv. Synced: the sums over every process (SyncBatchNorm's backward).
    Renormalized (``statistics.renormalized_stats``): M = mean - d sigma / r and
    S = (var + eps) / r^2 - eps with r, d constants, and R = r / sigma; with few values per
    channel the frozen statistics take a share (``frozen_gradient_share``). count: H * W."""
    n = m.shape[0]
    if samples is not None:
        sums = all_reduce_sum(sums.reshape(-1)).view_as(sums)
        g_mean, g_var = (sums / samples.view(())).unsqueeze(1).unbind(0)
    else:
        g_mean, g_var = (sums / n).unsqueeze(1).unbind(0)
    dev = m - bn_mean
    if rd is not None:
        r, d = rd[0:1], rd[1:2]
        dev = dev - d / bn_rstd  # m - the batch mean
        g_var = g_var / r.square() - g_mean * d * bn_rstd / (2 * r.square())
        share = frozen_gradient_share(n, count, samples is not None) if cfg.frozen_stats else 0.0
        if share:  # few values per channel: part of the frozen statistics' gradient
            scale = frozen_gradient_scale(share, stale)
            g_mean, g_var = g_mean * scale, g_var * scale
    return g_mean, g_var, dev


def coefficients_backward(
    cfg: KernelSettings,
    saved: tuple[Tensor | None, ...],
    p: ENTensors,
    da: Tensor,
    db: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor | None, ...]]:
    """``en_coefficients``' backward in tensor ops: dL/dA, dL/dB (N x C) -> dL/dm, dL/dv
    through every normalizer's statistics but the bn member's batch statistics, whose two
    gradient sums (2 x C, training) come back for ``bn_member_grad``, and the parameters'
    gradients (gamma, beta, conv, fc1 weight, fc1 bias, fc2 weight, fc2 bias)."""
    m, big_m, rstd, dev, lam, h, vv, zt, _a, _rd, _samples = saved
    dt = m.dtype
    n, c = m.shape
    k = len(cfg.normalizers)
    gamma, beta = _to(p.weight, dt), _to(p.bias, dt)
    mix = mixing_weights(lam, p.offset)
    mix_t = mix.t().unsqueeze(-1)  # K x N x 1
    scale = gamma.unsqueeze(1) * rstd

    # A = sum_k w_k scale_k, B = w beta - sum_k w_k scale_k M_k; w = lambda + o, dw/dlambda = 1.
    g_mixed = torch.addcmul(da, db, big_m, value=-1.0)  # K x N x C
    g_lam = (g_mixed * scale).sum(-1).t()  # N x K
    if cfg.shared_affine:
        g_beta = db.sum(0, keepdim=True)
    else:
        g_lam = g_lam + db @ beta.t()
        g_beta = mix.t() @ db
    g_scale = g_mixed * mix_t
    g_gamma = (g_scale * rstd).sum(1)
    if cfg.shared_affine:
        g_gamma = g_gamma.sum(0, keepdim=True)
    g_rstd = g_scale * gamma.unsqueeze(1)
    g_big_m = (mix_t * scale).mul_(db).neg_()

    # lambda -> softmax -> FC2 -> act -> FC1 -> z z^T -> z.
    g_logits = lam * (g_lam - (lam * g_lam).sum(1, keepdim=True))
    g_fc2_w, g_fc2_b = (g_logits.t() @ h).mul_(cfg.logit_scale), g_logits.sum(0)
    g_h = (g_logits @ _to(p.fc2_w, dt)).mul_(cfg.logit_scale)
    g_h = g_h * (h > 0) if cfg.relu else g_h * (1 - h * h)
    g_fc1_w, g_fc1_b = g_h.t() @ vv, g_h.sum(0)
    g_vv = (g_h @ _to(p.fc1_w, dt)).view(n, k, k)
    g_z = torch.bmm(g_vv + g_vv.transpose(1, 2), zt).transpose(0, 1)  # K x N x G

    # z -> Xhat = D R -> m, M, R (and the conv weight).
    xhat = dev * rstd
    g_conv = None
    conv = p.conv
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
    bn_sums = None
    for i, name in enumerate(cfg.normalizers):
        if name == "bn":
            if cfg.training:  # else running statistics, constants
                bn_sums = torch.stack([g_big_m[i].sum(0), g_big_s[i].sum(0)])
            continue
        if name == "in":
            g_m += g_big_m[i]
            g_v += g_big_s[i]
            continue
        dim = 1 if name == "ln" else 2

        def view(t: Tensor, grouped: bool = name == "gn") -> Tensor:
            return _group_view(t, cfg.num_groups) if grouped else t

        count = view(m).shape[dim]
        g_mean = view(g_big_m[i]).sum(dim, keepdim=True) / count
        g_var = view(g_big_s[i]).sum(dim, keepdim=True) / count
        view(g_m).add_(g_mean).addcmul_(view(dev[i]), g_var, value=2.0)
        view(g_v).add_(g_var)
    return g_m, g_v, bn_sums, (g_gamma, g_beta, g_conv, g_fc1_w, g_fc1_b, g_fc2_w, g_fc2_b)


class ExemplarNormFunction(torch.autograd.Function):
    """y, the bn member's record (2 x C or empty), the batch's mean of h (pi K) = EN(x), as one
    node with a hand-written
    backward: the C++ kernel's (``native``) where the forward ran on it (``runtime.choose``),
    the tensor ops' (``coefficients_backward``) otherwise. With ``cfg.synced`` the bn statistics
    and their gradient sums are all-reduced over the processes, as torch's SyncBatchNorm
    function does."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        cfg: KernelSettings,
        module: ModuleType | None,
        triton: bool,
        *tensors: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        p = ENTensors(*tensors)
        y, batch, saved, kernel = exemplar_norm(x, cfg, p, module, triton)
        ctx.cfg, ctx.kernel, ctx.saved_count = cfg, kernel, len(saved)
        ctx.triton = triton
        params = (p.weight, p.bias, p.conv, p.fc1_w, p.fc1_b, p.fc2_w, p.fc2_b, p.stale, p.offset)
        ctx.save_for_backward(x, *saved, *params)
        batch = batch if batch is not None else saved[0].new_empty(0)
        hidden = hidden_mean(saved, kernel)
        ctx.mark_non_differentiable(batch, hidden)
        return y, batch, hidden

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_y: Tensor, _grad_batch: Tensor | None, _grad_hidden: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        cfg: KernelSettings = ctx.cfg
        x, *rest = ctx.saved_tensors
        saved, params = rest[: ctx.saved_count], rest[ctx.saved_count :]
        weight, bias, conv, fc1_w, fc1_b, fc2_w, fc2_b, stale, offset = params
        p = ENTensors(None, None, weight, bias, conv, fc1_w, fc1_b, fc2_w, fc2_b, stale, offset)  # type: ignore[arg-type]
        bn_mean = bn_rstd = None
        if ctx.kernel is not None:
            module, args = ctx.kernel
            m, v, bn_mean, bn_var, a, vv, h, lam, rd, samples = saved
            conv_shape = None if conv is None else conv.shape
            g_m, g_v, bn_sums, grads = native.en_backward(
                module, x, grad_y, m, v, (vv, h, lam), args, cfg.training, conv_shape
            )
            if bn_var is None or not cfg.training:
                bn_sums = None  # no bn member, or its running statistics: constants
            else:
                bn_rstd = (bn_var + cfg.eps).rsqrt()
        else:
            if ctx.triton:
                da, db = triton_ops.grad_sums(x, grad_y)  # dL/dA, dL/dB: N x C
            else:
                xw, gw, da, db = affine_grads(x, grad_y)
            m, big_m, rstd, _dev, _lam, _h, _vv, _zt, a, rd, samples = saved
            g_m, g_v, bn_sums, grads = coefficients_backward(cfg, saved, p, da, db)
            if "bn" in cfg.normalizers:
                i = cfg.normalizers.index("bn")
                bn_mean, bn_rstd = big_m[i, :1], rstd[i, :1]
        if bn_sums is not None:
            g_mean, g_var, dev = bn_member_grad(
                cfg, bn_sums, m, bn_mean, bn_rstd, rd, samples, stale, x.shape[2] * x.shape[3]
            )
            g_m.add_(g_mean).addcmul_(dev, g_var, value=2.0)
            g_v.add_(g_var)

        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.kernel is not None:
                grad_x = native.en_input_grad(ctx.kernel[0], x, grad_y, a, m, g_m, g_v)
            elif ctx.triton:  # dX = A dY + alpha X + beta, as input_grad's form
                length = x.shape[2] * x.shape[3]
                alpha = g_v * (2.0 / length)
                grad_x = triton_ops.input_grad(x, grad_y, a, alpha, g_m / length - alpha * m)
            else:
                grad_x = input_grad(x, xw, gw, a, m, g_m, g_v)
        g_gamma, g_beta, g_conv, g_fc1_w, g_fc1_b, g_fc2_w, g_fc2_b = grads

        def cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if g is None or like is None else _to(g, like.dtype)

        return (
            grad_x,
            None,  # cfg
            None,  # module
            None,  # triton
            None,  # running_mean
            None,  # running_var
            cast(g_gamma, weight),
            cast(g_beta, bias),
            cast(g_conv, conv),
            cast(g_fc1_w, fc1_w),
            cast(g_fc1_b, fc1_b),
            cast(g_fc2_w, fc2_w),
            cast(g_fc2_b, fc2_b),
            None,  # the guard's verdict
            None,  # the mixing offset (a buffer)
        )
