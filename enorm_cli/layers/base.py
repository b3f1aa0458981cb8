"""What EN and SN share: the layer interface, running statistics, statistics in the current
mode, forward, and the exact start from a source layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .fused_affine import fused_affine
from .source import SourceNorm, source_prior
from .statistics import (
    FROZEN_STALE,
    FROZEN_UNSEEN,
    InstanceStats,
    StatsMode,
    check_normalizers,
    distributed_world_size,
    mixed_stats,
    running_average_factor,
    update_running_stats,
    watch_frozen_stats,
)

STATE_BUFFERS = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "frozen_log_r",
    "frozen_state",
    "ratio.hidden_mean",
    "ratio.logit_shift",
    "mix_offset",
)
"""Every mixed layer's buffers: state, not parameters (what ``inspect`` leaves out of a
layer's added parameters)."""


class Branch(NamedTuple):
    """What sets a layer's ratios on one batch (``MixedNorm2d.branch``)."""

    ratios: Tensor
    """N x K, after the softmax: what forward mixes with."""
    logits: Tensor
    """N x K, before it (defined up to a per-sample constant)."""
    saturated: Tensor | None
    """N x H bool: the ratio branch's hidden units that no longer pass a gradient (tanh at
    |h| > ``SATURATED``, relu at 0); None for a layer without a branch (SN)."""


SATURATED = 0.99
"""|tanh| above which a hidden unit counts as saturated (its gradient below 2%)."""


