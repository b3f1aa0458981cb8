"""``enorm convert``: replace a model's BatchNorm/GroupNorm layers with EN and save it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .common import stdout, user_errors

if TYPE_CHECKING:
    from ..config.settings import ENSettings


def settings_from_flags(**flags: Any) -> ENSettings:
    """``ENSettings`` from convert's flags; a bad value is one line naming its flag."""
    from pydantic import ValidationError

    from ..config.settings import ENSettings, validation_line
    from ..errors import EnormError

    try:
        return ENSettings(**flags)
    except ValidationError as exc:
        line = validation_line(exc, lambda field: "--" + field.split(".")[0].replace("_", "-"))
        raise EnormError(f"bad {line}") from None


def model_kwargs_from_flags(pairs: list[str]) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` pairs as the factory's kwargs, each value read as YAML
    (``true``, ``3``, ``[2, 3]``, ``none``; a plain word stays a string)."""
    import yaml

    from ..errors import EnormError

    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise EnormError(
                f"--model-arg {pair!r} is not KEY=VALUE: write e.g. --model-arg features_only=true"
            )
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        kwargs[key.strip()] = (
            None if isinstance(parsed, str) and parsed.lower() == "none" else parsed
        )
    return kwargs


@user_errors
def convert(
    model: str = typer.Argument(
        ...,
        help="timm model name (e.g. resnet50), torchvision:NAME (classification, detection, "
        "segmentation) or smp:ARCH (segmentation-models-pytorch).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Local weights (.pth/.pt/.bin state dict or .safetensors)."
    ),
    pretrained: bool = typer.Option(
        True, "--pretrained/--no-pretrained", help="Start from the hub's pretrained weights."
    ),
    num_classes: int | None = typer.Option(None, "--num-classes", help="New classifier width."),
    model_arg: list[str] | None = typer.Option(
        None,
        "--model-arg",
        help="KEY=VALUE for the model's factory, repeatable (features_only=true, "
        "encoder_name=tu-resnet18).",
    ),
    normalizers: str = typer.Option(
        "bn,in,ln", "--normalizers", help="Comma-separated: bn,in,ln,gn."
    ),
    reduction: int = typer.Option(16, "--reduction", help="Ratio-branch conv reduction r."),
    pi: int = typer.Option(50, "--pi", help="Ratio-branch hidden width factor pi."),
    margin: float = typer.Option(
        2.0, "--margin", help="Prior logit of the source normalizer (lambda_src = e^m/(e^m+K-1))."
    ),
    logit_scale: float | None = typer.Option(
        None,
        "--logit-scale",
        help="Ratio-branch FC2 scale s (logits = b + s W h); default 1/sqrt(pi K).",
    ),
    layer: str = typer.Option(
        "en", "--layer", help="en (Exemplar Normalization) or sn (Switchable, the baseline)."
    ),
    shared_affine: bool = typer.Option(
        False, "--shared-affine", help="One affine pair for all normalizers (ablation)."
    ),
    anchored: str = typer.Option(
        "auto",
        "--anchored",
        help="true: every normalizer starts with the source's gamma, mixing weights offset onto "
        "the source; false: the paper-style start, other gammas 0; auto: true for untrained "
        "sources (from scratch), false for trained ones.",
    ),
    include: str | None = typer.Option(
        None, "--include", help="Convert only modules whose name matches."
    ),
    exclude: str | None = typer.Option(None, "--exclude", help="Skip modules whose name matches."),
    calib: Path | None = typer.Option(
        None, "--calib", help="Folder of images for the verification batch."
    ),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Check the converted model's logits."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Convert MODEL's BatchNorm/GroupNorm layers to Exemplar Normalization.

    The converted model computes the same function in eval mode; this is
    checked on a calibration batch before anything is written.

    Examples:

      enorm convert resnet50 --no-pretrained --out r50_en.safetensors

      enorm convert torchvision:mobilenet_v2 --checkpoint mobilenet_v2-b0353104.pth
      --out mnv2_en.safetensors

      enorm convert test_efficientnet_gn --no-pretrained --normalizers bn,in,ln,gn -o gn.safetensors

      enorm convert resnet50 --model-arg features_only=true --no-pretrained -o r50_feat.safetensors

      enorm convert torchvision:fasterrcnn_resnet50_fpn --no-pretrained -o frcnn_en.safetensors

      enorm convert smp:Unet --model-arg encoder_name=tu-resnet34 --no-pretrained -o u.safetensors
    """
    from ..convert.pipeline import convert as run
    from .report import print_conversion

    settings = settings_from_flags(
        normalizers=tuple(n.strip().lower() for n in normalizers.split(",") if n.strip()),
        reduction=reduction,
        pi=pi,
        margin=margin,
        layer=layer.strip().lower(),
        shared_affine=shared_affine,
        anchored=anchored,
        logit_scale=logit_scale,
        include=include,
        exclude=exclude,
    )
    result = run(
        model,
        out,
        settings,
        checkpoint=checkpoint,
        pretrained=pretrained,
        num_classes=num_classes,
        model_kwargs=model_kwargs_from_flags(model_arg or []),
        calib=calib,
        verify=verify,
        force=force,
    )
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_conversion(result, stdout)
    if not result.verified:
        v = result.verification
        typer.echo(
            f"error: the converted model is not the source's function beyond rounding (float64 "
            f"delta {v.float64.relative_delta:.2e} of max |logit|, tolerance {v.tolerance:.1e}; "
            f"weights {v.rounding_ulps:.2g} rounding units off the float64 conversion): nothing "
            "was written. Report this with --json output, or pass --no-verify to save anyway",
            err=True,
        )
        raise typer.Exit(1)
