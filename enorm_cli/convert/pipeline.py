"""``enorm convert`` as a library call: source model -> EN model -> verified .safetensors."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import build_metadata, save_checkpoint
from ..config.settings import ENSettings
from ..errors import EnormError
from ..fileio import check_writable
from ..models import create_source_model, data_config, head_classes
from .surgery import ConversionReport, count_parameters, nothing_to_convert, replace_norms
from .verify import (
    FLOAT64_TOLERANCE,
    Verification,
    calibration_batch,
    default_batch,
    verify_conversion,
)


@dataclass
class ConvertResult:
    model: nn.Module
    source_model: str
    report: ConversionReport
    params_before: int
    params_after: int
    verification: Verification | None
    """None with verify off."""
    out: Path | None

    exact: bool = True
    """False for SN and shared-affine EN: they start near the source, so the check only reports."""

    @property
    def verified(self) -> bool:
        return self.verification is None or not self.exact or self.verification.passed

    def to_json(self) -> dict[str, Any]:
        return {
            "source_model": self.source_model,
            "out": str(self.out) if self.out else None,
            "converted": [c.to_json() for c in self.report.converted],
            "converted_by_type": self.report.by_type(),
            "skipped": [{"name": n, "type": t, "reason": r} for n, t, r in self.report.skipped],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "verification": self.verification.to_json() if self.verification else None,
            "exact": self.exact,
            "verified": self.verified,
        }


def convert(
    model_name: str,
    out: Path | None,
    settings: ENSettings,
    checkpoint: Path | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    calib: Path | None = None,
    verify: bool = True,
    force: bool = False,
    tolerance: float = FLOAT64_TOLERANCE,
) -> ConvertResult:
    """Convert, verify in eval mode, and save (only when verified, or when verify is off).

    ``tolerance`` bounds the float64 comparison (``verify.verify_conversion``); the float32
    figures are reported beside it.
    """
    if out is not None:
        if out.suffix != ".safetensors":
            raise EnormError(f"--out {str(out)!r} must end in .safetensors")
        check_writable(out, force)
    name, source = create_source_model(
        model_name, pretrained and checkpoint is None, checkpoint, num_classes, model_kwargs
    )
    config = data_config(name, source)
    batch = None
    if verify:  # read the calibration images before the slow part, to fail early
        batch = (
            calibration_batch(calib, config)
            if calib is not None
            else default_batch(tuple(config["input_size"]))
        )
    model = copy.deepcopy(source) if verify else source
    params_before = count_parameters(source)
    report = replace_norms(model, settings)
    if not report.converted:
        raise EnormError(nothing_to_convert(model_name, settings, report))
    settings = report.settings_used(settings)
    verification = None
    if batch is not None:
        calibration = str(calib) if calib else "default smooth-noise batch"
        verification = verify_conversion(source, model, settings, batch, calibration, tolerance)
    result = ConvertResult(
        model=model.eval(),
        source_model=name.full,
        report=report,
        params_before=params_before,
        params_after=count_parameters(model),
        verification=verification,
        out=out,
        exact=settings.exact,
    )
    if out is not None and result.verified:
        metadata = build_metadata(
            source_model=name.full,
            namespace=name.namespace,
            num_classes=head_classes(name, model),
            settings=settings.to_json(),
            converted_layers={c.name: c.source_type for c in report.converted},
            data_config=config,
            layer_normalizers={c.name: list(c.normalizers) for c in report.converted},
            model_kwargs=name.kwargs,
        )
        check_writable(out, force)  # again: something may have appeared meanwhile
        save_checkpoint(model, out, metadata)
    return result