class MixedNorm2d(nn.Module):
    """Base of layers that mix several normalizers of an N x C x H x W input.

    Buffers mirror ``nn.BatchNorm2d`` (``running_mean``, ``running_var``,
    ``num_batches_tracked``) so the "bn" member behaves exactly like it:
    batch statistics in training (updating the running ones), running ones in eval.
    With ``sync_stats`` set (a plain attribute, not saved) and torch.distributed
    running with more than one process, training batch statistics cover the
    whole distributed batch, as ``nn.SyncBatchNorm`` does. With ``renorm`` set (also a plain
    attribute, set by training from ``model.bn_stats``) the bn member is batch-renormalized in
    training (``statistics.bn_member_stats``). With ``frozen_stats`` (a plain attribute too)
    training leaves the running statistics as they are: renorm then normalizes against the
    source's statistics (``model.bn_stats: renorm_frozen``), until the guard finds them stale
    (``statistics.watch_frozen_stats``; its buffers ``frozen_log_r`` and ``frozen_state``
    are saved, so a resumed run keeps its verdict).

    The interface every mixed layer has (and the only thing surgery, training and
    inspection ask of one): ``from_source`` (the replacement of a source layer, starting
    as it), ``ratio_parameters``, ``sample_parameters``, ``hidden_parameters`` and
    ``affine_parameters`` (optimizer groups), ``prior_ratio_logits`` (the input-independent
    ratios, read from a checkpoint without building the layer), ``ratios(x)``, and torch's
    ``reset_parameters``/``reset_running_stats``.
    Layers are picked by name in ``registry.py``.
    """

    kind: ClassVar[str]
    """The registry name (``ENSettings.layer``)."""
    options: ClassVar[tuple[str, ...]] = ()
    """``ENSettings`` fields the constructor takes besides the common ones."""
    sync_stats: bool = False
    renorm: bool = False
    frozen_stats: bool = False

    def __init__(
        self,
        num_features: int,
        normalizers: tuple[str, ...],
        eps: float,
        momentum: float | None,
        num_groups: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
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
        self.margin: float | None = None
        """The prior logit this layer was converted with (``start_as``); None: built without
        a source."""
        self.source_normalizer: str | None = None
        """The normalizer of the layer it was converted from (``start_as``)."""
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.register_buffer("frozen_log_r", torch.zeros(2, num_features, **factory))
        self.register_buffer(
            "frozen_state", torch.tensor(FROZEN_UNSEEN, dtype=torch.long, device=device)
        )

    @classmethod
    def from_source(
        cls,
        src: SourceNorm,
        normalizers: tuple[str, ...],
        margin: float,
        **options: Any,
    ) -> MixedNorm2d:
        """The layer that replaces ``src``, on its device and dtype, starting as it
        (``docs/en-layer.md``, exact conversion).

        ``normalizers`` gains the source's own when it lacks it; ``margin`` is the prior
        logit of the source normalizer; ``options`` go to the constructor (``cls.options``,
        plus ``drop``/``act`` for the norm+act classes, which ``src`` supplies).
        """
        if src.normalizer not in normalizers:
            normalizers = (*normalizers, src.normalizer)
        tail = {"drop": src.drop, "act": src.act} if src.has_tail else {}
        layer = cls(
            src.num_features,
            normalizers=normalizers,
            eps=src.eps,
            momentum=src.momentum,
            num_groups=src.num_groups if "gn" in normalizers else 32,
            **tail,
            **options,
            **src.factory_kwargs(),
        )
        layer.start_as(src, margin)
        return layer

    def start_as(self, src: SourceNorm, margin: float) -> None:
        """Set what the conversion computes (affines, prior, running statistics) so the layer
        starts as ``src``; parameters a new layer draws at random (EN's conv and FC1) stay."""
        prior, lam_src = source_prior(self.normalizers, src.normalizer, margin)
        self.margin = margin
        self.source_normalizer = src.normalizer
        with torch.no_grad():
            self._start_as(src, prior, lam_src)
            if src.running_mean is not None and src.running_var is not None:
                self.running_mean.copy_(src.running_mean)
                self.running_var.copy_(src.running_var)
            self.reset_frozen_guard()

    def _start_as(self, src: SourceNorm, prior: Tensor, lam_src: float) -> None:
        """Set the parameters so the layer starts as ``src`` (prior: K ratio logits; lam_src:
        the source normalizer's ratio under them). Called under no_grad."""
        raise NotImplementedError

    def ratio_parameters(self) -> list[nn.Parameter]:
        """What sets the ratios (EN's branch, SN's ratio logits): their own optimizer group."""
        raise NotImplementedError

    def sample_parameters(self) -> list[nn.Parameter]:
        """What sets only how samples' ratios differ from the layer's mean mixture (a centered
        EN branch's FC2 weight): their own optimizer group. None by default."""
        return []

    def hidden_parameters(self) -> list[nn.Parameter]:
        """The ratio branch's hidden layer (EN's conv and FC1): features of the input that the
        logits read, their own optimizer group (``optim.hidden_lr_scale``). None by default."""
        return []

    def affine_parameters(self) -> list[nn.Parameter]:
        """The gammas and betas: their own optimizer group."""
        return [self.weight, self.bias]

    starts_as_source = False
    """Whether the layer computes exactly its source at the start, so that another normalizer
    enters only once its logits (or gammas) move: then optimizers that divide out the gradient's
    scale give its logits their own rate (``optim.logit_multiple``). SN starts mixed."""

    def ratio_step_factor(self) -> float:
        """How much further one SGD step moves a sample's ratio logits than it moves a plain
        logit (SN's ratio logits: 1). ``optim.ratio_lr_scale: auto`` divides it out."""
        return 1.0

    def source_gain_share(self) -> float:
        """The factor by which this layer's conversion (its ``margin``) multiplies the source
        gamma's gradient (1: the affine learns as the source's did). ``optim.affine_lr_scale:
        auto`` divides it back out."""
        return 1.0

    @staticmethod
    def prior_ratio_logits(read: Callable[[str], Tensor]) -> tuple[Tensor, bool]:
        """The ratio logits that do not depend on the input, from the layer's own tensors
        (``read("weight")`` etc.), and whether they are the ratios forward uses."""
        raise NotImplementedError

    def ratios(self, x: Tensor) -> Tensor:
        """The post-softmax ratios (N x K) forward uses on x; running statistics untouched."""
        raise NotImplementedError

    def branch(self, x: Tensor) -> Branch:
        """The ratios forward uses on x with their logits and the branch's saturated units
        (``Branch``); running statistics untouched. Static ratios: the same for every sample."""
        ratios = self.ratios(x)
        return Branch(ratios, ratios.clamp_min(1e-30).log(), None)

    def gamma_sizes(self) -> list[float] | None:
        """Each normalizer's gamma size (root mean square over channels) relative to the
        source normalizer's (the largest where the layer has no source): 0 while a normalizer
        is inert, as every normalizer but the source's is after a conversion. None where one
        affine serves every normalizer (SN, shared-affine EN)."""
        return None

    def reset_parameters(self) -> None:
        """Running statistics and parameters as a new layer has them (as torch norms)."""
        raise NotImplementedError

    def reset_running_stats(self) -> None:
        """Zero means, unit variances, no batches seen (as ``nn.BatchNorm2d``)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.reset_frozen_guard()

    def reset_frozen_guard(self) -> None:
        """Forget the guard's reference and verdict (``statistics.watch_frozen_stats``)."""
        self.frozen_log_r.zero_()
        self.frozen_state.fill_(FROZEN_UNSEEN)

    def frozen_stale(self) -> Tensor | None:
        """A bool tensor: the guard has tripped, in ``renorm_frozen`` training (None otherwise)."""
        if not (self.training and self.renorm and self.frozen_stats):
            return None
        return self.frozen_state == FROZEN_STALE

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
        """State dicts from before the frozen-statistics guard lack its buffers: a fresh guard
        (nothing measured yet), as torch's ``_BatchNorm`` fills in ``num_batches_tracked``."""
        version = local_metadata.get("version")
        if version is None or version < self._version:
            if prefix + "frozen_state" not in state_dict:
                state_dict[prefix + "frozen_log_r"] = torch.zeros_like(self.frozen_log_r)
                state_dict[prefix + "frozen_state"] = torch.zeros_like(self.frozen_state)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (N x C x H x W), got {x.dim()}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")

    def syncs_now(self) -> bool:
        """Whether training statistics cover every process now (``sync_stats``, a bn member,
        training, and torch.distributed with more than one process)."""
        return (
            self.training
            and self.sync_stats
            and "bn" in self.normalizers
            and distributed_world_size() > 1
        )

    def stats_mode(self) -> StatsMode:
        """What decides this layer's statistics now (``statistics.mixed_stats``)."""
        return StatsMode(
            normalizers=self.normalizers,
            eps=self.eps,
            num_groups=self.num_groups,
            training=self.training,
            renorm=self.renorm,
            frozen_stats=self.frozen_stats,
            synced=self.syncs_now(),
        )

    def _statistics(
        self, stats: InstanceStats
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """Every normalizer's (mean, variance) in the current mode (``statistics.mixed_stats``)
        and the bn member's record for the running statistics (2 x C, training)."""
        pairs, member = mixed_stats(
            self.stats_mode(),
            stats.mean,
            stats.var,
            stats.count,
            self.running_mean,
            self.running_var,
            self.frozen_stale(),
        )
        return pairs, None if member is None else member.record

    def _update_running_stats(self, record: Tensor) -> None:
        """One BatchNorm running-statistics step from ``record`` (2 x C: the batch mean and
        unbiased variance); with ``frozen_stats`` only once the guard has tripped
        (``statistics.watch_frozen_stats``, which this step feeds). The one place every layer
        and path updates them (``forward``)."""
        if self.frozen_stats:
            if not self.renorm:
                return
            watch_frozen_stats(
                record, self.running_var, self.eps, self.frozen_log_r, self.frozen_state
            )
            stale = self.frozen_state == FROZEN_STALE
            self.num_batches_tracked.add_(stale.long())
            if self.momentum is None:
                factor = stale / self.num_batches_tracked.clamp(min=1)
            else:
                factor = stale * self.momentum
            update_running_stats(
                self.running_mean, self.running_var, record, factor.to(self.running_mean.dtype)
            )
            return
        self.num_batches_tracked.add_(1)
        factor = running_average_factor(self.momentum, self.num_batches_tracked)
        update_running_stats(self.running_mean, self.running_var, record, factor)

    def _coefficients(self, stats: InstanceStats) -> tuple[Tensor, Tensor, Tensor | None]:
        """A, B (N x C) of ``Y = A * X + B`` and the bn member's record (2 x C, training)."""
        raise NotImplementedError

    def _normalize(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Y and the bn member's record (2 x C or None): ``fused_affine`` over
        ``_coefficients``."""
        records: list[Tensor | None] = []

        def coefficients(stats: InstanceStats) -> tuple[Tensor, Tensor]:
            a, b, record = self._coefficients(stats)
            records.append(record)
            return a, b

        params = [p for p in self.parameters() if p.requires_grad]
        y = fused_affine(x, coefficients, params)
        return y, records[0]

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        y, record = self._normalize(x)
        if record is not None and record.numel():
            self._update_running_stats(record)
        return y
