"""``enorm export``: a checkpoint as ONNX or ``.pt2``, checked against PyTorch before it is kept."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import stdout, user_errors


@user_errors
def export(
    checkpoint: Path = typer.Argument(
        ..., help="An enorm .safetensors (convert or finetune output)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (.onnx or .pt2)."),
    fmt: str | None = typer.Option(
        None, "--format", "-f", help="onnx or pt2 (default: from --out's suffix)."
    ),
    calib: Path | None = typer.Option(
        None, "--calib", help="Folder of images for the check (default: a smooth-noise batch)."
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (18 or newer)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Export CHECKPOINT for deployment, with a dynamic batch axis.

    ONNX runs in onnxruntime (pip install 'enorm[export]'); .pt2 loads with
    torch.export.load without enorm installed. The written file is run on the calibration
    batch and kept only if it matches eager PyTorch (top-1 on every sample, max |delta logit|
    <= 1e-4 of max |logit|).

    Examples:

      enorm export runs/quickstart/best.safetensors --out mnv2_en.onnx

      enorm export runs/quickstart/best.safetensors --format pt2 --out mnv2_en.pt2
    """
    from ..checkpoint import load_model, read_info
    from ..convert.verify import calibration_batch, default_batch
    from ..export import check_request, export_model, format_for

    kind = format_for(out, fmt)
    check_request(out, kind, opset, force)  # before the slow part
    info = read_info(checkpoint)
    batch = (
        calibration_batch(calib, info.data_config)
        if calib is not None
        else default_batch(tuple(info.data_config["input_size"]))
    )
    model = load_model(checkpoint)
    result = export_model(
        model,
        batch,
        out,
        kind,
        str(calib) if calib else "default smooth-noise batch",
        opset=opset,
        force=force,
    )
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    a = result.agreement
    stdout.print(
        f"checked on {a.samples} samples ({a.calibration}): top-1 agreement "
        f"{a.top1_agreement:.1%}, "
        f"max |delta logit| {a.max_abs_delta:.2e} ({a.relative_delta:.2e} of max |logit|, "
        f"tolerance {result.tolerance:.0e})",
        markup=False,
        soft_wrap=True,
    )
    stdout.print(
        f"wrote {result.out} ({kind}, {result.size_bytes / 2**20:.1f} MiB; export "
        f"{result.export_seconds:.1f} s)",
        markup=False,
        soft_wrap=True,
    )
