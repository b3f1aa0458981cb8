"""Conversion and its verification: a model's BatchNorm/GroupNorm layers replaced by EN (or SN)
layers that compute the same function (``surgery``), checked in float64 (``verify``), and
``enorm convert``'s whole path from a model name to a verified file (``pipeline``).

``convert_model`` is the Python entry point, one call as torch's
``SyncBatchNorm.convert_sync_batchnorm`` and timm's ``freeze_batch_norm_2d`` are.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from ..config.settings import ENSettings
from ..errors import EnormError
from ..layers import MixedNorm2d
from .surgery import nothing_to_convert, remember, replace_norms
from .verify import FLOAT64_TOLERANCE, Verification, default_batch, verify_conversion


def convert_model(
    model: nn.Module,
    settings: ENSettings | None = None,
    *,
    verify: bool = False,
    example_inputs: Tensor | None = None,
    tolerance: float = FLOAT64_TOLERANCE,
    **options: Any,
) -> nn.Module:
    """Replace every BatchNorm/GroupNorm layer of ``model`` with Exemplar Normalization that
    starts as exactly that layer; returns the converted model.

    As ``nn.SyncBatchNorm.convert_sync_batchnorm``: the model's layers are replaced in place
    and the model is returned, except where ``model`` is itself a norm layer, whose
    replacement is returned. Works on any ``nn.Module``: timm and torchvision classifiers,
    detection and segmentation models (``FrozenBatchNorm2d`` included), timm
    ``features_only`` models, segmentation-models-pytorch. The rules are ``enorm convert``'s:
    a model with nothing to convert is refused, and a module shared by two parents stays
    shared.

    Args:
        model: the model; its training mode is kept.
        settings: the layer settings (``ENSettings``); or give its fields as keyword
            arguments (``normalizers=("bn", "in", "ln")``, ``margin=2.0``, ``layer="sn"``,
            ``exclude="^stem"``, ...).
        verify: check that the converted model computes the source's function (in float64,
            ``verify.verify_conversion``) and raise ``EnormError`` if it does not. Costs a copy
            of the model and four forward passes.
        example_inputs: the batch ``verify`` runs (default: 8 smooth-noise images at the
            model's ``pretrained_cfg`` input size, else 224 px).
        tolerance: the floor of the float64 tolerance (``verify``).

    Raises:
        EnormError: nothing to convert, or ``verify`` found another function.
        pydantic.ValidationError: a setting out of range (a ``ValueError``).
    """
    if settings is not None and options:
        raise TypeError("give settings or keyword options, not both")
    settings = settings if settings is not None else ENSettings(**options)
    source = copy.deepcopy(model) if verify else None
    if _is_norm(model):  # a norm layer alone becomes child "0" of a holder, to be replaced
        holder = nn.Sequential(model)
        report = replace_norms(holder, settings)
        converted = holder[0]
    else:
        report = replace_norms(model, settings)
        converted = model
    if not report.converted:
        raise EnormError(nothing_to_convert(type(model).__name__, settings, report))
    settings = report.settings_used(settings)
    remember(converted, settings, report)
    if source is not None:
        check = _verify(source, converted, settings, example_inputs, tolerance)
        if settings.exact and not check.passed:
            raise EnormError(
                f"the converted {type(model).__name__} does not compute its source's function: "
                f"float64 relative delta {check.float64.relative_delta:.2e} > tolerance "
                f"{check.tolerance:.2e}, rounding {check.rounding_ulps:.1f} ulps; please report "
                "it with the model"
            )
    return converted


def _is_norm(model: nn.Module) -> bool:
    from .surgery import _policies

    return type(model) in _policies()


def _verify(
    source: nn.Module,
    converted: nn.Module,
    settings: ENSettings,
    inputs: Tensor | None,
    tolerance: float,
) -> Verification:
    """``verify_conversion`` on ``inputs`` (or a default batch), the models' modes kept."""
    if inputs is None:
        cfg = getattr(converted, "pretrained_cfg", None) or {}
        size = (3, *cfg.get("input_size", (3, 224, 224))[1:])
        if isinstance(converted, MixedNorm2d):  # a norm layer alone: its channels, small maps
            size = (converted.num_features, 16, 16)
        inputs = default_batch(size)
    was_training = converted.training
    try:
        return verify_conversion(source, converted, settings, inputs, "example inputs", tolerance)
    finally:
        converted.train(was_training)


__all__ = ["convert_model"]
