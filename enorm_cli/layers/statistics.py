"""Statistics for every normalizer that EN and SN mix, from one table.

Every normalizer's mean and variance is a reduction of one N x C table: the
per-(sample, channel) mean and variance of X (the instance statistics),
computed once per forward by ``moments`` (mean, then the norm of the
deviations: numerically stable, float32 at least, also under autocast, and
much faster on CPU than ``torch.var_mean``); bn, ln and gn statistics are then pooled from the
table with
the law of total variance, ``var = mean(var_in) + mean((mu_in - mu)^2)``, which
is exact for groups of equal size and has no ``E[x^2] - E[x]^2`` cancellation,
so inputs with |mean|/std of 1e3 and more keep their precision.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

NORMALIZERS: tuple[str, ...] = ("bn", "in", "ln", "gn")
"""Every normalizer name the layers accept."""


@dataclass(frozen=True)
class InstanceStats:
    """Per-(sample, channel) statistics of X: mean and biased variance, N x C, float32+."""

    mean: Tensor
    var: Tensor
    count: int
    """Elements per (sample, channel): H * W."""


def check_normalizers(normalizers: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a normalizer set and return it as a tuple (order = the K axis)."""
    names = tuple(normalizers)
    if not names:
        raise ValueError("normalizers must name at least one of " + ", ".join(NORMALIZERS))
    unknown = [n for n in names if n not in NORMALIZERS]
    if unknown:
        raise ValueError(
            f"unknown normalizer(s) {', '.join(unknown)}; choose from {', '.join(NORMALIZERS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"normalizers repeat a name: {', '.join(names)}")
    return names


ONE_PASS_CONDITION = 64.0
"""One-pass variances are kept where mean^2 <= 64 var: their float32 error is then about
1e-5 relative. Beyond that (large |mean|/std, constant rows) the two-pass form is used."""

ONE_PASS_MIN_LENGTH = 16
"""Below 16 values per row (4x4 maps) the two-pass temporary is small and the one-pass
check fails often (2x2 maps: 21 of MobileNetV2's 52 layers at 32 px), so it is not tried."""


def moments(x: Tensor, one_pass: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over the last axis of N x C x L, in x's dtype (no autograd).

    Two passes by default: mean, then the norm of the deviations, exact where
    E[x^2] - E[x]^2 would cancel, and far faster on CPU than ``torch.var_mean``'s Welford loop.
    With ``one_pass`` (the training paths, on CPU, where X-sized temporaries cost most,
    benchmarks/README.md): one read for the sum and one for the 2-norm, with no temporary,
    var = E[x^2] - mean^2, kept only where that cannot lose precision
    (``ONE_PASS_CONDITION``). That check is data-dependent, so inference (``one_pass=False``)
    never makes it: its graph is the same for every input (``torch.jit.trace``,
    ``torch.export``, ONNX), and two passes cost no more there (measured in
    docs/commands/export.md).
    """
    with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
        length = x.shape[-1]
        if length == 1:  # 1x1 maps
            return x[..., 0].clone(), x.new_zeros(x.shape[:-1])
        mean = x.mean(-1)
        one_pass = one_pass and x.device.type == "cpu" and length >= ONE_PASS_MIN_LENGTH
        if one_pass and not torch.compiler.is_compiling():  # the check is data-dependent
            mean_sq = mean * mean
            var = torch.linalg.vector_norm(x, dim=-1).square_().div_(length).sub_(mean_sq)
            if not bool((mean_sq > ONE_PASS_CONDITION * var).any()):
                return mean, var.clamp_(min=0.0)
        norm = torch.linalg.vector_norm(x - mean.unsqueeze(-1), dim=-1)
        return mean, norm.square_().div_(length)


class _InstanceMoments(torch.autograd.Function):
    """``moments`` with autograd, saving only X and the mean.

    Backward rebuilds the deviations: dL/dx = g_mean / L + 2 g_var (x - mean) / L.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = moments(x, one_pass=True)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx: Any, g_mean: Tensor | None, g_var: Tensor | None) -> Tensor:
        x, mean = ctx.saved_tensors
        length = x.shape[-1]
        grad = (
            torch.zeros_like(x)
            if g_var is None
            else (x - mean.unsqueeze(-1)) * (g_var * (2.0 / length)).unsqueeze(-1)
        )
        if g_mean is not None:
            grad = grad + (g_mean / length).unsqueeze(-1)
        return grad


def instance_stats(x: Tensor) -> InstanceStats:
    """Read X: mean and biased variance over (H, W) per sample and channel, in float32 or wider."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    mean, var = _InstanceMoments.apply(x.flatten(2))
    return InstanceStats(mean=mean, var=var, count=x.shape[2] * x.shape[3])


def pool_stats(mean: Tensor, var: Tensor, dim: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Pool equal-size groups: mean of means, and the law of total variance."""
    pooled_mean = mean.mean(dim=dim, keepdim=True)
    pooled_var = var.mean(dim=dim, keepdim=True) + (mean - pooled_mean).square().mean(
        dim=dim, keepdim=True
    )
    return pooled_mean, pooled_var


def batch_stats(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """bn statistics over (N, H, W) from the instance table: each 1 x C."""
    return pool_stats(mean, var, 0)


RENORM_LIMITS: tuple[float, float] = (3.0, 5.0)
"""Batch Renormalization's clips (r_max, d_max): Ioffe 2017's values after its warm-up."""


def renorm_limits(frozen_stats: bool) -> tuple[float, float] | None:
    """The clips of renorm: Ioffe's against moving averages, none against frozen statistics.

    The clips guard against young moving averages. Against the source's statistics, which never
    move, they only make training compute another function than eval: on MobileNetV2's 1 x 1
    maps at batch 4, r = sigma / sigma_run is below 1/3 in 60-84% of the channels of five of
    its last nine layers (Fashion-MNIST at 32 px, ``benchmarks/renorm_clips.py``), where the
    median r is 0.22-0.29, so a clipped r scales them up about 1.2-1.5 times.
    Unclipped, the forward is the frozen statistics' exactly and the backward still the batch's.
    """
    return None if frozen_stats else RENORM_LIMITS


FROZEN_GRADIENT_SHARE: float = 0.5
"""Unclipped renorm's backward (``renorm_frozen``) where a bn statistic covers at most
``FEW_VALUES`` values per channel: this share of the frozen statistics' gradient (the
statistics as constants, as eval-mode BatchNorm) and the rest of the batch's (as
BatchNorm). With 2 values per channel, a 1 x 1 map at batch 2, the batch's gradient
projects the input gradient to nothing (the two normalized values are +-1 whatever the
input) and the layer stops learning through its bn member; the frozen statistics' alone
lets the features grow unchecked. In the small-batch recipe at batch 2 (3 seeds,
``benchmarks/results/small_batch_probes.json``): 0.3 scored 73.6, 0.5 74.4, 0.7 below both
and unstable; applied to every layer, 0.3 cost 14 points at batch 4 and lr 0.01 in the
minimal recipe, hence only where the batch's gradient is nothing."""

FEW_VALUES: int = 2
"""Values per channel of a bn statistic at or below which ``FROZEN_GRADIENT_SHARE`` applies."""


def frozen_gradient_share(samples: int, count: int, synced: bool) -> float:
    """``renorm_frozen``'s share of the frozen statistics' gradient for a bn statistic over
    ``samples`` images of ``count`` (H x W) values per channel on each process (times the
    processes when ``synced``). Forward and the hand-written backward both ask here."""
    values = samples * count * (distributed_world_size() if synced else 1)
    return FROZEN_GRADIENT_SHARE if values <= FEW_VALUES else 0.0


def renormalized_stats(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    limits: tuple[float, float] | None = RENORM_LIMITS,
    stale: Tensor | None = None,
    frozen_share: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch Renormalization (Ioffe 2017) written as the bn member's statistics.

    Normalizing with the returned (M, S) gives ``r (x - mean) / sigma + d``, with
    ``r = clip(sigma / sigma_run, 1/r_max, r_max)`` and ``d = clip((mean - mu_run) / sigma_run,
    -d_max, d_max)`` held constant (``limits`` None: unclipped): the forward uses the running
    statistics (as eval does, within the clips), the backward the batch's (as BatchNorm's).
    Small batches then train on the function they are evaluated on, and a few odd samples
    move a step less. mean, var: the batch's, 1 x C; also returns ``rd`` (2 x C: r, d) for a
    hand-written backward. ``stale`` (a bool tensor, ``watch_frozen_stats``): r = 1, d = 0,
    which is BatchNorm's batch statistics, forward and backward. ``frozen_share`` (unclipped
    only, ``FROZEN_GRADIENT_SHARE``): r and d carry that share of their own gradient, which
    scales the batch statistics' gradient by 1 - share (with r and d followed exactly, M and
    S are the running statistics, constants); the forward is unchanged.
    """
    if frozen_share and limits is not None:
        raise ValueError("frozen_share blends with the unclipped renorm only")
    sigma = (var + eps).sqrt()
    run_sigma = (running_var + eps).sqrt().unsqueeze(0)
    r_full = sigma / run_sigma
    d_full = (mean - running_mean.unsqueeze(0)) / run_sigma
    r, d = r_full.detach(), d_full.detach()
    if limits is not None:
        r_max, d_max = limits
        r, d = r.clamp(1.0 / r_max, r_max), d.clamp(-d_max, d_max)
    if frozen_share and torch.is_grad_enabled():
        r = r + frozen_share * (r_full - r_full.detach())  # the value stays r
        d = d + frozen_share * (d_full - d_full.detach())
    if stale is not None:
        r = torch.where(stale, torch.ones_like(r), r)
        d = torch.where(stale, torch.zeros_like(d), d)
    rd = torch.cat([r, d]).detach()
    return mean - d * sigma / r, (var + eps) / r.square() - eps, rd


def frozen_gradient_scale(frozen_share: float, stale: Tensor | None) -> Tensor | float:
    """What ``renormalized_stats`` with ``frozen_share`` does to the gradient reaching the
    batch statistics, for a hand-written backward: 1 - share, or 1 where ``stale``."""
    if stale is None:
        return 1.0 - frozen_share
    return torch.where(stale, 1.0, 1.0 - frozen_share)


STALE_LIMIT: float = 6.0
"""``renorm_frozen``'s guard trips when the typical channel's batch standard deviation has
moved this many times away from where it stood, relative to the frozen statistics, at the
first step. Measured from a minimal recipe (docs/stability.md): at batch 8 and lr 0.05 the
last layers' ratio grows 8-fold within 10 steps and the frozen statistics kill the network
(EN near chance, as frozen-statistics BatchNorm); at a healthy lr it moves under 3-fold in
a whole run. 3 also tripped on healthy batch-4 runs, where batch statistics then cost more
than staleness did."""

STALE_SMOOTHING: float = 0.25
"""Per-step weight of the guard's moving average of log r: one odd batch of 4 or 8 images
moves the whole layer's r up to 5-fold, a drift persists."""

