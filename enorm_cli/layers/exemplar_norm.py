"""Exemplar Normalization (EN; Zhang et al., CVPR 2020) as a drop-in 2-D norm layer.

The spec is ``docs/en-layer.md``: K normalizers (bn, in, ln, optionally gn), a
small ratio branch that predicts per-sample mixing ratios, and the mix of the
normalized outputs computed as ``Y = A * X + B`` with N x C coefficients, so X
is read once for the statistics and once for the output and never copied K times.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from .base import MixedNorm2d
from .exemplar_function import ENConfig, ENTensors, ExemplarNormFunction, exemplar_norm
from .statistics import InstanceStats, distributed_world_size, group_count, instance_stats

ACTIVATIONS = ("tanh", "relu")


def default_logit_scale(num_normalizers: int, pi: int) -> float:
    """s = 1 / sqrt(pi K): FC2's data-dependent term is ``s W h``, its bias is not scaled.

    The branch's hidden layer h has pi K units, and tanh saturates them (|h| ~ 1 on wide
    layers), so an SGD step on W moves each sample's ratio logits by lr |g| sum_j h_j^2,
    about pi K (100-150) times what the same step moves a plain logit (SN's, or FC2's
    bias). With s, that factor becomes s^2 sum_j h_j^2 <= 1: EN's ratios start no more
    mobile than SN's, and a noisy early gradient (a new head, small batches) cannot
    throw a whole layer onto a normalizer whose gamma is still 0 (README, Stability).
    """
    return 1.0 / math.sqrt(pi * num_normalizers)


class RatioBranch(nn.Module):
    """Predicts lambda (N x K) from the pooled, pre-normalized features.

    xhat (N x K x C) -> grouped 1-D conv, kernel 1, C -> G channels over the K
    axis (G = C / r; C weights whatever r) -> z (N x K x G) -> v = z z^T (K x K)
    -> FC(K^2, pi K) -> tanh | relu -> FC(pi K, K) computed as ``b + s W h`` with
    ``logit_scale`` s (``default_logit_scale``). Softmax is applied by the caller.
    The conv is kept as an ``nn.Conv1d`` for its parameter layout; forward computes it
    as a grouped multiply-sum. ``ExemplarNorm2d.forward`` does this same math inside its
    one-node fast path (``exemplar_function.py``); this module serves ``ratios()`` and
    the autograd path, so hooks on it fire only there.
    """

    def __init__(
        self,
        num_features: int,
        num_normalizers: int,
        reduction: int,
        pi: int,
        activation: str,
        use_conv: bool,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        k = num_normalizers
        self.logit_scale = logit_scale
        self.groups = group_count(num_features, reduction)
        self.conv = (
            nn.Conv1d(num_features, self.groups, kernel_size=1, groups=self.groups, bias=False)
            if use_conv
            else None
        )
        self.fc1 = nn.Linear(k * k, pi * k)
        self.act: nn.Module = nn.Tanh() if activation == "tanh" else nn.ReLU()
        self.fc2 = nn.Linear(pi * k, k)

    def forward(self, xhat: Tensor) -> Tensor:
        """xhat: N x K x C pre-normalized pooled features -> ratio logits N x K."""
        if self.conv is not None:
            # The grouped kernel-1 conv as a multiply and a sum over each group's channels:
            # the same weights (G x C/G x 1) and result, without CPU grouped conv's slow path.
            n, k, c = xhat.shape
            w = self.conv.weight.view(self.groups, c // self.groups).to(xhat.dtype)
            z = (xhat.view(n, k, self.groups, c // self.groups) * w).sum(-1)
        else:
            z = xhat
        v = torch.bmm(z, z.transpose(1, 2)).flatten(1)
        h = self.act(self.fc1(v))
        return torch.addmm(self.fc2.bias, h, self.fc2.weight.t(), alpha=self.logit_scale)


class ExemplarNorm2d(MixedNorm2d):
    """Exemplar Normalization for N x C x H x W inputs.

    Parameters: ``weight``/``bias`` (K x C, or 1 x C with ``shared_affine``), the
    ratio branch ``ratio`` (conv: C weights; fc1: K^2 pi K + pi K; fc2: pi K K + K),
    so one layer adds ``2KC + C + (K^2 pi K + pi K) + (pi K K + K)`` parameters
    (``2C`` instead of ``2KC`` when shared; ``C`` fewer without the conv); for
    C=64, K=3, pi=50 that is 2,401. Buffers mirror ``nn.BatchNorm2d``:
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (used by "bn").

    When r does not divide C, the conv uses the largest divisor of C that is at
    most C / r as its group count (at least 1), so odd widths never fail.
    """

    _version = 1

    def __init__(
        self,
        num_features: int,
        normalizers: tuple[str, ...] = ("bn", "in", "ln"),
        reduction: int = 16,
        pi: int = 50,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        activation: str = "tanh",
        use_conv: bool = True,
        shared_affine: bool = False,
        num_groups: int = 32,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__(num_features, normalizers, eps, momentum, num_groups)
        if reduction < 1 or pi < 1:
            raise ValueError(f"reduction and pi must be positive, got {reduction} and {pi}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.reduction = reduction
        self.pi = pi
        self.activation = activation
        self.use_conv = use_conv
        self.shared_affine = shared_affine
        k = len(self.normalizers)
        rows = 1 if shared_affine else k
        self.weight = nn.Parameter(torch.ones(rows, num_features))
        self.bias = nn.Parameter(torch.zeros(rows, num_features))
        if logit_scale is None:
            logit_scale = default_logit_scale(k, pi)
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}")
        self.ratio = RatioBranch(num_features, k, reduction, pi, activation, use_conv, float(logit_scale))

    @property
    def logit_scale(self) -> float:
        """FC2's scale s (logits = b + s W h), kept by the ratio branch."""
        return self.ratio.logit_scale

    def _ratio_logits(self, stats: InstanceStats, pairs: list[tuple[Tensor, Tensor]], rstds: list[Tensor]) -> Tensor:
        """Ratio logits (N x K): the branch on the pooled input pre-normalized by each normalizer."""
        xhat = [
            torch.zeros_like(stats.mean) if name == "in"  # mu_in - mu_in: exactly 0
            else (stats.mean - mean) * rstd
            for name, (mean, _), rstd in zip(self.normalizers, pairs, rstds)
        ]
        return self.ratio(torch.stack(xhat, dim=1).to(self.ratio.fc1.weight.dtype))  # N x K x C in

    def _rstds(self, pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        return [torch.rsqrt(var + self.eps) for _, var in pairs]

    def ratios(self, x: Tensor) -> Tensor:
        """The lambda (N x K) that ``forward`` would use on x now; running stats untouched."""
        self._check_input_dim(x)
        stats = instance_stats(x)
        pairs = self._statistics(stats, update=False)
        return torch.softmax(self._ratio_logits(stats, pairs, self._rstds(pairs)), dim=1)

    def _coefficients(self, stats: InstanceStats, update: bool) -> tuple[Tensor, Tensor]:
        """A = sum_k lambda_k gamma_k rstd_k and B = sum_k lambda_k (beta_k - gamma_k rstd_k mu_k).

        The plain autograd form of ``ExemplarNormFunction``'s math, for synced statistics.
        """
        pairs = self._statistics(stats, update)
        rstds = self._rstds(pairs)
        lam = torch.softmax(self._ratio_logits(stats, pairs, rstds), dim=1).to(stats.mean.dtype)  # N x K
        weight = self.weight.to(lam.dtype)
        bias = self.bias.to(lam.dtype)
        b = bias if self.shared_affine else lam @ bias  # sum_k lambda_k beta_k (sum lambda = 1)
        a: Tensor | None = None
        for k, ((mean, _), rstd) in enumerate(zip(pairs, rstds)):
            scale = lam[:, k : k + 1] * (weight[0 if self.shared_affine else k] * rstd)  # N x C
            a = scale if a is None else a + scale
            b = torch.addcmul(b, scale, mean, value=-1.0)
        assert a is not None
        return a, b.expand_as(a)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.sync_stats and "bn" in self.normalizers and distributed_world_size() > 1:
            return super().forward(x)  # statistics all-reduced inside autograd
        self._check_input_dim(x)
        cfg = ENConfig(
            normalizers=self.normalizers,
            eps=self.eps,
            relu=self.activation == "relu",
            shared_affine=self.shared_affine,
            num_groups=self.num_groups,
            training=self.training,
            logit_scale=self.logit_scale,
        )
        branch = self.ratio
        tensors = ENTensors(
            self.running_mean, self.running_var, self.weight, self.bias,
            None if branch.conv is None else branch.conv.weight,
            branch.fc1.weight, branch.fc1.bias, branch.fc2.weight, branch.fc2.bias,
        )
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(t is not None and t.requires_grad for t in tensors)
        )
        # float32 math whatever the autocast; no context at all when autocast is off, so
        # torch.export does not split the graph at every layer (README, Export).
        autocast_off = (
            torch.autocast(x.device.type, enabled=False)
            if torch.is_autocast_enabled(x.device.type)
            else contextlib.nullcontext()
        )
        with autocast_off:
            if needs_grad:
                y, batch = ExemplarNormFunction.apply(x, cfg, *tensors)
            else:
                y, batch, _ = exemplar_norm(x, cfg, tensors)
        if batch is not None and batch.numel():
            self._update_running_stats(batch[0], batch[1], x.shape[0] * x.shape[2] * x.shape[3])
        return y

    def extra_repr(self) -> str:
        parts = [
            f"{self.num_features}",
            f"normalizers={self.normalizers}",
            f"reduction={self.reduction}",
            f"pi={self.pi}",
            f"eps={self.eps}",
            f"momentum={self.momentum}",
            f"logit_scale={self.logit_scale:.4g}",
        ]
        if self.activation != "tanh":
            parts.append(f"activation={self.activation}")
        if not self.use_conv:
            parts.append("use_conv=False")
        if self.shared_affine:
            parts.append("shared_affine=True")
        if "gn" in self.normalizers:
            parts.append(f"num_groups={self.num_groups}")
        return ", ".join(parts)
