"""Model surgery: BatchNorm / GroupNorm layers -> ExemplarNorm2d that computes the same function.

Surgery as data: ``_policies`` maps each source class to how its statistics and
affine parameters are read (a ``SourceNorm``); the layer that replaces it comes from
the registry (``layers.get_norm_layer``) and builds itself from the source
(``MixedNorm2d.from_source``). The replacement starts
as its source exactly (``docs/en-layer.md``): the ratio branch's last FC is
zero with a bias prior of ``margin`` on the source normalizer, so lambda is
constant, lambda_src = e^m / (e^m + K - 1); gamma_src = gamma / lambda_src,
other gammas 0, every beta = beta, running statistics copied. In eval mode
Y = gamma * Xhat_src + beta, to float rounding. Gradients reach the fc2 layer,
gammas and betas at once; the conv and fc1 start receiving them after the
first update moves fc2 off zero.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config.settings import ENSettings
from ..errors import EnormError
from ..layers import MixedNorm2d, SourceNorm, get_norm_layer


def _bn(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "bn",
        m.num_features,
        m.eps,
        getattr(m, "weight", None),
        getattr(m, "bias", None),
        getattr(m, "momentum", 0.1),
        m.running_mean,
        m.running_var,
        drop=getattr(m, "drop", None),
        act=getattr(m, "act", None),
    )


def _frozen_bn(m: nn.Module) -> SourceNorm:
    return SourceNorm(
        "bn",
        m.weight.shape[0],
        m.eps,
        m.weight,
        m.bias,
        0.1,
        m.running_mean,
        m.running_var,
        drop=getattr(m, "drop", None),
        act=getattr(m, "act", None),
    )


def _gn(m: nn.GroupNorm) -> SourceNorm:
    g, c = m.num_groups, m.num_channels
    normalizer = "ln" if g == 1 else "in" if g == c else "gn"
    return SourceNorm(
        normalizer,
        c,
        m.eps,
        m.weight,
        m.bias,
        num_groups=g,
        drop=getattr(m, "drop", None),
        act=getattr(m, "act", None),
    )


def _policies() -> dict[type, tuple[str, Callable[[Any], SourceNorm]]]:
    """Source class -> (type name for reports, reader). Exact classes: subclasses may change
    forward."""
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
    return (
        "Norm" in name
        and not isinstance(module, MixedNorm2d)
        and not any(
            isinstance(c, nn.Module) and "Norm" in type(c).__name__ for c in module.children()
        )
    )


@dataclass(frozen=True)
class ConvertedLayer:
    """One converted layer, as the conversion report and ``enorm inspect`` show it."""

    name: str
    source_type: str
    channels: int
    normalizers: tuple[str, ...]
    params_added: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_type": self.source_type,
            "channels": self.channels,
            "normalizers": list(self.normalizers),
            "params_added": self.params_added,
        }


@dataclass
class ConversionReport:
    converted: list[ConvertedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """(module name, type, reason) of norm layers left as they are."""
    starts: set[bool] = field(default_factory=set)
    """How the EN layers started (``ExemplarNorm2d.anchored`` after ``from_source``)."""

    def settings_used(self, settings: ENSettings) -> ENSettings:
        """``settings`` with ``anchored: auto`` as the layers resolved it, when they all took
        one start: what a checkpoint records, so that its settings say how its layers began
        (and a recipe that names the resolved value agrees with the file)."""
        if settings.anchored == "auto" and len(self.starts) == 1:
            return settings.model_copy(update={"anchored": next(iter(self.starts))})
        return settings

    def by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.converted:
            counts[layer.source_type] = counts.get(layer.source_type, 0) + 1
        return counts


@dataclass(frozen=True)
class Provenance:
    """What a converted model in memory was made with: what ``save_model`` writes beside its
    weights so that ``load_model`` can rebuild it."""

    settings: ENSettings
    converted_layers: dict[str, str]
    """Module name -> the source layer's type."""
    layer_normalizers: dict[str, list[str]]
    source_model: str | None = None
    """The name enorm builds the source architecture by (``models.parse_model_name``)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] | None = None


_provenance: weakref.WeakKeyDictionary[nn.Module, Provenance] = weakref.WeakKeyDictionary()


def remember(
    model: nn.Module, settings: ENSettings, report: ConversionReport, **more: Any
) -> Provenance:
    """Record how ``model`` was converted (``provenance_of``); ``more``: ``Provenance``'s other
    fields. A weak reference: nothing is added to the model, nothing outlives it."""
    record = Provenance(
        settings,
        {c.name: c.source_type for c in report.converted},
        {c.name: list(c.normalizers) for c in report.converted},
        **more,
    )
    _provenance[model] = record
    return record


def provenance_of(model: nn.Module) -> Provenance | None:
    """How ``model`` was converted (``convert_model``, ``load_model``), if enorm made it."""
    return _provenance.get(model)


def build_norm(src: SourceNorm, settings: ENSettings) -> MixedNorm2d:
    """The EN (or SN) layer that replaces ``src``, on src's device and dtype.

    EN with per-normalizer affines computes exactly what ``src`` computes in eval
    mode; SN and shared-affine EN start near it (``ENSettings.exact``).
    """
    cls = get_norm_layer(settings.layer, act=src.has_tail)
    options = settings.layer_options(cls.options)
    return cls.from_source(src, settings.normalizers, settings.margin, **options)


def replace_norms(model: nn.Module, settings: ENSettings) -> ConversionReport:
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
                report.skipped.append(
                    (name, type(module).__name__, "not a 2-D batch or group norm")
                )
            continue
        if not settings.selects(name):
            report.skipped.append((name, type(module).__name__, "not selected by include/exclude"))
            continue
        if policy[1] is _bn and getattr(module, "running_mean", None) is None:
            report.skipped.append(
                (name, type(module).__name__, "no running statistics to start from")
            )
            continue
        new = replacements.get(id(module))
        if new is None:
            new = build_norm(policy[1](module), settings)
            replacements[id(module)] = new
            if isinstance(getattr(new, "anchored", None), bool):
                report.starts.add(new.anchored)
        parent_name, _, child = name.rpartition(".")
        if not name:
            raise EnormError("the model itself is a norm layer: convert a network, not one layer")
        setattr(model.get_submodule(parent_name), child, new)
        report.converted.append(
            ConvertedLayer(
                name, policy[0], new.num_features, new.normalizers, _params_added(module, new)
            )
        )
    return report


def nothing_to_convert(what: str, settings: ENSettings, report: ConversionReport) -> str:
    """The one line for a model with no layer to convert (``enorm convert`` says the same)."""
    selected = " that include/exclude select" if settings.include or settings.exclude else ""
    kinds = sorted({t for _, t, _ in report.skipped})
    found = f" (it has {', '.join(kinds)})" if kinds else ""
    return f"{what} has no BatchNorm or GroupNorm layer to convert{selected}{found}"


def restart_from_source(converted: nn.Module, source: nn.Module, settings: ENSettings) -> None:
    """Redo, in place, what the conversion computed in each converted layer of ``converted``
    from the same-named layer of ``source`` (``MixedNorm2d.start_as``), in converted's dtype.

    ``verify`` uses it on float64 copies: the conversion's arithmetic redone in float64,
    with the parameters the layers drew at random kept as they are.
    """
    policies = _policies()
    for name, layer in converted.named_modules():
        if not isinstance(layer, MixedNorm2d):
            continue
        src = source.get_submodule(name)
        policy = policies.get(type(src))
        if policy is not None:  # else the layer was mixed in the source already
            layer.start_as(policy[1](src), settings.margin)


def _inside_converted(name: str, report: ConversionReport) -> bool:
    return any(name.startswith(layer.name + ".") for layer in report.converted)


def _params_added(old: nn.Module, new: nn.Module) -> int:
    return sum(p.numel() for p in new.parameters()) - sum(p.numel() for p in old.parameters())


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (shared ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