FROZEN_UNSEEN, FROZEN_WATCHING, FROZEN_STALE = 0, 1, 2
"""``MixedNorm2d.frozen_state``: no step seen yet, frozen, tripped (batch statistics)."""


@torch.no_grad()
def watch_frozen_stats(
    record: Tensor, running_var: Tensor, eps: float, log_r: Tensor, state: Tensor
) -> None:
    """``renorm_frozen``'s guard, one step: does the layer still fit its frozen statistics?

    Frozen statistics are what make small batches train well (docs/stability.md), until the
    weights move far from the source's: then the normalized features grow without bound, the
    activations saturate and the network dies, where BatchNorm's batch statistics would have
    followed. The guard measures log r = log(sigma_batch / sigma_frozen) per channel,
    ``log_r[0]`` at the first step (the reference: a new domain starts far from the source's
    statistics, which is fine) and ``log_r[1]`` a moving average (``STALE_SMOOTHING``); when
    the median channel's drift passes ``STALE_LIMIT`` the state latches at ``FROZEN_STALE``
    and the layer normalizes with batch statistics from then on, its running statistics
    following as BatchNorm's. record: this step's batch mean and unbiased variance (2 x C).
    All on device, no host synchronization.
    """
    now = 0.5 * ((record[1] + eps) / (running_var + eps)).log().to(log_r.dtype)
    unseen = state == FROZEN_UNSEEN
    log_r[0] = torch.where(unseen, now, log_r[0])
    log_r[1] = torch.where(unseen, now, log_r[1].lerp(now, STALE_SMOOTHING))
    drift = (log_r[1] - log_r[0]).median().abs()
    tripped = (state == FROZEN_STALE) | (drift > math.log(STALE_LIMIT))
    state.copy_(torch.where(tripped, FROZEN_STALE, FROZEN_WATCHING))


