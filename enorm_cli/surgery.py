"""Model surgery: BatchNorm / GroupNorm layers -> ExemplarNorm2d that computes the same function.

Surgery as data: ``POLICIES`` maps each source class to how its statistics and
affine parameters are read and which normalizer it is. The replacement starts
as its source exactly (``docs/en-layer.md``): the ratio branch's last FC is
zero with a bias prior of ``margin`` on the source normalizer, so lambda is
constant, lambda_src = e^m / (e^m + K - 1); gamma_src = gamma / lambda_src,
other gammas 0, every beta = beta, running statistics copied. In eval mode
Y = gamma * Xhat_src + beta, to float rounding. Gradients reach the fc2 layer,
gammas and betas at once; the conv and fc1 start receiving them after the
first update moves fc2 off zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import EnormError
from .layers import NORMALIZERS, ExemplarNorm2d, SwitchableNorm2d
from .layers.base import MixedNorm2d

LAYERS = ("en", "sn")


@dataclass(frozen=True)
class ENSettings:
    """How converted layers are built; stored in checkpoints to rebuild the model."""

    normalizers: tuple[str, ...] = ("bn", "in", "ln")
    reduction: int = 16
    pi: int = 50
    margin: float = 2.0
    activation: str = "tanh"
    use_conv: bool = True
    include: str | None = None
    exclude: str | None = None
    layer: str = "en"
    shared_affine: bool = False
    logit_scale: float | None = None
    """EN's FC2 scale s (logits = b + s W h); None: 1 / sqrt(pi K) (``default_logit_scale``)."""

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise EnormError(f"bad --layer {self.layer!r}: use en (Exemplar) or sn (Switchable, the baseline)")
        if self.activation not in ("tanh", "relu"):
            raise EnormError(f"bad activation {self.activation!r}: use tanh or relu")
        bad = [n for n in self.normalizers if n not in NORMALIZERS]
        if bad or not self.normalizers or len(set(self.normalizers)) != len(self.normalizers):
            raise EnormError(
                f"bad --normalizers {','.join(self.normalizers)!r}: give distinct names "
                f"from {','.join(NORMALIZERS)}, e.g. --normalizers bn,in,ln"
            )
        if self.reduction < 1:
            raise EnormError(f"--reduction must be a positive integer, got {self.reduction}")
        if self.pi < 1:
            raise EnormError(f"--pi must be a positive integer, got {self.pi}")
        if self.logit_scale is not None and not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise EnormError(f"--logit-scale must be a positive number, got {self.logit_scale}")
        if not math.isfinite(self.margin):
            raise EnormError(f"--margin must be a finite number, got {self.margin}")
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise EnormError(f"{flag} {pattern!r} is not a valid regex: {exc}") from None

    @property
    def exact(self) -> bool:
        """Whether converted layers start as exactly their source (EN with per-normalizer affines).

        SN's static ratios mix the normalizers' statistics, and one shared affine set
        scales every normalizer alike: both start near, not at, the source function.
        """
        return self.layer == "en" and not self.shared_affine

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ENSettings:
        known = {f for f in cls.__dataclass_fields__}
        # Checkpoints written before logit_scale existed had an unscaled FC2.
        legacy = {"logit_scale": 1.0}
        return cls(**{**legacy, **{k: v for k, v in data.items() if k in known},
                      "normalizers": tuple(data["normalizers"])})

    def selects(self, name: str) -> bool:
        """Whether --include/--exclude let the module with this name be converted."""
        if self.include is not None and not re.search(self.include, name):
            return False
        return self.exclude is None or not re.search(self.exclude, name)


