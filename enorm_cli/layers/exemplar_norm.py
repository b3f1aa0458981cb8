"""Exemplar Normalization (EN; Zhang et al., CVPR 2020) as a drop-in 2-D norm layer.

The spec is ``docs/en-layer.md``: K normalizers (bn, in, ln, optionally gn), a
small ratio branch that predicts per-sample mixing ratios, and the mix of the
normalized outputs computed as ``Y = A * X + B`` with N x C coefficients, so X
is read once for the statistics and once for the output and never copied K times.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import native, runtime
from .base import SATURATED, Branch, MixedNorm2d
from .exemplar_function import (
    ExemplarNormFunction,
    en_coefficients,
    exemplar_norm,
    hidden_mean,
    ratio_logits,
)
from .kernel_inputs import ENTensors, KernelSettings
from .source import SourceNorm, source_share
from .statistics import InstanceStats, group_count, instance_stats

ACTIVATIONS: tuple[str, ...] = ("tanh", "relu")
"""The ratio branch's hidden activations."""


def check_activation(activation: str) -> str:
    """Validate the ratio branch's activation (``ACTIVATIONS``); the one check, also for
    settings."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return activation


ANCHORED: tuple[str, ...] = ("auto",)
"""``anchored`` takes a bool or one of these."""


def check_anchored(anchored: bool | str) -> bool | str:
    """Validate ``anchored`` (True, False or "auto"); the one check, also for settings."""
    if not isinstance(anchored, bool) and anchored not in ANCHORED:
        raise ValueError(f"anchored must be true, false or auto, got {anchored!r}")
    return anchored


def default_logit_scale(num_normalizers: int, pi: int) -> float:
    """s = 1 / sqrt(pi K): FC2's data-dependent term is ``s W h``, its bias is not scaled.

    The branch's hidden layer h has pi K units, and tanh saturates them (|h| ~ 1 on wide
    layers), so an SGD step on W moves each sample's ratio logits by lr |g| sum_j h_j^2,
    about pi K (100-150) times what the same step moves a plain logit (SN's, or FC2's
    bias). With s, that factor becomes s^2 sum_j h_j^2 <= 1: EN's ratios start no more
    mobile than SN's, and a noisy early gradient (a new head, small batches) cannot
    throw a whole layer onto a normalizer whose gamma is still 0 (docs/stability.md).
    """
    return 1.0 / math.sqrt(pi * num_normalizers)


def _float32_math(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for EN's statistics and ratio branch (float32 on every path); no context
    at all when autocast is already off, so torch.export does not split the graph at every
    layer (docs/commands/export.md)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


HIDDEN_MOMENTUM = 0.1
"""How fast a centered branch's running mean of h follows the batches (as BatchNorm's 0.1)."""

UNSCALED = 1.0
"""The logit scale of layers from before ``logit_scale`` existed: FC2 computed b + W h."""


def with_logit_scale(settings: dict[str, Any]) -> dict[str, Any]:
    """Layer settings from before ``logit_scale`` existed, as this version reads them: those
    layers had an unscaled FC2 (``UNSCALED``). The one home of this migration: checkpoints'
    format 1 metadata goes through it; a state dict without the scale keeps the scale its layer
    was built with (``ExemplarNorm2d._load_from_state_dict``)."""
    return {"logit_scale": UNSCALED, **settings}


class RatioBranch(nn.Module):
    """Predicts lambda (N x K) from the pooled, pre-normalized features.

    xhat (N x K x C) -> grouped 1-D conv, kernel 1, C -> G channels over the K
    axis (G = C / r; C weights whatever r) -> z (N x K x G) -> v = z z^T (K x K)
    -> FC(K^2, pi K) -> tanh | relu -> FC(pi K, K) computed as ``b + s W h`` with
    ``logit_scale`` s (``default_logit_scale``); ``centered``: ``b + u + s W (h - c)`` with c a
    running mean of h over training batches (buffer ``hidden_mean``) and u the bias shift that
    keeps the function unchanged whenever c moves (buffer ``logit_shift``), so W's gradient sees
    only how samples differ from the mean (``docs/en-layer.md``, "Centered branch"). Softmax is
    applied by the caller.
    The module holds the parameters (the conv as an ``nn.Conv1d`` for its layout); the
    math is ``exemplar_function.ratio_logits``, which every EN path calls. ``forward`` is
    there for users who want the branch alone; EN layers read the parameters directly, so
    hooks on this module do not fire.
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
        centered: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        k = num_normalizers
        factory = {"device": device, "dtype": dtype}
        self.logit_scale = logit_scale
        self.centered = centered
        self.hidden_ready = False
        """Whether ``hidden_mean`` holds a mean yet (a plain attribute: set by the first training
        batch, or by loading a state whose mean is not all zeros)."""
        if centered:
            self.register_buffer("hidden_mean", torch.zeros(pi * k, **factory))
            self.register_buffer("logit_shift", torch.zeros(k, **factory))
        self.groups = group_count(num_features, reduction)
        self.conv = (
            nn.Conv1d(
                num_features, self.groups, kernel_size=1, groups=self.groups, bias=False, **factory
            )
            if use_conv
            else None
        )
        self.fc1 = nn.Linear(k * k, pi * k, **factory)
        self.act: nn.Module = nn.Tanh() if activation == "tanh" else nn.ReLU()
        self.fc2 = nn.Linear(pi * k, k, **factory)

    def get_extra_state(self) -> Tensor:
        """``logit_scale`` goes into the state dict with the weights: it changes the function.
        A tensor, so safetensors files carry it too."""
        return torch.tensor(self.logit_scale, dtype=torch.float64)

    def set_extra_state(self, state: Tensor | float) -> None:
        scale = float(state)
        if not scale > 0:
            raise ValueError(f"logit_scale must be positive, got {scale}")
        self.logit_scale = scale

    def reset_parameters(self) -> None:
        """torch's default initialization of the conv and both FCs (what a new branch has),
        and no running mean of h yet."""
        for layer in (self.conv, self.fc1, self.fc2):
            if layer is not None:
                layer.reset_parameters()
        if self.centered:
            self.hidden_mean.zero_()
            self.logit_shift.zero_()
            self.hidden_ready = False

    def logit_bias(self) -> Tensor:
        """FC2's bias as the math takes it: b, or b + u - s W c when centered (so the math's
        ``b + s W h`` is ``b + u + s W (h - c)``). Under autograd c is copied: it moves in place
        after the forward, and autograd keeps this product's inputs for the backward."""
        fc2 = self.fc2
        if not self.centered:
            return fc2.bias
        c = self.hidden_mean.to(fc2.weight.dtype)
        if torch.is_grad_enabled():
            c = c.clone()
        shifted = fc2.bias + self.logit_shift.to(fc2.bias.dtype)
        return torch.addmv(shifted, fc2.weight, c, alpha=-self.logit_scale)

    @torch.no_grad()
    def track_hidden(self, hidden: Tensor) -> None:
        """Move c one running-mean step towards a training batch's mean of h (the first batch
        sets it) and u by s W times that step: ``logit_bias`` and so the function stay as they
        were (to rounding). Training output then depends on the parameters alone, however many
        forwards ran (gradient checks, activation checkpointing, accumulation); only the next
        gradients see the new centre. A no-op for an uncentered branch."""
        if not self.centered:
            return
        step = hidden.detach().to(self.hidden_mean.dtype) - self.hidden_mean
        if self.hidden_ready:
            step.mul_(HIDDEN_MOMENTUM)
        self.hidden_ready = True
        w = self.fc2.weight.detach().to(step.dtype)
        self.logit_shift.add_(torch.mv(w, step), alpha=self.logit_scale)
        self.hidden_mean.add_(step)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """A state without ``hidden_mean`` comes from an uncentered branch (every layer before
        the centered branch existed): this branch becomes one, the function that state had;
        a centered state makes an uncentered branch centered. A loaded mean counts as set
        unless it is all zeros (a layer saved before its first training batch)."""
        key = prefix + "hidden_mean"
        if self.centered and key not in state_dict:
            self.centered = False
            del self._buffers["hidden_mean"], self._buffers["logit_shift"]
        elif not self.centered and key in state_dict:
            self.centered = True
            like = self.fc2.bias.detach()
            self.register_buffer("hidden_mean", torch.zeros_like(state_dict[key]).to(like))
            self.register_buffer("logit_shift", torch.zeros_like(like))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.centered:
            self.hidden_ready = bool(self.hidden_mean.any())

    def forward(self, xhat: Tensor) -> Tensor:
        """xhat: N x K x C pre-normalized pooled features -> ratio logits N x K
        (``ratio_logits``)."""
        conv = None if self.conv is None else self.conv.weight
        return ratio_logits(
            xhat.transpose(0, 1),
            conv,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.logit_bias(),
            isinstance(self.act, nn.ReLU),
            self.logit_scale,
        )[0]


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

    _version = 3
    """3: the frozen-statistics guard's buffers (``frozen_log_r``, ``frozen_state``); 2: the
    ratio branch's ``logit_scale`` is in the state dict (``ratio._extra_state``); 1 did not
    save it. ``_load_from_state_dict`` migrates both."""
    kind = "en"
    starts_as_source = True
    options = (
        "reduction",
        "pi",
        "activation",
        "use_conv",
        "shared_affine",
        "logit_scale",
        "centered",
        "anchored",
    )

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
        centered: bool = True,
        anchored: bool | str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, normalizers, eps, momentum, num_groups, device, dtype)
        if reduction < 1 or pi < 1:
            raise ValueError(f"reduction and pi must be positive, got {reduction} and {pi}")
        self.reduction = reduction
        self.pi = pi
        self.activation = check_activation(activation)
        self.use_conv = use_conv
        self.shared_affine = shared_affine
        self.anchored = check_anchored(anchored)
        """How a conversion starts the layer (``_start_as``): anchored (True), every gamma is the
        source's and ``mix_offset`` makes the mixing weights one-hot; the paper-style start
        (False), the other normalizers' gammas 0; "auto": anchored where the source is
        untrained (``SourceNorm.untrained``). A conversion or a loaded state leaves the bool
        it used."""
        k = len(self.normalizers)
        self.register_buffer("mix_offset", torch.zeros(k, device=device, dtype=dtype))
        rows = 1 if shared_affine else k
        self.weight = nn.Parameter(torch.empty(rows, num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rows, num_features, device=device, dtype=dtype))
        self._reset_affine()
        if logit_scale is None:
            logit_scale = default_logit_scale(k, pi)
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}")
        self.ratio = RatioBranch(
            num_features,
            k,
            reduction,
            pi,
            activation,
            use_conv,
            float(logit_scale),
            centered,
            device,
            dtype,
        )
        self._hidden: Tensor | None = None
        """The reference path's batch mean of h, between ``_coefficients`` and ``_run``."""

    def _reset_affine(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def reset_parameters(self) -> None:
        """Unit gammas, zero betas, a newly initialized ratio branch, fresh running statistics."""
        self.reset_running_stats()
        self._reset_affine()
        self.ratio.reset_parameters()
        self.mix_offset.zero_()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Version 1 state dicts lack ``logit_scale``: those layers computed with the scale
        they were built with, so loading one keeps this layer's own (as torch's ``_BatchNorm``
        fills in ``num_batches_tracked`` for its version 1). Files without torch's metadata
        (safetensors) count as version 1 where the key is missing."""
        version = local_metadata.get("version")
        key = prefix + "ratio._extra_state"
        if (version is None or version < 2) and key not in state_dict:
            state_dict[key] = self.ratio.get_extra_state()
        # Layers from before the anchored start mixed with w = lambda: offset 0.
        state_dict.setdefault(prefix + "mix_offset", torch.zeros_like(self.mix_offset))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.anchored = bool(self.mix_offset.any())

    def _start_as(self, src: SourceNorm, prior: Tensor, lam_src: float) -> None:
        """FC2's weight 0 and its bias the prior, so lambda is constant at the prior, and every
        beta = beta. Anchored: every gamma = gamma and o = e_src - lambda, so the mixing
        weights lambda + o are one-hot on the source; the paper-style start instead sets
        gamma_src = gamma / lambda_src (all of gamma in row 0 when shared) and the other
        gammas 0. Either way Y = gamma Xhat_src + beta (``docs/en-layer.md``)."""
        gamma = src.gamma().to(self.weight)
        k = self.normalizers.index(src.normalizer)
        if self.anchored == "auto":
            self.anchored = src.untrained
        self.mix_offset.zero_()
        if self.anchored:
            self.weight.copy_(gamma.expand_as(self.weight))
            lam = torch.softmax(prior.double(), 0)
            self.mix_offset.copy_(torch.eye(len(lam), dtype=lam.dtype)[k] - lam)
        else:
            self.weight.zero_()
            self.weight[0 if self.shared_affine else k] = (
                gamma if self.shared_affine else gamma / lam_src
            )
        self.bias.copy_(src.beta().to(self.bias).expand_as(self.bias))
        self.ratio.fc2.weight.zero_()
        self.ratio.fc2.bias.copy_(prior)

    def ratio_parameters(self) -> list[nn.Parameter]:
        """FC2's bias (with its weight when the branch is uncentered): the logits' own terms."""
        other = {id(p) for p in [*self.sample_parameters(), *self.hidden_parameters()]}
        return [p for p in self.ratio.parameters() if id(p) not in other]

    def hidden_parameters(self) -> list[nn.Parameter]:
        """The conv and FC1: the hidden units FC2 reads. Under optimizers that step each
        parameter by about the lr they keep the network's rate while the logits learn faster
        (``optim.hidden_lr_scale``): ten times as fast, an Adam step of FC1 grows its weights
        until tanh saturates (docs/selection.md, "Under AdamW")."""
        parts = (self.ratio.conv, self.ratio.fc1)
        return [p for part in parts if part is not None for p in part.parameters()]

    def sample_parameters(self) -> list[nn.Parameter]:
        """FC2's weight when the branch is centered: it sets only how samples differ from the
        mean mixture, so it can learn faster than the rest (``optim.sample_lr_scale``)."""
        return [self.ratio.fc2.weight] if self.centered else []

    @property
    def centered(self) -> bool:
        """Whether FC2 reads h minus its running mean (``RatioBranch``)."""
        return self.ratio.centered

    def ratio_step_factor(self) -> float:
        """s^2 pi K: a step on FC2's weights moves each sample's logits by lr |g| s^2 sum_j h_j^2,
        and tanh (or a saturated relu layer) puts sum_j h_j^2 at up to pi K, the hidden width
        (``default_logit_scale``: 1 at the default s, exactly: rounded to 12 digits)."""
        return round(self.logit_scale**2 * self.ratio.fc2.in_features, 12)

    def source_gain_share(self) -> float:
        """lambda_src = e^m / (e^m + K - 1) with this layer's conversion margin m: the source
        row's gamma is gamma / lambda_src and enters the output times lambda_src, so its
        gradient is lambda_src times the source gamma's (each beta row's is lambda_k times).
        One shared affine row carries the whole gain, and a layer built without a source has
        none: 1. Anchored, the source row holds gamma and its mixing weight starts at 1: 1."""
        if self.shared_affine or self.margin is None or self.anchored is True:
            return 1.0
        return source_share(len(self.normalizers), self.margin)

    @staticmethod
    def prior_ratio_logits(read: Callable[[str], Tensor]) -> tuple[Tensor, bool]:
        """FC2's bias (plus a centered branch's shift u): the logits exactly while FC2's weight
        is zero (a fresh conversion), the branch's bias term otherwise (centered: the logits of
        a sample whose h is the running mean)."""
        bias = read("ratio.fc2.bias")
        try:
            bias = bias + read("ratio.logit_shift")
        except Exception:  # the reader's own "no such tensor" (safetensors'): uncentered
            pass
        return bias, not read("ratio.fc2.weight").any()

    @property
    def logit_scale(self) -> float:
        """FC2's scale s (logits = b + s W h), kept by the ratio branch."""
        return self.ratio.logit_scale

    def kernel_settings(self) -> KernelSettings:
        """What ``exemplar_function``'s math reads from this layer, in the current mode."""
        return KernelSettings(
            normalizers=self.normalizers,
            eps=self.eps,
            relu=self.activation == "relu",
            shared_affine=self.shared_affine,
            num_groups=self.num_groups,
            training=self.training,
            logit_scale=self.logit_scale,
            renorm=self.renorm,
            frozen_stats=self.frozen_stats,
            synced=self.syncs_now(),
        )

    def kernel_tensors(self) -> ENTensors:
        branch = self.ratio
        return ENTensors(
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            None if branch.conv is None else branch.conv.weight,
            branch.fc1.weight,
            branch.fc1.bias,
            branch.fc2.weight,
            branch.logit_bias(),
            self.frozen_stale(),
            self.mix_offset,
        )

    def _math(self, stats: InstanceStats) -> tuple[Tensor, Tensor, Tensor | None, tuple]:
        """``en_coefficients`` under autograd (the reference path and ``ratios()``)."""
        cfg = self.kernel_settings()
        return en_coefficients(cfg, stats.mean, stats.var, self.kernel_tensors(), stats.count)

    def ratios(self, x: Tensor) -> Tensor:
        """The lambda (N x K) that ``forward`` would use on x now; running stats untouched."""
        return self.branch(x).ratios

    def branch(self, x: Tensor) -> Branch:
        """lambda, the logits b + s W h and the saturated hidden units on x, as forward
        computes them (``en_coefficients``); running statistics untouched."""
        self._check_input_dim(x)
        with _float32_math(x):
            _, _, _, saved = self._math(instance_stats(x))
            lam, h = saved[4], saved[5]
            fc2 = self.ratio.fc2
            logits = torch.addmm(
                self.ratio.logit_bias().to(h.dtype),
                h,
                fc2.weight.to(h.dtype).t(),
                alpha=self.logit_scale,
            )
        saturated = h <= 0 if self.activation == "relu" else h.abs() > SATURATED
        return Branch(lam, logits, saturated)

    def gamma_sizes(self) -> list[float] | None:
        if self.shared_affine:
            return None
        rms = self.weight.detach().double().square().mean(1).sqrt()
        ref = rms.max()
        if self.source_normalizer in self.normalizers:
            source = rms[self.normalizers.index(self.source_normalizer)]
            ref = source if source > 0 else ref  # a zero-initialized gamma (a residual's last)
        return (rms / ref if ref > 0 else rms).tolist()

    def _coefficients(self, stats: InstanceStats) -> tuple[Tensor, Tensor, Tensor | None]:
        """A, B and the bn record of the autograd reference path (``fused_en(False)``); the
        batch's mean of h is kept for ``_normalize``."""
        a, b, record, saved = self._math(stats)
        self._hidden = hidden_mean(saved, None)
        return a, b, record

    def _normalize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Y and the bn member's record, on the path ``runtime.choose`` picks. Where the branch
        can learn (training, or eval mode under autograd with FC2 trainable: frozen-statistics
        training, ``set_bn_stats(model, "running")``) a centered branch's running mean of h
        follows the batch; the first such batch sets it before the math runs, so FC2's first
        step already sees centered h."""
        branch = self.ratio
        learning = branch.centered and (
            self.training or (torch.is_grad_enabled() and branch.fc2.weight.requires_grad)
        )
        if learning and not branch.hidden_ready:
            with torch.no_grad(), _float32_math(x):
                _, _, _, saved = self._math(instance_stats(x))
                branch.track_hidden(hidden_mean(saved, None))
        y, record, hidden = self._run(x)
        if learning and hidden is not None:
            branch.track_hidden(hidden)
        return y, record

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Y, the bn member's record and the batch's mean of h (None on the inference path)
        on the chosen path."""
        with _float32_math(x):
            tensors = self.kernel_tensors()
            needs_grad = torch.is_grad_enabled() and (
                x.requires_grad or any(t is not None and t.requires_grad for t in tensors)
            )
            path, kernel, triton = runtime.choose(x, self.training, needs_grad)
            if path == "reference":  # autograd over en_coefficients
                self._hidden = None
                y, record = super()._normalize(x)
                hidden, self._hidden = self._hidden, None
                return y, record, hidden
            cfg = self.kernel_settings()
            if path == "inference":
                return native.en_inference(kernel, x, cfg, tensors), None, None
            if path == "node":
                return ExemplarNormFunction.apply(x, cfg, kernel, triton, *tensors)
            y, record, saved, ran = exemplar_norm(x, cfg, tensors, kernel, triton)
            return y, record, hidden_mean(saved, ran)

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
        if self.anchored != "auto":
            parts.append(f"anchored={self.anchored}")
        if "gn" in self.normalizers:
            parts.append(f"num_groups={self.num_groups}")
        return ", ".join(parts)