def layer_stats(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """ln statistics over (C, H, W): each N x 1."""
    return pool_stats(mean, var, 1)


def group_stats(mean: Tensor, var: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """gn statistics over (C/G, H, W), broadcast back to N x C."""
    n, c = mean.shape
    shape = (n, num_groups, c // num_groups)
    group_mean, group_var = pool_stats(mean.reshape(shape), var.reshape(shape), 2)
    return group_mean.expand(shape).reshape(n, c), group_var.expand(shape).reshape(n, c)


def normalizer_stats(
    mean: Tensor,
    var: Tensor,
    normalizers: tuple[str, ...],
    num_groups: int,
    bn_stats: tuple[Tensor, Tensor] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Every normalizer's (mean, variance) from the instance table (mean, var: N x C), in order.

    The one place that says which statistics each normalizer uses. bn: 1 x C, ln: N x 1,
    in and gn: N x C; all broadcast to N x C. ``bn_stats`` replaces the batch's own
    (eval: the running statistics; synced training: the whole distributed batch's).
    """
    dtype = mean.dtype
    pairs: list[tuple[Tensor, Tensor]] = []
    for name in normalizers:
        if name == "bn":
            m, v = bn_stats if bn_stats is not None else batch_stats(mean, var)
        elif name == "in":
            m, v = mean, var
        elif name == "ln":
            m, v = layer_stats(mean, var)
        else:  # "gn"; check_normalizers admits nothing else
            m, v = group_stats(mean, var, num_groups)
        pairs.append((m.to(dtype), v.to(dtype)))
    return pairs


def running_average_factor(momentum: float | None, num_batches_tracked: Tensor) -> float:
    """PyTorch's BatchNorm factor: ``momentum``, or 1/t (a cumulative average) when None."""
    if momentum is None:
        return 1.0 / float(num_batches_tracked.item())
    return momentum


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor, running_var: Tensor, record: Tensor, factor: float | Tensor
) -> None:
    """``running = (1 - factor) * running + factor * stat``: the one running-statistics step.

    ``record`` is 2 x C, the batch mean and unbiased variance (``bn_member_stats``).
    """
    running_mean.lerp_(record[0].to(running_mean.dtype), factor)
    running_var.lerp_(record[1].to(running_var.dtype), factor)


def unbiased_record(mean: Tensor, var: Tensor, elements: int | Tensor) -> Tensor:
    """2 x C: the batch mean and the unbiased variance over ``elements`` values per channel
    (N * H * W), what the running statistics average. A single element leaves the variance
    biased (0) instead of dividing by zero."""
    if isinstance(elements, Tensor):
        correction = elements / (elements - 1).clamp(min=1)
    else:
        correction = elements / max(elements - 1, 1)
    return torch.cat([mean, var * correction]).detach()


class BnMember(NamedTuple):
    """The bn member's statistics in the current mode (``bn_member_stats``)."""

    mean: Tensor
    """1 x C: what the member normalizes with (renormalized in training with ``renorm``)."""
    var: Tensor
    record: Tensor | None
    """2 x C: batch mean and unbiased variance for the running statistics (training only)."""
    rd: Tensor | None
    """2 x C: Batch Renormalization's r, d (training with ``renorm`` only)."""
    samples: Tensor | None
    """Samples the batch statistics cover over every process (synced training only)."""


@dataclass(frozen=True)
class StatsMode:
    """What decides a mixed layer's statistics in the current mode (every EN and SN path
    reads these: ``MixedNorm2d.stats_mode``)."""

    normalizers: tuple[str, ...]
    eps: float
    num_groups: int
    training: bool
    renorm: bool = False
    """Training: the bn member batch-renormalized (``renormalized_stats``)."""
    frozen_stats: bool = False
    """Renorm against statistics that training never updates: unclipped (``renorm_limits``)."""
    synced: bool = False
    """Training: the bn member's statistics over every process (forward and backward)."""


def bn_member_stats(
    mode: StatsMode,
    mean: Tensor,
    var: Tensor,
    count: int,
    running_mean: Tensor,
    running_var: Tensor,
    stale: Tensor | None = None,
) -> BnMember | None:
    """The bn member's statistics, as every layer and path takes them (the one place); None
    without a bn member.

    Eval: the running ones. Training: the batch's (over every process when ``mode.synced``, as
    SyncBatchNorm), batch-renormalized with ``mode.renorm`` against the running statistics
    before this batch's update (unclipped with ``mode.frozen_stats``, ``renorm_limits``, its
    backward blended by ``frozen_gradient_share``; batch statistics where ``stale``,
    ``watch_frozen_stats``). mean, var: the instance table (N x C); count: H * W.
    """
    if "bn" not in mode.normalizers:
        return None
    if not mode.training:
        return BnMember(running_mean.unsqueeze(0), running_var.unsqueeze(0), None, None, None)
    samples = None
    if mode.synced:
        bmean, bvar, samples = synced_batch_stats(mean, var)
        record = unbiased_record(bmean, bvar, samples * count)
    else:
        bmean, bvar = batch_stats(mean, var)
        record = unbiased_record(bmean, bvar, mean.shape[0] * count)
    rd = None
    if mode.renorm:
        frozen = mode.frozen_stats
        share = frozen_gradient_share(mean.shape[0], count, mode.synced) if frozen else 0.0
        bmean, bvar, rd = renormalized_stats(
            bmean, bvar, running_mean, running_var, mode.eps, renorm_limits(frozen), stale, share
        )
    return BnMember(bmean, bvar, record, rd, samples)


def mixed_stats(
    mode: StatsMode,
    mean: Tensor,
    var: Tensor,
    count: int,
    running_mean: Tensor,
    running_var: Tensor,
    stale: Tensor | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], BnMember | None]:
    """Every normalizer's (mean, variance) in the current mode (shapes: ``normalizer_stats``)
    and the bn member (``bn_member_stats``; None without one): what EN and SN normalize with."""
    member = bn_member_stats(mode, mean, var, count, running_mean, running_var, stale)
    bn = None if member is None else (member.mean, member.var)
    return normalizer_stats(mean, var, mode.normalizers, mode.num_groups, bn), member


def group_count(num_features: int, reduction: int) -> int:
    """Groups of the ratio branch's conv: the largest divisor of C that is <= C / r, >= 1.

    With r dividing C this is C / r, as in the paper; odd widths still work.
    """
    limit = max(num_features // reduction, 1)
    return max(g for g in range(1, limit + 1) if num_features % g == 0)


def distributed_world_size() -> int:
    """Processes in the default group, 1 when torch.distributed is not running."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of a sum is the sum of the gradients.

    Our own because ``torch.distributed.nn.functional.all_reduce`` is deprecated and the
    functional collectives gained autograd only in recent torch releases.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over processes; differentiable when autograd records (``_AllReduceSum``)."""
    if torch.is_grad_enabled() and tensor.requires_grad:
        return _AllReduceSum.apply(tensor)
    import torch.distributed as dist

    out = tensor.clone()
    dist.all_reduce(out)
    return out


def synced_batch_stats(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """bn statistics over the whole distributed batch, as SyncBatchNorm computes them.

    Two all-reduces of per-channel sums (C + 1 and C values): the global mean first, then
    the squared deviations from it, so no cancellation. mean, var: the local instance table
    (N x C). Returns the 1 x C mean and variance and the global sample count (a 1 x 1 tensor:
    no host sync, nothing for a compiler to break on).
    """
    n = mean.shape[0]
    count = torch.full((1, 1), float(n), dtype=mean.dtype, device=mean.device)
    summed = all_reduce_sum(torch.cat([mean.sum(0, keepdim=True), count], dim=1))
    total = summed[:, -1:]
    global_mean = summed[:, :-1] / total
    deviation = (var + (mean - global_mean).square()).sum(0, keepdim=True)
    return global_mean, all_reduce_sum(deviation) / total, total.detach()