class _ActTail:
    """A drop and an activation after the norm, as timm's *NormAct2d layers have."""

    def __init__(self, *args: Any, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class ExemplarNormAct2d(_ActTail, ExemplarNorm2d):
    """ExemplarNorm2d followed by a drop and an activation, in place of timm's *NormAct2d."""


class SwitchableNormAct2d(_ActTail, SwitchableNorm2d):
    """SwitchableNorm2d followed by a drop and an activation, in place of timm's *NormAct2d."""


@dataclass(frozen=True)
class SourceNorm:
    """What a source layer contributes: its normalizer, statistics and affine."""

    normalizer: str
    num_features: int
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    momentum: float | None = 0.1
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    num_groups: int = 32
    drop: nn.Module | None = None
    act: nn.Module | None = None


def _bn(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "bn", m.num_features, m.eps, getattr(m, "weight", None), getattr(m, "bias", None),
        getattr(m, "momentum", 0.1), m.running_mean, m.running_var,
        drop=getattr(m, "drop", None), act=getattr(m, "act", None),
    )


def _frozen_bn(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "bn", m.weight.shape[0], m.eps, m.weight, m.bias, 0.1, m.running_mean, m.running_var,
        drop=getattr(m, "drop", None), act=getattr(m, "act", None),
    )


def _gn(m: nn.GroupNorm) -> SourceNorm:
    g, c = m.num_groups, m.num_channels
    normalizer = "ln" if g == 1 else "in" if g == c else "gn"
    return SourceNorm(
        normalizer, c, m.eps, m.weight, m.bias, num_groups=g,
        drop=getattr(m, "drop", None), act=getattr(m, "act", None),
    )


def _policies() -> dict[type, tuple[str, Callable[[Any], SourceNorm]]]:
    """Source class -> (type name for reports, reader). Exact classes: subclasses may change forward."""
    from timm.layers import (
        BatchNormAct2d,
        FrozenBatchNormAct2d,
        GroupNorm,
        GroupNorm1,
        GroupNorm1Act,
        GroupNormAct,
    )
    from timm.layers.norm_act import SyncBatchNormAct
    from torchvision.ops.misc import FrozenBatchNorm2d

    return {
        nn.BatchNorm2d: ("BatchNorm2d", _bn),
        nn.SyncBatchNorm: ("SyncBatchNorm", _bn),
        BatchNormAct2d: ("BatchNormAct2d", _bn),
        SyncBatchNormAct: ("SyncBatchNormAct", _bn),
        FrozenBatchNorm2d: ("FrozenBatchNorm2d", _frozen_bn),
        FrozenBatchNormAct2d: ("FrozenBatchNormAct2d", _frozen_bn),
        nn.GroupNorm: ("GroupNorm", _gn),
        GroupNorm: ("GroupNorm", _gn),
        GroupNorm1: ("GroupNorm1", _gn),
        GroupNormAct: ("GroupNormAct", _gn),
        GroupNorm1Act: ("GroupNorm1Act", _gn),
    }


def _looks_like_norm(module: nn.Module) -> bool:
    """Norm layers we leave alone but report (LayerNorm, BatchNorm1d, ...)."""
    name = type(module).__name__
    return "Norm" in name and not isinstance(module, MixedNorm2d) and not any(
        isinstance(c, nn.Module) and "Norm" in type(c).__name__ for c in module.children()
    )


@dataclass
class ConvertedLayer:
    name: str
    source_type: str
    channels: int
    normalizers: tuple[str, ...]
    params_added: int


@dataclass
class ConversionReport:
    converted: list[ConvertedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """(module name, type, reason) of norm layers left as they are."""

    def by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.converted:
            counts[layer.source_type] = counts.get(layer.source_type, 0) + 1
        return counts


def build_norm(src: SourceNorm, settings: ENSettings) -> MixedNorm2d:
    """The EN (or SN) layer that replaces ``src``, on src's device and dtype.

    EN with per-normalizer affines computes exactly what ``src`` computes in eval
    mode; SN and shared-affine EN start near it (``ENSettings.exact``).
    """
    normalizers = settings.normalizers
    if src.normalizer not in normalizers:
        normalizers = (*normalizers, src.normalizer)
    common: dict[str, Any] = dict(
        normalizers=normalizers, eps=src.eps, momentum=src.momentum,
        num_groups=src.num_groups if "gn" in normalizers else 32,
    )
    tail = src.act is not None or src.drop is not None
    if tail:
        common.update(drop=src.drop, act=src.act)
    layer: MixedNorm2d
    if settings.layer == "sn":
        layer = (SwitchableNormAct2d if tail else SwitchableNorm2d)(src.num_features, **common)
    else:
        layer = (ExemplarNormAct2d if tail else ExemplarNorm2d)(
            src.num_features, **common, reduction=settings.reduction, pi=settings.pi,
            activation=settings.activation, use_conv=settings.use_conv, shared_affine=settings.shared_affine,
            logit_scale=settings.logit_scale,
        )
    ref = src.weight if src.weight is not None else src.running_mean
    if ref is not None:
        layer.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
    k = len(normalizers)
    s = normalizers.index(src.normalizer)
    lam_src = math.exp(settings.margin) / (math.exp(settings.margin) + k - 1)
    prior = torch.zeros(k)
    prior[s] = settings.margin
    with torch.no_grad():
        gamma = src.weight.detach() if src.weight is not None else torch.ones(src.num_features)
        beta = src.bias.detach() if src.bias is not None else torch.zeros(src.num_features)
        if isinstance(layer, SwitchableNorm2d):
            layer.weight.copy_(gamma)
            layer.bias.copy_(beta)
            layer.mean_weight.copy_(prior)
            layer.var_weight.copy_(prior)
        else:
            layer.weight.zero_()
            if settings.shared_affine:
                layer.weight[0] = gamma.to(layer.weight)
            else:
                layer.weight[s] = gamma.to(layer.weight) / lam_src
            layer.bias.copy_(beta.to(layer.bias).expand_as(layer.bias))
            layer.ratio.fc2.weight.zero_()
            layer.ratio.fc2.bias.copy_(prior)
        if src.running_mean is not None and src.running_var is not None:
            layer.running_mean.copy_(src.running_mean)
            layer.running_var.copy_(src.running_var)
    return layer


def convert_model(model: nn.Module, settings: ENSettings) -> ConversionReport:
    """Replace, in place, every selected source norm layer with EN; report what changed.

    A module shared by two parents is converted once and stays shared.
    """
    policies = _policies()
    report = ConversionReport()
    replacements: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        policy = policies.get(type(module))
        if policy is None:
            if name and _looks_like_norm(module) and not _inside_converted(name, report):
                report.skipped.append((name, type(module).__name__, "not a 2-D batch or group norm"))
            continue
        if not settings.selects(name):
            report.skipped.append((name, type(module).__name__, "not selected by --include/--exclude"))
            continue
        if policy[1] is _bn and getattr(module, "running_mean", None) is None:
            report.skipped.append((name, type(module).__name__, "no running statistics to start from"))
            continue
        new = replacements.get(id(module))
        if new is None:
            new = build_norm(policy[1](module), settings)
            replacements[id(module)] = new
        parent_name, _, child = name.rpartition(".")
        if not name:
            raise EnormError("the model itself is a norm layer: convert a network, not one layer")
        setattr(model.get_submodule(parent_name), child, new)
        report.converted.append(
            ConvertedLayer(name, policy[0], new.num_features, new.normalizers, _params_added(module, new))
        )
    return report


def _inside_converted(name: str, report: ConversionReport) -> bool:
    return any(name.startswith(layer.name + ".") for layer in report.converted)


def _params_added(old: nn.Module, new: nn.Module) -> int:
    return sum(p.numel() for p in new.parameters()) - sum(p.numel() for p in old.parameters())


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (shared ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
